//! `vmm inspect` agrees with `vmm boot`: for every kind of image, built with the real
//! binary, inspect exits 0 exactly when boot accepts the image, and its `boot` field names
//! what boot does with it (`cold boot`, `resume`, `restore`, `refuse`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// Waits for `child` (its output read elsewhere), killing it after `limit`.
fn wait_status(mut child: std::process::Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("vmm did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

const MIB: u64 = 1 << 20;

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// A fresh image of `mib` MiB after a boot that powers off at once.
fn formatted(scratch: &Scratch, mib: u64) -> std::path::PathBuf {
    let image = scratch.image();
    let mem = format!("{mib}M");
    let console = path(&scratch.console());
    let out = run(
        &mut vmm(&["boot", "--nvram", &path(&image), "--mem", &mem, "--console", &console, "--cmdline", "poweroff"]),
        BOOT_LIMIT,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    image
}

/// What `vmm boot --cmdline poweroff` does with a copy of `image`, as its console says.
fn boot_does(scratch: &Scratch, image: &Path) -> &'static str {
    let copy = scratch.path("boot-copy.img");
    let _ = std::fs::remove_file(&copy);
    std::fs::copy(image, &copy).unwrap();
    let console = scratch.path("boot-copy.log");
    let out = run(
        &mut vmm(&["boot", "--nvram", &path(&copy), "--console", &path(&console), "--cmdline", "poweroff"]),
        BOOT_LIMIT,
    );
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    if out.code() != Some(0) {
        return "refuse";
    }
    if text.contains("formatting (cold boot)") || text.contains("starting afresh") {
        "cold boot"
    } else if text.contains("resuming where it stopped") {
        "resume"
    } else if text.contains("restoring the write-out") {
        "restore"
    } else {
        panic!("boot accepted the image but said nothing known:\n{out:?}\n--- console\n{text}")
    }
}

/// Inspects a copy of `image` and boots another; asserts they agree and that boot does
/// `expected`. Returns inspect's report.
fn agree(scratch: &Scratch, image: &Path, expected: &str) -> serde_json::Value {
    let copy = scratch.path("inspect-copy.img");
    let _ = std::fs::remove_file(&copy);
    std::fs::copy(image, &copy).unwrap();
    let out = run(&mut vmm(&["inspect", "--json", &path(&copy)]), BOOT_LIMIT);
    let report: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    let booted = boot_does(scratch, image);
    assert_eq!(booted, expected, "boot: {report:#}");
    assert_eq!(report["boot"], booted, "inspect names what boot does: {report:#}");
    assert_eq!(out.code() == Some(0), booted != "refuse", "inspect's exit status: {out:?}");
    assert_eq!(report["size"], std::fs::metadata(image).unwrap().len(), "the file's size");
    let human = run(&mut vmm(&["inspect", &path(&copy)]), BOOT_LIMIT);
    assert_eq!(human.code(), out.code(), "{human:?}");
    assert!(human.stdout.contains(&format!("boot: {booted}")), "{human:?}");
    report
}

#[test]
fn blank_images_cold_boot() {
    let scratch = Scratch::new();
    let image = scratch.image();
    std::fs::File::create(&image).unwrap().set_len(32 * MIB).unwrap();
    assert_eq!(agree(&scratch, &image, "cold boot")["verdict"], "blank");
    // An empty file becomes a new image at boot.
    std::fs::File::create(&image).unwrap();
    assert_eq!(agree(&scratch, &image, "cold boot")["verdict"], "blank");
    // A blank image of a size boot refuses.
    std::fs::File::create(&image).unwrap().set_len(16 * MIB).unwrap();
    agree(&scratch, &image, "refuse");
}

#[test]
fn a_formatted_image_after_a_poweroff_starts_afresh() {
    let scratch = Scratch::new();
    let image = formatted(&scratch, 32);
    let report = agree(&scratch, &image, "cold boot");
    assert_eq!(report["verdict"], "formatted");
    assert_eq!(report["header"]["shutdown_flag"], "abnormal");
}

/// Boots `apps=counter,kv checkpoint_ms=50` until a write-out is committed, then sends
/// `signal`.
fn run_then_signal(scratch: &Scratch, signal: i32) -> std::path::PathBuf {
    let image = scratch.image();
    let console = path(&scratch.console());
    let mut child = vmm(&["boot", "--nvram", &path(&image), "--mem", "32M", "--console", &console])
        .args(["--cmdline", "apps=counter,kv checkpoint_ms=50"])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The log is read to its end (a closed pipe would fail the VMM's logging).
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("write-out committed") {
                let _ = tx.send(());
            }
        }
    });
    for _ in 0..2 {
        rx.recv_timeout(Duration::from_secs(30)).expect("a write-out committed");
    }
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, signal) };
    let status = wait_status(child, Duration::from_secs(20));
    reader.join().unwrap();
    if signal == libc::SIGTERM {
        assert_eq!(status.code(), Some(0), "{status:?}");
    }
    image
}

#[test]
fn a_crashed_image_is_restored() {
    let scratch = Scratch::new();
    let image = run_then_signal(&scratch, libc::SIGKILL);
    let report = agree(&scratch, &image, "restore");
    assert_eq!(report["verdict"], "formatted");
    assert!(report["committed"].is_u64(), "{report:#}");
}

#[test]
fn a_shut_down_image_resumes() {
    let scratch = Scratch::new();
    let image = run_then_signal(&scratch, libc::SIGTERM);
    let report = agree(&scratch, &image, "resume");
    assert_eq!(report["header"]["shutdown_flag"], "normal");
}

#[test]
fn truncated_images_are_refused() {
    let scratch = Scratch::new();
    let image = formatted(&scratch, 32);
    let cut = scratch.path("cut.img");
    for size in [0x80_0010, 8 * MIB, 12 * MIB, 16 * MIB, 32 * MIB - 4096, 32 * MIB - 100] {
        std::fs::copy(&image, &cut).unwrap();
        std::fs::OpenOptions::new().write(true).open(&cut).unwrap().set_len(size).unwrap();
        let report = agree(&scratch, &cut, "refuse");
        assert_eq!(report["verdict"], "truncated", "{size}: {report:#}");
    }
    // Cut to a size boot takes, but short of the frames the header manages: the guest refuses.
    let scratch = Scratch::new();
    let image = formatted(&scratch, 64);
    std::fs::OpenOptions::new().write(true).open(&image).unwrap().set_len(48 * MIB).unwrap();
    let report = agree(&scratch, &image, "refuse");
    assert_eq!(report["verdict"], "truncated", "{report:#}");
}

#[test]
fn foreign_files_are_refused() {
    use rand::{RngExt, SeedableRng};
    let scratch = Scratch::new();
    let image = scratch.image();
    let mut bytes = vec![0u8; (32 * MIB) as usize];
    rand::rngs::SmallRng::seed_from_u64(7).fill(&mut bytes[..]);
    std::fs::write(&image, &bytes).unwrap();
    assert_eq!(agree(&scratch, &image, "refuse")["verdict"], "foreign");
    std::fs::write(&image, "This is a text file, not an image.\n".repeat(1000)).unwrap();
    agree(&scratch, &image, "refuse");
    let text = "a line of text\n".repeat((32 * MIB / 15 + 1) as usize);
    std::fs::write(&image, &text[..(32 * MIB) as usize]).unwrap();
    assert_eq!(agree(&scratch, &image, "refuse")["verdict"], "foreign");
}

#[test]
fn corrupt_headers_are_refused_unless_a_copy_holds() {
    let scratch = Scratch::new();
    let image = formatted(&scratch, 32);
    let flip = |at: u64| {
        let mut bytes = std::fs::read(&image).unwrap();
        bytes[at as usize] ^= 0x10;
        std::fs::write(&image, bytes).unwrap();
    };
    // The first copy torn: the second holds, and boot goes on with it.
    flip(nvram::layout::ROOT_HEADER + 40);
    let report = agree(&scratch, &image, "cold boot");
    assert!(report["explanation"].as_str().unwrap().contains("torn"), "{report:#}");
    // Both copies bad.
    flip(nvram::layout::ROOT_HEADER_COPY + 40);
    assert_eq!(agree(&scratch, &image, "refuse")["verdict"], "corrupt");
}

#[test]
fn special_files_are_refused_at_once() {
    let scratch = Scratch::new();
    let fifo = scratch.path("fifo");
    let c = std::ffi::CString::new(path(&fifo)).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for special in [path(&fifo), "/dev/zero".into(), "/dev/null".into()] {
        let out = run(&mut vmm(&["inspect", &special]), Duration::from_secs(5));
        assert_eq!(out.code(), Some(1), "{special}: {out:?}");
        assert!(out.stderr.contains("not an image"), "{special}: {out:?}");
        let out = run(&mut vmm(&["inspect", "--json", &special]), Duration::from_secs(5));
        assert_eq!(out.code(), Some(1), "{special}: {out:?}");
    }
}
