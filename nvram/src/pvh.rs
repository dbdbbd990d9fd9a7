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

/// One boot module (`hvm_modlist_entry`): a user program's ELF file, and its command line
/// `NAME ARGS` (see [`split_module_cmdline`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct ModListEntry {
    pub paddr: u64,
    pub size: u64,
    pub cmdline_paddr: u64,
    pub reserved: u64,
}

/// Most boot modules a boot takes; further ones are ignored (the VMM refuses more).
pub const MAX_MODULES: usize = 32;
/// Longest module command line, NUL included: a name, a space, the arguments.
pub const MODULE_CMDLINE_MAX: usize = 2048;

/// Where the VMM puts the boot modules: a window of its own above every RAM size (so a
/// module never lies in NVM that the kernel owns), volatile, marked reserved in the
/// memory map. QEMU puts its one module (`-initrd`) near the top of RAM instead.
pub const MODULES_BASE: u64 = crate::layout::MAX_RAM;
/// Bytes of the module window, at most.
pub const MODULES_MAX: u64 = 0x1000_0000;

/// A module's command line split into the program's name (its first word) and its
/// argument string (the rest, after one space). Without a command line (QEMU's
/// `-initrd`), the name is `app` and the arguments are the kernel's command line.
pub fn split_module_cmdline<'a>(cmdline: Option<&'a str>, kernel_cmdline: &'a str) -> (&'a str, &'a str) {
    match cmdline.map(str::trim_start) {
        None | Some("") => ("app", kernel_cmdline),
        Some(line) => match line.split_once(' ') {
            Some((name, args)) => (name, args),
            None => (line, ""),
        },
    }
}

const _: () = assert!(core::mem::size_of::<StartInfo>() == 56 && core::mem::size_of::<MemoryRegion>() == 24);
const _: () = assert!(core::mem::size_of::<ModListEntry>() == 32);
const _: () =
    assert!(MODULES_BASE >= crate::layout::MAX_RAM && MODULES_BASE + MODULES_MAX <= crate::mmio::VIRTIO_BLK_BASE);

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_module_command_line_is_a_name_and_arguments() {
        assert_eq!(split_module_cmdline(Some("kv kv_seed=3 kv_pages=4"), "k"), ("kv", "kv_seed=3 kv_pages=4"));
        assert_eq!(split_module_cmdline(Some("mine"), "k"), ("mine", ""));
        assert_eq!(split_module_cmdline(Some(""), "apps=kv"), ("app", "apps=kv"));
        assert_eq!(split_module_cmdline(None, "apps=kv"), ("app", "apps=kv"));
        assert_eq!(split_module_cmdline(Some("  x  y"), ""), ("x", " y"));
    }
}
