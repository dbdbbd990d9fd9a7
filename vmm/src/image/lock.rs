//! The image's exclusive lock, taken two ways so that every kind of image user sees it.
//!
//! `flock` is what other instances of this VMM check. QEMU (and other programs of the
//! field) lock their images with open-file-description locks (`F_OFD_SETLK`), which
//! `flock` neither sees nor blocks: the VMM takes a whole-file OFD write lock too, so that
//! QEMU and this VMM exclude each other both ways. An OFD lock (unlike a POSIX `F_SETLK`
//! one) belongs to the open file, not to the process, so closing another descriptor of the
//! same file elsewhere in the VMM (`vmm inspect` code, a test) does not drop it.

use std::fs::{File, TryLockError};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::ImageError;

/// Takes both locks on `file`, or says who holds the image when that can be told.
pub(super) fn lock_exclusive(file: &File, path: &Path) -> Result<(), ImageError> {
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => return Err(locked(file, path)),
        Err(TryLockError::Error(source)) => return Err(ImageError::Lock { path: path.into(), source }),
    }
    match ofd_write_lock(file) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => Err(locked(file, path)),
        // A file system without fcntl locks (some FUSE ones): flock alone keeps other VMMs out.
        Err(e) if e.raw_os_error() == Some(libc::ENOLCK) || e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            tracing::warn!(
                "{}: no fcntl lock on this file system ({e}); only other VMMs are kept off the image",
                path.display()
            );
            Ok(())
        }
        Err(source) => Err(ImageError::Lock { path: path.into(), source }),
    }
}

/// A whole-file OFD write lock, without waiting.
fn ofd_write_lock(file: &File) -> io::Result<()> {
    // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_WRLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 0;
    lock.l_len = 0; // to the end of the file, however it grows
    lock.l_pid = 0; // required for OFD locks
                    // SAFETY: F_OFD_SETLK on a descriptor we own, with a pointer to a live, initialized
                    // `flock` that the call only reads.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The refusal, naming the holder when `/proc` tells it.
fn locked(file: &File, path: &Path) -> ImageError {
    let holder = file.metadata().ok().and_then(|meta| holder_pid(&file_id(meta.dev(), meta.ino())));
    let holder = holder.map(|pid| {
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        match name.trim() {
            "" => format!("process {pid}"),
            name => format!("process {pid} ({name})"),
        }
    });
    ImageError::Locked { path: path.into(), holder }
}

/// How `/proc` names a file in its lock lines: `major:minor:inode`, in hex, hex, decimal.
fn file_id(dev: u64, ino: u64) -> String {
    format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev))
}

/// The process, other than this one, that holds a lock on the file `id`. `/proc/locks`
/// names the owner of `flock` and POSIX locks, but shows OFD locks (QEMU's) with pid -1:
/// for those, the holder is found by the lock lines of every process's open files
/// (`/proc/PID/fdinfo/FD`). Only done on a refusal, so the walk's cost does not matter.
fn holder_pid(id: &str) -> Option<u32> {
    let me = std::process::id();
    if let Some(pid) = std::fs::read_to_string("/proc/locks").ok().and_then(|locks| lock_owner(&locks, id, me)) {
        return Some(pid);
    }
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        if pid == me {
            return None;
        }
        let fds = std::fs::read_dir(entry.path().join("fdinfo")).ok()?;
        fds.flatten()
            .any(|fd| std::fs::read_to_string(fd.path()).is_ok_and(|info| holds_lock(&info, id)))
            .then_some(pid)
    })
}

/// The fields of a lock line (`3: OFDLCK ADVISORY WRITE 4711 fd:01:1234 0 EOF`) that say
/// who and which file, or None for a waiter (marked `->`) or a line of another shape.
fn lock_fields(line: &str) -> Option<(&str, &str)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.get(1) == Some(&"->") {
        return None;
    }
    Some((fields.get(4)?, fields.get(5)?))
}

/// The owner, other than `me`, of a lock on the file `id` in the text of `/proc/locks`.
fn lock_owner(locks: &str, id: &str, me: u32) -> Option<u32> {
    locks.lines().filter_map(lock_fields).find_map(|(pid, file)| {
        let pid: u32 = pid.parse().ok()?; // -1 for an OFD lock: its owner is not said here
        (file == id && pid != me).then_some(pid)
    })
}

/// Whether an open file's `fdinfo` text shows a lock on the file `id`.
fn holds_lock(fdinfo: &str, id: &str) -> bool {
    fdinfo.lines().filter_map(|line| line.strip_prefix("lock:")).filter_map(lock_fields).any(|(_, file)| file == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCKS: &str = "\
1: POSIX  ADVISORY  WRITE 900 08:01:77 0 EOF
2: -> OFDLCK ADVISORY  WRITE 901 fd:01:1234 0 EOF
3: OFDLCK ADVISORY  READ 902 fd:01:1234 100 100
4: FLOCK  ADVISORY  WRITE 903 fd:01:1234 0 EOF
";

    #[test]
    fn the_owner_is_the_first_lock_of_that_file_that_is_not_ours_nor_a_waiter() {
        let id = file_id(libc::makedev(0xfd, 0x01), 1234);
        assert_eq!(id, "fd:01:1234");
        assert_eq!(lock_owner(LOCKS, &id, 1), Some(902));
        assert_eq!(lock_owner(LOCKS, &id, 902), Some(903));
        assert_eq!(lock_owner(LOCKS, &file_id(libc::makedev(8, 1), 77), 1), Some(900));
        assert_eq!(lock_owner(LOCKS, "fd:01:77", 1), None, "same inode, other device");
        assert_eq!(lock_owner("garbage\n\n1: FLOCK", &id, 1), None);
        assert_eq!(lock_owner("1: OFDLCK ADVISORY READ -1 fd:01:1234 100 101", &id, 1), None, "OFD: owner unsaid");
    }

    #[test]
    fn an_fdinfo_shows_the_locks_of_its_open_file() {
        let info = "pos:\t0\nflags:\t0100002\nlock:\t1: OFDLCK ADVISORY  READ -1 fd:01:1234 100 101\n";
        assert!(holds_lock(info, "fd:01:1234"));
        assert!(!holds_lock(info, "fd:01:123"));
        assert!(!holds_lock("pos:\t0\n", "fd:01:1234"));
    }
}
