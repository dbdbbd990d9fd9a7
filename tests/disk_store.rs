//! The volatile plate function (`--memory volatile --disk FILE --cmdline plate_store=disk`):
//! RAM forgets everything at each exit, and every boot restores the disk's last commit. A
//! workload crashed comes back from its last checkpoint and goes on; a graceful shutdown
//! also comes back from the disk (the last save, not the moment of the shutdown); a space
//! deleted after a checkpoint comes back intact; a disk too small, or foreign, is refused; a
//! damaged newest commit rolls back to the older one and says so.

mod common;

use std::time::Duration;

use common::*;
use nvram::control::{BootKind, Copier, Operation, Verified, IO_PHASE};
use nvram::plate::{PlateKind, PlateTable, FIXED_RESOURCES, TABLE_SIZE};
use vmm::harness::{run_then_crash, run_to_end};
use vmm::{ConsoleOutput, DiskConfig, MemoryKind, VmConfig};
use zerocopy::FromBytes;

/// A volatile machine of 32 MiB whose plate store is `disk.img` of the scratch directory
/// (`disk_bytes` when it is made).
fn config(scratch: &Scratch, cmdline: &str, disk_bytes: u64) -> VmConfig {
    let mut config = VmConfig::new(scratch.path("unused.img"));
    config.memory = MemoryKind::Volatile;
    config.mem_size = Some(32 << 20);
    config.cmdline = format!("plate_store=disk {cmdline}");
    config.console = ConsoleOutput::File(scratch.console());
    config.disk = Some(DiskConfig { path: scratch.path("disk.img"), size_if_created: disk_bytes });
    config
}

const DISK: u64 = 16 << 20;

fn progress(status: &devices::MachineStatus, name: &str) -> u64 {
    status.workloads.get(name).map_or(0, |w| w.progress)
}

#[test]
fn a_crashed_workload_restores_from_the_disk_and_goes_on() {
    let scratch = Scratch::new();
    let line = "apps=counter,kv checkpoint_ms=50";
    let before = run_then_crash(&config(&scratch, line, DISK), Duration::from_secs(60), |s| {
        s.committed_generation >= 4
            && s.workloads.get("kv").is_some_and(|w| w.heartbeats >= 2)
            && progress(s, "counter") >= 300_000_000
    });
    assert_eq!(before.boot_kind, Some(BootKind::Cold));
    let committed = before.committed_generation;
    let write_out = before.of(Operation::WriteOut).last().expect("write-outs reported").clone();
    assert_eq!(write_out.report.copier, Copier::Disk);
    assert!(write_out.phases[IO_PHASE] > Duration::ZERO, "storage I/O is measured: {write_out:?}");
    assert!(!scratch.path("unused.img").exists(), "no image file: RAM is volatile");

    let after = run_then_crash(&config(&scratch, line, DISK), Duration::from_secs(60), |s| {
        s.workloads.get("kv").is_some_and(|w| w.last_check != Verified::Unknown) && progress(s, "counter") > 0
    });
    let first = after.workloads["counter"].progress;
    assert_eq!(after.boot_kind, Some(BootKind::Restored), "{}", scratch.read_console());
    let restore = after.of(Operation::Restore).next().expect("the restore reported its metrics");
    assert!(restore.report.generation >= committed, "restored {restore:?}, committed {committed}");
    assert_eq!(restore.report.copier, Copier::Disk);
    assert_eq!(after.workloads["kv"].last_check, Verified::Passed, "{after:?}");
    // Restored, not started afresh: the counter goes on from the checkpoint's value, a
    // write-out interval behind the crash (a fresh one would count from 0, 100 ms' worth).
    assert!(first >= progress(&before, "counter") / 2, "{before:?}\n{after:?}");
    let console = scratch.read_console();
    assert!(console.contains("restoring the disk's write-out of generation"), "{console}");
    assert!(console.contains("RAM's contents are not used") || console.contains("boot 1 of this image"));
    assert!(console.contains("write-outs and restores copy by the virtio disk"), "{console}");
}

#[test]
fn a_graceful_shutdown_restores_the_last_save_from_the_disk() {
    let scratch = Scratch::new();
    // Write-outs every 300 ms, the graceful shutdown at 800 ms: the last save is older than
    // the shutdown.
    let (_, before) = run_to_end(&config(&scratch, "apps=counter run_ms=800 checkpoint_ms=300", DISK));
    let console = scratch.read_console();
    assert!(console.contains("shut down: the next boot restores the disk's last commit"), "{console}");
    let committed = before.committed_generation;
    assert!(committed >= 2, "{before:?}");
    let after = run_then_crash(&config(&scratch, "", DISK), Duration::from_secs(30), |s| progress(s, "counter") > 0);
    assert_eq!(after.boot_kind, Some(BootKind::Restored), "{}", scratch.read_console());
    assert!(after.of(Operation::Restore).next().is_some_and(|r| r.report.generation == committed));
    // The last save, not the moment of the shutdown (the volatile plate function restores
    // T0, not T1: no write-out at the shutdown), its process resumed, not started afresh.
    let console = scratch.read_console();
    assert!(console.contains(&format!("restoring the disk's write-out of generation {committed}")), "{console}");
    assert!(console.contains("NVM: 1 processes to resume"), "{console}");
}

#[test]
fn a_space_deleted_after_a_checkpoint_comes_back_intact_from_the_disk() {
    let scratch = Scratch::new();
    // A disk whose area space the filling maps exhaust (they are refused when it is full):
    // an allocator that freed the deleted region's areas at once would hand them out.
    let disk = 12 << 20;
    let first = config(&scratch, "apps=deleter,counter", disk);
    run_then_crash(&first, Duration::from_secs(60), |s| s.workloads.get("deleter").is_some_and(|w| w.progress == 1));
    assert!(scratch.read_console().contains("region deleted after the checkpoint"));
    let after = run_then_crash(&config(&scratch, "", disk), Duration::from_secs(30), |s| {
        s.workloads.get("deleter").is_some_and(|w| w.progress == 2)
    });
    assert_eq!(after.boot_kind, Some(BootKind::Restored));
    assert_eq!(after.workloads["deleter"].last_check, Verified::Passed, "{after:?}");
    assert!(scratch.read_console().contains("the deleted region is back intact"));
}

#[test]
fn a_disk_too_small_is_refused_with_a_clear_error() {
    for (size, needle) in [
        (512 << 10, "too small for the plate store"),
        (800 << 10, "its area space cannot hold the save areas of the plates"),
    ] {
        let scratch = Scratch::new();
        let disk = scratch.path("disk.img").display().to_string();
        let console = scratch.console().display().to_string();
        let args = [
            "boot",
            "--memory",
            "volatile",
            "--mem",
            "32M",
            "--disk",
            &disk,
            "--disk-size",
            &size.to_string(),
            "--console",
            &console,
            "--cmdline",
            "plate_store=disk apps=counter",
        ];
        let out = run(&mut vmm(&args), BOOT_LIMIT);
        assert_eq!(out.code(), Some(9), "{size}: {out:?}\n{}", scratch.read_console());
        assert!(scratch.read_console().contains(needle), "{size}: {}", scratch.read_console());
        assert!(out.stderr.contains("refused the disk"), "{out:?}");
        assert!(!out.stderr.contains("panicked") && !scratch.read_console().contains("PANIC"));
    }
}

#[test]
fn a_foreign_disk_is_refused_and_left_alone() {
    let scratch = Scratch::new();
    let mut contents = vec![0u8; 4 << 20];
    contents[..8].copy_from_slice(b"MYFILES!");
    std::fs::write(scratch.path("disk.img"), &contents).unwrap();
    let (_, status) = run_to_end(&config(&scratch, "apps=counter", DISK));
    assert_eq!(status.boot_kind, None, "the kernel stopped before booting");
    assert!(scratch.read_console().contains("refusing the disk as the plate store: the disk holds something else"));
    assert_eq!(std::fs::read(scratch.path("disk.img")).unwrap(), contents, "not a byte written");
    let path = scratch.path("disk.img").display().to_string();
    let out = run(&mut vmm(&["inspect", "--disk", &path]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stdout.contains("disk: foreign") && out.stdout.contains("refuse"), "{out:?}");
    // A blank disk: a fresh start.
    std::fs::write(scratch.path("blank.img"), vec![0u8; 4 << 20]).unwrap();
    let blank = scratch.path("blank.img").display().to_string();
    let out = run(&mut vmm(&["inspect", "--disk", &blank, "--check"]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("fresh start"), "{out:?}");
}

#[test]
fn plate_store_disk_needs_a_disk_and_the_plate_function() {
    for (args, needle) in [
        (vec!["--cmdline", "plate_store=disk"], "give it one with --disk FILE"),
        (vec!["--disk", "d.img", "--cmdline", "plate_store=disk plate=off"], "drop one of them"),
        (vec!["--cmdline", "plate_store=tape"], "plate_store=tape"),
    ] {
        let mut all = vec!["boot", "--memory", "volatile", "--mem", "32M"];
        all.extend(args.iter().copied());
        let out = run(&mut vmm(&all), BOOT_LIMIT);
        assert_eq!(out.code(), Some(2), "{all:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{all:?}: {out:?}");
    }
}

/// The disk's two slots, as tables.
fn slots(disk: &[u8]) -> [Box<PlateTable>; 2] {
    nvram::disk::SLOTS.map(|at| {
        let bytes = &disk[at as usize..at as usize + TABLE_SIZE];
        Box::new(PlateTable::read_from_bytes(bytes).expect("a table's size"))
    })
}

#[test]
fn a_damaged_newest_commit_rolls_back_to_the_older_and_says_so() {
    let scratch = Scratch::new();
    let (_, before) = run_to_end(&config(&scratch, "apps=counter run_ms=600 checkpoint_ms=50", DISK));
    let newest_generation = before.committed_generation;
    assert!(newest_generation >= 2, "{before:?}");
    let path = scratch.path("disk.img");
    let path_text = path.display().to_string();
    let out = run(&mut vmm(&["inspect", "--disk", &path_text, "--check"]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains(&format!("generation {newest_generation}")), "{out:?}");
    assert!(out.stdout.contains("check: consistent") && out.stdout.contains("user space"), "{out:?}");
    let mut disk = std::fs::read(&path).unwrap();
    let [a, b] = slots(&disk);
    let newest = if a.generation > b.generation { &a } else { &b };
    assert_eq!(newest.generation, newest_generation);
    // The resource tables' plate is copied whole at each write-out: its valid area in the
    // newest commit is the one the older commit does not use.
    let plate = newest
        .plates()
        .iter()
        .find(|p| p.kind == PlateKind::Fixed as u32 && p.id == FIXED_RESOURCES)
        .copied()
        .expect("the resource tables are plated");
    let area = plate.area[(plate.valid - 1) as usize];
    disk[area as usize + 100] ^= 0x10;
    std::fs::write(&path, &disk).unwrap();
    let out = run(&mut vmm(&["inspect", "--disk", &path_text, "--check", "--json"]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(1), "the check finds the damage: {out:?}");
    let json: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(json["boot"], "restore");
    let violations = json["check"]["violations"].as_array().expect("violations").clone();
    assert!(violations.iter().any(|v| v.as_str().unwrap().contains("checksum")), "{json}");

    let after = run_then_crash(&config(&scratch, "", DISK), Duration::from_secs(30), |s| progress(s, "counter") > 0);
    let console = scratch.read_console();
    assert_eq!(after.boot_kind, Some(BootKind::Restored), "{console}");
    assert!(console.contains(&format!("ROLLING BACK to generation {}", newest_generation - 1)), "{console}");
    assert!(console.contains("save area does not hold what was written there"), "{console}");
    let restore = after.of(Operation::Restore).next().expect("restore metrics");
    assert_eq!(restore.report.generation, newest_generation - 1);
    assert_eq!(restore.report.rolled_back, 1);
}

/// `vmm torture` on the volatile machine: every crash kills the VMM's RAM, and every boot
/// after one must restore the disk's last commit (at least the last generation the VMM saw
/// committed), with `kv` and `churn` verified and the disk consistent after each crash.
/// Small RAM and short runs keep the hundred crashes to a minute.
#[test]
fn a_hundred_crashes_of_the_volatile_machine_lose_nothing_committed() {
    let scratch = Scratch::new();
    let disk = scratch.path("disk.img").display().to_string();
    let args = [
        "torture",
        "--memory",
        "volatile",
        "--disk",
        &disk,
        "--disk-size",
        "32M",
        "--mem",
        "32M",
        "--crashes",
        "100",
        "--max-run-ms",
        "100",
        "--seed",
        "4242",
    ];
    let out = run(&mut vmm(&args), Duration::from_secs(300));
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("volatile RAM, lost at each crash"), "{out:?}");
    let row = out.stdout.lines().last().unwrap_or_default();
    let cells: Vec<&str> = row.split('|').map(str::trim).filter(|c| !c.is_empty()).collect();
    assert_eq!(cells[0], "100", "{out:?}");
    assert!(cells[1].parse::<u64>().unwrap() > 10, "a fair share of the crashes hit write-outs: {out:?}");
    assert_eq!(cells[2], "100", "every boot after a crash restored from the disk: {out:?}");
    assert_eq!(cells[3], "0", "{out:?}");
    let console = std::fs::read_to_string(scratch.path("disk.console.log")).unwrap_or_default();
    assert!(console.contains("restoring the disk's write-out"), "{console}");
    assert!(console.contains("NVM: 3 processes to resume"), "not all three workloads ran:\n{console}");
    assert!(!console.contains("FAILED"), "{console}");
}

#[test]
fn torture_refuses_a_disk_that_is_not_a_plate_store_and_options_without_meaning() {
    let scratch = Scratch::new();
    let disk = scratch.path("notes.txt");
    std::fs::write(&disk, b"my notes\n".repeat(100)).unwrap();
    let path = disk.display().to_string();
    let out = run(&mut vmm(&["torture", "--memory", "volatile", "--disk", &path, "--crashes", "1"]), BOOT_LIMIT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("not a plate-store disk") && out.stderr.contains("--force"), "{out:?}");
    assert_eq!(std::fs::read(&disk).unwrap(), b"my notes\n".repeat(100));
    let other = scratch.path("d.img").display().to_string();
    for (args, needle) in [
        (vec!["--memory", "volatile", "--disk", &other, "--persistence", "adr"], "no persistence model"),
        (vec!["--disk", &other], "give --memory volatile too"),
    ] {
        let mut all = vec!["torture", "--crashes", "1"];
        all.extend(args);
        let out = run(&mut vmm(&all), BOOT_LIMIT);
        assert_ne!(out.code(), Some(0), "{all:?}: {out:?}");
        assert!(out.stderr.contains(needle), "{all:?}: {out:?}");
    }
}

/// Deferred deletion on the disk: `deleter` deletes its region after a checkpoint and maps
/// every area page it can get (the area space of a 12 MiB disk runs out, and the allocator
/// comes round to pages freed since); then a write-out commits, its table recording the
/// deleted region's areas as pending (freed only after this commit). Had they been freed at
/// the deletion, plates made since would hold them, and a write-out cut short could have
/// written over the only committed copy: `vmm inspect --disk --check` finds no pending area
/// shared with a plate of the committed table.
#[test]
fn the_areas_of_a_deleted_space_are_not_handed_out_before_the_commit_that_drops_it() {
    use vmm::harness::{crash, start, wait};
    let disk = 12 << 20;
    let scratch = Scratch::new();
    let vm = start(&config(&scratch, "apps=deleter,counter", disk));
    wait(&vm, Duration::from_secs(60), "the deletion and the filling", |s| {
        s.workloads.get("deleter").is_some_and(|w| w.progress == 1)
    });
    vm.controller().checkpoint(Duration::from_secs(30)).expect("the write-out after the deletion");
    crash(vm);
    let path = scratch.path("disk.img").display().to_string();
    let out = run(&mut vmm(&["inspect", "--disk", &path, "--check"]), BOOT_LIMIT);
    assert!(out.stdout.contains("1 pending deletions, checksum ok (committed)"), "{out:?}");
    assert!(out.stdout.contains("check: consistent"), "{out:?}");
    assert_eq!(out.code(), Some(0), "{out:?}");
}

/// `plate_store=disk` on NVM RAM: allowed, and RAM is never resumed as it is. After a
/// graceful shutdown a boot with the disk store restores from the disk; a boot without it
/// refuses the image rather than resume a live table whose save areas are disk offsets.
#[test]
fn the_disk_store_on_nvm_ram_is_never_resumed_without_it() {
    let scratch = Scratch::new();
    let image = scratch.image().display().to_string();
    let disk = scratch.path("disk.img").display().to_string();
    let console = scratch.console().display().to_string();
    let boot = |cmdline: &str| {
        let mut args = vec!["boot", "--nvram", &image, "--mem", "32M", "--console", &console, "--cmdline", cmdline];
        if cmdline.contains("plate_store=disk") {
            args.extend(["--disk", &disk]);
        }
        run(&mut vmm(&args), BOOT_LIMIT)
    };
    let out = boot("plate_store=disk apps=counter checkpoint_ms=100 run_ms=500");
    assert_eq!(out.code(), Some(0), "{out:?}");
    let out = boot("plate_store=disk run_ms=200");
    assert_eq!(out.code(), Some(0), "{out:?}");
    let text = scratch.read_console();
    assert!(text.contains("RAM's contents are not used") && text.contains("restoring the disk's write-out"), "{text}");
    let out = boot("run_ms=200");
    assert_eq!(out.code(), Some(5), "refused, not resumed: {out:?}\n{}", scratch.read_console());
    assert!(!scratch.read_console().contains("resuming where it stopped"), "{}", scratch.read_console());
}
