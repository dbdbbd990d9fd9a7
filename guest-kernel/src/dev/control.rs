//! The guest side of the machine-control device (`nvram::control`): messages to the VMM.
//!
//! Absent under QEMU (its ports read all ones): then messages are dropped.

use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use nvram::control::{
    Booted, Cause, Heartbeat, Metrics, Request, Running, Started, BASE, DEVICE_ID, REG_DOORBELL, REG_REQUEST,
    REG_TSC_KHZ,
};
use spin::Mutex;
use x86_64::instructions::port::Port;
use zerocopy::{Immutable, IntoBytes};

static PRESENT: AtomicBool = AtomicBool::new(false);
/// The cause of the next write-out, as its caller said ([`set_cause`]).
static CAUSE: AtomicU32 = AtomicU32::new(Cause::Unknown as u32);

/// Says why the next write-out runs; its [`Started`] message carries it.
pub fn set_cause(cause: Cause) {
    CAUSE.store(cause.into(), Ordering::Relaxed);
}

/// The cause set for this write-out, and back to "unknown" for the next.
pub fn take_cause() -> Cause {
    Cause::try_from(CAUSE.swap(Cause::Unknown as u32, Ordering::Relaxed)).unwrap_or(Cause::Unknown)
}

/// A message buffer in kernel memory (identity-mapped, so its address is physical).
#[repr(C, align(64))]
struct Buffer([u8; 256]);

static BUFFER: Mutex<Buffer> = Mutex::new(Buffer([0; 256]));

/// Detects the device; returns the TSC frequency it reports (0 if absent or unknown).
pub fn init() -> u64 {
    // SAFETY: reading the device's identification register has no side effect; on a
    // machine without it the port reads all ones.
    let id = unsafe { Port::<u32>::new(BASE + REG_DOORBELL).read() };
    if id != DEVICE_ID {
        return 0;
    }
    PRESENT.store(true, Ordering::Relaxed);
    // SAFETY: as above, for the TSC register.
    u64::from(unsafe { Port::<u32>::new(BASE + REG_TSC_KHZ).read() })
}

pub fn present() -> bool {
    PRESENT.load(Ordering::Relaxed)
}

/// Sends the bytes of a message (`nvram::control`'s records); from ring-3 kernel work too,
/// where the doorbell is rung in kernel mode.
fn send<T: IntoBytes + Immutable>(message: &T) {
    if !present() {
        return;
    }
    let mut buffer = BUFFER.lock();
    let bytes = message.as_bytes();
    let len = bytes.len().min(buffer.0.len());
    buffer.0[..len].copy_from_slice(&bytes[..len]);
    let addr = buffer.0.as_ptr() as u64;
    // SAFETY: the doorbell takes the physical address of the message, which stays put
    // while the VMM reads it (the port write traps to the VMM synchronously).
    crate::arch::ring3::privileged(|| unsafe { Port::<u32>::new(BASE + REG_DOORBELL).write(addr as u32) });
}

/// Sends a console message (`nvram::control::console_header`, then the text) that the
/// caller built in place: a line is one doorbell, not a copy.
pub fn console(message: &ConsoleMessage) {
    if !present() {
        return;
    }
    // SAFETY: as in `send`: `message` is identity-mapped kernel memory, 8-byte aligned, and
    // stays put while the VMM reads it.
    unsafe { Port::<u32>::new(BASE + REG_DOORBELL).write(message as *const ConsoleMessage as u64 as u32) };
}

/// Console text as the doorbell takes it: a header and the text after it.
#[repr(C, align(8))]
pub struct ConsoleMessage {
    pub header: nvram::control::MessageHeader,
    pub text: [u8; CONSOLE_TEXT],
}

/// Text a console message carries at most here: a long line goes out in pieces.
pub const CONSOLE_TEXT: usize = 1024;
const _: () = assert!(CONSOLE_TEXT <= nvram::control::CONSOLE_TEXT_MAX);

pub fn booted(message: Booted) {
    send(&message);
}

pub fn heartbeat(message: Heartbeat) {
    send(&message);
}

pub fn started(message: Started) {
    send(&message);
}

pub fn running(message: Running) {
    send(&message);
}

/// Tells the VMM that the program `name` was not started, and why.
pub fn refused(name: &str, error: nvram::program::ProgramError) {
    send(&nvram::control::Refused::new(name, error));
}

pub fn metrics(message: Metrics) {
    send(&message);
}

/// The VMM's pending request, if any (reading takes it).
pub fn request() -> Request {
    if !present() {
        return Request::None;
    }
    // SAFETY: reading the request register only takes the pending request.
    let raw = unsafe { Port::<u32>::new(BASE + REG_REQUEST).read() };
    Request::try_from(raw).unwrap_or(Request::None)
}
