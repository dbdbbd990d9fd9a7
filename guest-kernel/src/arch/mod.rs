//! The CPU and the boot protocol: the PVH entry, GDT/TSS, IDT and entry stubs, paging,
//! memory, the timer, and the CPL-3 work runner with its privileged call.
//!
//! The lowest layer: it imports nothing from the others. Where it must reach upwards it
//! goes through what the top installs or defines: the entry stubs call `trap_dispatch`
//! and the boot code calls `kmain` (symbols the top layer defines), and fatal paths stop
//! the machine through the hook of [`fatal`] (installed at boot, see `main.rs`).

pub mod boot;
pub mod frame;
pub mod gdt;
pub mod interrupts;
pub mod memory;
pub mod paging;
pub mod pvh;
pub mod ring3;
pub mod timer;

use core::fmt;
use core::sync::atomic::{AtomicPtr, Ordering};

use nvram::exit::ExitCode;

/// Prints `args` however the console can, and stops the machine with `code`.
pub type FatalHook = fn(args: fmt::Arguments, code: ExitCode) -> !;

/// The hook [`fatal`] calls (null until [`set_fatal_hook`]).
static FATAL_HOOK: AtomicPtr<()> = AtomicPtr::new(core::ptr::null_mut());

/// Installs the fatal-path hook: the console and the exit device are drivers (`dev`), above
/// this layer, so the layer that knows them hands in how to report and stop.
pub fn set_fatal_hook(hook: FatalHook) {
    FATAL_HOOK.store(hook as *mut (), Ordering::Release);
}

/// Reports `args` and stops the machine with `code` through the installed hook; with none
/// installed yet (nothing to print on), halts.
pub fn fatal(args: fmt::Arguments, code: ExitCode) -> ! {
    let hook = FATAL_HOOK.load(Ordering::Acquire);
    if !hook.is_null() {
        // SAFETY: the only non-null value ever stored is a `FatalHook` (`set_fatal_hook`).
        let hook = unsafe { core::mem::transmute::<*mut (), FatalHook>(hook) };
        hook(args, code)
    }
    halt_forever()
}

/// Halts this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}
