//! The root header: the one structure at a fixed physical address ([`crate::layout::ROOT_HEADER`])
//! from which the guest kernel finds everything it keeps in NVM.
//!
//! | offset | size | field            | meaning                                                   |
//! |--------|------|------------------|-----------------------------------------------------------|
//! | 0      | 8    | `magic`          | `b"TNDRNVM\0"`; all zeros means a blank image              |
//! | 8      | 4    | `format_version` | [`FORMAT_VERSION`] of the kernel that formatted it         |
//! | 12     | 4    | `header_size`    | [`HEADER_SIZE`], checked before anything else is read      |
//! | 16     | 4    | `nvm_abi`        | [`crate::abi::NVM_ABI_VERSION`] of the kernel that wrote it |
//! | 20     | 4    | `build_tag`      | a hash of that kernel's sources: shown, never compared     |
//! | 24     | 8    | `boot_count`     | boots of this image, this one included                     |
//! | 32     | 4    | `shutdown_flag`  | [`ShutdownFlag`]: how the previous run ended               |
//! | 36     | 4    | `reserved`       | zero                                                       |
//! | 40     | 8    | `resources`      | physical address of the resource tables                   |
//! | 48     | 8    | `frame_bitmap`   | physical address of the frame bitmap                      |
//! | 56     | 8    | `frames_base`    | physical address of the first managed frame               |
//! | 64     | 8    | `frames`         | number of managed frames                                  |
//! | 72     | 8    | `generation`     | generation of the last committed write-out (0: none)      |
//! | 80     | 8    | `plate_table`    | physical address of the plate table (0: none)             |
//! | 88     | 4    | `checksum`       | CRC-32 (IEEE) of bytes 0..88                               |
//! | 92     | 4    | `reserved2`      | zero                                                       |
//!
//! A header is trusted only when magic, version, size and checksum all hold; a kernel
//! continues an image only if its NVM ABI version is its own. Which build wrote it does
//! not matter: the programs are the image's, not the kernel's, so a kernel built from
//! other sources (a fix, a new banner) continues an image of the same ABI. Anything else is reported, never
//! silently reformatted; only a blank image is formatted without being asked.
//!
//! The header is kept twice ([`crate::layout::ROOT_HEADER`] and
//! [`crate::layout::ROOT_HEADER_COPY`]): an update is far larger than the 8 bytes a CPU
//! stores atomically, and a power failure in its middle must not leave an image that cannot
//! be opened. The second copy is written and made durable first, then the first copy; a
//! reader takes the first copy if it holds, else the second ([`choose`]). Either way it gets
//! the header as it was before the update or as it is after it, never a mix.

use num_enum::{IntoPrimitive, TryFromPrimitive};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Magic bytes at the start of a formatted image's root header.
pub const MAGIC: [u8; 8] = *b"TNDRNVM\0";

/// Version of the image format. Bumped at every incompatible change of any structure kept
/// in NVM; a kernel refuses to resume an image of another version.
pub const FORMAT_VERSION: u32 = 6;

/// How the previous run of the kernel on this image ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, TryFromPrimitive, IntoPrimitive, strum::IntoStaticStr)]
#[strum(serialize_all = "lowercase")]
#[repr(u32)]
pub enum ShutdownFlag {
    /// Set during boot: if it is still there at the next boot, the machine stopped abruptly.
    Abnormal = 0,
    /// Set by a graceful shutdown, last.
    Normal = 1,
}

/// The root header, as laid out in NVM (see the module docs for offsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct RootHeader {
    pub magic: [u8; 8],
    pub format_version: u32,
    pub header_size: u32,
    pub nvm_abi: u32,
    pub build_tag: u32,
    pub boot_count: u64,
    pub shutdown_flag: u32,
    pub reserved: u32,
    pub resources: u64,
    pub frame_bitmap: u64,
    pub frames_base: u64,
    pub frames: u64,
    pub generation: u64,
    pub plate_table: u64,
    pub checksum: u32,
    pub reserved2: u32,
}

/// Size of the header in NVM, in bytes.
pub const HEADER_SIZE: usize = 96;
const CHECKED_LEN: usize = 88;
const _: () = assert!(core::mem::size_of::<RootHeader>() == HEADER_SIZE);

/// Why a root header cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// All bytes are zero: a new image that was never formatted.
    #[error("the image is blank (never formatted)")]
    Blank,
    /// The magic is wrong: not an image of ours, or overwritten.
    #[error("the root header has no valid magic: not an image of this machine")]
    BadMagic,
    /// Formatted by a kernel with another image format.
    #[error("the image has format version {found}, this kernel reads version {FORMAT_VERSION}")]
    Version { found: u32 },
    /// The header size field disagrees with this format's header.
    #[error("the root header claims {found} bytes, expected {HEADER_SIZE}")]
    Size { found: u32 },
    /// The checksum does not match: a torn or corrupted header.
    #[error("the root header checksum is {stored:#010x}, its bytes give {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    /// The shutdown flag holds a value no kernel writes.
    #[error("the shutdown flag holds {found}, which no kernel writes")]
    Flag { found: u32 },
}

impl RootHeader {
    /// A freshly formatted header for this format version and NVM ABI, written by the
    /// kernel build `build_tag`.
    pub fn new(build_tag: u32) -> Self {
        let mut header = Self {
            magic: MAGIC,
            format_version: FORMAT_VERSION,
            header_size: HEADER_SIZE as u32,
            nvm_abi: crate::abi::NVM_ABI_VERSION,
            build_tag,
            shutdown_flag: ShutdownFlag::Abnormal.into(),
            ..Self::default()
        };
        header.seal();
        header
    }

    /// The header's bytes, as stored in NVM (little endian, no padding: the struct's own).
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        zerocopy::transmute!(*self)
    }

    /// Reads a header from its stored bytes, without checking it.
    pub fn from_bytes(bytes: &[u8; HEADER_SIZE]) -> Self {
        zerocopy::transmute!(*bytes)
    }

    /// The checksum the header's other fields call for.
    pub fn compute_checksum(&self) -> u32 {
        crc32(&self.to_bytes()[..CHECKED_LEN])
    }

    /// Recomputes the checksum after a change of any field.
    pub fn seal(&mut self) {
        self.checksum = self.compute_checksum();
    }

    /// Checks every field that must hold before the header is trusted.
    pub fn validate(&self) -> Result<ShutdownFlag, HeaderError> {
        if self.to_bytes().iter().all(|&b| b == 0) {
            return Err(HeaderError::Blank);
        }
        if self.magic != MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if self.format_version != FORMAT_VERSION {
            return Err(HeaderError::Version { found: self.format_version });
        }
        if self.header_size as usize != HEADER_SIZE {
            return Err(HeaderError::Size { found: self.header_size });
        }
        let computed = self.compute_checksum();
        if computed != self.checksum {
            return Err(HeaderError::Checksum { stored: self.checksum, computed });
        }
        ShutdownFlag::try_from(self.shutdown_flag).map_err(|e| HeaderError::Flag { found: e.number })
    }
}

/// Which copy of the header a reader takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderCopy {
    First,
    /// The first copy was torn by a power failure during an update (or is damaged).
    Second,
}

/// The header of an image from its two copies: the first if it holds, else the second if
/// it holds, else the first's error (a blank image is blank in both). With the header, its
/// shutdown flag and which copy it is.
pub fn choose(first: &RootHeader, second: &RootHeader) -> Result<(RootHeader, ShutdownFlag, HeaderCopy), HeaderError> {
    match first.validate() {
        Ok(flag) => Ok((*first, flag, HeaderCopy::First)),
        Err(e) => match second.validate() {
            Ok(flag) => Ok((*second, flag, HeaderCopy::Second)),
            Err(_) => Err(e),
        },
    }
}

/// CRC-32 (IEEE 802.3, reflected, as zlib: `CRC_32_ISO_HDLC`), a byte a step through the
/// crate's 256-entry table built at compile time: the guest computes it at every header
/// write, in PVM's emulated kernel mode, where a bitwise CRC costs eight times the
/// instructions.
pub fn crc32(bytes: &[u8]) -> u32 {
    CRC32.checksum(bytes)
}

const CRC32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);

#[cfg(test)]
mod tests {
    use super::*;

    /// An update writes the second copy, a fence, then the first. A power failure after any
    /// subset of the 8-byte stores of the copy being written (a torn write, or cache lines
    /// evicted early), and before any store of the next: the reader gets the old header or
    /// the new one, never an error and never a mix.
    #[test]
    fn a_power_failure_at_any_point_of_an_update_leaves_the_old_or_the_new_header() {
        let mut old = RootHeader::new(7);
        old.boot_count = 3;
        old.seal();
        let mut new = old;
        new.generation = 9;
        new.plate_table = 0xa4_0000;
        new.shutdown_flag = ShutdownFlag::Normal.into();
        new.seal();
        const WORDS: usize = HEADER_SIZE / 8;
        let torn = |from: &RootHeader, to: &RootHeader, stored: u32| {
            let (mut bytes, to) = (from.to_bytes(), to.to_bytes());
            for w in (0..WORDS).filter(|w| stored & (1 << w) != 0) {
                bytes[w * 8..w * 8 + 8].copy_from_slice(&to[w * 8..w * 8 + 8]);
            }
            RootHeader::from_bytes(&bytes)
        };
        let mut cases = 0;
        for stored in 0..(1u32 << WORDS) {
            // Writing the second copy: the first still holds the old header.
            let (got, _, _) = choose(&old, &torn(&old, &new, stored)).unwrap();
            assert_eq!(got, old);
            // Writing the first copy: the second holds the new header, whole.
            let (got, _, _) = choose(&torn(&old, &new, stored), &new).unwrap();
            assert!(got == new || got == old, "stores {stored:#x}: {got:?}");
            cases += 2;
        }
        assert_eq!(cases, 2 << WORDS);
        // The very first header of a blank image, torn: the second copy, or blank.
        let blank = RootHeader::default();
        assert_eq!(choose(&torn(&blank, &old, 0b1), &old).unwrap(), (old, ShutdownFlag::Abnormal, HeaderCopy::Second));
        assert_eq!(choose(&blank, &blank), Err(HeaderError::Blank));
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn new_header_validates_and_round_trips() {
        let mut header = RootHeader::new(0x1234);
        header.frames = 77;
        header.plate_table = 0xabc000;
        header.seal();
        assert_eq!(header.validate(), Ok(ShutdownFlag::Abnormal));
        assert_eq!(RootHeader::from_bytes(&header.to_bytes()), header);
        assert_eq!(&header.to_bytes()[16..20], &crate::abi::NVM_ABI_VERSION.to_le_bytes());
        assert_eq!(&header.to_bytes()[20..24], &0x1234u32.to_le_bytes());
    }

    #[test]
    fn every_corruption_is_detected() {
        assert_eq!(RootHeader::from_bytes(&[0; HEADER_SIZE]).validate(), Err(HeaderError::Blank));
        let good = RootHeader::new(1).to_bytes();
        for i in 0..CHECKED_LEN + 4 {
            for bit in 0..8 {
                let mut bytes = good;
                bytes[i] ^= 1 << bit;
                assert!(RootHeader::from_bytes(&bytes).validate().is_err(), "byte {i} bit {bit}");
            }
        }
        let mut foreign = RootHeader::new(1);
        foreign.format_version = FORMAT_VERSION + 1;
        foreign.seal();
        assert_eq!(foreign.validate(), Err(HeaderError::Version { found: FORMAT_VERSION + 1 }));
    }
}
