//! The machine's configuration: everything the CLI (or a test) decides, validated once.

use std::path::PathBuf;

use nvram::cmdline::{Cmdline, KEYS};

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

/// What guest RAM is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MemoryKind {
    /// The NVM image: RAM is a file, and what the guest stores outlives the VMM.
    #[default]
    Nvm,
    /// Anonymous memory, lost when the VMM exits, as DRAM is at a power failure: every boot
    /// is a cold boot, and only what the guest writes to its disk lasts.
    Volatile,
}

/// The machine's virtio block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The disk file, created when missing.
    pub path: PathBuf,
    /// Size of a new disk file in bytes (a multiple of 512); an existing one keeps its own.
    pub size_if_created: u64,
}

/// Size of a new disk file when none is given: room for the plates of the paper's
/// configuration twice over, and more.
pub const DEFAULT_DISK_SIZE: u64 = 64 << 20;

/// Everything needed to build and boot a machine.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The NVM image: guest RAM (unused when [`Self::memory`] is volatile).
    pub image: PathBuf,
    /// RAM size for a new image (or for volatile RAM); for an existing image, must match
    /// its size when given.
    pub mem_size: Option<u64>,
    /// Whether RAM is the image or forgets at exit.
    pub memory: MemoryKind,
    /// A virtio block device, if any.
    pub disk: Option<DiskConfig>,
    /// Start the image afresh: its contents are discarded.
    pub reformat: bool,
    pub kernel: KernelSource,
    pub cmdline: String,
    /// The user's own programs (`vmm boot --app`), started beside the ones the command
    /// line's `apps=` names. Only a boot that formats the image starts programs: with an
    /// image that will resume or restore, [`crate::Machine::build`] refuses them.
    pub programs: Vec<ProgramFile>,
    pub console: ConsoleOutput,
    /// The KVM device node (tests point it elsewhere to check the error).
    pub kvm_device: PathBuf,
    /// Makes the copy engine pause halfway through each batch, so that a crash test can
    /// kill the VMM with a batch half applied. A test knob: only in builds with the
    /// `test-knobs` feature, so that a production VMM cannot be slowed by it.
    #[cfg(feature = "test-knobs")]
    pub engine_pause_ms: Option<u64>,
    pub persistence: Persistence,
    /// How much of the image to map ahead of the guest.
    pub prefault: Prefault,
    /// Whether the image's blocks are reserved on its file system before boot.
    pub allocation: crate::image::Allocation,
}

/// A user program's ELF file and the argument string it is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramFile {
    pub path: PathBuf,
    pub args: String,
}

impl ProgramFile {
    /// The program's name: the file's name without its extension, cut to what the guest
    /// shows (15 bytes), characters other than printable ASCII made `_`.
    pub fn name(&self) -> String {
        let stem = self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let name: String =
            stem.chars().map(|c| if c.is_ascii_graphic() { c } else { '_' }).take(crate::modules::MAX_NAME).collect();
        if name.is_empty() {
            "app".into()
        } else {
            name
        }
    }
}

/// A configuration that makes no sense, found before anything is built. The messages speak
/// of the machine, not of any front end's flags (the CLI words its own).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("lines evicted at a crash need the ADR persistence model: under eADR every line is durable already")]
    CrashEvictUnderEadr,
    #[error("the fraction of lines evicted at a crash is {0}, not a number between 0 and 1")]
    EvictFraction(f64),
    #[error("the kernel command line has an unknown item `{item}`; the known keys are {}", KEYS.join(", "))]
    UnknownCmdlineItem { item: String },
    #[error("the kernel command line item `{item}` has a bad value for its key (see the README's table of items)")]
    BadCmdlineValue { item: String },
    #[error("the copy engine's pause is a test knob, and this build has none (cargo feature `test-knobs`)")]
    TestKnobsOff,
    #[error("`test_plant` plants a bug in the guest's write-outs: a test knob, and this build has none (cargo feature `test-knobs`)")]
    CmdlineTestKnob,
    #[error("volatile RAM has no persistence model to choose: nothing of it outlives the VMM, so ADR, evicted lines and syncs to an image do not apply")]
    PersistenceOfVolatileRam,
    #[error("volatile RAM has no image to map ahead, reserve or reformat")]
    ImageOptionsOfVolatileRam,
    #[error("a RAM size of {0} bytes is not a multiple of 4 KiB from 32 MiB to 3 GiB")]
    RamSize(u64),
    #[error("a disk size of {0} bytes is not a positive multiple of 512")]
    DiskSize(u64),
    #[error("plate_store=disk keeps the plates' save areas on the virtio disk, and the machine has none")]
    DiskStoreWithoutDisk,
    #[error("plate_store=disk is the plate function's store, and plate=off turns the plate function off")]
    DiskStoreWithoutPlates,
}

impl Persistence {
    /// The cross-field checks of the persistence model.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(evict) = self.crash_evict {
            if self.model != PersistenceModel::Adr {
                return Err(ConfigError::CrashEvictUnderEadr);
            }
            if !(0.0..=1.0).contains(&evict.fraction) {
                return Err(ConfigError::EvictFraction(evict.fraction));
            }
        }
        Ok(())
    }
}

/// Checks a kernel command line with the guest's own parser: the first unknown or malformed
/// item is an error (the guest would only print it on its console and go on).
pub fn validate_cmdline(line: &str) -> Result<Cmdline, ConfigError> {
    let mut first_bad = None;
    let parsed = Cmdline::parse(line, |item| {
        first_bad.get_or_insert_with(|| item.to_string());
    });
    match first_bad {
        // No production VMM boots a guest told to lose a flush or a fence.
        None if parsed.test_plant.is_some() && !cfg!(feature = "test-knobs") => Err(ConfigError::CmdlineTestKnob),
        None => Ok(parsed),
        Some(item) => {
            let key = item.split_once('=').map_or(item.as_str(), |(key, _)| key);
            Err(if Cmdline::is_known_key(key) {
                ConfigError::BadCmdlineValue { item }
            } else {
                ConfigError::UnknownCmdlineItem { item }
            })
        }
    }
}

impl VmConfig {
    /// Makes the copy engine pause `ms` halfway through each batch (a test knob); refused by
    /// a build without the `test-knobs` feature, so that front ends need no feature of their
    /// own to pass it on.
    pub fn set_engine_pause_ms(&mut self, ms: Option<u64>) -> Result<(), ConfigError> {
        #[cfg(feature = "test-knobs")]
        {
            self.engine_pause_ms = ms;
            Ok(())
        }
        #[cfg(not(feature = "test-knobs"))]
        match ms {
            None => Ok(()),
            Some(_) => Err(ConfigError::TestKnobsOff),
        }
    }

    /// Every check that needs more than one field, or the guest's view of the command line:
    /// [`crate::Machine::build`] calls it first, and a front end may call it earlier to
    /// report a usage error before it does anything else.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.persistence.validate()?;
        let cmdline = validate_cmdline(&self.cmdline)?;
        // The disk store on NVM RAM is allowed: the kernel then ignores what RAM holds and
        // restores from the disk at every boot, which measures the volatile plate function
        // on the same machine as the NVM one.
        if cmdline.plate_store_disk && self.disk.is_none() {
            return Err(ConfigError::DiskStoreWithoutDisk);
        }
        if cmdline.plate_store_disk && !cmdline.plate {
            return Err(ConfigError::DiskStoreWithoutPlates);
        }
        if self.memory == MemoryKind::Volatile {
            if self.persistence != Persistence::default() {
                return Err(ConfigError::PersistenceOfVolatileRam);
            }
            if self.prefault != Prefault::default()
                || self.reformat
                || self.allocation != crate::image::Allocation::default()
            {
                return Err(ConfigError::ImageOptionsOfVolatileRam);
            }
            let size = self.ram_size();
            if !size.is_multiple_of(nvram::layout::PAGE_SIZE)
                || !(nvram::layout::MIN_RAM..=nvram::layout::MAX_RAM).contains(&size)
            {
                return Err(ConfigError::RamSize(size));
            }
        }
        if let Some(disk) = &self.disk {
            if disk.size_if_created == 0 || !disk.size_if_created.is_multiple_of(512) {
                return Err(ConfigError::DiskSize(disk.size_if_created));
            }
        }
        Ok(())
    }

    /// The size of volatile RAM: as asked, or the size a new image gets.
    pub fn ram_size(&self) -> u64 {
        self.mem_size.unwrap_or(nvram::layout::DEFAULT_RAM)
    }

    /// A configuration with defaults for everything but the image.
    pub fn new(image: impl Into<PathBuf>) -> Self {
        Self {
            image: image.into(),
            mem_size: None,
            memory: MemoryKind::Nvm,
            disk: None,
            reformat: false,
            kernel: KernelSource::Bundled,
            cmdline: String::new(),
            programs: Vec::new(),
            console: ConsoleOutput::Stdout,
            kvm_device: PathBuf::from("/dev/kvm"),
            #[cfg(feature = "test-knobs")]
            engine_pause_ms: None,
            persistence: Persistence::default(),
            prefault: Prefault::default(),
            allocation: crate::image::Allocation::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_evict_under_eadr_is_refused_not_dropped() {
        let mut config = VmConfig::new("x.img");
        config.persistence.crash_evict = Some(CrashEvict { fraction: 0.5, seed: 1 });
        assert_eq!(config.validate(), Err(ConfigError::CrashEvictUnderEadr));
        // Refused before anything is touched: no KVM, no image.
        config.kvm_device = "/nonexistent/kvm".into();
        assert!(matches!(crate::Machine::build(&config), Err(crate::Error::Config(ConfigError::CrashEvictUnderEadr))));
        config.persistence.model = PersistenceModel::Adr;
        assert_eq!(config.validate(), Ok(()));
        config.persistence.crash_evict = Some(CrashEvict { fraction: 1.5, seed: 1 });
        assert_eq!(config.validate(), Err(ConfigError::EvictFraction(1.5)));
    }

    #[test]
    fn the_command_line_is_checked_with_the_guests_parser() {
        let mut config = VmConfig::new("x.img");
        config.cmdline = "apps=kv,counter kv_verify_every=1 counter_shutdown=3 plate_copy=cpu".into();
        assert_eq!(config.validate(), Ok(()));
        config.cmdline = "apps=kv bogus=1".into();
        let err = config.validate().unwrap_err();
        assert_eq!(err, ConfigError::UnknownCmdlineItem { item: "bogus=1".into() });
        let message = err.to_string();
        assert!(KEYS.iter().all(|key| message.contains(key)), "{message}");
        assert!(!message.contains("--"), "a library error names no flag: {message}");
        config.cmdline = "checkpoint_ms=0".into();
        assert_eq!(config.validate(), Err(ConfigError::BadCmdlineValue { item: "checkpoint_ms=0".into() }));
    }

    #[test]
    fn volatile_ram_refuses_what_only_an_image_has() {
        let mut config = VmConfig::new("unused.img");
        config.memory = MemoryKind::Volatile;
        assert_eq!(config.validate(), Ok(()));
        config.persistence.model = PersistenceModel::Adr;
        assert_eq!(config.validate(), Err(ConfigError::PersistenceOfVolatileRam));
        config.persistence = Persistence { sync: true, ..Persistence::default() };
        assert_eq!(config.validate(), Err(ConfigError::PersistenceOfVolatileRam));
        config.persistence = Persistence::default();
        config.prefault = Prefault::All;
        assert_eq!(config.validate(), Err(ConfigError::ImageOptionsOfVolatileRam));
        config.prefault = Prefault::default();
        config.reformat = true;
        assert_eq!(config.validate(), Err(ConfigError::ImageOptionsOfVolatileRam));
        config.reformat = false;
        config.mem_size = Some(4097);
        assert_eq!(config.validate(), Err(ConfigError::RamSize(4097)));
        config.mem_size = Some(4 << 30);
        assert_eq!(config.validate(), Err(ConfigError::RamSize(4 << 30)));
        config.mem_size = Some(16 << 20);
        assert_eq!(config.validate(), Err(ConfigError::RamSize(16 << 20)));
        config.mem_size = Some(64 << 20);
        config.disk = Some(DiskConfig { path: "d.img".into(), size_if_created: 1000 });
        assert_eq!(config.validate(), Err(ConfigError::DiskSize(1000)));
        config.disk = Some(DiskConfig { path: "d.img".into(), size_if_created: DEFAULT_DISK_SIZE });
        assert_eq!(config.validate(), Ok(()));
        config.cmdline = "plate_store=disk plate=off".into();
        assert_eq!(config.validate(), Err(ConfigError::DiskStoreWithoutPlates));
        config.cmdline = "plate_store=disk".into();
        assert_eq!(config.validate(), Ok(()));
        config.disk = None;
        assert_eq!(config.validate(), Err(ConfigError::DiskStoreWithoutDisk));
        config.disk = Some(DiskConfig { path: "d.img".into(), size_if_created: DEFAULT_DISK_SIZE });
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn the_engine_pause_is_a_test_knob() {
        let mut config = VmConfig::new("x.img");
        assert_eq!(config.set_engine_pause_ms(None), Ok(()));
        let set = config.set_engine_pause_ms(Some(30));
        assert_eq!(set.is_ok(), cfg!(feature = "test-knobs"), "{set:?}");
    }

    #[test]
    fn a_planted_bug_on_the_command_line_is_a_test_knob() {
        let got = validate_cmdline("apps=kv test_plant=fence:commit");
        match cfg!(feature = "test-knobs") {
            true => assert!(got.is_ok(), "{got:?}"),
            false => assert_eq!(got, Err(ConfigError::CmdlineTestKnob)),
        }
    }
}
