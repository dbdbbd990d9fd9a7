//! The plate store on the virtio disk (`plate_store=disk`, the paper's volatile plate
//! function): where a disk keeps the plate table's two commit slots and the plates' save
//! areas, so that a machine whose RAM forgets everything at exit restores its last commit.
//!
//! The layout is fixed (it does not depend on the disk's size, only the area space's length
//! does), so that the guest finds every part from constants, as it finds the NVM image's
//! fixed areas (`crate::layout`), and the superblock only confirms it:
//!
//! ```text
//!   0x0000_0000  superblock (one page; its first sector is meaningful)
//!   0x0000_1000  plate table: commit slot 0  (the `PlateTable` record, SLOT_BYTES of room)
//!   0x0001_a000  plate table: commit slot 1
//!   0x0003_3000  save areas A, B of the resource tables   (fixed: the roots of a restore)
//!   0x0007_3000  save areas A, B of the frame bitmap
//!   0x000b_3000  area space: every other plate's save areas, allocated page by page
//!   disk end     (or AREA_START + MAX_AREA_PAGES pages: a larger disk's rest is unused)
//! ```
//!
//! Why a superblock at all, when the layout is constant: a disk that holds something else
//! (another file system, a disk of another version) must be refused, not overwritten by a
//! plate-ification; and a blank disk (all zeros there) is told from both. The superblock is
//! written once, when a blank disk is formatted; the commits write only the slots and the
//! areas. The live plate table, the stale and dirty bitmaps stay in RAM (`crate::layout`):
//! they are rebuilt at every boot from the committed slot, as is the allocation of the area
//! space (every plate's two areas and the pending list's are taken, the rest is free).
//!
//! Superblock (little endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `TNDRDSK1` |
//! | 8 | 4 | version ([`VERSION`]) |
//! | 12 | 4 | page size (4096) |
//! | 16 | 8 | disk bytes when formatted |
//! | 24 | 16 | the two slots' offsets |
//! | 40 | 8 | room of a slot |
//! | 48 | 16 | save areas A, B of the resource tables |
//! | 64 | 16 | save areas A, B of the frame bitmap |
//! | 80 | 8 | area space's first byte |
//! | 88 | 8 | area space's pages |
//! | 96 | 8 | checksum: `checksum64` of the twelve words before it |

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::layout::{self, PAGE_SIZE};
use crate::plate::{checksum64, TABLE_SIZE};

/// Magic of a plate-store disk.
pub const MAGIC: u64 = u64::from_le_bytes(*b"TNDRDSK1");
/// Version of the disk layout.
pub const VERSION: u32 = 2;
/// The disk's sector: the unit of every request.
pub const SECTOR: u64 = 512;
/// Room for one commit slot: a plate table, rounded up to pages.
pub const SLOT_BYTES: u64 = (TABLE_SIZE as u64).div_ceil(PAGE_SIZE) * PAGE_SIZE;
/// Where the two commit slots are.
pub const SLOTS: [u64; 2] = [PAGE_SIZE, PAGE_SIZE + SLOT_BYTES];
/// Save areas A and B of the resource tables (their room is the NVM layout's).
pub const RESOURCES_SAVE: [u64; 2] = [SLOTS[1] + SLOT_BYTES, SLOTS[1] + SLOT_BYTES + layout::RESOURCES_SAVE_MAX];
/// Save areas A and B of the frame bitmap.
pub const FRAME_BITMAP_SAVE: [u64; 2] =
    [RESOURCES_SAVE[1] + layout::RESOURCES_SAVE_MAX, RESOURCES_SAVE[1] + 2 * layout::RESOURCES_SAVE_MAX];
/// First byte of the area space.
pub const AREA_START: u64 = FRAME_BITMAP_SAVE[1] + layout::RESOURCES_SAVE_MAX;
/// Most pages of the area space (1 GiB): the guest keeps its allocation bitmap in a static
/// of this many bits, and a check marks regions and areas in one scratch bitmap (RAM's
/// frames, then the area pages), which `crate::layout::PLATE_BITMAP_MAX` bounds.
pub const MAX_AREA_PAGES: u64 = 1 << 18;
/// Smallest disk formatted: the fixed part and 64 KiB of area space. Whether the plates'
/// areas fit is known only at plate-ification; a disk too small then says so.
pub const MIN_DISK: u64 = AREA_START + 16 * PAGE_SIZE;

const _: () = assert!(SLOT_BYTES >= TABLE_SIZE as u64 && SLOT_BYTES.is_multiple_of(SECTOR));
const _: () = assert!(layout::FRAME_BITMAP_MAX <= layout::RESOURCES_SAVE_MAX);
const _: () = assert!(AREA_START == 0xb_3000);
// The check's scratch: RAM's frames (3 GiB at most) and the area pages, in the dirty bitmap.
const _: () = assert!((layout::MAX_RAM / PAGE_SIZE + MAX_AREA_PAGES) / 8 <= layout::PLATE_BITMAP_MAX);

/// The superblock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Superblock {
    pub magic: u64,
    pub version: u32,
    pub page_size: u32,
    pub disk_bytes: u64,
    pub slots: [u64; 2],
    pub slot_bytes: u64,
    pub resources_save: [u64; 2],
    pub bitmap_save: [u64; 2],
    pub area_start: u64,
    pub area_pages: u64,
    pub checksum: u64,
}

/// Bytes of the superblock record.
pub const SUPERBLOCK_SIZE: usize = core::mem::size_of::<Superblock>();
const _: () = assert!(SUPERBLOCK_SIZE == 104 && SUPERBLOCK_SIZE as u64 <= SECTOR);

/// Why a disk cannot hold (or does not hold) a plate store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    #[error("a disk of {bytes} bytes is too small for the plate store: it needs at least {MIN_DISK} bytes")]
    TooSmall { bytes: u64 },
    #[error("the disk holds something else (magic {magic:#018x}, not a plate store's): refused, not overwritten")]
    Foreign { magic: u64 },
    #[error("the disk's plate store has version {found}, this kernel keeps version {VERSION}")]
    Version { found: u32 },
    #[error("the disk's superblock fails its checksum")]
    Checksum,
    #[error("the disk's superblock describes another layout than this kernel's for {bytes} bytes")]
    Layout { bytes: u64 },
    #[error("the disk's superblock was written for {recorded} bytes, but the disk has {capacity}")]
    Shrunk { recorded: u64, capacity: u64 },
}

impl Superblock {
    /// The superblock of a disk of `disk_bytes` bytes.
    pub fn new(disk_bytes: u64) -> Result<Self, DiskError> {
        if disk_bytes < MIN_DISK {
            return Err(DiskError::TooSmall { bytes: disk_bytes });
        }
        let mut sb = Self {
            magic: MAGIC,
            version: VERSION,
            page_size: PAGE_SIZE as u32,
            disk_bytes,
            slots: SLOTS,
            slot_bytes: SLOT_BYTES,
            resources_save: RESOURCES_SAVE,
            bitmap_save: FRAME_BITMAP_SAVE,
            area_start: AREA_START,
            area_pages: ((disk_bytes - AREA_START) / PAGE_SIZE).min(MAX_AREA_PAGES),
            checksum: 0,
        };
        sb.checksum = sb.compute_checksum();
        Ok(sb)
    }

    fn compute_checksum(&self) -> u64 {
        let words: &[u64; SUPERBLOCK_SIZE / 8] = zerocopy::transmute_ref!(self);
        checksum64(words[..SUPERBLOCK_SIZE / 8 - 1].iter().copied())
    }

    /// Checks a superblock read from a disk of `capacity` bytes.
    pub fn check(&self, capacity: u64) -> Result<(), DiskError> {
        if self.magic != MAGIC {
            return Err(DiskError::Foreign { magic: self.magic });
        }
        if self.version != VERSION {
            return Err(DiskError::Version { found: self.version });
        }
        if self.compute_checksum() != self.checksum {
            return Err(DiskError::Checksum);
        }
        if Self::new(self.disk_bytes).ok() != Some(*self) {
            return Err(DiskError::Layout { bytes: self.disk_bytes });
        }
        if self.disk_bytes > capacity {
            return Err(DiskError::Shrunk { recorded: self.disk_bytes, capacity });
        }
        Ok(())
    }

    /// Whether `sector` starts with a superblock of this layout (whatever the disk's size).
    pub fn read_from_prefix_checked(sector: &[u8]) -> bool {
        Self::read_from_prefix(sector).is_ok_and(|(sb, _)| sb.check(sb.disk_bytes).is_ok())
    }

    /// One past the last byte of the area space.
    pub fn area_end(&self) -> u64 {
        self.area_start + self.area_pages * PAGE_SIZE
    }

    /// The fixed save areas of fixed plate `id` (`crate::plate::FIXED_RESOURCES` or
    /// `FIXED_FRAME_BITMAP`).
    pub fn fixed_areas(&self, id: u32) -> Option<[u64; 2]> {
        match id {
            crate::plate::FIXED_RESOURCES => Some(self.resources_save),
            crate::plate::FIXED_FRAME_BITMAP => Some(self.bitmap_save),
            _ => None,
        }
    }
}

/// What the first sector of a disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// All zeros: never formatted (a new disk file is sparse zeros).
    Blank,
    /// A plate store of this layout.
    Store(Superblock),
}

/// Decodes the first sector of a disk of `capacity` bytes (`sector`: at least
/// [`SUPERBLOCK_SIZE`] bytes; what follows the record up to the sector's end must be zero
/// too for a blank disk).
pub fn read_superblock(sector: &[u8], capacity: u64) -> Result<Found, DiskError> {
    let Ok((sb, _)) = Superblock::read_from_prefix(sector) else { return Err(DiskError::Foreign { magic: 0 }) };
    if sector.iter().all(|&b| b == 0) {
        return Ok(Found::Blank);
    }
    sb.check(capacity).map(|()| Found::Store(sb))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_superblock_round_trips_and_checks_out() {
        let sb = Superblock::new(64 << 20).unwrap();
        assert_eq!(sb.area_pages, ((64 << 20) - AREA_START) / PAGE_SIZE);
        let mut sector = [0u8; SECTOR as usize];
        sector[..SUPERBLOCK_SIZE].copy_from_slice(sb.as_bytes());
        assert_eq!(read_superblock(&sector, 64 << 20), Ok(Found::Store(sb)));
        // A larger disk than when formatted is fine; a smaller one is not.
        assert_eq!(read_superblock(&sector, 128 << 20), Ok(Found::Store(sb)));
        assert!(matches!(read_superblock(&sector, 32 << 20), Err(DiskError::Shrunk { .. })));
    }

    #[test]
    fn blank_foreign_and_damaged_disks_are_told_apart() {
        let sector = [0u8; SECTOR as usize];
        assert_eq!(read_superblock(&sector, 8 << 20), Ok(Found::Blank));
        let mut foreign = [0u8; SECTOR as usize];
        foreign[..4].copy_from_slice(b"\x7fELF");
        assert!(matches!(read_superblock(&foreign, 8 << 20), Err(DiskError::Foreign { .. })));
        let sb = Superblock::new(8 << 20).unwrap();
        let mut bad = [0u8; SECTOR as usize];
        bad[..SUPERBLOCK_SIZE].copy_from_slice(sb.as_bytes());
        bad[88] ^= 1;
        assert_eq!(read_superblock(&bad, 8 << 20), Err(DiskError::Checksum));
        let mut other = sb;
        other.version = 9;
        bad[..SUPERBLOCK_SIZE].copy_from_slice(other.as_bytes());
        assert_eq!(read_superblock(&bad, 8 << 20), Err(DiskError::Version { found: 9 }));
        let mut moved = sb;
        moved.area_start += PAGE_SIZE;
        moved.checksum = moved.compute_checksum();
        bad[..SUPERBLOCK_SIZE].copy_from_slice(moved.as_bytes());
        assert!(matches!(read_superblock(&bad, 8 << 20), Err(DiskError::Layout { .. })));
        // Too short to decode at all.
        assert!(read_superblock(&[0u8; 8], 8 << 20).is_err());
    }

    #[test]
    fn a_disk_too_small_for_the_fixed_part_is_refused() {
        assert_eq!(Superblock::new(MIN_DISK - 1), Err(DiskError::TooSmall { bytes: MIN_DISK - 1 }));
        assert!(Superblock::new(MIN_DISK).is_ok());
        // A huge disk's area space is capped.
        assert_eq!(Superblock::new(1 << 40).unwrap().area_pages, MAX_AREA_PAGES);
    }
}
