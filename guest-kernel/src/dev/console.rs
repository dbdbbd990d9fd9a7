//! The serial console on COM1, and the `print!`/`println!` macros.
//!
//! Every byte to the UART is a port write, which is a VM exit: the driver fills the UART's
//! FIFO (16 bytes) per status check, so printing costs about one exit per byte.

use core::fmt::{self, Write};

use spin::Mutex;
use uart_16550::backend::PioBackend;
use uart_16550::{Config, Uart16550};

static CONSOLE: Mutex<Option<Uart16550<PioBackend>>> = Mutex::new(None);

/// Finds and configures COM1. Output before this call is dropped.
pub fn init() {
    // SAFETY: COM1's eight ports belong to the UART on every machine we boot on, and this
    // driver is their only user.
    let Ok(mut uart) = (unsafe { Uart16550::new_port(nvram::ports::COM1) }) else {
        return;
    };
    if uart.init(Config::default()).is_ok() {
        *CONSOLE.lock() = Some(uart);
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
    crate::arch::ring3::privileged(|| {
        x86_64::instructions::interrupts::without_interrupts(|| {
            if let Some(uart) = CONSOLE.lock().as_mut() {
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
    _print(args);
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
