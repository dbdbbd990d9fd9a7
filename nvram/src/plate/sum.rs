//! The content checksum of a save area (its `sum` in the plate entry, checked at restore):
//! the wrapping sum of its pages' hashes, each page's CRC-32C with its index in its plate
//! mixed in. The copiers compute it page by page as they move each page ([`AreaSum`]);
//! `docs/image-format.md` gives the definition to recompute it elsewhere.

/// Bytes of a page.
const PAGE_BYTES: usize = crate::layout::PAGE_SIZE as usize;

/// The hash of one page (or of the short last part of a run): the page's CRC-32C, with its
/// index in its plate folded in by a mixing bijection (so that two pages swapped do not go
/// unnoticed, which a sum of CRCs plus a linear term of the index would miss).
///
/// Why a CRC, and this one: any change of a page confined to 32 bits in a row, or to three
/// bits anywhere in it, changes its CRC-32C, and the mix and [`area_sum`]'s sum keep every
/// such change of one page visible (any other change of a page goes unseen with a chance
/// of 2^-32: Btrfs checks its 4 KiB data blocks with the same CRC). And both copiers have
/// it in hardware: the copy engine, which hashes every page it copies on the host, folds 64
/// bytes in three carry-less multiplies in vector lanes (`crc-fast`, with the `std`
/// feature), against six to seven operations for the multiply-rotate `checksum64` that this
/// hash replaced (which made the sums a sixth of a write-out); the guest's copier, which
/// has no vector registers, uses the `crc32` instruction (SSE4.2), 8 bytes an instruction.
pub fn page_hash(index: u64, page: &[u8]) -> u64 {
    mix64(u64::from(crc32c(page)) ^ mix64(index ^ PAGE_HASH_KEY))
}

/// What keeps index 0 from mixing to 0.
const PAGE_HASH_KEY: u64 = 0x9e37_79b9_7f4a_7c15;

/// MurmurHash3's 64-bit finaliser: a bijection in which every input bit moves about half of
/// the output's.
const fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// CRC-32C (Castagnoli, as iSCSI and Btrfs use it: polynomial `0x1edc6f41`, reflected, all
/// ones in and out) of `bytes`.
#[cfg(feature = "std")]
pub fn crc32c(bytes: &[u8]) -> u32 {
    // A CRC-32 in a u64: the high half is zero.
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

/// CRC-32C (Castagnoli, as iSCSI and Btrfs use it: polynomial `0x1edc6f41`, reflected, all
/// ones in and out) of `bytes`: by the `crc32` instruction where the CPU has it.
#[cfg(not(feature = "std"))]
pub fn crc32c(bytes: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if has_crc32_instruction() {
        // SAFETY: the CPU has SSE4.2 (just checked).
        return unsafe { crc32c_by_instruction(bytes) };
    }
    CRC32C_TABLE.checksum(bytes)
}

/// Sixteen bytes a step (16 KiB of tables), for a CPU without SSE4.2.
#[cfg(any(test, not(feature = "std")))]
const CRC32C_TABLE: crc::Crc<u32, crc::Table<16>> = crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

/// Whether the CPU has SSE4.2's `crc32` (CPUID leaf 1, ECX bit 20), asked once: under PVM
/// each CPUID is an exit to the hypervisor.
#[cfg(all(target_arch = "x86_64", any(test, not(feature = "std"))))]
fn has_crc32_instruction() -> bool {
    use core::sync::atomic::{AtomicU8, Ordering};
    static KNOWN: AtomicU8 = AtomicU8::new(0);
    match KNOWN.load(Ordering::Relaxed) {
        0 => {
            let has = core::arch::x86_64::__cpuid(1).ecx & (1 << 20) != 0;
            KNOWN.store(if has { 1 } else { 2 }, Ordering::Relaxed);
            has
        }
        known => known == 1,
    }
}

/// CRC-32C by the `crc32` instruction: eight bytes an instruction, in general registers
/// (the guest kernel has no vector registers to save).
///
/// # Safety
///
/// The CPU has SSE4.2.
#[cfg(all(target_arch = "x86_64", any(test, not(feature = "std"))))]
unsafe fn crc32c_by_instruction(bytes: &[u8]) -> u32 {
    let (words, tail) = bytes.as_chunks::<8>();
    let mut crc: u64 = 0xffff_ffff;
    for word in words {
        // SAFETY: the caller promises SSE4.2; the instruction only reads and writes the two
        // registers.
        unsafe {
            core::arch::asm!("crc32 {crc}, {word}", crc = inout(reg) crc, word = in(reg) u64::from_le_bytes(*word),
                options(pure, nomem, nostack, preserves_flags))
        };
    }
    // The 64-bit form leaves the CRC in the low half.
    let mut crc = crc as u32;
    for &byte in tail {
        // SAFETY: as above.
        unsafe {
            core::arch::asm!("crc32 {crc:e}, {byte}", crc = inout(reg) crc, byte = in(reg_byte) byte,
                options(pure, nomem, nostack, preserves_flags))
        };
    }
    !crc
}

/// The content checksum of a save area (or of a run of a plate's pages from page `first`):
/// the wrapping sum of [`page_hash`] over its pages. A sum, so that a write-out that copies
/// some pages updates it from those pages alone: the sum less the old pages' hashes plus the
/// new ones'. Any change of one page changes it.
pub fn area_sum(bytes: &[u8], first: u64) -> u64 {
    let mut sum = AreaSum::new(first);
    bytes.chunks(PAGE_BYTES).for_each(|page| sum.page(page));
    sum.sum()
}

/// [`area_sum`] page by page, for a copier that hashes each page as it moves it (the copy
/// engine, the guest's CPU copier): the same function, so that what a copier returns is
/// what a restore and `vmm inspect --check` recompute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AreaSum {
    next: u64,
    sum: u64,
}

impl AreaSum {
    /// The sum of no page yet, of a run whose first page is page `first` of its plate.
    pub fn new(first: u64) -> Self {
        Self { next: first, sum: 0 }
    }

    /// Adds the next page (a whole page but, possibly, for the last one of a run).
    pub fn page(&mut self, page: &[u8]) {
        self.add_hash(page_hash(self.next, page));
    }

    /// The index in its plate of the next page, which [`page_hash`] folds in.
    pub fn next_index(&self) -> u64 {
        self.next
    }

    /// Adds the next page by its [`page_hash`] (with [`AreaSum::next_index`]), computed
    /// elsewhere: by a copier that hashes many pages at once, or that knows the hash of
    /// what it wrote there last.
    pub fn add_hash(&mut self, hash: u64) {
        self.sum = self.sum.wrapping_add(hash);
        // The first index comes from the guest (a copy's sum request): any value, so the
        // count wraps rather than overflows, the same on both sides.
        self.next = self.next.wrapping_add(1);
    }

    /// [`area_sum`] of the pages added.
    pub fn sum(&self) -> u64 {
        self.sum
    }
}

#[cfg(test)]
#[path = "sum_tests.rs"]
mod tests;
