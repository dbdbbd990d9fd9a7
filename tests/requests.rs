//! Requests reach the guest at once, and the events the benchmarks time: a checkpoint asked
//! for is served by the request interrupt (not found at a timer tick), `checkpoint_ms=1`
//! gets a timer fine enough for it, and a restored process reports that it runs.

mod common;

use std::time::Duration;

use common::Scratch;
use devices::PersistenceModel;
use nvram::control::{Cause, Operation};
use vmm::perf::{self, Workload, LIMIT};

fn scratch(s: &Scratch) -> perf::Scratch {
    perf::Scratch { dir: s.path("") }
}

#[test]
fn a_requested_checkpoint_is_served_by_its_interrupt() {
    let s = Scratch::new();
    let vm = perf::boot(&scratch(&s), "kv", Workload::Kv { checkpoint_ms: None }, PersistenceModel::Eadr).unwrap();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(50));
        vm.controller().checkpoint(LIMIT).unwrap();
    }
    let causes = vm.controller().with_status(|s| s.write_out_causes);
    let _ = vm.stop();
    assert_eq!(causes[Cause::Boot as usize], 1, "{causes:?}");
    assert_eq!(causes[Cause::RequestInterrupt as usize], 5, "every request by its interrupt: {causes:?}");
    assert_eq!(causes[Cause::RequestAtTick as usize], 0, "{causes:?}");
}

#[test]
fn checkpoints_every_millisecond_get_a_millisecond_timer() {
    let s = Scratch::new();
    let vm = perf::boot(&scratch(&s), "kv", Workload::Kv { checkpoint_ms: Some(1) }, PersistenceModel::Eadr).unwrap();
    let status = vm.wait_for(LIMIT, "periodic write-outs", |s| s.write_out_causes[Cause::Periodic as usize] >= 20);
    let _ = vm.stop();
    assert!(status.is_ok(), "{status:?}");
    assert!(s.read_console().contains("timer at 1000 Hz"), "{}", s.read_console());
}

#[test]
fn a_restored_process_reports_that_it_runs() {
    let s = Scratch::new();
    let sc = scratch(&s);
    let workload = Workload::Kv { checkpoint_ms: None };
    let vm = perf::boot(&sc, "kv", workload, PersistenceModel::Eadr).unwrap();
    let committed = vm.controller().checkpoint(LIMIT).unwrap().report.generation;
    let _ = vm.stop();
    let restore = perf::restore_once(&sc, &sc.image("kv"), workload.ram(), PersistenceModel::Eadr, "", false).unwrap();
    assert_eq!(restore.record.report.operation, Operation::Restore);
    assert_eq!(restore.record.report.generation, committed);
    let split = restore.crash_to_running;
    let parts = split.setup + split.boot + split.restore + split.rest;
    assert!(parts <= split.total + Duration::from_micros(1), "{split:?}");
}
