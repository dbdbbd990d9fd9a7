//! Processes and what runs them: the kernel's state for a boot ([`kernel`]) and its start
//! ([`boot`]), processes and the scheduler ([`process`]), system calls ([`syscall`]), the
//! dispatch of every entry ([`trap`], which defines the `trap_dispatch` symbol the entry
//! stubs call), and the user workloads ([`user`]). The top of the kernel below `main.rs`: it may use every layer.

pub mod boot;
pub mod kernel;
pub mod process;
pub mod syscall;
pub mod trap;
pub mod user;
