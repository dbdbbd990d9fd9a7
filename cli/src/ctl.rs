//! `vmm ctl`: one request to a running machine's control socket, its reply printed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;

use anyhow::{bail, Context};
use serde::de::DeserializeOwned;
use serde_json::Value;
use vmm::api::{CheckpointReply, Distribution, ImageState, MetricsReply, Request, StateReply, StatusReply};

use crate::args::{CtlArgs, CtlCommand};

fn request(args: &CtlArgs) -> Request {
    match args.command {
        CtlCommand::Status => Request::Status,
        CtlCommand::Checkpoint => Request::Checkpoint { timeout_ms: args.timeout_ms },
        CtlCommand::Shutdown => Request::Shutdown,
        CtlCommand::Crash => Request::Crash,
        CtlCommand::Pause => Request::Pause,
        CtlCommand::Resume => Request::Resume,
        CtlCommand::Metrics => Request::Metrics,
    }
}

pub fn run(args: CtlArgs) -> anyhow::Result<ExitCode> {
    let mut stream = UnixStream::connect(&args.socket).with_context(|| {
        format!("cannot reach a machine at {} (is `vmm boot --control` running?)", args.socket.display())
    })?;
    let mut line = serde_json::to_string(&request(&args)).context("cannot encode the request")?;
    // One write, newline included: a request split over two writes costs the server a
    // second wake-up (milliseconds on a loaded host).
    line.push('\n');
    stream.write_all(line.as_bytes()).context("cannot send the request")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).context("cannot read the reply")?;
    if line.trim().is_empty() {
        bail!("the machine closed the connection without a reply");
    }
    let reply: Value = serde_json::from_str(&line).with_context(|| format!("malformed reply: {line}"))?;
    let ok = reply["ok"].as_bool().unwrap_or(false);
    if args.json {
        println!("{reply}");
        return Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) });
    }
    // A reply may succeed and still warn (the image deleted or moved under the machine):
    // that goes first, and loudly.
    if let Some(warning) = reply.get("warning").and_then(Value::as_str) {
        eprintln!("WARNING: {warning}");
    }
    if !ok {
        eprintln!("error: {}", reply["error"].as_str().unwrap_or("the machine refused the request"));
    } else {
        print_human(args.command, reply)?;
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// The reply as the type its request answers with.
fn typed<T: DeserializeOwned>(reply: Value) -> anyhow::Result<T> {
    serde_json::from_value(reply).context("the machine's reply is not what this request answers with")
}

fn print_human(command: CtlCommand, reply: Value) -> anyhow::Result<()> {
    match command {
        CtlCommand::Status => {
            let status: StatusReply = typed(reply)?;
            println!(
                "state {}, boot {} (boot {} of the image), committed generation {}, up {:.1} s",
                name(&status.state),
                status.boot_kind.as_deref().unwrap_or("not yet reported"),
                status.boot_count,
                status.committed_generation,
                status.uptime_ms as f64 / 1000.0
            );
            if let Some(image) = status.image.filter(|&image| image != ImageState::Intact) {
                println!("  image {}", name(&image));
            }
            for (workload, w) in &status.workloads {
                println!(
                    "  {workload:<10} progress {:<14} checksum {}  verified {}",
                    w.progress,
                    w.checksum,
                    name(&w.verified)
                );
            }
            for refused in &status.refused {
                println!("  program {} REFUSED: {}", refused.program, refused.reason);
            }
        }
        CtlCommand::Checkpoint => {
            let w = typed::<CheckpointReply>(reply)?.write_out;
            println!(
                "committed generation {}: {} plates, {} KiB plated, {} KiB copied by {}, {} ms",
                w.generation,
                w.plates,
                w.plated_bytes >> 10,
                w.copied_bytes >> 10,
                w.copier,
                w.total_ms
            );
            let list: Vec<String> = w.phases_ms.iter().map(|(k, v)| format!("{k} {v} ms")).collect();
            println!("  {}", list.join(", "));
        }
        CtlCommand::Shutdown => {
            println!("shutdown requested: the machine powers off once the guest has saved its state")
        }
        CtlCommand::Crash => println!("crashed: the machine stopped dead, as at a power failure"),
        CtlCommand::Pause | CtlCommand::Resume => println!("{}", name(&typed::<StateReply>(reply)?.state)),
        CtlCommand::Metrics => {
            let m: MetricsReply = typed(reply)?;
            for (what, d) in [("write-outs", &m.write_outs), ("restores", &m.restores)] {
                print_distribution(what, d);
            }
            if m.restore_tails.count > 0 {
                print_distribution("lazy restores' ends (every page back, from the restore's start)", &m.restore_tails);
            }
            println!("bytes copied: {}", m.bytes_copied);
            if let Some(e) = &m.engine {
                println!(
                    "copy engine: {} batches, {} copies, {} bytes (and {} only summed), {} ms of host time",
                    e.batches, e.copies, e.bytes, e.summed_only, e.busy_ms
                );
            }
            if let Some(p) = &m.persistence {
                println!(
                    "persistence: {}, {} barriers ({} ranges, {} bytes made durable), {} write-backs of everything",
                    p.model, p.barriers, p.ranges, p.bytes_made_durable, p.write_back_alls
                );
            }
        }
    }
    Ok(())
}

fn print_distribution(what: &str, d: &Distribution) {
    let ms = |v: Option<f64>| v.map_or("?".to_string(), |v| v.to_string());
    if d.count == 0 {
        println!("{what}: none");
    } else {
        println!(
            "{what}: {} (min {} ms, median {} ms, p99 {} ms, max {} ms)",
            d.count,
            ms(d.min_ms),
            ms(d.median_ms),
            ms(d.p99_ms),
            ms(d.max_ms)
        );
    }
}

/// The wire name of a state or verdict (its serde name).
fn name(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_else(|| "?".into())
}
