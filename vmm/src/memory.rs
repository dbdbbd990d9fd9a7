//! Guest RAM: the image file mapped `MAP_SHARED`, so that guest stores land in the file.

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

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
    let file = std::fs::OpenOptions::new().read(true).write(true).open(image.path()).map_err(|e| MemoryError {
        path: image.path().into(),
        source: vm_memory::mmap::FromRangesError::MmapRegion(vm_memory::mmap::MmapRegionError::Mmap(e)),
    })?;
    let size = image.size() as usize;
    GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), size, Some(FileOffset::new(file, 0)))])
        .map_err(|source| MemoryError { path: image.path().into(), source })
}
