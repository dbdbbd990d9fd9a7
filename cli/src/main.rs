//! `vmm`: the command line of the NVM machine. It turns arguments into a
//! [`vmm::VmConfig`] and reports the outcome; the machine itself lives in the `vmm` crate.

mod args;
mod boot;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| cli.log_level().into()),
        )
        .with_target(false)
        .init();
    let result = match cli.command {
        args::Command::Boot(boot) => boot::run(boot),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(boot::EXIT_VMM_ERROR)
        }
    }
}
