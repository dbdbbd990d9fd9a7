//! Volatile RAM (`--memory volatile`) and the virtio block device (`--disk`): RAM that
//! forgets at exit, a disk that does not, and the usage errors of options that need an image.

mod common;

use common::*;

/// `vmm boot` on volatile RAM with the scratch console.
fn volatile_boot(scratch: &Scratch, extra: &[&str], cmdline: &str) -> Finished {
    let console = scratch.console().display().to_string();
    let mut args = vec!["boot", "--memory", "volatile", "--mem", "32M", "--console", &console, "--cmdline", cmdline];
    args.extend_from_slice(extra);
    run(&mut vmm(&args), BOOT_LIMIT)
}

#[test]
fn volatile_ram_forgets_everything_at_exit() {
    let scratch = Scratch::new();
    for boot in 1..=2 {
        let out = volatile_boot(&scratch, &[], "apps=counter counter_shutdown=2");
        assert_eq!(out.code(), Some(0), "boot {boot}: {out:?}");
        let console = scratch.read_console();
        // A graceful shutdown saved what a resume needs, but in RAM that is gone: the next
        // boot finds blank memory again.
        assert!(console.contains("boot 1 of this image"), "boot {boot}:\n{console}");
        assert!(console.contains("blank image: formatting (cold boot)"), "boot {boot}:\n{console}");
        assert!(!console.contains("virtio-blk"), "no disk was given:\n{console}");
        // The probe for a disk finds the placeholder, not an address nobody owns.
        assert!(!out.stderr.contains("unknown"), "boot {boot}: {out:?}");
    }
    let left: Vec<_> = std::fs::read_dir(scratch.path("")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("console.log")], "no image file is written");
}

#[test]
fn the_guest_finds_the_disk_and_the_disk_outlives_the_vmm() {
    let scratch = Scratch::new();
    let disk = scratch.path("disk.img").display().to_string();
    let out = volatile_boot(&scratch, &["--disk", &disk, "--disk-size", "8M"], "poweroff");
    assert_eq!(out.code(), Some(0), "{out:?}");
    let console = scratch.read_console();
    assert!(console.contains("virtio-blk: disk of 16384 sectors (8192 KiB) at 0xd0000000"), "{console}");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 8 << 20);
    // An existing disk keeps its size whatever --disk-size says, beside an NVM image too.
    let image = scratch.image().display().to_string();
    let console_path = scratch.console().display().to_string();
    let args = [
        "boot",
        "--nvram",
        &image,
        "--mem",
        "32M",
        "--disk",
        &disk,
        "--disk-size",
        "1M",
        "--console",
        &console_path,
        "--cmdline",
        "poweroff",
    ];
    let out = run(&mut vmm(&args), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(scratch.read_console().contains("disk of 16384 sectors"), "{}", scratch.read_console());
}

#[test]
fn a_disk_another_vmm_holds_is_refused() {
    let scratch = Scratch::new();
    let disk = scratch.path("disk.img").display().to_string();
    let console = scratch.console().display().to_string();
    let first = vmm(&["boot", "--memory", "volatile", "--mem", "32M", "--disk", &disk, "--console", &console])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for_text(&scratch.console(), "virtio-blk", BOOT_LIMIT);
    let second_console = scratch.path("second.log").display().to_string();
    let args = ["boot", "--memory", "volatile", "--mem", "32M", "--disk", &disk, "--console", &second_console];
    let out = run(&mut vmm(&args), BOOT_LIMIT);
    let mut first = first;
    let _ = first.kill();
    let _ = first.wait();
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("disk.img"), "the error names the disk: {out:?}");
    assert!(!out.stderr.contains("panicked"), "{out:?}");
}

#[test]
fn options_of_an_image_are_refused_for_volatile_ram() {
    let scratch = Scratch::new();
    let image = scratch.image().display().to_string();
    for (args, needle) in [
        (vec!["--nvram", image.as_str()], "--memory volatile RAM has none"),
        (vec!["--persistence", "adr"], "drop --persistence"),
        (vec!["--sync"], "drop --persistence"),
        (vec!["--prefault"], "drop --prefault"),
        (vec!["--reformat"], "drop --prefault"),
        (vec!["--mem", "5000"], "--mem: a RAM size of 5000 bytes"),
        (vec!["--disk", "d.img", "--disk-size", "1000"], "--disk-size: a disk size of 1000 bytes"),
    ] {
        let mut all = vec!["boot", "--memory", "volatile"];
        all.extend(args.iter().copied());
        let out = run(&mut vmm(&all), BOOT_LIMIT);
        assert_eq!(out.code(), Some(2), "{all:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{all:?}: {out:?}");
    }
    let out = run(&mut vmm(&["boot", "--mem", "32M"]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("--nvram IMG is needed"), "{out:?}");
    assert!(!scratch.image().exists());
}

/// The word `disk_test` writes at `index` for `seed` (the guest's `dev::virtio::pattern`).
fn pattern(seed: u64, index: usize) -> u64 {
    (seed << 32 | index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[test]
fn the_guest_driver_writes_flushes_and_reads_back_through_the_disk() {
    let scratch = Scratch::new();
    let disk = scratch.path("disk.img").display().to_string();
    let out = volatile_boot(&scratch, &["--disk", &disk, "--disk-size", "1M"], "poweroff disk_test=64");
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(!out.stderr.contains("virtio-blk"), "the driver's use of the device is no guest error: {out:?}");
    let console = scratch.read_console();
    let line = console.lines().find(|l| l.contains("disk test")).unwrap_or_else(|| panic!("no disk test:\n{console}"));
    assert!(line.contains("disk test passed: 64 sectors from 1984"), "{line}");
    let seed = line.rsplit_once("(seed 0x").and_then(|(_, s)| s.strip_suffix(')')).expect("the seed is printed");
    let seed = u64::from_str_radix(seed, 16).unwrap();
    // What the guest wrote is in the host's file, where the guest put it.
    let bytes = std::fs::read(&disk).unwrap();
    let tail = &bytes[1984 * 512..];
    assert_eq!(tail.len(), 64 * 512);
    for (i, word) in tail.chunks_exact(8).enumerate() {
        assert_eq!(u64::from_le_bytes(word.try_into().unwrap()), pattern(seed, i), "word {i}");
    }
    assert!(bytes[..1984 * 512].iter().all(|&b| b == 0), "nothing else was written");
}

#[test]
fn a_disk_too_small_for_the_test_is_said_so() {
    let scratch = Scratch::new();
    let disk = scratch.path("disk.img").display().to_string();
    let out = volatile_boot(&scratch, &["--disk", &disk, "--disk-size", "512"], "poweroff disk_test=2");
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(scratch.read_console().contains("disk test FAILED: the disk is smaller than the test"), "{out:?}");
}
