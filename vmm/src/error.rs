//! The error of building or running a machine: one variant per stage, each with its cause.

use std::io;
use std::path::PathBuf;

use crate::image::ImageError;
use crate::loader::LoadError;
use crate::memory::MemoryError;
use crate::vcpu::GuestError;
use crate::vm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("cannot open the console file {path}: {source}")]
    Console {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the {what}: {source}")]
    Setup {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}
