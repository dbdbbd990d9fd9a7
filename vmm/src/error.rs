//! The error of building or running a machine: one variant per stage, each with its cause.

use std::io;
use std::path::PathBuf;

use crate::config::ConfigError;
use crate::image::ImageError;
use crate::loader::LoadError;
use crate::memory::{MemoryError, PrefaultError};
use crate::vcpu::GuestError;
use crate::vm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot map guest RAM ahead")]
    Prefault(#[from] PrefaultError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("cannot open the console file {path}")]
    Console {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the {what}")]
    Setup {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("cannot lay out the port bus")]
    PortBus(#[source] devices::bus::OverlapError),
    #[error("cannot lay out the MMIO bus")]
    MmioBus(#[source] devices::bus::OverlapError),
    #[error(transparent)]
    Disk(#[from] devices::virtio::DiskError),
    #[error(transparent)]
    Modules(#[from] crate::modules::ModuleError),
    #[error("cannot read the program {path}")]
    ReadProgram {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "programs are started only by a boot that formats the image, and the image {path} {how}: its programs \
         are in it already (boot it without programs, or start the image afresh)"
    )]
    ProgramsForWarmImage { path: PathBuf, how: &'static str },
    #[error("the command line asks for the program `{name}`, which this VMM does not bundle")]
    NoSuchApp { name: &'static str },
    #[error("{0} is a test knob, and this build has none (cargo feature `test-knobs`)")]
    TestKnob(&'static str),
}
