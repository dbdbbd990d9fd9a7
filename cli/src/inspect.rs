//! `vmm inspect`: what an image holds, decoded offline, and what `vmm boot` would do with it.

use std::fs::FileType;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context};
use vmm::inspect::{inspect_file, Boot, Report};

use crate::args::InspectArgs;

/// What a file that is not a regular file is, in words; `None` for a regular file.
fn special(kind: FileType) -> Option<&'static str> {
    if kind.is_file() {
        None
    } else if kind.is_dir() {
        Some("a directory")
    } else if kind.is_fifo() {
        Some("a FIFO")
    } else if kind.is_char_device() {
        Some("a character device")
    } else if kind.is_block_device() {
        Some("a block device")
    } else if kind.is_socket() {
        Some("a socket")
    } else {
        Some("not a regular file")
    }
}

/// Opens `path` for reading if it is a regular file. Its type is checked before the open,
/// which would block on a FIFO with no writer; the open is non-blocking all the same, and
/// the type is checked again on what was opened, in case the path changed in between.
pub(crate) fn open_image(path: &Path) -> anyhow::Result<std::fs::File> {
    open_regular(path, "an image")
}

/// [`open_image`] for a file that should be `noun` ("an image", "a disk").
pub(crate) fn open_regular(path: &Path, noun: &str) -> anyhow::Result<std::fs::File> {
    let refuse = |what: &str| anyhow::anyhow!("{} is {what}, not {noun}", path.display());
    let metadata = std::fs::metadata(path).with_context(|| format!("cannot open {}", path.display()))?;
    if let Some(what) = special(metadata.file_type()) {
        return Err(refuse(what));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let metadata = file.metadata().with_context(|| format!("cannot read {}", path.display()))?;
    if let Some(what) = special(metadata.file_type()) {
        return Err(refuse(what));
    }
    Ok(file)
}

pub fn run(args: InspectArgs) -> anyhow::Result<ExitCode> {
    if let Some(disk) = &args.disk {
        return crate::inspect_disk::run(disk, args.json, args.check);
    }
    let Some(image) = &args.image else { bail!("an image or --disk FILE is needed") };
    let file = open_image(image)?;
    let size = file.metadata().with_context(|| format!("cannot read {}", image.display()))?.len();
    // Everything decoded lives below the first frame: no need to read guest RAM beyond.
    let mut head = Vec::new();
    file.take(nvram::layout::FRAMES_BASE)
        .read_to_end(&mut head)
        .with_context(|| format!("cannot read {}", image.display()))?;
    if (head.len() as u64) < size.min(nvram::layout::FRAMES_BASE) {
        bail!("{} changed while it was read", image.display());
    }
    let report = inspect_file(&head, size);
    let check = if args.check { Some(check(image, &report)?) } else { None };
    print_report(&report, check.as_ref(), args.json, print_human)?;
    // Exit 0 exactly when `vmm boot` takes the image (and, with --check, it is consistent).
    let violations = check.as_ref().is_some_and(|c| !c.violations.is_empty());
    Ok(if report.boot == Boot::Refuse || violations { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// What `--check` found.
#[derive(Debug, serde::Serialize)]
pub struct Check {
    /// Each violation, in words.
    pub violations: Vec<String>,
    /// Why the image could not be checked, if so.
    pub unchecked: Option<String>,
}

/// Runs `nvram::fsck::check_image` over the whole image (read into words: the check reads
/// the tables in place, which wants 8-byte alignment).
pub fn check(path: &Path, report: &Report) -> anyhow::Result<Check> {
    let violations = Vec::new();
    if report.verdict != "formatted" {
        return Ok(Check { violations, unchecked: Some(format!("the image is {}", report.verdict)) });
    }
    check_file(path)
}

/// [`check`] on a file known to be an image: what `vmm torture` runs after each crash.
pub fn check_file(path: &Path) -> anyhow::Result<Check> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    zerocopy::IntoBytes::as_mut_bytes(&mut words[..])[..bytes.len()].copy_from_slice(&bytes);
    Ok(check_words(&words, bytes.len()))
}

/// The check of an image held in memory (`len` bytes of `words`, 8-byte aligned as the
/// records need): `vmm explore` checks each crash image without reading it from a file.
pub fn check_words(words: &[u64], len: usize) -> Check {
    let mut violations = Vec::new();
    let image = &zerocopy::IntoBytes::as_bytes(words)[..len];
    let bytes = image;
    let mut scratch = vec![0u64; (bytes.len() as u64 / nvram::layout::PAGE_SIZE).div_ceil(64) as usize + 1];
    let unchecked =
        nvram::fsck::check_image(image, &mut scratch, |v| violations.push(v.to_string())).err().map(|e| e.to_string());
    Check { violations, unchecked }
}

/// Prints `report`, with `check`'s findings when there are any, as JSON (the check under
/// `check`) or for people (`human`, then the findings): one way for images and disks.
pub(crate) fn print_report<R: serde::Serialize>(
    report: &R,
    check: Option<&Check>,
    json: bool,
    human: impl FnOnce(&R),
) -> anyhow::Result<()> {
    if json {
        let mut value = serde_json::to_value(report).context("cannot encode the report")?;
        if let (Some(check), Some(map)) = (check, value.as_object_mut()) {
            map.insert("check".into(), serde_json::json!(check));
        }
        println!("{}", serde_json::to_string_pretty(&value).context("cannot encode the report")?);
    } else {
        human(report);
        if let Some(check) = check {
            print_check(check);
        }
    }
    Ok(())
}

pub(crate) fn print_check(c: &Check) {
    match (&c.unchecked, c.violations.len()) {
        (Some(why), 0) => println!("check: not done: {why}"),
        (None, 0) => println!("check: consistent"),
        (_, n) => {
            println!("check: {n} violation(s):");
            for v in &c.violations {
                println!("  {v}");
            }
            if let Some(why) = &c.unchecked {
                println!("check: stopped: {why}");
            }
        }
    }
}

fn print_human(r: &Report) {
    println!("image: {}; {}", r.verdict, r.explanation);
    println!("boot: {} ({} bytes of RAM)", r.boot.as_str(), r.size);
    let Some(h) = &r.header else { return };
    println!(
        "header: format {}, NVM ABI {} (kernel build {}), boot {} of the image, shutdown flag {}, generation {}, {} frames, checksum {}",
        h.format_version,
        h.nvm_abi,
        h.build_tag,
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
