//! What the benchmarks of the suite share (one copy, `mod suite;` in each): a scratch
//! directory, criterion groups sized so that a point takes seconds, the guest's figures
//! fed to criterion's custom timing, and a table of each figure beside the limit of the
//! same run (`vmm::perf::copy_limit`).

#![allow(dead_code)]

use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode};
use devices::control::OperationRecord;
use vmm::perf::{self, ms, Scratch};

/// A scratch directory kept for the bench's life.
pub fn scratch() -> (tempfile::TempDir, Scratch) {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let scratch = Scratch { dir: dir.path().to_path_buf() };
    (dir, scratch)
}

/// A group whose samples are one guest operation each, of `expected` guest time: criterion
/// plans its iterations by the time reported, so the measurement time is set to a few
/// dozen operations, whatever each costs in wall time.
pub fn group<'a>(c: &'a mut Criterion, name: &str, expected: Duration) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(expected.max(Duration::from_micros(100)))
        .measurement_time((expected * 20).max(Duration::from_millis(1)));
    group
}

/// Runs `op` `iters` times, summing the guest-measured totals (criterion's custom timing);
/// every record goes into `kept`.
pub fn guest_time(iters: u64, kept: &mut Vec<OperationRecord>, mut op: impl FnMut() -> OperationRecord) -> Duration {
    (0..iters)
        .map(|_| {
            let r = op();
            let total = r.total;
            kept.push(r);
            total
        })
        .sum()
}

/// The table of `rows` (a name and its records each).
pub fn table(rows: &[(String, Vec<OperationRecord>)]) {
    table_header();
    for (point, records) in rows {
        table_row(point, records);
    }
}

pub fn table_header() {
    eprintln!(
        "\n| point | n | ours, median | copied | copy + flush | memcpy limit | memcpy + flush limit | copy / limit | total / limit |"
    );
    eprintln!("|---|---|---|---|---|---|---|---|---|");
}

/// One row: the medians of `records` beside the limit of their median copied bytes,
/// measured now.
pub fn table_row(point: &str, records: &[OperationRecord]) {
    if records.is_empty() {
        eprintln!("| {point} | 0 | - | - | - | - | - | - | - |");
        return;
    }
    let total = perf::median_of(records, |r| r.total);
    let copy = perf::median_of(records, perf::copy_time);
    let bytes = perf::median_copied(records);
    let limit = perf::copy_limit(bytes, 9);
    eprintln!(
        "| {point} | {} | {:.3} ms | {:.2} MB | {:.3} ms | {:.3} ms | {:.3} ms | {:.1}x | {:.1}x |",
        records.len(),
        ms(total),
        bytes as f64 / 1e6,
        ms(copy),
        ms(limit.memcpy),
        ms(limit.memcpy_flush),
        ms(copy) / ms(limit.memcpy_flush).max(1e-6),
        ms(total) / ms(limit.memcpy_flush).max(1e-6),
    );
}
