//! The lazy restore (`restore=lazy`, the default): the kernel's plates come back before the
//! processes run, the user spaces' pages stay in their committed save areas until touched,
//! every page is back before the next commit, and a crash or a shutdown in the middle of it
//! loses nothing. `restore=eager` still copies every page first.

mod common;

use std::time::Duration;

use common::{machine_config, Scratch};
use devices::MachineStatus;
use nvram::control::{BootKind, Operation, Verified};
use vmm::harness::{run_then_crash, start, wait};
use vmm::{RunOutcome, VmConfig};

const LIMIT: Duration = Duration::from_secs(60);

fn config(scratch: &Scratch, cmdline: &str) -> VmConfig {
    machine_config(scratch, cmdline, 64 << 20)
}

/// Which workloads [`crashed_image`] runs beside `kv`.
#[derive(Clone, Copy)]
enum Beside {
    /// Nothing.
    Nothing,
    /// `memtouch` over 8 MiB, a page every quarter of a second: most of its 2 MiB spans stay
    /// away for seconds after a restore (`kv` never sleeps, so the CPU never idles).
    SlowMemtouch,
}

/// `kv` and `beside` run until three write-outs are committed, then a power failure.
fn crashed_image(scratch: &Scratch, beside: Beside) -> u64 {
    let apps = match beside {
        Beside::Nothing => "apps=kv",
        Beside::SlowMemtouch => "apps=kv,memtouch memtouch=8,1024,4 memtouch_ms=250",
    };
    let cmdline = format!("{apps} kv_pages=8 checkpoint_ms=100");
    // Two commits after every workload reported (memtouch has mapped all its regions then).
    let mut reported_at = None;
    let status = run_then_crash(&config(scratch, &cmdline), LIMIT, |s| {
        let all = ["kv", "memtouch"].iter().all(|n| !apps.contains(n) || s.workloads.contains_key(*n));
        if all && reported_at.is_none() {
            reported_at = Some(s.committed_generation);
        }
        reported_at.is_some_and(|g| s.committed_generation >= g + 2)
    });
    status.committed_generation
}

fn kv_checked(s: &MachineStatus) -> bool {
    s.workloads.get("kv").is_some_and(|w| w.last_check != Verified::Unknown)
}

fn restored_generation(s: &MachineStatus) -> u64 {
    s.of(Operation::Restore).last().expect("the restore's metrics").report.generation
}

#[test]
fn a_restore_leaves_the_user_spaces_away_and_every_page_is_back_before_the_next_commit() {
    let scratch = Scratch::new();
    let committed = crashed_image(&scratch, Beside::SlowMemtouch);
    // The restored machine never idles (kv never sleeps) and memtouch leaves most of its
    // spans untouched: the first write-out, which copies from the regions, must bring the
    // rest back before it commits.
    let after = run_then_crash(&config(&scratch, "checkpoint_ms=100"), LIMIT, |s| {
        kv_checked(s)
            && s.of(Operation::RestoreTail).next().is_some()
            && s.committed_generation > restored_generation(s)
    });
    let console = scratch.read_console();
    assert_eq!(after.boot_kind, Some(BootKind::Restored), "{console}");
    assert_eq!(after.workloads["kv"].last_check, Verified::Passed, "{console}");
    let restore = after.of(Operation::Restore).last().unwrap().report;
    assert!(restore.generation >= committed, "{restore:?}");
    let tail = after.of(Operation::RestoreTail).last().unwrap().report;
    assert!(restore.copied_bytes < restore.plated_bytes / 2, "the user spaces were left: {restore:?}");
    assert!(tail.plated_bytes > 0, "{tail:?}");
    assert_eq!(restore.copied_bytes + tail.plated_bytes, restore.plated_bytes, "every plate copied or left once");
    assert_eq!(tail.copied_bytes, tail.plated_bytes, "every page left came back, once: {tail:?}");
    assert_eq!(tail.generation, restore.generation);
    assert!(console.contains("plate: lazy restore: ") && console.contains("plate: restore finished: "), "{console}");
    // "(k of n 2 MiB spans at first touch)": some were still away at the end, the write-out's.
    let spans = console.split("plate: restore finished: ").nth(1).and_then(|l| l.split(" (").nth(1)).unwrap_or("");
    let numbers: Vec<u64> = spans.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(matches!(numbers[..], [k, n, ..] if k < n), "the end came with spans away: {spans}\n{console}");
    assert!(!console.contains("killed"), "{console}");

    // The commit made after the lazy restore holds every page: restored, kv verifies it.
    let next = after.committed_generation;
    let again = run_then_crash(&config(&scratch, ""), LIMIT, kv_checked);
    let console = scratch.read_console();
    assert!(restored_generation(&again) >= next, "{console}");
    assert_eq!(again.workloads["kv"].last_check, Verified::Passed, "{console}");
}

#[test]
fn a_crash_before_a_lazy_restore_ends_restores_the_same_commit_again() {
    let scratch = Scratch::new();
    crashed_image(&scratch, Beside::SlowMemtouch);
    let mut first = None;
    for round in 0..3 {
        // No write-out and no idle CPU (kv never sleeps), and memtouch's spans mostly away:
        // the restore cannot end before the crash. kv has run and written (its pages came
        // back at their first touches).
        let after = run_then_crash(&config(&scratch, ""), LIMIT, |s| {
            kv_checked(s) && s.workloads["kv"].progress > 0 && s.running.is_some()
        });
        let console = scratch.read_console();
        assert_eq!(
            after.of(Operation::RestoreTail).count(),
            0,
            "round {round}: the crash came after the end: {console}"
        );
        assert_eq!(after.workloads["kv"].last_check, Verified::Passed, "round {round}: {console}");
        let restore = after.of(Operation::Restore).last().unwrap().report;
        assert!(restore.copied_bytes < restore.plated_bytes, "round {round}: {restore:?}");
        let generation = restored_generation(&after);
        assert_eq!(*first.get_or_insert(generation), generation, "round {round}: the same commit each time");
    }
}

#[test]
fn a_shutdown_during_a_lazy_restore_brings_every_page_back_and_the_resume_runs_on() {
    let scratch = Scratch::new();
    crashed_image(&scratch, Beside::SlowMemtouch);
    let vm = start(&config(&scratch, ""));
    wait(&vm, LIMIT, "kv running after the restore", |s| kv_checked(s) && s.workloads["kv"].progress > 0);
    let controller = vm.controller().clone();
    assert_eq!(controller.snapshot().of(Operation::RestoreTail).count(), 0, "still lazy when asked to shut down");
    controller.request_shutdown();
    assert!(matches!(vm.wait(), Ok(RunOutcome::Guest(_))), "the guest powers off");
    let down = controller.snapshot();
    let tail = down.of(Operation::RestoreTail).last().expect("the shutdown ended the lazy restore").report;
    assert_eq!(tail.copied_bytes, tail.plated_bytes, "{tail:?}");
    // `vmm ctl metrics` shows it beside the restore.
    let metrics = controller.metrics();
    assert_eq!((metrics.restores.count, metrics.restore_tails.count), (1, 1), "{metrics:?}");
    assert!(metrics.last_restore_tail.as_ref().is_some_and(|t| t.copied_bytes == tail.copied_bytes), "{metrics:?}");
    // The resume runs on the page tables as they were: none may say "away" any more.
    let resumed = run_then_crash(&config(&scratch, ""), LIMIT, kv_checked);
    let console = scratch.read_console();
    assert_eq!(resumed.boot_kind, Some(BootKind::Resumed), "{console}");
    assert!(!console.contains("killed"), "{console}");
    assert_eq!(resumed.workloads["kv"].last_check, Verified::Passed, "{console}");
    // And the image checks out after it (`vmm inspect --check`).
    let image = scratch.image().display().to_string();
    let out = common::vmm(&["inspect", "--check", &image]).output().expect("run vmm inspect");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn restore_eager_copies_every_page_before_the_processes_run() {
    let scratch = Scratch::new();
    crashed_image(&scratch, Beside::Nothing);
    let after = run_then_crash(&config(&scratch, "restore=eager"), LIMIT, kv_checked);
    let console = scratch.read_console();
    assert_eq!(after.workloads["kv"].last_check, Verified::Passed, "{console}");
    let restore = after.of(Operation::Restore).last().unwrap().report;
    assert_eq!(restore.copied_bytes, restore.plated_bytes, "{restore:?}");
    assert_eq!(after.of(Operation::RestoreTail).count(), 0);
    assert!(!console.contains("lazy restore"), "{console}");
}
