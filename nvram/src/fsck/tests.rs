//! A hand-built sound state passes; each violation, built by hand, is named.

extern crate std;

use std::boxed::Box;
use std::vec;
use std::vec::Vec;

use zerocopy::FromZeros;

use super::*;
use crate::layout;
use crate::plate::{Plate, FIXED_FRAME_BITMAP, FIXED_RESOURCES};
use crate::resources::{RealMemory, VirtualRegion, VirtualSpace, VirtualUserSpace};

const FRAMES: u64 = 256;
const F: u64 = FRAMES_BASE;
const P: u64 = PAGE_SIZE;

struct Image {
    res: Box<Resources>,
    bitmap: Vec<u64>,
    table: Box<PlateTable>,
}

impl Image {
    /// A space (pool of 32 frames at F), one user space of 2 pages (at F + 32 pages), each
    /// plated, with their save areas; a pending deletion of 1 page.
    fn sound() -> Self {
        let mut res = Resources::new_box_zeroed().unwrap();
        res.format();
        let pool = res.real.insert(RealMemory { base: F, pages: TABLE_POOL_PAGES }).unwrap();
        let space =
            res.spaces.insert(VirtualSpace { root: F, next_va: 0, owner: 0, pool, pool_used: 1, reserved: 0 }).unwrap();
        let real = res.real.insert(RealMemory { base: F + 32 * P, pages: 2 }).unwrap();
        let region = res.regions.insert(VirtualRegion { real, flags: 0, pages: 2 }).unwrap();
        let user = res.user_spaces.insert(VirtualUserSpace { region, space, vaddr: 0, pages: 2, flags: 0 }).unwrap();
        let mut table = PlateTable::new_box_zeroed().unwrap();
        table.format();
        table
            .add(Plate::new(PlateKind::Fixed, FIXED_RESOURCES, layout::RESOURCES, 20, layout::RESOURCES_SAVE))
            .unwrap();
        table
            .add(Plate::new(PlateKind::Fixed, FIXED_FRAME_BITMAP, layout::FRAME_BITMAP, 1, layout::FRAME_BITMAP_SAVE))
            .unwrap();
        table.add(Plate::new(PlateKind::PageTables, space, F, 32, [F + 40 * P, F + 72 * P])).unwrap();
        table.add(Plate::new(PlateKind::UserSpace, user, F + 32 * P, 2, [F + 34 * P, F + 36 * P])).unwrap();
        table.pending[0] = crate::plate::Pending { area: [F + 38 * P, F + 39 * P], pages: 1 };
        table.pending_count = 1;
        table.seal();
        // Frames 0..104 in use.
        let mut bitmap = vec![0u64; 4];
        bitmap[0] = u64::MAX;
        bitmap[1] = (1 << 40) - 1;
        Self { res, bitmap, table }
    }

    fn check(&self, committed: bool) -> Vec<Violation> {
        let state = State { resources: &self.res, bitmap: &self.bitmap, table: &self.table, frames: FRAMES, committed };
        let mut found = Vec::new();
        let n = check_state(&state, &mut [0; 4], |v| found.push(v));
        assert_eq!(n, found.len());
        found
    }
}

#[test]
fn a_sound_state_passes() {
    assert_eq!(Image::sound().check(true), vec![]);
}

/// What is damaged, how, and the violation it must give.
type Case = (&'static str, fn(&mut Image), Violation);

#[test]
fn each_violation_is_named() {
    let cases: [Case; 9] = [
        ("a frame leaked", |i| i.bitmap[2] = 1, Violation::Leaked { frame: F + 128 * P }),
        ("an area free", |i| i.bitmap[0] &= !(1 << 35), Violation::OwnedButFree { frame: F + 35 * P }),
        // A pending deletion's area reused by a new real memory.
        (
            "a pending area reused",
            |i| {
                i.res.real.insert(RealMemory { base: F + 38 * P, pages: 1 }).unwrap();
            },
            Violation::SharedFrame { frame: F + 38 * P },
        ),
        (
            "real memory outside",
            |i| {
                i.res.real.insert(RealMemory { base: layout::PLATE_SLOTS[0], pages: 1 }).unwrap();
            },
            Violation::RealOutside { id: 2 },
        ),
        (
            "plate of a gone resource",
            |i| i.res.user_spaces.remove(0).map(drop).unwrap(),
            Violation::NoResource { plate: 3 },
        ),
        ("plate at the wrong place", |i| i.table.plates[3].pages = 1, Violation::WrongPlace { plate: 3 }),
        (
            "plated bit without a plate",
            |i| i.table.plated[PlateKind::UserSpace as usize][0] |= 1 << 9,
            Violation::PlatedBits { kind: 3, id: 9 },
        ),
        (
            "a space without a plate",
            |i| {
                i.table.plates[3] = i.table.plates[2];
                i.table.count = 3;
                i.table.plated[PlateKind::UserSpace as usize][0] = 0;
                i.bitmap[0] &= !(0b1111 << 34);
            },
            Violation::Unplated { kind: 3, id: 0 },
        ),
        (
            "an entry over the kernel",
            |i| i.table.plates[2].area[0] = layout::KERNEL_START,
            Violation::Entry(plate_check::EntryError {
                entry: plate_check::Entry::Plate(2),
                problem: plate_check::Problem::Outside(plate_check::Range::AreaA, layout::KERNEL_START),
            }),
        ),
    ];
    for (what, damage, expected) in cases {
        let mut image = Image::sound();
        damage(&mut image);
        let found = image.check(true);
        assert!(found.contains(&expected), "{what}: {found:?}");
        assert!(!std::format!("{expected}").is_empty());
    }
    // A live state need not have every space plated.
    let mut image = Image::sound();
    image.table.count = 3;
    image.table.plated[PlateKind::UserSpace as usize][0] = 0;
    image.bitmap[0] &= !(0b1111 << 34);
    assert_eq!(image.check(false), vec![]);
}

/// A crashed image by hand: a header recording `recorded`, slot 0 committing generation 1
/// (the two fixed plates, their valid areas holding formatted tables and an empty bitmap).
fn crashed_image(recorded: u64) -> Vec<u64> {
    use zerocopy::IntoBytes;
    let frames = 64u64;
    let mut words = vec![0u64; ((FRAMES_BASE + frames * P) / 8) as usize];
    let bytes = words.as_mut_bytes();
    let mut header = crate::header::RootHeader::new(1);
    header.resources = layout::RESOURCES;
    header.frame_bitmap = layout::FRAME_BITMAP;
    header.frames_base = FRAMES_BASE;
    header.frames = frames;
    header.generation = recorded;
    header.seal();
    bytes[layout::ROOT_HEADER as usize..][..crate::header::HEADER_SIZE].copy_from_slice(&header.to_bytes());
    let mut res = Resources::new_box_zeroed().unwrap();
    res.format();
    let res_pages = (size_of::<Resources>() as u64).div_ceil(P);
    // The formatted tables in their save area A.
    let raw: &[u8] = resources_bytes(&res);
    bytes[layout::RESOURCES_SAVE[0] as usize..][..raw.len()].copy_from_slice(raw);
    let mut t = PlateTable::new_box_zeroed().unwrap();
    t.format();
    let mut fixed = Plate::new(PlateKind::Fixed, FIXED_RESOURCES, layout::RESOURCES, res_pages, layout::RESOURCES_SAVE);
    let mut bitmap =
        Plate::new(PlateKind::Fixed, FIXED_FRAME_BITMAP, layout::FRAME_BITMAP, 1, layout::FRAME_BITMAP_SAVE);
    for p in [&mut fixed, &mut bitmap] {
        p.valid = 1;
        p.summed = 1;
        let at = p.area[0] as usize;
        p.sum[0] = crate::plate::area_sum(&bytes[at..at + (p.pages * P) as usize], 0);
    }
    t.add(fixed).unwrap();
    t.add(bitmap).unwrap();
    t.generation = 1;
    t.seal();
    bytes[layout::PLATE_SLOTS[0] as usize..][..TABLE_SIZE].copy_from_slice(t.as_bytes());
    words
}

/// The resource tables' bytes (`Resources` is `FromBytes` only: zerocopy cannot derive
/// `IntoBytes` for its generic tables).
fn resources_bytes(res: &Resources) -> &[u8] {
    let ptr = res as *const Resources as *const u8;
    // SAFETY: `Resources` is plain integers with no padding (its tables are `repr(C)` of
    // u32/u64 fields), so all its bytes are initialized; the slice lives as long as `res`.
    unsafe { core::slice::from_raw_parts(ptr, size_of::<Resources>()) }
}

fn check_image_words(words: &[u64]) -> (Result<usize, Unchecked>, Vec<Violation>) {
    use zerocopy::IntoBytes;
    let mut found = Vec::new();
    let r = check_image(words.as_bytes(), &mut [0; 4], |v| found.push(v));
    (r, found)
}

#[test]
fn a_hand_built_crashed_image_checks_out_and_its_generation_and_areas_are_checked() {
    use zerocopy::IntoBytes;
    assert_eq!(check_image_words(&crashed_image(1)), (Ok(0), vec![]));
    // The header records generation 2, the only commit is generation 1: a rollback.
    let (r, found) = check_image_words(&crashed_image(2));
    assert_eq!((r, found), (Ok(1), vec![Violation::Generation { header: 2, committed: 1 }]));
    // A bit flipped in the resource tables' valid area: no slot can be restored.
    let mut words = crashed_image(1);
    words.as_mut_bytes()[layout::RESOURCES_SAVE[0] as usize + 40] ^= 1;
    let (r, found) = check_image_words(&words);
    assert_eq!((r, found), (Ok(2), vec![Violation::Content { plate: 0 }, Violation::NoCommit { header: 1 }]));
}
