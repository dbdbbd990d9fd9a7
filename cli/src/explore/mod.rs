//! `vmm explore` (ADR only): every crash point of one real write-out. It boots the workloads,
//! records their `--write-out`th write-out barrier by barrier ([`devices::record`]), builds
//! the crash images of every point ([`images`], [`subsets`]) and boots each in a fresh
//! in-process machine ([`run`]): the boot must restore, the generation must be the one
//! committed at that point, `inspect --check` must find the image consistent, and the
//! workloads must verify.
//!
//! `vmm explore record --out DIR` keeps the record on disk ([`store`]) instead, `vmm explore
//! run --from DIR --shard I/N` explores a share of it (on any host), and `vmm explore merge`
//! adds the shards' reports up ([`summary`]).

pub mod images;
mod run;
mod store;
pub mod subsets;
mod summary;

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devices::record::{Plant, WriteOutRecord};
use devices::PersistenceModel;
use vmm::image::ImageHold;
use vmm::{ConsoleOutput, Machine, VmConfig};

use crate::args::{Copier, ExploreArgs, ExploreCommand, ExploreRecordArgs, ExploreRunArgs, RecordOpts, RunOpts};
use crate::torture::shard::Shard;
use store::{Recorded, Settings};
use summary::Options;

/// The default workloads: a verifying `kv`, and `memtouch` to give write-outs pages to copy.
const CMDLINE: &str = "apps=kv,memtouch memtouch=32,32,256 memtouch_ms=20 kv_verify_every=1 checkpoint_ms=50";

pub fn run(args: ExploreArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(ExploreCommand::Record(a)) => record_into(a),
        Some(ExploreCommand::Run(a)) => run_from(a),
        Some(ExploreCommand::Merge(a)) => summary::merge_files(&a.files, a.json),
        None => {
            let nvram = args.nvram.context("--nvram is required")?;
            let (hold, recorded, record_s) = record(&nvram, &args.record)?;
            let mut memory = images::InMemory::read(hold.file()).context("cannot read the recorded image")?;
            let recorded = Recorded {
                id: store::identity(&recorded.0, &recorded.1, memory.crc())?,
                settings: recorded.0,
                record: recorded.1,
            };
            let names = run::Names { stem: nvram.clone() };
            let options = options(&args.run);
            let mut report =
                run::explore(hold.file(), &mut memory, &recorded, options, Shard::WHOLE, &names, args.run.json)?;
            report.record_s = record_s;
            finish(&report, args.run.json)
        }
    }
}

/// `vmm explore record --out DIR`.
fn record_into(args: ExploreRecordArgs) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
    let base = store::base_path(&args.out);
    let (hold, (settings, record), record_s) = record(&base, &args.record)?;
    let memory = images::InMemory::read(hold.file()).with_context(|| format!("cannot read {}", base.display()))?;
    let id = store::write(&args.out, &settings, &record, memory.len() as u64, memory.crc())?;
    drop(hold);
    let commit = run::commit_barrier(&record);
    let points = images::points(&record);
    if args.json {
        let json = serde_json::json!({
            "record": id,
            "settings": settings,
            "generation": record.generation,
            "barriers": record.barriers.len(),
            "commit_barrier": commit,
            "crash_points": points.len(),
            "record_s": record_s,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        println!(
            "recorded write-out {} (generation {}) into {}: {} persist barriers (the commit: {}), {} crash points; record {id}, {:.1} s",
            settings.write_out,
            record.generation,
            args.out.display(),
            record.barriers.len(),
            commit.map_or("none".into(), |c| format!("barrier {c}")),
            points.len(),
            record_s
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `vmm explore run --from DIR`.
fn run_from(args: ExploreRunArgs) -> anyhow::Result<ExitCode> {
    let (recorded, header) = store::read(&args.from)?;
    let base_path = store::base_path(&args.from);
    let base = std::fs::File::open(&base_path).with_context(|| format!("cannot open {}", base_path.display()))?;
    let mut memory = images::InMemory::read(&base).with_context(|| format!("cannot read {}", base_path.display()))?;
    store::check_base(&base_path, memory.crc(), &header)?;
    let shard = args.shard.unwrap_or(Shard::WHOLE);
    let scratch = args.scratch.unwrap_or_else(|| args.from.clone());
    std::fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    let stem = match shard.count {
        1 => scratch.join("run.img"),
        _ => scratch.join(format!("shard-{}-of-{}.img", shard.index, shard.count)),
    };
    let report =
        run::explore(&base, &mut memory, &recorded, options(&args.run), shard, &run::Names { stem }, args.run.json)?;
    finish(&report, args.run.json)
}

fn options(run: &RunOpts) -> Options {
    Options {
        subsets_up_to: run.subsets_up_to,
        sample: run.sample,
        seed: run.seed,
        max_images_per_point: run.max_images_per_point,
        quick: run.quick,
        points: run.point.clone(),
        keep_going: run.keep_going,
    }
}

fn finish(report: &summary::Report, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        report.print();
    }
    Ok(if report.failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// A planted bug: in the VMM's persistence domain, or in the guest's CPU copier (an item
/// of its command line).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Planted {
    Domain(Plant),
    Guest(String),
}

fn parse_plant(text: &str) -> Result<Planted, String> {
    let bad = || {
        format!(
            "\"{text}\" is not a planted bug: give flush:K, fence:K (K a barrier, from 0), flush:commit, fence:commit, cpu-fence:commit or cpu-flush:K (K a flush of the write-out, from 0)"
        )
    };
    let (kind, k) = text.split_once(':').ok_or_else(bad)?;
    match (kind, k) {
        ("flush", "commit") => return Ok(Planted::Domain(Plant::DropCommitFlush)),
        ("fence", "commit") => return Ok(Planted::Domain(Plant::DropCommitFence)),
        ("cpu-fence", "commit") => return Ok(Planted::Guest("test_plant=fence:commit".into())),
        _ => {}
    }
    let k: usize = k.parse().map_err(|_| bad())?;
    match kind {
        "flush" => Ok(Planted::Domain(Plant::DropFlush { barrier: k })),
        "fence" => Ok(Planted::Domain(Plant::DropFence { barrier: k })),
        "cpu-flush" => Ok(Planted::Guest(format!("test_plant=flush:{k}"))),
        _ => Err(bad()),
    }
}

/// Boots the workloads on `nvram` (claimed and started afresh, as torture does) and records
/// their `--write-out`th write-out; the image is left as it ended, held.
fn record(nvram: &Path, opts: &RecordOpts) -> anyhow::Result<(ImageHold, (Settings, WriteOutRecord), f64)> {
    let plant = opts.plant.as_deref().map(parse_plant).transpose().map_err(crate::args::UsageError)?;
    if opts.write_out < 2 {
        return Err(crate::args::UsageError(
            "--write-out must be 2 or more: the first write-out has nothing committed before it to fall back on".into(),
        )
        .into());
    }
    let mut cmdline = opts.cmdline.clone().unwrap_or_else(|| CMDLINE.into());
    if opts.copier == Copier::Cpu {
        cmdline.push_str(" plate_copy=cpu");
    }
    let cpu = cmdline.split_whitespace().any(|w| w == "plate_copy=cpu");
    if matches!(plant, Some(Planted::Guest(_))) && !cpu {
        return Err(crate::args::UsageError(
            "--plant cpu-...: the bug goes into the guest's CPU copier, which only --copier cpu uses".into(),
        )
        .into());
    }
    let started = Instant::now();
    let (hold, mem) = crate::torture::claim(nvram, opts.mem, opts.force)?;
    let mut config = VmConfig::new(nvram);
    config.mem_size = Some(mem);
    config.cmdline = match &plant {
        Some(Planted::Guest(item)) => format!("{cmdline} {item}"),
        _ => cmdline.clone(),
    };
    config.console = ConsoleOutput::File(nvram.with_extension("console.log"));
    config.reformat = true;
    config.persistence.model = PersistenceModel::Adr;
    config.validate().map_err(crate::boot::usage)?;
    let domain_plant = match plant {
        Some(Planted::Domain(p)) => Some(p),
        _ => None,
    };
    let record = record_write_out(&config, opts.write_out, domain_plant)?;
    let settings = Settings { write_out: opts.write_out, mem, cmdline, plant: opts.plant.clone() };
    Ok((hold, (settings, record), started.elapsed().as_secs_f64()))
}

/// Boots `config` and records its `nth` write-out; the image is left as it ended.
fn record_write_out(config: &VmConfig, nth: u64, plant: Option<Plant>) -> anyhow::Result<WriteOutRecord> {
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
