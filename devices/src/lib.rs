//! The machine's emulated devices, reached by port I/O from the vCPU loop.
//!
//! Every device validates what the guest writes: a value it does not understand is logged
//! and ignored, never a reason to panic the VMM.

pub mod bus;
pub mod control;
pub mod engine;
pub mod exit;
pub mod serial;

pub use bus::{PioBus, PioDevice};
pub use control::{MachineControl, MachineStatus, StatusHandle};
pub use engine::CopyEngine;
pub use exit::{ExitDevice, GuestExit};
pub use serial::SerialConsole;
