//! The copy engine: a paravirtual device that copies guest memory at the host's memory
//! speed and makes the copies durable, as a DMA engine with durable writes to persistent
//! memory would (Intel's Data Streaming Accelerator does). The guest kernel keeps every
//! decision of the plate function (what to copy, where, the commit); the engine only
//! moves bytes.
//!
//! Ports at [`BASE`]:
//!
//! | offset | access    | meaning                                                          |
//! |--------|-----------|------------------------------------------------------------------|
//! | 0      | read u32  | [`ENGINE_ID`]: present (other machines read all ones)            |
//! | 0      | write u32 | doorbell: guest-physical address of a batch, 8-byte aligned      |
//! | 4      | write u32 | dirty-log request: guest-physical address of a [`DirtyRequest`]  |
//!
//! The doorbell is synchronous: when the guest's port write returns, the batch is done and
//! its `status` written. The engine checks the whole batch before it copies anything, so a
//! batch is applied entirely or not at all (barring a crash of the host in the middle):
//!
//! | check | status |
//! |---|---|
//! | the batch header and its descriptor array lie in guest RAM, 8-byte aligned | [`STATUS_BAD_BATCH`] |
//! | `count` ≤ [`MAX_DESCRIPTORS`], no unknown flag | [`STATUS_BAD_BATCH`] |
//! | each descriptor: `0 < len ≤` [`MAX_LEN`], source and destination inside guest RAM, not overlapping | [`STATUS_BAD_DESCRIPTOR`], `failed` = its index |
//!
//! Batch header layout (little endian, 40 bytes): `magic` u32 ([`BATCH_MAGIC`]), `count` u32,
//! `status` u32, `failed` u32, `flags` u64 ([`FLAG_DURABLE`]: make every destination durable
//! before completing), `descriptors` u64: the guest-physical address of an array of `count`
//! descriptors of 24 bytes: `dst` u64, `src` u64, `len` u64; `sums` u64: 0, or the
//! guest-physical address of an array of `count` [`RangeSum`]s of 32 bytes, one per
//! descriptor, in which the engine returns the content checksums of the copies.
//!
//! The array is separate from the header so that a kernel hands over the list of copies it
//! has already built, as it is: under PVM each instruction of the guest kernel is emulated,
//! and rewriting hundreds of descriptors into another format costs more than the copies.
//!
//! Sums: a save area's content checksum (`crate::plate::area_sum`) follows every copy into
//! it, and the engine, which reads and writes each byte of a copy anyway, computes it as it
//! copies (page by page through a buffer that stays in the host's cache), so the guest reads
//! nothing twice. For descriptor `i`, `sums[i].written` is `area_sum` of the bytes it wrote,
//! with `sums[i].first` as the index of its first page; with [`SUM_OVERWRITTEN`] in
//! `sums[i].flags`, `sums[i].overwritten` is that of the bytes the copy overwrote, read
//! just before. A batch refused writes no sum. The sums array is checked with the batch
//! (inside guest RAM, 8-byte aligned: else [`STATUS_BAD_BATCH`]; an unknown flag:
//! [`STATUS_BAD_DESCRIPTOR`]); the engine writes it after the copies.
//!
//! Sums alone ([`FLAG_SUM_ONLY`]): the engine copies nothing and writes nothing but the sums:
//! `sums[i].written` is `area_sum` of descriptor `i`'s source bytes (its `dst` is ignored,
//! and only its source is checked against RAM). A restore checks the save areas it is about
//! to trust this way, without reading them in the guest or copying them anywhere. A batch
//! with this flag and no sums array, or a sum asking for [`SUM_OVERWRITTEN`], is refused.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Version of this interface.
/// 3: the batch header's `sums` (content checksums computed while copying).
/// 4: [`FLAG_SUM_ONLY`]; a page's hash is its CRC-32C (`crate::plate::page_hash`).
pub const ABI_VERSION: u32 = 4;
/// What offset 0 reads as: "NVCE" with the version in the low byte.
pub const ENGINE_ID: u32 = 0x4e56_4300 | ABI_VERSION;
/// First port.
pub const BASE: u16 = 0x520;
/// Number of ports.
pub const LEN: u16 = 8;
/// Offset of the dirty-log doorbell.
pub const REG_DIRTY: u16 = 4;
/// Magic of a dirty-log request.
pub const DIRTY_MAGIC: u32 = 0x5954_5244; // "DRTY"

/// A dirty-log request: the engine writes at `out` a bitmap of the pages
/// `first_page..first_page + pages` that the guest's CPU wrote since the previous request
/// (since the VMM started, for the first one), bit `i` for page `first_page + i`. As the
/// engine's copies, the request is checked whole (`out` and the pages inside guest RAM)
/// before anything is written; `status` reads [`STATUS_DONE`] or [`STATUS_BAD_BATCH`].
///
/// The VMM's log covers its own lifetime only: a kernel must not trust it for writes made
/// before this VMM started (after a resume, say).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct DirtyRequest {
    pub magic: u32,
    pub status: u32,
    pub first_page: u64,
    pub pages: u64,
    pub out: u64,
}

/// Size of a dirty-log request.
pub const DIRTY_REQUEST_SIZE: u64 = core::mem::size_of::<DirtyRequest>() as u64;
/// Where the engine writes a dirty-log request's status, from the request's start.
pub const DIRTY_STATUS_OFFSET: u64 = core::mem::offset_of!(DirtyRequest, status) as u64;
/// Magic of a batch header.
pub const BATCH_MAGIC: u32 = 0x4843_5442; // "BTCH"
/// Most descriptors in a batch.
pub const MAX_DESCRIPTORS: u32 = 256;
/// Longest copy of one descriptor.
pub const MAX_LEN: u64 = 256 << 20;
/// Batch flag: the destinations must reach the persistence domain before completion.
pub const FLAG_DURABLE: u64 = 1;
/// Batch flag: no copy, only the sums of the sources (see the module docs).
pub const FLAG_SUM_ONLY: u64 = 2;

/// Status: written by the guest before ringing; never left by the engine.
pub const STATUS_PENDING: u32 = 0;
/// Every copy done (and durable where asked).
pub const STATUS_DONE: u32 = 1;
/// The batch header is unusable; nothing copied.
pub const STATUS_BAD_BATCH: u32 = 2;
/// Descriptor `failed` is invalid; nothing copied.
pub const STATUS_BAD_DESCRIPTOR: u32 = 3;
/// The engine cannot do what was asked (no dirty log on this host).
pub const STATUS_UNSUPPORTED: u32 = 4;

/// Size of the batch header.
pub const HEADER_SIZE: u64 = core::mem::size_of::<BatchHeader>() as u64;
/// Size of a descriptor.
pub const DESCRIPTOR_SIZE: u64 = core::mem::size_of::<Descriptor>() as u64;
/// Where the engine writes a batch's [`Completion`], from the header's start.
pub const COMPLETION_OFFSET: u64 = core::mem::offset_of!(BatchHeader, status) as u64;

const _: () = assert!(DIRTY_REQUEST_SIZE == 32 && DIRTY_STATUS_OFFSET == 4);
/// Size of a [`RangeSum`].
pub const RANGE_SUM_SIZE: u64 = core::mem::size_of::<RangeSum>() as u64;
/// [`RangeSum::flags`]: also return the sum of what the copy overwrote.
pub const SUM_OVERWRITTEN: u64 = 1;

const _: () = assert!(HEADER_SIZE == 40 && DESCRIPTOR_SIZE == 24 && COMPLETION_OFFSET == 8 && RANGE_SUM_SIZE == 32);
const _: () = assert!(core::mem::offset_of!(BatchHeader, failed) as u64 == COMPLETION_OFFSET + 4);

/// What the engine writes back into a batch header (`status`, `failed`), as one store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Completion {
    pub status: u32,
    pub failed: u32,
}

/// The batch header, as laid out in guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct BatchHeader {
    pub magic: u32,
    pub count: u32,
    pub status: u32,
    pub failed: u32,
    pub flags: u64,
    pub descriptors: u64,
    /// 0, or the guest-physical address of `count` [`RangeSum`]s (see the module docs).
    pub sums: u64,
}

impl BatchHeader {
    /// A batch to ring: `count` descriptors at `descriptors`, durable, with their sums at
    /// `sums` (0: none asked for), its status pending.
    pub const fn durable(count: u32, descriptors: u64, sums: u64) -> Self {
        Self { magic: BATCH_MAGIC, count, status: STATUS_PENDING, failed: 0, flags: FLAG_DURABLE, descriptors, sums }
    }
}

/// The content checksums of one descriptor's copy, asked for (`first`, `flags`) and
/// returned (`written`, `overwritten`) in place.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RangeSum {
    /// In: the index, in its plate, of the copy's first page (`area_sum`'s `first`).
    pub first: u64,
    /// In: [`SUM_OVERWRITTEN`] or 0.
    pub flags: u64,
    /// Out: `area_sum(written bytes, first)`.
    pub written: u64,
    /// Out, with [`SUM_OVERWRITTEN`]: `area_sum(overwritten bytes, first)`.
    pub overwritten: u64,
}

impl RangeSum {
    /// A request for the sums of a copy whose first page is page `first` of its plate.
    pub fn new(first: u64, overwritten: bool) -> Self {
        Self { first, flags: if overwritten { SUM_OVERWRITTEN } else { 0 }, written: 0, overwritten: 0 }
    }

    /// Whether the sum of what the copy overwrote is asked for.
    pub fn wants_overwritten(&self) -> bool {
        self.flags & SUM_OVERWRITTEN != 0
    }
}

/// One copy: `len` bytes from `src` to `dst`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Descriptor {
    pub dst: u64,
    pub src: u64,
    pub len: u64,
}

/// Why a descriptor is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DescriptorError {
    Length,
    OutOfRam,
    Overlap,
}

impl Descriptor {
    /// Checks the source of a descriptor of a [`FLAG_SUM_ONLY`] batch against guest RAM
    /// `0..ram` (its `dst` is ignored).
    pub fn check_source(&self, ram: u64) -> Result<(), DescriptorError> {
        if self.len == 0 || self.len > MAX_LEN {
            return Err(DescriptorError::Length);
        }
        if self.src.checked_add(self.len).is_none_or(|end| end > ram) {
            return Err(DescriptorError::OutOfRam);
        }
        Ok(())
    }

    /// Checks the descriptor against guest RAM `0..ram`.
    pub fn check(&self, ram: u64) -> Result<(), DescriptorError> {
        if self.len == 0 || self.len > MAX_LEN {
            return Err(DescriptorError::Length);
        }
        let inside = |addr: u64| addr.checked_add(self.len).is_some_and(|end| end <= ram);
        if !inside(self.src) || !inside(self.dst) {
            return Err(DescriptorError::OutOfRam);
        }
        if self.src < self.dst + self.len && self.dst < self.src + self.len {
            return Err(DescriptorError::Overlap);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sum_only_descriptor_is_checked_by_its_source() {
        let ram = 1 << 20;
        let ok = Descriptor { src: 0x1000, dst: u64::MAX, len: 0x2000 };
        assert_eq!(ok.check_source(ram), Ok(()));
        assert_eq!(Descriptor { dst: 0x1800, ..ok }.check_source(ram), Ok(()), "dst ignored");
        assert_eq!(Descriptor { len: 0, ..ok }.check_source(ram), Err(DescriptorError::Length));
        assert_eq!(Descriptor { len: MAX_LEN + 1, ..ok }.check_source(ram), Err(DescriptorError::Length));
        assert_eq!(Descriptor { src: ram - 0x1000, ..ok }.check_source(ram), Err(DescriptorError::OutOfRam));
        assert_eq!(Descriptor { src: u64::MAX - 1, ..ok }.check_source(ram), Err(DescriptorError::OutOfRam));
    }

    #[test]
    fn descriptors_are_checked() {
        let ram = 1 << 20;
        let ok = Descriptor { src: 0x1000, dst: 0x3000, len: 0x2000 };
        assert_eq!(ok.check(ram), Ok(()));
        assert_eq!(Descriptor { len: 0, ..ok }.check(ram), Err(DescriptorError::Length));
        assert_eq!(Descriptor { len: MAX_LEN + 1, ..ok }.check(ram), Err(DescriptorError::Length));
        assert_eq!(Descriptor { dst: ram - 0x1000, ..ok }.check(ram), Err(DescriptorError::OutOfRam));
        assert_eq!(Descriptor { src: u64::MAX - 10, ..ok }.check(ram), Err(DescriptorError::OutOfRam));
        assert_eq!(Descriptor { dst: 0x2000, ..ok }.check(ram), Err(DescriptorError::Overlap));
        assert_eq!(Descriptor { dst: 0x0, ..ok }.check(ram), Err(DescriptorError::Overlap));
        assert_eq!(Descriptor { dst: 0x3000, src: 0x1000, len: 0x2000 }.check(ram), Ok(()), "adjacent");
        assert_eq!(core::mem::size_of::<Descriptor>() as u64, DESCRIPTOR_SIZE);
        assert_eq!(core::mem::size_of::<BatchHeader>() as u64, HEADER_SIZE);
    }
}
