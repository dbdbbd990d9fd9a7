//! Programs built byte by byte: every refusal the loader promises, and what it accepts.

use super::*;

/// `(p_type, p_flags, p_offset, p_vaddr, p_filesz, p_memsz)`.
type Phdr = (u32, u32, u64, u64, u64, u64);

const TEXT: Phdr = (PT_LOAD, elf::abi::PF_R | PF_X, 0x1000, PROGRAM_BASE, 0x800, 0x800);
const DATA: Phdr = (PT_LOAD, elf::abi::PF_R | PF_W, 0x2000, PROGRAM_BASE + 0x1000, 0x10, 0x3000);

/// An ELF64 executable for x86-64 with these program headers and 12 KiB of file.
fn build(phdrs: &[Phdr], entry: u64) -> Vec<u8> {
    let mut file = vec![0u8; 0x3000];
    file[..4].copy_from_slice(b"\x7fELF");
    file[4] = 2; // ELFCLASS64
    file[5] = 1; // little endian
    file[6] = 1; // EV_CURRENT
    let put16 = |f: &mut Vec<u8>, at: usize, v: u16| f[at..at + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |f: &mut Vec<u8>, at: usize, v: u32| f[at..at + 4].copy_from_slice(&v.to_le_bytes());
    let put64 = |f: &mut Vec<u8>, at: usize, v: u64| f[at..at + 8].copy_from_slice(&v.to_le_bytes());
    put16(&mut file, 16, ET_EXEC);
    put16(&mut file, 18, EM_X86_64);
    put32(&mut file, 20, 1);
    put64(&mut file, 24, entry);
    put64(&mut file, 32, 64); // e_phoff
    put16(&mut file, 52, 64); // e_ehsize
    put16(&mut file, 54, 56); // e_phentsize
    put16(&mut file, 56, phdrs.len() as u16);
    put16(&mut file, 58, 64); // e_shentsize
    for (i, &(kind, flags, offset, vaddr, filesz, memsz)) in phdrs.iter().enumerate() {
        let at = 64 + i * 56;
        put32(&mut file, at, kind);
        put32(&mut file, at + 4, flags);
        put64(&mut file, at + 8, offset);
        put64(&mut file, at + 16, vaddr);
        put64(&mut file, at + 24, vaddr);
        put64(&mut file, at + 32, filesz);
        put64(&mut file, at + 40, memsz);
        put64(&mut file, at + 48, 0x1000);
    }
    file
}

fn good() -> Vec<u8> {
    build(&[TEXT, DATA], PROGRAM_BASE + 0x10)
}

#[test]
fn a_two_segment_program_is_described_as_it_will_be_loaded() {
    let program = check(&good()).expect("accepted");
    assert_eq!(program.entry, PROGRAM_BASE + 0x10);
    assert_eq!(program.segments().len(), 2);
    let [text, data] = [program.segments[0], program.segments[1]];
    assert_eq!((text.vaddr, text.pages, text.file_offset, text.file_len), (PROGRAM_BASE, 1, 0x1000, 0x800));
    assert!(text.executable && !text.writable);
    assert_eq!((data.vaddr, data.pages, data.file_len), (PROGRAM_BASE + 0x1000, 3, 0x10));
    assert!(data.writable && !data.executable);
    assert_eq!(program.memory_bytes(), 4 * 4096);
}

#[test]
fn a_segment_not_on_a_page_boundary_keeps_its_offset_in_the_page() {
    let text = (PT_LOAD, PF_X, 0x1010, PROGRAM_BASE + 0x10, 0x20, 0x20);
    let program = check(&build(&[text], PROGRAM_BASE + 0x10)).expect("accepted");
    assert_eq!(program.segments[0].start_in_page, 0x10);
    assert_eq!(program.segments[0].vaddr, PROGRAM_BASE);
}

#[test]
fn truncated_files_are_refused_at_every_length() {
    let file = good();
    // Cut inside the file header, inside the program headers, and inside a segment's bytes.
    for len in [0, 3, 4, 16, 63, 64, 100, 64 + 56 + 10, 0x1400, 0x2008] {
        assert!(check(&file[..len]).is_err(), "a file cut to {len} bytes was accepted");
    }
    assert_eq!(check(&file[..0x1400]), Err(ProgramError::FileRange(0)));
    assert_eq!(check(&file[..0x2008]), Err(ProgramError::FileRange(1)));
}

#[test]
fn another_class_endianness_machine_or_type_is_refused() {
    let mut file = good();
    file[4] = 1;
    assert_eq!(check(&file), Err(ProgramError::NotElf64));
    let mut file = good();
    file[5] = 2;
    assert_eq!(check(&file), Err(ProgramError::NotElf64));
    let mut file = good();
    file[18..20].copy_from_slice(&40u16.to_le_bytes()); // EM_ARM
    assert_eq!(check(&file), Err(ProgramError::WrongMachine(40)));
    let mut file = good();
    file[16..18].copy_from_slice(&3u16.to_le_bytes()); // ET_DYN
    assert_eq!(check(&file), Err(ProgramError::NotExecutable(3)));
    assert_eq!(check(b"#!/bin/sh\necho not an ELF file\n"), Err(ProgramError::Malformed));
}

#[test]
fn segments_outside_the_window_are_refused() {
    let kernel = crate::layout::ROOT_HEADER;
    for vaddr in [0, 0x40_0000, kernel, PROGRAM_BASE - 0x1000, PROGRAM_END, u64::MAX - 0xfff] {
        let text = (PT_LOAD, PF_X, 0x1000, vaddr, 0x10, 0x10);
        assert_eq!(check(&build(&[text], vaddr)), Err(ProgramError::OutsideWindow(0)), "at {vaddr:#x}");
    }
    // One that starts inside and ends outside, and one whose end overflows.
    let long = (PT_LOAD, PF_X, 0x1000, PROGRAM_END - 0x1000, 0x10, 0x2000);
    assert_eq!(check(&build(&[long], PROGRAM_END - 0x1000)), Err(ProgramError::OutsideWindow(0)));
    let wraps = (PT_LOAD, PF_X, 0x1000, PROGRAM_BASE, 0x10, u64::MAX);
    assert_eq!(check(&build(&[wraps], PROGRAM_BASE)), Err(ProgramError::OutsideWindow(0)));
}

#[test]
fn overlapping_or_page_sharing_segments_are_refused() {
    let same_page = (PT_LOAD, elf::abi::PF_R | PF_W, 0x1800, PROGRAM_BASE + 0x800, 0x10, 0x10);
    assert_eq!(check(&build(&[TEXT, same_page], PROGRAM_BASE)), Err(ProgramError::Overlap(1)));
    let over = (PT_LOAD, elf::abi::PF_R, 0x2000, PROGRAM_BASE + 0x2000, 0x10, 0x10);
    assert_eq!(check(&build(&[TEXT, DATA, over], PROGRAM_BASE)), Err(ProgramError::Overlap(2)));
}

#[test]
fn a_huge_memory_size_is_refused_before_anything_is_allocated() {
    let huge = (PT_LOAD, elf::abi::PF_R | PF_W, 0x2000, PROGRAM_BASE + 0x1000, 0x10, MAX_IMAGE_BYTES);
    assert_eq!(check(&build(&[TEXT, huge], PROGRAM_BASE)), Err(ProgramError::TooLarge));
    // Just fitting is fine.
    let fits = (PT_LOAD, elf::abi::PF_R | PF_W, 0x2000, PROGRAM_BASE + 0x1000, 0x10, MAX_IMAGE_BYTES - 0x1000);
    assert!(check(&build(&[TEXT, fits], PROGRAM_BASE)).is_ok());
}

#[test]
fn file_bytes_beyond_the_file_or_beyond_memory_are_refused() {
    let beyond = (PT_LOAD, PF_X, 0x2f00, PROGRAM_BASE, 0x200, 0x200);
    assert_eq!(check(&build(&[beyond], PROGRAM_BASE)), Err(ProgramError::FileRange(0)));
    let more_than_memory = (PT_LOAD, PF_X, 0x1000, PROGRAM_BASE, 0x200, 0x100);
    assert_eq!(check(&build(&[more_than_memory], PROGRAM_BASE)), Err(ProgramError::FileRange(0)));
    let wraps = (PT_LOAD, PF_X, u64::MAX, PROGRAM_BASE, 2, 2);
    assert_eq!(check(&build(&[wraps], PROGRAM_BASE)), Err(ProgramError::FileRange(0)));
}

#[test]
fn zero_segments_too_many_or_dynamic_ones_are_refused() {
    assert_eq!(check(&build(&[], PROGRAM_BASE)), Err(ProgramError::NoSegments));
    let note = (elf::abi::PT_NOTE, 0, 0x1000, 0, 0x10, 0x10);
    assert_eq!(check(&build(&[note], PROGRAM_BASE)), Err(ProgramError::NoSegments));
    let many: Vec<Phdr> =
        (0..=MAX_SEGMENTS as u64).map(|i| (PT_LOAD, PF_X, 0x1000, PROGRAM_BASE + i * 0x1000, 0x10, 0x10)).collect();
    assert_eq!(check(&build(&many, PROGRAM_BASE)), Err(ProgramError::TooManySegments));
    let interp = (PT_INTERP, 0, 0x1000, 0, 0x10, 0x10);
    assert_eq!(check(&build(&[interp, TEXT], PROGRAM_BASE)), Err(ProgramError::Dynamic));
    let dynamic = (PT_DYNAMIC, 0, 0x1000, 0, 0x10, 0x10);
    assert_eq!(check(&build(&[TEXT, dynamic], PROGRAM_BASE)), Err(ProgramError::Dynamic));
}

#[test]
fn writable_code_and_an_entry_outside_the_code_are_refused() {
    let wx = (PT_LOAD, PF_W | PF_X, 0x1000, PROGRAM_BASE, 0x10, 0x10);
    assert_eq!(check(&build(&[wx], PROGRAM_BASE)), Err(ProgramError::WritableAndExecutable(0)));
    let data_entry = PROGRAM_BASE + 0x1000;
    assert_eq!(check(&build(&[TEXT, DATA], data_entry)), Err(ProgramError::BadEntry(data_entry)));
    assert_eq!(check(&build(&[TEXT], 0x1000)), Err(ProgramError::BadEntry(0x1000)));
}

#[test]
fn every_error_survives_the_wire() {
    let all = [
        ProgramError::Malformed,
        ProgramError::NotElf64,
        ProgramError::WrongMachine(40),
        ProgramError::NotExecutable(3),
        ProgramError::Dynamic,
        ProgramError::NoSegments,
        ProgramError::TooManySegments,
        ProgramError::OutsideWindow(3),
        ProgramError::FileRange(1),
        ProgramError::Overlap(2),
        ProgramError::WritableAndExecutable(0),
        ProgramError::TooLarge,
        ProgramError::BadEntry(0x1234),
        ProgramError::NoMemory,
        ProgramError::Misplaced(0xc000_0000),
        ProgramError::ArgsTooLong,
    ];
    for e in all {
        assert_eq!(ProgramError::from_code(e.code(), e.detail()), Some(e));
    }
    assert_eq!(ProgramError::from_code(0, 0), None);
    assert_eq!(ProgramError::from_code(99, 0), None);
}

#[test]
fn random_edits_of_the_headers_never_panic() {
    use rand::{RngExt, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let base = good();
    for _ in 0..5000 {
        let mut file = base.clone();
        for _ in 0..rng.random_range(1..8) {
            let at = rng.random_range(0..64 + 2 * 56);
            file[at] = rng.random();
        }
        let _ = check(&file);
        let len = rng.random_range(0..file.len());
        let _ = check(&file[..len]);
    }
}
