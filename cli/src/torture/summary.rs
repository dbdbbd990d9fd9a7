//! What a torture run found, as text or JSON, and `vmm torture merge`: the JSON summaries of
//! the shards of one campaign added up into the campaign's.
//!
//! A summary carries what a merge needs besides the counts: the campaign's seed and
//! configuration (shards of different campaigns are never added), which shards it covers,
//! and every restore's time (quantiles of a merge cannot be computed from the shards'
//! quantiles).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use vmm::quantile::quantile;

/// The version of the JSON summary; a merge refuses others.
pub const FORMAT: u32 = 1;

/// What makes two runs shards of the same campaign: all of it must be equal to merge them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    pub seed: u64,
    /// Crashes of the whole campaign (all shards).
    pub crashes: u64,
    pub mem: u64,
    pub inside_share: f64,
    pub max_run_ms: u64,
    /// `engine` or `cpu`.
    pub copier: String,
    /// `eadr` or `adr`.
    pub persistence: String,
    pub crash_evict: Option<f64>,
    pub sync: bool,
    /// The guest's command line.
    pub cmdline: String,
}

impl Campaign {
    /// The model in words, as the text summary says it.
    pub fn model(&self) -> String {
        match (self.persistence.as_str(), self.crash_evict) {
            ("adr", None) => "ADR: only written-back lines are durable, no evictions".into(),
            ("adr", Some(f)) => format!("ADR: only written-back lines are durable, {f} of the others evicted"),
            ("volatile", _) => "volatile RAM, lost at each crash: the plates are on the disk (plate_store=disk)".into(),
            _ => "eADR: every store is durable".into(),
        }
    }
}

/// Which shards of how many a summary covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shards {
    pub count: u64,
    /// The shards' indexes, ascending.
    pub run: Vec<u64>,
}

/// The counts, each the sum over the shards.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub crashes: u64,
    /// Crashes the schedule aimed at a write-out (it waits for one to start).
    pub aimed_inside: u64,
    /// Crashes that fell inside a write-out (started, not yet reported committed).
    pub inside: u64,
    /// Crashes that fell during a lazy restore (`restore=lazy`: restored, its end, every
    /// page back, not yet reported).
    #[serde(default)]
    pub during_lazy: u64,
    /// Boots after a crash that restored.
    pub restores: u64,
    /// Restores whose generation was checked against the last committed one.
    pub generations_checked: u64,
    /// Boots after a crash whose workloads (`kv`, `churn`) all verified.
    pub verified: u64,
    /// `inspect --check` runs on crashed images, and the violations they found.
    pub checks: u64,
    pub violations: u64,
    pub failures: u64,
}

/// Where the crashes inside write-outs fell among the write-outs' persist barriers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    /// Whether the guest announced its barriers (ADR, or `--sync`); without, no histogram.
    pub announced: bool,
    /// Crashes inside a write-out, by how many of its barriers had run.
    pub by_barriers: BTreeMap<u64, u64>,
    /// The fewest and most barriers a committed write-out ran, as the crashes saw them.
    pub write_out_barriers: Option<(u64, u64)>,
}

impl Coverage {
    pub fn add(&mut self, passed: u64, last_write_out: Option<u64>) {
        *self.by_barriers.entry(passed).or_default() += 1;
        self.saw_write_out(last_write_out);
    }

    fn saw_write_out(&mut self, barriers: Option<u64>) {
        if let Some(n) = barriers {
            let (lo, hi) = self.write_out_barriers.unwrap_or((n, n));
            self.write_out_barriers = Some((lo.min(n), hi.max(n)));
        }
    }
}

/// A failure: what a shard found, and how to run that shard again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub shard: u64,
    /// The campaign index of the last crash before the failure (none: the first boot).
    pub after_crash: Option<u64>,
    pub message: String,
    pub image: String,
    pub reproduce: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub format: u32,
    pub campaign: Campaign,
    pub shards: Shards,
    pub counts: Counts,
    pub coverage: Coverage,
    /// Every restore's time, in µs (for the quantiles of a merge).
    pub restore_us: Vec<u64>,
    pub failures: Vec<Failure>,
}

impl Summary {
    /// The text summary: the model, the coverage, failures, then the table (last).
    pub fn print(&self) {
        println!("persistence: {}", self.campaign.model());
        if self.shards.count > 1 {
            let run: Vec<String> = self.shards.run.iter().map(u64::to_string).collect();
            println!("shards: {} of {} ({})", self.shards.run.len(), self.shards.count, run.join(", "));
        }
        println!("{}", self.coverage_line());
        for f in &self.failures {
            let after = f.after_crash.map_or("at the first boot".into(), |k| format!("after crash {k}"));
            println!("failure in shard {} {after}: {}", f.shard, f.message);
            println!("  reproduce: {}", f.reproduce);
        }
        let mut times: Vec<Duration> = self.restore_us.iter().map(|&us| Duration::from_micros(us)).collect();
        times.sort();
        let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3));
        let c = &self.counts;
        println!("| crashes | inside write-outs | restores | failures | restore median | restore p99 |");
        println!("|---|---|---|---|---|---|");
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            c.crashes,
            c.inside,
            c.restores,
            c.failures,
            ms(quantile(&times, 0.5)),
            ms(quantile(&times, 0.99))
        );
    }

    /// What share of the crashes fell inside a write-out, and between which barriers.
    pub fn coverage_line(&self) -> String {
        let c = &self.counts;
        let share = if c.crashes == 0 { 0.0 } else { c.inside as f64 * 100.0 / c.crashes as f64 };
        let mut line =
            format!("coverage: {share:.0}% of the crashes fell inside a write-out ({} of {})", c.inside, c.crashes);
        if c.during_lazy > 0 {
            line.push_str(&format!(", {} during a lazy restore (pages still in their save areas)", c.during_lazy));
        }
        let cov = &self.coverage;
        if !cov.announced {
            line.push_str("; barriers not announced (eADR), so not placed among them");
            return line;
        }
        // Every interval between two barriers of a write-out, those no crash fell in too.
        let last =
            cov.write_out_barriers.map_or(0, |(_, hi)| hi).max(cov.by_barriers.keys().max().copied().unwrap_or(0));
        let interval = |k: u64| match k {
            0 => "start-1".to_string(),
            k if Some(k) == cov.write_out_barriers.map(|(_, hi)| hi) => format!("{k}-end"),
            k => format!("{k}-{}", k + 1),
        };
        let hist: Vec<String> =
            (0..=last).map(|k| format!("{}: {}", interval(k), cov.by_barriers.get(&k).copied().unwrap_or(0))).collect();
        let of = match cov.write_out_barriers {
            Some((lo, hi)) if lo == hi => format!(" ({lo} a write-out)"),
            Some((lo, hi)) => format!(" ({lo} to {hi} a write-out)"),
            None => String::new(),
        };
        line.push_str(&format!("; between persist barriers{of}: {}", hist.join(", ")));
        line
    }
}

/// Reads a JSON summary, naming the file in any error.
fn read(path: &Path) -> anyhow::Result<Summary> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let summary: Summary = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a torture summary (vmm torture --json)", path.display()))?;
    if summary.format != FORMAT {
        bail!("{} is a summary of format {}; this vmm reads format {FORMAT}", path.display(), summary.format);
    }
    Ok(summary)
}

/// The fields in which two campaigns differ, by name.
fn differences(a: &Campaign, b: &Campaign) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return vec!["campaign".into()];
    };
    a.iter()
        .filter(|(k, v)| b.get(*k) != Some(v))
        .map(|(k, v)| format!("{k} {v} against {}", b.get(k).unwrap_or(&serde_json::Value::Null)))
        .collect()
}

/// Adds up the summaries of all the shards of one campaign, each exactly once.
pub fn merge(summaries: &[(PathBuf, Summary)]) -> anyhow::Result<Summary> {
    let Some((first_path, first)) = summaries.first() else { bail!("nothing to merge") };
    let mut merged = Summary {
        format: FORMAT,
        campaign: first.campaign.clone(),
        shards: Shards { count: first.shards.count, run: Vec::new() },
        counts: Counts::default(),
        coverage: Coverage { announced: first.coverage.announced, ..Coverage::default() },
        restore_us: Vec::new(),
        failures: Vec::new(),
    };
    for (path, s) in summaries {
        let diff = differences(&first.campaign, &s.campaign);
        if !diff.is_empty() {
            bail!(
                "{} and {} are not shards of the same campaign: {}",
                first_path.display(),
                path.display(),
                diff.join(", ")
            );
        }
    }
    merged.shards = whole(summaries.iter().map(|(path, s)| (path.as_path(), &s.shards)))?;
    for (_, s) in summaries {
        let (m, c) = (&mut merged.counts, &s.counts);
        m.crashes += c.crashes;
        m.aimed_inside += c.aimed_inside;
        m.inside += c.inside;
        m.during_lazy += c.during_lazy;
        m.restores += c.restores;
        m.generations_checked += c.generations_checked;
        m.verified += c.verified;
        m.checks += c.checks;
        m.violations += c.violations;
        m.failures += c.failures;
        for (&k, &n) in &s.coverage.by_barriers {
            *merged.coverage.by_barriers.entry(k).or_default() += n;
        }
        if let Some((lo, hi)) = s.coverage.write_out_barriers {
            merged.coverage.saw_write_out(Some(lo));
            merged.coverage.saw_write_out(Some(hi));
        }
        merged.restore_us.extend(&s.restore_us);
        merged.failures.extend(s.failures.iter().cloned());
    }
    Ok(merged)
}

/// The shards that `parts` (each a file and the shards it covers) cover together, when they
/// are all the shards of one split, each exactly once; else what is wrong, naming the files.
/// (`vmm torture merge` and `vmm explore merge` both.)
pub fn whole<'a>(parts: impl IntoIterator<Item = (&'a Path, &'a Shards)>) -> anyhow::Result<Shards> {
    let mut parts = parts.into_iter();
    let Some((first_path, first)) = parts.next() else { bail!("nothing to merge") };
    let mut owner: BTreeMap<u64, &Path> = BTreeMap::new();
    for (path, shards) in std::iter::once((first_path, first)).chain(parts) {
        if shards.count != first.count {
            bail!(
                "{} is split in {} shards but {} in {}",
                first_path.display(),
                first.count,
                path.display(),
                shards.count
            );
        }
        for &i in &shards.run {
            if i >= shards.count {
                bail!("{} claims shard {i} of {}", path.display(), shards.count);
            }
            if let Some(other) = owner.insert(i, path) {
                bail!("shard {i}/{} is in both {} and {}", shards.count, other.display(), path.display());
            }
        }
    }
    let missing: Vec<String> = (0..first.count).filter(|i| !owner.contains_key(i)).map(|i| i.to_string()).collect();
    if !missing.is_empty() {
        bail!("shard(s) {} of {} missing: no file given holds them", missing.join(", "), first.count);
    }
    Ok(Shards { count: first.count, run: owner.into_keys().collect() })
}

/// `vmm torture merge FILES...`: the campaign's summary, as text or JSON; exit status 1 if
/// any shard failed.
pub fn merge_files(files: &[PathBuf], json: bool) -> anyhow::Result<std::process::ExitCode> {
    let summaries = files.iter().map(|p| Ok((p.clone(), read(p)?))).collect::<anyhow::Result<Vec<_>>>()?;
    let merged = merge(&summaries)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&merged)?);
    } else {
        merged.print();
    }
    Ok(if merged.counts.failures == 0 { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::from(1) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(index: u64, count: u64, crashes: u64) -> Summary {
        Summary {
            format: FORMAT,
            campaign: Campaign {
                seed: 9,
                crashes: 6,
                mem: 128 << 20,
                inside_share: 0.4,
                max_run_ms: 300,
                copier: "engine".into(),
                persistence: "adr".into(),
                crash_evict: None,
                sync: false,
                cmdline: "apps=kv".into(),
            },
            shards: Shards { count, run: vec![index] },
            counts: Counts { crashes, inside: 1, restores: crashes, checks: crashes, ..Counts::default() },
            coverage: Coverage {
                announced: true,
                by_barriers: [(index, 1)].into(),
                write_out_barriers: Some((4 + index, 4 + index)),
            },
            restore_us: vec![1000 + index],
            failures: vec![],
        }
    }

    fn named(summaries: Vec<Summary>) -> Vec<(PathBuf, Summary)> {
        summaries.into_iter().enumerate().map(|(i, s)| (PathBuf::from(format!("s{i}.json")), s)).collect()
    }

    #[test]
    fn shards_add_up() {
        let merged = merge(&named(vec![shard(1, 2, 3), shard(0, 2, 3)])).unwrap();
        assert_eq!(merged.shards, Shards { count: 2, run: vec![0, 1] });
        assert_eq!(merged.counts.crashes, 6);
        assert_eq!(merged.counts.restores, 6);
        assert_eq!(merged.counts.inside, 2);
        assert_eq!(merged.coverage.by_barriers, [(0, 1), (1, 1)].into());
        assert_eq!(merged.coverage.write_out_barriers, Some((4, 5)));
        assert_eq!(merged.restore_us.len(), 2);
        let line = merged.coverage_line();
        assert!(line.contains("(4 to 5 a write-out): start-1: 1, 1-2: 1, 2-3: 0, 3-4: 0, 4-5: 0, 5-end: 0"), "{line}");
        // A merged summary reads back as it was written.
        let text = serde_json::to_string(&merged).unwrap();
        assert_eq!(serde_json::from_str::<Summary>(&text).unwrap(), merged);
    }

    #[test]
    fn other_campaigns_overlaps_and_gaps_are_refused() {
        let mut other = shard(1, 2, 3);
        other.campaign.seed = 10;
        let e = merge(&named(vec![shard(0, 2, 3), other])).unwrap_err().to_string();
        assert!(e.contains("not shards of the same campaign") && e.contains("seed 9 against 10"), "{e}");
        let mut other = shard(1, 2, 3);
        other.campaign.persistence = "eadr".into();
        let e = merge(&named(vec![shard(0, 2, 3), other])).unwrap_err().to_string();
        assert!(e.contains("persistence"), "{e}");
        let e = merge(&named(vec![shard(0, 2, 3), shard(0, 2, 3)])).unwrap_err().to_string();
        assert!(e.contains("shard 0/2 is in both s0.json and s1.json"), "{e}");
        let e = merge(&named(vec![shard(0, 3, 2), shard(2, 3, 2)])).unwrap_err().to_string();
        assert!(e.contains("shard(s) 1 of 3 missing"), "{e}");
        let e = merge(&named(vec![shard(0, 2, 3), shard(1, 3, 2)])).unwrap_err().to_string();
        assert!(e.contains("split in 2 shards") && e.contains("in 3"), "{e}");
        assert!(merge(&[]).is_err());
    }

    #[test]
    fn a_file_that_is_not_a_summary_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.json");
        std::fs::write(&path, "{\"hello\": 1}").unwrap();
        let e = format!("{:#}", read(&path).unwrap_err());
        assert!(e.contains("notes.json is not a torture summary"), "{e}");
        let mut s = shard(0, 1, 1);
        s.format = 99;
        std::fs::write(&path, serde_json::to_string(&s).unwrap()).unwrap();
        assert!(format!("{:#}", read(&path).unwrap_err()).contains("format 99"));
        assert!(format!("{:#}", read(&dir.path().join("missing")).unwrap_err()).contains("cannot read"));
    }
}
