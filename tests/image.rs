//! The image file against the rest of the host: other programs' locks, a file system too
//! small for it, a reservation that keeps it usable. Each case boots the real `vmm`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Bytes of `path` that hold data (its holes and unwritten extents left out), by
/// `SEEK_DATA`/`SEEK_HOLE`: what the VMM maps ahead of the guest by default.
fn data_bytes(path: &Path) -> u64 {
    use rustix::fs::{seek, SeekFrom};
    let file = std::fs::File::open(path).unwrap();
    let (mut at, mut total) = (0, 0);
    while let Ok(start) = seek(&file, SeekFrom::Data(at)) {
        let end = seek(&file, SeekFrom::Hole(start)).unwrap();
        total += end - start;
        at = end;
    }
    total
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// By default the image stays sparse (its holes only checked against the free space);
/// `--reserve` allocates every block before the guest starts.
#[test]
fn the_image_is_sparse_by_default_and_reserved_when_asked() {
    let scratch = Scratch::new();
    let out = run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(allocated(&scratch.image()) < 16 << 20, "a 32 MiB image, mostly holes");

    let out = run(vmm(&[]).args(boot_args(&scratch, "poweroff")).arg("--reserve"), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(allocated(&scratch.image()) >= 32 << 20, "every block of the 32 MiB image is reserved");
    assert!(scratch.read_console().contains("boot 2 of this image"));
}

/// `--prefault` maps (and so writes) every page of the image before the guest starts, and
/// the guest boots the same.
#[test]
fn prefault_maps_the_whole_image_ahead() {
    let scratch = Scratch::new();
    let out = run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(allocated(&scratch.image()) < 16 << 20, "a 32 MiB image, mostly holes");
    let out = run(vmm(&[]).args(boot_args(&scratch, "poweroff")).arg("--prefault"), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(scratch.read_console().contains("boot 2 of this image"));
    assert_eq!(read_header(&scratch).boot_count, 2);
    assert!(allocated(&scratch.image()) >= 32 << 20);
    assert!(data_bytes(&scratch.image()) >= 32 << 20, "every page was written once");
}

/// A small tmpfs mounted for the test: a file system that cannot hold the image.
struct SmallFs {
    dir: std::path::PathBuf,
}

impl SmallFs {
    /// Mounts a tmpfs of `size` at a fresh directory, or None where mounting is not
    /// allowed (not root, or no mount namespace rights): the test then says so and skips.
    fn mount(scratch: &Scratch, size: &str) -> Option<Self> {
        let dir = scratch.path("small");
        std::fs::create_dir(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(Stdio::null())
            .status();
        match status {
            Ok(s) if s.success() => Some(Self { dir }),
            _ => {
                eprintln!("skipped: cannot mount a tmpfs here (needs root)");
                None
            }
        }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// A new image that its file system cannot hold is refused before the guest starts, with
/// a clear word, and leaves no file behind (by the free-space check and by `--reserve`);
/// an existing one is refused and kept as it was; `--sparse` skips the check on purpose.
#[test]
fn a_file_system_too_small_for_the_image_is_an_error_at_boot() {
    let scratch = Scratch::new();
    let Some(fs) = SmallFs::mount(&scratch, "8m") else { return };
    let image = fs.dir.join("nvm.img");
    let image_arg = image.display().to_string();
    let console = scratch.console().display().to_string();
    let boot = |extra: &[&str]| {
        let mut args =
            vec!["boot", "--nvram", &image_arg, "--mem", "32M", "--console", &console, "--cmdline", "poweroff"];
        args.extend_from_slice(extra);
        run(&mut vmm(&args), BOOT_LIMIT)
    };
    for extra in [&[][..], &["--reserve"]] {
        let out = boot(extra);
        assert_eq!(out.code(), Some(1), "{extra:?}: {out:?}");
        assert!(out.stderr.contains("has no room for the image's 32 MiB"), "{out:?}");
        assert!(!image.exists(), "a refused new image is not left behind");
    }

    // An existing sparse image with data in it: refused, its bytes and size untouched.
    {
        let mut file = std::fs::File::create(&image).unwrap();
        file.set_len(32 << 20).unwrap();
        file.write_all(b"precious").unwrap();
    }
    let out =
        run(&mut vmm(&["boot", "--nvram", &image_arg, "--console", &console, "--cmdline", "poweroff"]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("has no room"), "{out:?}");
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(bytes.len(), 32 << 20);
    assert_eq!(&bytes[..8], b"precious");
}

/// A process holding a POSIX lock on the image (as QEMU without OFD locks does) keeps the
/// VMM off it, and the refusal names that process.
#[test]
fn a_posix_lock_of_another_program_keeps_the_vmm_off_the_image() {
    let scratch = Scratch::new();
    assert_eq!(run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT).code(), Some(0));
    let mut holder = Command::new("python3")
        .args(["-c", "import fcntl,sys; f=open(sys.argv[1],'r+'); fcntl.lockf(f, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()"])
        .arg(scratch.image())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "locked");
    let out = run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("is in use by another VMM or program"), "{out:?}");
    assert!(out.stderr.contains(&format!("process {}", holder.id())), "names the holder: {out:?}");
    drop(holder.stdin.take());
    holder.wait().unwrap();
    assert_eq!(run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT).code(), Some(0));
}

/// QEMU and this VMM exclude each other both ways: `qemu-io` holding the image keeps the
/// VMM off, and `qemu-io` cannot open an image a running VMM holds.
#[test]
fn qemu_and_the_vmm_exclude_each_other() {
    if Command::new("qemu-io").arg("--version").output().is_err() {
        eprintln!("skipped: qemu-io (Debian's qemu-utils) is not installed");
        return;
    }
    let scratch = Scratch::new();
    assert_eq!(run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT).code(), Some(0));
    let image = scratch.image().display().to_string();

    // QEMU first: qemu-io opens the image read-write (with its locks) and waits on stdin.
    let mut qemu = Command::new("qemu-io")
        .args(["-f", "raw", &image])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io runs");
    // qemu-io holds the image once its lock shows in /proc/locks.
    let inode = std::fs::metadata(scratch.image()).unwrap().ino();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string("/proc/locks").unwrap().contains(&format!(":{inode} ")) {
        assert!(std::time::Instant::now() < deadline, "qemu-io took no lock on the image");
        std::thread::sleep(Duration::from_millis(10));
    }
    let refused = run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT);
    assert_eq!(refused.code(), Some(1), "{refused:?}");
    assert!(refused.stderr.contains("(qemu-io"), "names QEMU: {refused:?}");
    writeln!(qemu.stdin.as_mut().unwrap(), "quit").unwrap();
    qemu.wait().unwrap();

    // The VMM first: QEMU is refused the image while it runs (as a disk it would write).
    let qemu_read = || Command::new("qemu-io").args(["-f", "raw", "-c", "read 0 512", &image]).output().unwrap();
    let vmm_child = vmm(&[]).args(boot_args(&scratch, "")).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    wait_for_text(&scratch.console(), "idle", BOOT_LIMIT);
    let io = qemu_read();
    assert!(!io.status.success(), "qemu-io opened an image the VMM holds");
    assert!(String::from_utf8_lossy(&io.stderr).contains("lock"), "{io:?}");
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(vmm_child.id() as i32, libc::SIGTERM) };
    assert_eq!(wait(vmm_child, Duration::from_secs(10)).code(), Some(0));
    let io = qemu_read();
    assert!(io.status.success(), "{io:?}");
}
