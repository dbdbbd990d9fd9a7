//! The workloads' programs, built by `build.rs` from `apps/` (with `user-rt/`) and embedded
//! in this binary like the kernel, so that `apps=kv,counter` needs no file beside the VMM.
//!
//! Each is a static ELF executable of the user-program ABI (`nvram::abi`, `docs/abi.md`);
//! its argument string is the kernel command line, from which it takes its own keys.

/// A program embedded in the `vmm` binary.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedApp {
    /// Its name in `apps=` (`nvram::cmdline::App::from_name`).
    pub name: &'static str,
    /// The ELF file.
    pub elf: &'static [u8],
}

macro_rules! embedded {
    ($($name:literal),* $(,)?) => {
        &[$(EmbeddedApp { name: $name, elf: include_bytes!(concat!(env!("GUEST_APPS_DIR"), "/", $name)) }),*]
    };
}

/// Every embedded program, in the order of `nvram::cmdline::App`.
pub const EMBEDDED: &[EmbeddedApp] = embedded!["counter", "kv", "memtouch", "fault", "deleter", "churn"];

/// The embedded program called `name` in `apps=`.
pub fn embedded(name: &str) -> Option<&'static EmbeddedApp> {
    EMBEDDED.iter().find(|app| app.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use goblin::elf::header::{EM_X86_64, ET_EXEC};
    use goblin::elf::program_header::{PF_X, PT_DYNAMIC, PT_INTERP, PT_LOAD};
    use goblin::elf::Elf;
    use nvram::abi::{MAX_IMAGE_BYTES, MAX_SEGMENTS, PROGRAM_BASE, PROGRAM_END};
    use nvram::cmdline::App;

    const PAGE: u64 = 4096;

    /// What the kernel's loader asks of a program (`docs/abi.md`), checked on the host so that
    /// a change to the link settings that breaks it fails here, not in a boot.
    fn check(bytes: &[u8]) -> Result<(), String> {
        let elf = Elf::parse(bytes).map_err(|e| format!("not an ELF file: {e}"))?;
        if !elf.is_64 || !elf.little_endian {
            return Err("not a little-endian ELF64".into());
        }
        if elf.header.e_machine != EM_X86_64 {
            return Err(format!("machine {} is not x86-64", elf.header.e_machine));
        }
        if elf.header.e_type != ET_EXEC {
            return Err(format!("type {} is not ET_EXEC", elf.header.e_type));
        }
        if let Some(h) = elf.program_headers.iter().find(|h| h.p_type == PT_INTERP || h.p_type == PT_DYNAMIC) {
            return Err(format!("has a {} segment: not static", h.p_type));
        }
        let mut loads: Vec<_> = elf.program_headers.iter().filter(|h| h.p_type == PT_LOAD).collect();
        if loads.is_empty() || loads.len() > MAX_SEGMENTS {
            return Err(format!("{} PT_LOAD segments (1 to {MAX_SEGMENTS})", loads.len()));
        }
        loads.sort_by_key(|h| h.p_vaddr);
        let mut footprint = 0;
        let mut previous_end = PROGRAM_BASE;
        for h in &loads {
            let end = h.p_vaddr.checked_add(h.p_memsz).ok_or("a segment's end overflows")?;
            if h.p_vaddr < PROGRAM_BASE || end > PROGRAM_END {
                return Err(format!("segment {:#x}..{end:#x} outside the program window", h.p_vaddr));
            }
            if h.p_vaddr % PAGE != 0 {
                return Err(format!("segment at {:#x} does not start a page", h.p_vaddr));
            }
            if h.p_vaddr < previous_end {
                return Err(format!("segment at {:#x} shares a page with the one before", h.p_vaddr));
            }
            if h.p_filesz > h.p_memsz || h.p_offset.checked_add(h.p_filesz).is_none_or(|e| e > bytes.len() as u64) {
                return Err(format!("segment at {:#x}: its file bytes are not in the file", h.p_vaddr));
            }
            previous_end = end.next_multiple_of(PAGE);
            footprint += previous_end - h.p_vaddr;
        }
        if footprint > MAX_IMAGE_BYTES {
            return Err(format!("{footprint} bytes in memory, more than {MAX_IMAGE_BYTES}"));
        }
        let entry = elf.entry;
        if !loads.iter().any(|h| h.p_flags & PF_X != 0 && (h.p_vaddr..h.p_vaddr + h.p_memsz).contains(&entry)) {
            return Err(format!("entry {entry:#x} is not in an executable segment"));
        }
        Ok(())
    }

    #[test]
    fn every_embedded_program_is_an_elf_the_loader_takes() {
        for app in EMBEDDED {
            check(app.elf).unwrap_or_else(|e| panic!("{}: {e}", app.name));
        }
    }

    #[test]
    fn every_embedded_program_is_a_workload_of_the_command_line_and_found_by_name() {
        assert_eq!(EMBEDDED.len(), 6);
        for app in EMBEDDED {
            assert!(App::from_name(app.name).is_some(), "{} is not a name `apps=` takes", app.name);
            assert_eq!(embedded(app.name).map(|a| a.name), Some(app.name));
        }
        assert!(embedded("nonesuch").is_none());
    }

    /// The program headers of `elf`: (offset of the first, their number).
    fn program_headers(elf: &[u8]) -> (usize, usize) {
        let phoff = u64::from_le_bytes(elf[32..40].try_into().unwrap()) as usize;
        let phnum = u16::from_le_bytes(elf[56..58].try_into().unwrap()) as usize;
        (phoff, phnum)
    }

    /// The check is not vacuous: each way a program can break the ABI is caught.
    #[test]
    fn the_check_refuses_what_the_loader_refuses() {
        let good = embedded("counter").unwrap().elf;
        check(good).unwrap();
        let (phoff, phnum) = program_headers(good);
        assert!(phnum >= 2);
        let vaddr = |i: usize| phoff + i * 56 + 16;
        let mutate = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut bad = good.to_vec();
            f(&mut bad);
            check(&bad).unwrap_err()
        };
        assert!(mutate(&|b| b.truncate(40)).contains("not an ELF"));
        assert!(mutate(&|b| b[18..20].copy_from_slice(&3u16.to_le_bytes())).contains("not x86-64"));
        assert!(mutate(&|b| b[16..18].copy_from_slice(&3u16.to_le_bytes())).contains("not ET_EXEC"));
        let below = (PROGRAM_BASE - PAGE).to_le_bytes();
        assert!(mutate(&|b| b[vaddr(0)..vaddr(0) + 8].copy_from_slice(&below)).contains("outside"));
        let unaligned = (PROGRAM_BASE + 8).to_le_bytes();
        assert!(mutate(&|b| b[vaddr(0)..vaddr(0) + 8].copy_from_slice(&unaligned)).contains("does not start a page"));
        // The second segment moved onto the first one's pages.
        let shared = PROGRAM_BASE.to_le_bytes();
        assert!(mutate(&|b| b[vaddr(1)..vaddr(1) + 8].copy_from_slice(&shared)).contains("shares a page"));
        let huge = (MAX_IMAGE_BYTES + PAGE).to_le_bytes();
        let memsz = phoff + 56 + 40;
        assert!(mutate(&|b| b[memsz..memsz + 8].copy_from_slice(&huge)).contains("more than"));
    }
}

#[cfg(test)]
mod readme {
    /// The README's "Your own program" shows the example program whole: the two must not drift.
    #[test]
    fn the_readme_shows_the_example_program_as_it_is() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
        let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
        let example = std::fs::read_to_string(format!("{root}/examples/src/main.rs")).unwrap();
        // From the first attribute on: the file's doc comment is not in the README.
        let code = &example[example.find("#![no_std]").unwrap()..];
        assert!(readme.contains(code), "README.md's example differs from examples/src/main.rs");
    }
}
