//! Guest RAM: the image file mapped `MAP_SHARED`, so that guest stores land in the file
//! (eADR), or `MAP_PRIVATE`, so that they land only where the persistence domain puts them
//! (ADR, `devices::persistence`).

use devices::PersistenceModel;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::image::NvmImage;

/// Guest RAM, one region from guest-physical 0 to the image's size.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Mapping the image failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot map {path} as guest RAM: {source}")]
pub struct MemoryError {
    path: std::path::PathBuf,
    #[source]
    source: vm_memory::mmap::FromRangesError,
}

/// Maps the whole image as guest RAM. vm-memory maps a file `MAP_SHARED | MAP_NORESERVE`.
///
/// The mapping gets a file description of its own, opened anew, not a duplicate of the one
/// holding the image's lock: a mapping keeps its file alive until the address space is torn
/// down, which after a SIGKILL may come after the process is reaped, and the lock must go
/// with the process.
pub fn map_image(image: &NvmImage) -> Result<GuestMemory, MemoryError> {
    let file = reopen(image)?;
    let size = image.size() as usize;
    GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), size, Some(FileOffset::new(file, 0)))])
        .map_err(|source| MemoryError { path: image.path().into(), source })
}

/// Maps guest RAM for `model`: the image itself under eADR, a private copy of it under ADR
/// (then [`map_image`] gives the persistence domain its view of the image).
pub fn map_guest_ram(image: &NvmImage, model: PersistenceModel) -> Result<GuestMemory, MemoryError> {
    if model == PersistenceModel::Eadr {
        return map_image(image);
    }
    let mmap_err =
        |e| MemoryError { path: image.path().into(), source: vm_memory::mmap::FromRangesError::MmapRegion(e) };
    let region = MmapRegion::build(
        Some(FileOffset::new(reopen(image)?, 0)),
        image.size() as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_NORESERVE,
    )
    .map_err(mmap_err)?;
    let region = GuestRegionMmap::new(region, GuestAddress(0)).ok_or_else(|| {
        mmap_err(vm_memory::mmap::MmapRegionError::Mmap(std::io::Error::other("guest RAM overflows")))
    })?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| MemoryError { path: image.path().into(), source: e.into() })
}

fn reopen(image: &NvmImage) -> Result<std::fs::File, MemoryError> {
    std::fs::OpenOptions::new().read(true).write(true).open(image.path()).map_err(|e| MemoryError {
        path: image.path().into(),
        source: vm_memory::mmap::FromRangesError::MmapRegion(vm_memory::mmap::MmapRegionError::Mmap(e)),
    })
}
