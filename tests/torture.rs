//! `vmm torture`: hundreds of crashes, some inside write-outs, never a committed write-out
//! lost and `kv` always verified after the restore; under each persistence model.

mod common;

use std::time::Duration;

use common::*;

/// Runs `vmm torture` for 200 crashes with `extra` arguments and checks its summary.
fn torture(extra: &[&str], model: &str) {
    let scratch = Scratch::new();
    let image = scratch.image().display().to_string();
    let mut args = vec!["torture", "--nvram", &image, "--crashes", "200", "--seed", "12345"];
    args.extend(extra);
    let out = run(&mut vmm(&args), Duration::from_secs(600));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains(model), "{out:?}");
    let row = out.stdout.lines().last().unwrap_or_default();
    let cells: Vec<&str> = row.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(cells[0], "200", "{out:?}");
    assert!(cells[1].parse::<u64>().unwrap() > 20, "a fair share of the crashes hit write-outs: {out:?}");
    assert_eq!(cells[2], "200", "every boot after a crash restored, the last crash's too: {out:?}");
    assert_eq!(cells[3], "0", "{out:?}");
}

#[test]
fn two_hundred_crashes_lose_nothing_committed() {
    torture(&[], "eADR");
}

/// Only what the guest wrote back and fenced survives: every store of the commit protocol
/// must be flushed, or a restore finds a torn plate table or save area.
#[test]
fn two_hundred_crashes_under_adr_lose_nothing_committed() {
    torture(&["--persistence", "adr"], "no evictions");
}

/// As above, with half the dirty lines that were not written back evicted into the image
/// at each crash: stores that reach NVM early, out of order, must not break a commit either.
#[test]
fn two_hundred_crashes_under_adr_with_evictions_lose_nothing_committed() {
    torture(&["--persistence", "adr", "--crash-evict", "0.5"], "0.5 of the others evicted");
}

#[test]
fn crash_evict_without_adr_is_a_usage_error() {
    let scratch = Scratch::new();
    let image = scratch.image().display().to_string();
    // A --crash-evict without ADR is refused as a usage error, before anything boots.
    let out = run(&mut vmm(&["torture", "--nvram", &image, "--crash-evict", "0.5"]), Duration::from_secs(30));
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("--persistence adr"), "{out:?}");
}
