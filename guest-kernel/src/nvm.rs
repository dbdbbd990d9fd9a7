//! The kernel's lasting state in NVM: the root header and the tables it leads to.
//!
//! At boot the root header decides: a blank image is formatted; a formatted image of this
//! kernel build is opened; anything else is refused (see `nvram::header`). Until the plate
//! function can restore a consistent state, an opened image's tables are formatted afresh
//! at every boot (only the header's counters carry over).

use kernel_core::frames::{self, FrameBitmap};
use kernel_core::resources::Resources;
use nvram::header::{HeaderError, RootHeader, ShutdownFlag, HEADER_SIZE};
use nvram::layout;

use crate::persist;

/// Hash of the kernel's sources, computed by build.rs: an image written by another build is
/// not continued.
pub const BUILD_ID: u64 = match u64::from_str_radix(env!("KERNEL_BUILD_ID"), 16) {
    Ok(id) => id,
    Err(_) => panic!("KERNEL_BUILD_ID is not hexadecimal"),
};

/// How this boot found the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A blank image, formatted now.
    Blank,
    /// A formatted image of this build; the previous run ended as the flag says.
    Known(ShutdownFlag),
}

/// Why the image cannot be used.
#[derive(Debug)]
pub enum ImageError {
    Header(HeaderError),
    /// Written by another kernel build.
    ForeignBuild { found: u64 },
    /// RAM is too small for the fixed areas.
    TooSmall { ram: u64 },
}

impl core::fmt::Display for ImageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Header(e) => write!(f, "{e}"),
            Self::ForeignBuild { found } => {
                write!(f, "the image was written by kernel build {found:016x}, this is build {BUILD_ID:016x}")
            }
            Self::TooSmall { ram } => write!(f, "{ram} bytes of RAM cannot hold the kernel's tables"),
        }
    }
}

fn header_ptr() -> *mut [u8; HEADER_SIZE] {
    layout::ROOT_HEADER as *mut [u8; HEADER_SIZE]
}

/// The state found in NVM, opened for this boot.
pub struct Nvm {
    pub found: Found,
    pub header: RootHeader,
    pub resources: &'static mut Resources,
    pub frames: FrameBitmap<'static>,
}

/// Reads the root header, formats a blank image (or, for now, the tables of a known one),
/// counts the boot and marks the run "abnormal" until a graceful shutdown says otherwise.
pub fn open(ram_end: u64) -> Result<Nvm, ImageError> {
    if ram_end < layout::MIN_RAM {
        return Err(ImageError::TooSmall { ram: ram_end });
    }
    // SAFETY: ROOT_HEADER is identity-mapped RAM reserved for the header (nvram::layout).
    let bytes = unsafe { header_ptr().read_volatile() };
    let mut header = RootHeader::from_bytes(&bytes);
    let found = match header.validate() {
        Ok(flag) if header.build_id == BUILD_ID => Found::Known(flag),
        Ok(_) => return Err(ImageError::ForeignBuild { found: header.build_id }),
        Err(HeaderError::Blank) => {
            header = RootHeader::new(BUILD_ID);
            Found::Blank
        }
        Err(e) => return Err(ImageError::Header(e)),
    };
    let frame_count = (ram_end - layout::FRAMES_BASE) / layout::PAGE_SIZE;
    header.resources = layout::RESOURCES;
    header.frame_bitmap = layout::FRAME_BITMAP;
    header.frames_base = layout::FRAMES_BASE;
    header.frames = frame_count;

    // SAFETY: the resource block and the bitmap have their own fixed areas (nvram::layout,
    // sizes checked by kernel-core's tests and below); this module hands out the only
    // references to them.
    let (resources, words) = unsafe {
        let words = frames::words_for(frame_count);
        assert!((words * 8) as u64 <= layout::FRAME_BITMAP_MAX);
        (
            &mut *(layout::RESOURCES as *mut Resources),
            core::slice::from_raw_parts_mut(layout::FRAME_BITMAP as *mut u64, words),
        )
    };
    // Until restore exists, every boot starts its tables afresh.
    resources.format();
    crate::memory::zero(layout::FRAME_BITMAP, (words.len() * 8) as u64);
    let frames = FrameBitmap::new(words, layout::FRAMES_BASE, frame_count).expect("bitmap sized above");
    persist::persist(layout::RESOURCES, core::mem::size_of::<Resources>() as u64);
    persist::persist(layout::FRAME_BITMAP, (frames::words_for(frame_count) * 8) as u64);

    header.boot_count += 1;
    header.shutdown_flag = ShutdownFlag::Abnormal as u32;
    header.seal();
    store_header(&header);
    Ok(Nvm { found, header, resources, frames })
}

/// Writes `header` to NVM and makes it durable.
pub fn store_header(header: &RootHeader) {
    // SAFETY: as in `open`; the header page belongs to this module alone.
    unsafe { header_ptr().write_volatile(header.to_bytes()) };
    persist::persist(layout::ROOT_HEADER, HEADER_SIZE as u64);
}
