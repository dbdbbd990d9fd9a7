//! The measurements behind the benchmarks (`benches/`) and `vmm report`, in one place so
//! that both measure the same way: boot a real machine, drive it through its
//! [`Controller`], and read the guest's own TSC figures from its operation records; host
//! wall time where only the host can see it (crash to running, the control round trip);
//! and, in the same run, the limit the hardware sets: the host's memcpy, and memcpy plus
//! `clflushopt` and `sfence`, of exactly the bytes an operation copied.
//!
//! Errors are returned, never panicked on: `vmm report` is a command, not a test.

use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use devices::control::OperationRecord;
use devices::PersistenceModel;
use nvram::control::{BootKind, Operation};

use crate::api::ApiError;
use crate::{ConsoleOutput, Machine, RunningMachine, VmConfig, WaitError};

/// The longest wait for anything the guest does.
pub const LIMIT: Duration = Duration::from_secs(60);

/// The paper's figures (Tender on QEMU, NVM main memory), in ms.
pub mod paper {
    /// Plate-ification plus the first write-out, volatile (disk) and NVM versions.
    pub const PLATEIFICATION_MS: [f64; 2] = [4937.0, 398.0];
    /// The first write-out.
    pub const WRITE_OUT_MS: [f64; 2] = [70.4, 11.5];
    /// The restore.
    pub const RESTORE_MS: [f64; 2] = [484.0, 60.6];
}

/// The paper's configuration on our machine: 450 regions of 18 KiB (456 plates, about
/// 9 MB plated), 1400 KiB dirtied every 100 ms, in 256 MiB.
pub const PAPER_MEMTOUCH: Workload =
    Workload::Memtouch { processes: 1, regions: 450, region_kib: 18, dirty_kib: 1400, ms: 100 };
/// RAM of the paper's configuration.
pub const PAPER_RAM: u64 = 256 << 20;

/// What the measured machine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// `memtouch`: `regions` regions of `region_kib`, `dirty_kib` dirtied every `ms`, in
    /// each of `processes` processes (one process maps at most 58 MiB: its page-table pool).
    Memtouch { processes: u64, regions: u64, region_kib: u64, dirty_kib: u64, ms: u64 },
    /// `kv`, with a periodic write-out every `checkpoint_ms` (none: on request only).
    Kv { checkpoint_ms: Option<u64> },
}

impl Workload {
    /// The memtouch workload whose write-outs copy about `dirty` bytes: 16 regions, every
    /// page of them dirtied each interval; above 32 MiB in as many processes of 32 MiB.
    pub fn dirtying(dirty: u64) -> Self {
        let kib = (dirty >> 10).max(64);
        let processes = kib.div_ceil(32 << 10);
        let each = kib / processes;
        Self::Memtouch { processes, regions: 16, region_kib: each / 16, dirty_kib: each, ms: 50 }
    }

    /// The memtouch workload with `plates` plates in all (the kernel has 6 of its own), of
    /// one page each, 64 KiB dirtied each interval.
    pub fn plates(plates: u64) -> Self {
        Self::Memtouch { processes: 1, regions: plates.saturating_sub(6).max(1), region_kib: 4, dirty_kib: 64, ms: 50 }
    }

    /// The kernel command line of a cold boot.
    pub fn cmdline(&self) -> String {
        match *self {
            Self::Memtouch { processes, regions, region_kib, dirty_kib, ms } => {
                let apps = vec!["memtouch"; processes.max(1) as usize].join(",");
                format!("apps={apps} memtouch={regions},{region_kib},{dirty_kib} memtouch_ms={ms}")
            }
            Self::Kv { checkpoint_ms: None } => "apps=kv".into(),
            Self::Kv { checkpoint_ms: Some(ms) } => format!("apps=kv checkpoint_ms={ms}"),
        }
    }

    /// Guest RAM that holds the workload's plates twice over (their two save areas) and
    /// the rest: the paper's 256 MiB unless more is needed.
    pub fn ram(&self) -> u64 {
        match *self {
            Self::Memtouch { processes, regions, region_kib, .. } => {
                let plated = (processes.max(1) * regions * region_kib) << 10;
                (4 * plated + (64 << 20)).next_power_of_two().max(PAPER_RAM)
            }
            Self::Kv { .. } => PAPER_RAM,
        }
    }
}

/// Why a measurement could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PerfError {
    #[error("cannot start the machine: {0}")]
    Machine(#[from] crate::Error),
    #[error(transparent)]
    Wait(#[from] WaitError),
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] ApiError),
    #[error("the guest reported no {0}")]
    Missing(&'static str),
}

/// The machine configuration of a measurement: `image` (made afresh when `fresh`), the
/// console into `console`, the persistence model.
pub fn config(image: &Path, console: &Path, ram: u64, cmdline: &str, model: PersistenceModel) -> VmConfig {
    let mut config = VmConfig::new(image);
    config.mem_size = Some(ram);
    config.cmdline = cmdline.into();
    config.console = ConsoleOutput::File(console.into());
    config.persistence.model = model;
    config
}

/// A scratch place for images and consoles.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn image(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.img"))
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

/// The volatile machine of a measurement (`--memory volatile`), the plates' save areas on
/// the disk `name`.disk of the scratch directory (`plate_store=disk`, created at
/// [`crate::config::DEFAULT_DISK_SIZE`] or larger when the plates need it).
pub fn disk_config(scratch: &Scratch, name: &str, ram: u64, cmdline: &str) -> VmConfig {
    let mut config = VmConfig::new(scratch.image(name));
    config.memory = crate::MemoryKind::Volatile;
    config.mem_size = Some(ram);
    config.cmdline = format!("plate_store=disk {cmdline}");
    config.console = ConsoleOutput::File(scratch.console());
    let size = (ram / 2).max(crate::config::DEFAULT_DISK_SIZE);
    config.disk = Some(crate::DiskConfig { path: scratch.dir.join(format!("{name}.disk")), size_if_created: size });
    config
}

/// A running machine of `workload` on a fresh image, its workload started.
pub fn boot(
    scratch: &Scratch,
    name: &str,
    workload: Workload,
    model: PersistenceModel,
) -> Result<RunningMachine, PerfError> {
    boot_with(scratch, name, workload, model, "")
}

/// [`boot`] with `extra` on the kernel command line.
pub fn boot_with(
    scratch: &Scratch,
    name: &str,
    workload: Workload,
    model: PersistenceModel,
    extra: &str,
) -> Result<RunningMachine, PerfError> {
    let image = scratch.image(name);
    let _ = std::fs::remove_file(&image);
    let cmdline = format!("{} {extra}", workload.cmdline());
    boot_config(&config(&image, &scratch.console(), workload.ram(), cmdline.trim_end(), model), workload)
}

/// The workload of [`sums_cost`]: as many bytes copied as the paper's configuration's
/// write-outs copy (about 4 MB), the same bytes at every write-out (every page of 16 regions
/// dirtied between two), so that the two sides differ in the sums alone.
pub const SUMS_WORKLOAD: Workload =
    Workload::Memtouch { processes: 1, regions: 16, region_kib: 256, dirty_kib: 4096, ms: 50 };

/// What the save areas' content sums cost a write-out: the write-outs of `pairs` pairs of
/// boots of [`SUMS_WORKLOAD`], one with the sums and one with `sums=off`, in turn (so that a
/// busier host weighs on both alike), `n` write-outs each after plate-ification.
pub fn sums_cost(scratch: &Scratch, pairs: usize, n: usize) -> Result<[Vec<OperationRecord>; 2], PerfError> {
    let mut runs = [Vec::new(), Vec::new()];
    for _ in 0..pairs {
        for (side, extra) in ["", "sums=off"].into_iter().enumerate() {
            let vm = boot_with(scratch, "sums", SUMS_WORKLOAD, PersistenceModel::Eadr, extra)?;
            runs[side].extend(write_outs(&vm, n, Duration::from_millis(60))?.write_outs);
        }
    }
    Ok(runs)
}

/// [`boot`] of the volatile machine, its plates on a fresh disk (`disk_config`).
pub fn boot_on_disk(scratch: &Scratch, name: &str, workload: Workload) -> Result<RunningMachine, PerfError> {
    let config = disk_config(scratch, name, workload.ram(), &workload.cmdline());
    if let Some(disk) = &config.disk {
        let _ = std::fs::remove_file(&disk.path);
    }
    boot_config(&config, workload)
}

fn boot_config(config: &VmConfig, workload: Workload) -> Result<RunningMachine, PerfError> {
    let vm = Machine::build(config)?.spawn()?;
    let (app, processes) = match workload {
        Workload::Memtouch { processes, .. } => ("memtouch", processes.max(1)),
        Workload::Kv { .. } => ("kv", 1),
    };
    // memtouch's first heartbeats come once its regions are mapped: wait for every
    // process's (they share the name; the status keeps the last sender's pid).
    let mut seen = std::collections::BTreeSet::new();
    vm.wait_for(LIMIT, "the workload's heartbeats", |s| {
        let Some(w) = s.workloads.get(app) else { return false };
        seen.insert(w.pid);
        seen.len() as u64 >= processes && w.heartbeats >= 2 * processes
    })?;
    Ok(vm)
}

/// What a series of requested write-outs measured.
#[derive(Debug, Clone)]
pub struct WriteOuts {
    /// The first, which plate-ifies the workload's regions.
    pub plateification: OperationRecord,
    pub write_outs: Vec<OperationRecord>,
    /// Host wall time of each [`crate::Controller::checkpoint`] call, request to commit seen.
    pub round_trips: Vec<Duration>,
}

/// The plate-ification, then `n` write-outs `gap` apart, of a booted machine.
pub fn write_outs(vm: &RunningMachine, n: usize, gap: Duration) -> Result<WriteOuts, PerfError> {
    let controller = vm.controller();
    let plateification = controller.checkpoint(LIMIT)?;
    let (mut write_outs, mut round_trips) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        thread::sleep(gap);
        let t = Instant::now();
        let record = controller.checkpoint(LIMIT)?;
        round_trips.push(t.elapsed());
        write_outs.push(record);
    }
    Ok(WriteOuts { plateification, write_outs, round_trips })
}

/// Crash to running, host wall time, split up.
#[derive(Debug, Clone, Copy)]
pub struct CrashToRunning {
    /// The VMM's set-up: image, RAM, KVM, kernel load (`Machine::build`).
    pub setup: Duration,
    /// From the vCPU's start to the restore's start (the guest's boot up to its restore).
    pub boot: Duration,
    /// The restore, as the guest measured it.
    pub restore: Duration,
    /// From the restore's end to the first restored process entered (as the VMM heard it).
    pub rest: Duration,
    pub total: Duration,
}

/// How long [`restore_once`] waits, when asked, for a lazy restore's end once the processes
/// run.
const TAIL_LIMIT: Duration = Duration::from_secs(2);

/// A restore after a crash, and what it took to get the restored workload running.
#[derive(Debug, Clone)]
pub struct Restore {
    /// The restore, until the processes run.
    pub record: OperationRecord,
    /// A lazy restore's end (`Operation::RestoreTail`): every page back.
    pub tail: Option<OperationRecord>,
    pub crash_to_running: CrashToRunning,
}

/// Boots a new machine on the crashed `image` (of `ram` bytes), waits for the first restored
/// process to run (and, if `tail`, a lazy restore's end, for up to [`TAIL_LIMIT`]), and
/// crashes it again (so the next call restores the same write-out). `cmdline`:
/// `restore=eager`, or nothing (lazy).
pub fn restore_once(
    scratch: &Scratch,
    image: &Path,
    ram: u64,
    model: PersistenceModel,
    cmdline: &str,
    tail: bool,
) -> Result<Restore, PerfError> {
    restore_with(&config(image, &scratch.console(), ram, cmdline, model), tail)
}

/// [`restore_once`] of the volatile machine whose plates are on disk `name` (as
/// [`boot_on_disk`] made it): every boot restores from the disk.
pub fn restore_once_on_disk(scratch: &Scratch, name: &str, ram: u64) -> Result<Restore, PerfError> {
    restore_with(&disk_config(scratch, name, ram, ""), false)
}

fn restore_with(config: &VmConfig, tail: bool) -> Result<Restore, PerfError> {
    let t0 = Instant::now();
    let machine = Machine::build(config)?;
    let built = Instant::now();
    let vm = machine.spawn()?;
    let mut status = vm.wait_for(LIMIT, "the restored process to run", |s| {
        s.boot_kind == Some(BootKind::Restored) && s.running.is_some() && s.of(Operation::Restore).next().is_some()
    })?;
    // A lazy restore ends once nothing is away, when the CPU first idles, or at the next
    // write-out: a workload that leaves some of its memory untouched and never idles does
    // none of these soon, hence the bound.
    if tail && status.left_pages_unrestored() {
        if let Ok(s) =
            vm.wait_for(TAIL_LIMIT, "the lazy restore's end", |s| s.of(Operation::RestoreTail).next().is_some())
        {
            status = s;
        }
    }
    let _ = vm.stop();
    let record = status.of(Operation::Restore).last().cloned().ok_or(PerfError::Missing("restore"))?;
    let tail = status.of(Operation::RestoreTail).last().cloned();
    let running = status.running.ok_or(PerfError::Missing("running event"))?.at;
    let restore_start = record.at.checked_sub(record.total).unwrap_or(built).max(built);
    let split = CrashToRunning {
        setup: built - t0,
        boot: restore_start - built,
        restore: record.at - restore_start,
        rest: running.saturating_duration_since(record.at),
        total: running - t0,
    };
    Ok(Restore { record, tail, crash_to_running: split })
}

/// `kv`'s operations per second over `run`, with a write-out every `checkpoint_ms`, on a
/// fresh image; and the write-outs it saw.
pub fn kv_throughput(scratch: &Scratch, checkpoint_ms: Option<u64>, run: Duration) -> Result<(f64, u64), PerfError> {
    let vm = boot(scratch, "kv", Workload::Kv { checkpoint_ms }, PersistenceModel::Eadr)?;
    let sample = |vm: &RunningMachine| {
        vm.controller().with_status(|s| {
            let kv = s.workloads.get("kv")?;
            Some((kv.progress, kv.updated, s.count(Operation::WriteOut)))
        })
    };
    let (p0, t0, w0) = sample(&vm).ok_or(PerfError::Missing("kv heartbeat"))?;
    thread::sleep(run);
    let (p1, t1, w1) = sample(&vm).ok_or(PerfError::Missing("kv heartbeat"))?;
    let _ = vm.stop();
    let secs = (t1 - t0).as_secs_f64();
    if p1 <= p0 || secs <= 0.0 {
        return Err(PerfError::Missing("kv progress"));
    }
    Ok(((p1 - p0) as f64 / secs, w1 - w0))
}

/// What the hardware allows for copying `bytes`: the host's memcpy, and memcpy plus a
/// `clflushopt` of every line and an `sfence` (what makes the copy durable on ADR).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub bytes: u64,
    pub memcpy: Duration,
    pub memcpy_flush: Duration,
}

/// [`Limit`] of `bytes`, the median of `runs` copies between two buffers of that size
/// (touched first, so that page faults are not counted: the guest's RAM is mapped too).
pub fn copy_limit(bytes: u64, runs: usize) -> Limit {
    let len = usize::try_from(bytes).unwrap_or(usize::MAX).max(64);
    let src = vec![0x5au8; len];
    let mut dst = vec![1u8; len];
    let mut plain = Vec::with_capacity(runs);
    let mut flushed = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        plain.push(t.elapsed());
        let t = Instant::now();
        dst.copy_from_slice(&src);
        flush(&dst);
        flushed.push(t.elapsed());
    }
    Limit { bytes, memcpy: median(&mut plain), memcpy_flush: median(&mut flushed) }
}

/// Writes back every cache line of `bytes` (`clflushopt`, or `clflush` without it), then
/// `sfence`.
fn flush(bytes: &[u8]) {
    // CPUID leaf 7, EBX bit 23: CLFLUSHOPT (std's detection macro does not know it).
    let has_clflushopt = core::arch::x86_64::__cpuid_count(7, 0).ebx & (1 << 23) != 0;
    for line in bytes.chunks(64) {
        let p = line.as_ptr();
        // SAFETY: `p` points into a live slice; a flush changes no memory contents, and
        // `clflushopt` runs only where the CPU has it.
        unsafe {
            if has_clflushopt {
                core::arch::asm!("clflushopt [{}]", in(reg) p, options(nostack, preserves_flags));
            } else {
                core::arch::x86_64::_mm_clflush(p);
            }
        }
    }
    // SAFETY: a store fence has no preconditions.
    unsafe { core::arch::x86_64::_mm_sfence() };
}

/// The median of `d` (sorted in place); zero for none.
pub fn median(d: &mut [Duration]) -> Duration {
    d.sort_unstable();
    if d.is_empty() {
        Duration::ZERO
    } else {
        d[(d.len() - 1) / 2]
    }
}

/// The median of a field of `records`.
pub fn median_of(records: &[OperationRecord], f: impl Fn(&OperationRecord) -> Duration) -> Duration {
    median(&mut records.iter().map(f).collect::<Vec<_>>())
}

/// The copy and flush time of an operation (its copy and flush phases).
pub fn copy_time(r: &OperationRecord) -> Duration {
    r.phases[2] + r.phases[4]
}

/// The time an operation spent in disk requests (`plate_store=disk`; zero in NVM).
pub fn io_time(r: &OperationRecord) -> Duration {
    r.phases[nvram::control::IO_PHASE]
}

/// The median bytes `records` copied.
pub fn median_copied(records: &[OperationRecord]) -> u64 {
    let mut v: Vec<u64> = records.iter().map(|r| r.report.copied_bytes).collect();
    v.sort_unstable();
    v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(0)
}

/// Milliseconds, as a float.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_limit_measures_both_copies() {
        let limit = copy_limit(1 << 20, 3);
        assert_eq!(limit.bytes, 1 << 20);
        assert!(limit.memcpy > Duration::ZERO && limit.memcpy_flush > Duration::ZERO);
    }

    #[test]
    fn workloads_have_the_sizes_asked() {
        assert_eq!(Workload::dirtying(64 << 20).ram(), 512 << 20);
        assert_eq!(Workload::dirtying(1 << 20).ram(), 256 << 20);
        assert_eq!(
            Workload::plates(1024),
            Workload::Memtouch { processes: 1, regions: 1018, region_kib: 4, dirty_kib: 64, ms: 50 }
        );
        let big = Workload::dirtying(64 << 20);
        assert_eq!(
            big,
            Workload::Memtouch { processes: 2, regions: 16, region_kib: 2048, dirty_kib: 32 << 10, ms: 50 }
        );
        assert_eq!(big.cmdline(), "apps=memtouch,memtouch memtouch=16,2048,32768 memtouch_ms=50");
        assert_eq!(big.ram(), 512 << 20);
        assert!(matches!(Workload::dirtying(32 << 20), Workload::Memtouch { processes: 1, region_kib: 2048, .. }));
        assert_eq!(PAPER_MEMTOUCH.cmdline(), "apps=memtouch memtouch=450,18,1400 memtouch_ms=100");
        assert_eq!(Workload::Kv { checkpoint_ms: Some(1) }.cmdline(), "apps=kv checkpoint_ms=1");
        assert_eq!(median(&mut []), Duration::ZERO);
    }
}
