//! Checking a user program before the kernel loads it: the ELF file is the user's, so
//! nothing in it is trusted.
//!
//! [`check`] reads the file with the `elf` crate (no_std, no allocation) and accepts only
//! what the loader can place without further thought (`crate::abi` has the rules): an ELF64
//! x86-64 little-endian executable (`ET_EXEC`), no interpreter and no dynamic section,
//! one to [`MAX_SEGMENTS`] `PT_LOAD` segments, each with its file bytes inside the file,
//! its memory inside [`PROGRAM_BASE`]`..`[`PROGRAM_END`], page-aligned in the address
//! space, on pages of its own (two segments never share a page, since a page has one set
//! of permissions), never writable and executable at once, at most [`MAX_IMAGE_BYTES`] in
//! all, and the entry point inside an executable segment. The result describes the
//! segments so that the loader only copies bytes; the same function runs in the kernel,
//! in the host's tests and under the fuzzer.

use elf::abi::{EM_X86_64, ET_EXEC, PF_W, PF_X, PT_DYNAMIC, PT_INTERP, PT_LOAD};
use elf::endian::LittleEndian;
use elf::file::Class;
use elf::ElfBytes;

use crate::abi::{MAX_ARGS_LEN, MAX_IMAGE_BYTES, MAX_SEGMENTS, PROGRAM_BASE, PROGRAM_END};

const PAGE: u64 = 4096;

/// One segment to load: `memory` bytes at `vaddr` (a page boundary), of which the first
/// `file_len` come from the file at `file_offset`, the rest zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Segment {
    pub vaddr: u64,
    pub pages: u64,
    /// Offset of the segment's first byte in the address space from `vaddr`.
    pub start_in_page: u64,
    pub file_offset: u64,
    pub file_len: u64,
    pub writable: bool,
    pub executable: bool,
}

/// A program that passed [`check`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Program {
    pub entry: u64,
    pub segments: [Segment; MAX_SEGMENTS],
    pub count: usize,
}

impl Program {
    pub fn segments(&self) -> &[Segment] {
        &self.segments[..self.count]
    }

    /// Bytes of memory the segments occupy, in whole pages.
    pub fn memory_bytes(&self) -> u64 {
        self.segments().iter().map(|s| s.pages * PAGE).sum()
    }
}

/// Why a program was refused. The code ([`ProgramError::code`]) goes to the VMM in a
/// machine-control report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProgramError {
    #[error("not an ELF file, or its headers are cut short or out of the file")]
    Malformed,
    #[error("not a 64-bit little-endian ELF file")]
    NotElf64,
    #[error("built for machine {0}, not x86-64 ({EM_X86_64})")]
    WrongMachine(u16),
    #[error("of ELF type {0}: only a static executable (ET_EXEC) can be loaded")]
    NotExecutable(u16),
    #[error("it asks for a dynamic loader (PT_INTERP or PT_DYNAMIC): only static programs run here")]
    Dynamic,
    #[error("it has no loadable segment")]
    NoSegments,
    #[error("it has more than {MAX_SEGMENTS} loadable segments")]
    TooManySegments,
    #[error("segment {0} lies outside the user program window {PROGRAM_BASE:#x}..{PROGRAM_END:#x}")]
    OutsideWindow(usize),
    #[error("segment {0}'s file bytes lie outside the file, or exceed its size in memory")]
    FileRange(usize),
    #[error("segment {0} shares a page with another segment")]
    Overlap(usize),
    #[error("segment {0} is both writable and executable")]
    WritableAndExecutable(usize),
    #[error("its segments need more than {} MiB", MAX_IMAGE_BYTES >> 20)]
    TooLarge,
    #[error("its entry point {0:#x} is not in an executable segment")]
    BadEntry(u64),
    // Not about the file: what loading it met.
    #[error("NVM has no room for its segments and stack (frames or resource tables are used up)")]
    NoMemory,
    #[error("the boot module at {0:#x} lies in memory the kernel owns (it must be above the frame area)")]
    Misplaced(u64),
    #[error("its argument string is longer than {MAX_ARGS_LEN} bytes")]
    ArgsTooLong,
}

impl ProgramError {
    /// A stable number for the wire (the VMM names it back with [`ProgramError::from_code`]).
    pub fn code(&self) -> u32 {
        match self {
            Self::Malformed => 1,
            Self::NotElf64 => 2,
            Self::WrongMachine(_) => 3,
            Self::NotExecutable(_) => 4,
            Self::Dynamic => 5,
            Self::NoSegments => 6,
            Self::TooManySegments => 7,
            Self::OutsideWindow(_) => 8,
            Self::FileRange(_) => 9,
            Self::Overlap(_) => 10,
            Self::WritableAndExecutable(_) => 11,
            Self::TooLarge => 12,
            Self::BadEntry(_) => 13,
            Self::NoMemory => 14,
            Self::Misplaced(_) => 15,
            Self::ArgsTooLong => 16,
        }
    }

    /// The error a code and its detail (a segment index, a machine, a type or an address)
    /// stand for; `None` for a code no kernel sends.
    pub fn from_code(code: u32, detail: u64) -> Option<Self> {
        let index = detail as usize;
        Some(match code {
            1 => Self::Malformed,
            2 => Self::NotElf64,
            3 => Self::WrongMachine(detail as u16),
            4 => Self::NotExecutable(detail as u16),
            5 => Self::Dynamic,
            6 => Self::NoSegments,
            7 => Self::TooManySegments,
            8 => Self::OutsideWindow(index),
            9 => Self::FileRange(index),
            10 => Self::Overlap(index),
            11 => Self::WritableAndExecutable(index),
            12 => Self::TooLarge,
            13 => Self::BadEntry(detail),
            14 => Self::NoMemory,
            15 => Self::Misplaced(detail),
            16 => Self::ArgsTooLong,
            _ => return None,
        })
    }

    /// The detail [`ProgramError::from_code`] takes back.
    pub fn detail(&self) -> u64 {
        match *self {
            Self::WrongMachine(m) | Self::NotExecutable(m) => u64::from(m),
            Self::OutsideWindow(i) | Self::FileRange(i) | Self::Overlap(i) | Self::WritableAndExecutable(i) => i as u64,
            Self::BadEntry(addr) | Self::Misplaced(addr) => addr,
            _ => 0,
        }
    }
}

/// Checks `file` as a user program and describes its segments.
pub fn check(file: &[u8]) -> Result<Program, ProgramError> {
    // Class and byte order first: the parser would read another class's header as garbage.
    if let [0x7f, b'E', b'L', b'F', class, data, ..] = *file {
        if class != elf::abi::ELFCLASS64 || data != elf::abi::ELFDATA2LSB {
            return Err(ProgramError::NotElf64);
        }
    }
    let elf = ElfBytes::<LittleEndian>::minimal_parse(file).map_err(|e| match e {
        elf::ParseError::UnsupportedElfClass(_) | elf::ParseError::UnsupportedElfEndianness(_) => {
            ProgramError::NotElf64
        }
        _ => ProgramError::Malformed,
    })?;
    let header = &elf.ehdr;
    if header.class != Class::ELF64 {
        return Err(ProgramError::NotElf64);
    }
    if header.e_machine != EM_X86_64 {
        return Err(ProgramError::WrongMachine(header.e_machine));
    }
    if header.e_type != ET_EXEC {
        return Err(ProgramError::NotExecutable(header.e_type));
    }
    let table = elf.segments().ok_or(ProgramError::NoSegments)?;
    let mut program = Program { entry: header.e_entry, segments: [Segment::default(); MAX_SEGMENTS], count: 0 };
    let mut total = 0u64;
    for header in table.iter() {
        match header.p_type {
            PT_INTERP | PT_DYNAMIC => return Err(ProgramError::Dynamic),
            PT_LOAD => {}
            _ => continue,
        }
        let index = program.count;
        if index == MAX_SEGMENTS {
            return Err(ProgramError::TooManySegments);
        }
        let end = header.p_vaddr.checked_add(header.p_memsz).ok_or(ProgramError::OutsideWindow(index))?;
        if header.p_memsz == 0 || header.p_vaddr < PROGRAM_BASE || end > PROGRAM_END {
            return Err(ProgramError::OutsideWindow(index));
        }
        let file_end = header.p_offset.checked_add(header.p_filesz);
        if header.p_filesz > header.p_memsz || file_end.is_none_or(|e| e > file.len() as u64) {
            return Err(ProgramError::FileRange(index));
        }
        let writable = header.p_flags & PF_W != 0;
        let executable = header.p_flags & PF_X != 0;
        if writable && executable {
            return Err(ProgramError::WritableAndExecutable(index));
        }
        let first = header.p_vaddr & !(PAGE - 1);
        let pages = (end - first).div_ceil(PAGE);
        total += pages * PAGE;
        if total > MAX_IMAGE_BYTES {
            return Err(ProgramError::TooLarge);
        }
        let segment = Segment {
            vaddr: first,
            pages,
            start_in_page: header.p_vaddr - first,
            file_offset: header.p_offset,
            file_len: header.p_filesz,
            writable,
            executable,
        };
        let clash =
            program.segments().iter().any(|s| first < s.vaddr + s.pages * PAGE && s.vaddr < first + pages * PAGE);
        if clash {
            return Err(ProgramError::Overlap(index));
        }
        program.segments[index] = segment;
        program.count += 1;
    }
    if program.count == 0 {
        return Err(ProgramError::NoSegments);
    }
    let entry = program.entry;
    let runs = program
        .segments()
        .iter()
        .any(|s| s.executable && entry >= s.vaddr + s.start_in_page && entry < s.vaddr + s.pages * PAGE);
    if !runs {
        return Err(ProgramError::BadEntry(entry));
    }
    Ok(program)
}

#[cfg(test)]
mod tests;
