//! The root header: the one structure at a fixed physical address ([`crate::layout::ROOT_HEADER`])
//! from which the guest kernel finds everything it keeps in NVM.
//!
//! | offset | size | field            | meaning                                               |
//! |--------|------|------------------|-------------------------------------------------------|
//! | 0      | 8    | `magic`          | `b"TNDRNVM\0"`; anything else means "no image yet"    |
//! | 8      | 4    | `format_version` | [`FORMAT_VERSION`] of the kernel that formatted it    |
//! | 12     | 4    | `header_size`    | `size_of::<RootHeader>()`, checked before use         |
//! | 16     | 8    | `boot_count`     | boots of this image, this one included                |
//! | 24     | 4    | `shutdown_flag`  | [`ShutdownFlag`]: how the previous run ended          |
//! | 28     | 4    | `checksum`       | CRC-32 (IEEE) of bytes 0..28                          |
//!
//! A header is trusted only when magic, version, size and checksum all hold. A header that
//! fails any check is reported, never silently reformatted, except when the image is blank.

/// Magic bytes at the start of a formatted image's root header.
pub const MAGIC: [u8; 8] = *b"TNDRNVM\0";

/// Version of the image format. Bumped at every incompatible change of any structure kept
/// in NVM; a kernel refuses to resume an image of another version.
pub const FORMAT_VERSION: u32 = 1;

/// How the previous run of the kernel on this image ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ShutdownFlag {
    /// Set during boot: if it is still there at the next boot, the machine stopped abruptly.
    Abnormal = 0,
    /// Set by a graceful shutdown, last.
    Normal = 1,
}

impl ShutdownFlag {
    /// Decodes the raw field.
    pub fn from_raw(raw: u32) -> Option<Self> {
        match raw {
            0 => Some(Self::Abnormal),
            1 => Some(Self::Normal),
            _ => None,
        }
    }
}

/// The root header, as laid out in NVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct RootHeader {
    pub magic: [u8; 8],
    pub format_version: u32,
    pub header_size: u32,
    pub boot_count: u64,
    pub shutdown_flag: u32,
    pub checksum: u32,
}

/// Size of the header in NVM, in bytes.
pub const HEADER_SIZE: usize = core::mem::size_of::<RootHeader>();
const CHECKED_LEN: usize = HEADER_SIZE - 4;

/// Why a root header cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// All bytes are zero: a new image that was never formatted.
    Blank,
    /// The magic is wrong: not an image of ours, or overwritten.
    BadMagic,
    /// Formatted by a kernel with another image format.
    Version { found: u32 },
    /// The header size field disagrees with this format's header.
    Size { found: u32 },
    /// The checksum does not match: a torn or corrupted header.
    Checksum { stored: u32, computed: u32 },
    /// The shutdown flag holds a value no kernel writes.
    Flag { found: u32 },
}

impl core::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Blank => write!(f, "the image is blank (never formatted)"),
            Self::BadMagic => write!(f, "the root header has no valid magic: not an image of this machine"),
            Self::Version { found } => {
                write!(f, "the image has format version {found}, this kernel reads version {FORMAT_VERSION}")
            }
            Self::Size { found } => write!(f, "the root header claims {found} bytes, expected {HEADER_SIZE}"),
            Self::Checksum { stored, computed } => {
                write!(f, "the root header checksum is {stored:#010x}, its bytes give {computed:#010x}")
            }
            Self::Flag { found } => write!(f, "the shutdown flag holds {found}, which no kernel writes"),
        }
    }
}

impl RootHeader {
    /// A freshly formatted header for this format version.
    pub fn new() -> Self {
        let mut header = Self {
            magic: MAGIC,
            format_version: FORMAT_VERSION,
            header_size: HEADER_SIZE as u32,
            boot_count: 0,
            shutdown_flag: ShutdownFlag::Abnormal as u32,
            checksum: 0,
        };
        header.seal();
        header
    }

    /// The header's bytes, as stored in NVM.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..8].copy_from_slice(&self.magic);
        out[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        out[12..16].copy_from_slice(&self.header_size.to_le_bytes());
        out[16..24].copy_from_slice(&self.boot_count.to_le_bytes());
        out[24..28].copy_from_slice(&self.shutdown_flag.to_le_bytes());
        out[28..32].copy_from_slice(&self.checksum.to_le_bytes());
        out
    }

    /// Reads a header from its stored bytes, without checking it.
    pub fn from_bytes(bytes: &[u8; HEADER_SIZE]) -> Self {
        let u32_at = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
        let mut boot_count = [0u8; 8];
        boot_count.copy_from_slice(&bytes[16..24]);
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&bytes[0..8]);
        Self {
            magic,
            format_version: u32_at(8),
            header_size: u32_at(12),
            boot_count: u64::from_le_bytes(boot_count),
            shutdown_flag: u32_at(24),
            checksum: u32_at(28),
        }
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
        ShutdownFlag::from_raw(self.shutdown_flag).ok_or(HeaderError::Flag { found: self.shutdown_flag })
    }
}

impl Default for RootHeader {
    fn default() -> Self {
        Self::new()
    }
}

/// CRC-32 (IEEE 802.3, reflected, as zlib), bitwise: the headers it guards are tens of bytes,
/// so a table would cost more to build than it saves.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn new_header_validates_and_round_trips() {
        let header = RootHeader::new();
        assert_eq!(header.validate(), Ok(ShutdownFlag::Abnormal));
        assert_eq!(RootHeader::from_bytes(&header.to_bytes()), header);
    }

    #[test]
    fn every_corruption_is_detected() {
        assert_eq!(RootHeader::from_bytes(&[0; HEADER_SIZE]).validate(), Err(HeaderError::Blank));
        let good = RootHeader::new().to_bytes();
        for i in 0..HEADER_SIZE {
            for bit in 0..8 {
                let mut bytes = good;
                bytes[i] ^= 1 << bit;
                assert!(RootHeader::from_bytes(&bytes).validate().is_err(), "byte {i} bit {bit}");
            }
        }
        let mut foreign = RootHeader::new();
        foreign.format_version = FORMAT_VERSION + 1;
        foreign.seal();
        assert_eq!(foreign.validate(), Err(HeaderError::Version { found: FORMAT_VERSION + 1 }));
    }
}
