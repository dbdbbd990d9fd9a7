//! The persist-barrier device: how the guest kernel tells the machine which cache lines it
//! has written back, so that a machine whose caches are outside the persistence domain
//! (ADR) can make exactly those lines durable, and lose the rest at a power failure.
//!
//! A real CPU needs no such device: `clflushopt` + `sfence` reach the memory controller by
//! themselves. An emulated one cannot see its guest's flush instructions (they run without
//! a VM exit), so the guest announces each barrier, as a paravirtual kernel announces other
//! things its hypervisor cannot observe.
//!
//! Ports at [`BASE`]:
//!
//! | offset | access    | meaning                                                               |
//! |--------|-----------|-----------------------------------------------------------------------|
//! | 0      | read u32  | [`DEVICE_ID`]: present (other machines read all ones)                  |
//! | 4      | read u32  | [`MODE_ANNOUNCE`] if barriers must be announced, 0 if every store is durable (eADR) |
//! | 0      | write u32 | barrier: guest-physical address of a [`BarrierHeader`] and its ranges  |
//! | 4      | write u32 | write back every cache line (as `wbinvd`); the value is ignored        |
//!
//! A barrier is synchronous: when the port write returns, every listed range is durable and
//! `status` written. Each range must lie inside guest RAM; a list with a bad range is refused
//! whole ([`STATUS_BAD_RANGE`], `failed` its index) and logged: nothing of it is written back.
//!
//! Layout (little endian): `magic` u32 ([`BARRIER_MAGIC`]), `count` u32, `status` u32,
//! `failed` u32, then `count` ranges of 16 bytes: `addr` u64, `len` u64.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Version of this interface.
pub const ABI_VERSION: u32 = 1;
/// What offset 0 reads as: "NVPB" with the version in the low byte.
pub const DEVICE_ID: u32 = 0x4e56_5000 | ABI_VERSION;
/// First port.
pub const BASE: u16 = 0x530;
/// Number of ports.
pub const LEN: u16 = 8;
/// Offset of the barrier doorbell and identification register.
pub const REG_BARRIER: u16 = 0;
/// Offset of the mode register (read) and the write-back-all doorbell (write).
pub const REG_MODE: u16 = 4;
/// Mode bit: the machine needs barriers announced (ADR, or durable on the host too).
pub const MODE_ANNOUNCE: u32 = 1;
/// Magic of a barrier list.
pub const BARRIER_MAGIC: u32 = 0x5241_4250; // "PBAR"
/// Most ranges in one barrier list.
pub const MAX_RANGES: u32 = 128;

/// Status: written by the guest before ringing.
pub const STATUS_PENDING: u32 = 0;
/// Every range is durable.
pub const STATUS_DONE: u32 = 1;
/// The header is unusable; nothing written back.
pub const STATUS_BAD_LIST: u32 = 2;
/// Range `failed` is outside guest RAM; nothing written back.
pub const STATUS_BAD_RANGE: u32 = 3;

/// Size of the list header.
pub const HEADER_SIZE: u64 = core::mem::size_of::<BarrierHeader>() as u64;
/// Size of a range.
pub const RANGE_SIZE: u64 = core::mem::size_of::<FlushedRange>() as u64;
/// Where the machine writes a list's [`crate::engine::Completion`] (`status`, `failed`),
/// from the header's start.
pub const COMPLETION_OFFSET: u64 = core::mem::offset_of!(BarrierHeader, status) as u64;

const _: () = assert!(HEADER_SIZE == 16 && RANGE_SIZE == 16 && COMPLETION_OFFSET == 8);
const _: () = assert!(core::mem::offset_of!(BarrierHeader, failed) as u64 == COMPLETION_OFFSET + 4);

/// The list header, as laid out in guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct BarrierHeader {
    pub magic: u32,
    pub count: u32,
    pub status: u32,
    pub failed: u32,
}

/// A whole barrier list as the guest keeps it: the header and room for [`MAX_RANGES`]
/// ranges, of which `header.count` are meaningful. Aligned to a cache line, so that the
/// machine's read of it touches as few lines as possible.
#[derive(Debug, Clone, Copy, FromBytes, KnownLayout, Immutable)]
#[repr(C, align(64))]
pub struct BarrierList {
    pub header: BarrierHeader,
    pub ranges: [FlushedRange; MAX_RANGES as usize],
}

impl BarrierList {
    /// An empty list, ready to fill (usable in a `static`).
    pub const fn new() -> Self {
        Self {
            header: BarrierHeader { magic: BARRIER_MAGIC, count: 0, status: STATUS_PENDING, failed: 0 },
            ranges: [FlushedRange { addr: 0, len: 0 }; MAX_RANGES as usize],
        }
    }
}

impl Default for BarrierList {
    fn default() -> Self {
        Self::new()
    }
}

/// Guest-physical bytes the guest wrote back: `addr..addr + len`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct FlushedRange {
    pub addr: u64,
    pub len: u64,
}

impl FlushedRange {
    /// Whether the range lies inside guest RAM `0..ram` (an empty range anywhere in it too).
    pub fn inside(&self, ram: u64) -> bool {
        self.addr.checked_add(self.len).is_some_and(|end| end <= ram)
    }

    /// Extends this range to cover `other` if the two touch or overlap.
    pub fn merge(&mut self, other: FlushedRange) -> bool {
        let (end, other_end) = (self.addr.saturating_add(self.len), other.addr.saturating_add(other.len));
        if other.addr > end || self.addr > other_end {
            return false;
        }
        let start = self.addr.min(other.addr);
        self.len = end.max(other_end) - start;
        self.addr = start;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_bounded_and_merge_when_they_touch() {
        assert!(FlushedRange { addr: 0, len: 4096 }.inside(4096));
        assert!(!FlushedRange { addr: 1, len: 4096 }.inside(4096));
        assert!(!FlushedRange { addr: u64::MAX, len: 2 }.inside(u64::MAX));
        let mut r = FlushedRange { addr: 64, len: 64 };
        assert!(r.merge(FlushedRange { addr: 128, len: 64 }), "adjacent");
        assert_eq!(r, FlushedRange { addr: 64, len: 128 });
        assert!(r.merge(FlushedRange { addr: 0, len: 100 }), "overlapping, before");
        assert_eq!(r, FlushedRange { addr: 0, len: 192 });
        assert!(!r.merge(FlushedRange { addr: 256, len: 64 }), "apart");
        assert_eq!(core::mem::size_of::<BarrierHeader>() as u64, HEADER_SIZE);
        assert_eq!(core::mem::size_of::<FlushedRange>() as u64, RANGE_SIZE);
    }
}
