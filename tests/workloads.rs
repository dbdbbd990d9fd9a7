//! The workloads in the real guest, watched through the machine-control device: heartbeats
//! advance, `kv` verifies, a faulting process dies alone, and a graceful shutdown resumes
//! exactly where it stopped.

mod common;

use std::time::Duration;

use common::{machine_config, Scratch};
use devices::MachineStatus;
use nvram::control::{BootKind, Verified};
use vmm::{harness, RunOutcome, VmConfig};

fn config(scratch: &Scratch, cmdline: &str) -> VmConfig {
    machine_config(scratch, cmdline, 64 << 20)
}

/// Boots `config` on a thread until `done` holds (or fails after `limit`), then stops the
/// machine. Returns the status that satisfied `done`.
fn run_until(config: VmConfig, limit: Duration, done: impl FnMut(&MachineStatus) -> bool) -> MachineStatus {
    harness::run_then_crash(&config, limit, done)
}

fn progress(status: &MachineStatus, name: &str) -> u64 {
    status.workloads.get(name).map_or(0, |w| w.progress)
}

#[test]
fn counter_and_kv_report_progress_and_kv_verifies() {
    let scratch = Scratch::new();
    let first = run_until(config(&scratch, "apps=counter,kv"), Duration::from_secs(20), |s| {
        s.workloads.get("kv").is_some_and(|w| w.last_check == Verified::Passed && w.heartbeats >= 6)
            && s.workloads.get("counter").is_some_and(|w| w.heartbeats >= 6)
    });
    assert_eq!(first.boot_kind, Some(BootKind::Cold));
    let kv = &first.workloads["kv"];
    let counter = &first.workloads["counter"];
    assert!(kv.progress > 0 && counter.progress > 0, "{first:?}");
    assert_ne!(kv.last_check, Verified::Failed);
    assert_eq!(first.rejected, 0, "the guest sent nothing malformed");
    // The kernel prints through the machine-control device here, not byte by byte on the
    // UART: every boot line and each workload's line is a message.
    assert!(first.console_messages >= 8, "{first:?}");
}

#[test]
fn heartbeats_advance() {
    let scratch = Scratch::new();
    let mut seen = Vec::new();
    run_until(
        config(&scratch, "apps=counter,memtouch memtouch=8,16,32 memtouch_ms=20"),
        Duration::from_secs(20),
        |s| {
            seen.push((progress(s, "counter"), progress(s, "memtouch")));
            let (c, m) = (progress(s, "counter"), progress(s, "memtouch"));
            c > 0 && m > 5 && seen.iter().any(|&(c0, m0)| c0 > 0 && c0 < c && m0 > 0 && m0 < m)
        },
    );
}

#[test]
fn a_faulting_process_is_killed_and_the_others_go_on() {
    let scratch = Scratch::new();
    let mut counter_at_kill = None;
    run_until(config(&scratch, "apps=counter,fault fault_ms=200"), Duration::from_secs(20), |s| {
        let console = scratch.read_console();
        if counter_at_kill.is_none() && console.contains("(fault) killed: page fault") {
            counter_at_kill = Some(progress(s, "counter"));
        }
        counter_at_kill.is_some_and(|at| progress(s, "counter") > at)
    });
    let console = scratch.read_console();
    assert!(console.contains("fault: writing to kernel memory"), "{console}");
    assert!(!console.contains("the write went through"), "{console}");
    assert!(!console.contains("KERNEL"), "the kernel itself did not fault:\n{console}");
}

#[test]
fn a_graceful_shutdown_resumes_exactly_where_it_stopped() {
    let scratch = Scratch::new();
    // First run: the kernel shuts down by itself after run_ms (a graceful shutdown).
    let (outcome, before) = harness::run_to_end(&config(&scratch, "apps=counter,kv run_ms=800"));
    assert!(matches!(outcome, RunOutcome::Guest(_)));
    assert!(scratch.read_console().contains("shut down"));
    let (counter_before, kv_before) = (progress(&before, "counter"), progress(&before, "kv"));
    assert!(counter_before > 0 && kv_before > 0, "{before:?}");

    // Second run: resumed, the counters go on from (at least) where they were.
    let after = run_until(config(&scratch, ""), Duration::from_secs(20), |s| {
        s.workloads.get("kv").is_some_and(|w| w.heartbeats >= 2) && s.workloads.contains_key("counter")
    });
    assert_eq!(after.boot_kind, Some(BootKind::Resumed));
    assert!(scratch.read_console().contains("resuming where it stopped"));
    assert!(progress(&after, "counter") > counter_before, "{before:?}\n{after:?}");
    assert!(progress(&after, "kv") > kv_before, "{before:?}\n{after:?}");
}

/// The rest of the first complete console line that starts with `prefix`. A line still being
/// written (no newline yet) does not count: the guest prints a byte per port write, and a
/// machine stopped in the middle of a number would otherwise be read as another number.
fn complete_line_after(console: &str, prefix: &str) -> Option<String> {
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .find_map(|l| l.strip_prefix(prefix))
        .map(|rest| rest.trim().to_string())
}

#[test]
fn a_shutdown_by_system_call_resumes_the_counter_at_exactly_its_value() {
    let scratch = Scratch::new();
    let (outcome, _) = harness::run_to_end(&config(&scratch, "apps=counter counter_shutdown=3"));
    assert!(matches!(outcome, RunOutcome::Guest(_)), "the guest powered itself off");
    let console = scratch.read_console();
    let at = complete_line_after(&console, "counter: shutting the machine down at ")
        .unwrap_or_else(|| panic!("no shutdown in:\n{console}"));

    const RESUMED: &str = "counter: resumed after the shutdown at ";
    let after = run_until(config(&scratch, ""), Duration::from_secs(20), |_| {
        complete_line_after(&scratch.read_console(), RESUMED).is_some()
    });
    assert_eq!(after.boot_kind, Some(BootKind::Resumed));
    let resumed = complete_line_after(&scratch.read_console(), RESUMED).expect("the resume line");
    assert_eq!(resumed, at, "the counter resumed at exactly the value it had");
}

#[test]
fn a_partly_written_line_is_not_read() {
    assert_eq!(complete_line_after("a: 12\nb: 134", "b: "), None);
    assert_eq!(complete_line_after("a: 12\nb: 1341\n", "b: ").as_deref(), Some("1341"));
}

/// Periodic write-outs that outlast their interval (32 MiB dirtied between two of them,
/// a write-out every 5 ms) leave the processes an interval after each one ends: were the
/// next one due an interval after the previous *started*, they would run back to back and
/// nothing else would run.
#[test]
fn periodic_write_outs_longer_than_their_interval_leave_the_processes_time() {
    let scratch = Scratch::new();
    let cmdline = "apps=memtouch memtouch=16,2048,32768 memtouch_ms=1 checkpoint_ms=5";
    let status = run_until(machine_config(&scratch, cmdline, 128 << 20), Duration::from_secs(60), |s| {
        s.of(nvram::control::Operation::WriteOut).count() >= 12
    });
    let write_outs: Vec<_> = status.of(nvram::control::Operation::WriteOut).skip(1).collect();
    let gaps: Vec<Duration> =
        write_outs.windows(2).map(|w| (w[1].at - w[1].total).saturating_duration_since(w[0].at)).collect();
    let longest = write_outs.iter().map(|r| r.total).max().unwrap();
    // Ticks of 1 ms: the next write-out starts 4 to 5 ms after the end of the one before.
    for (gap, pair) in gaps.iter().zip(write_outs.windows(2)) {
        assert!(
            *gap >= Duration::from_millis(3),
            "a write-out started {gap:?} after the one before ended (it took {:?}; the longest {longest:?})",
            pair[0].total
        );
    }
}
