//! How the plate function's costs grow, each figure beside the limit of the same run:
//!
//! - write-out latency against the bytes dirtied (64 KiB to 64 MiB: above 32 MiB in two
//!   processes, since one maps at most 58 MiB, its page-table pool) and against the number
//!   of plates (16 to 1,024);
//! - the same write-out (the paper's configuration) under eADR and ADR;
//! - restore latency against the bytes plated (1 to 32 MiB), lazily (until the processes
//!   run, and until every page is back) and eagerly.
//!
//! Guest-measured (TSC) figures through criterion's custom timing; after each group, a table
//! of medians with the host's memcpy and memcpy + `clflushopt` + `sfence` of exactly the
//! bytes each operation copied (`vmm::perf::copy_limit`), and the ratios to them.
//!
//! `cargo bench --bench scaling` (a few minutes on 2 cores); `SCALING=dirty,plates,model,restore`
//! picks groups.

mod suite;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use devices::control::OperationRecord;
use devices::PersistenceModel;
use vmm::perf::{self, Workload, LIMIT};

/// The gap between write-outs: longer than memtouch's interval, so that each write-out
/// copies what one interval dirtied.
const GAP: Duration = Duration::from_millis(60);

fn wanted(group: &str) -> bool {
    std::env::var("SCALING").map_or(true, |v| v.split(',').any(|g| g == group))
}

/// Write-outs of `workload`, one criterion point; the records come back for the table.
fn write_out_point(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    scratch: &perf::Scratch,
    id: BenchmarkId,
    workload: Workload,
    model: PersistenceModel,
) -> Vec<OperationRecord> {
    let vm = perf::boot(scratch, "scaling", workload, model).expect("boot the workload");
    let controller = vm.controller().clone();
    controller.checkpoint(LIMIT).expect("the plate-ification");
    let mut kept = Vec::new();
    group.bench_function(id, |b| {
        b.iter_custom(|iters| {
            suite::guest_time(iters, &mut kept, || {
                std::thread::sleep(GAP);
                controller.checkpoint(LIMIT).expect("a write-out")
            })
        })
    });
    drop(vm);
    kept
}

fn dirty_bytes(c: &mut Criterion) {
    if !wanted("dirty") {
        return;
    }
    let (_dir, scratch) = suite::scratch();
    let mut rows = Vec::new();
    let mut group = suite::group(c, "write-out vs dirty bytes", Duration::from_millis(2));
    // 64 MiB in two processes (`Workload::dirtying`): one maps at most 58 MiB.
    for kib in [64u64, 1024, 8 << 10, 32 << 10, 64 << 10] {
        let id = BenchmarkId::from_parameter(format!("{kib} KiB"));
        let records = write_out_point(&mut group, &scratch, id, Workload::dirtying(kib << 10), PersistenceModel::Eadr);
        rows.push((format!("{kib} KiB dirtied"), records));
    }
    group.finish();
    suite::table(&rows);
}

fn plate_count(c: &mut Criterion) {
    if !wanted("plates") {
        return;
    }
    let (_dir, scratch) = suite::scratch();
    let mut rows = Vec::new();
    let mut group = suite::group(c, "write-out vs plates", Duration::from_millis(2));
    for plates in [16u64, 64, 256, 1024] {
        let id = BenchmarkId::from_parameter(format!("{plates} plates"));
        let records = write_out_point(&mut group, &scratch, id, Workload::plates(plates), PersistenceModel::Eadr);
        rows.push((format!("{plates} plates, 64 KiB dirtied"), records));
    }
    group.finish();
    suite::table(&rows);
}

fn persistence_model(c: &mut Criterion) {
    if !wanted("model") {
        return;
    }
    let (_dir, scratch) = suite::scratch();
    let mut rows = Vec::new();
    let mut group = suite::group(c, "paper write-out by persistence model", Duration::from_millis(2));
    for (name, model) in [("eadr", PersistenceModel::Eadr), ("adr", PersistenceModel::Adr)] {
        let id = BenchmarkId::from_parameter(name);
        let records = write_out_point(&mut group, &scratch, id, perf::PAPER_MEMTOUCH, model);
        rows.push((format!("paper's configuration, {name}"), records));
    }
    group.finish();
    suite::table(&rows);
}

fn restore_vs_plated(c: &mut Criterion) {
    if !wanted("restore") {
        return;
    }
    let (_dir, scratch) = suite::scratch();
    let mut rows = Vec::new();
    let mut group = suite::group(c, "restore vs plated bytes", Duration::from_millis(5));
    // Up to 32 MiB: one process maps at most 58 MiB (its page-table pool), guard pages included.
    for kib in [1024u64, 8 << 10, 32 << 10] {
        let workload = Workload::dirtying(kib << 10);
        let vm = perf::boot(&scratch, "restore", workload, PersistenceModel::Eadr).expect("boot the workload");
        vm.controller().checkpoint(LIMIT).expect("the plate-ification");
        drop(vm); // a power failure
        let image = scratch.image("restore");
        // Until the processes run: lazily (the default, the user spaces left in their save
        // areas) and eagerly (every byte copied first).
        for (mode, cmdline) in [("lazy", ""), ("eager", "restore=eager")] {
            let (mut kept, mut tails) = (Vec::new(), Vec::new());
            group.bench_function(BenchmarkId::from_parameter(format!("{kib} KiB plated, {mode}")), |b| {
                b.iter_custom(|iters| {
                    suite::guest_time(iters, &mut kept, || {
                        let r =
                            perf::restore_once(&scratch, &image, workload.ram(), PersistenceModel::Eadr, cmdline, true);
                        let r = r.expect("a restore");
                        tails.extend(r.tail);
                        r.record
                    })
                })
            });
            rows.push((format!("restore={mode}, {kib} KiB plated by memtouch"), kept));
            if !tails.is_empty() {
                // From the restore's start until every page is back (the brought-back bytes
                // beside their limit).
                rows.push((format!("restore={mode}, {kib} KiB plated, every page back"), tails));
            }
        }
    }
    group.finish();
    suite::table(&rows);
}

criterion_group!(benches, dirty_bytes, plate_count, persistence_model, restore_vs_plated);
criterion_main!(benches);
