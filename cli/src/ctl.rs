//! `vmm ctl`: one request to a running machine's control socket, its reply printed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::args::{CtlArgs, CtlCommand};

fn request(args: &CtlArgs) -> Value {
    let cmd = match args.command {
        CtlCommand::Status => "status",
        CtlCommand::Checkpoint => "checkpoint",
        CtlCommand::Shutdown => "shutdown",
        CtlCommand::Crash => "crash",
        CtlCommand::Pause => "pause",
        CtlCommand::Resume => "resume",
        CtlCommand::Metrics => "metrics",
    };
    match (args.command, args.timeout_ms) {
        (CtlCommand::Checkpoint, Some(ms)) => json!({ "cmd": cmd, "timeout_ms": ms }),
        _ => json!({ "cmd": cmd }),
    }
}

pub fn run(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let mut stream = UnixStream::connect(&args.socket).with_context(|| {
        format!("cannot reach a machine at {} (is `vmm boot --control` running?)", args.socket.display())
    })?;
    writeln!(stream, "{}", request(&args)).context("cannot send the request")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).context("cannot read the reply")?;
    if line.trim().is_empty() {
        bail!("the machine closed the connection without a reply");
    }
    let reply: Value = serde_json::from_str(&line).with_context(|| format!("malformed reply: {line}"))?;
    let ok = reply["ok"].as_bool().unwrap_or(false);
    if args.json {
        println!("{reply}");
    } else if !ok {
        eprintln!("error: {}", reply["error"].as_str().unwrap_or("the machine refused the request"));
    } else {
        print_human(args.command, &reply);
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn print_human(command: CtlCommand, reply: &Value) {
    match command {
        CtlCommand::Status => {
            println!(
                "state {}, boot {} (boot {} of the image), committed generation {}, up {:.1} s",
                reply["state"].as_str().unwrap_or("?"),
                reply["boot_kind"].as_str().unwrap_or("not yet reported"),
                reply["boot_count"],
                reply["committed_generation"],
                reply["uptime_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
            );
            if let Some(workloads) = reply["workloads"].as_object() {
                for (name, w) in workloads {
                    println!(
                        "  {name:<10} progress {:<14} checksum {}  verified {}",
                        w["progress"],
                        w["checksum"].as_str().unwrap_or("?"),
                        w["verified"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        CtlCommand::Checkpoint => {
            let w = &reply["write_out"];
            println!(
                "committed generation {}: {} plates, {} KiB plated, {} KiB copied by {}, {} ms",
                w["generation"],
                w["plates"],
                w["plated_bytes"].as_u64().unwrap_or(0) >> 10,
                w["copied_bytes"].as_u64().unwrap_or(0) >> 10,
                w["copier"].as_str().unwrap_or("?"),
                w["total_ms"]
            );
            if let Some(phases) = w["phases_ms"].as_object() {
                let list: Vec<String> = phases.iter().map(|(k, v)| format!("{k} {v} ms")).collect();
                println!("  {}", list.join(", "));
            }
        }
        CtlCommand::Shutdown => {
            println!("shutdown requested: the machine powers off once the guest has saved its state")
        }
        CtlCommand::Crash => println!("crashed: the machine stopped dead, as at a power failure"),
        CtlCommand::Pause | CtlCommand::Resume => println!("{}", reply["state"].as_str().unwrap_or("?")),
        CtlCommand::Metrics => {
            for (what, key) in [("write-outs", "write_outs"), ("restores", "restores")] {
                let d = &reply[key];
                if d["count"] == 0 {
                    println!("{what}: none");
                } else {
                    println!(
                        "{what}: {} (min {} ms, median {} ms, p99 {} ms, max {} ms)",
                        d["count"], d["min_ms"], d["median_ms"], d["p99_ms"], d["max_ms"]
                    );
                }
            }
            println!("bytes copied: {}", reply["bytes_copied"]);
            let e = &reply["engine"];
            if e.is_object() {
                println!(
                    "copy engine: {} batches, {} copies, {} bytes, {} ms of host time",
                    e["batches"], e["copies"], e["bytes"], e["busy_ms"]
                );
            }
            let p = &reply["persistence"];
            if let Some(model) = p["model"].as_str() {
                println!(
                    "persistence: {model}, {} barriers ({} ranges, {} bytes made durable), {} write-backs of everything",
                    p["barriers"], p["ranges"], p["bytes_made_durable"], p["write_back_alls"]
                );
            }
        }
    }
}
