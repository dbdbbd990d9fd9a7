//! `vmm explore`: every crash point of a real write-out under ADR, each booted and checked;
//! and a write-out with a flush or a fence left out (a planted bug, a test knob) is caught.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// `vmm explore` on a scratch image with `extra` arguments: exit status and JSON report.
fn explore(scratch: &Scratch, extra: &[&str]) -> (Option<i32>, Value, Finished) {
    let image = scratch.image().display().to_string();
    let mut args = vec!["explore", "--nvram", &image, "--mem", "64M", "--json"];
    args.extend(extra);
    let out = run(&mut vmm(&args), Duration::from_secs(300));
    let report = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
    (out.code(), report, out)
}

#[test]
fn every_crash_point_of_a_write_out_restores_and_verifies() {
    let scratch = Scratch::new();
    let (code, r, out) = explore(&scratch, &["--quick"]);
    assert_eq!(code, Some(0), "{out:?}");
    let barriers = r["barriers"].as_u64().unwrap();
    assert!(barriers >= 2, "copies and commit at least: {r:#}");
    assert_eq!(r["crash_points"].as_u64(), Some(barriers + 1), "before each barrier and after the last: {r:#}");
    let points = r["points"].as_array().unwrap();
    assert!(points.iter().all(|p| p["images"].as_u64().unwrap() >= 1), "every point explored: {r:#}");
    assert!(r["commit_barrier"].is_u64(), "the commit is among the barriers: {r:#}");
    assert_eq!(r["failures"], 0, "{r:#}");
    assert_eq!(r["boots"], r["images"], "{r:#}");
    assert!(!scratch.path("nvm.crash.img").exists(), "the work image is removed");
}

/// Nothing before the commit made durable until the commit's own barrier: a crash just
/// before it, with the commit's lines evicted, holds a commit whose save areas were never
/// written. The second write-out: it fills the second save areas whole for the first time,
/// so that what the lost fence loses differs from what the image held (a later write-out
/// may copy pages whose stale copies happen to be equal).
#[test]
fn a_commit_left_unfenced_is_found() {
    let scratch = Scratch::new();
    let (code, r, out) = explore(&scratch, &["--quick", "--write-out", "2", "--plant", "fence:commit"]);
    assert_eq!(code, Some(1), "{out:?}");
    assert_eq!(r["failures"], 1, "the first failure stops it: {r:#}");
    let failure = &r["failed"][0];
    assert_eq!(failure["point"], r["commit_barrier"], "just before the commit: {r:#}");
    let why = failure["why"].as_str().unwrap();
    assert!(why.contains("holds the commit") && why.contains("announced durable before it"), "{r:#}");
    // The failing image is kept as it was built, and the command it prints names it.
    let kept = failure["image"].as_str().unwrap();
    assert!(std::path::Path::new(kept).exists(), "{r:#}");
    assert!(failure["reproduce"].as_str().unwrap().contains(kept), "{r:#}");
}

/// The commit slot's lines never written back: once the write-out thought it committed,
/// the crash images still restore the generation before.
#[test]
fn a_commit_left_unflushed_is_found() {
    let scratch = Scratch::new();
    let (code, r, out) = explore(&scratch, &["--quick", "--plant", "flush:commit"]);
    assert_eq!(code, Some(1), "{out:?}");
    let why = r["failed"][0]["why"].as_str().unwrap_or_default();
    assert!(why.contains("commit of") && why.contains("had been made durable"), "{r:#}");
}

#[test]
fn bad_explore_arguments_are_usage_errors() {
    let scratch = Scratch::new();
    for extra in [&["--write-out", "1"][..], &["--plant", "flush:x"][..], &["--plant", "oops"][..]] {
        let (code, _, out) = explore(&scratch, extra);
        assert_eq!(code, Some(2), "{extra:?}: {out:?}");
    }
}
