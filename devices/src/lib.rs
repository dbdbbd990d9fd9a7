//! The machine's emulated devices, reached by port I/O or MMIO from the vCPU loop
//! through a [`Bus`].
//!
//! Every device validates what the guest writes: a value it does not understand is logged
//! and ignored, never a reason to panic the VMM.

pub mod barrier;
pub mod bus;
pub mod control;
pub mod dirty;
pub mod engine;
pub mod exit;
pub mod log_limit;
pub mod persistence;
pub mod quantile;
pub mod record;
pub mod requests;
pub mod serial;
pub mod virtio;

pub use barrier::PersistBarrier;
pub use bus::{Bus, BusAddress, BusDevice, MmioBus, PioBus};
pub use control::{MachineControl, MachineStatus, StatusHandle};
pub use engine::CopyEngine;
pub use exit::{ExitDevice, GuestExit};
pub use log_limit::LogLimit;
pub use persistence::{CrashEvict, PersistenceDomain, PersistenceModel};
pub use serial::{SerialConsole, SharedConsole};
