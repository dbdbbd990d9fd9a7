//! Guest RAM: the image file mapped `MAP_SHARED`, so that guest stores land in the file
//! (eADR), or `MAP_PRIVATE`, so that they land only where the persistence domain puts them
//! (ADR, `devices::persistence`).

use devices::PersistenceModel;
use rustix::fs::{seek, SeekFrom};
use rustix::mm::{madvise, Advice};
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::image::NvmImage;

/// Guest RAM, one region from guest-physical 0 to the image's size.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Mapping the image failed.
#[derive(Debug, thiserror::Error)]
// vm-memory's error says its own cause in its message and returns it as its source too:
// it is shown here, and the chain stops at it, so that the cause is said once.
pub enum MemoryError {
    #[error("cannot map {path} as guest RAM: {cause}")]
    Map { path: std::path::PathBuf, cause: vm_memory::mmap::FromRangesError },
    #[error("cannot map {path} as guest RAM: its mapping would overflow the guest's address space")]
    Overflow { path: std::path::PathBuf },
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
        .map_err(|source| MemoryError::Map { path: image.path().into(), cause: source })
}

/// Maps guest RAM for `model`: the image itself under eADR, a private copy of it under ADR
/// (then [`map_image`] gives the persistence domain its view of the image).
pub fn map_guest_ram(image: &NvmImage, model: PersistenceModel) -> Result<GuestMemory, MemoryError> {
    if model == PersistenceModel::Eadr {
        return map_image(image);
    }
    let mmap_err =
        |e| MemoryError::Map { path: image.path().into(), cause: vm_memory::mmap::FromRangesError::MmapRegion(e) };
    let region = MmapRegion::build(
        Some(FileOffset::new(reopen(image)?, 0)),
        image.size() as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_NORESERVE,
    )
    .map_err(mmap_err)?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| MemoryError::Overflow { path: image.path().into() })?;
    GuestMemoryMmap::from_regions(vec![region])
        .map_err(|e| MemoryError::Map { path: image.path().into(), cause: e.into() })
}

/// Anonymous guest RAM of `size` bytes (`vmm boot --memory volatile`): private, zeroed,
/// gone when the VMM exits, as DRAM is at a power failure.
pub fn map_volatile(size: u64) -> Result<GuestMemory, MemoryError> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
        .map_err(|cause| MemoryError::Map { path: "anonymous memory".into(), cause })
}

fn reopen(image: &NvmImage) -> Result<std::fs::File, MemoryError> {
    std::fs::OpenOptions::new().read(true).write(true).open(image.path()).map_err(|e| MemoryError::Map {
        path: image.path().into(),
        cause: vm_memory::mmap::FromRangesError::MmapRegion(vm_memory::mmap::MmapRegionError::Mmap(e)),
    })
}

/// Mapping the whole image ahead ([`Prefault::All`]) failed.
#[derive(Debug, thiserror::Error)]
pub enum PrefaultError {
    #[error("mapping guest RAM ahead needs MADV_POPULATE_WRITE, of Linux 5.14 or later")]
    Unsupported(#[source] std::io::Error),
    #[error("the image could not be allocated on its file system (full?)")]
    Allocate(#[source] std::io::Error),
    #[error("cannot start the thread that maps guest RAM ahead")]
    Thread(#[source] std::io::Error),
}

/// How much of the image the VMM maps into its address space before the guest needs it.
///
/// A page of the image that this process has not touched costs a host page fault the first
/// time the guest or the copy engine touches it (here, about 1 µs for a page in the host's
/// page cache, 6 µs for a page of a hole in the sparse file). Real NVM has no such cost, and
/// the paper's figures do not include it, so the VMM takes it ahead of time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Prefault {
    /// Map the pages that hold data (the file's data extents, found with `SEEK_DATA`) for
    /// writing, in a background thread: a restore after a crash finds its save areas and
    /// spaces mapped and writable (the first write to a clean page of a file costs a fault
    /// of its own, about 3 µs here). Holes stay holes: the image stays sparse; the host
    /// writes the data pages back once more. A private mapping (guest RAM under ADR) is
    /// mapped for reading only: mapping it for writing would copy every data page.
    #[default]
    Data,
    /// Map every page for writing before the guest starts: no host fault ever, at the cost
    /// of a slower start and an image fully allocated on disk.
    All,
}

/// A view of the image to prefault, and whether it is a private mapping (its pages are
/// then mapped for reading only in [`Prefault::Data`]).
pub struct Mapping {
    pub memory: GuestMemory,
    pub private: bool,
}

/// Maps `mappings` (views of `image`) as `how` says; [`Prefault::Data`] returns at once and
/// works in a thread of its own, holding the mappings until it is done (the handle is for
/// those who want to wait).
pub fn prefault(
    image: &NvmImage,
    mappings: Vec<Mapping>,
    how: Prefault,
) -> Result<Option<std::thread::JoinHandle<()>>, PrefaultError> {
    match how {
        Prefault::All => {
            for region in mappings.iter().flat_map(|m| m.memory.iter()) {
                populate(region, 0, region.len(), Advice::LinuxPopulateWrite).map_err(|e| {
                    if e.raw_os_error() == Some(libc::EINVAL) {
                        PrefaultError::Unsupported(e)
                    } else {
                        PrefaultError::Allocate(e)
                    }
                })?;
            }
            Ok(None)
        }
        Prefault::Data => {
            // A few lseeks, here; the thread gets the ranges and no file (and so no lock).
            let extents = data_extents(image.file());
            let worker = std::thread::Builder::new()
                .name("prefault".into())
                .spawn(move || {
                    let started = std::time::Instant::now();
                    let mut mapped = 0;
                    for (start, end) in chunks(&extents) {
                        for m in &mappings {
                            let advice = if m.private { Advice::LinuxPopulateRead } else { Advice::LinuxPopulateWrite };
                            if let Err(e) = m.memory.iter().try_for_each(|r| populate(r, start, end - start, advice)) {
                                tracing::debug!("image data not mapped ahead: {e}");
                                return;
                            }
                        }
                        mapped += end - start;
                    }
                    tracing::debug!(
                        mib = mapped >> 20,
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "image data mapped"
                    );
                })
                .map_err(PrefaultError::Thread)?;
            Ok(Some(worker))
        }
    }
}

/// How much one `madvise` of [`Prefault::Data`] maps at most. The call holds the process's
/// address space for reading, and whatever takes it for writing meanwhile waits: creating
/// the vCPU (it maps its `kvm_run` area), a thread's stack. Over a whole extent (28 MiB of
/// a crashed image of the paper's configuration) that wait was 3 to 12 ms of the set-up;
/// a chunk takes about 0.1 ms.
const PREFAULT_CHUNK: u64 = 1 << 20;

/// `extents` cut into pieces of at most [`PREFAULT_CHUNK`] bytes, in order.
fn chunks(extents: &[(u64, u64)]) -> impl Iterator<Item = (u64, u64)> + '_ {
    extents.iter().flat_map(|&(start, end)| {
        (start..end).step_by(PREFAULT_CHUNK as usize).map(move |at| (at, (at + PREFAULT_CHUNK).min(end)))
    })
}

/// The data extents of `file` (holes left out), as byte ranges. Moves the file's offset
/// (nothing reads or writes the image through it: it is mapped).
fn data_extents(file: &std::fs::File) -> Vec<(u64, u64)> {
    let mut extents = Vec::new();
    let mut at = 0;
    // ENXIO ends the walk: no data after `at`.
    while let Ok(start) = seek(file, SeekFrom::Data(at)) {
        match seek(file, SeekFrom::Hole(start)) {
            Ok(end) if end > start => extents.push((start, end)),
            _ => break,
        }
        at = extents.last().map_or(start, |&(_, end)| end);
    }
    extents
}

/// Maps `offset..offset + len` of `region` (page-aligned, clipped to the region), for
/// writing or for reading as `advice` (`MADV_POPULATE_*`) says.
fn populate(region: &GuestRegionMmap, offset: u64, len: u64, advice: Advice) -> std::io::Result<()> {
    const PAGE: u64 = 4096;
    let start = offset & !(PAGE - 1);
    let end = (offset + len).next_multiple_of(PAGE).min(region.len());
    if start >= end {
        return Ok(());
    }
    // SAFETY: `start..end` lies inside the region's mapping, which the caller keeps alive;
    // populating pages maps them and changes no byte of guest memory.
    unsafe { madvise(region.as_ptr().add(start as usize).cast(), (end - start) as usize, advice) }
        .map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    const MIB: u64 = 1 << 20;

    /// A 32 MiB sparse image with data at 1 MiB and 5 MiB.
    fn sparse_image(name: &str) -> (NvmImage, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("nvm-memory-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let image = NvmImage::open(&path, Some(32 * MIB), false, crate::image::Allocation::Sparse).unwrap();
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.seek(SeekFrom::Start(MIB)).unwrap();
        file.write_all(&[0xa5; 4096]).unwrap();
        file.seek(SeekFrom::Start(5 * MIB)).unwrap();
        file.write_all(&[0x5a; 8192]).unwrap();
        file.sync_all().unwrap();
        (image, path)
    }

    /// The entry of the page at `offset` of `region` in /proc/self/pagemap.
    fn pagemap(region: &GuestRegionMmap, offset: u64) -> u64 {
        use std::os::unix::fs::FileExt;
        let page = (region.as_ptr() as u64 + offset) / 4096;
        let mut entry = [0u8; 8];
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        pagemap.read_exact_at(&mut entry, page * 8).unwrap();
        u64::from_le_bytes(entry)
    }

    /// Whether the page is in this process's page tables (bit 63).
    fn mapped(region: &GuestRegionMmap, offset: u64) -> bool {
        pagemap(region, offset) >> 63 == 1
    }

    /// Whether the page is the file's own page, not a private copy of it (bit 61).
    fn file_page(region: &GuestRegionMmap, offset: u64) -> bool {
        pagemap(region, offset) >> 61 & 1 == 1
    }

    fn shared(memory: &GuestMemory) -> Vec<Mapping> {
        vec![Mapping { memory: memory.clone(), private: false }]
    }

    fn allocated(path: &std::path::Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    /// Each piece is at most a chunk, and together they are the extents, in order.
    #[test]
    fn extents_are_mapped_a_chunk_at_a_time() {
        let extents = [(4096, 8192), (MIB, 3 * MIB + 4096), (5 * MIB, 6 * MIB)];
        let pieces: Vec<_> = chunks(&extents).collect();
        assert_eq!(
            pieces,
            [(4096, 8192), (MIB, 2 * MIB), (2 * MIB, 3 * MIB), (3 * MIB, 3 * MIB + 4096), (5 * MIB, 6 * MIB)]
        );
        assert!(pieces.iter().all(|&(s, e)| s < e && e - s <= PREFAULT_CHUNK));
    }

    #[test]
    fn data_extents_cover_the_data_and_skip_the_holes() {
        let (image, path) = sparse_image("extents");
        let extents = data_extents(image.file());
        let inside = |at: u64| extents.iter().any(|&(s, e)| s <= at && at < e);
        assert!(inside(MIB) && inside(5 * MIB + 8191), "{extents:x?}");
        assert!(!inside(10 * MIB), "a hole is no data: {extents:x?}");
        assert!(extents.iter().map(|(s, e)| e - s).sum::<u64>() < 32 * MIB, "{extents:x?}");
        drop(image);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn prefaulting_changes_no_byte_and_data_keeps_the_image_sparse() {
        let (image, path) = sparse_image("prefault");
        let before = allocated(&path);
        let mem = map_image(&image).unwrap();
        let region = mem.iter().next().unwrap();
        assert!(!mapped(region, MIB), "a fresh mapping maps nothing yet");
        let worker = prefault(&image, shared(&mem), Prefault::Data).unwrap();
        worker.expect("a background worker").join().unwrap();
        assert!(mapped(region, MIB) && mapped(region, 5 * MIB + 4096), "the data pages are mapped");
        assert!(!mapped(region, 9 * MIB), "a hole is not");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(MIB)).unwrap(), 0xa5a5_a5a5_a5a5_a5a5);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(5 * MIB + 4096)).unwrap(), 0x5a5a_5a5a_5a5a_5a5a);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(9 * MIB)).unwrap(), 0);
        // SAFETY: the whole mapping is ours; msync only writes dirty pages back.
        unsafe { libc::msync(region.as_ptr().cast(), region.len() as usize, libc::MS_SYNC) };
        assert_eq!(allocated(&path), before, "the holes are still holes");

        assert!(!mapped(region, 12 * MIB));
        assert!(prefault(&image, shared(&mem), Prefault::All).unwrap().is_none(), "done before it returns");
        assert!(mapped(region, 12 * MIB), "every page is mapped, holes too");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(MIB)).unwrap(), 0xa5a5_a5a5_a5a5_a5a5);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(9 * MIB)).unwrap(), 0);
        drop((mem, image));
        std::fs::remove_file(path).unwrap();
    }

    /// Guest RAM under ADR is a private mapping: its data pages are mapped, but not copied
    /// (a copy for writing would take as much anonymous memory as the image holds data).
    #[test]
    fn a_private_mapping_is_prefaulted_without_copying_its_pages() {
        let (image, path) = sparse_image("private");
        let mem = map_guest_ram(&image, PersistenceModel::Adr).unwrap();
        let region = mem.iter().next().unwrap();
        let mappings = vec![Mapping { memory: mem.clone(), private: true }];
        prefault(&image, mappings, Prefault::Data).unwrap().expect("a background worker").join().unwrap();
        assert!(mapped(region, MIB), "the data pages are mapped");
        assert!(file_page(region, MIB), "and still the file's pages, not private copies");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(MIB)).unwrap(), 0xa5a5_a5a5_a5a5_a5a5);
        drop((mem, image));
        std::fs::remove_file(path).unwrap();
    }
}
