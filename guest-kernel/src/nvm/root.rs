//! The kernel's lasting state in NVM: the root header and the tables it leads to.
//!
//! At boot the root header decides: a blank image is formatted; a formatted image of this
//! kernel's NVM ABI version is opened, and its shutdown flag says whether its tables can be used as
//! they are (a graceful shutdown) or not; anything else is refused (see `nvram::header`).

use core::sync::atomic::{AtomicBool, Ordering};

use kernel_core::frames::{self, FrameBitmap};
use nvram::header::{self, HeaderCopy, HeaderError, RootHeader, ShutdownFlag, HEADER_SIZE};
use nvram::layout;
use nvram::resources::Resources;

use crate::dev::persist;

/// Hash of the kernel's sources, computed by build.rs: recorded in the images this kernel
/// formats and shown at boot, so that one can tell which build wrote an image. It decides
/// nothing: the NVM ABI version does (`nvram::abi::NVM_ABI_VERSION`).
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
    /// Written by a kernel of another NVM ABI version.
    ForeignAbi {
        found: u32,
    },
    /// RAM is too small for the fixed areas.
    TooSmall {
        ram: u64,
    },
    /// The header's layout fields disagree with this RAM size or this kernel's layout.
    Layout {
        /// Frames the image was formatted with.
        frames: u64,
        /// Frames this RAM holds.
        available: u64,
    },
    /// A resource table's header is not what it must be.
    Table(nvram::resources::Kind),
    /// After a crash, no commit slot may be restored (each was torn, holds a wrong entry or
    /// points at a damaged save area), though the root header says generation `generation`
    /// was committed.
    NoIntactCommit {
        generation: u64,
    },
}

impl core::fmt::Display for ImageError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Header(e) => write!(f, "{e}"),
            Self::ForeignAbi { found } => write!(
                f,
                "the image was written by a kernel of NVM ABI version {found}, this kernel keeps version {}",
                nvram::abi::NVM_ABI_VERSION
            ),
            Self::TooSmall { ram } => write!(f, "{ram} bytes of RAM cannot hold the kernel's tables"),
            Self::Layout { frames, available } => write!(
                f,
                "the root header's layout does not match this RAM size: the image has {frames} frames, this RAM holds {available}"
            ),
            Self::Table(kind) => write!(f, "the {kind:?} table is corrupt"),
            Self::NoIntactCommit { generation } => write!(
                f,
                "the root header records generation {generation}, but no commit slot can be restored intact \
                 (the reasons are above)"
            ),
        }
    }
}

fn header_ptr(copy: HeaderCopy) -> *mut [u8; HEADER_SIZE] {
    match copy {
        HeaderCopy::First => layout::ROOT_HEADER as *mut [u8; HEADER_SIZE],
        HeaderCopy::Second => layout::ROOT_HEADER_COPY as *mut [u8; HEADER_SIZE],
    }
}

fn load_header(copy: HeaderCopy) -> RootHeader {
    // SAFETY: both copies are identity-mapped RAM reserved for the header (nvram::layout).
    RootHeader::from_bytes(&unsafe { header_ptr(copy).read_volatile() })
}

/// The state found in NVM, opened for this boot.
pub struct Nvm {
    pub found: Found,
    pub header: RootHeader,
    pub resources: &'static mut Resources,
    pub frames: FrameBitmap<'static>,
}

/// Reads and checks the root header (a blank image gets a new one), counts the boot and
/// marks the run "abnormal" until a graceful shutdown says otherwise. The tables are
/// returned as found: [`Nvm::format`] starts them afresh, [`Nvm::check`] checks them.
///
/// Hands out the only references to the fixed areas of the tables, so it runs once per boot
/// (a second call panics): a safe function must not give out a second `&'static mut` to
/// the same memory.
pub fn open(ram_end: u64) -> Result<Nvm, ImageError> {
    static OPENED: AtomicBool = AtomicBool::new(false);
    assert!(!OPENED.swap(true, Ordering::Relaxed), "the NVM tables are opened once per boot");
    // The layout a blank image gets is a function of the image's size alone, not of what
    // firmware took off the top of RAM (nvram::layout::frames_for), so that an image moves
    // between our VMM and QEMU.
    let Some(mut frame_count) = layout::frames_for(ram_end) else {
        return Err(ImageError::TooSmall { ram: ram_end });
    };
    let mut header = load_header(HeaderCopy::First);
    let chosen = header::choose(&header, &load_header(HeaderCopy::Second));
    if let Ok((whole, _, copy)) = chosen {
        if copy == HeaderCopy::Second {
            crate::println!("NVM: the root header was torn by a power failure: its second copy is whole");
        }
        header = whole;
    }
    let available = (ram_end - layout::FRAMES_BASE) / layout::PAGE_SIZE;
    let found = match chosen.map(|(_, flag, _)| flag) {
        Ok(_) if header.nvm_abi != nvram::abi::NVM_ABI_VERSION => {
            return Err(ImageError::ForeignAbi { found: header.nvm_abi })
        }
        // The layout is the one recorded in the header, checked against the memory map:
        // the frames the image was formatted with must all be RAM here.
        Ok(_) if header.frames > available || header.resources != layout::RESOURCES => {
            return Err(ImageError::Layout { frames: header.frames, available })
        }
        Ok(flag) => {
            frame_count = header.frames;
            Found::Known(flag)
        }
        Err(HeaderError::Blank) => {
            header = RootHeader::new(BUILD_ID as u32);
            header.resources = layout::RESOURCES;
            header.frame_bitmap = layout::FRAME_BITMAP;
            header.frames_base = layout::FRAMES_BASE;
            header.frames = frame_count;
            Found::Blank
        }
        Err(e) => return Err(ImageError::Header(e)),
    };

    // SAFETY: the resource block and the bitmap have their own fixed areas (nvram::layout,
    // sizes checked by kernel-core's tests and below); this function, run once (`OPENED`),
    // hands out the only references to them.
    let (resources, words) = unsafe {
        let words = frames::words_for(frame_count);
        assert!((words * 8) as u64 <= layout::FRAME_BITMAP_MAX);
        (
            &mut *(layout::RESOURCES as *mut Resources),
            core::slice::from_raw_parts_mut(layout::FRAME_BITMAP as *mut u64, words),
        )
    };
    let frames = FrameBitmap::new(words, layout::FRAMES_BASE, frame_count).expect("bitmap sized above");

    header.boot_count += 1;
    header.shutdown_flag = ShutdownFlag::Abnormal as u32;
    header.seal();
    store_header(&header);
    Ok(Nvm { found, header, resources, frames })
}

impl Nvm {
    /// Starts the tables afresh: every resource free, every frame free.
    pub fn format(&mut self) {
        self.resources.format();
        let bitmap_bytes = (frames::words_for(self.frames.frames()) * 8) as u64;
        crate::arch::memory::zero(layout::FRAME_BITMAP, bitmap_bytes);
        persist::persist(layout::RESOURCES, core::mem::size_of::<Resources>() as u64);
        persist::persist(layout::FRAME_BITMAP, bitmap_bytes);
        self.header.generation = 0;
        self.header.plate_table = 0;
        self.header.seal();
        store_header(&self.header);
    }

    /// Checks the tables of a known image before they are trusted.
    pub fn check(&self) -> Result<(), ImageError> {
        self.resources.check().map_err(|e| ImageError::Table(e.0))
    }
}

/// Stops the machine over an image this kernel must not use.
pub fn refuse(e: ImageError) -> ! {
    crate::println!("NVM: refusing this image: {e}");
    crate::println!("NVM: `vmm boot --reformat` starts it afresh (its contents are lost)");
    crate::dev::machine::exit(nvram::exit::ExitCode::BadImage);
}

/// Writes `header` to NVM and makes it durable: its second copy first, then its first, so
/// that a power failure at any point leaves one of them whole (`nvram::header::choose`).
pub fn store_header(header: &RootHeader) {
    let bytes = header.to_bytes();
    for (copy, at) in [(HeaderCopy::Second, layout::ROOT_HEADER_COPY), (HeaderCopy::First, layout::ROOT_HEADER)] {
        // SAFETY: as in `load_header`; the header page belongs to this module alone.
        unsafe { header_ptr(copy).write_volatile(bytes) };
        persist::persist(at, HEADER_SIZE as u64);
    }
}
