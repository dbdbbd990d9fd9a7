//! A SIGBUS in guest RAM: the image file lost the page behind it.
//!
//! A store or load through the file mapping past the file's end (someone truncated the
//! image) or to a page its file system cannot allocate (a `--sparse` image on a full disk)
//! raises SIGBUS, whose default action kills the process with no word. The VMM cannot
//! resume the faulting access, so the handler says what happened and ends the process with
//! the status the caller chose, touching the image no further. A SIGBUS outside guest RAM
//! is a bug of the VMM: the handler restores the default action and lets it kill.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::GuestMemory;

/// How many mappings of the image the handler knows (guest RAM, and under ADR the
/// persistence domain's view of the image).
const RANGES: usize = 4;

/// The host address ranges of the image's mappings and the exit status, read by the
/// handler (atomics: the only memory a signal handler may read without a race).
static STARTS: [AtomicUsize; RANGES] = [const { AtomicUsize::new(0) }; RANGES];
static ENDS: [AtomicUsize; RANGES] = [const { AtomicUsize::new(0) }; RANGES];
static STATUS: AtomicI32 = AtomicI32::new(1);

const MESSAGE: &[u8] = b"vmm: SIGBUS in guest RAM: a page of the image file is gone (the file was truncated, or its file system is full); the machine stops, the image is left as it is\n";

/// Reports a SIGBUS in any of `mappings` of the image and exits with `status`. Call once
/// they are mapped; a later call replaces the ranges (a range left behind by unmapped
/// memory can only make an unrelated SIGBUS report as the image's).
pub fn report_sigbus_in(mappings: &[&GuestMemory], status: u8) -> std::io::Result<()> {
    let ranges =
        mappings.iter().flat_map(|m| m.iter()).map(|r| (r.as_ptr() as usize, r.as_ptr() as usize + r.len() as usize));
    let mut ranges = ranges.chain(std::iter::repeat((0, 0)));
    for (start, end) in STARTS.iter().zip(&ENDS) {
        let (s, e) = ranges.next().unwrap_or((0, 0));
        start.store(s, Ordering::SeqCst);
        end.store(e, Ordering::SeqCst);
    }
    STATUS.store(i32::from(status), Ordering::SeqCst);
    // SAFETY: an all-zero sigaction is a valid value; the fields set below make it a
    // SA_SIGINFO handler with an empty mask.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) = on_sigbus;
    action.sa_sigaction = handler as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installing a handler that only calls async-signal-safe functions (write,
    // _exit, sigaction) and reads atomics.
    let rc = unsafe { libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

extern "C" fn on_sigbus(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel hands a valid siginfo to an SA_SIGINFO handler; si_addr is the
    // faulting address for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    let in_image =
        STARTS.iter().zip(&ENDS).any(|(s, e)| (s.load(Ordering::Relaxed)..e.load(Ordering::Relaxed)).contains(&addr));
    if in_image {
        // SAFETY: write(2) and _exit(2) are async-signal-safe; MESSAGE is a static buffer.
        unsafe {
            libc::write(libc::STDERR_FILENO, MESSAGE.as_ptr().cast(), MESSAGE.len());
            libc::_exit(STATUS.load(Ordering::Relaxed));
        }
    }
    // Not guest RAM: back to the default action; the access faults again and kills.
    // SAFETY: an all-zero sigaction with SIG_DFL (0) is the default disposition.
    unsafe {
        let default: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
    }
}
