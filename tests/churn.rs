//! `churn` under KVM: its stream of maps and unmaps runs past the capacity of the kernel's
//! tables (the frames of a small image; the user-space and plate tables), the refused maps
//! are clean errors it counts and nothing else (every write-out still commits), and after
//! a crash the restore gives back every region it had, each page verified against its
//! ledger.

mod common;

use std::time::Duration;

use common::Scratch;
use nvram::control::{BootKind, Operation, Verified};
use vmm::harness::run_then_crash;
use vmm::{ConsoleOutput, VmConfig};

fn config(scratch: &Scratch, mem_mib: u64, cmdline: &str) -> VmConfig {
    let mut config = VmConfig::new(scratch.image());
    config.mem_size = Some(mem_mib << 20);
    config.cmdline = cmdline.into();
    config.console = ConsoleOutput::File(scratch.console());
    config
}

/// Runs `cmdline` until `churn` says the kernel refused a map and a write-out committed
/// after that, crashes, and checks the restore: every region verified, and the stream goes
/// on from where the checkpoint left it.
fn past_capacity_then_crash(mem_mib: u64, cmdline: &str) {
    let scratch = Scratch::new();
    let mut refused_at = None;
    let before = run_then_crash(&config(&scratch, mem_mib, cmdline), Duration::from_secs(120), |s| {
        if refused_at.is_none() && scratch.read_console().contains("churn: a map of") {
            refused_at = Some(s.committed_generation);
        }
        let churn = s.workloads.get("churn");
        assert!(churn.is_none_or(|w| w.last_check != Verified::Failed), "{}", scratch.read_console());
        refused_at.is_some_and(|g| s.committed_generation > g + 1)
    });
    let console = scratch.read_console();
    assert!(!console.contains("FAILED") && !console.contains("exited with code"), "{console}");
    // Exhaustion is the process's refused map, never a write-out without save areas.
    assert!(!console.contains("write-out failed"), "{console}");
    // What churn said, for `--nocapture`.
    console.lines().filter(|l| l.starts_with("churn:")).for_each(|l| eprintln!("{l}"));
    let ops_before = before.workloads["churn"].progress;

    let after = run_then_crash(&config(&scratch, mem_mib, ""), Duration::from_secs(60), |s| {
        s.boot_kind.is_some() && s.workloads.get("churn").is_some_and(|w| w.last_check != Verified::Unknown)
    });
    let console = scratch.read_console();
    assert_eq!(after.boot_kind, Some(BootKind::Restored), "{after:?}\n{console}");
    let restored = after.of(Operation::Restore).last().expect("the restore reported").report.generation;
    assert!(restored >= before.committed_generation, "restored {restored} < committed {}", before.committed_generation);
    let churn = &after.workloads["churn"];
    assert_eq!(churn.last_check, Verified::Passed, "{after:?}\n{console}");
    assert!(churn.progress > 0 && churn.progress <= ops_before + 10_000, "{after:?}");
    assert!(!console.contains("FAILED"), "{console}");
}

/// A small image: the frames run out first (regions of up to 64 pages).
#[test]
fn churn_past_the_frames_of_a_small_image_then_a_crash_restores_every_region() {
    past_capacity_then_crash(32, "apps=churn churn_seed=3 churn_pages=64 checkpoint_ms=100");
}

/// Small regions on a larger image: the user-space table (1,024) fills up before the
/// frames do, and with it the plate table (a plate for each region, the process's page
/// tables and the kernel's spaces).
#[test]
fn churn_past_the_user_space_and_plate_tables_then_a_crash_restores_every_region() {
    past_capacity_then_crash(128, "apps=churn churn_seed=5 churn_pages=1 churn_ops=20000 checkpoint_ms=200");
}
