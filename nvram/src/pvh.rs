//! What the PVH boot protocol hands the kernel (Xen `include/public/arch-x86/hvm/start_info.h`):
//! `hvm_start_info` and its memory map, written by the VMM into the boot area
//! ([`crate::layout::START_INFO`], [`crate::layout::MEMMAP`]) at every boot and read by the
//! guest's entry code.
//!
//! Defined here, once, rather than taken from `linux-loader` on the host: the guest (no_std,
//! no linux-loader) reads the very struct the VMM writes.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `hvm_start_info.magic`: "xEn3" with the top bit clear.
pub const START_MAGIC: u32 = 0x336e_c578;
/// The start info version whose memory-map fields are meaningful.
pub const START_VERSION: u32 = 1;

/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type of reserved memory (the legacy VGA/BIOS hole).
pub const E820_RESERVED: u32 = 2;

/// `hvm_start_info`, version 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct StartInfo {
    pub magic: u32,
    pub version: u32,
    pub flags: u32,
    pub nr_modules: u32,
    pub modlist_paddr: u64,
    pub cmdline_paddr: u64,
    pub rsdp_paddr: u64,
    pub memmap_paddr: u64,
    pub memmap_entries: u32,
    pub reserved: u32,
}

/// One entry of the memory map (`hvm_memmap_table_entry`, E820 types).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MemoryRegion {
    pub addr: u64,
    pub size: u64,
    /// The E820 type ([`E820_RAM`], ...).
    pub kind: u32,
    pub reserved: u32,
}

const _: () = assert!(core::mem::size_of::<StartInfo>() == 56 && core::mem::size_of::<MemoryRegion>() == 24);

impl MemoryRegion {
    pub const fn new(addr: u64, size: u64, kind: u32) -> Self {
        Self { addr, size, kind, reserved: 0 }
    }

    /// E820 type 1: usable RAM.
    pub fn is_ram(&self) -> bool {
        self.kind == E820_RAM
    }

    /// A short name of the region's type, for the boot log.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            1 => "ram",
            2 => "reserved",
            3 => "acpi",
            4 => "nvs",
            5 => "unusable",
            7 => "pmem",
            _ => "other",
        }
    }
}
