//! Decoding an image offline (`vmm inspect`): the root header, the plate table's two slots
//! and which one is committed, the plates and the deletion-pending list, the resource tables'
//! headers, and whether every checksum holds. Any bytes decode to a report, never a panic:
//! every offset is checked against the image's length first.
//!
//! It lives beside the records it decodes (host only: the `std` feature), so that a tool
//! reads an image with no part of the guest kernel's logic.
//!
//! Its verdict must agree with what `vmm boot` does with the same file ([`Boot`]): the VMM
//! refuses a size that is not RAM (`vmm::image::check_size`, by the same `layout` bounds),
//! and the guest (`nvm/root.rs`) refuses a header it cannot read, a layout that does not
//! fit the RAM, or damaged tables after a graceful shutdown. So the report is decided by
//! the same rules, in the same order.

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

/// What `vmm boot` does with an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Boot {
    /// A blank image is formatted; a crashed one with nothing committed starts afresh.
    #[serde(rename = "cold boot")]
    ColdBoot,
    /// After a graceful shutdown: the machine goes on where it stopped.
    #[serde(rename = "resume")]
    Resume,
    /// After a crash: the last committed write-out is restored.
    #[serde(rename = "restore")]
    Restore,
    /// The VMM or the guest refuses the image (`--reformat` starts it afresh).
    #[serde(rename = "refuse")]
    Refuse,
}

impl Boot {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ColdBoot => "cold boot",
            Self::Resume => "resume",
            Self::Restore => "restore",
            Self::Refuse => "refuse",
        }
    }
}

/// What an image holds, as far as it can be read.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The file's size: the guest's RAM size.
    pub size: u64,
    /// `formatted`, `blank`, `truncated`, `foreign`, `corrupt`.
    pub verdict: &'static str,
    /// Why, in words.
    pub explanation: String,
    /// What `vmm boot` does with the image; anything but `refuse` boots.
    pub boot: Boot,
    pub header: Option<HeaderReport>,
    pub resources_ok: Option<bool>,
    pub slots: Vec<SlotReport>,
    /// Index of the committed slot.
    pub committed: Option<usize>,
    pub plates: Vec<PlateReport>,
    pub pending: Vec<PendingReport>,
    /// The root header chosen, as the kernel reads it.
    #[serde(skip)]
    raw: Option<RootHeader>,
}

#[derive(Debug, Serialize)]
pub struct HeaderReport {
    pub format_version: u32,
    pub nvm_abi: u32,
    pub build_tag: String,
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

/// Why the VMM refuses an image of `size` bytes (as `vmm::image::check_size`): its verdict
/// and the reason.
fn size_problem(size: u64) -> Option<(&'static str, String)> {
    if !size.is_multiple_of(layout::PAGE_SIZE) {
        Some(("truncated", format!("{size} bytes are not a whole number of 4 KiB pages: the image was cut short")))
    } else if size < layout::MIN_RAM {
        Some((
            "truncated",
            format!("{size} bytes are fewer than the {} MiB of RAM the kernel needs", layout::MIN_RAM >> 20),
        ))
    } else if size > layout::MAX_RAM {
        Some(("foreign", format!("{size} bytes are more RAM than the {} GiB this machine has", layout::MAX_RAM >> 30)))
    } else {
        None
    }
}

/// Decodes `bytes`, the contents of a whole image.
pub fn inspect(bytes: &[u8]) -> Report {
    inspect_file(bytes, bytes.len() as u64)
}

/// Decodes an image of `size` bytes from `head`, its first bytes: everything decoded lies
/// below [`layout::FRAMES_BASE`], so a reader need not hold guest RAM beyond. The verdict
/// and [`Report::boot`] are what `vmm boot` makes of the file.
pub fn inspect_file(head: &[u8], size: u64) -> Report {
    let mut report = decode(head, size);
    if size == 0 {
        // `vmm boot` gives an empty file its size and formats it.
        report.verdict = "blank";
        report.explanation =
            "an empty file: `vmm boot` makes it a new image (of `--mem`, or 256 MiB) and formats it".into();
        report.boot = Boot::ColdBoot;
        return report;
    }
    report.boot = decide(&mut report, size);
    if report.boot != Boot::Refuse {
        return report;
    }
    if !report.explanation.contains("--reformat") {
        report.explanation.push_str("; `vmm boot` refuses it");
    }
    report
}

/// What the VMM, then the guest, decide for the image (`vmm::image::check_size`, then
/// `nvm::root::open` and the kernel's `decide`); turns the verdict to why it is refused.
fn decide(report: &mut Report, size: u64) -> Boot {
    if matches!(report.verdict, "foreign" | "corrupt" | "truncated") {
        return Boot::Refuse;
    }
    if let Some((verdict, why)) = size_problem(size) {
        report.verdict = verdict;
        report.explanation = why;
        return Boot::Refuse;
    }
    let Some(header) = &report.raw else {
        return Boot::ColdBoot; // blank
    };
    let available = (size - layout::FRAMES_BASE) / layout::PAGE_SIZE;
    if header.resources != layout::RESOURCES {
        report.verdict = "foreign";
        report.explanation = format!(
            "the root header puts the resource tables at {:#x}, this kernel at {:#x}: another layout",
            header.resources,
            layout::RESOURCES
        );
        return Boot::Refuse;
    }
    if header.frames > available {
        report.verdict = "truncated";
        report.explanation = format!(
            "the root header manages {} frames of 4 KiB, the image holds {available}: it was cut short \
             (or formatted with more RAM)",
            header.frames
        );
        return Boot::Refuse;
    }
    match ShutdownFlag::try_from(header.shutdown_flag) {
        Ok(ShutdownFlag::Normal) if report.resources_ok == Some(true) => Boot::Resume,
        Ok(ShutdownFlag::Normal) => {
            report.verdict = "corrupt";
            report.explanation = "the previous run shut down, but its resource tables do not check out".into();
            Boot::Refuse
        }
        Ok(ShutdownFlag::Abnormal) if report.committed.is_some() => Boot::Restore,
        Ok(ShutdownFlag::Abnormal) => Boot::ColdBoot,
        // `header::choose` read the flag: a bad one is a corrupt header, refused above.
        Err(_) => Boot::Refuse,
    }
}

/// Decodes what `head` holds, as far as it goes, before the boot's rules.
fn decode(bytes: &[u8], size: u64) -> Report {
    let mut report = Report {
        size,
        verdict: "corrupt",
        explanation: String::new(),
        boot: Boot::Refuse,
        raw: None,
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
    if report.verdict == "formatted" {
        report.raw = Some(header);
    }
    report.header = Some(HeaderReport {
        format_version: header.format_version,
        nvm_abi: header.nvm_abi,
        build_tag: format!("{:08x}", header.build_tag),
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
        // An empty file becomes a new image at boot.
        assert_eq!((inspect(&[]).verdict, inspect(&[]).boot), ("blank", Boot::ColdBoot));
        assert_eq!(inspect(&vec![0u8; layout::ROOT_HEADER as usize + 10]).verdict, "truncated");
        assert_eq!(inspect(&vec![0u8; 32 << 20]).verdict, "blank");
        assert_eq!(inspect(&vec![0u8; 32 << 20]).boot, Boot::ColdBoot);
        let mut image = vec![0u8; 32 << 20];
        image[layout::ROOT_HEADER as usize..][..8].copy_from_slice(b"GARBAGE!");
        let report = inspect(&image);
        assert_eq!(report.verdict, "foreign");
        assert!(report.explanation.contains("--reformat"));
        let mut header = RootHeader::new(1);
        header.boot_count = 3;
        header.resources = layout::RESOURCES;
        header.frames = (32 << 20) / layout::PAGE_SIZE - 4096;
        header.seal();
        image[layout::ROOT_HEADER as usize..][..HEADER_SIZE].copy_from_slice(&header.to_bytes());
        let report = inspect(&image);
        assert_eq!(report.verdict, "formatted");
        assert_eq!(report.header.as_ref().unwrap().boot_count, 3);
        assert_eq!(report.committed, None);
        assert_eq!(report.boot, Boot::ColdBoot, "a crash with nothing committed starts afresh");
        image[layout::ROOT_HEADER as usize + 30] ^= 1;
        assert_eq!(inspect(&image).verdict, "corrupt");
        assert_eq!(inspect(&image).boot, Boot::Refuse);
        // The first copy torn during an update, the second whole: the kernel boots on it.
        image[layout::ROOT_HEADER_COPY as usize..][..HEADER_SIZE].copy_from_slice(&header.to_bytes());
        let report = inspect(&image);
        assert_eq!(report.verdict, "formatted");
        assert!(report.explanation.contains("torn"), "{}", report.explanation);
        assert_eq!(report.header.as_ref().unwrap().boot_count, 3);
    }

    /// The sizes `vmm boot` refuses, and a header managing more frames than the file holds.
    #[test]
    fn sizes_and_layouts_boot_refuses_are_refused() {
        let at = layout::ROOT_HEADER as usize;
        let head = vec![0u8; layout::FRAMES_BASE as usize];
        for (size, verdict) in [
            (16 << 20, "truncated"),
            ((32 << 20) + 100, "truncated"),
            ((32 << 20) - 4096, "truncated"),
            (4 << 30, "foreign"),
        ] {
            let report = inspect_file(&head, size);
            assert_eq!((report.verdict, report.boot), (verdict, Boot::Refuse), "{size}: {}", report.explanation);
        }
        assert_eq!(inspect_file(&head, 32 << 20).boot, Boot::ColdBoot);
        let mut header = RootHeader::new(1);
        header.resources = layout::RESOURCES;
        header.frames = (64 << 20) / layout::PAGE_SIZE - 4096;
        header.seal();
        let mut image = head.clone();
        image[at..][..HEADER_SIZE].copy_from_slice(&header.to_bytes());
        assert_eq!(inspect_file(&image, 64 << 20).boot, Boot::ColdBoot);
        let report = inspect_file(&image, 48 << 20);
        assert_eq!((report.verdict, report.boot), ("truncated", Boot::Refuse), "{}", report.explanation);
        // After a graceful shutdown the tables must check out.
        header.shutdown_flag = ShutdownFlag::Normal.into();
        header.seal();
        image[at..][..HEADER_SIZE].copy_from_slice(&header.to_bytes());
        let report = inspect_file(&image, 64 << 20);
        assert_eq!((report.verdict, report.boot), ("corrupt", Boot::Refuse), "{}", report.explanation);
        // Another kernel's layout.
        header.resources += 4096;
        header.seal();
        image[at..][..HEADER_SIZE].copy_from_slice(&header.to_bytes());
        assert_eq!(inspect_file(&image, 64 << 20).verdict, "foreign");
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
