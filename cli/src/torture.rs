//! `vmm torture`: boot, run `kv`, `memtouch` and `churn` with frequent write-outs, crash at
//! a random moment (a share of the crashes aimed inside write-outs), boot again and check
//! the restore: boot kind, restored generation at least the last committed one, `kv` and
//! `churn` verified.
//! Over and over; the first failure stops it with the seed and the command to reproduce.

use std::process::ExitCode;
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context};
use devices::MachineStatus;
use indicatif::{ProgressBar, ProgressStyle};
use nvram::control::{BootKind, Operation, Verified};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use vmm::quantile::quantile;
use vmm::{ConsoleOutput, Machine, RunningMachine, VmConfig};

use crate::args::{Copier, Model, TortureArgs};

/// The workloads under torture: a verifying `kv`, `memtouch` to make write-outs long, and
/// `churn`, which maps and unmaps past every table's capacity and verifies all it holds.
const CMDLINE: &str = "apps=kv,memtouch,churn memtouch=32,32,256 memtouch_ms=20 kv_verify_every=1 checkpoint_ms=50";

/// The workloads whose own check must pass after every restore.
const VERIFIED: [&str; 2] = ["kv", "churn"];

/// A power failure: the vCPU stops dead; returns the last status and whether a write-out
/// was under way.
fn crash(vm: RunningMachine) -> anyhow::Result<(MachineStatus, bool)> {
    vm.controller().crash();
    let status = vm.controller().snapshot();
    let inside = status.writing_out.is_some();
    vm.wait().context("the machine failed")?;
    Ok((status, inside))
}

#[derive(Default)]
struct Tally {
    crashes: u64,
    inside: u64,
    restores: u64,
    restore_times: Vec<Duration>,
}

pub fn run(args: TortureArgs) -> anyhow::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
    });
    // Reproducible crash times and evictions, all from the one seed.
    let mut rng = SmallRng::seed_from_u64(seed);
    let console = args.nvram.with_extension("console.log");
    // Held to the end of the run, across every reboot (see `claim`).
    let (_hold, mem) = claim(&args)?;
    let mut config = VmConfig::new(&args.nvram);
    config.mem_size = Some(mem);
    config.cmdline = match args.copier {
        Copier::Engine => CMDLINE.into(),
        Copier::Cpu => format!("{CMDLINE} plate_copy=cpu"),
    };
    config.console = ConsoleOutput::File(console.clone());
    config.reformat = true;
    // Each crash reseeds the evictions from `rng` (below).
    config.persistence = crate::boot::persistence(args.persistence, Some(seed));
    config.validate().map_err(crate::boot::usage)?;

    let bar = ProgressBar::new(args.crashes);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} crashes ({msg}) {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut tally = Tally::default();
    let mut last_committed = 0u64;
    let failure = loop {
        if tally.crashes == args.crashes {
            // The last crash is checked too: one more boot, verified, then stopped.
            break check_last(&config, &mut tally, last_committed).err();
        }
        // Each crash evicts other lines, all following from the one seed.
        if let Some(evict) = config.persistence.crash_evict.as_mut() {
            evict.seed = rng.random();
        }
        match round(&args, &config, &mut rng, &mut tally, &mut last_committed) {
            Ok(()) => {
                config.reformat = false;
                bar.inc(1);
                bar.set_message(format!("{} inside write-outs", tally.inside));
            }
            Err(e) => break Some(e),
        }
    };
    bar.finish_and_clear();
    let model = match (args.persistence.persistence, args.persistence.crash_evict) {
        (Model::Eadr, _) => "eADR: every store is durable".to_string(),
        (Model::Adr, None) => "ADR: only written-back lines are durable, no evictions".to_string(),
        (Model::Adr, Some(f)) => format!("ADR: only written-back lines are durable, {f} of the others evicted"),
    };
    println!("persistence: {model}");
    print_summary(&tally, failure.is_some());
    match failure {
        None => Ok(ExitCode::SUCCESS),
        Some(e) => {
            eprintln!("FAILED after {} crashes: {e:#}", tally.crashes);
            eprintln!("the image is kept: {} (console: {})", args.nvram.display(), console.display());
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
            eprintln!(
                "reproduce: vmm torture --nvram {} --crashes {} --seed {seed} --mem {} --inside-share {} --max-run-ms {}{model}",
                args.nvram.display(),
                args.crashes,
                mem,
                args.inside_share,
                args.max_run_ms
            );
            Ok(ExitCode::from(1))
        }
    }
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
fn claim(args: &TortureArgs) -> anyhow::Result<(vmm::image::ImageHold, u64)> {
    let path = args.nvram.display();
    let (hold, created) = vmm::image::ImageHold::lock(&args.nvram)?;
    let file = hold.file();
    let len = file.metadata().with_context(|| format!("cannot read {path}"))?.len();
    let image = len > 0 && vmm::image::has_root_header(file).with_context(|| format!("cannot read {path}"))?;
    let mem = args.mem.unwrap_or(if image { len } else { nvram::layout::DEFAULT_RAM });
    vmm::image::check_size("--mem", mem)?;
    if len > 0 && !image && !args.force {
        bail!(
            "{path} is not an image of this machine (no valid root header): torture would overwrite it; give --force to make it a new image of {} MiB",
            mem >> 20
        );
    }
    if image && len != mem && !args.force {
        bail!(
            "{path} is an image of {len} bytes but --mem asks for {mem}; drop --mem to torture it at its size, or give --force to make it a new image of {} MiB",
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

/// One boot, its checks, and its crash.
fn round(
    args: &TortureArgs,
    config: &VmConfig,
    rng: &mut SmallRng,
    tally: &mut Tally,
    last_committed: &mut u64,
) -> anyhow::Result<()> {
    let vm = boot_and_check(config, tally, *last_committed)?;
    // Crash: aimed inside a write-out, or at a random moment.
    if rng.random::<f64>() < args.inside_share {
        let _ = vm.wait_for(Duration::from_secs(5), "write-out", |s| s.writing_out.is_some());
    } else {
        thread::sleep(Duration::from_millis(rng.random_range(0..args.max_run_ms.max(1))));
    }
    let (status, inside) = crash(vm)?;
    *last_committed = (*last_committed).max(status.committed_generation);
    tally.crashes += 1;
    tally.inside += u64::from(inside);
    consistent(config, tally.crashes)
}

/// `vmm inspect --check` on the crashed image, before the boot that restores it: any
/// violation is a failure.
fn consistent(config: &VmConfig, crash: u64) -> anyhow::Result<()> {
    let check = crate::inspect::check_file(&config.image)?;
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
    let vm = boot_and_check(config, tally, last_committed)?;
    crash(vm)?;
    Ok(())
}

/// Boots, and after a crash checks the restore: boot kind, generation, `kv` and `churn`
/// verified.
fn boot_and_check(config: &VmConfig, tally: &mut Tally, last_committed: u64) -> anyhow::Result<RunningMachine> {
    let vm = Machine::build(config)?.spawn()?;
    let status = vm.wait_for(Duration::from_secs(60), "boot report", |s| s.boot_kind.is_some())?;
    let kind = status.boot_kind;
    if tally.crashes > 0 {
        if last_committed > 0 && kind != Some(BootKind::Restored) {
            bail!("boot {} was {kind:?}, not a restore", tally.crashes + 1);
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
            tally.restores += 1;
            tally.restore_times.push(restore.total);
        }
        let status = vm.wait_for(Duration::from_secs(30), "kv and churn verifications", |s| {
            VERIFIED.iter().all(|name| s.workloads.get(*name).is_some_and(|w| w.last_check != Verified::Unknown))
        })?;
        for name in VERIFIED {
            verdict(&status, name)?;
        }
    }
    Ok(vm)
}

fn print_summary(tally: &Tally, failed: bool) {
    let mut times = tally.restore_times.clone();
    times.sort();
    let at = |q: f64| quantile(&times, q);
    let ms = |d: Option<Duration>| d.map_or("-".into(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3));
    println!("| crashes | inside write-outs | restores | failures | restore median | restore p99 |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| {} | {} | {} | {} | {} | {} |",
        tally.crashes,
        tally.inside,
        tally.restores,
        u64::from(failed),
        ms(at(0.5)),
        ms(at(0.99))
    );
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
