//! The kernel command line: space-separated `word` or `key=value` items.
//!
//! | item                | effect                                                          |
//! |---------------------|-----------------------------------------------------------------|
//! | `apps=A,B,...`      | workloads to start on a fresh image: `counter`, `kv`, `memtouch`, `fault`, `deleter` |
//! | `kv_seed=N`         | seed of `kv`'s operation stream (default 1)                     |
//! | `kv_pages=N`        | pages of `kv`'s table region (default 64)                       |
//! | `kv_verify_every=N` | `kv` verifies its whole table every N reports (default 5)       |
//! | `memtouch=R,S,D`    | `memtouch` maps R regions of S KiB and dirties D KiB per interval (default 4,64,16) |
//! | `memtouch_ms=N`     | `memtouch`'s interval in ms (default 100)                       |
//! | `fault_ms=N`        | `fault` runs N ms before it faults (default 300)                |
//! | `counter_shutdown=N`| `counter` shuts the machine down (system call) after N reports  |
//! | `run_ms=N`          | shut down gracefully after N ms (tests and benchmarks)          |
//! | `checkpoint_ms=N`   | a write-out every N ms (default: none, only on request)         |
//! | `plate=off`         | no plate function: no write-outs, nothing to restore            |
//! | `plate_copy=C`      | who copies plates: `engine` (the copy engine, default when the machine has one) or `cpu` |
//! | `bookkeeping=M`     | where the plate function's bookkeeping runs: `ring3` (default: at CPL 3, native speed under PVM) or `ring0` |
//! | `poweroff`          | power off right after the banner                                |
//! | `flush=INSN`        | cache flush instruction: `clwb`, `clflushopt` or `clflush`      |
//! |                     | (default: the best CPUID offers)                                |
//! | `poke-ports`        | read and write ports no device owns, then go on                 |
//! | `fault=KIND`        | provoke a CPU fault in the kernel: `ud`, `pf` or `triple`; in ring-3 kernel work: `work-ud` or `work-panic` |
//!
//! An unknown or malformed item is reported on the console and otherwise ignored, so that a
//! typo is seen.

use crate::dev::persist::FlushInsn;

/// A fault the kernel provokes on request, to test the exception path end to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    InvalidOpcode,
    Page,
    Triple,
    /// `ud2` in ring-3 kernel work (`ring3`).
    WorkInvalidOpcode,
    /// A panic in ring-3 kernel work.
    WorkPanic,
}

/// A workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum App {
    Counter,
    Kv,
    Memtouch,
    Fault,
    Deleter,
}

impl App {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "counter" => Some(Self::Counter),
            "kv" => Some(Self::Kv),
            "memtouch" => Some(Self::Memtouch),
            "fault" => Some(Self::Fault),
            "deleter" => Some(Self::Deleter),
            _ => None,
        }
    }
}

/// Most workloads on one command line.
pub const MAX_APPS: usize = 8;

/// The parsed command line.
#[derive(Debug)]
pub struct Cmdline {
    pub poweroff: bool,
    pub fault: Option<Fault>,
    pub flush: Option<FlushInsn>,
    pub poke_ports: bool,
    pub apps: [Option<App>; MAX_APPS],
    pub kv_seed: u64,
    pub kv_pages: u64,
    pub kv_verify_every: u64,
    pub memtouch: [u64; 3],
    pub memtouch_ms: u64,
    pub fault_ms: u64,
    pub counter_shutdown: u64,
    pub run_ms: Option<u64>,
    pub checkpoint_ms: Option<u64>,
    pub plate: bool,
    pub plate_copy_engine: bool,
    pub bookkeeping_ring3: bool,
}

impl Default for Cmdline {
    fn default() -> Self {
        Self {
            poweroff: false,
            fault: None,
            flush: None,
            poke_ports: false,
            apps: [None; MAX_APPS],
            kv_seed: 1,
            kv_pages: 64,
            kv_verify_every: 0,
            memtouch: [4, 64, 16],
            memtouch_ms: 100,
            fault_ms: 300,
            counter_shutdown: 0,
            run_ms: None,
            checkpoint_ms: None,
            plate: true,
            plate_copy_engine: true,
            bookkeeping_ring3: true,
        }
    }
}

fn number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

impl Cmdline {
    /// Parses `line`, reporting unknown or malformed items through `unknown`.
    pub fn parse(line: &str, mut unknown: impl FnMut(&str)) -> Self {
        let mut out = Self::default();
        for item in line.split_ascii_whitespace() {
            let (key, value) = item.split_once('=').unwrap_or((item, ""));
            let ok = match (key, value) {
                ("poweroff", "") => {
                    out.poweroff = true;
                    true
                }
                ("poke-ports", "") => {
                    out.poke_ports = true;
                    true
                }
                ("fault", kind) => {
                    out.fault = match kind {
                        "ud" => Some(Fault::InvalidOpcode),
                        "pf" => Some(Fault::Page),
                        "triple" => Some(Fault::Triple),
                        "work-ud" => Some(Fault::WorkInvalidOpcode),
                        "work-panic" => Some(Fault::WorkPanic),
                        _ => None,
                    };
                    out.fault.is_some()
                }
                ("flush", name) => {
                    out.flush = FlushInsn::from_name(name);
                    out.flush.is_some()
                }
                ("apps", list) => out.parse_apps(list),
                ("kv_seed", n) => number(n).map(|n| out.kv_seed = n).is_some(),
                ("kv_verify_every", n) => number(n).map(|n| out.kv_verify_every = n).is_some(),
                ("kv_pages", n) => number(n).filter(|&n| n > 0).map(|n| out.kv_pages = n).is_some(),
                ("memtouch", spec) => out.parse_memtouch(spec),
                ("memtouch_ms", n) => number(n).map(|n| out.memtouch_ms = n).is_some(),
                ("fault_ms", n) => number(n).map(|n| out.fault_ms = n).is_some(),
                ("counter_shutdown", n) => number(n).map(|n| out.counter_shutdown = n).is_some(),
                ("run_ms", n) => number(n).map(|n| out.run_ms = Some(n)).is_some(),
                ("checkpoint_ms", n) => number(n).filter(|&n| n > 0).map(|n| out.checkpoint_ms = Some(n)).is_some(),
                ("plate", "off") => {
                    out.plate = false;
                    true
                }
                ("plate", "on") => true,
                ("plate_copy", copier @ ("engine" | "cpu")) => {
                    out.plate_copy_engine = copier == "engine";
                    true
                }
                ("bookkeeping", mode @ ("ring3" | "ring0")) => {
                    out.bookkeeping_ring3 = mode == "ring3";
                    true
                }
                _ => false,
            };
            if !ok {
                unknown(item);
            }
        }
        out
    }

    fn parse_apps(&mut self, list: &str) -> bool {
        let mut apps = [None; MAX_APPS];
        for (i, name) in list.split(',').enumerate() {
            match (apps.get_mut(i), App::from_name(name)) {
                (Some(slot), Some(app)) => *slot = Some(app),
                _ => return false,
            }
        }
        self.apps = apps;
        true
    }

    fn parse_memtouch(&mut self, spec: &str) -> bool {
        let mut values = [0u64; 3];
        let mut parts = spec.split(',');
        for value in &mut values {
            match parts.next().and_then(number) {
                Some(n) => *value = n,
                None => return false,
            }
        }
        if parts.next().is_some() || values[0] == 0 || values[1] == 0 {
            return false;
        }
        self.memtouch = values;
        true
    }

    /// The workloads, in command-line order.
    pub fn apps(&self) -> impl Iterator<Item = App> + '_ {
        self.apps.iter().flatten().copied()
    }
}
