//! User programs handed to the guest at boot as PVH modules (`hvm_start_info`'s module
//! list), in a window of guest-physical memory of their own.
//!
//! The window ([`nvram::pvh::MODULES_BASE`]) lies above every RAM size, so a module never
//! sits in NVM that the kernel owns: the kernel reads each one once, at a cold boot, and
//! copies its segments into the program's own user spaces in NVM. The window itself is
//! anonymous memory, gone at exit: what lasts of a program is what the kernel loaded.
//!
//! ```text
//!   MODULES_BASE           the module list (`ModListEntry` × count)
//!   + 4 KiB                the command lines, MODULE_CMDLINE_MAX bytes each: "NAME ARGS"
//!   + 4 KiB + 32 × 2 KiB   the ELF files, each from a page boundary
//! ```
//!
//! The VMM checks only what it must to build the window (count, sizes, names); whether
//! a file is a program the kernel can run is the kernel's to decide (`nvram::program`),
//! and its refusal reaches the VMM as a machine-control report.

use std::borrow::Cow;

use nvram::pvh::{ModListEntry, MAX_MODULES, MODULES_BASE, MODULES_MAX, MODULE_CMDLINE_MAX};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use zerocopy::IntoBytes;

use crate::memory::GuestMemory;

const PAGE: u64 = 4096;
const CMDLINES: u64 = MODULES_BASE + PAGE;
const FILES: u64 = CMDLINES + (MAX_MODULES * MODULE_CMDLINE_MAX) as u64;

/// Longest name of a program (the console and the reports show 15 bytes of it).
pub const MAX_NAME: usize = 15;

/// One program for the guest: its ELF file, its name and its argument string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootModule {
    pub name: String,
    pub args: String,
    pub elf: Cow<'static, [u8]>,
}

/// Why the programs cannot be handed over.
#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("{count} programs given; a boot takes at most {MAX_MODULES}")]
    TooMany { count: usize },
    #[error("the program name `{name}` is not 1 to {MAX_NAME} printable ASCII characters without spaces")]
    BadName { name: String },
    #[error("the arguments of program `{name}` are {len} bytes; at most {} fit", nvram::abi::MAX_ARGS_LEN)]
    ArgsTooLong { name: String, len: usize },
    #[error("the arguments of program `{name}` hold a NUL byte")]
    NulInArgs { name: String },
    #[error("the programs' files take {bytes} bytes together; at most {} MiB fit the module window", MODULES_MAX >> 20)]
    TooLarge { bytes: u64 },
    #[error("cannot set up the module window: {0}")]
    Map(String),
    #[error("cannot write the boot modules into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// Checks `modules` and returns the size of the window they need (0 for none).
pub fn window_size(modules: &[BootModule]) -> Result<u64, ModuleError> {
    if modules.is_empty() {
        return Ok(0);
    }
    if modules.len() > MAX_MODULES {
        return Err(ModuleError::TooMany { count: modules.len() });
    }
    let mut end = FILES - MODULES_BASE;
    for m in modules {
        let name_ok = (1..=MAX_NAME).contains(&m.name.len()) && m.name.bytes().all(|b| b.is_ascii_graphic());
        if !name_ok {
            return Err(ModuleError::BadName { name: m.name.clone() });
        }
        if m.args.len() > nvram::abi::MAX_ARGS_LEN {
            return Err(ModuleError::ArgsTooLong { name: m.name.clone(), len: m.args.len() });
        }
        if m.args.contains('\0') {
            return Err(ModuleError::NulInArgs { name: m.name.clone() });
        }
        end = end.saturating_add((m.elf.len() as u64).max(1).div_ceil(PAGE) * PAGE);
    }
    if end > MODULES_MAX {
        return Err(ModuleError::TooLarge { bytes: end });
    }
    Ok(end)
}

/// Guest memory with the module window added (when there are modules).
pub fn add_window(mem: GuestMemory, size: u64) -> Result<GuestMemory, ModuleError> {
    if size == 0 {
        return Ok(mem);
    }
    let region = GuestRegionMmap::from_range(GuestAddress(MODULES_BASE), size as usize, None)
        .map_err(|e| ModuleError::Map(e.to_string()))?;
    mem.insert_region(std::sync::Arc::new(region)).map_err(|e| ModuleError::Map(e.to_string()))
}

/// Writes the module list, the command lines and the files into the window; returns the
/// list's address and length for `hvm_start_info` (0, 0 for none).
pub fn write(mem: &GuestMemoryMmap<()>, modules: &[BootModule]) -> Result<(u64, u32), ModuleError> {
    if modules.is_empty() {
        return Ok((0, 0));
    }
    let mut list = Vec::with_capacity(modules.len());
    let mut file_at = FILES;
    for (i, m) in modules.iter().enumerate() {
        let cmdline_at = CMDLINES + (i * MODULE_CMDLINE_MAX) as u64;
        let mut line = format!("{} {}", m.name, m.args).into_bytes();
        line.push(0);
        mem.write_slice(&line, GuestAddress(cmdline_at))?;
        mem.write_slice(&m.elf, GuestAddress(file_at))?;
        list.push(ModListEntry { paddr: file_at, size: m.elf.len() as u64, cmdline_paddr: cmdline_at, reserved: 0 });
        file_at += (m.elf.len() as u64).max(1).div_ceil(PAGE) * PAGE;
    }
    mem.write_slice(list.as_bytes(), GuestAddress(MODULES_BASE))?;
    Ok((MODULES_BASE, modules.len() as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;
    use zerocopy::FromZeros;

    fn module(name: &str, args: &str, elf: &[u8]) -> BootModule {
        BootModule { name: name.into(), args: args.into(), elf: Cow::Owned(elf.to_vec()) }
    }

    #[test]
    fn modules_land_in_their_window_with_their_command_lines() {
        let modules = [module("kv", "kv_seed=3", &[1; 5000]), module("mine", "", &[2; 10])];
        let size = window_size(&modules).unwrap();
        assert_eq!(size, FILES - MODULES_BASE + 2 * 4096 + 4096);
        let ram = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mem = add_window(ram, size).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let (list_at, count) = write(&mem, &modules).unwrap();
        assert_eq!((list_at, count), (MODULES_BASE, 2));
        let mut list = [ModListEntry::new_zeroed(); 2];
        mem.read_slice(list.as_mut_bytes(), GuestAddress(list_at)).unwrap();
        assert_eq!((list[0].paddr, list[0].size), (FILES, 5000));
        assert_eq!((list[1].paddr, list[1].size), (FILES + 2 * 4096, 10));
        let mut line = [0u8; 13];
        mem.read_slice(&mut line, GuestAddress(list[0].cmdline_paddr)).unwrap();
        assert_eq!(&line, b"kv kv_seed=3\0");
        let mut byte = [0u8; 1];
        mem.read_slice(&mut byte, GuestAddress(list[1].paddr)).unwrap();
        assert_eq!(byte, [2]);
    }

    #[test]
    fn bad_names_arguments_counts_and_sizes_are_refused() {
        let bad = |m: BootModule| window_size(&[m]).unwrap_err().to_string();
        assert!(bad(module("", "", b"x")).contains("name"));
        assert!(bad(module("has space", "", b"x")).contains("name"));
        assert!(bad(module("a-very-long-program-name", "", b"x")).contains("name"));
        assert!(bad(module("p", &"a".repeat(2000), b"x")).contains("at most 1024"));
        assert!(bad(module("p", "a\0b", b"x")).contains("NUL"));
        let big =
            BootModule { name: "big".into(), args: String::new(), elf: Cow::Owned(vec![0; MODULES_MAX as usize]) };
        assert!(bad(big).contains("module window"));
        let many: Vec<BootModule> = (0..=MAX_MODULES).map(|i| module(&format!("p{i}"), "", b"x")).collect();
        assert!(window_size(&many).unwrap_err().to_string().contains("at most 32"));
        assert_eq!(window_size(&[]).unwrap(), 0);
    }
}
