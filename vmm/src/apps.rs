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
    use nvram::cmdline::App;

    /// What the kernel's loader asks of a program, with its very check
    /// (`nvram::program::check`, whose refusals are tested in `nvram`), so that a change to
    /// the link settings that breaks it fails here, not in a boot.
    #[test]
    fn every_embedded_program_is_an_elf_the_loader_takes() {
        for app in EMBEDDED {
            let program = nvram::program::check(app.elf).unwrap_or_else(|e| panic!("{}: {e}", app.name));
            assert!(program.segments().len() >= 2, "{}: code and constants at least", app.name);
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
