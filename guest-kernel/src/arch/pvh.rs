//! What the PVH boot protocol hands the kernel: `hvm_start_info`, the memory map and the
//! command line (Xen `include/public/arch-x86/hvm/start_info.h`), as `nvram::pvh` defines
//! them for both sides.

use nvram::pvh::{MemoryRegion, ModListEntry, StartInfo, MAX_MODULES, MODULE_CMDLINE_MAX, START_MAGIC};

/// The boot information, checked and copied out of the boot area (which later boots and
/// the VMM overwrite).
pub struct BootInfo {
    pub cmdline: &'static str,
    pub memory_map: &'static [MemoryRegion],
    /// The boot modules (user programs), at most [`MAX_MODULES`]. Their bytes are not read
    /// here: where they lie is checked before (see `proc::load`).
    pub modules: &'static [ModListEntry],
}

/// A boot module's command line: `None` when it has none (QEMU's `-initrd`).
///
/// # Safety
///
/// `entry` must come from [`BootInfo::modules`], whose command lines the loader wrote.
pub unsafe fn module_cmdline(entry: &ModListEntry) -> Option<&'static str> {
    if entry.cmdline_paddr == 0 {
        return None;
    }
    // SAFETY: per the caller, a NUL-terminated string the loader wrote, read up to its bound.
    Some(unsafe { c_str(entry.cmdline_paddr as *const u8, MODULE_CMDLINE_MAX) })
}

/// Why the start info cannot be used.
#[derive(Debug)]
pub enum BootInfoError {
    BadMagic(u32),
}

impl core::fmt::Display for BootInfoError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::BadMagic(magic) => write!(f, "hvm_start_info magic is {magic:#x}, expected {START_MAGIC:#x}"),
        }
    }
}

impl BootInfo {
    /// Reads the start info at physical address `paddr` (identity-mapped).
    ///
    /// # Safety
    ///
    /// `paddr` must be the address the boot loader passed in `ebx`, and the boot area must
    /// stay untouched while the returned references live (it does: the kernel never writes
    /// below 1 MiB).
    pub unsafe fn from_start_info(paddr: u64) -> Result<Self, BootInfoError> {
        // SAFETY: the caller guarantees `paddr` points at an `hvm_start_info`.
        let info = unsafe { &*(paddr as *const StartInfo) };
        if info.magic != START_MAGIC {
            return Err(BootInfoError::BadMagic(info.magic));
        }
        let cmdline = if info.cmdline_paddr == 0 {
            ""
        } else {
            // SAFETY: the loader wrote a NUL-terminated string at `cmdline_paddr`; it is
            // bounded by the boot area (`nvram::layout::CMDLINE_MAX`).
            unsafe { c_str(info.cmdline_paddr as *const u8, nvram::layout::CMDLINE_MAX as usize) }
        };
        let memory_map = if info.version >= 1 && info.memmap_paddr != 0 {
            let entries = (info.memmap_entries as usize).min(nvram::layout::MEMMAP_MAX_ENTRIES as usize);
            // SAFETY: version 1 start info carries `memmap_entries` entries at `memmap_paddr`.
            unsafe { core::slice::from_raw_parts(info.memmap_paddr as *const MemoryRegion, entries) }
        } else {
            &[]
        };
        let modules = if info.nr_modules != 0 && info.modlist_paddr != 0 {
            let count = (info.nr_modules as usize).min(MAX_MODULES);
            // SAFETY: the loader wrote `nr_modules` entries at `modlist_paddr`.
            unsafe { core::slice::from_raw_parts(info.modlist_paddr as *const ModListEntry, count) }
        } else {
            &[]
        };
        Ok(Self { cmdline, memory_map, modules })
    }

    /// End of the highest usable RAM region: the size of NVM.
    pub fn ram_end(&self) -> u64 {
        self.memory_map.iter().filter(|r| r.is_ram()).map(|r| r.addr + r.size).max().unwrap_or(0)
    }
}

/// A string of at most `max` bytes ending at the first NUL; invalid UTF-8 is cut where it starts.
///
/// # Safety
///
/// `ptr..ptr + max` must be readable, or hold a NUL before its end.
unsafe fn c_str(ptr: *const u8, max: usize) -> &'static str {
    let mut len = 0;
    // SAFETY: reads stop at the first NUL or at `max`, within the caller's bound.
    while len < max && unsafe { *ptr.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: the `len` bytes were just read.
    let bytes = unsafe { core::slice::from_raw_parts(ptr, len) };
    match core::str::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or(""),
    }
}
