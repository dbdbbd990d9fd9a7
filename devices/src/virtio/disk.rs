//! The block device's backing file: a regular file of whole 512-byte sectors, created at a
//! given size when missing, and held under an exclusive `flock` so that a second VMM (or a
//! second device of this one) cannot write the same disk behind the first one's back.

use std::fs::{File, OpenOptions, TryLockError};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The virtio-blk sector: capacities and request offsets count in these, whatever the
/// advertised `blk_size`.
pub const SECTOR_SIZE: u64 = 512;

/// Why a disk file could not be opened. Each variant names the path.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// `stat` of the path failed for another reason than its absence.
    #[error("cannot inspect disk file {path}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The path is a directory, a device node, a FIFO or a socket.
    #[error("disk {path} is not a regular file")]
    NotRegularFile { path: PathBuf },
    /// Creating the missing file failed.
    #[error("cannot create disk file {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Opening the existing file read-write failed.
    #[error("cannot open disk file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The size asked for a new disk is zero or not a whole number of sectors.
    #[error("disk {path} cannot be created with {size} bytes: the size must be a non-zero multiple of 512")]
    InvalidSize { path: PathBuf, size: u64 },
    /// Giving the new file its size failed (for instance, a full file system).
    #[error("cannot size disk file {path}")]
    Resize {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The existing file holds less than one sector.
    #[error("disk {path} is smaller than one 512-byte sector")]
    TooSmall { path: PathBuf },
    /// Another process (or another open file of this one) holds the disk's lock.
    #[error("disk {path} is in use by another VMM (its lock is held)")]
    Locked { path: PathBuf },
    /// `flock` itself failed.
    #[error("cannot lock disk file {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An open, locked disk file. The lock lives as long as the `File`.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    sectors: u64,
}

impl Disk {
    /// Opens the disk at `path`, creating it with `size_if_created` bytes (a non-zero
    /// multiple of 512) when it does not exist. An existing file keeps its size; trailing
    /// bytes past the last whole sector are not reachable by the guest.
    pub fn open(path: impl AsRef<Path>, size_if_created: u64) -> Result<Self, DiskError> {
        let path = path.as_ref().to_path_buf();
        let file = match std::fs::metadata(&path) {
            Ok(meta) if !meta.is_file() => return Err(DiskError::NotRegularFile { path }),
            Ok(_) => OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|source| DiskError::Open { path: path.clone(), source })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if size_if_created == 0 || !size_if_created.is_multiple_of(SECTOR_SIZE) {
                    return Err(DiskError::InvalidSize { path, size: size_if_created });
                }
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|source| DiskError::Create { path: path.clone(), source })?;
                // Lock before sizing, so that two VMMs racing to create the disk cannot both
                // size it; the loser of `create_new` already failed above.
                lock(&file, &path)?;
                if let Err(source) = file.set_len(size_if_created) {
                    let _ = std::fs::remove_file(&path);
                    return Err(DiskError::Resize { path, source });
                }
                return Self::from_locked(file, path);
            }
            Err(source) => return Err(DiskError::Inspect { path, source }),
        };
        // The path may have been swapped between `stat` and `open`: judge the opened file.
        let meta = file.metadata().map_err(|source| DiskError::Inspect { path: path.clone(), source })?;
        if !meta.is_file() {
            return Err(DiskError::NotRegularFile { path });
        }
        lock(&file, &path)?;
        Self::from_locked(file, path)
    }

    fn from_locked(file: File, path: PathBuf) -> Result<Self, DiskError> {
        let len = file.metadata().map_err(|source| DiskError::Inspect { path: path.clone(), source })?.len();
        let sectors = len / SECTOR_SIZE;
        if sectors == 0 {
            return Err(DiskError::TooSmall { path });
        }
        Ok(Self { file, path, sectors })
    }

    /// The disk's size in 512-byte sectors (the config space's `capacity`).
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// The disk's usable size in bytes.
    pub fn len(&self) -> u64 {
        self.sectors * SECTOR_SIZE
    }

    /// Never true: a disk holds at least one sector.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The path the disk was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fills `buf` from byte `offset`; the caller has checked the range against [`Self::len`].
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    /// Writes `buf` at byte `offset`; the caller has checked the range against [`Self::len`].
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    /// Makes every completed write durable (`fdatasync`), so that a FLUSH the guest waits on
    /// costs what real storage costs.
    pub fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

fn lock(file: &File, path: &Path) -> Result<(), DiskError> {
    match file.try_lock() {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => Err(DiskError::Locked { path: path.to_path_buf() }),
        Err(TryLockError::Error(source)) => Err(DiskError::Lock { path: path.to_path_buf(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn creates_at_size_and_reopens_at_its_size() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("disk.img");
        let disk = Disk::open(&path, 8 * SECTOR_SIZE).unwrap();
        assert_eq!(disk.sectors(), 8);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
        disk.write_at(b"hello", 512).unwrap();
        disk.flush().unwrap();
        drop(disk);
        let disk = Disk::open(&path, 1 << 20).unwrap();
        assert_eq!(disk.sectors(), 8, "an existing disk keeps its size");
        let mut buf = [0u8; 5];
        disk.read_at(&mut buf, 512).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn a_second_open_is_refused_while_the_first_holds_the_lock() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("disk.img");
        let first = Disk::open(&path, 4096).unwrap();
        let err = Disk::open(&path, 4096).unwrap_err();
        assert!(matches!(err, DiskError::Locked { .. }), "{err:?}");
        assert!(err.to_string().contains("disk.img"));
        drop(first);
        Disk::open(&path, 4096).unwrap();
    }

    #[test]
    fn refuses_directories_special_files_bad_sizes_and_tiny_files() {
        let dir = TempDir::new().unwrap();
        let err = Disk::open(dir.as_path(), 4096).unwrap_err();
        assert!(matches!(err, DiskError::NotRegularFile { .. }), "{err:?}");
        let err = Disk::open("/dev/null", 4096).unwrap_err();
        assert!(matches!(err, DiskError::NotRegularFile { .. }), "{err:?}");
        let path = dir.as_path().join("new.img");
        for size in [0, 1000] {
            let err = Disk::open(&path, size).unwrap_err();
            assert!(matches!(err, DiskError::InvalidSize { .. }), "{err:?}");
            assert!(!path.exists());
        }
        let tiny = dir.as_path().join("tiny.img");
        std::fs::write(&tiny, [0u8; 100]).unwrap();
        let err = Disk::open(&tiny, 4096).unwrap_err();
        assert!(matches!(err, DiskError::TooSmall { .. }), "{err:?}");
        let err = Disk::open(dir.as_path().join("missing/x.img"), 4096).unwrap_err();
        assert!(matches!(err, DiskError::Inspect { .. } | DiskError::Create { .. }), "{err:?}");
        assert!(!err.to_string().contains("No such file"), "the source is not repeated: {err}");
    }
}
