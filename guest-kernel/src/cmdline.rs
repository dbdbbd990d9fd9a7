//! The kernel command line: space-separated `word` or `key=value` items.
//!
//! | item          | effect                                                        |
//! |---------------|---------------------------------------------------------------|
//! | `poweroff`    | power off right after the banner (tests use it)               |
//! | `poke-ports`  | read and write ports no device owns, then go on (tests that   |
//! |               | the VMM survives a guest poking unknown ports)                |
//! | `flush=INSN`  | cache flush instruction: `clwb`, `clflushopt` or `clflush`    |
//! |               | (default: the best CPUID offers)                              |
//! | `fault=KIND`  | provoke a CPU fault after the banner: `ud` (invalid opcode),  |
//! |               | `pf` (page fault), `triple` (a fault with no handler)         |
//!
//! An unknown item is reported on the console and otherwise ignored, so that a typo is seen.

use crate::persist::FlushInsn;

/// A fault the kernel provokes on request, to test the exception path end to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    InvalidOpcode,
    Page,
    Triple,
}

/// The parsed command line.
#[derive(Debug, Default)]
pub struct Cmdline {
    pub poweroff: bool,
    pub fault: Option<Fault>,
    pub flush: Option<FlushInsn>,
    pub poke_ports: bool,
}

impl Cmdline {
    /// Parses `line`, reporting unknown items through `unknown`.
    pub fn parse(line: &str, mut unknown: impl FnMut(&str)) -> Self {
        let mut out = Self::default();
        for item in line.split_ascii_whitespace() {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            match (key, value) {
                ("poweroff", "") => out.poweroff = true,
                ("poke-ports", "") => out.poke_ports = true,
                ("fault", "ud") => out.fault = Some(Fault::InvalidOpcode),
                ("fault", "pf") => out.fault = Some(Fault::Page),
                ("fault", "triple") => out.fault = Some(Fault::Triple),
                ("flush", name) if FlushInsn::from_name(name).is_some() => out.flush = FlushInsn::from_name(name),
                _ => unknown(item),
            }
        }
        out
    }
}
