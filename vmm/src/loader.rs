//! Loading the kernel ELF and writing the PVH boot parameters into guest RAM.
//!
//! Both are rewritten at every boot: the kernel's segments (so its `.data`/`.bss` are
//! scratch for one boot) and the boot area below 1 MiB (`nvram::layout`). Nothing lasting
//! may live there.

use std::io::Cursor;
use std::path::PathBuf;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use nvram::layout;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemory;

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Why the kernel cannot be booted.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read the kernel {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is not a loadable x86-64 ELF kernel: {source}")]
    NotElf {
        what: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("{what} does not fit in {ram} bytes of RAM: {source}; give the machine more memory (--mem)")]
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
    #[error("the kernel command line is invalid: {0}")]
    Cmdline(String),
    #[error("cannot write the boot parameters into guest RAM: {0}")]
    BootParams(String),
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

/// Writes the command line, the memory map and `hvm_start_info`; returns the start info's
/// address, which the vCPU gets in `rbx`.
pub fn write_boot_params(mem: &GuestMemory, cmdline: &str) -> Result<u64, LoadError> {
    let ram = mem.last_addr().0 + 1;
    let mut line = Cmdline::new(layout::CMDLINE_MAX as usize).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    if !cmdline.is_empty() {
        line.insert_str(cmdline).map_err(|e| LoadError::Cmdline(e.to_string()))?;
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE), &line)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;

    let memmap = [
        memmap_entry(0, layout::LOW_RAM_END, E820_RAM),
        memmap_entry(layout::LOW_RAM_END, layout::KERNEL_START - layout::LOW_RAM_END, E820_RESERVED),
        memmap_entry(layout::KERNEL_START, ram - layout::KERNEL_START, E820_RAM),
    ];
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: layout::CMDLINE,
        memmap_paddr: layout::MEMMAP,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new::<hvm_start_info>(&start_info, GuestAddress(layout::START_INFO));
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(layout::MEMMAP));
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
        .map_err(|e| LoadError::BootParams(e.to_string()))?;
    Ok(layout::START_INFO)
}

fn memmap_entry(addr: u64, size: u64, type_: u32) -> hvm_memmap_table_entry {
    hvm_memmap_table_entry { addr, size, type_, reserved: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

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
        let addr = write_boot_params(&mem, "poweroff fault=ud").unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.memmap_entries, 3);
        let last: hvm_memmap_table_entry = mem.read_obj(GuestAddress(info.memmap_paddr + 2 * 24)).unwrap();
        assert_eq!(last.addr + last.size, 16 << 20);
        let mut line = [0u8; 18];
        mem.read_slice(&mut line, GuestAddress(info.cmdline_paddr)).unwrap();
        assert_eq!(&line, b"poweroff fault=ud\0");
    }
}
