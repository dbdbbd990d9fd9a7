//! Torture campaigns split in shards: the shards of a seed, run apart and merged, count what
//! one run of the whole campaign counts; a merge refuses what is not one whole campaign.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

/// The campaign: few crashes under ADR, so that the guest announces its barriers.
const CAMPAIGN: [&str; 8] = ["--crashes", "6", "--seed", "2027", "--persistence", "adr", "--inside-share", "0.5"];

/// `vmm torture` of the campaign (one shard of it with `shard`) on its own image: the JSON
/// summary, also written to `NAME.json` in the scratch directory.
fn torture(scratch: &Scratch, name: &str, shard: Option<&str>) -> Value {
    let image = scratch.path(&format!("{name}.img")).display().to_string();
    let mut args = vec!["torture", "--nvram", &image, "--mem", "64M", "--json"];
    args.extend(CAMPAIGN);
    if let Some(shard) = shard {
        args.extend(["--shard", shard]);
    }
    let out = run(&mut vmm(&args), Duration::from_secs(300));
    assert_eq!(out.code(), Some(0), "{out:?}");
    std::fs::write(scratch.path(&format!("{name}.json")), &out.stdout).unwrap();
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

/// The counts that follow from the seed alone (not from timing).
const DETERMINED: [&str; 8] =
    ["crashes", "aimed_inside", "restores", "generations_checked", "verified", "checks", "violations", "failures"];

#[test]
fn two_shards_merged_count_what_the_whole_campaign_counts() {
    let scratch = Scratch::new();
    let whole = torture(&scratch, "whole", None);
    let counts = &whole["counts"];
    assert_eq!(counts["crashes"], 6, "{whole:#}");
    assert_eq!(counts["restores"], 6, "{whole:#}");
    assert_eq!(counts["failures"], 0, "{whole:#}");
    assert!(counts["aimed_inside"].as_u64().unwrap() >= 2, "the seed aims some crashes at write-outs: {whole:#}");
    // Coverage: under ADR the crashes inside write-outs are placed among their barriers.
    let coverage = &whole["coverage"];
    assert_eq!(coverage["announced"], true, "{whole:#}");
    let placed: u64 = coverage["by_barriers"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
    assert!(placed > 0, "a non-empty histogram of barriers passed: {whole:#}");
    assert_eq!(Some(placed), counts["inside"].as_u64(), "every crash inside a write-out is placed: {whole:#}");

    let a = torture(&scratch, "a", Some("0/2"));
    let b = torture(&scratch, "b", Some("1/2"));
    assert_eq!(a["counts"]["crashes"], 3);
    assert_eq!(b["counts"]["crashes"], 3);
    let files = [scratch.path("b.json"), scratch.path("a.json")].map(|p| p.display().to_string());
    let out = run(&mut vmm(&["torture", "merge", &files[0], &files[1], "--json"]), Duration::from_secs(30));
    assert_eq!(out.code(), Some(0), "{out:?}");
    let merged: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(merged["campaign"], whole["campaign"]);
    assert_eq!(merged["shards"]["run"], serde_json::json!([0, 1]));
    for field in DETERMINED {
        assert_eq!(merged["counts"][field], whole["counts"][field], "{field}: {merged:#} against {whole:#}");
    }
    assert_eq!(merged["restore_us"].as_array().unwrap().len(), 6);

    // The text summary of a merge, the coverage line above the table.
    let out = run(&mut vmm(&["torture", "merge", &files[0], &files[1]]), Duration::from_secs(30));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("shards: 2 of 2") && out.stdout.contains("between persist barriers"), "{out:?}");
    assert!(out.stdout.lines().last().unwrap().starts_with("| 6 |"), "{out:?}");

    // A shard missing, a shard twice, and a shard of another campaign are refused.
    let out = run(&mut vmm(&["torture", "merge", &files[1]]), Duration::from_secs(30));
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("shard(s) 1 of 2 missing"), "{out:?}");
    let out = run(&mut vmm(&["torture", "merge", &files[1], &files[1], &files[0]]), Duration::from_secs(30));
    assert!(out.stderr.contains("shard 0/2 is in both"), "{out:?}");
    let whole_file = scratch.path("whole.json").display().to_string();
    let out = run(&mut vmm(&["torture", "merge", &files[0], &whole_file]), Duration::from_secs(30));
    assert!(out.stderr.contains("split in 2 shards"), "{out:?}");
}
