//! A KVM virtual machine whose main memory is a file: the NVM machine.
//!
//! Guest RAM is a `MAP_SHARED` mapping of the image file, so every store the guest makes is
//! a store to the file and outlives the VMM process, as main memory made of NVM would
//! outlive a power failure. The crate is driven by one [`VmConfig`]; it never sees the
//! command line. Boot, step by step ([`Machine::build`]):
//!
//! 1. open and lock the image, create it sparse when missing ([`image`]);
//! 2. map it as guest RAM ([`memory`]);
//! 3. load the kernel ELF and write the PVH boot parameters ([`loader`]);
//! 4. give the VM (created empty before the image is opened) guest RAM and KVM's in-kernel
//!    irqchip and PIT ([`vm`]), while a thread maps the image's data ahead;
//! 5. set the vCPU up for the PVH entry ([`vcpu`]);
//! 6. run until the guest stops the machine or the user stops the VMM ([`Machine::run`], or
//!    [`Machine::spawn`] for a thread of its own, driven through its [`Controller`]).

pub mod api;
pub mod apps;
pub mod config;
pub mod control_socket;
pub mod error;
pub mod image;
/// The offline image decoder, `nvram`'s (it was here).
pub use nvram::inspect;
pub mod kernel;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod modules;
pub mod perf;
pub mod programs;
pub use devices::quantile;
pub mod running;
pub mod sigbus;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;

#[cfg(feature = "harness")]
pub mod harness;

pub use api::{Controller, WriteOutPoint};
pub use config::{ConfigError, ConsoleOutput, DiskConfig, KernelSource, MemoryKind, Prefault, ProgramFile, VmConfig};
pub use error::Error;
pub use machine::{Machine, RunOutcome};
pub use running::{RunningMachine, WaitError};
pub use vcpu_state::{VcpuHandle, VcpuState};
