//! Random bit flips over a crashed image (the root header's copies, the commit slots, the
//! save areas, the tables), each booted: the boot must refuse the image with a message, or
//! restore saying it rolled back, or restore correctly; never roll back or restore corrupt
//! data without a word. A few flips run by default; `cargo test --release -p cli --test
//! bit_flips -- --ignored --nocapture` runs 200 and prints the table.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{machine_config, Scratch};
use devices::exit::GuestExit;
use nvram::control::{BootKind, Operation, Verified};
use nvram::exit::ExitCode;
use nvram::layout;
use nvram::plate::{PlateTable, TABLE_SIZE};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use vmm::harness::{run_then_crash, start};
use vmm::{RunOutcome, VmConfig};

fn config(scratch: &Scratch, cmdline: &str) -> VmConfig {
    machine_config(scratch, cmdline, 64 << 20)
}

fn table_at(image: &[u8], at: u64) -> Box<PlateTable> {
    let mut t = <PlateTable as zerocopy::FromZeros>::new_box_zeroed().expect("a table fits in memory");
    zerocopy::IntoBytes::as_mut_bytes(&mut *t).copy_from_slice(&image[at as usize..at as usize + TABLE_SIZE]);
    t
}

/// What a boot made of a flipped image.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    Refused,
    RolledBackSaid,
    Correct,
    /// A rollback, a loss or corrupt data, without a word.
    Silent(String),
    /// Anything else (a hang, a panic): a failure, though not a silent one.
    Other(String),
}

/// Where a flip lands.
const PLACES: [&str; 4] = ["header copies", "commit slots", "save areas", "tables"];

/// A random bit of `place` in `image`.
fn pick(image: &[u8], place: usize, rng: &mut SmallRng) -> u64 {
    let slots = [table_at(image, layout::PLATE_SLOTS[0]), table_at(image, layout::PLATE_SLOTS[1])];
    let byte = match place {
        0 => [layout::ROOT_HEADER, layout::ROOT_HEADER_COPY][rng.random_range(0..2)] + rng.random_range(0..96),
        1 => {
            let s = rng.random_range(0..2);
            let [(_, head), (plates_at, plates)] = slots[s].used_ranges();
            let off = rng.random_range(0..(head + plates) as u64);
            layout::PLATE_SLOTS[s] + if off < head as u64 { off } else { plates_at as u64 + off - head as u64 }
        }
        2 => {
            let t = &slots[if slots[1].generation > slots[0].generation { 1 } else { 0 }];
            let p = t.plates()[rng.random_range(0..t.plates().len())];
            let area = p.area[rng.random_range(0..2)];
            area + rng.random_range(0..p.pages * layout::PAGE_SIZE)
        }
        _ => {
            let (at, len) =
                [(layout::RESOURCES, 0x2_0000), (layout::FRAME_BITMAP, 0x800), (layout::PLATE_LIVE, TABLE_SIZE as u64)]
                    [rng.random_range(0..3)];
            at + rng.random_range(0..len)
        }
    };
    byte * 8 + rng.random_range(0..8)
}

/// Boots the flipped image and classifies what the boot did; `committed`: the generation
/// the crash left committed.
fn boot(scratch: &Scratch, committed: u64, copier: &str) -> Outcome {
    let vm = start(&config(scratch, &format!("check=on {copier}")));
    let waited = vm.wait_for(Duration::from_secs(20), "kv's check", |s| {
        s.workloads.get("kv").is_some_and(|w| w.last_check != Verified::Unknown)
    });
    let status = vm.controller().snapshot();
    let outcome = vm.stop();
    let console = scratch.read_console();
    let said = console.contains("ROLLING BACK") || console.contains("VIOLATION");
    if waited.is_err() {
        return match outcome {
            Ok(RunOutcome::Guest(GuestExit::Code(ExitCode::BadImage))) if console.contains("refusing this image") => {
                Outcome::Refused
            }
            other => Outcome::Other(format!("{other:?}, boot {:?}", status.boot_kind)),
        };
    }
    let restore = status.of(Operation::Restore).last().map(|r| r.report);
    let kv = status.workloads["kv"].last_check;
    match (status.boot_kind, restore) {
        (Some(BootKind::Restored), Some(r)) if r.rolled_back > 0 && said && kv == Verified::Passed => {
            Outcome::RolledBackSaid
        }
        (Some(BootKind::Restored), Some(r)) if r.generation >= committed && kv == Verified::Passed => {
            if said {
                Outcome::Other("restored, but the check found violations".into())
            } else {
                Outcome::Correct
            }
        }
        (Some(BootKind::Restored), Some(r)) if kv == Verified::Passed => {
            Outcome::Silent(format!("rolled back to {} of {committed}", r.generation))
        }
        (kind, _) if !said => Outcome::Silent(format!("boot {kind:?}, kv {kv:?}")),
        (kind, _) => Outcome::Other(format!("boot {kind:?}, kv {kv:?}, said so")),
    }
}

/// `flips` random flips, each on a fresh copy of one crashed image; returns the table:
/// per place, per outcome, how many.
/// `copier`: the command line's copier item, for the run that crashes and each boot.
fn experiment(flips: usize, seed: u64, copier: &str) -> BTreeMap<(&'static str, Outcome), usize> {
    let scratch = Scratch::new();
    run_then_crash(
        &config(&scratch, &format!("apps=kv kv_pages=8 kv_verify_every=1 checkpoint_ms=100 {copier}")),
        Duration::from_secs(30),
        |s| s.committed_generation >= 3,
    );
    let base = std::fs::read(scratch.image()).unwrap();
    let committed = {
        let slots = [table_at(&base, layout::PLATE_SLOTS[0]), table_at(&base, layout::PLATE_SLOTS[1])];
        let i = nvram::plate::committed([&slots[0], &slots[1]]).expect("a commit");
        slots[i].generation
    };
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut table = BTreeMap::new();
    for n in 0..flips {
        let place = n % PLACES.len();
        let bit = pick(&base, place, &mut rng);
        let mut image = base.clone();
        image[(bit / 8) as usize] ^= 1 << (bit % 8);
        std::fs::write(scratch.image(), &image).unwrap();
        let _ = std::fs::remove_file(scratch.console());
        let outcome = boot(&scratch, committed, copier);
        if matches!(outcome, Outcome::Silent(_) | Outcome::Other(_)) {
            eprintln!("flip {n}: bit {bit:#x} ({}): {outcome:?}", PLACES[place]);
        }
        *table.entry((PLACES[place], outcome)).or_insert(0) += 1;
    }
    for ((place, outcome), count) in &table {
        println!("| {place} | {outcome:?} | {count} |");
    }
    table
}

fn assert_never_silent(table: &BTreeMap<(&'static str, Outcome), usize>) {
    let bad: Vec<_> = table.iter().filter(|((_, o), _)| matches!(o, Outcome::Silent(_) | Outcome::Other(_))).collect();
    assert!(bad.is_empty(), "{bad:?}");
}

#[test]
fn a_few_random_bit_flips_are_never_silent() {
    assert_never_silent(&experiment(8, 0x5eed, "plate_copy=engine"));
}

/// The CPU copier computes the save areas' sums itself (page by page, as it copies).
#[test]
fn a_few_random_bit_flips_are_never_silent_with_the_cpu_copier() {
    assert_never_silent(&experiment(8, 0x5eed, "plate_copy=cpu"));
}

#[test]
#[ignore = "200 boots: run by hand (--ignored --nocapture) for the table"]
fn two_hundred_random_bit_flips_are_never_silent() {
    assert_never_silent(&experiment(200, 0xb17_f11b5, "plate_copy=engine"));
}

#[test]
#[ignore = "200 boots: run by hand (--ignored --nocapture) for the table"]
fn two_hundred_random_bit_flips_are_never_silent_with_the_cpu_copier() {
    assert_never_silent(&experiment(200, 0xb17_f11b5, "plate_copy=cpu"));
}
