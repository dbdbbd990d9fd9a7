//! `vmm torture --memory volatile --disk FILE`: the same campaign on the volatile plate
//! function. Each crash kills the VMM's RAM with it; every boot after one restores from
//! the disk (`plate_store=disk`), and the disk is checked after each crash as `vmm inspect
//! --disk --check` checks it.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};
use vmm::{DiskConfig, MemoryKind, VmConfig};

use crate::args::{Model, TortureArgs};
use crate::inspect::Check;

/// RAM of the volatile machine when `--mem` is not given: the NVM campaign's default.
const DEFAULT_MEM: u64 = 128 << 20;

/// The machine of the campaign: volatile RAM, its plate store on `disk`, started afresh
/// (a new file, or a plate-store disk; anything else only with `--force`).
pub(super) fn config(args: &TortureArgs, disk: &Path, cmdline: &str) -> anyhow::Result<VmConfig> {
    let p = &args.persistence;
    if p.persistence != Model::Eadr || p.crash_evict.is_some() || p.sync {
        bail!("volatile RAM has no persistence model: drop --persistence, --crash-evict and --sync");
    }
    if args.restore.is_some() {
        bail!("a restore from the disk copies every page before the processes run: drop --restore");
    }
    let size = args.disk_size.unwrap_or(vmm::config::DEFAULT_DISK_SIZE);
    claim(disk, size, args.force)?;
    let mut config = VmConfig::new(disk.with_extension("unused.img"));
    config.memory = MemoryKind::Volatile;
    config.mem_size = Some(args.mem.unwrap_or(DEFAULT_MEM));
    config.cmdline = format!("{cmdline} plate_store=disk");
    config.disk = Some(DiskConfig { path: disk.to_path_buf(), size_if_created: size });
    Ok(config)
}

/// Empties `disk` and sizes it to `size` (a blank plate store: the first boot formats it),
/// unless it holds something that is not a plate store and `force` is not given.
fn claim(disk: &Path, size: u64, force: bool) -> anyhow::Result<()> {
    let path = disk.display();
    let mut head = vec![0u8; nvram::disk::SECTOR as usize];
    let found = match std::fs::File::open(disk) {
        Ok(mut f) => {
            let n = f.read(&mut head).with_context(|| format!("cannot read {path}"))?;
            n > 0 && head.iter().any(|&b| b != 0)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).with_context(|| format!("cannot open {path}")),
    };
    let ours = nvram::disk::Superblock::read_from_prefix_checked(&head);
    if found && !ours && !force {
        bail!("{path} is not a plate-store disk: it would be overwritten; give --force to make it a new disk");
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(disk)
        .with_context(|| format!("cannot create {path}"))?;
    file.set_len(size).with_context(|| format!("cannot size {path}"))?;
    Ok(())
}

/// `vmm inspect --disk --check` on the disk after a crash.
pub(super) fn check_disk(disk: &Path) -> anyhow::Result<Check> {
    let bytes = std::fs::read(disk).with_context(|| format!("cannot read {}", disk.display()))?;
    let report = nvram::disk_inspect::inspect_disk(&bytes, bytes.len() as u64);
    let unchecked = (report.verdict != "plate store").then(|| format!("the disk is {}", report.verdict));
    Ok(Check { violations: nvram::disk_inspect::check_disk(&bytes), unchecked })
}
