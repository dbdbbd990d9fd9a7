//! What checkpoints cost a running system, in host wall time:
//!
//! - crash to running: from the start of a new VMM on a crashed image (`Machine::build`)
//!   to the guest's report that the first restored process is entered, split into VMM
//!   set-up, kernel boot, restore and the rest;
//! - `kv`'s throughput with no periodic write-outs and with one every 100, 10 and 1 ms
//!   (criterion's "time" is the time per `kv` operation; the table gives operations per
//!   second and the ratio to none);
//! - the checkpoint round trip through the controller (as the control socket does it)
//!   against the write-out the guest measured.
//!
//! `cargo bench --bench running` (a few minutes on 2 cores); `RUNNING=crash,kv,ctl` picks.

mod suite;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use devices::PersistenceModel;
use vmm::perf::{self, ms, Workload, LIMIT};

fn wanted(group: &str) -> bool {
    std::env::var("RUNNING").map_or(true, |v| v.split(',').any(|g| g == group))
}

fn crash_to_running(c: &mut Criterion) {
    if !wanted("crash") {
        return;
    }
    let (_dir, scratch) = suite::scratch();
    let workload = Workload::Kv { checkpoint_ms: None };
    let vm = perf::boot(&scratch, "crash", workload, PersistenceModel::Eadr).expect("boot kv");
    vm.controller().checkpoint(LIMIT).expect("a write-out");
    drop(vm); // a power failure
    let image = scratch.image("crash");
    let mut kept = Vec::new();
    let mut group = suite::group(c, "crash to running", Duration::from_millis(60));
    group.bench_function("kv, new VMM to first restored process", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    let r = perf::restore_once(&scratch, &image, workload.ram(), PersistenceModel::Eadr, "", false);
                    let split = r.expect("a restore").crash_to_running;
                    kept.push(split);
                    split.total
                })
                .sum()
        })
    });
    group.finish();
    let median =
        |f: &dyn Fn(&perf::CrashToRunning) -> Duration| perf::median(&mut kept.iter().map(f).collect::<Vec<_>>());
    eprintln!("\n| crash to running, n = {} | median ms |\n|---|---|", kept.len());
    for (what, d) in [
        ("VMM set-up", median(&|s| s.setup)),
        ("kernel boot to restore", median(&|s| s.boot)),
        ("restore", median(&|s| s.restore)),
        ("restore done to the process entered", median(&|s| s.rest)),
        ("total", median(&|s| s.total)),
    ] {
        eprintln!("| {what} | {:.2} |", ms(d));
    }
}

fn checkpoint_cost(c: &mut Criterion) {
    if !wanted("kv") {
        return;
    }
    let (_dir, scratch) = suite::scratch();
    let run = Duration::from_millis(1500);
    let mut rows = Vec::new();
    let mut group = suite::group(c, "kv with periodic write-outs", Duration::from_nanos(200));
    group.warm_up_time(Duration::from_nanos(1)).measurement_time(Duration::from_nanos(1));
    for interval in [None, Some(100u64), Some(10), Some(1)] {
        let name = interval.map_or("none".to_string(), |ms| format!("every {ms} ms"));
        let mut kept = Vec::new();
        group.bench_function(BenchmarkId::from_parameter(&name), |b| {
            b.iter_custom(|iters| {
                let (ops, write_outs) = perf::kv_throughput(&scratch, interval, run).expect("a kv run");
                kept.push((ops, write_outs));
                Duration::from_secs_f64(iters as f64 / ops)
            })
        });
        rows.push((name, kept));
    }
    group.finish();
    let none = median_ops(&rows[0].1);
    eprintln!("\n| write-outs | runs | kv ops/s, median | write-outs per s | of none |\n|---|---|---|---|---|");
    for (name, kept) in &rows {
        let ops = median_ops(kept);
        let per_s = kept.iter().map(|k| k.1 as f64).sum::<f64>() / kept.len().max(1) as f64 / run.as_secs_f64();
        eprintln!("| {name} | {} | {:.2} M | {per_s:.0} | {:.3} |", kept.len(), ops / 1e6, ops / none);
    }
}

fn median_ops(kept: &[(f64, u64)]) -> f64 {
    let mut v: Vec<f64> = kept.iter().map(|k| k.0).collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2).copied().unwrap_or(f64::NAN)
}

fn ctl_round_trip(c: &mut Criterion) {
    if !wanted("ctl") {
        return;
    }
    let (_dir, scratch) = suite::scratch();
    let vm =
        perf::boot(&scratch, "ctl", Workload::Kv { checkpoint_ms: None }, PersistenceModel::Eadr).expect("boot kv");
    let controller = vm.controller().clone();
    controller.checkpoint(LIMIT).expect("the first write-out");
    let (mut guest, mut host) = (Vec::new(), Vec::new());
    let mut group = suite::group(c, "checkpoint round trip", Duration::from_millis(2));
    group.bench_function("controller checkpoint, host wall time", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| {
                    std::thread::sleep(Duration::from_millis(20));
                    let t = std::time::Instant::now();
                    let r = controller.checkpoint(LIMIT).expect("a write-out");
                    let d = t.elapsed();
                    guest.push(r.total);
                    host.push(d);
                    d
                })
                .sum()
        })
    });
    group.finish();
    let extra: Vec<Duration> = host.iter().zip(&guest).map(|(h, g)| h.saturating_sub(*g)).collect();
    eprintln!(
        "\ncheckpoint round trip (n = {}): median {:.3} ms, guest write-out {:.3} ms, difference {:.3} ms",
        host.len(),
        ms(perf::median(&mut host)),
        ms(perf::median(&mut guest)),
        ms(perf::median(&mut extra.clone()))
    );
}

criterion_group!(benches, crash_to_running, checkpoint_cost, ctl_round_trip);
criterion_main!(benches);
