//! `vmm`: the command line of the NVM machine. It turns arguments into a
//! [`vmm::VmConfig`] and reports the outcome; the machine itself lives in the `vmm` crate.

mod args;
mod boot;
mod ctl;
mod explore;
mod inspect;
mod inspect_disk;
mod report;
mod torture;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    // Output piped into `head` and the like: a report ends quietly when its reader goes, as
    // a shell tool does. Not a running machine: SIGPIPE would be a power failure, so `boot`
    // keeps it ignored and goes on without its console (see devices::serial::ConsoleOut).
    if !matches!(cli.command, args::Command::Boot(_)) {
        // SAFETY: restoring the default disposition of SIGPIPE, before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    // Torture boots hundreds of machines under a progress bar: their logs only if asked.
    let level = match &cli.command {
        args::Command::Torture(_) | args::Command::Explore(_) | args::Command::Report(_)
            if !cli.verbose && !cli.quiet =>
        {
            "warn"
        }
        _ => cli.log_level(),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| level.into()))
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        args::Command::Boot(boot) => boot::run(boot),
        args::Command::Ctl(ctl) => ctl::run(ctl),
        args::Command::Inspect(inspect) => inspect::run(inspect),
        args::Command::Torture(torture) => torture::run(torture),
        args::Command::Explore(explore) => explore::run(explore),
        args::Command::Report(report) => report::run(report),
    };
    match result {
        Ok(code) => code,
        Err(err) => match err.downcast_ref::<args::UsageError>() {
            Some(usage) => {
                use clap::CommandFactory;
                args::Cli::command().error(clap::error::ErrorKind::ValueValidation, usage).exit()
            }
            // Each error of the chain says only its own part: `{:#}` joins them.
            None => {
                eprintln!("error: {err:#}");
                ExitCode::from(boot::EXIT_VMM_ERROR)
            }
        },
    }
}
