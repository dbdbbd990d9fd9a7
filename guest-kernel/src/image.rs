//! The NVM image as the kernel finds it at boot: the root header decides between a cold
//! boot (blank image), a boot of a known image, and a refusal (foreign or corrupt image).

use nvram::header::{HeaderError, RootHeader, ShutdownFlag, HEADER_SIZE};
use nvram::layout::ROOT_HEADER;

use crate::persist;

/// How this boot found the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootKind {
    /// A blank image, formatted now.
    Cold,
    /// A formatted image; the previous run ended as the flag says.
    Known(ShutdownFlag),
}

fn header_ptr() -> *mut [u8; HEADER_SIZE] {
    ROOT_HEADER as *mut [u8; HEADER_SIZE]
}

/// Reads the root header, formats a blank image, counts the boot and marks the run as
/// "abnormal" until a graceful shutdown says otherwise. The header is durable on return.
pub fn open() -> Result<(BootKind, RootHeader), HeaderError> {
    // SAFETY: ROOT_HEADER is identity-mapped RAM reserved for the header (nvram::layout).
    let bytes = unsafe { header_ptr().read_volatile() };
    let mut header = RootHeader::from_bytes(&bytes);
    let kind = match header.validate() {
        Ok(flag) => BootKind::Known(flag),
        Err(HeaderError::Blank) => {
            header = RootHeader::new();
            BootKind::Cold
        }
        Err(e) => return Err(e),
    };
    header.boot_count += 1;
    header.shutdown_flag = ShutdownFlag::Abnormal as u32;
    header.seal();
    store(&header);
    Ok((kind, header))
}

/// Writes `header` to NVM and makes it durable.
pub fn store(header: &RootHeader) {
    // SAFETY: as in `open`; the header page belongs to this module alone.
    unsafe { header_ptr().write_volatile(header.to_bytes()) };
    persist::persist(ROOT_HEADER, HEADER_SIZE as u64);
}
