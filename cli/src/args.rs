//! Command-line arguments.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version,
    about = "A KVM machine whose main memory is non-volatile (a file), running a persistent kernel"
)]
pub struct Cli {
    /// Print less (errors only); RUST_LOG overrides.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Print more (debug); RUST_LOG overrides.
    #[arg(short, long, global = true, conflicts_with = "quiet")]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    pub fn log_level(&self) -> &'static str {
        match (self.quiet, self.verbose) {
            (true, _) => "error",
            (_, true) => "debug",
            _ => "info",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot the machine on an NVM image (created when missing).
    Boot(BootArgs),
    /// Talk to a running machine through its control socket.
    Ctl(CtlArgs),
    /// Decode an image offline: header, plate table, pending deletions, checksums.
    Inspect(InspectArgs),
    /// Crash the machine again and again, and check that nothing committed is ever lost.
    Torture(TortureArgs),
    /// Every crash point of one write-out (ADR): crash images at each persist barrier,
    /// each booted and checked.
    Explore(ExploreArgs),
    /// Re-run the paper's evaluation here (within a minute) and print it beside the paper's,
    /// with the ratio of each figure to what the hardware allows; SVG charts into --out.
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Write the charts (SVG) into this directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print the report as JSON, for scripts.
    #[arg(long, conflicts_with = "markdown")]
    pub json: bool,
    /// Print the report as Markdown (the README's Performance section).
    #[arg(long)]
    pub markdown: bool,
    /// Render a report saved by `--json` instead of measuring.
    #[arg(long, value_name = "FILE", conflicts_with = "out")]
    pub from: Option<PathBuf>,
    /// Fewer and shorter runs (seconds, for tests): the figures are rougher.
    #[arg(long)]
    pub quick: bool,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct TortureArgs {
    #[command(subcommand)]
    pub command: Option<TortureCommand>,
    /// The NVM image, started afresh: a new file, or an image of this format (one an
    /// earlier torture or boot made); anything else only with `--force`.
    #[arg(long, value_name = "IMG", required_unless_present = "disk", conflicts_with = "disk")]
    pub nvram: Option<PathBuf>,
    /// What RAM the machine has: `volatile` tortures the volatile plate function (each
    /// crash kills the machine's RAM, every restore comes from `--disk`).
    #[arg(long, value_enum, default_value = "nvm", requires_if("volatile", "disk"))]
    pub memory: Memory,
    /// The plate store of a volatile machine (`plate_store=disk`), started afresh: a new
    /// file, or a disk of this plate store; anything else only with `--force`.
    #[arg(long, value_name = "FILE")]
    pub disk: Option<PathBuf>,
    /// Size of the disk (default 64M).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "disk")]
    pub disk_size: Option<u64>,
    /// Overwrite an `--nvram` that is not an image of this format, or is one of another
    /// size than `--mem`. Never an image another program holds.
    #[arg(long)]
    pub force: bool,
    /// How many crashes (of the whole campaign, when `--shard` runs a part of it).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub crashes: u64,
    /// Run only shard I of N (from 0) of the campaign: its crashes whose index is I
    /// modulo N, each drawn as the whole campaign would draw it (needs `--seed`).
    #[arg(long, value_name = "I/N", value_parser = crate::torture::shard::parse_shard, requires = "seed")]
    pub shard: Option<crate::torture::shard::Shard>,
    /// Print the summary as JSON (what `vmm torture merge` adds up).
    #[arg(long)]
    pub json: bool,
    /// Seed of the crash times and of the lines `--crash-evict` writes (default: from the
    /// clock); printed to reproduce a failure.
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// RAM of the image (default: the size of the image given, 128M for a new one).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub mem: Option<u64>,
    /// Share of the crashes aimed at the middle of a write-out.
    #[arg(long, value_name = "F", default_value_t = 0.4)]
    pub inside_share: f64,
    /// Longest run between a boot and its crash, in ms.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    pub max_run_ms: u64,
    /// What copies the bytes of write-outs and restores: the copy engine, or the guest
    /// kernel's own loop and cache-line flushes (slow under PVM).
    #[arg(long, value_enum, default_value = "engine")]
    pub copier: Copier,
    /// How each boot after a crash restores: `lazy` (the kernel's default: the processes run
    /// while the user spaces' pages come back, so crashes land in the middle of it too) or
    /// `eager` (every page back first). NVM only: a restore from the disk is always eager.
    #[arg(long, value_enum)]
    pub restore: Option<Restore>,
    #[command(flatten)]
    pub persistence: PersistenceArgs,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ExploreArgs {
    #[command(subcommand)]
    pub command: Option<ExploreCommand>,
    /// The NVM image the workloads run on, started afresh (as for torture); the crash
    /// images are built next to it (IMG.crash.img), failing ones kept (IMG.fail-N.img).
    #[arg(long, value_name = "IMG", required = true)]
    pub nvram: Option<PathBuf>,
    #[command(flatten)]
    pub record: RecordOpts,
    #[command(flatten)]
    pub run: RunOpts,
}

#[derive(Debug, Subcommand)]
pub enum ExploreCommand {
    /// Record a write-out into a directory (its base image and its barrier record), for
    /// runs of its crash points on many hosts.
    Record(ExploreRecordArgs),
    /// Explore the crash points of a recorded write-out, or one shard of them.
    Run(ExploreRunArgs),
    /// Add up the `--json` reports of a run's shards (all of them, each once) into the
    /// run's report.
    Merge(MergeArgs),
}

#[derive(Debug, Args)]
pub struct ExploreRecordArgs {
    /// The directory to record into (created if missing): DIR/base.img, the image the
    /// workloads run on (started afresh, as for torture), and DIR/record.bin.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[command(flatten)]
    pub record: RecordOpts,
    /// Print what was recorded as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExploreRunArgs {
    /// The directory `vmm explore record --out` wrote (only read).
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,
    /// Run only shard I of N (from 0): the work items (crash point and subset, in the
    /// order of the whole run) whose index is I modulo N.
    #[arg(long, value_name = "I/N", value_parser = crate::torture::shard::parse_shard)]
    pub shard: Option<crate::torture::shard::Shard>,
    /// Where the crash images are built and failing ones kept (default: the record's
    /// directory, so that they can be reflinked from its base).
    #[arg(long, value_name = "DIR")]
    pub scratch: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunOpts,
}

/// How a write-out is recorded.
#[derive(Debug, Clone, Args)]
pub struct RecordOpts {
    /// Overwrite an image that is not an image of this format, or of another size.
    #[arg(long)]
    pub force: bool,
    /// RAM of the image (default: the size of the image given, 128M for a new one).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub mem: Option<u64>,
    /// Which write-out to explore (from 1; at least 2, so that one is committed before).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub write_out: u64,
    /// The guest's command line (default: kv and memtouch, a write-out every 50 ms).
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// What copies the write-out's bytes: the copy engine (its durable batches are the
    /// barriers), or the guest kernel's own loop, cache-line flushes and fences
    /// (`plate_copy=cpu` on the guest's command line).
    #[arg(long, value_enum, default_value = "engine")]
    pub copier: Copier,
    /// Testing: plant a bug in the recorded write-out, flush:K (barrier K's lines never
    /// written back), fence:K (written back only at the next barrier), flush:commit (the
    /// commit never written back), fence:commit (nothing durable before the commit's
    /// barrier), or in the guest's CPU copier (`--copier cpu`), cpu-fence:commit (the
    /// fence before the commit left out) or cpu-flush:K (the write-out's Kth flush, from
    /// 0, left out); refused unless the VMM is built with the `test-knobs` feature.
    #[arg(long, value_name = "KIND:K", hide = true)]
    pub plant: Option<String>,
}

/// How a recorded write-out is explored.
#[derive(Debug, Clone, Args)]
pub struct RunOpts {
    /// Build every subset of a crash point's pending lines when there are at most K, else
    /// of its extents (runs of adjacent lines) when there are at most K; otherwise none,
    /// all, each extent alone and `--sample` more, then each line alone and each run's
    /// prefixes.
    #[arg(long, value_name = "K", default_value_t = 8)]
    pub subsets_up_to: usize,
    /// At most this many crash images a point: the subsets beyond are thinned by a seeded
    /// draw, the lines alone and torn runs first.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub max_images_per_point: usize,
    /// Only none and all of each point's pending lines (two images a point).
    #[arg(long)]
    pub quick: bool,
    /// Explore only these crash points (0: before the first barrier; repeatable).
    #[arg(long, value_name = "K")]
    pub point: Vec<usize>,
    /// Go on after a failure (by default the first one stops the exploration).
    #[arg(long)]
    pub keep_going: bool,
    /// Random subsets of the extents per crash point beyond `--subsets-up-to`.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub sample: usize,
    /// Seed of the sampled subsets and of the cap's draw.
    #[arg(long, value_name = "S", default_value_t = 1)]
    pub seed: u64,
    /// Print the report as JSON (what `vmm explore merge` adds up).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TortureCommand {
    /// Add up the `--json` summaries of a campaign's shards (all of them, each once) into
    /// the campaign's summary.
    Merge(MergeArgs),
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The shards' summaries (`vmm torture --shard I/N --json`).
    #[arg(required = true, value_name = "FILES")]
    pub files: Vec<PathBuf>,
    /// Print the merged summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Which stores survive a crash.
#[derive(Debug, Clone, Copy, Args)]
pub struct PersistenceArgs {
    /// eadr: every store the guest made is in the image after a crash (caches inside the
    /// persistence domain); adr: only what the guest wrote back (clflushopt/clwb + sfence).
    #[arg(long, value_enum, value_name = "MODEL", default_value = "eadr")]
    pub persistence: Model,
    /// adr: at a crash, write this fraction (0 to 1) of the dirty, unflushed cache lines to
    /// the image, as evictions before the power went would have.
    #[arg(long, value_name = "F", value_parser = parse_fraction)]
    pub crash_evict: Option<f64>,
    /// Also msync what each persist barrier makes durable, so that it survives a host crash.
    #[arg(long)]
    pub sync: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Copier {
    Engine,
    Cpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Restore {
    Lazy,
    Eager,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Memory {
    Nvm,
    Volatile,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Model {
    Eadr,
    Adr,
}

/// Arguments that parse but make no sense together (checked by [`vmm::VmConfig::validate`]):
/// the VMM exits with status 2, as for any other bad usage.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(format!("\"{text}\" is not a fraction between 0 and 1")),
    }
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The NVM image.
    #[arg(required_unless_present = "disk", conflicts_with = "disk")]
    pub image: Option<PathBuf>,
    /// Decode a plate-store disk (`vmm boot --disk FILE --cmdline plate_store=disk`)
    /// instead of an image: its superblock, commit slots, plates and pending deletions.
    /// With --check: save areas inside the area space, none sharing a page, no pending
    /// area reused, a valid commit, each valid area's checksum.
    #[arg(long, value_name = "FILE")]
    pub disk: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also check the image's consistency, like fsck (it reads the whole image): the
    /// committed slot against the root header, its entries and save areas, and the state
    /// a boot would run on (each frame owned once, the frame bitmap, plates against
    /// resources). Each violation is named; exit status 1 if there is any.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The control socket of the machine (`vmm boot --control SOCK`).
    #[arg(long, value_name = "SOCK")]
    pub socket: PathBuf,
    /// Print the machine's JSON reply as is.
    #[arg(long, global = true)]
    pub json: bool,
    /// For `checkpoint`: how long to wait for the commit.
    #[arg(long, value_name = "MS", global = true)]
    pub timeout_ms: Option<u64>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum CtlCommand {
    /// State, boot kind, committed generation, uptime and workloads.
    Status,
    /// A write-out now; returns once it is committed, with its figures.
    Checkpoint,
    /// A graceful shutdown: the guest saves what resuming needs and powers off.
    Shutdown,
    /// A power failure: the vCPU stops and the VMM exits at once; no guest code runs.
    Crash,
    /// Stop running guest code until `resume`.
    Pause,
    Resume,
    /// Counts and latency distributions of write-outs and restores, bytes copied.
    Metrics,
}

#[derive(Debug, Args)]
pub struct BootArgs {
    /// The NVM image: guest RAM, kept in this file. Created sparse when missing. Needed
    /// unless `--memory volatile`.
    #[arg(long, value_name = "IMG")]
    pub nvram: Option<PathBuf>,
    /// What guest RAM is: nvm (the `--nvram` image, outliving the VMM), or volatile
    /// (anonymous memory, lost at exit: every boot is a cold boot).
    #[arg(long, value_enum, value_name = "KIND", default_value = "nvm")]
    pub memory: Memory,
    /// RAM size of a new image or of volatile RAM (e.g. 256M, 1G); an existing image keeps
    /// its size.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub mem: Option<u64>,
    /// A virtio block device backed by FILE (created when missing, locked like the image).
    #[arg(long, value_name = "FILE")]
    pub disk: Option<PathBuf>,
    /// Size of a new `--disk` file (e.g. 64M; a multiple of 512); an existing one keeps its
    /// own.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, requires = "disk")]
    pub disk_size: Option<u64>,
    /// Kernel command line (e.g. "poweroff").
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,
    /// Start your own program: a static x86-64 ELF file built with `user-rt` (see
    /// docs/abi.md), and after a comma the argument string it gets (`--app ./mine,n=3`).
    /// Repeatable. Only a boot that formats the image starts programs; from then on they
    /// are part of it, so an image that will resume or restore takes none.
    #[arg(long = "app", value_name = "PATH[,ARGS]", value_parser = parse_app)]
    pub apps: Vec<vmm::ProgramFile>,
    /// Write the guest console to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub console: Option<PathBuf>,
    /// Boot this PVH ELF kernel instead of the bundled one.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Discard the image's contents and start it afresh.
    #[arg(long)]
    pub reformat: bool,
    /// The KVM device.
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    pub kvm_device: PathBuf,
    /// Listen for control requests on this Unix socket (see `vmm ctl`).
    #[arg(long, value_name = "SOCK")]
    pub control: Option<PathBuf>,
    /// Testing: the copy engine pauses this long halfway through each batch (refused unless
    /// the VMM is built with the `test-knobs` feature, as the tests build it).
    #[arg(long, value_name = "MS", hide = true)]
    pub engine_pause_ms: Option<u64>,
    /// Map every page of the image before the guest starts (the image becomes fully
    /// allocated on disk), so that no first touch of NVM costs a host page fault. Without
    /// it, only the pages that hold data are mapped ahead, in the background.
    #[arg(long)]
    pub prefault: bool,
    /// Reserve every block of the image on its file system (fallocate) before the guest
    /// starts, so that no later lack of space can stop the machine; the first store to
    /// each page then costs more. By default the VMM only checks that the free space
    /// holds the image's holes.
    #[arg(long, conflicts_with = "sparse")]
    pub reserve: bool,
    /// Skip the free-space check: a thin image larger than the free space, on purpose (a
    /// file system that fills up then stops the machine, with a SIGBUS report).
    #[arg(long, conflicts_with = "prefault")]
    pub sparse: bool,
    #[command(flatten)]
    pub persistence: PersistenceArgs,
    /// Seed of the choice of lines `--crash-evict` writes (default: from the clock).
    #[arg(long, visible_alias = "evict-seed", value_name = "N", requires = "crash_evict")]
    pub seed: Option<u64>,
}

/// Parses a byte size: a number with an optional K, M or G suffix (powers of 1024;
/// "KiB", "MB" and friends are read the same way).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let digits_end = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    let number: u64 = digits.parse().map_err(|_| format!("\"{text}\" is not a size (try 256M or 1G)"))?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        other => return Err(format!("unknown size unit \"{other}\" (use K, M or G)")),
    };
    number.checked_mul(1 << shift).ok_or_else(|| format!("\"{text}\" is too large"))
}

/// `PATH[,ARGS]`: the program's file, and the argument string after the first comma.
fn parse_app(value: &str) -> Result<vmm::ProgramFile, String> {
    let (path, args) = value.split_once(',').unwrap_or((value, ""));
    if path.is_empty() {
        return Err("the program's file is missing before the comma".into());
    }
    Ok(vmm::ProgramFile { path: path.into(), args: args.into() })
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999999G").is_err());
    }
}
