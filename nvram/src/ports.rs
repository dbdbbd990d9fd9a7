//! I/O ports of the machine, as seen by the guest.
//!
//! | port          | width | device                                                     |
//! |---------------|-------|------------------------------------------------------------|
//! | `0x3f8..0x400`| 8     | COM1, a 16550 UART (the console)                           |
//! | `0xf4`        | 8-32  | exit device, compatible with QEMU's `isa-debug-exit`       |
//! | `0x500..0x50c`| 32    | machine-control device ([`crate::control`])                |
//! | `0x520..0x528`| 32    | copy engine ([`crate::engine`])                            |
//! | `0x530..0x538`| 32    | persist-barrier device ([`crate::persist`])                |
//!
//! Any other port reads as all ones and ignores writes; the VMM logs a few such accesses a
//! second, with a count of the others.

/// Base of COM1, the guest's console.
pub const COM1: u16 = 0x3f8;
/// Number of registers of a 16550 UART.
pub const COM1_LEN: u16 = 8;
/// Interrupt line of COM1 on the PIC/IOAPIC.
pub const COM1_IRQ: u32 = 4;

/// The exit device: a write stops the machine. Same port as QEMU's `isa-debug-exit` default
/// (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`), so the same kernel stops QEMU too.
/// The value written is an [`crate::exit::ExitCode`].
pub const EXIT: u16 = 0xf4;
