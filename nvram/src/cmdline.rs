//! The guest kernel's command line, typed once for both sides: the VMM validates a
//! `--cmdline` with it before boot (an unknown key is refused there, where a user sees it),
//! and the guest parses the same text with the same code. `no_std` and without allocation,
//! so that the guest can use it as is.
//!
//! Space-separated `word` or `key=value` items; numbers are decimal or `0x` hexadecimal.
//!
//! | item                | effect                                                          |
//! |---------------------|-----------------------------------------------------------------|
//! | `apps=A,B,...`      | workloads to start on a fresh image: `counter`, `kv`, `memtouch`, `fault`, `deleter`, `churn` |
//! | `kv_seed=N`         | seed of `kv`'s operation stream (default 1)                     |
//! | `kv_pages=N`        | pages of `kv`'s table region (default 64, at least 1)           |
//! | `kv_verify_every=N` | `kv` verifies its whole table every N reports (0, the default: the guest's own, 5) |
//! | `memtouch=R,S,D`    | `memtouch` maps R regions of S KiB and dirties D KiB per interval (default 4,64,16) |
//! | `memtouch_ms=N`     | `memtouch`'s interval in ms (default 100)                       |
//! | `churn_seed=N`      | seed of `churn`'s stream of maps, unmaps and rewrites (default 1) |
//! | `churn_ops=N`       | operations of `churn`'s stream, then rewrites only (default 5000) |
//! | `churn_pages=N`     | most pages of one of `churn`'s regions (default 8, 1 to 8192)   |
//! | `fault_ms=N`        | `fault` runs N ms before it faults (default 300)                |
//! | `counter_shutdown=N`| `counter` shuts the machine down (system call) after N reports (0: never) |
//! | `deleter=N`         | `deleter` maps, checkpoints and unmaps N one-page regions at once, then N more (0, the default: one region, then fills memory) |
//! | `run_ms=N`          | shut down gracefully after N ms                                 |
//! | `checkpoint_ms=N`   | a write-out every N ms (N > 0; default: only on request)        |
//! | `plate=on\|off`     | the plate function (default on)                                 |
//! | `plate_store=S`     | where the plates' save areas are: `nvm` (default, frames of RAM) or `disk` (the virtio disk: restored at every boot) |
//! | `plate_copy=C`      | who copies plates: `engine` (default) or `cpu`                  |
//! | `bookkeeping=M`     | where the plate function's bookkeeping runs: `ring3` (default) or `ring0` |
//! | `restore=M`         | after a crash: `lazy` (default: the user spaces' pages come back 2 MiB at a time at their first touch, the rest when the CPU idles; NVM only: `plate_store=disk` always restores eagerly) or `eager` (every page back before any process runs) |
//! | `poweroff`          | power off right after the banner                                |
//! | `flush=INSN`        | cache flush instruction: `clwb`, `clflushopt` or `clflush`      |
//! |                     | (default: the best CPUID offers)                                |
//! | `poke-ports`        | read and write ports no device owns, then go on                 |
//! | `disk_test=N`       | at boot, write N sectors (1 to 64) at the end of the virtio disk, flush, read them back and check them |
//! | `fault=KIND`        | provoke a CPU fault in the kernel: `ud`, `pf` or `triple`; in ring-3 kernel work: `work-ud` or `work-panic` |
//! | `test_plant=BUG`    | test knob (the VMM refuses it unless built with `test-knobs`): the CPU copier's write-outs leave out `fence:commit` (the fence before the commit) or `flush:K` (their Kth flush, from 0) |
//!
//! [`Cmdline::parse`] reports each unknown or malformed item through a callback and goes
//! on, as a kernel must (it cannot refuse to boot over a typo); the VMM turns the first
//! report into an error.

/// A fault the kernel provokes on request, to test the exception path end to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    InvalidOpcode,
    Page,
    Triple,
    /// `ud2` in ring-3 kernel work.
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
    Churn,
}

impl App {
    /// The workload called `name` on the command line.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "counter" => Some(Self::Counter),
            "kv" => Some(Self::Kv),
            "memtouch" => Some(Self::Memtouch),
            "fault" => Some(Self::Fault),
            "deleter" => Some(Self::Deleter),
            "churn" => Some(Self::Churn),
            _ => None,
        }
    }

    /// The name the command line calls it by (and its program's name).
    pub fn name(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Kv => "kv",
            Self::Memtouch => "memtouch",
            Self::Fault => "fault",
            Self::Deleter => "deleter",
            Self::Churn => "churn",
        }
    }
}

/// A cache flush instruction, as `flush=` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    Clflush,
    Clflushopt,
    Clwb,
}

impl Flush {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "clflush" => Some(Self::Clflush),
            "clflushopt" => Some(Self::Clflushopt),
            "clwb" => Some(Self::Clwb),
            _ => None,
        }
    }

    /// The instruction's mnemonic: the name `flush=` takes (the guest's boot log prints it).
    pub fn name(self) -> &'static str {
        match self {
            Self::Clflush => "clflush",
            Self::Clflushopt => "clflushopt",
            Self::Clwb => "clwb",
        }
    }
}

/// A bug planted in the CPU copier's write-outs (`test_plant=`), for `vmm explore` to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestPlant {
    /// The fence between the save areas' flushes and the commit is left out.
    UnfencedCommit,
    /// The write-out's flush number K (from 0) is left out.
    DropFlush(u64),
}

/// Most pages of one of `churn`'s regions: the most one `map` gives.
pub const MAX_CHURN_PAGES: u64 = 8192;

/// Most workloads on one command line.
pub const MAX_APPS: usize = 8;

/// The keys (and words) the parser knows, for an error message.
pub const KEYS: &[&str] = &[
    "apps",
    "kv_seed",
    "kv_pages",
    "kv_verify_every",
    "memtouch",
    "memtouch_ms",
    "churn_seed",
    "churn_ops",
    "churn_pages",
    "fault_ms",
    "counter_shutdown",
    "deleter",
    "run_ms",
    "checkpoint_ms",
    "plate",
    "plate_copy",
    "plate_store",
    "bookkeeping",
    "check",
    "poweroff",
    "flush",
    "poke-ports",
    "fault",
    "disk_test",
    "test_plant",
];

/// Most sectors `disk_test` writes: what fits the kernel's buffer for it (32 KiB).
pub const MAX_DISK_TEST_SECTORS: u64 = 64;

/// The parsed command line: every item typed, the defaults where an item is absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cmdline {
    pub poweroff: bool,
    pub fault: Option<Fault>,
    pub flush: Option<Flush>,
    pub poke_ports: bool,
    /// Sectors of the boot-time disk check; 0: none.
    pub disk_test: u64,
    pub apps: [Option<App>; MAX_APPS],
    pub kv_seed: u64,
    pub kv_pages: u64,
    /// 0: the guest's own interval.
    pub kv_verify_every: u64,
    pub memtouch: [u64; 3],
    pub memtouch_ms: u64,
    pub churn_seed: u64,
    pub churn_ops: u64,
    pub churn_pages: u64,
    pub fault_ms: u64,
    /// 0: never.
    pub counter_shutdown: u64,
    /// `deleter`'s regions deleted at once (0: its single region).
    pub deleter: u64,
    pub run_ms: Option<u64>,
    pub checkpoint_ms: Option<u64>,
    pub plate: bool,
    pub plate_copy_engine: bool,
    /// `plate_store=disk`: the save areas and the commit slots are on the virtio disk
    /// (`crate::disk`), and every boot restores from it.
    pub plate_store_disk: bool,
    pub bookkeeping_ring3: bool,
    /// `check=on`: after a restore, the kernel checks the state it restored
    /// (`nvram::fsck`) and prints each violation.
    pub check: bool,
    /// `sums=off`: the copiers compute no content sums of the save areas, so the restore
    /// checks no area's bytes (on by default; off measures what they cost).
    pub sums: bool,
    /// `restore=lazy` (the default): a restore copies the kernel's plates back and leaves
    /// the user spaces' pages in their save areas until their 2 MiB are first touched or the
    /// CPU idles; `restore=eager` copies every plate back before any process runs. NVM only:
    /// a restore from the disk (`plate_store=disk`) copies everything.
    pub restore_lazy: bool,
    /// A bug planted in the CPU copier's write-outs (a test knob).
    pub test_plant: Option<TestPlant>,
}

impl Default for Cmdline {
    fn default() -> Self {
        Self {
            poweroff: false,
            fault: None,
            flush: None,
            poke_ports: false,
            disk_test: 0,
            apps: [None; MAX_APPS],
            kv_seed: 1,
            kv_pages: 64,
            kv_verify_every: 0,
            memtouch: [4, 64, 16],
            memtouch_ms: 100,
            churn_seed: 1,
            churn_ops: 5000,
            churn_pages: 8,
            fault_ms: 300,
            counter_shutdown: 0,
            deleter: 0,
            run_ms: None,
            checkpoint_ms: None,
            plate: true,
            plate_copy_engine: true,
            plate_store_disk: false,
            bookkeeping_ring3: true,
            check: false,
            sums: true,
            restore_lazy: true,
            test_plant: None,
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
    /// Parses `line`; each unknown or malformed item goes to `on_unknown` (whole, as
    /// `key=value`) and leaves the field at what it was.
    pub fn parse(line: &str, mut on_unknown: impl FnMut(&str)) -> Self {
        let mut out = Self::default();
        for item in line.split_ascii_whitespace() {
            if !out.item(item) {
                on_unknown(item);
            }
        }
        out
    }

    /// Applies one item; false if it is unknown or malformed.
    fn item(&mut self, item: &str) -> bool {
        let (key, value) = item.split_once('=').unwrap_or((item, ""));
        match (key, value) {
            ("poweroff", "") => self.poweroff = true,
            ("poke-ports", "") => self.poke_ports = true,
            ("fault", kind) => {
                self.fault = Some(match kind {
                    "ud" => Fault::InvalidOpcode,
                    "pf" => Fault::Page,
                    "triple" => Fault::Triple,
                    "work-ud" => Fault::WorkInvalidOpcode,
                    "work-panic" => Fault::WorkPanic,
                    _ => return false,
                })
            }
            ("flush", name) => match Flush::from_name(name) {
                Some(flush) => self.flush = Some(flush),
                None => return false,
            },
            ("apps", list) => return self.parse_apps(list),
            ("disk_test", n) => {
                return number(n)
                    .filter(|n| (1..=MAX_DISK_TEST_SECTORS).contains(n))
                    .map(|n| self.disk_test = n)
                    .is_some()
            }
            ("kv_seed", n) => return number(n).map(|n| self.kv_seed = n).is_some(),
            ("kv_verify_every", n) => return number(n).map(|n| self.kv_verify_every = n).is_some(),
            ("kv_pages", n) => return number(n).filter(|&n| n > 0).map(|n| self.kv_pages = n).is_some(),
            ("memtouch", spec) => return self.parse_memtouch(spec),
            ("memtouch_ms", n) => return number(n).map(|n| self.memtouch_ms = n).is_some(),
            ("churn_seed", n) => return number(n).map(|n| self.churn_seed = n).is_some(),
            ("churn_ops", n) => return number(n).map(|n| self.churn_ops = n).is_some(),
            ("churn_pages", n) => {
                return number(n).filter(|n| (1..=MAX_CHURN_PAGES).contains(n)).map(|n| self.churn_pages = n).is_some()
            }
            ("fault_ms", n) => return number(n).map(|n| self.fault_ms = n).is_some(),
            ("counter_shutdown", n) => return number(n).map(|n| self.counter_shutdown = n).is_some(),
            ("deleter", n) => return number(n).map(|n| self.deleter = n).is_some(),
            ("run_ms", n) => return number(n).map(|n| self.run_ms = Some(n)).is_some(),
            ("checkpoint_ms", n) => {
                return number(n).filter(|&n| n > 0).map(|n| self.checkpoint_ms = Some(n)).is_some()
            }
            ("plate", "off") => self.plate = false,
            ("plate", "on") => self.plate = true,
            ("plate_copy", copier @ ("engine" | "cpu")) => self.plate_copy_engine = copier == "engine",
            ("plate_store", store @ ("nvm" | "disk")) => self.plate_store_disk = store == "disk",
            ("bookkeeping", mode @ ("ring3" | "ring0")) => self.bookkeeping_ring3 = mode == "ring3",
            ("check", on @ ("on" | "off")) => self.check = on == "on",
            ("sums", on @ ("on" | "off")) => self.sums = on == "on",
            ("restore", mode @ ("lazy" | "eager")) => self.restore_lazy = mode == "lazy",
            ("test_plant", "fence:commit") => self.test_plant = Some(TestPlant::UnfencedCommit),
            ("test_plant", bug) => {
                return bug
                    .strip_prefix("flush:")
                    .and_then(number)
                    .map(|k| self.test_plant = Some(TestPlant::DropFlush(k)))
                    .is_some()
            }
            _ => return false,
        }
        true
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

    /// Whether `key` (the part before `=`) is one the parser knows: a known key with a bad
    /// value is told apart from an unknown key.
    pub fn is_known_key(key: &str) -> bool {
        KEYS.contains(&key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(line: &str) -> (Cmdline, usize) {
        let mut bad = 0;
        let parsed = Cmdline::parse(line, |_| bad += 1);
        (parsed, bad)
    }

    #[test]
    fn an_empty_line_is_the_defaults() {
        assert_eq!(parse_all(""), (Cmdline::default(), 0));
        assert_eq!(parse_all("   "), (Cmdline::default(), 0));
    }

    #[test]
    fn every_item_sets_its_field() {
        let line = "apps=kv,memtouch kv_seed=0x10 kv_pages=8 kv_verify_every=1 memtouch=32,32,256 memtouch_ms=20 \
                    fault_ms=5 counter_shutdown=3 deleter=600 run_ms=800 checkpoint_ms=50 plate=off plate_copy=cpu \
                    bookkeeping=ring0 poweroff flush=clwb poke-ports fault=work-panic disk_test=64 check=on \
                    test_plant=flush:7 plate_store=disk sums=off restore=eager";
        let (c, bad) = parse_all(line);
        assert_eq!(bad, 0);
        assert_eq!(c.apps().collect::<Vec<_>>(), [App::Kv, App::Memtouch]);
        assert_eq!((c.kv_seed, c.kv_pages, c.kv_verify_every), (16, 8, 1));
        assert_eq!((c.memtouch, c.memtouch_ms, c.fault_ms), ([32, 32, 256], 20, 5));
        assert_eq!((c.counter_shutdown, c.run_ms, c.checkpoint_ms), (3, Some(800), Some(50)));
        assert_eq!(c.deleter, 600);
        assert!(!c.plate && !c.plate_copy_engine && !c.bookkeeping_ring3);
        assert!(c.poweroff && c.poke_ports && c.check && !c.sums && Cmdline::default().sums);
        assert!(!c.restore_lazy && Cmdline::default().restore_lazy);
        assert!(parse_all("restore=eager restore=lazy").0.restore_lazy);
        assert_eq!(parse_all("restore=later restore").1, 2);
        assert_eq!(c.disk_test, 64);
        assert!(c.plate_store_disk);
        assert!(!Cmdline::parse("plate_store=disk plate_store=nvm", |_| {}).plate_store_disk);
        assert!(!Cmdline::default().plate_store_disk);
        let mut bad = 0;
        Cmdline::parse("plate_store=tape plate_store", |_| bad += 1);
        assert_eq!(bad, 2);
        assert_eq!((c.flush, c.fault), (Some(Flush::Clwb), Some(Fault::WorkPanic)));
        assert_eq!(c.test_plant, Some(TestPlant::DropFlush(7)));
        assert_eq!(parse_all("test_plant=fence:commit").0.test_plant, Some(TestPlant::UnfencedCommit));
        assert_eq!(parse_all("test_plant=fence:1 test_plant=flush:x test_plant=").1, 3);
    }

    #[test]
    fn bad_items_are_reported_whole_and_change_nothing() {
        let mut seen = Vec::new();
        let c = Cmdline::parse(
            "bogus kv_pages=0 checkpoint_ms=0 memtouch=0,1,1 memtouch=1,2 apps=kv,fly flush=no fault=x poweroff=1 \
             plate=maybe apps=a,b,c,d,e,f,g,h,i kv_seed=x disk_test=0 disk_test=65",
            |item| seen.push(item.to_string()),
        );
        assert_eq!(seen.len(), 14, "{seen:?}");
        assert_eq!(seen[0], "bogus");
        assert_eq!(c, Cmdline::default());
        let (c, bad) = parse_all("apps=counter,counter,counter,counter,counter,counter,counter,counter");
        assert_eq!((c.apps().count(), bad), (MAX_APPS, 0));
    }

    #[test]
    fn churn_items_set_its_fields_and_bad_ones_are_refused() {
        let (c, bad) = parse_all("apps=churn,kv churn_seed=9 churn_ops=0x100 churn_pages=64");
        assert_eq!(bad, 0);
        assert_eq!(c.apps().collect::<Vec<_>>(), [App::Churn, App::Kv]);
        assert_eq!((c.churn_seed, c.churn_ops, c.churn_pages), (9, 256, 64));
        let (c, bad) = parse_all("churn_pages=0 churn_pages=8193 churn_ops=x churn_seed=");
        assert_eq!((c, bad), (Cmdline::default(), 4));
        for key in ["churn_seed", "churn_ops", "churn_pages"] {
            assert!(Cmdline::is_known_key(key), "{key}");
        }
    }

    #[test]
    fn flush_names_go_both_ways() {
        for flush in [Flush::Clflush, Flush::Clflushopt, Flush::Clwb] {
            assert_eq!(Flush::from_name(flush.name()), Some(flush));
        }
        assert_eq!(Flush::Clflushopt.name(), "clflushopt");
        assert_eq!(Flush::from_name("wbinvd"), None);
    }

    #[test]
    fn every_key_is_listed() {
        for item in ["apps=kv", "kv_seed=1", "memtouch=1,1,1", "plate=on", "poweroff", "poke-ports", "fault=ud"] {
            let key = item.split_once('=').map_or(item, |(k, _)| k);
            assert!(Cmdline::is_known_key(key), "{key}");
        }
        assert!(!Cmdline::is_known_key("bogus"));
    }
}
