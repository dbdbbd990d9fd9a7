//! Fuzz targets for every input the VMM decodes from outside: a control request line, the
//! guest command line, an image file, and the records a guest writes into its RAM for the
//! machine-control device, the copy engine, the persist barrier and virtio-blk.
//!
//! Each target is a plain function of bytes, so that it runs three ways:
//! - coverage-guided, with `cargo +nightly fuzz run TARGET` (the `fuzz_targets/` binaries,
//!   feature `libfuzzer`);
//! - bounded, on stable, in `cargo test -p fuzz`: each target over its checked-in corpus
//!   (`corpus/TARGET/`) and a few thousand seeded random and mutated inputs;
//! - as regression tests: a finding is added to the corpus, where the bounded run keeps it.
//!
//! Besides "no panic", every target holds the VMM to its bound on memory: the heap a
//! single input makes the decoder use is counted ([`alloc_bound`]) and must stay under
//! [`MAX_HEAP_PER_INPUT`], whatever the input says its sizes are.

mod alloc_bound;
mod devices_targets;

pub use alloc_bound::MAX_HEAP_PER_INPUT;
pub use devices_targets::{copy_engine, machine_control, persist_barrier, virtio_blk};

/// A control socket request line (`vmm::api::parse`): refused with an error or parsed,
/// and a parsed request says the same once written out and read again.
pub fn control_request(data: &[u8]) {
    alloc_bound::within(|| {
        let Ok(line) = std::str::from_utf8(data) else { return };
        if let Ok(request) = vmm::api::parse(line) {
            let text = serde_json::to_string(&request).expect("a request serializes");
            assert_eq!(vmm::api::parse(&text).as_ref(), Ok(&request), "{text}");
        }
    })
}

/// The guest command line, as the VMM checks it and the guest parses it: the check
/// accepts exactly the lines the parser reports nothing of.
pub fn cmdline(data: &[u8]) {
    alloc_bound::within(|| {
        let Ok(line) = std::str::from_utf8(data) else { return };
        let mut reported = 0;
        let parsed = nvram::cmdline::Cmdline::parse(line, |_| reported += 1);
        match vmm::config::validate_cmdline(line) {
            Ok(checked) => {
                assert_eq!(reported, 0, "{line:?}");
                assert_eq!(checked, parsed);
            }
            Err(_) => assert!(reported > 0, "{line:?}"),
        }
    })
}

/// An image file (`vmm inspect`), as its head (everything decoded lies below
/// `nvram::layout::FRAMES_BASE`): the input's first two bytes choose the file's size in
/// MiB, the next 4 KiB are the root header's page, the rest the first plate-table slot;
/// any bytes give a report, and the report serializes. Returns whether the root header
/// decoded (the seeds' check that they get past the first refusal).
pub fn image(data: &[u8]) -> bool {
    use nvram::layout::{FRAMES_BASE, PLATE_SLOTS, ROOT_HEADER};
    thread_local! {
        static HEAD: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; FRAMES_BASE as usize]);
    }
    let (size, rest) = match data {
        [a, b, rest @ ..] => (u64::from(u16::from_le_bytes([*a, *b])) << 20, rest),
        _ => (0, data),
    };
    let (header, slot) = rest.split_at(rest.len().min(4096));
    HEAD.with(|head| {
        let mut head = head.borrow_mut();
        let slot = &slot[..slot.len().min(head.len() - PLATE_SLOTS[0] as usize)];
        let places = [(ROOT_HEADER as usize, header), (PLATE_SLOTS[0] as usize, slot)];
        for (at, bytes) in places {
            head[at..at + bytes.len()].copy_from_slice(bytes);
        }
        let decoded = alloc_bound::within(|| {
            let report = nvram::inspect::inspect_file(&head, size);
            serde_json::to_string(&report).expect("a report serializes");
            report.header.is_some()
        });
        for (at, bytes) in places {
            head[at..at + bytes.len()].fill(0);
        }
        decoded
    })
}

/// A plate-store disk (`vmm inspect --disk`), as its head (the superblock and both slots):
/// the input's first two bytes choose the disk's size in 64 KiB units, the next sector is
/// the superblock, the rest the first commit slot; any bytes give a report that serializes,
/// and the check runs on them too. Returns whether a superblock decoded (the seeds' check).
pub fn disk(data: &[u8]) -> bool {
    use nvram::disk::{SECTOR, SLOTS};
    use nvram::disk_inspect::HEAD;
    thread_local! {
        static HEAD_BYTES: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; HEAD as usize]);
    }
    let (size, rest) = match data {
        [a, b, rest @ ..] => (u64::from(u16::from_le_bytes([*a, *b])) << 16, rest),
        _ => (0, data),
    };
    let (sector, slot) = rest.split_at(rest.len().min(SECTOR as usize));
    HEAD_BYTES.with(|head| {
        let mut head = head.borrow_mut();
        let slot = &slot[..slot.len().min(head.len() - SLOTS[0] as usize)];
        let places = [(0, sector), (SLOTS[0] as usize, slot)];
        for (at, bytes) in places {
            head[at..at + bytes.len()].copy_from_slice(bytes);
        }
        let decoded = alloc_bound::within(|| {
            let report = nvram::disk_inspect::inspect_disk(&head, size);
            serde_json::to_string(&report).expect("a report serializes");
            let _ = nvram::disk_inspect::check_disk(&head);
            report.superblock.is_some()
        });
        for (at, bytes) in places {
            head[at..at + bytes.len()].fill(0);
        }
        decoded
    })
}

/// A user program's ELF file, as the kernel's loader checks it (`nvram::program::check`,
/// the very function the guest runs): any bytes are refused or accepted, and what is
/// accepted is what the loader may place without further thought: every segment inside the
/// program window, on pages of its own, its file bytes inside the file, never writable and
/// executable, all of them within the size cap, the entry in code. Returns whether the
/// file was accepted (the seeds' check).
pub fn program(data: &[u8]) -> bool {
    use nvram::abi::{MAX_IMAGE_BYTES, PROGRAM_BASE, PROGRAM_END};
    alloc_bound::within(|| {
        let Ok(program) = nvram::program::check(data) else { return false };
        let segments = program.segments();
        assert!(!segments.is_empty() && segments.len() <= nvram::abi::MAX_SEGMENTS);
        for (i, s) in segments.iter().enumerate() {
            let end = s.vaddr + s.pages * 4096;
            assert!(s.vaddr % 4096 == 0 && s.vaddr >= PROGRAM_BASE && end <= PROGRAM_END, "{s:?}");
            assert!(s.start_in_page < 4096 && s.start_in_page + s.file_len <= s.pages * 4096, "{s:?}");
            assert!((s.file_offset + s.file_len) as usize <= data.len(), "{s:?}");
            assert!(!(s.writable && s.executable), "{s:?}");
            for t in &segments[..i] {
                assert!(end <= t.vaddr || t.vaddr + t.pages * 4096 <= s.vaddr, "{s:?} overlaps {t:?}");
            }
        }
        assert!(program.memory_bytes() <= MAX_IMAGE_BYTES);
        let entry = program.entry;
        assert!(segments.iter().any(|s| s.executable && entry >= s.vaddr && entry < s.vaddr + s.pages * 4096));
        true
    })
}

/// Seeded random and mutated inputs for the bounded runs.
pub fn inputs(corpus: &[Vec<u8>], count: usize, seed: u64) -> impl Iterator<Item = Vec<u8>> + '_ {
    use rand::rngs::SmallRng;
    use rand::{RngExt, SeedableRng};
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..count).map(move |i| {
        let base = (!corpus.is_empty() && i % 2 == 0).then(|| corpus[i % corpus.len()].clone());
        match base {
            Some(mut input) if !input.is_empty() => {
                // Flip, overwrite or cut a few bytes of a corpus entry.
                for _ in 0..rng.random_range(1..8) {
                    let at = rng.random_range(0..input.len());
                    match rng.random_range(0..4) {
                        0 => input[at] ^= 1 << rng.random_range(0..8),
                        1 => input[at] = rng.random(),
                        2 => input.truncate(at.max(1)),
                        _ => input.insert(at, rng.random()),
                    }
                }
                input
            }
            _ => {
                let len = rng.random_range(0..512);
                (0..len).map(|_| rng.random()).collect()
            }
        }
    })
}

#[cfg(test)]
mod bounded;
#[cfg(test)]
mod seeds;
