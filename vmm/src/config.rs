//! The machine's configuration: everything the CLI (or a test) decides, validated once.

use std::path::PathBuf;

pub use crate::memory::Prefault;
pub use devices::{CrashEvict, PersistenceModel};

/// Which stores survive a power failure, and how much of the rest.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Persistence {
    pub model: PersistenceModel,
    /// ADR only: the cache lines evicted at a crash.
    pub crash_evict: Option<CrashEvict>,
    /// Persist barriers also `msync` the image (durable across a host crash).
    pub sync: bool,
}

/// Where the guest kernel comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KernelSource {
    /// The kernel built with this VMM and embedded in it.
    Bundled,
    /// A PVH ELF file.
    File(PathBuf),
}

/// Where the guest's console (COM1) goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOutput {
    Stdout,
    /// A file, created or truncated at boot.
    File(PathBuf),
}

/// Everything needed to build and boot a machine.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The NVM image: guest RAM.
    pub image: PathBuf,
    /// RAM size for a new image; for an existing one, must match its size when given.
    pub mem_size: Option<u64>,
    /// Start the image afresh: its contents are discarded.
    pub reformat: bool,
    pub kernel: KernelSource,
    pub cmdline: String,
    pub console: ConsoleOutput,
    /// The KVM device node (tests point it elsewhere to check the error).
    pub kvm_device: PathBuf,
    /// Makes the copy engine pause halfway through each batch, so that a crash test can
    /// kill the VMM with a batch half applied.
    pub engine_pause_ms: Option<u64>,
    pub persistence: Persistence,
    /// How much of the image to map ahead of the guest.
    pub prefault: Prefault,
    /// Whether the image's blocks are reserved on its file system before boot.
    pub allocation: crate::image::Allocation,
}

impl VmConfig {
    /// A configuration with defaults for everything but the image.
    pub fn new(image: impl Into<PathBuf>) -> Self {
        Self {
            image: image.into(),
            mem_size: None,
            reformat: false,
            kernel: KernelSource::Bundled,
            cmdline: String::new(),
            console: ConsoleOutput::Stdout,
            kvm_device: PathBuf::from("/dev/kvm"),
            engine_pause_ms: None,
            persistence: Persistence::default(),
            prefault: Prefault::default(),
            allocation: crate::image::Allocation::default(),
        }
    }
}
