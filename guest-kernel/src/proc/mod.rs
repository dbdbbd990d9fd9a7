//! Processes and what runs them: the kernel's state for a boot ([`kernel`]) and its start
//! ([`boot`]), processes and the scheduler ([`process`]), system calls ([`syscall`]), the
//! dispatch of every entry ([`trap`], which defines the `trap_dispatch` symbol the entry
//! stubs call), and the start of user programs from their ELF files ([`load`]). The top of
//! the kernel below `main.rs`: it may use every layer.

pub mod boot;
pub mod kernel;
pub mod load;
pub mod process;
pub mod syscall;
pub mod trap;
