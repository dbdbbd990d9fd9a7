//! Console output without a heap: [`print!`](crate::print) and
//! [`println!`](crate::println) format into a buffer on the stack and hand it to the kernel
//! in one `write`, so that a line of one process is not cut by another's (the kernel prints
//! each `write` whole). Text longer than the buffer goes out in several writes, never cut.

use core::fmt::{self, Write};

/// Bytes of the stack buffer of one `print!`: longer than any line a program prints in one
/// go, small beside its stack (`nvram::abi::STACK_PAGES` pages).
const LINE: usize = 256;

/// A formatter into a stack buffer of `N` bytes that writes to the console when the buffer
/// is full and at [`Console::flush`].
pub struct Console<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Console<N> {
    pub const fn new() -> Self {
        Self { buf: [0; N], len: 0 }
    }

    /// Writes what the buffer holds to the console.
    pub fn flush(&mut self) {
        // The buffer holds whole `&str` pieces only (see `write_str`): valid UTF-8.
        if let Ok(text) = core::str::from_utf8(&self.buf[..self.len]) {
            // The console is the program's only voice: an error writing to it has nowhere
            // to be said.
            let _ = crate::write(text);
        }
        self.len = 0;
    }
}

impl<const N: usize> Default for Console<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> Write for Console<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.len + s.len() > N {
            self.flush();
        }
        if s.len() > N {
            let _ = crate::write(s);
        } else {
            self.buf[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
            self.len += s.len();
        }
        Ok(())
    }
}

/// What [`print!`](crate::print) and [`println!`](crate::println) expand to.
pub fn print_args(args: fmt::Arguments, newline: bool) {
    let mut out = Console::<LINE>::new();
    // `write_str` never fails; a `Display` impl that does just ends its own output.
    let _ = out.write_fmt(args);
    if newline {
        let _ = out.write_str("\n");
    }
    out.flush();
}

/// Prints to the console, as `std`'s `print!`.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::print_args(format_args!($($arg)*), false)
    };
}

/// Prints a line to the console, as `std`'s `println!`: one `write` for a line of up to
/// 256 bytes.
#[macro_export]
macro_rules! println {
    () => {
        $crate::print_args(format_args!(""), true)
    };
    ($($arg:tt)*) => {
        $crate::print_args(format_args!($($arg)*), true)
    };
}
