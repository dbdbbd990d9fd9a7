//! The exploration of a recorded write-out: its work items (crash point and subset, in one
//! order, so that a shard runs the items whose index is its own modulo the shards), each
//! checked in memory by `inspect --check` and the protocol's own rule, then booted in a
//! fresh in-process machine and checked by the [`Oracle`].

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devices::record::WriteOutRecord;
use devices::PersistenceModel;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nvram::control::{BootKind, Operation, Verified};
use vmm::{ConsoleOutput, Machine, VmConfig};

use super::images::{self, InMemory, Point};
use super::store::Recorded;
use super::subsets::{self, Limits, Subset};
use super::summary::{Failure, Options, PointReport, Report, FORMAT};
use crate::inspect::Check;
use crate::torture::shard::Shard;
use crate::torture::summary::Shards;

/// How many failing images are kept (each a copy of the image).
const KEEP: usize = 3;

/// Where a run builds its images: `STEM.crash.img` (and its console), `STEM.fail-N.img`.
pub struct Names {
    pub stem: PathBuf,
}

impl Names {
    fn work(&self) -> PathBuf {
        self.stem.with_extension("crash.img")
    }
    fn console(&self) -> PathBuf {
        self.stem.with_extension("crash.console.log")
    }
    fn kept(&self, n: usize) -> PathBuf {
        self.stem.with_extension(format!("fail-{n}.img"))
    }
}

/// The work items of a record, in the order of the whole run: each point's subsets, the
/// points in order.
pub fn plan(points: &[Point], options: &Options) -> (Vec<(usize, Subset)>, Vec<usize>) {
    let limits = Limits {
        up_to: options.subsets_up_to,
        sample: options.sample,
        max: options.max_images_per_point,
        quick: options.quick,
    };
    let mut items = Vec::new();
    let mut candidates = Vec::new();
    for p in points {
        if !options.points.is_empty() && !options.points.contains(&p.index) {
            candidates.push(0);
            continue;
        }
        let (subsets, offered) = subsets::subsets(&p.extents, limits, options.seed ^ p.index as u64);
        candidates.push(offered);
        items.extend(subsets.into_iter().map(|s| (p.index, s)));
    }
    (items, candidates)
}

/// Explores `shard`'s items of `recorded`, whose base image is `base` (read whole into
/// `memory`); `json`: no progress bar.
pub fn explore(
    base: &File,
    memory: &mut InMemory,
    recorded: &Recorded,
    options: Options,
    shard: Shard,
    names: &Names,
    json: bool,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let record = &recorded.record;
    let settings = &recorded.settings;
    let points = images::points(record);
    let (plan, candidates) = plan(&points, &options);
    let mine: Vec<(usize, &(usize, Subset))> =
        plan.iter().enumerate().filter(|(k, _)| *k as u64 % shard.count == shard.index).collect();
    let commit = commit_barrier(record);
    let mut report = Report {
        format: FORMAT,
        record: recorded.id.clone(),
        settings: settings.clone(),
        options: options.clone(),
        shards: Shards { count: shard.count, run: vec![shard.index] },
        generation: record.generation,
        barriers: record.barriers.len(),
        commit_barrier: commit,
        crash_points: points.len(),
        items: plan.len(),
        points: points
            .iter()
            .zip(&candidates)
            .map(|(p, &candidates)| PointReport {
                before_barrier: (p.index < record.barriers.len()).then_some(p.index),
                durable_lines_undone: p.durable.len(),
                pending_extents: p.extents.len(),
                pending_lines: p.extents.iter().map(Vec::len).sum(),
                candidates,
                images: mine.iter().filter(|(_, (i, _))| *i == p.index).count(),
            })
            .collect(),
        images: 0,
        boots: 0,
        failures: 0,
        stopped: false,
        record_s: 0.0,
        explore_s: 0.0,
        build_s: 0.0,
        inspect_s: 0.0,
        boot_s: 0.0,
        failed: Vec::new(),
    };

    let work_path = names.work();
    let work = images::create(&work_path).with_context(|| format!("cannot create {}", work_path.display()))?;
    let mut check = VmConfig::new(&work_path);
    check.mem_size = Some(settings.mem);
    check.cmdline = settings.cmdline.clone();
    check.console = ConsoleOutput::File(names.console());
    // The images are checked under eADR: the restore's stores need no write-back there.
    check.persistence.model = PersistenceModel::Eadr;
    let before_commit = commit.map(|c| images::before_commit(record, c)).unwrap_or_default();
    let oracle = Oracle { generation: record.generation, commit, verified: verified(&settings.cmdline) };

    let bar = ProgressBar::new(mine.len() as u64);
    if json {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} crash images ({msg}) {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for (n, &(item, (index, subset))) in mine.iter().enumerate() {
        let point = &points[*index];
        let t = Instant::now();
        let commit_kept = images::kept(point, subset)
            .any(|&(addr, _)| devices::record::is_commit(&[nvram::persist::FlushedRange { addr, len: 64 }]));
        let holds_commit = commit.is_some_and(|c| point.index > c) || commit_kept;
        let (inspected, missing) = memory.check(images::patch(point, subset), |bytes| match commit {
            Some(c) if holds_commit => images::missing(bytes, &before_commit, record, c, point, subset),
            _ => Vec::new(),
        });
        report.inspect_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        images::clone_base(base, &work).with_context(|| format!("cannot build {}", work_path.display()))?;
        images::write_image(&work, point, subset).with_context(|| format!("cannot write {}", work_path.display()))?;
        report.build_s += t.elapsed().as_secs_f64();
        report.images += 1;
        let verdict = match missing.first() {
            // The protocol's own rule, whatever the checksums can see: no commit without
            // everything announced before it.
            Some(first) => Err(anyhow::anyhow!(
                "the image holds the commit of generation {} but {} line(s) announced durable before it are not in it (the first at {first:#x})",
                record.generation,
                missing.len()
            )),
            None => oracle.check(&check, point.index, commit_kept, inspected, &mut report),
        };
        if let Err(why) = verdict {
            let kept_n = report.failed.len();
            let kept = (kept_n < KEEP).then(|| names.kept(kept_n));
            // Built again: the boot changed the work image.
            let kept = kept.filter(|k| {
                images::create(k)
                    .and_then(|f| images::clone_base(base, &f).and_then(|()| images::write_image(&f, point, subset)))
                    .is_ok()
            });
            report.failed.push(Failure {
                item,
                point: point.index,
                subset: subset.to_string(),
                why: format!("{why:#}"),
                reproduce: kept.as_ref().map(|k| reproduce(k, settings.mem, &settings.cmdline)),
                image: kept.map(|k| k.display().to_string()),
            });
            report.failures += 1;
            if !options.keep_going {
                report.stopped = n + 1 < mine.len();
                break;
            }
        }
        bar.inc(1);
        bar.set_message(format!("{} failures", report.failures));
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_file(&work_path);
    report.explore_s = started.elapsed().as_secs_f64();
    Ok(report)
}

/// The workloads of a command line that check their own state after a restore.
fn verified(cmdline: &str) -> Vec<&'static str> {
    let apps = cmdline.split_whitespace().find_map(|w| w.strip_prefix("apps=")).unwrap_or("");
    ["kv", "churn"].into_iter().filter(|w| apps.split(',').any(|a| a == *w)).collect()
}

/// The barrier that writes the commit (the first to write back a line of a commit slot):
/// from the point after it, the new generation is committed.
pub fn commit_barrier(record: &WriteOutRecord) -> Option<usize> {
    record.barriers.iter().position(|b| devices::record::is_commit(&b.announced))
}

/// What a crash image must do when booted.
struct Oracle {
    generation: u64,
    commit: Option<usize>,
    verified: Vec<&'static str>,
}

impl Oracle {
    /// `inspect --check`, then a boot that restores the right generation and whose
    /// workloads verify.
    /// `commit_kept`: the image holds lines of a commit slot that the point's durable state
    /// lacks (pending ones it kept), so that the new generation may be whole.
    fn check(
        &self,
        config: &VmConfig,
        point: usize,
        commit_kept: bool,
        check: Check,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        if let Some(v) = check.violations.first() {
            bail!("inspect --check finds {} violation(s), the first: {v}", check.violations.len());
        }
        if let Some(why) = check.unchecked {
            bail!("inspect --check could not check the image: {why}");
        }
        report.boots += 1;
        let t = Instant::now();
        let result = self.boot(config, point, commit_kept);
        report.boot_s += t.elapsed().as_secs_f64();
        result
    }

    /// The boot of a crash image, and its checks.
    fn boot(&self, config: &VmConfig, point: usize, commit_kept: bool) -> anyhow::Result<()> {
        let vm = Machine::build(config)?.spawn()?;
        let status = vm.wait_for(Duration::from_secs(60), "boot report", |s| s.boot_kind.is_some())?;
        if status.boot_kind != Some(BootKind::Restored) {
            bail!("the boot was {:?}, not a restore", status.boot_kind);
        }
        let restore = status.of(Operation::Restore).last().context("the restore reported no metrics")?;
        let got = restore.report.generation;
        if restore.report.rolled_back != 0 {
            bail!(
                "the restore rolled back {} generation(s) (to {got}): a commit was damaged",
                restore.report.rolled_back
            );
        }
        let committed = self.commit.is_some_and(|c| point > c);
        let (old, new) = (self.generation - 1, self.generation);
        if committed && got != new {
            bail!(
                "restored generation {got}, but the commit of {new} had been made durable (barrier {:?})",
                self.commit
            );
        }
        if !committed && !commit_kept && got != old {
            bail!(
                "restored generation {got}, but the commit of {new} is not in the image: {old} was the last committed"
            );
        }
        if got != old && got != new {
            bail!("restored generation {got}: neither {old} nor {new}");
        }
        let verified = &self.verified;
        let status = vm.wait_for(Duration::from_secs(30), "workload verifications", |s| {
            verified.iter().all(|name| s.workloads.get(*name).is_some_and(|w| w.last_check != Verified::Unknown))
        })?;
        for name in verified {
            if status.workloads.get(*name).map(|w| w.last_check) != Some(Verified::Passed) {
                bail!("{name}'s verification FAILED after restoring generation {got}");
            }
        }
        drop(vm);
        Ok(())
    }
}

fn reproduce(image: &Path, mem: u64, cmdline: &str) -> String {
    format!("vmm inspect --check {0} && vmm boot --nvram {0} --mem {mem} --cmdline '{cmdline}'", image.display())
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::record::{BarrierRecord, Line};

    fn run_of(first: u64, n: u64) -> Vec<Line> {
        (0..n).map(|i| ((first + i) * 64, [0xa0 + i as u8; 64])).collect()
    }

    /// A synthetic write-out whose only bug shows in one line: a 12-line structure (a run
    /// of adjacent pending lines) whose line 5 must never be durable without line 4, among
    /// ten other runs. No subset of whole runs can keep one without the other; the plan,
    /// with its cap, still builds an image that does.
    #[test]
    fn a_bug_that_only_one_line_shows_is_in_the_plan() {
        let mut pending = run_of(1000, 12);
        for k in 0..10 {
            pending.extend(run_of(2000 + 100 * k, 3));
        }
        pending.sort_by_key(|l| l.0);
        let record = WriteOutRecord {
            generation: 4,
            barriers: vec![BarrierRecord { pending: pending.clone(), ..BarrierRecord::default() }],
            pending_at_end: pending,
            done: true,
        };
        let points = images::points(&record);
        let options = Options {
            subsets_up_to: 8,
            sample: 8,
            seed: 1,
            max_images_per_point: 100,
            quick: false,
            points: vec![],
            keep_going: false,
        };
        let (items, candidates) = plan(&points, &options);
        assert_eq!(candidates.len(), 2);
        let exposes = |point: &Point, subset: &Subset| {
            let kept: Vec<u64> = images::kept(point, subset).map(|l| l.0 / 64).collect();
            kept.contains(&1005) && !kept.contains(&1004)
        };
        for point in &points {
            let found: Vec<&Subset> =
                items.iter().filter(|(i, s)| *i == point.index && exposes(point, s)).map(|(_, s)| s).collect();
            assert!(found.contains(&&Subset::Lines(vec![5])), "point {}: {found:?}", point.index);
            let by_extents = items.iter().filter(|(i, s)| *i == point.index && matches!(s, Subset::Extents(_)));
            assert!(by_extents.clone().count() > 10 && !by_extents.clone().any(|(_, s)| exposes(point, s)));
        }
        // The same plan from the same record and options: what makes shards agree.
        assert_eq!(plan(&points, &options).0, items);
        let quick = Options { quick: true, ..options };
        assert_eq!(plan(&points, &quick).0.len(), 4, "none and all, at both points");
    }
}
