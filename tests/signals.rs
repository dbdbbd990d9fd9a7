//! Signals and lost outputs of a running `vmm boot`: none of them may crash the machine
//! unless asked to.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// `vmm boot ... | head -1`: the console's reader goes away after one line. The machine
/// keeps running (it would exit 141, a power failure, if SIGPIPE killed it), says once
/// that its console is lost, and still shuts down gracefully on SIGTERM.
#[test]
fn a_closed_stdout_does_not_crash_the_machine() {
    let scratch = Scratch::new();
    let image = scratch.image().display().to_string();
    let mut child = vmm(&["boot", "--nvram", &image, "--mem", "32M", "--cmdline", "apps=counter"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with("Tender NVM kernel"), "{first}");
    // The reader is gone; the guest goes on printing (the counter's boot lines, idle...).
    std::thread::sleep(Duration::from_millis(800));
    assert!(child.try_wait().unwrap().is_none(), "the VMM died with its console");
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = wait(child, Duration::from_secs(10));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.stderr.matches("console output is lost").count(), 1, "said once: {out:?}");
    assert!(out.stderr.contains("the guest powered off"), "{out:?}");
}

/// Boots `apps=counter` with its console in the scratch dir and waits for its first
/// heartbeat (the guest has booted and can shut down on request).
fn booted(scratch: &Scratch, log: &str) -> std::process::Child {
    let child = vmm(&[])
        .args(boot_args(scratch, "apps=counter"))
        .env("RUST_LOG", log)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_text(&scratch.console(), "counter: ", BOOT_LIMIT);
    child
}

fn signal(child: &std::process::Child, signal: i32) {
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, signal) };
}

/// SIGHUP (the terminal went away) shuts the machine down gracefully, as SIGTERM does; it
/// used to kill the VMM with no word.
#[test]
fn sighup_shuts_the_machine_down_gracefully() {
    let scratch = Scratch::new();
    let child = booted(&scratch, "warn");
    signal(&child, libc::SIGHUP);
    let out = wait(child, Duration::from_secs(10));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stderr.contains("asking the guest to shut down"), "{out:?}");
    assert!(scratch.read_console().contains("shut down: the machine's state is kept in NVM"));
}

/// SIGUSR1 is ignored, and said so: the machine runs on (it used to die with no word).
#[test]
fn sigusr1_is_ignored_and_said_so() {
    let scratch = Scratch::new();
    let child = booted(&scratch, "warn");
    signal(&child, libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, libc::SIGTERM);
    let out = wait(child, Duration::from_secs(10));
    assert_eq!(out.code(), Some(0), "the machine was still running: {out:?}");
    assert!(out.stderr.contains("SIGUSR1 ignored"), "{out:?}");
}

/// The image deleted under a running machine: the guest still shuts down, but the VMM
/// says the memory is lost and exits 8, not 0 ("state kept" would be a lie).
#[test]
fn an_image_deleted_under_the_machine_is_reported_at_exit() {
    let scratch = Scratch::new();
    let child = booted(&scratch, "warn");
    std::fs::remove_file(scratch.image()).unwrap();
    signal(&child, libc::SIGTERM);
    let out = wait(child, Duration::from_secs(10));
    assert_eq!(out.code(), Some(8), "{out:?}");
    assert!(out.stderr.contains("was deleted while the machine ran"), "{out:?}");
}

/// The image truncated under a running machine: its RAM vanishes; the VMM reports the
/// truncation (exit 8), by its SIGBUS report or at exit, never as a plain guest fault.
#[test]
fn an_image_truncated_under_the_machine_is_reported() {
    let scratch = Scratch::new();
    let child = vmm(&[])
        .args(boot_args(&scratch, "apps=counter,kv checkpoint_ms=20"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_text(&scratch.console(), "counter: ", BOOT_LIMIT);
    std::fs::OpenOptions::new().write(true).open(scratch.image()).unwrap().set_len(0).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut child = child;
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if child.try_wait().unwrap().is_none() {
        signal(&child, libc::SIGTERM);
    }
    let out = wait(child, Duration::from_secs(10));
    assert_eq!(out.code(), Some(8), "{out:?}");
    assert!(out.stderr.contains("SIGBUS in guest RAM") || out.stderr.contains("was truncated to 0 bytes"), "{out:?}");
}
