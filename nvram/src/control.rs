//! The machine-control device: how the guest kernel reports to the VMM, and learns from it.
//!
//! Port I/O at [`BASE`] (see [`crate::ports`]):
//!
//! | offset | access    | meaning                                                             |
//! |--------|-----------|---------------------------------------------------------------------|
//! | 0      | read u32  | [`DEVICE_ID`]: present (QEMU and other VMMs read all ones)          |
//! | 0      | write u32 | doorbell: guest-physical address of a message (8-byte aligned)      |
//! | 4      | read u32  | the guest's TSC frequency in kHz (0 if the VMM does not know it)    |
//!
//! A message is a [`MessageHeader`] followed by its payload, `len` bytes in all, at most
//! [`MAX_MESSAGE`], entirely inside guest RAM. The VMM copies it out at the doorbell, checks
//! kind, length and every field, and ignores (and logs) what does not hold. Little endian.
//!
//! | kind | payload          | sent when                                                    |
//! |------|------------------|--------------------------------------------------------------|
//! | 1    | [`Booted`]       | the kernel has decided how it boots (cold, resumed, restored)|
//! | 2    | [`Heartbeat`]    | a workload reports progress                                  |

/// Version of this interface; bumped at any incompatible change.
pub const ABI_VERSION: u32 = 1;
/// What offset 0 reads as: "NVMC" and the ABI version in the low byte.
pub const DEVICE_ID: u32 = 0x4e56_4d00 | ABI_VERSION;
/// First port of the device.
pub const BASE: u16 = 0x500;
/// Number of ports.
pub const LEN: u16 = 8;
/// Offset of the doorbell / identification register.
pub const REG_DOORBELL: u16 = 0;
/// Offset of the TSC frequency register.
pub const REG_TSC_KHZ: u16 = 4;
/// Largest message, header included.
pub const MAX_MESSAGE: u32 = 4096;
/// Length of a workload name, NUL-padded.
pub const NAME_LEN: usize = 16;

/// Message kinds.
pub const KIND_BOOTED: u32 = 1;
pub const KIND_HEARTBEAT: u32 = 2;

/// Every message starts with this.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct MessageHeader {
    pub kind: u32,
    /// Length of the whole message, header included.
    pub len: u32,
}

/// How the kernel booted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum BootKind {
    /// A blank image, formatted at this boot.
    Cold = 0,
    /// After a graceful shutdown: the machine goes on exactly where it stopped.
    Resumed = 1,
    /// After a crash: the last committed write-out was restored.
    Restored = 2,
}

impl BootKind {
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Cold),
            1 => Some(Self::Resumed),
            2 => Some(Self::Restored),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Cold => "cold",
            Self::Resumed => "resumed",
            Self::Restored => "restored",
        }
    }
}

/// Kind 1: the kernel booted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Booted {
    pub header: MessageHeader,
    /// A [`BootKind`].
    pub boot_kind: u32,
    pub reserved: u32,
    /// Boots of this image, this one included.
    pub boot_count: u64,
    /// Generation of the last committed write-out (0: none yet).
    pub generation: u64,
}

/// Result of a workload's self-check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Verified {
    /// The workload has no check, or has not run it yet.
    Unknown = 0,
    Passed = 1,
    Failed = 2,
}

impl Verified {
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Unknown),
            1 => Some(Self::Passed),
            2 => Some(Self::Failed),
            _ => None,
        }
    }
}

/// Kind 2: a workload's progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Heartbeat {
    pub header: MessageHeader,
    /// The workload's name (`counter`, `kv`, ...), NUL-padded ASCII.
    pub name: [u8; NAME_LEN],
    /// The reporting process.
    pub pid: u32,
    /// A [`Verified`].
    pub verified: u32,
    /// Monotonic progress: counter value, operations done, intervals run.
    pub progress: u64,
    /// The workload's running checksum of its data.
    pub checksum: u64,
}

impl Booted {
    pub fn new(kind: BootKind, boot_count: u64, generation: u64) -> Self {
        Self {
            header: MessageHeader { kind: KIND_BOOTED, len: core::mem::size_of::<Self>() as u32 },
            boot_kind: kind as u32,
            reserved: 0,
            boot_count,
            generation,
        }
    }
}

impl Heartbeat {
    pub fn new(name: &str, pid: u32, progress: u64, checksum: u64, verified: Verified) -> Self {
        let mut padded = [0u8; NAME_LEN];
        let len = name.len().min(NAME_LEN);
        padded[..len].copy_from_slice(&name.as_bytes()[..len]);
        Self {
            header: MessageHeader { kind: KIND_HEARTBEAT, len: core::mem::size_of::<Self>() as u32 },
            name: padded,
            pid,
            verified: verified as u32,
            progress,
            checksum,
        }
    }
}
