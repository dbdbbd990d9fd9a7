//! What an exploration found, as text or JSON, and `vmm explore merge`: the JSON reports of
//! the shards of one run from one record added up into the run's report.
//!
//! A report carries what a merge needs besides the counts: the record's identity and its
//! settings, and the options that decided the work items (the same options on the same
//! record give the same items), and which shards it covers. Shards of different records or
//! options are never added.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::store::Settings;
use crate::torture::summary::{whole, Shards};

/// The version of the JSON report; a merge refuses others.
pub const FORMAT: u32 = 1;

/// What decides the work items of a record: all of it must be equal to merge two shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Options {
    pub subsets_up_to: usize,
    pub sample: usize,
    pub seed: u64,
    pub max_images_per_point: usize,
    pub quick: bool,
    /// The crash points explored (empty: all).
    pub points: Vec<usize>,
    pub keep_going: bool,
}

/// A crash image that failed its checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The work item's index, in the order of the whole run (shard `item mod N` runs it).
    pub item: usize,
    pub point: usize,
    pub subset: String,
    pub why: String,
    pub image: Option<String>,
    pub reproduce: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointReport {
    pub before_barrier: Option<usize>,
    pub durable_lines_undone: usize,
    pub pending_extents: usize,
    pub pending_lines: usize,
    /// Subsets of its pending lines that the enumeration offered (before the cap).
    pub candidates: usize,
    /// Images built (of this shard's items).
    pub images: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub format: u32,
    /// The record's identity (its checksums).
    pub record: String,
    pub settings: Settings,
    pub options: Options,
    pub shards: Shards,
    pub generation: u64,
    pub barriers: usize,
    /// The barrier that writes the commit slot.
    pub commit_barrier: Option<usize>,
    pub crash_points: usize,
    /// Work items of the whole run (all shards).
    pub items: usize,
    pub points: Vec<PointReport>,
    pub images: u64,
    pub boots: u64,
    pub failures: u64,
    /// A failure stopped a shard before its last item (no `--keep-going`).
    pub stopped: bool,
    pub record_s: f64,
    /// The exploration's time (a merge: the shards' times added).
    pub explore_s: f64,
    /// Where the time went: building images, `inspect --check`, booting and checking.
    pub build_s: f64,
    pub inspect_s: f64,
    pub boot_s: f64,
    pub failed: Vec<Failure>,
}

impl Report {
    pub fn print(&self) {
        let s = &self.settings;
        let explored = self.points.iter().filter(|p| p.images > 0).count();
        println!(
            "write-out {} (generation {}): {} persist barriers, {} crash points, {} explored",
            s.write_out,
            self.generation,
            self.barriers,
            self.crash_points,
            if explored == self.points.len() { "all".to_string() } else { explored.to_string() }
        );
        if self.shards.count > 1 {
            let run: Vec<String> = self.shards.run.iter().map(u64::to_string).collect();
            println!(
                "record {}: shards {} of {} ({}), {} work items in all",
                self.record,
                self.shards.run.len(),
                self.shards.count,
                run.join(", "),
                self.items
            );
        }
        println!("| crash point | lines undone | pending extents (lines) | subsets offered | images |");
        println!("|---|---|---|---|---|");
        for p in &self.points {
            let at = p.before_barrier.map_or("after the last barrier".into(), |b| format!("before barrier {b}"));
            println!(
                "| {at} | {} | {} ({}) | {} | {} |",
                p.durable_lines_undone, p.pending_extents, p.pending_lines, p.candidates, p.images
            );
        }
        for f in &self.failed {
            println!("FAILED at crash point {} with {} (item {}): {}", f.point, f.subset, f.item, f.why);
            if let Some(cmd) = &f.reproduce {
                println!("  reproduce: {cmd}");
            }
        }
        println!("| crash points | images | boots | failures | time |");
        println!("|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {} | {:.1} s (recording {:.1} s, images {:.1} s, inspect {:.1} s, boots {:.1} s) |",
            self.crash_points,
            self.images,
            self.boots,
            self.failures,
            self.explore_s,
            self.record_s,
            self.build_s,
            self.inspect_s,
            self.boot_s
        );
    }
}

fn read(path: &Path) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let format = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["format"].as_u64());
    if let Some(other) = format.filter(|&f| f != u64::from(FORMAT)) {
        bail!("{} is a report of format {other}; this vmm reads format {FORMAT}", path.display());
    }
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not an exploration's report (vmm explore run --json)", path.display()))
}

/// Adds up the reports of all the shards of one run, each exactly once.
pub fn merge(reports: &[(PathBuf, Report)]) -> anyhow::Result<Report> {
    let Some((first_path, first)) = reports.first() else { bail!("nothing to merge") };
    for (path, r) in reports {
        let (a, b) = (first_path.display(), path.display());
        if r.record != first.record {
            bail!(
                "{a} and {b} explore different records ({} and {}): record once, run every shard from it",
                first.record,
                r.record
            );
        }
        if r.options != first.options {
            bail!("{a} and {b} were run with different options ({:?} and {:?})", first.options, r.options);
        }
        if r.points.len() != first.points.len() || r.items != first.items {
            bail!("{a} and {b} disagree on the record's crash points or work items");
        }
    }
    let shards = whole(reports.iter().map(|(path, r)| (path.as_path(), &r.shards)))?;
    let mut merged =
        Report { shards, images: 0, boots: 0, failures: 0, stopped: false, failed: Vec::new(), ..first.clone() };
    (merged.explore_s, merged.build_s, merged.inspect_s, merged.boot_s) = (0.0, 0.0, 0.0, 0.0);
    merged.points.iter_mut().for_each(|p| p.images = 0);
    for (_, r) in reports {
        merged.images += r.images;
        merged.boots += r.boots;
        merged.failures += r.failures;
        merged.stopped |= r.stopped;
        merged.explore_s += r.explore_s;
        merged.build_s += r.build_s;
        merged.inspect_s += r.inspect_s;
        merged.boot_s += r.boot_s;
        for (m, p) in merged.points.iter_mut().zip(&r.points) {
            m.images += p.images;
        }
        merged.failed.extend(r.failed.iter().cloned());
    }
    merged.failed.sort_by_key(|f| f.item);
    Ok(merged)
}

/// `vmm explore merge FILES...`: the run's report, as text or JSON; exit status 1 if any
/// shard failed.
pub fn merge_files(files: &[PathBuf], json: bool) -> anyhow::Result<std::process::ExitCode> {
    let reports = files.iter().map(|p| Ok((p.clone(), read(p)?))).collect::<anyhow::Result<Vec<_>>>()?;
    let merged = merge(&reports)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&merged)?);
    } else {
        merged.print();
    }
    Ok(if merged.failures == 0 { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(index: u64, count: u64) -> Report {
        Report {
            format: FORMAT,
            record: "00-11".into(),
            settings: Settings { write_out: 3, mem: 64 << 20, cmdline: "apps=kv".into(), plant: None },
            options: Options {
                subsets_up_to: 8,
                sample: 8,
                seed: 1,
                max_images_per_point: 100,
                quick: false,
                points: vec![],
                keep_going: true,
            },
            shards: Shards { count, run: vec![index] },
            generation: 3,
            barriers: 1,
            commit_barrier: Some(0),
            crash_points: 2,
            items: 5,
            points: (0..2)
                .map(|i| PointReport {
                    before_barrier: (i == 0).then_some(0),
                    durable_lines_undone: 1,
                    pending_extents: 1,
                    pending_lines: 1,
                    candidates: 3,
                    images: 1 + index as usize,
                })
                .collect(),
            images: 2 + 2 * index,
            boots: 2 + 2 * index,
            failures: 1,
            stopped: false,
            record_s: 0.5,
            explore_s: 1.0,
            build_s: 0.1,
            inspect_s: 0.1,
            boot_s: 0.8,
            failed: vec![Failure {
                item: 3 - index as usize,
                point: 1,
                subset: "no pending line".into(),
                why: "why".into(),
                image: None,
                reproduce: None,
            }],
        }
    }

    fn named(reports: Vec<Report>) -> Vec<(PathBuf, Report)> {
        reports.into_iter().enumerate().map(|(i, r)| (PathBuf::from(format!("r{i}.json")), r)).collect()
    }

    #[test]
    fn shards_add_up() {
        let merged = merge(&named(vec![shard(0, 2), shard(1, 2)])).unwrap();
        assert_eq!(merged.shards, Shards { count: 2, run: vec![0, 1] });
        assert_eq!((merged.images, merged.boots, merged.failures), (6, 6, 2));
        assert_eq!(merged.points.iter().map(|p| p.images).collect::<Vec<_>>(), [3, 3]);
        assert_eq!(merged.failed.iter().map(|f| f.item).collect::<Vec<_>>(), [2, 3], "in the run's order");
        assert_eq!(merged.explore_s, 2.0);
        let text = serde_json::to_string(&merged).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&text).unwrap(), merged);
    }

    #[test]
    fn mixed_records_options_and_incomplete_splits_are_refused() {
        let mut other = shard(1, 2);
        other.record = "22-33".into();
        let e = merge(&named(vec![shard(0, 2), other])).unwrap_err().to_string();
        assert!(e.contains("different records"), "{e}");
        let mut other = shard(1, 2);
        other.options.seed = 2;
        let e = merge(&named(vec![shard(0, 2), other])).unwrap_err().to_string();
        assert!(e.contains("different options"), "{e}");
        let e = merge(&named(vec![shard(0, 2), shard(0, 2)])).unwrap_err().to_string();
        assert!(e.contains("shard 0/2 is in both r0.json and r1.json"), "{e}");
        let e = merge(&named(vec![shard(0, 2)])).unwrap_err().to_string();
        assert!(e.contains("shard(s) 1 of 2 missing"), "{e}");
        assert!(merge(&[]).is_err());
    }

    #[test]
    fn a_file_that_is_not_a_report_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.json");
        std::fs::write(&path, "{\"hello\": 1}").unwrap();
        assert!(format!("{:#}", read(&path).unwrap_err()).contains("notes.json is not an exploration's report"));
        let mut r = shard(0, 1);
        r.format = 7;
        std::fs::write(&path, serde_json::to_string(&r).unwrap()).unwrap();
        assert!(format!("{:#}", read(&path).unwrap_err()).contains("format 7"));
    }
}
