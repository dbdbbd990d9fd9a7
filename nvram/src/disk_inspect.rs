//! Decoding a plate-store disk offline (`vmm inspect --disk`), as [`crate::inspect`]
//! decodes an image: the superblock, the two commit slots and which one a boot restores,
//! the plates and the deletion-pending list of that commit; and (`--check`) the checks that
//! make sense for a disk: every save area inside the area space (the fixed ones at their
//! fixed places), no two areas sharing a page, no pending area reused by a plate, a valid
//! commit when one was ever made, and each valid area's content sum. Any bytes decode to a
//! report, never a panic.
//!
//! The regions' addresses are RAM's, which the disk does not describe (the RAM size is the
//! machine's): they are shown, and checked by the kernel at restore
//! (`crate::plate_check::check_disk_entries`), not here.

use std::boxed::Box;
use std::format;
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use serde::Serialize;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::disk::{self, DiskError, Found, Superblock, SECTOR, SLOTS};
use crate::inspect::{PendingReport, PlateReport, SlotReport};
use crate::layout::PAGE_SIZE;
use crate::plate::{self, area_sum, PlateKind, PlateTable, TableError, TABLE_SIZE};

/// What `vmm boot --cmdline plate_store=disk` does with the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DiskBoot {
    /// A blank disk is formatted, a store without a commit used as it is: the machine
    /// starts afresh and commits generation 1.
    #[serde(rename = "fresh start")]
    Fresh,
    /// The committed write-out is restored into fresh RAM.
    #[serde(rename = "restore")]
    Restore,
    /// The kernel refuses the disk (exit status 9).
    #[serde(rename = "refuse")]
    Refuse,
}

impl DiskBoot {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fresh => "fresh start",
            Self::Restore => "restore",
            Self::Refuse => "refuse",
        }
    }
}

/// What a disk holds, as far as it can be read.
#[derive(Debug, Serialize)]
pub struct DiskReport {
    /// The file's size.
    pub size: u64,
    /// `blank`, `plate store`, `foreign`, `corrupt`, `too small`.
    pub verdict: &'static str,
    pub explanation: String,
    pub boot: DiskBoot,
    pub superblock: Option<SuperblockReport>,
    pub slots: Vec<SlotReport>,
    /// Index of the slot a restore follows.
    pub committed: Option<usize>,
    pub plates: Vec<PlateReport>,
    pub pending: Vec<PendingReport>,
}

#[derive(Debug, Serialize)]
pub struct SuperblockReport {
    pub version: u32,
    pub disk_bytes: u64,
    pub area_start: u64,
    pub area_pages: u64,
    pub checksum_ok: bool,
}

/// A plate table at disk offset `at`, if `bytes` holds all of it.
fn table_at(bytes: &[u8], at: u64) -> Option<Box<PlateTable>> {
    let at = usize::try_from(at).ok()?;
    let src = bytes.get(at..at.checked_add(TABLE_SIZE)?)?;
    let mut table = PlateTable::new_box_zeroed().ok()?;
    table.as_mut_bytes().copy_from_slice(src);
    Some(table)
}

/// Bytes of a disk's head that [`inspect_disk`] reads: the superblock and both slots.
pub const HEAD: u64 = SLOTS[1] + disk::SLOT_BYTES;

/// Decodes a disk of `size` bytes from `head`, its first bytes (at least [`HEAD`] of them
/// when the disk has as many).
pub fn inspect_disk(head: &[u8], size: u64) -> DiskReport {
    let mut report = DiskReport {
        size,
        verdict: "corrupt",
        explanation: String::new(),
        boot: DiskBoot::Refuse,
        superblock: None,
        slots: Vec::new(),
        committed: None,
        plates: Vec::new(),
        pending: Vec::new(),
    };
    let Some(sector) = head.get(..SECTOR as usize) else {
        report.verdict = "too small";
        report.explanation = format!("{size} bytes hold no superblock: {}", DiskError::TooSmall { bytes: size });
        return report;
    };
    let sb = match disk::read_superblock(sector, size) {
        Ok(Found::Blank) => {
            report.verdict = "blank";
            report.explanation = match Superblock::new(size) {
                Ok(_) => "the superblock is all zeros: a new disk, formatted at its first boot".into(),
                Err(e) => {
                    report.verdict = "too small";
                    return refused(report, e.to_string());
                }
            };
            report.boot = DiskBoot::Fresh;
            return report;
        }
        Ok(Found::Store(sb)) => sb,
        Err(e @ DiskError::Foreign { .. }) => {
            report.verdict = "foreign";
            return refused(report, e.to_string());
        }
        Err(e) => {
            let raw = Superblock::read_from_prefix(sector).map(|(sb, _)| sb).unwrap_or_default();
            report.superblock = Some(superblock_report(&raw, false));
            return refused(report, e.to_string());
        }
    };
    report.verdict = "plate store";
    report.superblock = Some(superblock_report(&sb, true));
    let tables: Vec<Option<Box<PlateTable>>> = SLOTS.iter().map(|&at| table_at(head, at)).collect();
    for (i, table) in tables.iter().enumerate() {
        report.slots.push(match table {
            None => SlotReport {
                address: SLOTS[i],
                valid: false,
                problem: Some("past the end of the disk".into()),
                generation: 0,
                plates: 0,
                pending: 0,
            },
            Some(t) => SlotReport {
                address: SLOTS[i],
                valid: t.check().is_ok(),
                problem: t.check().err().map(|e| format!("{e:?}")),
                generation: t.generation,
                plates: t.count,
                pending: t.pending_count,
            },
        });
    }
    let blank = |t: &Option<Box<PlateTable>>| t.as_ref().is_some_and(|t| t.check() == Err(TableError::BadMagic));
    if let [Some(a), Some(b)] = &tables[..] {
        report.committed = plate::committed([a, b]);
    }
    match report.committed {
        Some(i) => {
            let t = tables[i].as_ref().expect("a committed slot was read");
            report.explanation = format!("commit slot {i} holds generation {}", t.generation);
            report.boot = DiskBoot::Restore;
            report.plates = t.plates().iter().map(plate_report).collect();
            report.pending = t.pending().iter().map(|p| PendingReport { areas: p.area, pages: p.pages }).collect();
        }
        None if tables.iter().all(blank) => {
            report.explanation = "no write-out was committed yet".into();
            report.boot = DiskBoot::Fresh;
        }
        None => {
            report.explanation = "neither commit slot checks out, though one was written: no intact commit".into();
        }
    }
    report
}

fn refused(mut report: DiskReport, why: String) -> DiskReport {
    report.explanation = why;
    report.boot = DiskBoot::Refuse;
    report
}

fn superblock_report(sb: &Superblock, checksum_ok: bool) -> SuperblockReport {
    SuperblockReport {
        version: sb.version,
        disk_bytes: sb.disk_bytes,
        area_start: sb.area_start,
        area_pages: sb.area_pages,
        checksum_ok,
    }
}

fn plate_report(p: &plate::Plate) -> PlateReport {
    PlateReport {
        kind: PlateKind::try_from(p.kind).map_or("unknown", <&str>::from),
        id: p.id,
        src: p.src,
        pages: p.pages,
        areas: p.area,
        valid_area: match p.valid {
            1 => "A",
            2 => "B",
            _ => "none",
        },
    }
}

/// The consistency checks of a disk (`bytes`: all of it, for the content sums; a shorter
/// prefix skips the sums of areas past its end). Each violation in words.
pub fn check_disk(bytes: &[u8]) -> Vec<String> {
    let size = bytes.len() as u64;
    let report = inspect_disk(bytes, size);
    let mut found = Vec::new();
    if report.verdict != "plate store" {
        return found;
    }
    let Some(sb) = bytes.get(..SECTOR as usize).and_then(|s| Superblock::read_from_prefix(s).ok()).map(|(s, _)| s)
    else {
        return found;
    };
    let Some(i) = report.committed else {
        if report.boot == DiskBoot::Refuse {
            found.push("no commit slot checks out, though one was written".to_string());
        }
        return found;
    };
    let Some(t) = table_at(bytes, SLOTS[i]) else { return found };
    // Per area page, who holds it: an index in `names`, plus one (0: nobody).
    let mut owner = vec![0u32; sb.area_pages as usize];
    let mut names: Vec<String> = Vec::new();
    let mut claim = |found: &mut Vec<String>, who: String, at: u64, pages: u64| {
        let end = pages.checked_mul(PAGE_SIZE).and_then(|len| at.checked_add(len));
        let inside = at.is_multiple_of(PAGE_SIZE) && at >= sb.area_start && end.is_some_and(|e| e <= sb.area_end());
        if !inside {
            found.push(format!("{who}: save area at {at:#x} ({pages} pages) is outside the area space"));
            return;
        }
        let first = (at - sb.area_start) / PAGE_SIZE;
        if names.last() != Some(&who) {
            names.push(who.clone());
        }
        let me = names.len() as u32;
        for page in first..first + pages {
            match owner[page as usize] {
                0 => owner[page as usize] = me,
                other => {
                    let other = &names[other as usize - 1];
                    found
                        .push(format!("{who}: save area at {at:#x} shares page {page} of the area space with {other}"));
                    return;
                }
            }
        }
    };
    for (n, p) in t.plates().iter().enumerate() {
        let who = format!("plate {n} ({} {})", PlateKind::try_from(p.kind).map_or("unknown", <&str>::from), p.id);
        if p.kind == PlateKind::Fixed as u32 {
            if sb.fixed_areas(p.id) != Some(p.area) {
                found.push(format!("{who}: a fixed table not at its fixed place on the disk"));
            }
        } else if p.pages != 0 {
            for a in p.area {
                claim(&mut found, who.clone(), a, p.pages);
            }
        }
        if p.valid > 2 {
            found.push(format!("{who}: valid area {} is none of 0, 1, 2", p.valid));
            continue;
        }
        let v = (p.valid as usize).wrapping_sub(1) & 1;
        if p.valid == 0 || p.summed & (1 << v) == 0 {
            continue;
        }
        let at = p.area[v] as usize;
        let Some(len) = p.pages.checked_mul(PAGE_SIZE) else { continue };
        if let Some(area) = at.checked_add(len as usize).and_then(|end| bytes.get(at..end)) {
            if area_sum(area, 0) != p.sum[v] {
                found.push(format!("{who}: its valid save area does not hold what was written there (checksum)"));
            }
        }
    }
    for (n, p) in t.pending().iter().enumerate() {
        for a in p.area {
            claim(&mut found, format!("pending deletion {n}"), a, p.pages);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(size: usize) -> Vec<u8> {
        let mut disk = vec![0u8; size];
        let sb = Superblock::new(size as u64).unwrap();
        disk[..disk::SUPERBLOCK_SIZE].copy_from_slice(sb.as_bytes());
        disk
    }

    fn commit(disk: &mut [u8], slot: usize, generation: u64, plates: &[plate::Plate]) {
        let mut t = PlateTable::new_box_zeroed().unwrap();
        t.format();
        for p in plates {
            t.add(*p).unwrap();
        }
        t.generation = generation;
        t.seal();
        let at = SLOTS[slot] as usize;
        disk[at..at + TABLE_SIZE].copy_from_slice(t.as_bytes());
    }

    const A: u64 = disk::AREA_START;

    fn user(id: u32, pages: u64, area: [u64; 2]) -> plate::Plate {
        let mut p = plate::Plate::new(PlateKind::UserSpace, id, 0x100_0000, pages, area);
        p.valid = 1;
        p
    }

    #[test]
    fn blank_foreign_and_committed_disks_decode() {
        let blank = vec![0u8; 4 << 20];
        assert_eq!(inspect_disk(&blank, 4 << 20).boot, DiskBoot::Fresh);
        let mut foreign = blank.clone();
        foreign[..4].copy_from_slice(b"\x7fELF");
        let r = inspect_disk(&foreign, 4 << 20);
        assert_eq!((r.verdict, r.boot), ("foreign", DiskBoot::Refuse));
        let mut disk = store(4 << 20);
        assert_eq!(inspect_disk(&disk, 4 << 20).boot, DiskBoot::Fresh, "formatted, nothing committed");
        commit(&mut disk, 1, 3, &[user(0, 2, [A, A + 2 * PAGE_SIZE])]);
        let r = inspect_disk(&disk, 4 << 20);
        assert_eq!((r.boot, r.committed, r.plates.len()), (DiskBoot::Restore, Some(1), 1));
        assert!(check_disk(&disk).is_empty(), "{:?}", check_disk(&disk));
        // A torn newest slot and no other commit: refused.
        let at = SLOTS[1] as usize + 40;
        disk[at] ^= 1;
        let r = inspect_disk(&disk, 4 << 20);
        assert_eq!((r.boot, r.committed), (DiskBoot::Refuse, None));
        assert_eq!(check_disk(&disk).len(), 1);
        // Too short for anything.
        assert_eq!(inspect_disk(&disk[..100], 100).verdict, "too small");
    }

    #[test]
    fn the_check_names_areas_outside_shared_or_reused_and_damaged() {
        let mut disk = store(4 << 20);
        let outside = user(0, 1, [A - PAGE_SIZE, A]);
        let shared = user(1, 1, [A + PAGE_SIZE, A + PAGE_SIZE]);
        let mut summed = user(2, 1, [A + 4 * PAGE_SIZE, A + 5 * PAGE_SIZE]);
        summed.summed = 1;
        summed.sum = [12345, 0];
        commit(&mut disk, 0, 1, &[outside, shared, summed]);
        let v = check_disk(&disk);
        assert!(v.iter().any(|v| v.contains("plate 0") && v.contains("outside")), "{v:?}");
        assert!(v.iter().any(|v| v.contains("plate 1") && v.contains("shares page 1")), "{v:?}");
        assert!(v.iter().any(|v| v.contains("plate 2") && v.contains("checksum")), "{v:?}");
        // Random bytes anywhere never panic.
        let mut rng = 0x1234_5678u64;
        for _ in 0..200 {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let at = (rng >> 20) as usize % HEAD as usize;
            disk[at] ^= rng as u8;
            let _ = check_disk(&disk);
        }
    }
}
