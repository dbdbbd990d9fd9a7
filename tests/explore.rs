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
/// written. Found on any write-out, the default third as the second: `memtouch` stores a
/// new interval number into every page it touches, every 20 ms, and a write-out is due 50
/// ms after the previous one ended, so that between two write-outs it has touched pages,
/// whose copies differ from anything their save area held; the save areas' lines that the
/// lost fence loses are never all equal to what the image holds.
#[test]
fn a_commit_left_unfenced_is_found() {
    for write_out in ["2", "3"] {
        unfenced_commit_found(write_out);
    }
}

fn unfenced_commit_found(write_out: &str) {
    let scratch = Scratch::new();
    let (code, r, out) = explore(&scratch, &["--quick", "--write-out", write_out, "--plant", "fence:commit"]);
    assert_eq!(code, Some(1), "write-out {write_out}: {out:?}");
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
    let bad: [&[&str]; 7] = [
        &["--plant", "cpu-fence:commit"],
        &["--write-out", "1"],
        &["--plant", "flush:x"],
        &["--plant", "oops"],
        &["--plant", "cpu-flush:x"],
        &["--plant", "cpu-fence:3"],
        &["--cmdline", "apps=kv test_plant=fence:1"],
    ];
    for extra in bad {
        let (code, _, out) = explore(&scratch, extra);
        assert_eq!(code, Some(2), "{extra:?}: {out:?}");
    }
}

/// `vmm explore` with `args`: exit status and JSON report (or record summary).
fn explore_json(args: &[&str]) -> (Option<i32>, Value, Finished) {
    let out = run(&mut vmm(args), Duration::from_secs(300));
    let report = serde_json::from_str(&out.stdout).unwrap_or(Value::Null);
    (out.code(), report, out)
}

/// A shard of a run from `dir` (or the whole run with `None`), its report also written to
/// `NAME.json` beside it.
fn shard(scratch: &Scratch, dir: &str, shard: Option<&str>, name: &str) -> Value {
    let mut args = vec!["explore", "run", "--from", dir, "--json", "--keep-going", "--max-images-per-point", "4"];
    args.extend(shard.map(|s| ["--shard", s]).into_iter().flatten());
    let (code, r, out) = explore_json(&args);
    let failed = r["failures"].as_u64().unwrap_or_else(|| panic!("{out:?}")) > 0;
    assert_eq!(code, Some(i32::from(failed)), "exit status 1 if an image failed: {out:?}");
    std::fs::write(scratch.path(&format!("{name}.json")), &out.stdout).unwrap();
    r
}

/// What follows from the record and the options alone, not from timing.
fn determined(r: &Value) -> Value {
    let failed: Vec<Value> = r["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| serde_json::json!([f["item"], f["point"], f["subset"], f["why"]]))
        .collect();
    let images: Vec<Value> = r["points"].as_array().unwrap().iter().map(|p| p["images"].clone()).collect();
    serde_json::json!({
        "record": r["record"], "items": r["items"], "images": r["images"], "boots": r["boots"],
        "failures": r["failures"], "failed": failed, "per_point": images,
    })
}

/// One record, explored whole and in two shards: the merge counts what the whole run
/// counts, failure for failure; a merge refuses a shard twice, a shard missing, and shards
/// of another record; a run refuses a truncated record.
#[test]
fn two_shards_of_one_record_merged_give_the_whole_run() {
    let scratch = Scratch::new();
    let dir = scratch.path("rec").display().to_string();
    let record = ["explore", "record", "--out", &dir, "--mem", "64M", "--json", "--write-out", "2"];
    let (code, rec, out) = explore_json(&[&record[..], &["--plant", "fence:commit"]].concat());
    assert_eq!(code, Some(0), "{out:?}");
    assert!(rec["record"].is_string() && rec["barriers"].as_u64().unwrap() >= 2, "{rec:#}");

    let whole = shard(&scratch, &dir, None, "whole");
    assert_eq!(whole["record"], rec["record"], "{whole:#}");
    assert!(whole["failures"].as_u64().unwrap() >= 1, "{whole:#}");
    assert!(whole["items"].as_u64().unwrap() > 2 * rec["crash_points"].as_u64().unwrap(), "{whole:#}");
    let a = shard(&scratch, &dir, Some("0/2"), "a");
    let b = shard(&scratch, &dir, Some("1/2"), "b");
    assert_ne!(a["images"], whole["images"], "a shard runs a share: {a:#}");
    assert_ne!(b["images"], whole["images"], "a shard runs a share: {b:#}");
    let files = ["b", "a", "whole"].map(|n| scratch.path(&format!("{n}.json")).display().to_string());
    let (code, merged, out) = explore_json(&["explore", "merge", "--json", &files[0], &files[1]]);
    assert_eq!(code, Some(1), "a shard failed: {out:?}");
    assert_eq!(merged["shards"]["run"], serde_json::json!([0, 1]), "{merged:#}");
    assert_eq!(determined(&merged), determined(&whole), "{merged:#}\nagainst\n{whole:#}");
    let out = run(&mut vmm(&["explore", "merge", &files[0], &files[1]]), Duration::from_secs(30));
    assert!(out.stdout.contains("shards 2 of 2") && out.stdout.contains("FAILED at crash point"), "{out:?}");

    let out = run(&mut vmm(&["explore", "merge", &files[0], &files[0], &files[1]]), Duration::from_secs(30));
    assert!(out.stderr.contains("shard 1/2 is in both"), "{out:?}");
    let out = run(&mut vmm(&["explore", "merge", &files[1]]), Duration::from_secs(30));
    assert!(out.stderr.contains("shard(s) 1 of 2 missing"), "{out:?}");
    let out = run(&mut vmm(&["explore", "merge", &files[1], &files[2]]), Duration::from_secs(30));
    assert!(out.stderr.contains("split in 2 shards"), "{out:?}");

    // Another recording of the same settings is another record: timing decides what it holds.
    let other = scratch.path("other").display().to_string();
    let (code, _, out) = explore_json(&["explore", "record", "--out", &other, "--mem", "64M", "--write-out", "2"]);
    assert_eq!(code, Some(0), "{out:?}");
    let args = ["explore", "run", "--from", &other, "--json", "--keep-going", "--max-images-per-point", "4"];
    let out = run(&mut vmm(&[&args[..], &["--shard", "1/2", "--point", "0"]].concat()), Duration::from_secs(120));
    assert_eq!(out.code(), Some(0), "{out:?}");
    let foreign = scratch.path("other.json");
    std::fs::write(&foreign, &out.stdout).unwrap();
    let out = run(&mut vmm(&["explore", "merge", &files[1], &foreign.display().to_string()]), Duration::from_secs(30));
    assert!(out.stderr.contains("different records"), "{out:?}");

    // A record cut short, and a base written since, are refused with what is wrong.
    let bin = scratch.path("other/record.bin");
    let bytes = std::fs::read(&bin).unwrap();
    std::fs::write(&bin, &bytes[..bytes.len() / 2]).unwrap();
    let out = run(&mut vmm(&["explore", "run", "--from", &other]), Duration::from_secs(30));
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("record.bin is not a usable record") && out.stderr.contains("truncated"), "{out:?}");
    std::fs::write(&bin, &bytes).unwrap();
    let base = std::fs::OpenOptions::new().write(true).open(scratch.path("other/base.img")).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&base, b"scribble", 1 << 20).unwrap();
    let out = run(&mut vmm(&["explore", "run", "--from", &other]), Duration::from_secs(30));
    assert!(out.stderr.contains("not the image this record was made from"), "{out:?}");
}

/// The guest's own copier: its stores, flushes and fences recorded as the guest announces
/// them, every point explored with no failure; the fence before the commit left out in the
/// guest (a test knob on its command line) is found just before the commit, in the image
/// that keeps the commit slot's lines and none of the save areas' (which only the
/// checksums can tell: nothing was announced durable before the commit); a flush left out
/// is found too.
#[test]
fn the_cpu_copier_s_write_out_is_explored_and_its_planted_bugs_found() {
    let scratch = Scratch::new();
    let few = ["--copier", "cpu", "--max-images-per-point", "4", "--keep-going"];
    let (code, r, out) = explore(&scratch, &few);
    assert_eq!(code, Some(0), "{out:?}");
    assert_eq!(r["settings"]["cmdline"].as_str().map(|c| c.ends_with("plate_copy=cpu")), Some(true), "{r:#}");
    assert_eq!(r["failures"], 0, "{r:#}");
    assert!(r["points"].as_array().unwrap().iter().all(|p| p["images"].as_u64().unwrap() >= 1), "{r:#}");

    let (code, r, out) = explore(&scratch, &[&few[..], &["--plant", "cpu-fence:commit"]].concat());
    assert_eq!(code, Some(1), "{out:?}");
    let failed = r["failed"].as_array().unwrap();
    assert!(
        failed
            .iter()
            .all(|f| f["point"] == r["commit_barrier"] && f["subset"] == "the commit slot's pending lines alone"),
        "only the commit without its save areas: {r:#}"
    );
    let why = failed[0]["why"].as_str().unwrap();
    assert!(why.contains("checksum") || why.contains("rolled back"), "{r:#}");
    let console = std::fs::read_to_string(scratch.path("nvm.console.log")).unwrap_or_default();
    assert!(console.contains("TEST KNOB"), "the guest says a bug is planted: {console}");

    let (code, r, out) = explore(&scratch, &["--copier", "cpu", "--quick", "--plant", "cpu-flush:0"]);
    assert_eq!(code, Some(1), "{out:?}");
    assert!(r["failed"][0]["why"].as_str().unwrap().contains("checksum"), "{r:#}");
}
