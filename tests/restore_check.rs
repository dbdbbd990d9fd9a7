//! A restore checks what it restores: a committed slot whose entries were rewritten with
//! its checksum recomputed, or a save area with a bit flipped, is passed over for the older
//! generation when that one is intact (and the boot says it rolls back), or refused. The
//! copier never writes over the kernel, the header or a slot.

mod common;

use std::time::Duration;

use common::{machine_config, Scratch};
use kernel_core::plates::Rejection;
use nvram::control::{BootKind, Operation, Verified};
use nvram::layout;
use nvram::plate::{PlateKind, PlateTable, TABLE_SIZE};
use vmm::harness::run_then_crash;
use vmm::VmConfig;

fn config(scratch: &Scratch, cmdline: &str) -> VmConfig {
    machine_config(scratch, cmdline, 64 << 20)
}

/// `kv` run until two write-outs are committed, then a power failure; the image checks
/// out (`vmm inspect --check`).
fn crashed_image(scratch: &Scratch) {
    crashed_image_with(scratch, "");
}

/// [`crashed_image`], `extra` added to the command line (the copier).
fn crashed_image_with(scratch: &Scratch, extra: &str) {
    let cmdline = format!("apps=kv kv_pages=8 checkpoint_ms=100 {extra}");
    run_then_crash(&config(scratch, &cmdline), Duration::from_secs(30), |s| s.committed_generation >= 3);
    let (code, out) = inspect_check(scratch);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("check: consistent"), "{out}");
}

/// `vmm inspect --check` on the scratch image: exit status and output.
fn inspect_check(scratch: &Scratch) -> (Option<i32>, String) {
    let image = scratch.image().display().to_string();
    let out = common::vmm(&["inspect", "--check", &image]).output().expect("run vmm inspect");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read_slot(image: &[u8], slot: usize) -> Box<PlateTable> {
    let at = layout::PLATE_SLOTS[slot] as usize;
    let mut t = <PlateTable as zerocopy::FromZeros>::new_box_zeroed().expect("a table fits in memory");
    zerocopy::IntoBytes::as_mut_bytes(&mut *t).copy_from_slice(&image[at..at + TABLE_SIZE]);
    t
}

fn write_slot(image: &mut [u8], slot: usize, t: &PlateTable) {
    let at = layout::PLATE_SLOTS[slot] as usize;
    image[at..at + TABLE_SIZE].copy_from_slice(zerocopy::IntoBytes::as_bytes(t));
}

/// The committed slot (the checksum's choice) and the other.
fn newest(image: &[u8]) -> (usize, Box<PlateTable>) {
    let slots = [read_slot(image, 0), read_slot(image, 1)];
    let i = nvram::plate::committed([&slots[0], &slots[1]]).expect("a committed slot");
    let [a, b] = slots;
    (i, if i == 0 { a } else { b })
}

/// Points the newest commit's first user-space plate at the kernel image, resealed so that
/// its checksum passes.
fn aim_at_the_kernel(t: &mut PlateTable) {
    let p = t.plates_mut().iter_mut().find(|p| p.kind == PlateKind::UserSpace as u32).expect("a user-space plate");
    p.src = layout::KERNEL_START;
    t.seal();
}

/// The restore after the crash: the kernel still runs (the copier did not overwrite it),
/// `kv` verifies the older generation, and the rollback is said everywhere.
fn assert_rolled_back(scratch: &Scratch, what: &str) {
    assert_rolled_back_with(scratch, what, "");
}

/// [`assert_rolled_back`], `extra` added to the command line (the copier).
fn assert_rolled_back_with(scratch: &Scratch, what: &str, extra: &str) {
    let after = run_then_crash(&config(scratch, &format!("check=on {extra}")), Duration::from_secs(30), |s| {
        s.workloads.get("kv").is_some_and(|w| w.last_check != Verified::Unknown)
    });
    let console = scratch.read_console();
    assert_eq!(after.boot_kind, Some(BootKind::Restored), "{console}");
    assert_eq!(after.workloads["kv"].last_check, Verified::Passed, "{console}");
    assert!(console.contains(what), "the reason named: {console}");
    assert!(console.contains("ROLLING BACK to generation"), "{console}");
    assert!(console.contains("NVM: check: the restored state is consistent"), "check=on: {console}");
    let restore = after.of(Operation::Restore).last().expect("the restore's metrics");
    assert!(restore.report.rolled_back >= 1, "{restore:?}");
}

#[test]
fn a_commit_rewritten_to_copy_over_the_kernel_is_passed_over_for_the_older_one() {
    let scratch = Scratch::new();
    crashed_image(&scratch);
    let mut image = std::fs::read(scratch.image()).unwrap();
    let (i, mut t) = newest(&image);
    aim_at_the_kernel(&mut t);
    write_slot(&mut image, i, &t);
    std::fs::write(scratch.image(), &image).unwrap();
    let (code, out) = inspect_check(&scratch);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("region at 0x100000 is outside the frame area"), "{out}");
    assert_rolled_back(&scratch, "is outside the frame area");
}

#[test]
fn a_bit_flipped_in_a_valid_save_area_is_not_restored() {
    bit_flipped_in_a_valid_save_area(ENGINE);
}

/// The CPU copier sums the pages as it copies them, as the engine does: its sums catch the
/// flip too.
#[test]
fn a_bit_flipped_in_a_valid_save_area_is_not_restored_with_the_cpu_copier() {
    bit_flipped_in_a_valid_save_area(CPU);
}

/// The command line's copier items.
const ENGINE: &str = "plate_copy=engine";
const CPU: &str = "plate_copy=cpu";

fn bit_flipped_in_a_valid_save_area(copier: &str) {
    let scratch = Scratch::new();
    crashed_image_with(&scratch, copier);
    let mut image = std::fs::read(scratch.image()).unwrap();
    let (_, t) = newest(&image);
    // The last user-space plate: `kv`'s table, written between the two commits, so that the
    // older commit's copy of it is the other save area (its code's plate, never written, has
    // one copy for both, and a flip there leaves no generation intact: a refusal).
    let (n, p) = t
        .plates()
        .iter()
        .enumerate()
        .rev()
        .find(|(_, p)| p.kind == PlateKind::UserSpace as u32 && p.valid != 0)
        .expect("a user-space plate with a copy");
    image[(p.area[p.valid as usize - 1] + 123) as usize] ^= 0x10;
    std::fs::write(scratch.image(), &image).unwrap();
    let (code, out) = inspect_check(&scratch);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("plate {n}'s valid save area fails its checksum")), "{out}");
    assert_rolled_back_with(&scratch, &Rejection::Content(n).to_string(), copier);
}

#[test]
fn with_both_commits_damaged_the_image_is_refused() {
    let scratch = Scratch::new();
    crashed_image(&scratch);
    let mut image = std::fs::read(scratch.image()).unwrap();
    for slot in 0..2 {
        let mut t = read_slot(&image, slot);
        aim_at_the_kernel(&mut t);
        write_slot(&mut image, slot, &t);
    }
    std::fs::write(scratch.image(), &image).unwrap();
    let image = scratch.image().display().to_string();
    let console = scratch.console().display().to_string();
    let args = ["boot", "--nvram", &image, "--console", &console, "--cmdline", "apps=kv kv_pages=8"];
    let done = common::run(&mut common::vmm(&args), Duration::from_secs(30));
    let console = scratch.read_console();
    assert_eq!(done.code(), Some(5), "the VMM exits 5 on a refused image: {console}");
    assert!(console.contains("no commit slot can be restored intact"), "{console}");
    assert_eq!(console.matches("passed over: an entry is wrong").count(), 2, "{console}");
}

/// A store over a save area while the machine runs, between two write-outs (here the
/// test's, into the image file that is guest RAM under eADR; the copy engine has no word of
/// it, as of a stray store of the guest's): one byte of every page of a region's area that
/// the next write-out fills. That write-out copies the region's changed pages over some of
/// them, and moves the area's sum by what they wrote less what the engine kept of what it
/// wrote there before; the pages it did not copy still hold the scribble, and the restore
/// after a crash refuses the area and rolls back, saying so.
#[test]
fn a_store_into_a_save_area_between_two_write_outs_is_caught_at_the_restore() {
    use std::os::unix::fs::FileExt;
    let scratch = Scratch::new();
    let cmdline = format!("apps=memtouch memtouch=1,64,4 memtouch_ms=10 {ENGINE}");
    let vm = vmm::harness::start(&config(&scratch, &cmdline));
    let controller = vm.controller().clone();
    let limit = Duration::from_secs(30);
    vmm::harness::wait(&vm, limit, "memtouch's region", |s| {
        s.workloads.get("memtouch").is_some_and(|w| w.progress >= 2)
    });
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(50));
        controller.checkpoint(limit).expect("a write-out");
    }
    controller.pause();
    let image = std::fs::read(scratch.image()).unwrap();
    let (_, t) = newest(&image);
    let (n, p) = t
        .plates()
        .iter()
        .enumerate()
        .find(|(_, p)| p.kind == PlateKind::UserSpace as u32 && p.pages == 16 && p.valid != 0)
        .expect("memtouch's region's plate");
    let file = std::fs::OpenOptions::new().write(true).open(scratch.image()).unwrap();
    let area = p.area[p.inactive()];
    for page in 0..p.pages {
        file.write_all_at(&[0xa5], area + page * layout::PAGE_SIZE + 100).unwrap();
    }
    controller.resume();
    std::thread::sleep(Duration::from_millis(50));
    let written = controller.checkpoint(limit).expect("the write-out after the scribble");
    vmm::harness::crash(vm);
    assert!(written.report.copied_bytes > 0, "{written:?}");
    let (code, out) = inspect_check(&scratch);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("plate {n}'s valid save area fails its checksum")), "{out}");
    let after = run_then_crash(&config(&scratch, &cmdline), limit, |s| s.boot_kind.is_some());
    let console = scratch.read_console();
    assert_eq!(after.boot_kind, Some(BootKind::Restored), "{console}");
    assert!(console.contains(&Rejection::Content(n).to_string()), "{console}");
    assert!(console.contains("ROLLING BACK to generation"), "{console}");
}

/// `sums=off` (the way `vmm report` measures what the sums cost): the boot says so, the
/// write-outs leave every committed area's sum unknown, where the default sums them all.
#[test]
fn with_sums_off_no_area_is_summed_and_by_default_every_one_is() {
    let summed_bits = |extra: &str| {
        let scratch = Scratch::new();
        crashed_image_with(&scratch, extra);
        let console = scratch.read_console();
        let image = std::fs::read(scratch.image()).unwrap();
        let (_, t) = newest(&image);
        let valid: Vec<_> = t.plates().iter().filter(|p| p.valid != 0).collect();
        assert!(valid.len() > 4, "kv's plates and the kernel's: {}", valid.len());
        let summed = valid.iter().filter(|p| p.summed & (1 << (p.valid - 1)) != 0).count();
        (summed, valid.len(), console)
    };
    let (summed, valid, console) = summed_bits("sums=off");
    assert!(console.contains("with no content sums (sums=off)"), "{console}");
    assert_eq!(summed, 0, "of {valid} committed areas");
    let (summed, valid, console) = summed_bits("");
    assert!(!console.contains("sums=off"), "{console}");
    assert_eq!(summed, valid, "every committed area summed");
}

/// With the copy engine, the restore's check has the engine sum every committed save area
/// where it is (`FLAG_SUM_ONLY`), copying none: at least the summed areas' bytes are summed
/// alone, before the restore copies anything back.
#[test]
fn the_engine_sums_the_save_areas_in_place_at_a_restore() {
    let scratch = Scratch::new();
    crashed_image(&scratch);
    let image = std::fs::read(scratch.image()).unwrap();
    let (_, t) = newest(&image);
    let summed: u64 = t
        .plates()
        .iter()
        .filter(|p| p.valid != 0 && p.summed & (1 << (p.valid - 1)) != 0)
        .map(|p| p.pages * layout::PAGE_SIZE)
        .sum();
    let vm = vmm::harness::start(&config(&scratch, ""));
    let status = vmm::harness::wait(&vm, Duration::from_secs(30), "the restore", |s| s.boot_kind.is_some());
    let engine = vm.controller().metrics().engine.expect("the copy engine's metrics");
    vmm::harness::crash(vm);
    assert_eq!(status.boot_kind, Some(BootKind::Restored));
    assert!(
        summed > 0 && engine.summed_only >= summed,
        "{} bytes summed alone, {summed} summed in the commit",
        engine.summed_only
    );
}
