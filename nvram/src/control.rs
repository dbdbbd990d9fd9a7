//! The machine-control device: how the guest kernel reports to the VMM, and learns from it.
//!
//! Port I/O at [`BASE`] (see [`crate::ports`]):
//!
//! | offset | access    | meaning                                                             |
//! |--------|-----------|---------------------------------------------------------------------|
//! | 0      | read u32  | [`DEVICE_ID`]: present (QEMU and other VMMs read all ones)          |
//! | 0      | write u32 | doorbell: guest-physical address of a message (8-byte aligned)      |
//! | 4      | read u32  | the guest's TSC frequency in kHz (0 if the VMM does not know it)    |
//! | 8      | read u32  | the VMM's pending [`Request`] (0: none); reading takes it           |
//!
//! A message is a [`MessageHeader`] followed by its payload, `len` bytes in all, at most
//! [`MAX_MESSAGE`], entirely inside guest RAM. The VMM copies it out at the doorbell, checks
//! kind, length and every field, and ignores (and logs) what does not hold. Little endian.
//!
//! | kind | payload          | sent when                                                    |
//! |------|------------------|--------------------------------------------------------------|
//! | 1    | [`Booted`]       | the kernel has decided how it boots (cold, resumed, restored)|
//! | 2    | [`Heartbeat`]    | a workload reports progress                                  |
//! | 3    | [`Metrics`]      | a write-out was committed, a restore done, or a lazy one ended |
//! | 4    | [`Started`]      | a write-out begins (a crash from here to its metrics is one inside a write-out) |
//! | 5    | [`Running`]      | the first process of this boot is entered (after a restore: the restored workload runs again) |
//! | 6    | [`Refused`]      | a user program given at boot was not started (its ELF file, or room for it, is wanting) |
//! | 7    | console text     | the kernel prints: 1 to [`CONSOLE_TEXT_MAX`] bytes, for the VMM's console (see below) |
//!
//! Console text goes to the same output as the UART's bytes, in order with them. It exists
//! because under PVM every UART byte is a VM exit plus emulated driver code, which made
//! printing most of a boot's time (about 1.5 ms a line); a line is one exit here.
//!
//! Requests: the VMM raises interrupt line [`REQUEST_IRQ`] (the PIC's IRQ 5) when it queues
//! one, so that the guest acts on it at once rather than at its next timer tick; the guest
//! also looks at [`REG_REQUEST`] on its timer ticks, so a request whose interrupt it missed
//! (one raised while its interrupts were off) is still served.

use num_enum::{IntoPrimitive, TryFromPrimitive};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Version of this interface; bumped at any incompatible change.
pub const ABI_VERSION: u32 = 2;
/// What offset 0 reads as: "NVMC" and the ABI version in the low byte.
pub const DEVICE_ID: u32 = 0x4e56_4d00 | ABI_VERSION;
/// First port of the device.
pub const BASE: u16 = 0x500;
/// Number of ports.
pub const LEN: u16 = 12;
/// Offset of the doorbell / identification register.
pub const REG_DOORBELL: u16 = 0;
/// Offset of the TSC frequency register.
pub const REG_TSC_KHZ: u16 = 4;
/// Offset of the request register.
pub const REG_REQUEST: u16 = 8;
/// The interrupt line (PIC IRQ, IOAPIC GSI) the VMM raises when it queues a [`Request`].
pub const REQUEST_IRQ: u8 = 5;

/// What the VMM asks of the guest kernel (read from [`REG_REQUEST`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromPrimitive, IntoPrimitive)]
#[repr(u32)]
pub enum Request {
    None = 0,
    /// A write-out (checkpoint) now.
    Checkpoint = 1,
    /// A graceful shutdown.
    Shutdown = 2,
}

/// Largest message, header included.
pub const MAX_MESSAGE: u32 = 4096;
/// Length of a workload name, NUL-padded.
pub const NAME_LEN: usize = 16;

/// Message kinds.
pub const KIND_BOOTED: u32 = 1;
pub const KIND_HEARTBEAT: u32 = 2;
pub const KIND_METRICS: u32 = 3;
pub const KIND_STARTED: u32 = 4;
pub const KIND_RUNNING: u32 = 5;
pub const KIND_REFUSED: u32 = 6;
pub const KIND_CONSOLE: u32 = 7;

/// Most text in one console message: what fits in [`MAX_MESSAGE`] after the header.
pub const CONSOLE_TEXT_MAX: usize = MAX_MESSAGE as usize - core::mem::size_of::<MessageHeader>();

/// The header of a console message carrying `text_len` bytes (its text follows it).
pub const fn console_header(text_len: usize) -> MessageHeader {
    MessageHeader { kind: KIND_CONSOLE, len: (core::mem::size_of::<MessageHeader>() + text_len) as u32 }
}

/// Every message starts with this.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MessageHeader {
    pub kind: u32,
    /// Length of the whole message, header included.
    pub len: u32,
}

impl MessageHeader {
    /// The header of a message of kind `kind` whose whole size is `T`'s.
    const fn of<T>(kind: u32) -> Self {
        Self { kind, len: core::mem::size_of::<T>() as u32 }
    }
}

/// Kind 4: a write-out of `generation` begins, for `cause` (a [`Cause`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Started {
    pub header: MessageHeader,
    pub cause: u32,
    pub reserved: u32,
    pub generation: u64,
}

impl Started {
    pub fn new(generation: u64, cause: Cause) -> Self {
        Self { header: MessageHeader::of::<Self>(KIND_STARTED), cause: cause.into(), reserved: 0, generation }
    }
}

/// Why a write-out runs: whether a request was served by its interrupt or only found at a
/// timer tick shows whether checkpoints asked for start at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromPrimitive, IntoPrimitive, strum::IntoStaticStr)]
#[strum(serialize_all = "kebab-case")]
#[repr(u32)]
pub enum Cause {
    /// Not said (an older kernel).
    Unknown = 0,
    /// The first write-out of a cold boot.
    Boot = 1,
    /// A process's checkpoint system call.
    Call = 2,
    /// The periodic write-out (`checkpoint_ms`).
    Periodic = 3,
    /// A request of the VMM, found at a timer tick (its interrupt was missed).
    RequestAtTick = 4,
    /// A request of the VMM, served by its interrupt ([`REQUEST_IRQ`]).
    RequestInterrupt = 5,
}

/// Number of [`Cause`]s.
pub const CAUSES: usize = 6;

/// Kind 5: process `pid` is the first this boot enters, with the write-out of `generation`
/// committed (after a restore, the one restored): the end of "crash to running".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Running {
    pub header: MessageHeader,
    pub pid: u32,
    pub reserved: u32,
    pub generation: u64,
}

impl Running {
    pub fn new(pid: u32, generation: u64) -> Self {
        Self { header: MessageHeader::of::<Self>(KIND_RUNNING), pid, reserved: 0, generation }
    }
}

/// Kind 6: the program `name` (its boot module's name) was not started, for `code` (a
/// [`crate::program::ProgramError`] as [`ProgramError::code`](crate::program::ProgramError::code)
/// gives it, with its `detail`). The machine goes on with its other programs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Refused {
    pub header: MessageHeader,
    pub name: [u8; NAME_LEN],
    pub code: u32,
    pub reserved: u32,
    pub detail: u64,
}

impl Refused {
    pub fn new(name: &str, error: crate::program::ProgramError) -> Self {
        Self {
            header: MessageHeader::of::<Self>(KIND_REFUSED),
            name: padded_name(name),
            code: error.code(),
            reserved: 0,
            detail: error.detail(),
        }
    }
}

/// `name` cut to [`NAME_LEN`] bytes and NUL-padded; bytes that are not printable ASCII
/// become `?`, so that a program's name always decodes.
fn padded_name(name: &str) -> [u8; NAME_LEN] {
    let mut padded = [0u8; NAME_LEN];
    for (slot, &b) in padded.iter_mut().zip(name.as_bytes()) {
        *slot = if b.is_ascii_graphic() { b } else { b'?' };
    }
    padded
}

/// What a [`Metrics`] message measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromPrimitive, IntoPrimitive)]
#[repr(u32)]
pub enum Operation {
    WriteOut = 0,
    /// A restore: with `restore=lazy`, until the processes can run (the user spaces' pages
    /// still in their save areas); else every byte back.
    Restore = 1,
    /// The end of a lazy restore: the last page left in a save area is back. `total` runs
    /// from the restore's start; `copied_bytes` are the pages brought back since the restore
    /// (at first touches, and the rest at once), `plates` the user spaces they were in;
    /// the phases: the walks of the page tables as "scan and plan", the copies as "copy".
    RestoreTail = 2,
}

/// What copied the bytes of a write-out or restore. Its name (`<&str>::from`) is what the
/// VMM reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, TryFromPrimitive, IntoPrimitive, strum::IntoStaticStr)]
#[strum(serialize_all = "lowercase")]
#[repr(u32)]
pub enum Copier {
    /// The guest kernel, `rep movsq` and cache-line flushes.
    #[default]
    Cpu = 0,
    /// The copy engine device (`crate::engine`).
    Engine = 1,
    /// The virtio disk's requests (`plate_store=disk`): the save areas are on the disk.
    Disk = 2,
}

/// Phases of a write-out or restore, in the order of [`Metrics::phases`]. "scan and plan" is
/// finding what changed (the engine's dirty log, or the page tables' dirty bits) and planning
/// the copies plate by plate: the bookkeeping between plate-ification and the commit.
///
/// "storage I/O" is the time spent in disk requests with `plate_store=disk` (reads, writes,
/// flushes of the areas and the slots), counted there and in no other phase, so that the
/// paper's split (I/O against the rest) reads off the figures; 0 with the areas in NVM.
pub const PHASES: [&str; 7] = ["plate-ification", "scan and plan", "copy", "commit", "flush", "free", "storage I/O"];
/// Index of the storage I/O phase in [`PHASES`].
pub const IO_PHASE: usize = 6;

/// Kind 3: the figures of one write-out (committed) or restore (done). Times are in TSC
/// ticks; the VMM converts them with the TSC rate it gave the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Metrics {
    pub header: MessageHeader,
    /// An [`Operation`].
    pub operation: u32,
    pub plates: u32,
    /// A [`Copier`]: what moved the bytes.
    pub copier: u32,
    /// Restore only: how many generations the restore went back behind the one the root
    /// header records (0: none). A committed slot found damaged (a wrong entry, a save
    /// area whose checksum fails) makes the restore fall back to the older one, and says so
    /// here. Always 0 for a write-out.
    pub rolled_back: u32,
    /// Generation committed (write-out) or restored (restore).
    pub generation: u64,
    pub plated_bytes: u64,
    pub copied_bytes: u64,
    /// TSC ticks per phase, as in [`PHASES`].
    pub phases: [u64; 7],
    /// TSC ticks of the whole operation.
    pub total: u64,
}

/// How the kernel booted. Its name (`<&str>::from`) is what the VMM reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromPrimitive, IntoPrimitive, strum::IntoStaticStr)]
#[strum(serialize_all = "lowercase")]
#[repr(u32)]
pub enum BootKind {
    /// A blank image, formatted at this boot.
    Cold = 0,
    /// After a graceful shutdown: the machine goes on exactly where it stopped.
    Resumed = 1,
    /// After a crash: the last committed write-out was restored.
    Restored = 2,
}

/// Kind 1: the kernel booted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Booted {
    pub header: MessageHeader,
    /// A [`BootKind`].
    pub boot_kind: u32,
    /// Runs of ring-3 kernel work (the guest's `arch::ring3::run`) since the kernel
    /// started: how often its boot went to CPL 3 and back, each trip about 0.15 ms under
    /// PVM, whose kernel mode is emulated. (Reserved, zero, before the field existed.)
    pub work_runs: u32,
    /// Boots of this image, this one included.
    pub boot_count: u64,
    /// Generation of the last committed write-out (0: none yet).
    pub generation: u64,
}

/// Result of a workload's self-check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromPrimitive, IntoPrimitive)]
#[repr(u32)]
pub enum Verified {
    /// The workload has no check, or has not run it yet.
    Unknown = 0,
    Passed = 1,
    Failed = 2,
}

/// Kind 2: a workload's progress.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
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

// The sizes the VMM's checks and the guest's messages agree on: the image of the ABI.
const _: () = assert!(core::mem::size_of::<MessageHeader>() == 8);
const _: () = assert!(core::mem::size_of::<Booted>() == 32);
const _: () = assert!(core::mem::size_of::<Heartbeat>() == 48);
const _: () = assert!(core::mem::size_of::<Metrics>() == 112);
const _: () = assert!(core::mem::size_of::<Started>() == 24);
const _: () = assert!(core::mem::size_of::<Running>() == 24);

impl Metrics {
    pub fn new(operation: Operation) -> Self {
        Self { header: MessageHeader::of::<Self>(KIND_METRICS), operation: operation.into(), ..Self::default() }
    }
}

impl Booted {
    pub fn new(kind: BootKind, boot_count: u64, generation: u64) -> Self {
        Self {
            header: MessageHeader::of::<Self>(KIND_BOOTED),
            boot_kind: kind.into(),
            work_runs: 0,
            boot_count,
            generation,
        }
    }

    /// With the count of ring-3 work runs ([`Booted::work_runs`]).
    pub fn with_work_runs(self, work_runs: u32) -> Self {
        Self { work_runs, ..self }
    }
}

impl Heartbeat {
    pub fn new(name: &str, pid: u32, progress: u64, checksum: u64, verified: Verified) -> Self {
        let mut padded = [0u8; NAME_LEN];
        let len = name.len().min(NAME_LEN);
        padded[..len].copy_from_slice(&name.as_bytes()[..len]);
        Self {
            header: MessageHeader::of::<Self>(KIND_HEARTBEAT),
            name: padded,
            pid,
            verified: verified.into(),
            progress,
            checksum,
        }
    }
}

/// A message, decoded and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    Booted {
        boot_kind: BootKind,
        boot_count: u64,
        generation: u64,
        work_runs: u32,
    },
    Heartbeat {
        name: Name,
        pid: u32,
        progress: u64,
        checksum: u64,
        verified: Verified,
    },
    Metrics(MetricsReport),
    Started {
        generation: u64,
        cause: Cause,
    },
    Running {
        pid: u32,
        generation: u64,
    },
    Refused {
        name: Name,
        error: crate::program::ProgramError,
    },
    /// Console text: the `len` bytes after the header (the message's own bytes, not copied
    /// here, so that a message stays small).
    Console {
        len: usize,
    },
}

/// A decoded [`Metrics`] message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricsReport {
    pub operation: Operation,
    pub plates: u32,
    pub copier: Copier,
    /// See [`Metrics::rolled_back`].
    pub rolled_back: u32,
    pub generation: u64,
    pub plated_bytes: u64,
    pub copied_bytes: u64,
    pub phases: [u64; 7],
    pub total: u64,
}

/// A workload's name: 1 to 16 printable ASCII bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Name {
    bytes: [u8; NAME_LEN],
    len: usize,
}

impl Name {
    pub fn as_str(&self) -> &str {
        // Checked printable ASCII at decoding.
        core::str::from_utf8(&self.bytes[..self.len]).unwrap_or("?")
    }
}

/// Why a message is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than a header, or than the header's length says.
    #[error("message truncated: {have} bytes of {need}")]
    Truncated { have: usize, need: usize },
    /// The header's length is not the kind's size.
    #[error("message of kind {kind} claims {len} bytes, which is not its size")]
    Length { kind: u32, len: u32 },
    #[error("unknown message kind {0}")]
    UnknownKind(u32),
    #[error("boot kind {0} is not cold (0), resumed (1) or restored (2)")]
    BadBootKind(u32),
    #[error("verification result {0} is not unknown (0), passed (1) or failed (2)")]
    BadVerified(u32),
    #[error("operation {0} is not a write-out (0) or a restore (1)")]
    BadOperation(u32),
    #[error("write-out cause {0} is not one of 0 to 5")]
    BadCause(u32),
    #[error("copier {0} is not the CPU (0) or the engine (1)")]
    BadCopier(u32),
    /// The phases add up to more than the total.
    #[error("the phases take longer than the whole operation")]
    BadTimes,
    /// The name is empty, not printable ASCII, or not NUL-padded.
    #[error("workload name is not 1 to 16 printable ASCII bytes, NUL-padded")]
    BadName,
    /// A reserved field is not zero.
    #[error("a reserved field is not zero")]
    Reserved,
    #[error("program refusal {0} is not one the kernel sends")]
    BadRefusal(u32),
}

/// Reads the header of a message: its kind and total length.
pub fn peek_header(bytes: &[u8]) -> Result<MessageHeader, DecodeError> {
    read::<MessageHeader>(bytes)
}

/// The record `T` at the start of `bytes` (copied: a message need not be aligned).
fn read<T: FromBytes>(bytes: &[u8]) -> Result<T, DecodeError> {
    T::read_from_prefix(bytes)
        .map(|(record, _)| record)
        .map_err(|_| DecodeError::Truncated { have: bytes.len(), need: core::mem::size_of::<T>() })
}

/// A name field: 1 to [`NAME_LEN`] printable ASCII bytes, NUL-padded.
fn decode_name(name: [u8; NAME_LEN]) -> Result<Name, DecodeError> {
    let len = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    let printable = name[..len].iter().all(|b| b.is_ascii_graphic());
    let padded = name[len..].iter().all(|&b| b == 0);
    if len == 0 || !printable || !padded {
        return Err(DecodeError::BadName);
    }
    Ok(Name { bytes: name, len })
}

/// Decodes and checks a whole message.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let header = peek_header(bytes)?;
    if header.kind == KIND_CONSOLE {
        let len = (header.len as usize).saturating_sub(core::mem::size_of::<MessageHeader>());
        if len == 0 || len > CONSOLE_TEXT_MAX {
            return Err(DecodeError::Length { kind: header.kind, len: header.len });
        }
        if bytes.len() < header.len as usize {
            return Err(DecodeError::Truncated { have: bytes.len(), need: header.len as usize });
        }
        return Ok(Message::Console { len });
    }
    let size = match header.kind {
        KIND_BOOTED => core::mem::size_of::<Booted>(),
        KIND_HEARTBEAT => core::mem::size_of::<Heartbeat>(),
        KIND_METRICS => core::mem::size_of::<Metrics>(),
        KIND_STARTED => core::mem::size_of::<Started>(),
        KIND_RUNNING => core::mem::size_of::<Running>(),
        KIND_REFUSED => core::mem::size_of::<Refused>(),
        kind => return Err(DecodeError::UnknownKind(kind)),
    };
    if header.len as usize != size {
        return Err(DecodeError::Length { kind: header.kind, len: header.len });
    }
    match header.kind {
        KIND_BOOTED => {
            let m: Booted = read(bytes)?;
            let boot_kind = BootKind::try_from(m.boot_kind).map_err(|e| DecodeError::BadBootKind(e.number))?;
            Ok(Message::Booted {
                boot_kind,
                boot_count: m.boot_count,
                generation: m.generation,
                work_runs: m.work_runs,
            })
        }
        KIND_STARTED => {
            let m: Started = read(bytes)?;
            if m.reserved != 0 {
                return Err(DecodeError::Reserved);
            }
            let cause = Cause::try_from(m.cause).map_err(|e| DecodeError::BadCause(e.number))?;
            Ok(Message::Started { generation: m.generation, cause })
        }
        KIND_RUNNING => {
            let m: Running = read(bytes)?;
            if m.reserved != 0 {
                return Err(DecodeError::Reserved);
            }
            Ok(Message::Running { pid: m.pid, generation: m.generation })
        }
        KIND_REFUSED => {
            let m: Refused = read(bytes)?;
            if m.reserved != 0 {
                return Err(DecodeError::Reserved);
            }
            let error =
                crate::program::ProgramError::from_code(m.code, m.detail).ok_or(DecodeError::BadRefusal(m.code))?;
            Ok(Message::Refused { name: decode_name(m.name)?, error })
        }
        KIND_METRICS => {
            let m: Metrics = read(bytes)?;
            let operation = Operation::try_from(m.operation).map_err(|e| DecodeError::BadOperation(e.number))?;
            let copier = Copier::try_from(m.copier).map_err(|e| DecodeError::BadCopier(e.number))?;
            if operation == Operation::WriteOut && m.rolled_back != 0 {
                return Err(DecodeError::Reserved);
            }
            let sum = m.phases.iter().try_fold(0u64, |a, &p| a.checked_add(p));
            if sum.is_none_or(|s| s > m.total) {
                return Err(DecodeError::BadTimes);
            }
            Ok(Message::Metrics(MetricsReport {
                operation,
                plates: m.plates,
                copier,
                rolled_back: m.rolled_back,
                generation: m.generation,
                plated_bytes: m.plated_bytes,
                copied_bytes: m.copied_bytes,
                phases: m.phases,
                total: m.total,
            }))
        }
        _ => {
            let m: Heartbeat = read(bytes)?;
            let verified = Verified::try_from(m.verified).map_err(|e| DecodeError::BadVerified(e.number))?;
            Ok(Message::Heartbeat {
                name: decode_name(m.name)?,
                pid: m.pid,
                progress: m.progress,
                checksum: m.checksum,
                verified,
            })
        }
    }
}

#[cfg(test)]
mod tests;
