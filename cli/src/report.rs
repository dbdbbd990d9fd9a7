//! `vmm report`: the paper's evaluation re-run here within a minute, side by side with the
//! paper, each figure also as a ratio to what the hardware allows (the host's memcpy plus
//! `clflushopt` and `sfence` of the same bytes, measured in the same run), the issue's
//! targets beside their goals, and SVG charts (`report/charts.rs`). `--json` for scripts;
//! `--from FILE --markdown` renders a saved JSON report as the README's Performance section.

mod charts;
mod render;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use devices::control::OperationRecord;
use devices::PersistenceModel;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use vmm::perf::{self, ms, paper, Workload};

use crate::args::ReportArgs;

/// One operation of the paper's table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub operation: String,
    pub paper_volatile_ms: f64,
    pub paper_nvm_ms: f64,
    /// Median, guest-measured.
    pub ours_ms: f64,
    pub n: usize,
    pub copied_bytes: u64,
    pub copy_ms: f64,
    pub limit_memcpy_ms: f64,
    pub limit_memcpy_flush_ms: f64,
    pub ratio_to_paper_nvm: f64,
    /// Our whole operation over the memcpy-plus-flush limit of the bytes it copied.
    pub ratio_to_limit: f64,
    /// Our copy alone over the same limit.
    pub copy_ratio_to_limit: f64,
}

/// One operation of the paper's main comparison: the volatile plate function (save areas on
/// the virtio disk, `plate_store=disk`) against the NVM one, each split into storage I/O (the
/// time in disk requests) and the rest, as the paper splits them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreRow {
    pub operation: String,
    pub paper_volatile_ms: f64,
    pub paper_nvm_ms: f64,
    /// Ours in NVM (medians, guest-measured): no storage I/O there.
    pub nvm_ms: f64,
    /// Ours on the disk, all included.
    pub disk_ms: f64,
    /// Of which in disk requests.
    pub disk_io_ms: f64,
    pub disk_rest_ms: f64,
    pub disk_copied_bytes: u64,
    pub n: usize,
}

/// One point of the write-out-against-dirty-bytes curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirtyPoint {
    pub dirty_bytes: u64,
    pub copied_bytes: u64,
    pub write_out_ms: f64,
    pub copy_ms: f64,
    pub limit_memcpy_flush_ms: f64,
}

/// `kv`'s throughput with write-outs every `interval_ms` (none: `null`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThroughputPoint {
    pub interval_ms: Option<u64>,
    pub ops_per_s: f64,
    pub ratio_to_none: f64,
    pub write_outs: u64,
}

/// Crash to running, host wall time, medians.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CrashToRunning {
    pub n: usize,
    pub setup_ms: f64,
    pub boot_ms: f64,
    pub restore_ms: f64,
    pub rest_ms: f64,
    pub total_ms: f64,
}

/// What the save areas' content sums cost a write-out (`perf::sums_cost`): pairs of boots
/// with and without them (`sums=off`), in turn, medians.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SumsCost {
    pub pairs: usize,
    pub write_outs: usize,
    pub with_ms: f64,
    pub without_ms: f64,
    pub with_copied_bytes: u64,
    pub without_copied_bytes: u64,
    /// The copy phase's medians (copy + flush), where the sums are computed.
    pub with_copy_ms: f64,
    pub without_copy_ms: f64,
    /// What the sums cost a write-out: `(with_copy_ms - without_copy_ms) / without_ms`. The
    /// copier computes them inside the copy phase, and the other phases run the same code
    /// either way, so their medians differ only by the host's noise, which between two boots
    /// here is larger than the sums (the whole write-out's ratio is `total_cost`).
    pub cost: f64,
    /// `with_ms / without_ms - 1`.
    pub total_cost: f64,
}

/// The lazy restore (`restore=lazy`, the default), medians of restores of the paper's
/// configuration made in turn with the eager ones of the table's restore row.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LazyRestore {
    pub n: usize,
    /// Until the processes run, and what it copied then (the kernel's plates).
    pub until_running_ms: f64,
    pub copied_bytes: u64,
    /// Lazy restores whose end (every page back) came while watched, and its median: from
    /// the restore's start (the pages come back at first touches, the rest when the CPU
    /// first idles); what was brought back, and the copies' time of it.
    pub tails: usize,
    pub every_page_back_ms: Option<f64>,
    pub brought_back_bytes: u64,
    pub tail_copy_ms: f64,
}

/// A target of the issue and our figure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    pub target: String,
    pub goal: String,
    pub ours: String,
    pub met: bool,
}

/// The machine the report ran on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
    pub pvm: bool,
    pub load_average: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub quick: bool,
    pub host: Host,
    pub plates: u32,
    pub plated_bytes: u64,
    pub rows: Vec<Row>,
    /// The volatile plate function beside the NVM one (none in a report made before it).
    #[serde(default)]
    pub stores: Vec<StoreRow>,
    /// Plates and bytes of the paper's configuration on the disk.
    #[serde(default)]
    pub disk_plates: u32,
    #[serde(default)]
    pub disk_plated_bytes: u64,
    pub crash_to_running: CrashToRunning,
    /// Controller checkpoint round trip (host wall time) and the guest's write-out, medians.
    pub round_trip_ms: f64,
    pub round_trip_write_out_ms: f64,
    /// None in a report made before it was measured.
    #[serde(default)]
    pub sums: Option<SumsCost>,
    /// The restore lazily and eagerly (None in a report made before `restore=lazy`).
    #[serde(default)]
    pub lazy: Option<LazyRestore>,
    pub dirty_sweep: Vec<DirtyPoint>,
    pub throughput: Vec<ThroughputPoint>,
    pub targets: Vec<Target>,
    /// The SVG files written.
    pub charts: Vec<String>,
}

pub fn run(args: ReportArgs) -> Result<ExitCode> {
    if let Some(from) = &args.from {
        let text = std::fs::read_to_string(from).with_context(|| format!("cannot read {}", from.display()))?;
        let report: Report = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a report of `vmm report --json`", from.display()))?;
        print(&report, &args);
        return Ok(ExitCode::SUCCESS);
    }
    let dir = tempfile_dir()?;
    let measured = measure(&perf::Scratch { dir: dir.clone() }, args.quick);
    let _ = std::fs::remove_dir_all(&dir);
    let mut report = measured.context("a measurement failed")?;
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        report.charts = charts::write_all(&report, out)?;
    }
    print(&report, &args);
    Ok(ExitCode::SUCCESS)
}

fn print(report: &Report, args: &ReportArgs) {
    if args.json {
        println!("{}", serde_json::to_string_pretty(report).unwrap_or_default());
    } else if args.markdown {
        print!("{}", render::markdown(report));
    } else {
        print!("{}", render::text(report));
    }
}

/// A scratch directory for the images, removed at the end.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("vmm-report-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Every measurement, under a progress bar.
fn measure(scratch: &perf::Scratch, quick: bool) -> Result<Report, perf::PerfError> {
    let (write_outs, restores, sweep, intervals, kv_run): (usize, usize, &[u64], &[Option<u64>], u64) = if quick {
        (3, 2, &[64 << 10, 1 << 20], &[None, Some(10)], 400)
    } else {
        (15, 7, &[64 << 10, 1 << 20, 8 << 20, 32 << 20], &[None, Some(100), Some(10), Some(1)], 2000)
    };
    let sums_pairs = if quick { 1 } else { 4 };
    let steps = 6 + sweep.len() + intervals.len();
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );

    bar.set_message("the paper's configuration: write-outs");
    let vm = perf::boot(scratch, "paper", perf::PAPER_MEMTOUCH, PersistenceModel::Eadr)?;
    let w = perf::write_outs(&vm, write_outs, Duration::from_millis(120))?;
    drop(vm); // a power failure
    bar.inc(1);

    bar.set_message("the paper's configuration: restores, lazy and eager in turn");
    let image = scratch.image("paper");
    let (mut restored, mut eager) = (Vec::new(), Vec::new());
    for _ in 0..restores {
        let ram = perf::PAPER_MEMTOUCH.ram();
        restored.push(perf::restore_once(scratch, &image, ram, PersistenceModel::Eadr, "", true)?);
        eager.push(perf::restore_once(scratch, &image, ram, PersistenceModel::Eadr, "restore=eager", false)?.record);
    }
    bar.inc(1);

    let rows = vec![
        row("plate-ification", paper::PLATEIFICATION_MS, std::slice::from_ref(&w.plateification)),
        row("write-out", paper::WRITE_OUT_MS, &w.write_outs),
        // The eager restore, as the paper's copies every byte before the processes run; the
        // lazy one has its own figures (`LazyRestore`), and the target.
        row("restore", paper::RESTORE_MS, &eager),
    ];
    let lazy = lazy_restore(&restored);
    let med = |f: &dyn Fn(&perf::CrashToRunning) -> Duration| {
        ms(perf::median(&mut restored.iter().map(|r| f(&r.crash_to_running)).collect::<Vec<_>>()))
    };
    let crash_to_running = CrashToRunning {
        n: restored.len(),
        setup_ms: med(&|s| s.setup),
        boot_ms: med(&|s| s.boot),
        restore_ms: med(&|s| s.restore),
        rest_ms: med(&|s| s.rest),
        total_ms: med(&|s| s.total),
    };
    bar.set_message("the paper's configuration, plates on the disk: write-outs");
    let vm = perf::boot_on_disk(scratch, "paper", perf::PAPER_MEMTOUCH)?;
    let d = perf::write_outs(&vm, write_outs, Duration::from_millis(120))?;
    drop(vm); // a power failure: volatile RAM is gone
    bar.inc(1);
    bar.set_message("the paper's configuration, plates on the disk: restores");
    let mut disk_restores = Vec::new();
    for _ in 0..restores {
        disk_restores.push(perf::restore_once_on_disk(scratch, "paper", perf::PAPER_MEMTOUCH.ram())?.record);
    }
    bar.inc(1);
    let stores = vec![
        store_row("plate-ification", &rows[0], std::slice::from_ref(&d.plateification)),
        store_row("write-out", &rows[1], &d.write_outs),
        store_row("restore", &rows[2], &disk_restores),
    ];
    bar.set_message("4 MB write-outs with and without the content sums");
    let [with, without] = perf::sums_cost(scratch, sums_pairs, if quick { 3 } else { 10 })?;
    let (with_ms, without_ms) = (ms(perf::median_of(&with, |r| r.total)), ms(perf::median_of(&without, |r| r.total)));
    let with_copy_ms = ms(perf::median_of(&with, perf::copy_time));
    let without_copy_ms = ms(perf::median_of(&without, perf::copy_time));
    let sums = SumsCost {
        pairs: sums_pairs,
        write_outs: with.len(),
        with_ms,
        without_ms,
        with_copied_bytes: perf::median_copied(&with),
        without_copied_bytes: perf::median_copied(&without),
        with_copy_ms,
        without_copy_ms,
        cost: (with_copy_ms - without_copy_ms) / without_ms,
        total_cost: with_ms / without_ms - 1.0,
    };
    bar.inc(1);
    let round_trip_ms = ms(perf::median(&mut w.round_trips.clone()));
    let round_trip_write_out_ms = ms(perf::median_of(&w.write_outs, |r| r.total));

    let mut dirty_sweep = Vec::new();
    for &dirty in sweep {
        bar.set_message(format!("write-out of {} KiB dirtied", dirty >> 10));
        let vm = perf::boot(scratch, "sweep", Workload::dirtying(dirty), PersistenceModel::Eadr)?;
        let w = perf::write_outs(&vm, if quick { 2 } else { 5 }, Duration::from_millis(60))?;
        drop(vm);
        let copied = perf::median_copied(&w.write_outs);
        dirty_sweep.push(DirtyPoint {
            dirty_bytes: dirty,
            copied_bytes: copied,
            write_out_ms: ms(perf::median_of(&w.write_outs, |r| r.total)),
            copy_ms: ms(perf::median_of(&w.write_outs, perf::copy_time)),
            limit_memcpy_flush_ms: ms(perf::copy_limit(copied, 5).memcpy_flush),
        });
        bar.inc(1);
    }

    let mut throughput: Vec<ThroughputPoint> = Vec::new();
    for &interval in intervals {
        bar.set_message(format!("kv, write-outs {}", interval.map_or("none".into(), |ms| format!("every {ms} ms"))));
        let (ops, write_outs) = perf::kv_throughput(scratch, interval, Duration::from_millis(kv_run))?;
        let none = throughput.first().map_or(ops, |p| p.ops_per_s);
        throughput.push(ThroughputPoint {
            interval_ms: interval,
            ops_per_s: ops,
            ratio_to_none: ops / none,
            write_outs,
        });
        bar.inc(1);
    }
    bar.set_message("the limit");
    bar.inc(1);
    bar.finish_and_clear();

    let mut report = Report {
        quick,
        host: host(),
        plates: w.plateification.report.plates,
        plated_bytes: w.plateification.report.plated_bytes,
        rows,
        stores,
        disk_plates: d.plateification.report.plates,
        disk_plated_bytes: d.plateification.report.plated_bytes,
        crash_to_running,
        round_trip_ms,
        round_trip_write_out_ms,
        sums: Some(sums),
        lazy: Some(lazy),
        dirty_sweep,
        throughput,
        targets: Vec::new(),
        charts: Vec::new(),
    };
    report.targets = render::targets(&report);
    Ok(report)
}

/// A row of the table: medians of `records` and the limit of their median copied bytes.
fn row(operation: &str, paper: [f64; 2], records: &[OperationRecord]) -> Row {
    let ours_ms = ms(perf::median_of(records, |r| r.total));
    let copy_ms = ms(perf::median_of(records, perf::copy_time));
    let copied_bytes = perf::median_copied(records);
    let limit = perf::copy_limit(copied_bytes, 9);
    let flush_ms = ms(limit.memcpy_flush).max(1e-6);
    Row {
        operation: operation.into(),
        paper_volatile_ms: paper[0],
        paper_nvm_ms: paper[1],
        ours_ms,
        n: records.len(),
        copied_bytes,
        copy_ms,
        limit_memcpy_ms: ms(limit.memcpy),
        limit_memcpy_flush_ms: ms(limit.memcpy_flush),
        ratio_to_paper_nvm: ours_ms / paper[1],
        ratio_to_limit: ours_ms / flush_ms,
        copy_ratio_to_limit: copy_ms / flush_ms,
    }
}

/// The lazy restores' two figures: until the processes run, and until every page is back.
fn lazy_restore(restored: &[perf::Restore]) -> LazyRestore {
    let records: Vec<OperationRecord> = restored.iter().map(|r| r.record.clone()).collect();
    let tails: Vec<OperationRecord> = restored.iter().filter_map(|r| r.tail.clone()).collect();
    LazyRestore {
        n: records.len(),
        until_running_ms: ms(perf::median_of(&records, |r| r.total)),
        copied_bytes: perf::median_copied(&records),
        tails: tails.len(),
        every_page_back_ms: (!tails.is_empty()).then(|| ms(perf::median_of(&tails, |r| r.total))),
        brought_back_bytes: perf::median_copied(&tails),
        tail_copy_ms: ms(perf::median_of(&tails, perf::copy_time)),
    }
}

/// A row of the volatile-against-NVM table: `nvm`, the NVM row of the same operation, and
/// the disk's `records`.
fn store_row(operation: &str, nvm: &Row, records: &[OperationRecord]) -> StoreRow {
    let disk_ms = ms(perf::median_of(records, |r| r.total));
    let disk_io_ms = ms(perf::median_of(records, perf::io_time));
    StoreRow {
        operation: operation.into(),
        paper_volatile_ms: nvm.paper_volatile_ms,
        paper_nvm_ms: nvm.paper_nvm_ms,
        nvm_ms: nvm.ours_ms,
        disk_ms,
        disk_io_ms,
        disk_rest_ms: ms(perf::median_of(records, |r| r.total.saturating_sub(perf::io_time(r)))),
        disk_copied_bytes: perf::median_copied(records),
        n: records.len(),
    }
}

/// What this machine is.
fn host() -> Host {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_else(|| "unknown".into());
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let load_average = read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    Host {
        cpu,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel,
        pvm: Path::new("/sys/module/kvm_pvm").exists(),
        load_average,
    }
}
