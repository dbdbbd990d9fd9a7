//! `vmm boot`: build the machine, run it, say how it ended.

use std::path::PathBuf;
use std::process::ExitCode;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use devices::GuestExit;
use nvram::control::Verified;
use nvram::exit::ExitCode as GuestCode;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook::iterator::Signals;
use vmm::config::{ConfigError, CrashEvict, Persistence, PersistenceModel};
use vmm::control_socket::{ControlSocket, CrashHook};
use vmm::image::ImageError;
use vmm::{ConsoleOutput, Controller, DiskConfig, KernelSource, Machine, MemoryKind, Prefault, RunOutcome, VmConfig};

use crate::args::{BootArgs, Memory, Model, PersistenceArgs, UsageError};

/// Exit status when the VMM itself fails (bad arguments, image, KVM).
pub const EXIT_VMM_ERROR: u8 = 1;
/// Exit status when the guest kernel panicked.
pub const EXIT_GUEST_PANIC: u8 = 3;
/// Exit status when the guest faulted (exception or triple fault).
pub const EXIT_GUEST_FAULT: u8 = 4;
/// Exit status when the guest refused the image (foreign or corrupt).
pub const EXIT_IMAGE_REFUSED: u8 = 5;
/// Exit status when the guest wrote an unknown value to the exit port.
pub const EXIT_GUEST_UNKNOWN: u8 = 6;
/// Exit status when the guest refused the disk as a plate store (`plate_store=disk`).
pub const EXIT_DISK_REFUSED: u8 = 9;
/// Exit status when a signal stopped the machine (128 + SIGINT, as shells report it).
pub const EXIT_SIGNAL: u8 = 130;
/// Set when a crash was asked for: the run's end is then the crash's, not an orderly stop.
static CRASHING: AtomicBool = AtomicBool::new(false);

/// Exit status after a crash asked for (control socket, or a second Ctrl-C): a power failure.
pub const EXIT_CRASHED: u8 = 7;
/// Exit status when the image file was deleted or truncated under the running machine:
/// what the guest stored is (partly) lost, whatever the guest did.
pub const EXIT_IMAGE_LOST: u8 = 8;

/// The machine the arguments describe, validated: a configuration that makes no sense is a
/// usage error, worded with the flags that made it.
pub fn config(args: BootArgs) -> Result<VmConfig, UsageError> {
    let (memory, image) = match (args.memory, args.nvram) {
        (Memory::Nvm, Some(image)) => (MemoryKind::Nvm, image),
        (Memory::Nvm, None) => {
            return Err(UsageError("--nvram IMG is needed: the image that is guest RAM (or --memory volatile)".into()))
        }
        (Memory::Volatile, None) => (MemoryKind::Volatile, PathBuf::new()),
        (Memory::Volatile, Some(_)) => {
            return Err(UsageError("--nvram names an image, but --memory volatile RAM has none".into()))
        }
    };
    let mut config = VmConfig::new(image);
    config.memory = memory;
    config.mem_size = args.mem;
    config.disk = args
        .disk
        .map(|path| DiskConfig { path, size_if_created: args.disk_size.unwrap_or(vmm::config::DEFAULT_DISK_SIZE) });
    config.reformat = args.reformat;
    config.kernel = args.kernel.map_or(KernelSource::Bundled, KernelSource::File);
    config.cmdline = args.cmdline;
    config.programs = args.apps;
    config.console = args.console.map_or(ConsoleOutput::Stdout, ConsoleOutput::File);
    config.kvm_device = args.kvm_device;
    config.set_engine_pause_ms(args.engine_pause_ms).map_err(usage)?;
    config.persistence = persistence(args.persistence, args.seed);
    if args.prefault {
        config.prefault = Prefault::All;
    }
    if args.reserve {
        config.allocation = vmm::image::Allocation::Reserve;
    }
    if args.sparse {
        config.allocation = vmm::image::Allocation::Sparse;
    }
    config.validate().map_err(usage)?;
    Ok(config)
}

/// A configuration error in the words of the command line.
pub fn usage(e: ConfigError) -> UsageError {
    UsageError(match e {
        ConfigError::CrashEvictUnderEadr => {
            "--crash-evict needs --persistence adr: under eadr every line is durable already".into()
        }
        ConfigError::EvictFraction(_) => format!("--crash-evict: {e}"),
        ConfigError::UnknownCmdlineItem { .. } | ConfigError::BadCmdlineValue { .. } | ConfigError::CmdlineTestKnob => {
            format!("--cmdline: {e}")
        }
        ConfigError::TestKnobsOff => format!("--engine-pause-ms: {e}"),
        ConfigError::PersistenceOfVolatileRam => {
            format!("--memory volatile: {e} (drop --persistence, --crash-evict and --sync)")
        }
        ConfigError::ImageOptionsOfVolatileRam => {
            format!("--memory volatile: {e} (drop --prefault, --reserve, --sparse and --reformat)")
        }
        ConfigError::RamSize(_) => format!("--mem: {e}"),
        ConfigError::DiskSize(_) => format!("--disk-size: {e}"),
        ConfigError::DiskStoreWithoutDisk => format!("--cmdline: {e}: give it one with --disk FILE"),
        ConfigError::DiskStoreWithoutPlates => format!("--cmdline: {e}: drop one of them"),
    })
}

/// A library error that names what the user typed, in the words of the command line.
fn in_cli_terms(e: vmm::Error, prefault: bool) -> anyhow::Error {
    match e {
        vmm::Error::Image(ImageError::SizeMismatch { path, actual, requested }) => anyhow::anyhow!(
            "{} holds {actual} bytes of RAM but --mem asks for {requested}; drop --mem to use the image as it is, or use another image",
            path.display()
        ),
        e @ vmm::Error::Prefault(_) if prefault => anyhow::Error::new(e).context("--prefault failed (boot without it)"),
        e => e.into(),
    }
}

/// The persistence model of the command line; `seed` chooses the lines a crash evicts.
pub fn persistence(args: PersistenceArgs, seed: Option<u64>) -> Persistence {
    let model = match args.persistence {
        Model::Eadr => PersistenceModel::Eadr,
        Model::Adr => PersistenceModel::Adr,
    };
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    let crash_evict = args.crash_evict.map(|fraction| CrashEvict { fraction, seed });
    Persistence { model, crash_evict, sync: args.sync }
}

pub fn run(args: BootArgs) -> anyhow::Result<ExitCode> {
    let control_path = args.control.clone();
    let prefault = args.prefault;
    let config = config(args)?;
    // The socket first: a boot refused for its socket must not leave a new image behind.
    let mut socket = control_path.as_deref().map(ControlSocket::bind).transpose()?;
    let machine = Machine::build(&config).map_err(|e| in_cli_terms(e, prefault))?;
    let controller = machine.controller();
    vmm::sigbus::report_sigbus_in(&machine.image_mappings(), EXIT_IMAGE_LOST)
        .context("cannot install the SIGBUS report")?;

    // A crash: the vCPU stops, the persistence model drops what it would lose at a power
    // failure (when the run returns), and the process ends at once.
    let crash_controller = controller.clone();
    let crash: CrashHook = Arc::new(move || {
        CRASHING.store(true, Ordering::SeqCst);
        crash_controller.crash();
        // The vCPU thread ends the process once the power failure is played out.
        loop {
            std::thread::park();
        }
    });
    if let Some(socket) = &mut socket {
        socket.start(controller.clone(), crash.clone())?;
    }

    // Ctrl-C, SIGTERM or SIGHUP (the terminal went away): a graceful shutdown if the guest
    // can do one, else a stop; a second one: a crash. SIGUSR1 means nothing to the machine:
    // it is ignored (said in the log) rather than left to kill the process, a power failure.
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP, SIGUSR1]).context("cannot install the signal handlers")?;
    let signal_handle = signals.handle();
    let signal_controller = controller.clone();
    let signal_thread = std::thread::spawn(move || {
        let mut first = None;
        for signal in signals.forever() {
            if signal == SIGUSR1 {
                tracing::warn!("SIGUSR1 ignored: it has no meaning for the machine (SIGTERM shuts it down)");
                continue;
            }
            if first.is_some() {
                crash();
            }
            first = Some(signal);
            if signal_controller.has_booted() {
                eprintln!("vmm: asking the guest to shut down (again to crash)");
                signal_controller.request_shutdown();
            } else {
                signal_controller.crash();
                break;
            }
        }
        first
    });

    let outcome = machine.spawn().and_then(vmm::RunningMachine::wait);
    if CRASHING.load(Ordering::SeqCst) {
        // Nothing of an orderly stop may happen after a crash.
        let held = match (config.memory, config.persistence.model) {
            (MemoryKind::Volatile, _) => "volatile RAM is lost; only the disk keeps anything",
            (_, PersistenceModel::Eadr) => "the image holds every store the guest made",
            (_, PersistenceModel::Adr) => "the image holds what the guest wrote back (and the evicted lines)",
        };
        eprintln!("vmm: crashed on request: the vCPU stopped dead; {held}");
        std::process::exit(i32::from(EXIT_CRASHED));
    }
    signal_handle.close();
    print_workloads(&controller);
    let signal = signal_thread.join().ok().flatten();

    let (code, message) = match outcome {
        Ok(RunOutcome::Guest(GuestExit::Code(GuestCode::PowerOff))) => (0, "the guest powered off".to_string()),
        Ok(RunOutcome::Guest(GuestExit::Code(GuestCode::Panic))) => {
            (EXIT_GUEST_PANIC, "the guest kernel panicked (its console shows why)".to_string())
        }
        Ok(RunOutcome::Guest(GuestExit::Code(GuestCode::Exception))) => {
            (EXIT_GUEST_FAULT, "the guest kernel stopped on a CPU exception (its console shows the registers)".to_string())
        }
        Ok(RunOutcome::Guest(GuestExit::Code(GuestCode::BadImage))) => (
            EXIT_IMAGE_REFUSED,
            format!(
                "the guest kernel refused the image {} (its console says why); `vmm boot --reformat` starts it afresh, discarding its contents",
                config.image.display()
            ),
        ),
        Ok(RunOutcome::Guest(GuestExit::Code(GuestCode::BadDisk))) => (
            EXIT_DISK_REFUSED,
            format!(
                "the guest kernel refused the disk {} as its plate store (its console says why)",
                config.disk.as_ref().map_or_else(|| "(none)".into(), |d| d.path.display().to_string())
            ),
        ),
        Ok(RunOutcome::Guest(GuestExit::Unknown(value))) => {
            (EXIT_GUEST_UNKNOWN, format!("the guest stopped the machine with unknown exit value {value:#x}"))
        }
        Ok(RunOutcome::Stopped) => {
            let name = match signal {
                Some(SIGTERM) => "SIGTERM",
                Some(SIGHUP) => "SIGHUP",
                _ => "Ctrl-C",
            };
            let kept = match config.memory {
                MemoryKind::Nvm => "the image holds the guest's memory as of the stop",
                MemoryKind::Volatile => "volatile RAM is lost",
            };
            (EXIT_SIGNAL, format!("stopped by {name}; {kept}"))
        }
        Err(vmm::Error::Guest(fault)) => (EXIT_GUEST_FAULT, format!("{:#}", anyhow::Error::new(fault))),
        Err(e) => return Err(e.into()),
    };
    // Whatever the guest did, a deleted or truncated image lost its memory; a truncation
    // also shows as a guest fault (its RAM vanished), which is not the cause to report.
    let (code, message) = match controller.image_fate() {
        Some((fate, text)) if !fate.is_kept() => (EXIT_IMAGE_LOST, format!("{text} (the guest's own end: {message})")),
        _ => (code, message),
    };
    eprintln!("vmm: {message}");
    Ok(ExitCode::from(code))
}

/// One line per workload that reported, from the machine-control device's last values.
fn print_workloads(controller: &Controller) {
    for (name, w) in &controller.snapshot().workloads {
        let check = match w.last_check {
            Verified::Passed => "verify passed",
            Verified::Failed => "verify FAILED",
            Verified::Unknown => "not verified",
        };
        eprintln!(
            "vmm: workload {name} (process {}): progress {}, checksum {:#018x}, {check}, {} heartbeats",
            w.pid, w.progress, w.checksum, w.heartbeats
        );
    }
}
