//! Crashes: the VMM killed (SIGKILL) or the vCPU stopped dead at arbitrary moments, some in
//! the middle of write-outs, then a new boot on the same image. Nothing committed may be
//! lost: the boot restores, `kv` verifies, and the restored generation is at least the last
//! one the VMM saw committed.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{machine_config, vmm_bin, Scratch};
use nvram::control::{BootKind, Copier, Operation, Verified};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use vmm::harness::run_then_crash;
use vmm::VmConfig;

fn config(scratch: &Scratch, cmdline: &str) -> VmConfig {
    config_mem(scratch, cmdline, 128 << 20)
}

fn config_mem(scratch: &Scratch, cmdline: &str, mem: u64) -> VmConfig {
    machine_config(scratch, cmdline, mem)
}

#[test]
fn a_space_deleted_after_a_checkpoint_comes_back_intact_after_a_crash() {
    deleted_space_comes_back("");
}

/// The same with the bookkeeping in kernel mode, as the paper's kernel does it (by default
/// it runs at CPL 3).
#[test]
fn a_space_deleted_after_a_checkpoint_comes_back_intact_with_the_bookkeeping_in_kernel_mode() {
    deleted_space_comes_back("bookkeeping=ring0");
}

/// `deleter` deletes its region after the checkpoint, then allocates and writes every frame
/// it can get (32 MiB of RAM: the allocator comes round to the freed frames), so that save
/// areas freed before the next commit would be overwritten before the crash.
fn deleted_space_comes_back(extra: &str) {
    let scratch = Scratch::new();
    let mem = 32 << 20;
    let first = config_mem(&scratch, &format!("apps=deleter,counter {extra}"), mem);
    run_then_crash(&first, Duration::from_secs(60), |s| s.workloads.get("deleter").is_some_and(|w| w.progress == 1));
    assert!(scratch.read_console().contains("region deleted after the checkpoint"));
    let after = run_then_crash(&config_mem(&scratch, extra, mem), Duration::from_secs(20), |s| {
        s.workloads.get("deleter").is_some_and(|w| w.progress == 2)
    });
    assert_eq!(after.boot_kind, Some(BootKind::Restored));
    assert_eq!(after.workloads["deleter"].last_check, Verified::Passed, "{after:?}");
    assert!(scratch.read_console().contains("the deleted region is back intact"));
    assert_eq!(after.of(Operation::Restore).count(), 1, "the restore reported its metrics");
    let mode = if extra.contains("ring0") { "in kernel mode" } else { "at CPL 3" };
    assert!(scratch.read_console().contains(&format!("bookkeeping runs {mode}")), "{}", scratch.read_console());
}

#[test]
fn sigkill_at_random_moments_never_loses_a_committed_checkpoint_engine() {
    sigkill_rounds("plate_copy=engine", 5);
}

/// In kernel mode the write-out takes its dirty pages from the engine's dirty log (at CPL 3
/// it walks the page tables): kv's incremental changes check that path.
#[test]
fn sigkill_at_random_moments_never_loses_a_committed_checkpoint_bookkeeping_in_kernel_mode() {
    sigkill_rounds("plate_copy=engine bookkeeping=ring0", 3);
}

#[test]
fn sigkill_at_random_moments_never_loses_a_committed_checkpoint_cpu() {
    sigkill_rounds("plate_copy=cpu", 4);
}

#[test]
fn sigkill_with_a_copy_engine_batch_half_applied() {
    // The engine pauses 30 ms halfway through each batch: most kills land inside one.
    sigkill_rounds_with("plate_copy=engine", 4, &["--engine-pause-ms", "30"]);
}

/// Boots with `copier` (a `plate_copy=` item), kills the VMM `rounds` times at random
/// moments, and checks every restore.
fn sigkill_rounds(copier: &str, rounds: u32) {
    sigkill_rounds_with(copier, rounds, &[]);
}

fn sigkill_rounds_with(copier: &str, rounds: u32, extra: &[&str]) {
    let scratch = Scratch::new();
    let seed = 0x5eed_u64 ^ u64::from(std::process::id());
    // Deterministic kill times (the seed is printed on failure).
    let mut rng = SmallRng::seed_from_u64(seed);
    let image = scratch.image().display().to_string();
    let cmdline = format!("apps=kv,memtouch memtouch=48,32,256 memtouch_ms=20 checkpoint_ms=100 {copier}");
    let cmdline = cmdline.as_str();
    for round in 0..rounds {
        // A VMM process, killed with SIGKILL at a random moment.
        let console = scratch.path(&format!("console-{round}.log")).display().to_string();
        let mut child = std::process::Command::new(vmm_bin())
            .args(["boot", "--nvram", &image, "--mem", "128M", "--console", &console, "--cmdline", cmdline])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm");
        let committed = Arc::new(Mutex::new((0u64, String::new())));
        let seen = committed.clone();
        let stderr = child.stderr.take().unwrap();
        let reader = thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut seen = seen.lock().unwrap();
                // A write-out committed, or the boot restored (or started at) a generation.
                if line.contains("write-out committed") || line.contains("guest booted") {
                    if let Some(rest) = line.split("generation=").nth(1) {
                        let g = rest.split_whitespace().next().unwrap_or("0").parse().unwrap_or(0);
                        seen.0 = seen.0.max(g);
                    }
                }
                seen.1.push_str(&line);
                seen.1.push('\n');
            }
        });
        // The kill lands at a random moment after the first commit of this run (or of a
        // restore), not at a time counted from the spawn: on a loaded machine a fixed delay
        // could end before anything was committed, and then nothing would be tested.
        let deadline = Instant::now() + Duration::from_secs(30);
        while committed.lock().unwrap().0 == 0 && Instant::now() < deadline && !reader.is_finished() {
            thread::sleep(Duration::from_millis(5));
        }
        thread::sleep(Duration::from_millis(rng.random_range(0..1000)));
        child.kill().expect("SIGKILL the VMM");
        child.wait().unwrap();
        reader.join().unwrap();
        let (last_committed, log) = committed.lock().unwrap().clone();
        assert!(last_committed > 0, "round {round} (seed {seed:#x}): no generation committed before the kill:\n{log}");

        // The next boot restores, and kv's table verifies.
        let after = run_then_crash(&config(&scratch, copier), Duration::from_secs(30), |s| {
            s.boot_kind.is_some() && s.workloads.get("kv").is_some_and(|w| w.last_check != Verified::Unknown)
        });
        assert_eq!(after.boot_kind, Some(BootKind::Restored), "round {round} (seed {seed:#x}): {after:?}");
        let restored = after.of(Operation::Restore).last().map(|r| r.report.generation).unwrap_or(0);
        assert!(
            restored >= last_committed,
            "round {round} (seed {seed:#x}): restored generation {restored} < last committed {last_committed}"
        );
        assert_eq!(after.workloads["kv"].last_check, Verified::Passed, "round {round} (seed {seed:#x}): {after:?}");
        let restore = after.of(Operation::Restore).last().expect("the restore reported");
        let expected = if copier.contains("plate_copy=cpu") { Copier::Cpu } else { Copier::Engine };
        assert_eq!(restore.report.copier, expected);
    }
}

#[test]
fn with_plate_off_nothing_is_committed_and_a_crash_starts_afresh() {
    let scratch = Scratch::new();
    let before = run_then_crash(&config(&scratch, "apps=deleter plate=off"), Duration::from_secs(20), |_| {
        scratch.read_console().contains("deleter:") || scratch.read_console().contains("exited with code 3")
    });
    assert!(before.of(Operation::WriteOut).next().is_none(), "{before:?}");
    assert!(
        scratch.read_console().contains("process 0 exited with code 3"),
        "checkpoint() refused: {}",
        scratch.read_console()
    );
    let after = run_then_crash(&config(&scratch, "plate=off"), Duration::from_secs(20), |s| s.boot_kind.is_some());
    assert_eq!(after.boot_kind, Some(BootKind::Cold));
    assert!(scratch.read_console().contains("nothing was committed: starting afresh"));
}

/// More regions deleted between two write-outs than the deletion-pending list once held
/// (512), and as many made again with the same ids: after a crash, the second checkpoint
/// comes back whole (no stale plate is restored over a new region, and no new region is
/// left without a plate).
#[test]
fn six_hundred_regions_deleted_and_made_again_between_two_write_outs_restore_whole() {
    let scratch = Scratch::new();
    let mem = 64 << 20;
    let first = config_mem(&scratch, "apps=deleter deleter=600", mem);
    run_then_crash(&first, Duration::from_secs(120), |s| s.workloads.get("deleter").is_some_and(|w| w.progress == 1));
    assert!(scratch.read_console().contains("600 regions deleted and made again"), "{}", scratch.read_console());
    let after = run_then_crash(&config_mem(&scratch, "", mem), Duration::from_secs(60), |s| {
        s.workloads.get("deleter").is_some_and(|w| w.progress == 2)
    });
    assert_eq!(after.boot_kind, Some(BootKind::Restored));
    assert!(scratch.read_console().contains("0 of 600 regions differ"), "{}", scratch.read_console());
    assert_eq!(after.workloads["deleter"].last_check, Verified::Passed, "{after:?}");
}

/// As many regions as one process can map (1,018: the real-memory table is full), with its
/// two segments, stack and address book 1,022 user spaces: with the kernel's own resources that is more
/// plates than the plate table once held (1,024), and every write-out failed (leaking save
/// areas) from then on. Both
/// checkpoints must commit and the second come back whole.
#[test]
fn a_process_holding_every_user_space_still_checkpoints_and_restores() {
    let scratch = Scratch::new();
    let mem = 64 << 20;
    let first = config_mem(&scratch, "apps=deleter deleter=1018", mem);
    run_then_crash(&first, Duration::from_secs(120), |s| s.workloads.get("deleter").is_some_and(|w| w.progress == 1));
    assert!(scratch.read_console().contains("1018 regions deleted and made again"), "{}", scratch.read_console());
    let after = run_then_crash(&config_mem(&scratch, "", mem), Duration::from_secs(60), |s| {
        s.workloads.get("deleter").is_some_and(|w| w.progress == 2)
    });
    assert_eq!(after.boot_kind, Some(BootKind::Restored));
    assert!(scratch.read_console().contains("0 of 1018 regions differ"), "{}", scratch.read_console());
}

/// A boot with `plate=off` forgets the commits of the boots before it: a later crash with
/// the plate function on starts afresh instead of restoring a generation whose save areas
/// the `plate=off` run handed out (it reformatted, and allocated over them).
#[test]
fn after_a_plate_off_boot_a_crash_never_restores_an_older_commit() {
    let scratch = Scratch::new();
    let mem = 32 << 20;
    run_then_crash(&config_mem(&scratch, "apps=deleter", mem), Duration::from_secs(60), |s| {
        s.workloads.get("deleter").is_some_and(|w| w.progress == 1)
    });
    let off = run_then_crash(&config_mem(&scratch, "apps=counter plate=off", mem), Duration::from_secs(20), |s| {
        s.workloads.get("counter").is_some_and(|w| w.progress > 0)
    });
    assert_eq!(off.boot_kind, Some(BootKind::Cold));
    let off_console = scratch.read_console();
    let on = run_then_crash(&config_mem(&scratch, "", mem), Duration::from_secs(20), |s| s.boot_kind.is_some());
    assert_eq!(on.boot_kind, Some(BootKind::Cold), "{}", scratch.read_console());
    assert!(on.of(Operation::Restore).next().is_none(), "{on:?}");
    assert!(off_console.contains("commits are forgotten"), "{off_console}");
}

/// The same after a graceful shutdown of the `plate=off` run: the next boot resumes that
/// run, and its plate function starts afresh (generation 1), not from the live table of
/// the run before.
#[test]
fn after_a_plate_off_boot_shuts_down_the_plate_function_starts_afresh() {
    let scratch = Scratch::new();
    let mem = 32 << 20;
    run_then_crash(&config_mem(&scratch, "apps=deleter", mem), Duration::from_secs(60), |s| {
        s.workloads.get("deleter").is_some_and(|w| w.progress == 1)
    });
    let (_, off) = vmm::harness::run_to_end(&config_mem(&scratch, "apps=counter counter_shutdown=1 plate=off", mem));
    assert_eq!(off.boot_kind, Some(BootKind::Cold));
    let on = run_then_crash(&config_mem(&scratch, "checkpoint_ms=20", mem), Duration::from_secs(20), |s| {
        s.of(Operation::WriteOut).next().is_some()
    });
    assert_eq!(on.boot_kind, Some(BootKind::Resumed));
    let first = on.of(Operation::WriteOut).next().expect("a write-out");
    assert_eq!(first.report.generation, 1, "{}", scratch.read_console());
    assert!(scratch.read_console().contains("no live plate table to resume"), "{}", scratch.read_console());
}

/// A `plate=off` boot that resumes a gracefully shut down `plate=on` run frees the save
/// areas of its live table (they would be lost for good otherwise), and the next `plate=on`
/// boot starts its plate function afresh; a crash after that restores its own commit.
#[test]
fn a_plate_off_boot_after_a_shutdown_frees_the_save_areas_and_later_commits_restore() {
    let scratch = Scratch::new();
    let mem = 32 << 20;
    let (_, on) = vmm::harness::run_to_end(&config_mem(&scratch, "apps=counter counter_shutdown=1", mem));
    assert_eq!(on.boot_kind, Some(BootKind::Cold));
    let (_, off) = vmm::harness::run_to_end(&config_mem(&scratch, "plate=off run_ms=200", mem));
    assert_eq!(off.boot_kind, Some(BootKind::Resumed));
    let console = scratch.read_console();
    let freed = console.split("commits are forgotten (").nth(1).and_then(|r| r.split(' ').next());
    assert!(freed.and_then(|n| n.parse::<u64>().ok()).is_some_and(|n| n > 0), "{console}");
    let again = run_then_crash(&config_mem(&scratch, "checkpoint_ms=20", mem), Duration::from_secs(20), |s| {
        s.of(Operation::WriteOut).next().is_some()
    });
    assert_eq!(again.boot_kind, Some(BootKind::Resumed));
    let restored = run_then_crash(&config_mem(&scratch, "", mem), Duration::from_secs(20), |s| {
        s.workloads.contains_key("counter")
    });
    assert_eq!(restored.boot_kind, Some(BootKind::Restored), "{}", scratch.read_console());
}

/// After a restore the process that asked for the write-out runs first (the paper's
/// restore, step 7): `deleter` is process 1, after `counter`.
#[test]
fn after_a_restore_the_process_that_asked_for_the_write_out_runs_first() {
    let scratch = Scratch::new();
    let mem = 32 << 20;
    run_then_crash(&config_mem(&scratch, "apps=counter,deleter", mem), Duration::from_secs(60), |s| {
        s.workloads.get("deleter").is_some_and(|w| w.progress == 1)
    });
    let before = scratch.read_console();
    assert!(before.contains("process 0 (counter) runs first"), "{before}");
    let after = run_then_crash(&config_mem(&scratch, "", mem), Duration::from_secs(20), |s| {
        s.workloads.get("deleter").is_some_and(|w| w.progress == 2)
    });
    assert_eq!(after.boot_kind, Some(BootKind::Restored));
    // Each boot writes its console file anew.
    let restored = scratch.read_console();
    assert!(restored.contains("process 1 (deleter) runs first"), "{restored}");
}
