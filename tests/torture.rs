//! `vmm torture`: hundreds of crashes, some inside write-outs, never a committed write-out
//! lost and `kv` and `churn` always verified after the restore; under each persistence model.

mod common;

use std::time::Duration;

use common::*;

/// Runs `vmm torture` for 200 crashes with `extra` arguments and checks its summary.
fn torture(extra: &[&str], model: &str) {
    torture_n(extra, model, 200);
}

/// Runs `vmm torture` for `crashes` crashes with `extra` arguments and checks its summary.
fn torture_n(extra: &[&str], model: &str, crashes: u64) {
    let scratch = Scratch::new();
    let image = scratch.image().display().to_string();
    let n = crashes.to_string();
    let mut args = vec!["torture", "--nvram", &image, "--crashes", &n, "--seed", "12345"];
    args.extend(extra);
    let out = run(&mut vmm(&args), Duration::from_secs(600));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains(model), "{out:?}");
    let row = out.stdout.lines().last().unwrap_or_default();
    let cells: Vec<&str> = row.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(cells[0], n, "{out:?}");
    assert!(cells[1].parse::<u64>().unwrap() > crashes / 10, "a fair share of the crashes hit write-outs: {out:?}");
    assert_eq!(cells[2], n, "every boot after a crash restored, the last crash's too: {out:?}");
    assert_eq!(cells[3], "0", "{out:?}");
    // `churn` is in the mix by default (torture required its verification after every
    // restore): the last boot resumed kv, memtouch and churn.
    let console = std::fs::read_to_string(scratch.image().with_extension("console.log")).unwrap_or_default();
    assert!(console.contains("NVM: 3 processes to resume"), "not all three workloads ran:\n{console}");
    assert!(!console.contains("FAILED"), "{console}");
}

#[test]
fn two_hundred_crashes_lose_nothing_committed() {
    torture(&[], "eADR");
}

/// Only what the guest wrote back and fenced survives: every store of the commit protocol
/// must be flushed, or a restore finds a torn plate table or save area.
#[test]
fn two_hundred_crashes_under_adr_lose_nothing_committed() {
    torture(&["--persistence", "adr"], "no evictions");
}

/// As above, with half the dirty lines that were not written back evicted into the image
/// at each crash: stores that reach NVM early, out of order, must not break a commit either.
#[test]
fn two_hundred_crashes_under_adr_with_evictions_lose_nothing_committed() {
    torture(&["--persistence", "adr", "--crash-evict", "0.5"], "0.5 of the others evicted");
}

/// The guest's own copier (`plate_copy=cpu`: its copies, `clflushopt` and `sfence`) under
/// ADR, with evictions: a line of a save area or of the commit left unflushed shows as a
/// torn table or a `kv` that fails its check. Few crashes: the engine's cases above cover
/// the rest of the protocol.
#[test]
fn crashes_under_adr_with_the_cpu_copier_lose_nothing_committed() {
    torture_n(&["--persistence", "adr", "--crash-evict", "0.5", "--copier", "cpu"], "0.5 of the others evicted", 30);
}

#[test]
fn crash_evict_without_adr_is_a_usage_error() {
    let scratch = Scratch::new();
    let image = scratch.image().display().to_string();
    // A --crash-evict without ADR is refused as a usage error, before anything boots.
    let out = run(&mut vmm(&["torture", "--nvram", &image, "--crash-evict", "0.5"]), Duration::from_secs(30));
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("--persistence adr"), "{out:?}");
}

/// `vmm torture --nvram IMG` with `extra` arguments, a single crash.
fn torture_once(image: &std::path::Path, extra: &[&str]) -> Finished {
    let image = image.display().to_string();
    let mut args = vec!["torture", "--nvram", &image, "--crashes", "1", "--seed", "7"];
    args.extend(extra);
    run(&mut vmm(&args), Duration::from_secs(120))
}

#[test]
fn a_file_that_is_not_an_image_is_refused_and_left_as_it_was() {
    let scratch = Scratch::new();
    let text = b"my notes, not an image\n".repeat(1000);
    std::fs::write(scratch.image(), &text).unwrap();
    let out = torture_once(&scratch.image(), &[]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("not an image") && out.stderr.contains("--force"), "{out:?}");
    assert_eq!(std::fs::read(scratch.image()).unwrap(), text, "the file is untouched");
}

#[test]
fn an_image_of_another_size_is_refused_unless_forced() {
    let scratch = Scratch::new();
    assert_eq!(run(vmm(&[]).args(boot_args(&scratch, "poweroff")), BOOT_LIMIT).code(), Some(0));
    let before = std::fs::read(scratch.image()).unwrap();
    assert_eq!(before.len(), 32 << 20);
    let out = torture_once(&scratch.image(), &["--mem", "128M"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("--mem") && out.stderr.contains("--force"), "{out:?}");
    assert!(std::fs::read(scratch.image()).unwrap() == before, "the image is untouched");

    let out = torture_once(&scratch.image(), &["--mem", "128M", "--force"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(std::fs::metadata(scratch.image()).unwrap().len(), 128 << 20, "recreated at --mem");
    // Now an image torture made: used again without --force, at its size.
    let out = torture_once(&scratch.image(), &[]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(std::fs::metadata(scratch.image()).unwrap().len(), 128 << 20);
}

/// A `vmm boot` of the counter on the scratch image, once its guest is up (its console
/// shows the counter's first heartbeat line).
fn running_vmm(scratch: &Scratch) -> std::process::Child {
    let child = vmm(&[])
        .args(boot_args(scratch, "apps=counter"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + BOOT_LIMIT;
    while !["idle", "counter:"].iter().any(|s| scratch.read_console().contains(s)) {
        assert!(std::time::Instant::now() < deadline, "the VMM did not come up: {}", scratch.read_console());
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

#[test]
fn an_image_a_running_vmm_holds_is_refused_even_with_force() {
    let scratch = Scratch::new();
    let child = running_vmm(&scratch);
    for extra in [&[][..], &["--force"][..], &["--force", "--mem", "32M"][..]] {
        let out = torture_once(&scratch.image(), extra);
        assert_eq!(out.code(), Some(1), "{extra:?}: {out:?}");
        assert!(out.stderr.contains("is in use by another VMM"), "{out:?}");
        assert!(out.stderr.contains(&format!("process {}", child.id())), "names the holder: {out:?}");
        assert_eq!(std::fs::metadata(scratch.image()).unwrap().len(), 32 << 20, "{out:?}");
    }
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(wait(child, Duration::from_secs(10)).code(), Some(0), "the running VMM is unaffected");
}

/// Torture keeps the image locked across its reboots: a `vmm boot` tried again and again
/// while it runs never gets the image, not even between two of its machines.
#[test]
fn a_boot_is_refused_the_image_while_torture_runs() {
    let scratch = Scratch::new();
    let image = scratch.image().display().to_string();
    let mut torture = vmm(&["torture", "--nvram", &image, "--crashes", "60", "--seed", "99"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let console = scratch.image().with_extension("console.log");
    wait_for_text(&console, "kv", BOOT_LIMIT);
    let boot = ["boot", "--nvram", &image, "--cmdline", "poweroff"];
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut tries = 0;
    while std::time::Instant::now() < deadline && torture.try_wait().unwrap().is_none() {
        let out = run(&mut vmm(&boot), BOOT_LIMIT);
        if out.code() == Some(0) && torture.try_wait().unwrap().is_some() {
            break; // torture had ended
        }
        assert_eq!(out.code(), Some(1), "try {tries}: {out:?}");
        assert!(out.stderr.contains("is in use by another VMM"), "{out:?}");
        tries += 1;
    }
    assert!(tries > 20, "only {tries} boots tried while torture ran");
    let out = wait(torture, Duration::from_secs(300));
    assert_eq!(out.code(), Some(0), "torture is undisturbed ({tries} boots refused): {out:?}");
}
