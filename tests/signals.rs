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
