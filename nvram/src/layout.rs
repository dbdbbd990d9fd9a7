//! Guest-physical layout of the NVM image.
//!
//! Guest RAM *is* the image file: guest-physical address `a` is byte `a` of the file.
//! The VMM (and QEMU) rewrite the low boot area and the kernel image at every boot, so
//! nothing lasting may live there; everything that must outlive a boot starts at
//! [`ROOT_HEADER`].
//!
//! ```text
//!   0x0000_0000 +--------------------------------+
//!               | boot area, rewritten each boot |  PVH start_info, memory map, command line
//!   0x0010_0000 +--------------------------------+
//!               | kernel image (ELF segments),   |  loaded at every boot; its .data/.bss,
//!               | scratch for one boot           |  stack and boot page tables are scratch
//!   0x0080_0000 +--------------------------------+
//!               | root header, two copies        |  magic, version, shutdown flag, roots
//!   0x0080_1000 +--------------------------------+
//!               | resource tables                |  Tender's management tables
//!   0x0088_0000 +--------------------------------+
//!               | frame bitmap                   |  real memory: one bit per frame
//!   0x008a_0000 +--------------------------------+
//!               | (free)                         |
//!   0x00a0_0000 +--------------------------------+
//!               | plate table: live copy         |  the plate function's working list
//!   0x00a4_0000 | plate table: slot 0            |  the commit record, double-buffered:
//!   0x00a8_0000 | plate table: slot 1            |  the valid slot with the highest generation
//!   0x00ac_0000 | save areas A, B of the resource|  fixed save areas of the tables
//!               | tables and of the frame bitmap |
//!   0x00b4_0000 | plate bitmaps: stale, dirty    |  per frame
//!   0x0100_0000 +--------------------------------+
//!               | frames                         |  page tables, regions, save areas
//!               |            ...                 |
//!  size - 1 MiB +--------------------------------+
//!               | unused: firmware's (QEMU's     |  `TOP_RESERVE`, so that the layout is
//!               | SeaBIOS keeps tables here)     |  the same under QEMU and our VMM
//!     mem size  +--------------------------------+
//! ```

/// Size of a page and of the smallest unit of guest RAM.
pub const PAGE_SIZE: u64 = 4096;

/// Where the VMM writes the PVH `hvm_start_info`.
pub const START_INFO: u64 = 0x6000;
/// Where the VMM writes the PVH memory map (`hvm_memmap_table_entry` array).
pub const MEMMAP: u64 = 0x7000;
/// Most memory-map entries the VMM writes.
pub const MEMMAP_MAX_ENTRIES: u64 = 16;
/// Where the VMM writes the kernel command line (NUL-terminated).
pub const CMDLINE: u64 = 0x2_0000;
/// Longest command line accepted, terminating NUL included.
pub const CMDLINE_MAX: u64 = 4096;

/// End of the legacy low-memory RAM (the VGA/BIOS hole follows, as on a PC).
pub const LOW_RAM_END: u64 = 0xa_0000;
/// Where the kernel image is linked and loaded (1 MiB, the PVH convention).
pub const KERNEL_START: u64 = 0x10_0000;
/// The kernel image, its stack and its boot page tables end below this address.
pub const KERNEL_LIMIT: u64 = 0x80_0000;

/// Physical address of the root header: the first byte that outlives a boot.
pub const ROOT_HEADER: u64 = KERNEL_LIMIT;
/// Physical address of the root header's second copy, in the same page. A header update
/// writes this copy and makes it durable before it writes the first: at every instant one
/// of the two is whole (`nvram::header::choose`).
pub const ROOT_HEADER_COPY: u64 = ROOT_HEADER + PAGE_SIZE / 2;
/// First byte of the persistent area managed by the guest kernel.
pub const PERSISTENT_BASE: u64 = ROOT_HEADER + PAGE_SIZE;

/// Where the resource tables live.
pub const RESOURCES: u64 = PERSISTENT_BASE;
/// Room for the resource tables.
pub const RESOURCES_MAX: u64 = FRAME_BITMAP - RESOURCES;
/// Where the frame bitmap lives.
pub const FRAME_BITMAP: u64 = 0x88_0000;
/// Room for the frame bitmap: one bit per frame of up to 4 GiB.
pub const FRAME_BITMAP_MAX: u64 = 0x2_0000;
/// Area reserved for the plate function's fixed structures.
pub const TABLE_SAVE_AREAS: u64 = 0xa0_0000;
/// The live plate table (the working list the next write-out commits).
pub const PLATE_LIVE: u64 = 0xa0_0000;
/// The two commit slots of the plate table.
pub const PLATE_SLOTS: [u64; 2] = [0xa4_0000, 0xa8_0000];
/// Room for one plate table.
pub const PLATE_TABLE_MAX: u64 = 0x4_0000;
/// Room for one copy of the resource tables (their size is checked by kernel-core).
pub const RESOURCES_SAVE_MAX: u64 = 0x2_0000;
/// Save areas A and B of the resource tables.
pub const RESOURCES_SAVE: [u64; 2] = [0xac_0000, 0xae_0000];
/// Save areas A and B of the frame bitmap.
pub const FRAME_BITMAP_SAVE: [u64; 2] = [0xb0_0000, 0xb2_0000];
/// Which pages each plate's inactive save area lacks: one bit per frame, then one per page
/// of the fixed plates. Lasting: it stays right across a graceful shutdown.
pub const PLATE_STALE: u64 = 0xb4_0000;
/// Pages found dirty by the current write-out: one bit per frame (scratch).
pub const PLATE_DIRTY: u64 = 0xb6_0000;
/// Room for each of the two bitmaps above.
pub const PLATE_BITMAP_MAX: u64 = 0x2_0000;
/// First frame handed out by the frame allocator.
pub const FRAMES_BASE: u64 = 0x100_0000;

const _: () = assert!(PLATE_DIRTY + PLATE_BITMAP_MAX <= FRAMES_BASE);

/// The top of the image that no layout uses: firmware may keep its tables there. QEMU's
/// SeaBIOS takes up to 256 KiB below the end of RAM for its own tables and reports them as
/// reserved in the memory map it hands a PVH kernel (0x21000 bytes for 256 MiB, measured),
/// which our VMM does not; so that an image moves between the two, its layout leaves this
/// much out on both.
pub const TOP_RESERVE: u64 = 1 << 20;

/// The unit in which RAM sizes are taken: a memory map whose usable RAM ends a little below
/// a whole MiB (firmware took the rest) stands for the image of that whole MiB.
pub const RAM_GRANULE: u64 = 1 << 20;

/// How many frames the layout of an image has, given where its usable RAM ends (the end of
/// the highest RAM region of the memory map): the same for our VMM, which reports all of
/// the image as RAM, and for QEMU with SeaBIOS, which reports less. The end is rounded up
/// to [`RAM_GRANULE`] (the image's size) and [`TOP_RESERVE`] is left out, so the frames
/// never reach memory firmware may take; they always end below `ram_end` (the rounding adds
/// less than the reserve takes). Firmware that
/// took more than the reserve gives another layout, which the root header's check refuses.
/// `None` if the image (the rounded size) is smaller than [`MIN_RAM`].
pub const fn frames_for(ram_end: u64) -> Option<u64> {
    let image = ram_end.div_ceil(RAM_GRANULE) * RAM_GRANULE;
    if image < MIN_RAM {
        return None;
    }
    Some((image - TOP_RESERVE - FRAMES_BASE) / PAGE_SIZE)
}

/// Smallest RAM our kernel accepts: the fixed areas above plus room to work.
pub const MIN_RAM: u64 = 32 << 20;
/// Largest RAM: guest RAM is one slot below the 32-bit MMIO hole (LAPIC, IOAPIC, TSS).
pub const MAX_RAM: u64 = 3 << 30;
/// Default size of a new image.
pub const DEFAULT_RAM: u64 = 256 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_is_the_same_whatever_firmware_takes_off_the_top() {
        // Our VMM reports all of 256 MiB as RAM; QEMU's q35 with SeaBIOS ends RAM at 0xffdf000.
        let ours = frames_for(256 << 20).unwrap();
        assert_eq!(frames_for(0xffd_f000), Some(ours));
        assert_eq!(frames_for((256 << 20) - (256 << 10)), Some(ours));
        assert_eq!(ours, ((255 << 20) - FRAMES_BASE) / PAGE_SIZE);
        // The smallest image too: SeaBIOS's RAM ends below MIN_RAM, the image does not.
        let smallest = Some((MIN_RAM - TOP_RESERVE - FRAMES_BASE) / PAGE_SIZE);
        assert_eq!(frames_for(MIN_RAM), smallest);
        assert_eq!(frames_for(MIN_RAM - 0x2_1000), smallest);
    }

    #[test]
    fn too_little_ram_has_no_layout() {
        assert_eq!(frames_for(MIN_RAM - RAM_GRANULE), None);
        assert_eq!(frames_for(0), None);
    }

    #[test]
    fn ram_that_ends_just_past_a_mib_still_covers_its_frames() {
        // A size that is not a whole MiB: rounded up, then the reserve left out; the frames
        // end below the usable RAM.
        let end = (64 << 20) + PAGE_SIZE;
        let frames = frames_for(end).unwrap();
        assert!(FRAMES_BASE + frames * PAGE_SIZE <= end);
    }
}
