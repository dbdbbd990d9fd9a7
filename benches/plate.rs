//! The paper's evaluation, reproduced: a guest with 456 plates of about 9 MB in all, whose
//! workload dirties 1.4 MB per interval; the latency of a write-out (checkpoint) and of the
//! restore after a crash, as the guest kernel measures them (TSC, converted by the VMM).
//!
//! The paper (Tender on QEMU, 256 MB guest, 456 plates, 8.4 MB plated, 1.4 MB changed)
//! reports a write-out of about 11.5 ms and a restore of about 60.6 ms.
//!
//! `cargo bench --bench plate`; the copier is the copy engine unless `PLATE_COPY=cpu`;
//! `PLATE_PREFAULT=all` maps the whole image ahead, as `vmm boot --prefault` does;
//! `PLATE_BOOKKEEPING=ring0` keeps the guest's bookkeeping in kernel mode (by default it
//! runs at CPL 3, natively under PVM).
//! After criterion's figures, a report: each operation's median, phase by phase, beside
//! the paper's, with the share of the guest kernel's bookkeeping (emulated under PVM).

use std::thread;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use devices::control::OperationRecord;
use nvram::control::{BootKind, Operation};
use vmm::harness::{crash, start, wait};
use vmm::quantile::quantile;
use vmm::{ConsoleOutput, VmConfig};

/// The longest wait for anything the guest does.
const LIMIT: Duration = Duration::from_secs(60);

/// The paper's figures (Tender on QEMU): write-out and restore, in ms.
const PAPER_WRITE_OUT_MS: f64 = 11.5;
const PAPER_RESTORE_MS: f64 = 60.6;

/// Median of each phase and of the totals of `records`, in ms.
fn medians(records: &[OperationRecord]) -> ([f64; 6], f64, u64) {
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        quantile(&v, 0.5).unwrap_or(f64::NAN)
    };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let phases = std::array::from_fn(|i| median(records.iter().map(|r| ms(r.phases[i])).collect()));
    let total = median(records.iter().map(|r| ms(r.total)).collect());
    let mut copied: Vec<u64> = records.iter().map(|r| r.report.copied_bytes).collect();
    copied.sort();
    (phases, total, quantile(&copied, 0.5).unwrap_or(0))
}

/// One row of the report.
fn report_row(what: &str, paper: Option<f64>, records: &[OperationRecord]) {
    if records.is_empty() {
        return;
    }
    let (phases, total, copied) = medians(records);
    let copier = <&str>::from(records[0].report.copier);
    let copy = phases[2] + phases[4];
    let bookkeeping = total - copy;
    let paper = paper.map_or("-".to_string(), |p| format!("{p} ms"));
    let phases: Vec<String> = nvram::control::PHASES
        .iter()
        .zip(phases)
        .filter(|(_, ms)| *ms > 0.0)
        .map(|(name, ms)| format!("{name} {ms:.2}"))
        .collect();
    eprintln!(
        "| {what} | {copier} | {} | {paper} | {total:.2} ms | {copy:.2} ms ({:.1} MB) | {bookkeeping:.2} ms ({:.0}%) | {} |",
        records.len(),
        copied as f64 / 1e6,
        100.0 * bookkeeping / total,
        phases.join(", ")
    );
}

fn report_header() {
    eprintln!(
        "| operation | copier | n | paper | ours, median | copy + flush | bookkeeping (share) | phases, median ms |"
    );
    eprintln!("|---|---|---|---|---|---|---|---|");
}

/// The paper's configuration: 450 regions of 18 KiB (plus the stacks, tables and page-table
/// pools: 456 plates, 9.2 MB), 1400 KiB dirtied every 100 ms.
fn paper_cmdline() -> String {
    format!("apps=memtouch memtouch=450,18,1400 memtouch_ms=100 {}", copier())
}

/// The copier and bookkeeping items of the command line, which every boot needs (restores
/// too).
fn copier() -> String {
    format!(
        "plate_copy={} bookkeeping={}",
        std::env::var("PLATE_COPY").unwrap_or_else(|_| "engine".into()),
        std::env::var("PLATE_BOOKKEEPING").unwrap_or_else(|_| "ring3".into())
    )
}

fn config(image: &std::path::Path, console: &std::path::Path, cmdline: &str) -> VmConfig {
    let mut config = VmConfig::new(image);
    config.mem_size = Some(256 << 20);
    config.cmdline = cmdline.into();
    config.console = ConsoleOutput::File(console.into());
    if std::env::var("PLATE_PREFAULT").is_ok_and(|v| v == "all") {
        config.prefault = vmm::Prefault::All;
    }
    config
}

fn write_outs(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let (image, console) = (dir.path().join("paper.img"), dir.path().join("console.log"));
    let vm = start(&config(&image, &console, &paper_cmdline()));
    let controller = vm.controller().clone();
    // Let memtouch map its regions; the first requested write-out plate-ifies them.
    wait(&vm, LIMIT, "memtouch's regions", |s| s.workloads.get("memtouch").is_some_and(|w| w.progress >= 2));
    let plateification = controller.checkpoint(LIMIT).expect("the plate-ification");
    let mut group = c.benchmark_group("paper");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.bench_function("write-out, 456 plates, 1.4 MB dirtied per 100 ms", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                thread::sleep(Duration::from_millis(100));
                total += controller.checkpoint(LIMIT).expect("a write-out").total;
            }
            total
        })
    });
    group.finish();
    // The write-outs measured: those after the plate-ification, the periodic ones between.
    let write_outs: Vec<OperationRecord> = controller
        .snapshot()
        .of(Operation::WriteOut)
        .filter(|r| r.report.generation > plateification.report.generation)
        .cloned()
        .collect();
    crash(vm);
    let mut restores = Vec::new();

    let mut group = c.benchmark_group("paper");
    group.sample_size(10).measurement_time(Duration::from_secs(10));
    group.bench_function("restore after a crash, 456 plates", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let vm = start(&config(&image, &console, &format!("memtouch_ms=100 {}", copier())));
                let status = wait(&vm, LIMIT, "the restore", |s| s.boot_kind == Some(BootKind::Restored));
                let restore = status.of(Operation::Restore).last().cloned().unwrap();
                total += restore.total;
                restores.push(restore);
                crash(vm);
            }
            total
        })
    });
    group.finish();

    let plates = plateification.report.plates;
    eprintln!(
        "\nThe paper's configuration: {plates} plates, {:.1} MB plated; medians, guest-measured:\n",
        plateification.report.plated_bytes as f64 / 1e6
    );
    report_header();
    report_row("plate-ification (first write-out of the regions)", None, std::slice::from_ref(&plateification));
    report_row("write-out, 1.4 MB dirtied per 100 ms", Some(PAPER_WRITE_OUT_MS), &write_outs);
    report_row("restore after a crash", Some(PAPER_RESTORE_MS), &restores);
}

criterion_group!(benches, write_outs);
criterion_main!(benches);
