//! The kernel's state for this boot: references into NVM (the tables) and scratch values.
//!
//! One CPU, and the kernel runs with interrupts off, so a spin lock taken at each entry
//! (trap, system call) is never contended; it makes the exclusive access explicit.
//!
//! The layers below take only the parts they work on: the resource operations a [`Mem`]
//! view ([`Kernel::mem`]), the plate function the tables and a closure that saves the
//! interrupted process ([`Kernel::write_out`]).

use kernel_core::frames::FrameBitmap;
use kernel_core::process::ProcessTable;
use nvram::control::Metrics;
use nvram::exit::ExitCode;
use nvram::header::{RootHeader, ShutdownFlag};
use nvram::resources::Resources;
use spin::Mutex;

use crate::arch::frame::{from_user, TrapFrame};
use crate::dev::{machine, persist};
use crate::nvm::resources::Mem;
use crate::nvm::root;
use crate::plate::{self, Plating, WriteOutError, RESTORED, SAVED};
use crate::println;

pub struct Kernel {
    /// The root header as last written.
    pub header: RootHeader,
    /// Tender's memory-resource tables (NVM).
    pub res: &'static mut Resources,
    /// Real memory: the frame allocator's bitmap (NVM).
    pub frames: FrameBitmap<'static>,
    /// The process table (NVM, in a virtual kernel space).
    pub procs: &'static mut ProcessTable,
    /// The process on the CPU, if any.
    pub current: Option<u32>,
    /// Timer ticks since boot.
    pub ticks: u64,
    /// The plate function (`None` with `plate=off`).
    pub plating: Option<Plating>,
    /// When the next periodic write-out is due, in TSC nanoseconds since the timer started
    /// (`u64::MAX`: none). Measured by the TSC, not by counting ticks: KVM delivers the
    /// ticks a long write-out held back in a burst after it.
    pub next_checkpoint_ns: u64,
    /// Nanoseconds from the end of one periodic write-out to the next (0: none).
    pub checkpoint_ns: u64,
    /// Whether this boot has entered a process yet (and told the VMM so).
    pub entered_first: bool,
}

static KERNEL: Mutex<Option<Kernel>> = Mutex::new(None);

/// Installs the state once the tables are open.
pub fn install(kernel: Kernel) {
    *KERNEL.lock() = Some(kernel);
}

/// Runs `f` with the kernel's state.
pub fn with<R>(f: impl FnOnce(&mut Kernel) -> R) -> R {
    let mut guard = KERNEL.lock();
    let kernel = guard.as_mut().expect("the kernel state is installed before any trap can arrive");
    f(kernel)
}

impl Kernel {
    /// The view of the tables the resource operations work on (`nvm::resources`).
    pub fn mem(&mut self) -> Mem<'_> {
        let (plates, areas) = match self.plating.as_mut().map(Plating::split) {
            Some((live, areas)) => (Some(live), areas),
            None => (None, None),
        };
        Mem { res: &mut *self.res, frames: &mut self.frames, plates, areas }
    }

    /// A write-out (`plate::write_out`) that first saves the interrupted process from
    /// `frame`. `from_checkpoint_call`: the interrupted process asked for it, and must see
    /// [`SAVED`] now and [`RESTORED`] when resumed from this checkpoint after a crash.
    pub fn write_out(&mut self, frame: &mut TrapFrame, from_checkpoint_call: bool) -> Result<Metrics, WriteOutError> {
        let Kernel { header, res, frames, procs, current, plating, .. } = self;
        let Some(plating) = plating.as_mut() else { return Err(WriteOutError::Disabled) };
        let interrupted: &TrapFrame = frame;
        // The process a restore of this write-out runs first: the one that asked for it, or
        // that it interrupted.
        let resume_first = current.filter(|_| from_user(interrupted));
        let save = || {
            let Some(current) = *current else { return };
            if !from_user(interrupted) {
                return;
            }
            if let Some(p) = procs.get_mut(current) {
                p.regs = *interrupted;
                if from_checkpoint_call {
                    p.regs.rax = RESTORED;
                }
            }
        };
        let m = plate::write_out(plating, res, frames, header, resume_first, save)?;
        if from_checkpoint_call {
            frame.rax = SAVED;
        }
        Ok(m)
    }

    /// A graceful shutdown: everything needed to resume is already in NVM (the process
    /// table holds every process's registers, once the interrupted one's are saved); write
    /// back every cache line, then set the shutdown flag to "normal", last, and power off.
    /// The next boot resumes exactly here (NVM continuation).
    pub fn shutdown(&mut self, frame: &TrapFrame) -> ! {
        if let Some(current) = self.current {
            if from_user(frame) {
                if let Some(p) = self.procs.get_mut(current) {
                    p.regs = *frame;
                }
            }
        }
        if self.plating.as_ref().is_some_and(Plating::on_disk) {
            // The volatile plate function restores the last save, as the paper's does. On
            // NVM RAM the flag stays "abnormal": what RAM holds (a live table whose areas
            // are disk offsets) must never be resumed by a boot without the disk store.
            println!(
                "shut down: the next boot restores the disk's last commit (generation {})",
                self.header.generation
            );
            machine::exit(ExitCode::PowerOff)
        }
        // A resume trusts the page tables as they are: no entry may be left away (a lazy restore's).
        if let Some(plating) = self.plating.as_mut() {
            plate::lazy::finish(plating, self.res);
        }
        persist::write_back_all();
        self.header.shutdown_flag = ShutdownFlag::Normal as u32;
        self.header.seal();
        root::store_header(&self.header);
        println!("shut down: the machine's state is kept in NVM");
        machine::exit(ExitCode::PowerOff)
    }
}
