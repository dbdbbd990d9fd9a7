//! The NVM image file: created, sized, locked, its blocks reserved, and checked before it
//! becomes RAM.

mod fate;
mod lock;

pub use fate::{ImageFate, ImageWatch};

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use nvram::layout::{MAX_RAM, MIN_RAM, PAGE_SIZE};

/// Why the image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path} is a directory; give the path of an image file (it is created when missing)")]
    IsDirectory { path: PathBuf },
    #[error("cannot open {path} for reading and writing (the VMM needs both to use it as guest RAM)")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is in use by another VMM or program{} (it holds a lock on the image); stop it first", holder.as_ref().map(|h| format!(", {h},")).unwrap_or_default())]
    Locked { path: PathBuf, holder: Option<String> },
    #[error("the file system of {path} has no room for the image's {} MiB: the guest would be killed at its first store to a page that cannot be allocated; free space, or give a smaller or sparse image", size >> 20)]
    NoSpace { path: PathBuf, size: u64 },
    #[error("cannot reserve the blocks of {path}")]
    Reserve {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} holds {actual} bytes of RAM but {requested} are asked for; use the image at its size, or another image"
    )]
    SizeMismatch { path: PathBuf, actual: u64, requested: u64 },
    #[error("{what} of {size} bytes is not a multiple of 4 KiB")]
    Unaligned { what: &'static str, size: u64 },
    #[error("{what} of {size} bytes is too small: the kernel needs at least {min} bytes ({} MiB)", min >> 20)]
    TooSmall { what: &'static str, size: u64, min: u64 },
    #[error("{what} of {size} bytes is too large: at most {max} bytes ({} GiB) of RAM fit below the 32-bit MMIO hole", max >> 30)]
    TooLarge { what: &'static str, size: u64, max: u64 },
    #[error("cannot size {path}")]
    Resize {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How the image's blocks are made sure of on its file system before the guest starts.
///
/// A store of the guest to a hole of the image needs a new block; on a full file system
/// it gets SIGBUS. Reserving every block (`fallocate`) rules that out, but its unwritten
/// extents make the first store to each page several times dearer: measured with the
/// paper's configuration (`cargo bench --bench plate`), the plate-ification's copy took
/// 108 to 159 ms on a reserved image against 18 to 28 ms on a sparse one, as every page is
/// first touched then. So the default only checks that the free space covers the holes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Allocation {
    /// Refuse the image when its file system's free space cannot hold its holes: a lack
    /// of space is an error before the guest starts. The space is not held: should another
    /// program fill the disk later, the SIGBUS is reported ([`crate::sigbus`]).
    #[default]
    Checked,
    /// `fallocate` the whole image: no later lack of space can stop the machine, at the
    /// cost of slower first stores (above). The reserved blocks are unwritten extents:
    /// cheap to make (no data written, still zeros to readers).
    Reserve,
    /// No check: a thin image larger than the free space, on purpose.
    Sparse,
}

/// An open, locked image. The lock lasts as long as the value.
#[derive(Debug)]
pub struct NvmImage {
    file: File,
    path: PathBuf,
    size: u64,
    created: bool,
}

/// Checks that `size` can be the RAM of the machine.
pub fn check_size(what: &'static str, size: u64) -> Result<(), ImageError> {
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(ImageError::Unaligned { what, size });
    }
    if size < MIN_RAM {
        return Err(ImageError::TooSmall { what, size, min: MIN_RAM });
    }
    if size > MAX_RAM {
        return Err(ImageError::TooLarge { what, size, max: MAX_RAM });
    }
    Ok(())
}

impl NvmImage {
    /// Opens `path`, or creates it as a file of `requested` bytes (default
    /// [`nvram::layout::DEFAULT_RAM`]), locks it and reserves its blocks as `allocation`
    /// says. With `reformat`, the image's contents are discarded (the file is emptied and
    /// re-extended: zeros again). A file this call created is removed again when a later
    /// step fails, so a refused boot leaves nothing behind.
    pub fn open(
        path: &Path,
        requested: Option<u64>,
        reformat: bool,
        allocation: Allocation,
    ) -> Result<Self, ImageError> {
        if let Some(size) = requested {
            check_size("the RAM size asked for", size)?;
        }
        if path.is_dir() {
            return Err(ImageError::IsDirectory { path: path.into() });
        }
        if let Some(file) = held_file(path) {
            // This process holds the image ([`ImageHold`]): its open file description, which
            // has the locks already, not a new one, which would conflict with them.
            return Self::prepare(file, path, requested, reformat, allocation, false);
        }
        let (file, created) = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => (file, false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|source| ImageError::Create { path: path.into(), source })?;
                (file, true)
            }
            Err(source) => return Err(ImageError::Open { path: path.into(), source }),
        };
        let result = Self::prepare(file, path, requested, reformat, allocation, created);
        if result.is_err() && created {
            // Ours, and nothing was stored in it yet.
            let _ = std::fs::remove_file(path);
        }
        result
    }

    /// Locks, sizes and reserves a freshly opened image file.
    fn prepare(
        file: File,
        path: &Path,
        requested: Option<u64>,
        reformat: bool,
        allocation: Allocation,
        created: bool,
    ) -> Result<Self, ImageError> {
        lock::lock_exclusive(&file, path)?;
        let resize = |file: &File, len: u64| {
            file.set_len(len).map_err(|source| ImageError::Resize { path: path.into(), source })
        };
        let actual = file.metadata().map_err(|source| ImageError::Open { path: path.into(), source })?.len();
        let size = if actual == 0 {
            // A new (or empty) file: nothing to lose, give it its size. `set_len` leaves a
            // sparse file: the zeros cost neither disk nor guest time.
            let size = requested.unwrap_or(nvram::layout::DEFAULT_RAM);
            if !created {
                tracing::warn!("{} was an empty file: it becomes a new image of {} MiB", path.display(), size >> 20);
            }
            resize(&file, size)?;
            size
        } else {
            if let Some(requested) = requested.filter(|&r| r != actual) {
                return Err(ImageError::SizeMismatch { path: path.into(), actual, requested });
            }
            check_size("the image", actual)?;
            if reformat {
                resize(&file, 0)?;
                resize(&file, actual)?;
            }
            actual
        };
        match allocation {
            Allocation::Checked => check_room(&file, path, size)?,
            Allocation::Reserve => reserve(&file, path, size)?,
            Allocation::Sparse => {}
        }
        Ok(Self { file, path: path.into(), size, created: created || actual == 0 })
    }

    /// The image's size: the guest's RAM size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether this open created the image (or gave an empty file its size).
    pub fn created(&self) -> bool {
        self.created
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

/// An image this process keeps locked across the machines it builds on it one after
/// another (`vmm torture` reboots in-process thousands of times): between two machines no
/// other VMM can take the image. Both of the image's locks belong to an open file
/// description, so a second open of the file by this process would conflict with them;
/// instead, while the hold lives, [`NvmImage::open`] of the same file (same device and
/// inode) in this process uses a duplicate of the hold's descriptor, whose locks it already
/// has. Closing that duplicate when the machine goes releases nothing: the locks go with
/// the last descriptor of the description, the hold's. The holder is trusted to build one
/// machine at a time on the image: the hold does not exclude this process's own opens.
#[derive(Debug)]
pub struct ImageHold {
    file: File,
    path: PathBuf,
    id: (u64, u64),
}

/// The images held ([`ImageHold`]) by this process: device, inode and a duplicate of the
/// hold's descriptor.
static HELD: std::sync::Mutex<Vec<((u64, u64), File)>> = std::sync::Mutex::new(Vec::new());

impl ImageHold {
    /// Locks the file at `path` as [`NvmImage::open`] does (refused, naming the holder, if
    /// another program holds it), creating it empty when missing (`created` then says so),
    /// without reading, checking or changing its contents: the caller decides what it is.
    pub fn lock(path: &Path) -> Result<(Self, bool), ImageError> {
        if path.is_dir() {
            return Err(ImageError::IsDirectory { path: path.into() });
        }
        let mut created = false;
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                created = true;
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(|source| ImageError::Create { path: path.into(), source })?
            }
            Err(source) => return Err(ImageError::Open { path: path.into(), source }),
        };
        if let Err(e) = lock::lock_exclusive(&file, path) {
            if created {
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
        let open_err = |source| ImageError::Open { path: path.into(), source };
        let meta = file.metadata().map_err(open_err)?;
        let id = (std::os::unix::fs::MetadataExt::dev(&meta), std::os::unix::fs::MetadataExt::ino(&meta));
        let dup = file.try_clone().map_err(open_err)?;
        HELD.lock().unwrap_or_else(|e| e.into_inner()).push((id, dup));
        Ok((Self { file, path: path.into(), id }, created))
    }

    /// The held file, locked.
    pub fn file(&self) -> &File {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ImageHold {
    fn drop(&mut self) {
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = held.iter().position(|(id, _)| *id == self.id) {
            held.swap_remove(at);
        }
    }
}

/// A duplicate of the descriptor of a hold on the file at `path`, if this process has one.
fn held_file(path: &Path) -> Option<File> {
    let meta = std::fs::metadata(path).ok()?;
    let id = (std::os::unix::fs::MetadataExt::dev(&meta), std::os::unix::fs::MetadataExt::ino(&meta));
    let held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    held.iter().find(|(held, _)| *held == id).and_then(|(_, file)| file.try_clone().ok())
}

/// Whether `file` holds a valid root header of this format (either of its two copies): an
/// image a kernel of this VMM formatted. A short file, or one of other bytes, does not.
pub fn has_root_header(file: &File) -> io::Result<bool> {
    use nvram::header::{RootHeader, HEADER_SIZE};
    use std::os::unix::fs::FileExt;
    let read = |at: u64| -> io::Result<Option<RootHeader>> {
        let mut bytes = [0u8; HEADER_SIZE];
        match file.read_exact_at(&mut bytes, at) {
            Ok(()) => Ok(Some(RootHeader::from_bytes(&bytes))),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    };
    let (Some(first), Some(second)) = (read(nvram::layout::ROOT_HEADER)?, read(nvram::layout::ROOT_HEADER_COPY)?)
    else {
        return Ok(false);
    };
    Ok(nvram::header::choose(&first, &second).is_ok())
}

/// Checks that the file system's free space holds the blocks the image still lacks.
fn check_room(file: &File, path: &Path, size: u64) -> Result<(), ImageError> {
    use std::os::unix::fs::MetadataExt;
    let allocated = file.metadata().map_or(0, |m| m.blocks() * 512);
    let missing = size.saturating_sub(allocated);
    match rustix::fs::fstatvfs(file) {
        // No blocks at all: a virtual file system (procfs, sysfs) with no figure to check.
        Ok(fs) if fs.f_blocks == 0 => Ok(()),
        Ok(fs) if fs.f_bavail.saturating_mul(fs.f_frsize) < missing => {
            Err(ImageError::NoSpace { path: path.into(), size })
        }
        Ok(_) => Ok(()),
        // A file system that cannot say: nothing to check against (the SIGBUS report stays).
        Err(e) => {
            tracing::debug!("{}: no free-space figure ({e})", path.display());
            Ok(())
        }
    }
}

/// Allocates every block of the image's `size` bytes; data already there stays as it is.
fn reserve(file: &File, path: &Path, size: u64) -> Result<(), ImageError> {
    use rustix::fs::{fallocate, FallocateFlags};
    match fallocate(file, FallocateFlags::empty(), 0, size) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::NOSPC) | Err(rustix::io::Errno::DQUOT) => {
            Err(ImageError::NoSpace { path: path.into(), size })
        }
        Err(rustix::io::Errno::OPNOTSUPP) => {
            tracing::warn!(
                "{}: this file system cannot reserve the image's blocks; if it fills up, the machine stops at the guest's next store",
                path.display()
            );
            Ok(())
        }
        Err(e) => Err(ImageError::Reserve { path: path.into(), source: e.into() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("nvm-image-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir
    }

    #[test]
    fn creates_sparse_and_reopens_with_its_size() {
        let path = temp_path("create");
        let image = NvmImage::open(&path, Some(32 << 20), false, Allocation::Sparse).unwrap();
        assert!(image.created());
        assert_eq!(image.size(), 32 << 20);
        drop(image);
        let image = NvmImage::open(&path, None, false, Allocation::Sparse).unwrap();
        assert!(!image.created());
        assert_eq!(image.size(), 32 << 20);
        drop(image);
        assert!(matches!(
            NvmImage::open(&path, Some(64 << 20), false, Allocation::Sparse),
            Err(ImageError::SizeMismatch { actual, requested, .. }) if actual == 32 << 20 && requested == 64 << 20
        ));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_second_open_is_refused_while_locked() {
        let path = temp_path("lock");
        let first = NvmImage::open(&path, Some(32 << 20), false, Allocation::Sparse).unwrap();
        assert!(matches!(NvmImage::open(&path, None, false, Allocation::Sparse), Err(ImageError::Locked { .. })));
        drop(first);
        NvmImage::open(&path, None, false, Allocation::Sparse).unwrap();
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_hold_keeps_the_lock_across_the_opens_of_this_process() {
        let path = temp_path("hold");
        let (hold, created) = ImageHold::lock(&path).unwrap();
        assert!(created);
        let other = || File::options().read(true).write(true).open(&path).unwrap();
        for _ in 0..2 {
            let image = NvmImage::open(&path, Some(32 << 20), false, Allocation::Sparse).unwrap();
            assert_eq!(image.size(), 32 << 20);
            assert!(other().try_lock().is_err(), "held while the image is open");
            drop(image);
            assert!(other().try_lock().is_err(), "still held between two opens");
        }
        assert!(!has_root_header(hold.file()).unwrap(), "zeros are no header");
        drop(hold);
        other().try_lock().unwrap();
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_root_header_is_told_from_other_bytes() {
        use std::io::Write;
        let path = temp_path("header");
        std::fs::write(&path, b"hello\n").unwrap();
        assert!(!has_root_header(&File::open(&path).unwrap()).unwrap());
        let file = File::options().write(true).open(&path).unwrap();
        file.set_len(32 << 20).unwrap();
        let mut header = nvram::header::RootHeader::new(1);
        header.seal();
        let mut at = &file;
        std::io::Seek::seek(&mut at, std::io::SeekFrom::Start(nvram::layout::ROOT_HEADER_COPY)).unwrap();
        at.write_all(&header.to_bytes()).unwrap();
        assert!(has_root_header(&File::open(&path).unwrap()).unwrap(), "the second copy is enough");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(matches!(check_size("x", (16 << 20) + 1), Err(ImageError::Unaligned { .. })));
        assert!(matches!(check_size("x", 1 << 20), Err(ImageError::TooSmall { .. })));
        assert!(matches!(check_size("x", 4 << 30), Err(ImageError::TooLarge { .. })));
        assert!(check_size("x", 256 << 20).is_ok());
    }

    #[test]
    fn reformat_discards_the_contents() {
        use std::io::{Read, Seek, SeekFrom, Write};
        let path = temp_path("reformat");
        let image = NvmImage::open(&path, Some(32 << 20), false, Allocation::Sparse).unwrap();
        let mut file = image.file();
        file.seek(SeekFrom::Start(8 << 20)).unwrap();
        file.write_all(b"persistent").unwrap();
        drop(image);
        let image = NvmImage::open(&path, None, true, Allocation::Sparse).unwrap();
        assert_eq!(image.size(), 32 << 20);
        let mut buf = [0u8; 10];
        let mut file = image.file();
        file.seek(SeekFrom::Start(8 << 20)).unwrap();
        file.read_exact(&mut buf).unwrap();
        assert_eq!(buf, [0; 10]);
        std::fs::remove_file(path).unwrap();
    }
}
