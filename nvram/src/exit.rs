//! Values the guest writes to the exit port ([`crate::ports::EXIT`]).
//!
//! QEMU's `isa-debug-exit` turns a value `v` into the process exit status `(v << 1) | 1`,
//! so under QEMU a power-off exits with status 1, a panic with 3, and so on. Our VMM
//! decodes the value and reports it in words.

use num_enum::{IntoPrimitive, TryFromPrimitive};

/// Why the guest stopped the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromPrimitive, IntoPrimitive)]
#[repr(u8)]
pub enum ExitCode {
    /// A requested power-off: the normal end.
    PowerOff = 0,
    /// The kernel panicked.
    Panic = 1,
    /// A CPU exception the kernel could not handle.
    Exception = 2,
    /// The image holds state this kernel must not use (another format or build); the
    /// kernel said why on the console. `vmm boot --reformat` starts the image afresh.
    BadImage = 3,
    /// `plate_store=disk`: the disk cannot hold the plate store (too small for the plates'
    /// save areas, another disk's contents, or no commit that can be restored); the kernel
    /// said why on the console.
    BadDisk = 4,
}

impl ExitCode {
    /// Decodes a value written to the exit port; `None` for a value no kernel of ours writes.
    pub fn from_raw(value: u32) -> Option<Self> {
        u8::try_from(value).ok().and_then(|v| Self::try_from(v).ok())
    }

    /// The value to write to the exit port.
    pub const fn raw(self) -> u32 {
        self as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_values_round_trip() {
        for code in [ExitCode::PowerOff, ExitCode::Panic, ExitCode::Exception, ExitCode::BadImage, ExitCode::BadDisk] {
            assert_eq!(ExitCode::from_raw(code.raw()), Some(code));
        }
        assert_eq!(ExitCode::from_raw(5), None);
        assert_eq!(ExitCode::from_raw(u32::MAX), None);
    }
}
