//! `vmm inspect --disk`: what a plate-store disk holds (`nvram::disk_inspect`), and what
//! `vmm boot --cmdline plate_store=disk` would do with it. Exit status 0 exactly when the
//! kernel takes the disk (and, with `--check`, it is consistent), as for an image.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use nvram::disk_inspect::{check_disk, inspect_disk, DiskBoot, DiskReport, HEAD};

use crate::inspect::{open_regular, print_report, Check};

pub fn run(path: &Path, json: bool, check: bool) -> anyhow::Result<ExitCode> {
    let file = open_regular(path, "a disk")?;
    let size = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
    // The report reads the superblock and the slots; the check reads every area.
    let want = if check { size } else { size.min(HEAD) };
    let mut bytes = Vec::new();
    file.take(want).read_to_end(&mut bytes).with_context(|| format!("cannot read {}", path.display()))?;
    if (bytes.len() as u64) < want {
        bail!("{} changed while it was read", path.display());
    }
    let report = inspect_disk(&bytes, size);
    let check = check.then(|| {
        let unchecked = (report.verdict != "plate store").then(|| format!("the disk is {}", report.verdict));
        Check { violations: check_disk(&bytes), unchecked }
    });
    print_report(&report, check.as_ref(), json, print_human)?;
    let violations = check.as_ref().is_some_and(|c| !c.violations.is_empty());
    Ok(if report.boot == DiskBoot::Refuse || violations { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

fn print_human(r: &DiskReport) {
    println!("disk: {}; {}", r.verdict, r.explanation);
    println!("boot with plate_store=disk: {} ({} bytes)", r.boot.as_str(), r.size);
    let Some(sb) = &r.superblock else { return };
    println!(
        "superblock: version {}, formatted for {} bytes, area space at {:#x}, {} pages, checksum {}",
        sb.version,
        sb.disk_bytes,
        sb.area_start,
        sb.area_pages,
        if sb.checksum_ok { "ok" } else { "BAD" }
    );
    for (i, s) in r.slots.iter().enumerate() {
        let mark = if r.committed == Some(i) { " (committed)" } else { "" };
        match &s.problem {
            None => println!(
                "commit slot {i} at {:#x}: generation {}, {} plates, {} pending deletions, checksum ok{mark}",
                s.address, s.generation, s.plates, s.pending
            ),
            Some(p) => println!("commit slot {i} at {:#x}: not valid ({p})", s.address),
        }
    }
    if r.committed.is_none() {
        return;
    }
    println!("plates (kind, id, region in RAM, pages, save areas A/B on the disk, valid):");
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
