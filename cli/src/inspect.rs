//! `vmm inspect`: what an image holds, decoded offline.

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use vmm::inspect::{inspect, Report};

use crate::args::InspectArgs;

pub fn run(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let file = std::fs::File::open(&args.image).with_context(|| format!("cannot open {}", args.image.display()))?;
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        anyhow::bail!("{} is a directory, not an image", args.image.display());
    }
    // Everything decoded lives below the first frame: no need to read guest RAM beyond.
    let mut bytes = Vec::new();
    file.take(nvram::layout::FRAMES_BASE)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", args.image.display()))?;
    let report = inspect(&bytes);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).context("cannot encode the report")?);
    } else {
        print_human(&report);
    }
    Ok(if matches!(report.verdict, "formatted" | "blank") { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn print_human(r: &Report) {
    println!("image: {}; {}", r.verdict, r.explanation);
    let Some(h) = &r.header else { return };
    println!(
        "header: format {}, kernel build {}, boot {} of the image, shutdown flag {}, generation {}, {} frames, checksum {}",
        h.format_version,
        h.build_id,
        h.boot_count,
        h.shutdown_flag,
        h.generation,
        h.frames,
        if h.checksum_ok { "ok" } else { "BAD" }
    );
    if let Some(ok) = r.resources_ok {
        println!("resource tables: {}", if ok { "ok" } else { "BAD" });
    }
    for (i, s) in r.slots.iter().enumerate() {
        let mark = if r.committed == Some(i) { " (committed)" } else { "" };
        match &s.problem {
            None => println!(
                "plate table slot {i} at {:#x}: generation {}, {} plates, {} pending deletions, checksum ok{mark}",
                s.address, s.generation, s.plates, s.pending
            ),
            Some(p) => println!("plate table slot {i} at {:#x}: not valid ({p})", s.address),
        }
    }
    if r.committed.is_none() {
        println!("nothing committed: a crash now would start afresh");
        return;
    }
    println!("plates (kind, id, region, pages, save areas A/B, valid):");
    for p in &r.plates {
        println!(
            "  {:<12} {:>4}  {:#010x}  {:>5}  {:#010x}/{:#010x}  {}",
            p.kind, p.id, p.src, p.pages, p.areas[0], p.areas[1], p.valid_area
        );
    }
    for p in &r.pending {
        println!("pending deletion: save areas {:#x}/{:#x}, {} pages", p.areas[0], p.areas[1], p.pages);
    }
}
