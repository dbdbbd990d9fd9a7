//! `vmm torture`: boot, run `kv` and `memtouch` with frequent write-outs, crash at a random
//! moment (a share of the crashes aimed inside write-outs), boot again and check the
//! restore: boot kind, restored generation at least the last committed one, `kv` verified.
//! Over and over; the first failure stops it with the seed and the command to reproduce.

use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use devices::control::{lock, MachineStatus, StatusHandle};
use indicatif::{ProgressBar, ProgressStyle};
use nvram::control::{BootKind, Operation, Verified};
use vmm::{ConsoleOutput, Machine, VcpuHandle, VmConfig};

use crate::args::{Copier, Model, TortureArgs};

/// The workloads under torture: a verifying `kv`, and `memtouch` to make write-outs long.
const CMDLINE: &str = "apps=kv,memtouch memtouch=32,32,256 memtouch_ms=20 kv_verify_every=1 checkpoint_ms=50";

/// xorshift64: reproducible crash times from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

struct Running {
    status: StatusHandle,
    vcpu: VcpuHandle,
    runner: thread::JoinHandle<Result<vmm::RunOutcome, vmm::Error>>,
}

fn boot(config: &VmConfig) -> anyhow::Result<Running> {
    let mut machine = Machine::build(config)?;
    let (status, vcpu) = (machine.status(), machine.stopper());
    let runner = thread::spawn(move || machine.run());
    Ok(Running { status, vcpu, runner })
}

impl Running {
    /// Waits until `done`, failing after `limit` or if the machine stopped.
    fn wait(&self, limit: Duration, what: &str, done: impl Fn(&MachineStatus) -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if done(&lock(&self.status)) {
                return Ok(());
            }
            if self.runner.is_finished() {
                bail!("the machine stopped while waiting for {what}");
            }
            if Instant::now() > deadline {
                bail!("no {what} within {limit:?}");
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// A power failure: the vCPU stops dead; returns whether a write-out was under way.
    fn crash(self) -> anyhow::Result<(MachineStatus, bool)> {
        self.vcpu.stop();
        let status = lock(&self.status).clone();
        let inside = status.writing_out.is_some();
        match self.runner.join() {
            Ok(Ok(_)) => Ok((status, inside)),
            Ok(Err(e)) => Err(e).context("the machine failed"),
            Err(_) => bail!("the vCPU thread panicked"),
        }
    }
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
    let mut rng = Rng(seed | 1);
    let console = args.nvram.with_extension("console.log");
    let mut config = VmConfig::new(&args.nvram);
    config.mem_size = Some(args.mem);
    config.cmdline = match args.copier {
        Copier::Engine => CMDLINE.into(),
        Copier::Cpu => format!("{CMDLINE} plate_copy=cpu"),
    };
    config.console = ConsoleOutput::File(console.clone());
    config.reformat = true;
    // Each crash reseeds the evictions from `rng` (below).
    config.persistence = crate::boot::persistence(args.persistence, Some(seed));
    if std::fs::metadata(&args.nvram).is_ok_and(|m| m.len() != args.mem) {
        std::fs::remove_file(&args.nvram).with_context(|| format!("cannot replace {}", args.nvram.display()))?;
    }

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
            evict.seed = rng.next();
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
                args.mem,
                args.inside_share,
                args.max_run_ms
            );
            Ok(ExitCode::from(1))
        }
    }
}

/// One boot, its checks, and its crash.
fn round(
    args: &TortureArgs,
    config: &VmConfig,
    rng: &mut Rng,
    tally: &mut Tally,
    last_committed: &mut u64,
) -> anyhow::Result<()> {
    let vm = boot_and_check(config, tally, *last_committed)?;
    // Crash: aimed inside a write-out, or at a random moment.
    if rng.unit() < args.inside_share {
        let _ = vm.wait(Duration::from_secs(5), "write-out", |s| s.writing_out.is_some());
    } else {
        thread::sleep(Duration::from_millis(rng.next() % args.max_run_ms.max(1)));
    }
    let (status, inside) = vm.crash()?;
    *last_committed = (*last_committed).max(status.committed_generation);
    tally.crashes += 1;
    tally.inside += u64::from(inside);
    Ok(())
}

/// The boot after the last crash: checked as every other, then stopped.
fn check_last(config: &VmConfig, tally: &mut Tally, last_committed: u64) -> anyhow::Result<()> {
    let vm = boot_and_check(config, tally, last_committed)?;
    vm.crash()?;
    Ok(())
}

/// Boots, and after a crash checks the restore: boot kind, generation, `kv` verified.
fn boot_and_check(config: &VmConfig, tally: &mut Tally, last_committed: u64) -> anyhow::Result<Running> {
    let vm = boot(config)?;
    vm.wait(Duration::from_secs(60), "boot report", |s| s.boot_kind.is_some())?;
    let kind = lock(&vm.status).boot_kind;
    if tally.crashes > 0 {
        if last_committed > 0 && kind != Some(BootKind::Restored) {
            bail!("boot {} was {kind:?}, not a restore", tally.crashes + 1);
        }
        if kind == Some(BootKind::Restored) {
            let status = lock(&vm.status).clone();
            let restore = status.of(Operation::Restore).last().context("the restore reported no metrics")?;
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
        vm.wait(Duration::from_secs(30), "kv verification", |s| {
            s.workloads.get("kv").is_some_and(|w| w.last_check != Verified::Unknown)
        })?;
        if lock(&vm.status).workloads["kv"].last_check != Verified::Passed {
            bail!("kv's verification FAILED after the restore");
        }
    }
    Ok(vm)
}

fn print_summary(tally: &Tally, failed: bool) {
    let mut times = tally.restore_times.clone();
    times.sort();
    let at = |q: f64| times.get(((times.len().max(1) - 1) as f64 * q).round() as usize).copied();
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
