//! The console, and the `print!`/`println!` macros.
//!
//! Every byte to the UART is a port write, which is a VM exit, and under PVM the driver's
//! own instructions in kernel mode cost about a microsecond each: a line took 1.5 to 2 ms,
//! and printing was most of a boot's time. So when the machine-control device is there,
//! a print is formatted at CPL 3 (`arch::ring3`, natively) into a buffer that goes to the
//! VMM as one console message (one exit), to the same output as the UART's. Without it
//! (QEMU) the text goes to COM1 as before.
//!
//! With the device, the UART is configured only when something must go through it (a
//! print inside a print, the fatal path): configuring it is some twenty port accesses in
//! kernel mode, 0.3 to 0.5 ms of a boot under PVM, for a port no print uses then.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::{Config, Uart16550};

use super::control::{self, ConsoleMessage, CONSOLE_TEXT};
use nvram::control::MessageHeader;

static CONSOLE: Mutex<Option<Uart16550<PioBackend>>> = Mutex::new(None);
/// Whether COM1 was looked for (found or not): it is configured at most once.
static UART_TRIED: AtomicBool = AtomicBool::new(false);

/// Finds and configures COM1 now, unless the machine-control device carries the console
/// (then at the first print that needs the UART). Output before this call is dropped.
/// In kernel mode, after `control::init`.
pub fn init() {
    if !control::present() {
        configure(&mut CONSOLE.lock());
    }
}

/// Finds and configures COM1 into `console`, the first time only. In kernel mode.
fn configure(console: &mut Option<Uart16550<PioBackend>>) {
    if UART_TRIED.swap(true, Ordering::Relaxed) {
        return;
    }
    // SAFETY: COM1's eight ports belong to the UART on every machine we boot on, and this
    // driver is their only user.
    let Ok(mut uart) = (unsafe { Uart16550::new_port(nvram::ports::COM1) }) else {
        return;
    };
    if uart.init(Config::default()).is_ok() {
        *console = Some(uart);
    }
}

/// The console message a print is formatted into (see the module's docs).
static TEXT: Mutex<Text> = Mutex::new(Text {
    message: ConsoleMessage { header: MessageHeader { kind: 0, len: 0 }, text: [0; CONSOLE_TEXT] },
    len: 0,
});

/// [`TEXT`]: the message and how much of its text is filled.
struct Text {
    message: ConsoleMessage,
    len: usize,
}

impl Text {
    /// Sends what is filled, in kernel mode (a trap from the work at CPL 3).
    fn send(&mut self) {
        if self.len == 0 {
            return;
        }
        self.message.header = nvram::control::console_header(self.len);
        crate::arch::ring3::privileged(|| control::console(&self.message));
        self.len = 0;
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len == CONSOLE_TEXT {
                self.send();
            }
            self.message.text[self.len] = b;
            self.len += 1;
        }
    }
}

impl Write for Text {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // The bytes the UART path sends: a line ends in CR LF.
        for line in s.split_inclusive('\n') {
            match line.strip_suffix('\n') {
                Some(text) => {
                    self.push(text.as_bytes());
                    self.push(b"\r\n");
                }
                None => self.push(line.as_bytes()),
            }
        }
        Ok(())
    }
}

struct Writer<'a>(&'a mut Uart16550<PioBackend>);

impl Write for Writer<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for line in s.split_inclusive('\n') {
            match line.strip_suffix('\n') {
                Some(text) => {
                    self.0.send_bytes_exact(text.as_bytes());
                    self.0.send_bytes_exact(b"\r\n");
                }
                None => self.0.send_bytes_exact(line.as_bytes()),
            }
        }
        Ok(())
    }
}

/// Prints `args`; from ring-3 kernel work (`ring3`) too, where the UART's ports are out of
/// reach and the printing is done in kernel mode.
#[doc(hidden)]
pub fn _print(args: fmt::Arguments) {
    if control::present() {
        let print = || {
            // A print inside a print (a `Display` that prints) goes to the UART instead.
            let Some(mut text) = TEXT.try_lock() else { return uart_print(args) };
            crate::arch::ring3::run(|| {
                let _ = text.write_fmt(args);
            });
            // In kernel mode this is the one exit; from the work, one trap more.
            text.send();
        };
        // The work runs with interrupts off already, and there `cli` is a fault (and the
        // flags the CPU shows at CPL 3 may say interrupts are on).
        if crate::arch::ring3::in_user_mode() {
            print();
        } else {
            x86_64::instructions::interrupts::without_interrupts(print);
        }
        return;
    }
    uart_print(args);
}

/// Prints `args` on COM1 (configured first if it is not yet), in kernel mode.
fn uart_print(args: fmt::Arguments) {
    crate::arch::ring3::privileged(|| {
        x86_64::instructions::interrupts::without_interrupts(|| {
            let mut console = CONSOLE.lock();
            configure(&mut console);
            if let Some(uart) = console.as_mut() {
                let _ = Writer(uart).write_fmt(args);
            }
        })
    });
}

/// Prints after a fault, even if the fault struck while the console was locked.
pub fn emergency_print(args: fmt::Arguments) {
    // SAFETY: called only on the way to stopping the machine, with interrupts off and a
    // single CPU: whoever held the lock will never run again.
    unsafe { CONSOLE.force_unlock() };
    // The UART, whatever the machine: the fault may lie in the work space or the buffer.
    uart_print(args);
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => ($crate::dev::console::_print(format_args!($($arg)*)));
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    () => ($crate::print!("\n"));
    ($($arg:tt)*) => ($crate::print!("{}\n", format_args!($($arg)*)));
}
