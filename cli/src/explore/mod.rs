//! `vmm explore` (ADR only): every crash point of one real write-out. It boots the workloads,
//! records their `--write-out`th write-out barrier by barrier ([`devices::record`]), builds
//! the crash images of every point ([`images`]) and boots each in a fresh in-process
//! machine: the boot must restore, the generation must be the one committed at that point,
//! `inspect --check` must find the image consistent, and the workloads must verify.

pub mod images;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devices::record::{Plant, WriteOutRecord};
use devices::PersistenceModel;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nvram::control::{BootKind, Operation, Verified};
use serde::Serialize;
use vmm::{ConsoleOutput, Machine, VmConfig};

use crate::args::ExploreArgs;
use crate::inspect::Check;
use images::Subset;

/// The default workloads: a verifying `kv`, and `memtouch` to give write-outs pages to copy.
const CMDLINE: &str = "apps=kv,memtouch memtouch=32,32,256 memtouch_ms=20 kv_verify_every=1 checkpoint_ms=50";

/// The workloads of a command line that check their own state after a restore.
fn verified(cmdline: &str) -> Vec<&'static str> {
    let apps = cmdline.split_whitespace().find_map(|w| w.strip_prefix("apps=")).unwrap_or("");
    ["kv", "churn"].into_iter().filter(|w| apps.split(',').any(|a| a == *w)).collect()
}

/// A crash image that failed its checks.
#[derive(Debug, Serialize)]
struct Failure {
    point: usize,
    subset: String,
    why: String,
    image: Option<String>,
    reproduce: Option<String>,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    write_out: u64,
    generation: u64,
    barriers: usize,
    /// The barrier that writes the commit slot.
    commit_barrier: Option<usize>,
    crash_points: usize,
    /// Per crash point: its pending extents and the images built.
    points: Vec<PointReport>,
    images: u64,
    boots: u64,
    failures: u64,
    record_s: f64,
    explore_s: f64,
    /// Where the time went: building images, `inspect --check`, booting and checking.
    build_s: f64,
    inspect_s: f64,
    boot_s: f64,
    failed: Vec<Failure>,
}

#[derive(Debug, Serialize)]
struct PointReport {
    before_barrier: Option<usize>,
    durable_lines_undone: usize,
    pending_extents: usize,
    pending_lines: usize,
    images: usize,
}

/// How many failing images are kept (each a copy of the image).
const KEEP: usize = 3;

pub fn run(args: ExploreArgs) -> anyhow::Result<ExitCode> {
    let plant = args.plant.as_deref().map(parse_plant).transpose().map_err(crate::args::UsageError)?;
    if args.write_out < 2 {
        return Err(crate::args::UsageError(
            "--write-out must be 2 or more: the first write-out has nothing committed before it to fall back on".into(),
        )
        .into());
    }
    let cmdline = args.cmdline.clone().unwrap_or_else(|| CMDLINE.into());
    let started = Instant::now();
    let (hold, mem) = crate::torture::claim(&args.nvram, args.mem, args.force)?;
    let console = args.nvram.with_extension("console.log");
    let mut config = VmConfig::new(&args.nvram);
    config.mem_size = Some(mem);
    config.cmdline = cmdline.clone();
    config.console = ConsoleOutput::File(console.clone());
    config.reformat = true;
    config.persistence.model = PersistenceModel::Adr;
    config.validate().map_err(crate::boot::usage)?;

    let record = record(&config, args.write_out, plant)?;
    let record_s = started.elapsed().as_secs_f64();
    let points = images::points(&record);
    let plan: Vec<(usize, Subset)> = points
        .iter()
        .filter(|p| args.point.is_empty() || args.point.contains(&p.index))
        .flat_map(|p| {
            let subsets = match args.quick {
                true if p.extents.is_empty() => vec![Subset::None],
                true => vec![Subset::None, Subset::All],
                false => images::subsets(p.extents.len(), args.subsets_up_to, args.sample, args.seed ^ p.index as u64),
            };
            subsets.into_iter().map(move |s| (p.index, s))
        })
        .collect();
    let mut report = Report {
        write_out: args.write_out,
        generation: record.generation,
        barriers: record.barriers.len(),
        commit_barrier: commit_barrier(&record),
        crash_points: points.len(),
        points: points
            .iter()
            .map(|p| PointReport {
                before_barrier: (p.index < record.barriers.len()).then_some(p.index),
                durable_lines_undone: p.durable.len(),
                pending_extents: p.extents.len(),
                pending_lines: p.extents.iter().map(Vec::len).sum(),
                images: plan.iter().filter(|(i, _)| *i == p.index).count(),
            })
            .collect(),
        record_s,
        ..Report::default()
    };

    let base = hold.file();
    let mut memory = images::InMemory::read(base).context("cannot read the recorded image")?;
    let work_path = args.nvram.with_extension("crash.img");
    let work = images::create(&work_path).with_context(|| format!("cannot create {}", work_path.display()))?;
    let mut check = config.clone();
    check.image = work_path.clone();
    check.reformat = false;
    check.console = ConsoleOutput::File(args.nvram.with_extension("crash.console.log"));
    // The images are checked under eADR: the restore's stores need no write-back there.
    check.persistence.model = PersistenceModel::Eadr;
    let commit = commit_barrier(&record);
    let before_commit = commit.map(|c| images::before_commit(&record, c)).unwrap_or_default();
    let oracle = Oracle { generation: record.generation, commit, verified: verified(&cmdline) };

    let bar = ProgressBar::new(plan.len() as u64);
    if args.json {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} crash images ({msg}) {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for (index, subset) in &plan {
        let point = &points[*index];
        let t = Instant::now();
        let commit_kept = images::kept(point, subset)
            .any(|&(addr, _)| devices::record::is_commit(&[nvram::persist::FlushedRange { addr, len: 64 }]));
        let holds_commit = commit.is_some_and(|c| point.index > c) || commit_kept;
        let (inspected, missing) = memory.check(images::patch(point, subset), |bytes| match commit {
            Some(c) if holds_commit => images::missing(bytes, &before_commit, &record, c, point, subset),
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
            let n = report.failed.len();
            let kept = (n < KEEP).then(|| args.nvram.with_extension(format!("fail-{n}.img")));
            // Built again: the boot changed the work image.
            let kept = kept.filter(|k| {
                images::create(k)
                    .and_then(|f| images::clone_base(base, &f).and_then(|()| images::write_image(&f, point, subset)))
                    .is_ok()
            });
            report.failed.push(Failure {
                point: point.index,
                subset: subset.to_string(),
                why: format!("{why:#}"),
                reproduce: kept.as_ref().map(|k| reproduce(k, mem, &cmdline)),
                image: kept.map(|k| k.display().to_string()),
            });
            report.failures += 1;
            if !args.keep_going {
                break;
            }
        }
        bar.inc(1);
        bar.set_message(format!("{} failures", report.failures));
    }
    bar.finish_and_clear();
    let _ = std::fs::remove_file(&work_path);
    report.explore_s = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(if report.failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn parse_plant(text: &str) -> Result<Plant, String> {
    let bad = || {
        format!("\"{text}\" is not a planted bug: give flush:K, fence:K (K a barrier, from 0), flush:commit or fence:commit")
    };
    let (kind, k) = text.split_once(':').ok_or_else(bad)?;
    match (kind, k) {
        ("flush", "commit") => return Ok(Plant::DropCommitFlush),
        ("fence", "commit") => return Ok(Plant::DropCommitFence),
        _ => {}
    }
    let barrier: usize = k.parse().map_err(|_| bad())?;
    match kind {
        "flush" => Ok(Plant::DropFlush { barrier }),
        "fence" => Ok(Plant::DropFence { barrier }),
        _ => Err(bad()),
    }
}

/// Boots the workloads and records the `nth` write-out; the image is left as it ended.
fn record(config: &VmConfig, nth: u64, plant: Option<Plant>) -> anyhow::Result<WriteOutRecord> {
    let machine = Machine::build(config)?;
    machine.record_write_out(nth, plant)?;
    let vm = machine.spawn()?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let record = loop {
        if let Some(record) = vm.controller().write_out_record() {
            break record;
        }
        if vm.is_finished() || Instant::now() > deadline {
            bail!("the machine ran no write-out {nth} (it stopped, or took more than 120 s)");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    vm.stop().context("the recording machine failed")?;
    Ok(record)
}

/// The barrier that writes the commit (the first to write back a line of a commit slot):
/// from the point after it, the new generation is committed.
fn commit_barrier(record: &WriteOutRecord) -> Option<usize> {
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

fn print(r: &Report) {
    println!(
        "write-out {} (generation {}): {} persist barriers, {} crash points, {} explored",
        r.write_out,
        r.generation,
        r.barriers,
        r.crash_points,
        if r.points.iter().all(|p| p.images > 0) {
            "all".to_string()
        } else {
            format!("{}", r.points.iter().filter(|p| p.images > 0).count())
        }
    );
    println!("| crash point | lines undone | pending extents (lines) | images |");
    println!("|---|---|---|---|");
    for p in &r.points {
        let at = p.before_barrier.map_or("after the last barrier".into(), |b| format!("before barrier {b}"));
        println!("| {at} | {} | {} ({}) | {} |", p.durable_lines_undone, p.pending_extents, p.pending_lines, p.images);
    }
    for f in &r.failed {
        println!("FAILED at crash point {} with {}: {}", f.point, f.subset, f.why);
        if let Some(cmd) = &f.reproduce {
            println!("  reproduce: {cmd}");
        }
    }
    println!("| crash points | images | boots | failures | time |");
    println!("|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {:.1} s (recording {:.1} s, images {:.1} s, inspect {:.1} s, boots {:.1} s) |",
        r.crash_points, r.images, r.boots, r.failures, r.explore_s, r.record_s, r.build_s, r.inspect_s, r.boot_s
    );
}
