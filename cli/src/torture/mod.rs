//! `vmm torture`: boot, run `kv`, `memtouch` and `churn` with frequent write-outs, crash at
//! a random moment (a share of the crashes aimed inside write-outs), boot again and check
//! the restore: boot kind, restored generation at least the last committed one, `kv` and
//! `churn` verified.
//! Over and over; the first failure stops it with the seed and the command to reproduce.
//! A campaign may be split into shards run anywhere ([`shard`]), whose JSON summaries
//! `vmm torture merge` adds up ([`summary`]).

pub mod shard;
pub mod summary;
mod volatile;

use std::path::Path;
use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context};
use devices::{MachineStatus, PersistenceModel};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use nvram::control::{BootKind, Operation, Verified};
use vmm::{ConsoleOutput, Machine, RunningMachine, VmConfig};

use crate::args::{Copier, Memory, Model, Restore, TortureArgs, TortureCommand};
use shard::Shard;
use summary::{Campaign, Counts, Coverage, Failure, Shards, Summary};

/// The workloads under torture: a verifying `kv`, `memtouch` to make write-outs long, and
/// `churn`, which maps and unmaps past every table's capacity and verifies all it holds.
const CMDLINE: &str = "apps=kv,memtouch,churn memtouch=32,32,256 memtouch_ms=20 kv_verify_every=1 checkpoint_ms=50";

/// The workloads whose own check must pass after every restore.
const VERIFIED: [&str; 2] = ["kv", "churn"];

/// What a run has counted so far.
#[derive(Default)]
struct Tally {
    counts: Counts,
    coverage: Coverage,
    restore_times: Vec<Duration>,
    /// The campaign index of the last crash.
    last_crash: Option<u64>,
}

/// A power failure: the vCPU stops dead; returns the last status and, if a write-out was
/// under way, where among its barriers.
fn crash(vm: RunningMachine) -> anyhow::Result<(MachineStatus, Option<vmm::WriteOutPoint>)> {
    vm.controller().crash();
    let status = vm.controller().snapshot();
    let point = vm.controller().write_out_point();
    vm.wait().context("the machine failed")?;
    Ok((status, point))
}

pub fn run(args: TortureArgs) -> anyhow::Result<ExitCode> {
    if let Some(TortureCommand::Merge(merge)) = &args.command {
        return summary::merge_files(&merge.files, merge.json);
    }
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    let shard = args.shard.unwrap_or(Shard::WHOLE);
    let mut cmdline = match args.copier {
        Copier::Engine => CMDLINE.to_string(),
        Copier::Cpu => format!("{CMDLINE} plate_copy=cpu"),
    };
    if args.restore == Some(Restore::Eager) {
        cmdline.push_str(" restore=eager");
    }
    // What the state lives in (the image, or the volatile machine's disk), its console, and
    // the hold on the image to the end of the run, across every reboot (see `claim`).
    let (nvram, _hold, mut config) = match (args.memory, &args.disk) {
        (Memory::Volatile, Some(disk)) => (disk.clone(), None, volatile::config(&args, disk, &cmdline)?),
        (Memory::Nvm, Some(_)) => bail!("--disk tortures the volatile plate function: give --memory volatile too"),
        (_, None) => {
            let Some(nvram) = args.nvram.clone() else { bail!("torture needs --nvram IMG") };
            let (hold, mem) = claim(&nvram, args.mem, args.force)?;
            let mut config = VmConfig::new(&nvram);
            config.mem_size = Some(mem);
            config.cmdline = cmdline;
            config.reformat = true;
            // Each crash reseeds the evictions from its plan (below).
            config.persistence = crate::boot::persistence(args.persistence, Some(seed));
            (nvram, Some(hold), config)
        }
    };
    let console = nvram.with_extension("console.log");
    config.console = ConsoleOutput::File(console.clone());
    config.validate().map_err(crate::boot::usage)?;
    let mem = config.ram_size();
    let campaign = campaign(&args, seed, mem, &config.cmdline);

    let mine: Vec<u64> = shard.crashes(args.crashes).collect();
    let bar = ProgressBar::new(mine.len() as u64);
    if args.json {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} crashes ({msg}) {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut tally = Tally::default();
    tally.coverage.announced = config.persistence.model == PersistenceModel::Adr || config.persistence.sync;
    let mut last_committed = 0u64;
    // Crashes are aimed at a lazy restore only where there is one (NVM, `restore=lazy`),
    // and never twice in a row: the boot after one verifies what it restored.
    let lazy = args.memory == Memory::Nvm && args.restore != Some(Restore::Eager);
    let mut unverified = false;
    let mut crashes = mine.iter();
    let failure = loop {
        let Some(&index) = crashes.next() else {
            // The last crash is checked too: one more boot, verified, then stopped.
            break (!mine.is_empty()).then(|| check_last(&config, &mut tally, last_committed).err()).flatten();
        };
        let mut plan = shard::plan(seed, index, args.inside_share, args.max_run_ms);
        plan.aimed_lazy &= lazy && !unverified;
        unverified = plan.aimed_lazy;
        // Each crash evicts other lines, all following from the seed and its index.
        if let Some(evict) = config.persistence.crash_evict.as_mut() {
            evict.seed = plan.evict_seed;
        }
        match round(&config, plan, index, &mut tally, &mut last_committed) {
            Ok(()) => {
                config.reformat = false;
                // The disk was started afresh once (`volatile::config`); from now on it holds
                // the state.
                bar.inc(1);
                bar.set_message(format!("{} inside write-outs", tally.counts.inside));
            }
            Err(e) => break Some(e),
        }
    };
    bar.finish_and_clear();
    let failure = failure.map(|e| Failure {
        shard: shard.index,
        after_crash: tally.last_crash,
        message: format!("{e:#}"),
        image: nvram.display().to_string(),
        reproduce: reproduce(&args, &nvram, seed, mem),
    });
    tally.counts.failures = u64::from(failure.is_some());
    let summary = Summary {
        format: summary::FORMAT,
        campaign,
        shards: Shards { count: shard.count, run: vec![shard.index] },
        counts: tally.counts,
        coverage: tally.coverage,
        restore_us: tally.restore_times.iter().map(|d| d.as_micros() as u64).collect(),
        failures: failure.iter().cloned().collect(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        summary.print();
    }
    match failure {
        None => Ok(ExitCode::SUCCESS),
        Some(f) => {
            eprintln!("FAILED after {} crashes: {}", summary.counts.crashes, f.message);
            eprintln!("the image is kept: {} (console: {})", f.image, console.display());
            eprintln!("reproduce: {}", f.reproduce);
            Ok(ExitCode::from(1))
        }
    }
}

/// The campaign this run belongs to: what its shards must share.
fn campaign(args: &TortureArgs, seed: u64, mem: u64, cmdline: &str) -> Campaign {
    let p = &args.persistence;
    Campaign {
        seed,
        crashes: args.crashes,
        mem,
        inside_share: args.inside_share,
        max_run_ms: args.max_run_ms,
        copier: match args.copier {
            Copier::Engine => "engine",
            Copier::Cpu => "cpu",
        }
        .into(),
        persistence: match (args.memory, p.persistence) {
            (Memory::Volatile, _) => "volatile",
            (_, Model::Eadr) => "eadr",
            (_, Model::Adr) => "adr",
        }
        .into(),
        crash_evict: p.crash_evict,
        sync: p.sync,
        cmdline: cmdline.into(),
    }
}

/// The command that runs this shard again.
fn reproduce(args: &TortureArgs, nvram: &Path, seed: u64, mem: u64) -> String {
    let p = &args.persistence;
    let mut model = String::new();
    if p.persistence == Model::Adr {
        model.push_str(" --persistence adr");
    }
    if let Some(fraction) = p.crash_evict {
        model.push_str(&format!(" --crash-evict {fraction}"));
    }
    if p.sync {
        model.push_str(" --sync");
    }
    if args.copier == Copier::Cpu {
        model.push_str(" --copier cpu");
    }
    if args.restore == Some(Restore::Eager) {
        model.push_str(" --restore eager");
    }
    if args.disk.is_some() {
        let size = args.disk_size.map_or(String::new(), |s| format!(" --disk-size {s}"));
        return format!(
            "vmm torture --memory volatile --disk {} --crashes {} --seed {seed} --mem {mem} --inside-share {} \
             --max-run-ms {}{size}{model}",
            nvram.display(),
            args.crashes,
            args.inside_share,
            args.max_run_ms
        );
    }
    if let Some(shard) = args.shard {
        model.push_str(&format!(" --shard {shard}"));
    }
    format!(
        "vmm torture --nvram {} --crashes {} --seed {seed} --mem {mem} --inside-share {} --max-run-ms {}{model}",
        nvram.display(),
        args.crashes,
        args.inside_share,
        args.max_run_ms
    )
}

/// Takes the image for the whole run and makes it ready: its size, the RAM size to boot.
///
/// Torture reboots in-process, and each boot's [`Machine`] opens and locks the image itself,
/// and drops it (and so its lock) at the crash. Between two boots another VMM could take
/// the image, so torture holds it for the run with a [`vmm::image::ImageHold`]: its open
/// file description keeps the image's locks (flock and OFD), and each boot's open reuses
/// that description (a new one would conflict with the locks, which belong to the
/// description, not to the process). A sidecar lock file would not do: `vmm boot` and
/// QEMU look only at the image's own locks.
///
/// The hold is taken before the file is read: a file another program holds is refused
/// (naming the holder), even with `--force`, and left untouched. Then torture starts
/// afresh only a file it may overwrite: a new or empty file, or one that holds a valid root
/// header of this format (an image, as torture or `vmm boot` made it) of the `--mem` size.
/// Any other file, or an image of another size, only with `--force`.
pub(crate) fn claim(nvram: &Path, mem: Option<u64>, force: bool) -> anyhow::Result<(vmm::image::ImageHold, u64)> {
    let path = nvram.display();
    let (hold, created) = vmm::image::ImageHold::lock(nvram)?;
    let file = hold.file();
    let len = file.metadata().with_context(|| format!("cannot read {path}"))?.len();
    let image = len > 0 && vmm::image::has_root_header(file).with_context(|| format!("cannot read {path}"))?;
    let mem = mem.unwrap_or(if image { len } else { nvram::layout::DEFAULT_RAM });
    vmm::image::check_size("--mem", mem)?;
    if len > 0 && !image && !force {
        bail!(
            "{path} is not an image of this machine (no valid root header): it would be overwritten; give --force to make it a new image of {} MiB",
            mem >> 20
        );
    }
    if image && len != mem && !force {
        bail!(
            "{path} is an image of {len} bytes but --mem asks for {mem}; drop --mem to use it at its size, or give --force to make it a new image of {} MiB",
            mem >> 20
        );
    }
    if created || len != mem || !image {
        // Emptied, then sized: nothing of the old contents is left to mistake for state.
        file.set_len(0).and_then(|()| file.set_len(mem)).with_context(|| format!("cannot size {path}"))?;
    }
    Ok((hold, mem))
}

/// A workload's verdict after a restore, from a status that should hold it: a workload
/// that never reported (or a guest that rebooted and lost its report) is a failure, not a
/// panic.
fn verdict(status: &MachineStatus, name: &str) -> anyhow::Result<()> {
    match status.workloads.get(name).map(|w| w.last_check) {
        Some(Verified::Passed) => Ok(()),
        Some(Verified::Unknown) | None => bail!("{name} reported no verification after the restore"),
        Some(_) => bail!("{name}'s verification FAILED after the restore"),
    }
}

/// One boot, its checks, and its crash (crash `index` of the campaign, as `plan` says).
fn round(
    config: &VmConfig,
    plan: shard::Plan,
    index: u64,
    tally: &mut Tally,
    last_committed: &mut u64,
) -> anyhow::Result<()> {
    let vm = boot_and_check(config, tally, *last_committed, plan.aimed_lazy)?;
    // Crash: aimed inside a write-out, at a lazy restore, or at a random moment.
    if plan.aimed_lazy && vm.controller().snapshot().boot_kind == Some(BootKind::Restored) {
        let _ = vm.wait_for(Duration::from_secs(5), "the restored processes", |s| s.running.is_some());
        thread::sleep(Duration::from_micros(plan.lazy_us));
    } else if plan.aimed_inside {
        let _ = vm.wait_for(Duration::from_secs(5), "write-out", |s| s.writing_out.is_some());
    } else {
        thread::sleep(Duration::from_millis(plan.run_ms));
    }
    let (status, point) = crash(vm)?;
    *last_committed = (*last_committed).max(status.committed_generation);
    let c = &mut tally.counts;
    c.crashes += 1;
    c.during_lazy += u64::from(status.left_pages_unrestored() && status.boot_kind == Some(BootKind::Restored));
    c.aimed_inside += u64::from(plan.aimed_inside);
    if let Some(point) = point {
        c.inside += 1;
        if let Some(passed) = point.barriers_passed {
            tally.coverage.add(passed, point.last_write_out_barriers);
        }
    }
    tally.last_crash = Some(index);
    consistent(config, index, tally)
}

/// `vmm inspect --check` on the crashed image, before the boot that restores it: any
/// violation is a failure.
fn consistent(config: &VmConfig, crash: u64, tally: &mut Tally) -> anyhow::Result<()> {
    let check = match &config.disk {
        Some(disk) if config.memory == vmm::MemoryKind::Volatile => volatile::check_disk(&disk.path)?,
        _ => crate::inspect::check_file(&config.image)?,
    };
    tally.counts.checks += 1;
    tally.counts.violations += check.violations.len() as u64;
    if let Some(v) = check.violations.first() {
        bail!("after crash {crash}, inspect --check finds {} violation(s), the first: {v}", check.violations.len());
    }
    if let Some(why) = check.unchecked {
        bail!("after crash {crash}, inspect --check could not check the image: {why}");
    }
    Ok(())
}

/// The boot after the last crash: checked as every other, then stopped.
fn check_last(config: &VmConfig, tally: &mut Tally, last_committed: u64) -> anyhow::Result<()> {
    let vm = boot_and_check(config, tally, last_committed, false)?;
    crash(vm)?;
    Ok(())
}

/// Boots, and after a crash checks the restore: boot kind, generation, `kv` and `churn`
/// verified (unless `early`: the crash is aimed at the restore's lazy part, and the next
/// boot verifies what it restores).
fn boot_and_check(
    config: &VmConfig,
    tally: &mut Tally,
    last_committed: u64,
    early: bool,
) -> anyhow::Result<RunningMachine> {
    let vm = Machine::build(config)?.spawn()?;
    let status = vm.wait_for(Duration::from_secs(60), "boot report", |s| s.boot_kind.is_some())?;
    let kind = status.boot_kind;
    if tally.counts.crashes > 0 {
        if last_committed > 0 && kind != Some(BootKind::Restored) {
            bail!("boot {} was {kind:?}, not a restore", tally.counts.crashes + 1);
        }
        if kind == Some(BootKind::Restored) {
            let restore = status.of(Operation::Restore).last().context("the restore reported no metrics")?;
            if restore.report.rolled_back != 0 {
                bail!(
                    "the restore rolled back {} generation(s): a commit was found damaged",
                    restore.report.rolled_back
                );
            }
            if restore.report.generation < last_committed {
                bail!(
                    "restored generation {} but generation {} was committed",
                    restore.report.generation,
                    last_committed
                );
            }
            tally.counts.restores += 1;
            tally.counts.generations_checked += 1;
            tally.restore_times.push(restore.total);
            if early {
                return Ok(vm);
            }
        }
        let status = vm.wait_for(Duration::from_secs(30), "kv and churn verifications", |s| {
            VERIFIED.iter().all(|name| s.workloads.get(*name).is_some_and(|w| w.last_check != Verified::Unknown))
        })?;
        for name in VERIFIED {
            verdict(&status, name)?;
        }
        tally.counts.verified += 1;
    }
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::control::WorkloadStatus;

    #[test]
    fn a_missing_kv_report_is_a_failure_not_a_panic() {
        let mut status = MachineStatus::default();
        let e = verdict(&status, "kv").unwrap_err();
        assert!(e.to_string().contains("kv reported no verification"), "{e}");
        let kv = |last_check| WorkloadStatus {
            pid: 1,
            progress: 0,
            checksum: 0,
            verified: last_check,
            last_check,
            heartbeats: 0,
            updated: std::time::Instant::now(),
        };
        status.workloads.insert("kv".into(), kv(Verified::Passed));
        verdict(&status, "kv").unwrap();
        status.workloads.insert("kv".into(), kv(Verified::Failed));
        assert!(verdict(&status, "kv").unwrap_err().to_string().contains("FAILED"));
        assert!(verdict(&status, "churn").unwrap_err().to_string().contains("churn reported no verification"));
    }
}
