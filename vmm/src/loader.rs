//! Loading the kernel ELF and writing the PVH boot parameters into guest RAM.
//!
//! Both are rewritten at every boot: the kernel's segments (so its `.data`/`.bss` are
//! scratch for one boot) and the boot area below 1 MiB (`nvram::layout`). Nothing lasting
//! may live there.
//!
//! The PVH start info and memory map are `nvram::pvh`'s, the very structs the guest reads
//! (not linux-loader's `hvm_start_info`, which the no_std guest cannot use): one definition
//! of each on both sides.

use std::io::Cursor;
use std::path::PathBuf;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use nvram::layout;
use nvram::pvh::{MemoryRegion, StartInfo, E820_RAM, E820_RESERVED, START_MAGIC, START_VERSION};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use zerocopy::IntoBytes;

use crate::memory::GuestMemory;

/// Why the kernel cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the kernel {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not a loadable x86-64 ELF kernel")]
    NotElf {
        what: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("{what} does not fit in {ram} bytes of RAM; give the machine more memory")]
    TooBig {
        what: String,
        ram: u64,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error(
        "{what} is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); this machine boots PVH kernels only"
    )]
    NotPvh { what: String },
    #[error("the kernel command line is invalid")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot write the kernel command line into guest RAM")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    #[error("cannot write the boot parameters into guest RAM")]
    BootParams(#[source] vm_memory::GuestMemoryError),
}

/// A kernel loaded into RAM, ready to be entered.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The 32-bit PVH entry point.
    pub entry: u64,
    /// End of the kernel's highest segment.
    pub end: u64,
}

/// Loads the ELF `image` (named `what` in errors) and checks it has a PVH entry.
pub fn load_kernel(mem: &GuestMemory, image: &[u8], what: &str) -> Result<LoadedKernel, LoadError> {
    let ram = mem.last_addr().0 + 1;
    let result =
        Elf::load(mem, None, &mut Cursor::new(image), Some(GuestAddress(layout::KERNEL_START))).map_err(|source| {
            use linux_loader::loader::elf::Error as ElfError;
            use linux_loader::loader::Error as LoaderError;
            match source {
                // Segments past the end of RAM fail as an unreadable image or an overflow.
                LoaderError::Elf(ElfError::ReadKernelImage | ElfError::Overflow) | LoaderError::MemoryOverflow => {
                    LoadError::TooBig { what: what.into(), ram, source }
                }
                _ => LoadError::NotElf { what: what.into(), source },
            }
        })?;
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel { entry: entry.0, end: result.kernel_end }),
        _ => Err(LoadError::NotPvh { what: what.into() }),
    }
}

/// Writes the command line, the memory map and `hvm_start_info` for `ram` bytes of RAM and
/// the boot modules already in their window (`modules`: the list's address and length,
/// see `crate::modules`); returns the start info's address, which the vCPU gets in `rbx`.
pub fn write_boot_params(mem: &GuestMemory, ram: u64, cmdline: &str, modules: (u64, u32)) -> Result<u64, LoadError> {
    let mut line = Cmdline::new(layout::CMDLINE_MAX as usize).map_err(LoadError::Cmdline)?;
    if !cmdline.is_empty() {
        line.insert_str(cmdline).map_err(LoadError::Cmdline)?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE), &line).map_err(LoadError::WriteCmdline)?;

    let mut memmap = vec![
        MemoryRegion::new(0, layout::LOW_RAM_END, E820_RAM),
        MemoryRegion::new(layout::LOW_RAM_END, layout::KERNEL_START - layout::LOW_RAM_END, E820_RESERVED),
        MemoryRegion::new(layout::KERNEL_START, ram - layout::KERNEL_START, E820_RAM),
    ];
    // The module window is memory, but not RAM the kernel may use.
    if modules.1 > 0 {
        memmap.push(MemoryRegion::new(nvram::pvh::MODULES_BASE, nvram::pvh::MODULES_MAX, E820_RESERVED));
    }
    const { assert!(4 <= layout::MEMMAP_MAX_ENTRIES) };
    let start_info = StartInfo {
        magic: START_MAGIC,
        version: START_VERSION,
        nr_modules: modules.1,
        modlist_paddr: modules.0,
        cmdline_paddr: layout::CMDLINE,
        memmap_paddr: layout::MEMMAP,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    for (bytes, at) in [(start_info.as_bytes(), layout::START_INFO), (memmap.as_slice().as_bytes(), layout::MEMMAP)] {
        mem.write_slice(bytes, GuestAddress(at)).map_err(LoadError::BootParams)?;
    }
    Ok(layout::START_INFO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;
    use zerocopy::FromZeros;

    fn ram(size: usize) -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn loads_the_bundled_kernel_with_its_pvh_entry() {
        let mem = ram(16 << 20);
        let kernel = load_kernel(&mem, crate::kernel::BUNDLED_KERNEL, "the bundled kernel").unwrap();
        assert!(kernel.entry >= layout::KERNEL_START && kernel.entry < kernel.end);
        assert!(kernel.end <= layout::KERNEL_LIMIT);
    }

    #[test]
    fn refuses_what_is_not_a_pvh_elf() {
        let mem = ram(16 << 20);
        assert!(matches!(load_kernel(&mem, b"not an elf at all", "junk"), Err(LoadError::NotElf { .. })));
        let mut elf = crate::kernel::BUNDLED_KERNEL.to_vec();
        elf.truncate(64);
        assert!(load_kernel(&mem, &elf, "a truncated kernel").is_err());
    }

    #[test]
    fn refuses_a_kernel_larger_than_ram() {
        let mem = ram(1 << 20);
        assert!(matches!(
            load_kernel(&mem, crate::kernel::BUNDLED_KERNEL, "the bundled kernel"),
            Err(LoadError::TooBig { .. })
        ));
    }

    #[test]
    fn writes_start_info_memory_map_and_command_line() {
        let mem = ram(16 << 20);
        let addr = write_boot_params(&mem, 16 << 20, "poweroff fault=ud", (0, 0)).unwrap();
        let mut info = StartInfo::new_zeroed();
        mem.read_slice(info.as_mut_bytes(), GuestAddress(addr)).unwrap();
        assert_eq!(info.magic, START_MAGIC);
        assert_eq!(info.memmap_entries, 3);
        let mut map = [MemoryRegion::new_zeroed(); 3];
        mem.read_slice(map.as_mut_bytes(), GuestAddress(info.memmap_paddr)).unwrap();
        assert_eq!(map[2].addr + map[2].size, 16 << 20);
        assert!(map[0].is_ram() && !map[1].is_ram() && map[2].is_ram());
        let mut line = [0u8; 18];
        mem.read_slice(&mut line, GuestAddress(info.cmdline_paddr)).unwrap();
        assert_eq!(&line, b"poweroff fault=ud\0");
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }

    #[test]
    fn modules_are_listed_and_their_window_reserved() {
        let mem = ram(16 << 20);
        let addr = write_boot_params(&mem, 16 << 20, "", (nvram::pvh::MODULES_BASE, 2)).unwrap();
        let mut info = StartInfo::new_zeroed();
        mem.read_slice(info.as_mut_bytes(), GuestAddress(addr)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr, info.memmap_entries), (2, nvram::pvh::MODULES_BASE, 4));
        let mut map = [MemoryRegion::new_zeroed(); 4];
        mem.read_slice(map.as_mut_bytes(), GuestAddress(info.memmap_paddr)).unwrap();
        assert_eq!(map[3].addr, nvram::pvh::MODULES_BASE);
        assert!(!map[3].is_ram(), "the kernel must not take the window for RAM");
    }
}
