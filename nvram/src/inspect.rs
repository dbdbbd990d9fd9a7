//! Decoding an image offline (`vmm inspect`): the root header, the plate table's two slots
//! and which one is committed, the plates and the deletion-pending list, the resource tables'
//! headers, and whether every checksum holds. Any bytes decode to a report, never a panic:
//! every offset is checked against the image's length first.
//!
//! It lives beside the records it decodes (host only: the `std` feature), so that a tool
//! reads an image with no part of the guest kernel's logic.

use std::boxed::Box;
use std::format;
use std::string::String;
use std::vec;
use std::vec::Vec;

use serde::Serialize;
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::header::{self, HeaderCopy, HeaderError, RootHeader, ShutdownFlag, HEADER_SIZE};
use crate::layout;
use crate::plate::{self, PlateKind, PlateTable, TABLE_SIZE};
use crate::resources::Resources;

/// What an image holds, as far as it can be read.
#[derive(Debug, Serialize)]
pub struct Report {
    pub size: u64,
    /// `formatted`, `blank`, `truncated`, `foreign`, `corrupt`.
    pub verdict: &'static str,
    /// Why, in words.
    pub explanation: String,
    pub header: Option<HeaderReport>,
    pub resources_ok: Option<bool>,
    pub slots: Vec<SlotReport>,
    /// Index of the committed slot.
    pub committed: Option<usize>,
    pub plates: Vec<PlateReport>,
    pub pending: Vec<PendingReport>,
}

#[derive(Debug, Serialize)]
pub struct HeaderReport {
    pub format_version: u32,
    pub build_id: String,
    pub boot_count: u64,
    pub shutdown_flag: &'static str,
    pub generation: u64,
    pub frames: u64,
    pub checksum_ok: bool,
}

#[derive(Debug, Serialize)]
pub struct SlotReport {
    pub address: u64,
    pub valid: bool,
    /// Why not, if not.
    pub problem: Option<String>,
    pub generation: u64,
    pub plates: u32,
    pub pending: u32,
}

#[derive(Debug, Serialize)]
pub struct PlateReport {
    pub kind: &'static str,
    pub id: u32,
    pub src: u64,
    pub pages: u64,
    pub areas: [u64; 2],
    /// `A`, `B`, or `none`.
    pub valid_area: &'static str,
}

#[derive(Debug, Serialize)]
pub struct PendingReport {
    pub areas: [u64; 2],
    pub pages: u64,
}

fn kind_name(raw: u32) -> &'static str {
    PlateKind::try_from(raw).map_or("unknown", <&str>::from)
}

/// A plate table read from `bytes` at `at`, if the image holds all of it (copied: the image
/// need not be aligned, and a table is too large for a stack).
fn table_at(bytes: &[u8], at: u64) -> Option<Box<PlateTable>> {
    let at = usize::try_from(at).ok()?;
    let src = bytes.get(at..at.checked_add(TABLE_SIZE)?)?;
    let mut table = PlateTable::new_box_zeroed().ok()?;
    table.as_mut_bytes().copy_from_slice(src);
    Some(table)
}

/// Whether the resource tables in `raw` (their block's bytes) check out. The block has no
/// `IntoBytes` (its tables are generic), so its bytes go through aligned words.
fn resources_ok(raw: &[u8]) -> Option<bool> {
    let mut words = vec![0u64; raw.len().div_ceil(8)];
    words.as_mut_bytes()[..raw.len()].copy_from_slice(raw);
    let (resources, _) = Resources::ref_from_prefix(words.as_bytes()).ok()?;
    Some(resources.check().is_ok())
}

/// Decodes `bytes`, the contents of an image.
pub fn inspect(bytes: &[u8]) -> Report {
    let size = bytes.len() as u64;
    let mut report = Report {
        size,
        verdict: "corrupt",
        explanation: String::new(),
        header: None,
        resources_ok: None,
        slots: Vec::new(),
        committed: None,
        plates: Vec::new(),
        pending: Vec::new(),
    };
    let read = |at: u64| {
        let at = at as usize;
        bytes.get(at..at + HEADER_SIZE).map(|raw| RootHeader::from_bytes(raw.try_into().expect("HEADER_SIZE bytes")))
    };
    let Some(first) = read(layout::ROOT_HEADER) else {
        report.verdict = "truncated";
        report.explanation = format!(
            "the image has {size} bytes, too few to reach the root header at {:#x}: not an image of this machine, or cut short",
            layout::ROOT_HEADER
        );
        return report;
    };
    // The kernel's own choice between the header's two copies.
    let header = match header::choose(&first, &read(layout::ROOT_HEADER_COPY).unwrap_or_default()) {
        Ok((header, _, copy)) => {
            report.verdict = "formatted";
            report.explanation = match copy {
                HeaderCopy::First => "the root header holds".into(),
                HeaderCopy::Second => "the root header's first copy was torn by a power failure during an update; \
                                       its second copy holds"
                    .into(),
            };
            header
        }
        Err(HeaderError::Blank) => {
            report.verdict = "blank";
            report.explanation = "the root header is all zeros: a new image, formatted at its first boot".into();
            return report;
        }
        Err(e @ (HeaderError::BadMagic | HeaderError::Version { .. } | HeaderError::Size { .. })) => {
            report.verdict = "foreign";
            report.explanation = format!("{e}; `vmm boot --reformat` starts it afresh");
            return report;
        }
        Err(e) => {
            report.verdict = "corrupt";
            report.explanation = e.to_string();
            first
        }
    };
    report.header = Some(HeaderReport {
        format_version: header.format_version,
        build_id: format!("{:016x}", header.build_id),
        boot_count: header.boot_count,
        shutdown_flag: ShutdownFlag::try_from(header.shutdown_flag).map_or("invalid", <&str>::from),
        generation: header.generation,
        frames: header.frames,
        checksum_ok: header.compute_checksum() == header.checksum,
    });
    let res_at = layout::RESOURCES as usize;
    if let Some(raw) = bytes.get(res_at..res_at + core::mem::size_of::<Resources>()) {
        report.resources_ok = resources_ok(raw);
    }
    let tables: Vec<Option<Box<PlateTable>>> = layout::PLATE_SLOTS.iter().map(|&a| table_at(bytes, a)).collect();
    for (i, table) in tables.iter().enumerate() {
        let slot = match table {
            None => SlotReport {
                address: layout::PLATE_SLOTS[i],
                valid: false,
                problem: Some("past the end of the image".into()),
                generation: 0,
                plates: 0,
                pending: 0,
            },
            Some(t) => SlotReport {
                address: layout::PLATE_SLOTS[i],
                valid: t.check().is_ok(),
                problem: t.check().err().map(|e| format!("{e:?}")),
                generation: t.generation,
                plates: t.count,
                pending: t.pending_count,
            },
        };
        report.slots.push(slot);
    }
    if let [Some(a), Some(b)] = &tables[..] {
        report.committed = plate::committed([a, b]);
    }
    if let Some(table) = report.committed.and_then(|i| tables[i].as_ref()) {
        report.plates = table
            .plates()
            .iter()
            .map(|p| PlateReport {
                kind: kind_name(p.kind),
                id: p.id,
                src: p.src,
                pages: p.pages,
                areas: p.area,
                valid_area: match p.valid {
                    1 => "A",
                    2 => "B",
                    _ => "none",
                },
            })
            .collect();
        report.pending = table.pending().iter().map(|p| PendingReport { areas: p.area, pages: p.pages }).collect();
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{RngExt, SeedableRng};

    #[test]
    fn empty_truncated_blank_and_foreign_images_are_explained() {
        assert_eq!(inspect(&[]).verdict, "truncated");
        assert_eq!(inspect(&vec![0u8; layout::ROOT_HEADER as usize + 10]).verdict, "truncated");
        assert_eq!(inspect(&vec![0u8; 32 << 20]).verdict, "blank");
        let mut image = vec![0u8; 32 << 20];
        image[layout::ROOT_HEADER as usize..][..8].copy_from_slice(b"GARBAGE!");
        let report = inspect(&image);
        assert_eq!(report.verdict, "foreign");
        assert!(report.explanation.contains("--reformat"));
        let mut header = RootHeader::new(1);
        header.boot_count = 3;
        header.seal();
        image[layout::ROOT_HEADER as usize..][..HEADER_SIZE].copy_from_slice(&header.to_bytes());
        let report = inspect(&image);
        assert_eq!(report.verdict, "formatted");
        assert_eq!(report.header.as_ref().unwrap().boot_count, 3);
        assert_eq!(report.committed, None);
        image[layout::ROOT_HEADER as usize + 30] ^= 1;
        assert_eq!(inspect(&image).verdict, "corrupt");
        // The first copy torn during an update, the second whole: the kernel boots on it.
        image[layout::ROOT_HEADER_COPY as usize..][..HEADER_SIZE].copy_from_slice(&header.to_bytes());
        let report = inspect(&image);
        assert_eq!(report.verdict, "formatted");
        assert!(report.explanation.contains("torn"), "{}", report.explanation);
        assert_eq!(report.header.as_ref().unwrap().boot_count, 3);
    }

    #[test]
    fn random_and_truncated_bytes_never_panic() {
        let mut rng = SmallRng::seed_from_u64(0x2545_f491_4f6c_dd1d);
        let mut image = vec![0u8; 12 << 20];
        for round in 0..40 {
            // Garbage in the interesting places: the header, the slots, the tables.
            for at in [layout::ROOT_HEADER, layout::PLATE_SLOTS[0], layout::PLATE_SLOTS[1], layout::RESOURCES] {
                rng.fill(&mut image[at as usize..at as usize + 4096]);
            }
            if round % 3 == 0 {
                // A valid header, so that decoding goes on to the slots.
                let h = RootHeader::new(7);
                image[layout::ROOT_HEADER as usize..][..HEADER_SIZE].copy_from_slice(&h.to_bytes());
            }
            let cut = rng.random_range(0..image.len());
            let _ = inspect(&image);
            let _ = inspect(&image[..cut]);
        }
    }
}
