//! Processes: creation, scheduling and death.
//!
//! A process is an entry of the process table (NVM) with its saved registers, and a virtual
//! space with its user spaces (its program's segments, its stack, and the regions it maps).
//! Processes are made from programs' ELF files (`load`). There is one kernel
//! stack: a process's whole context is its saved [`TrapFrame`], so switching is copying a
//! frame out and another in, and loading CR3.

use kernel_core::process::{self, State};
use nvram::control::Running;

use crate::arch::frame::{from_user, TrapFrame};
use crate::arch::{gdt, paging};
use crate::dev::control;
use crate::println;
use crate::proc::kernel::Kernel;
use crate::res_op;

/// Ends process `pid` and frees everything it holds.
pub fn kill(k: &mut Kernel, pid: u32) {
    let Some(p) = k.procs.remove(pid) else { return };
    if k.current == Some(pid) {
        k.current = None;
        paging::switch_to(paging::kernel_root());
    }
    if let Some(plating) = k.plating.as_mut() {
        crate::plate::lazy::forget(plating, k.res, p.space);
    }
    if let Err(e) = res_op!(space.delete(&mut k.mem(), p.space)) {
        println!("process {pid}: freeing its space failed: {e:?}");
    }
}

/// Saves the interrupted process (if `frame` is one) and loads the next one to run into
/// `frame`, or the idle context when none can run.
pub fn schedule(k: &mut Kernel, frame: &mut TrapFrame) {
    if let Some(current) = k.current {
        if from_user(frame) {
            if let Some(p) = k.procs.get_mut(current) {
                p.regs = *frame;
            }
        }
    }
    match process::next_runnable(k.procs, k.current, k.ticks) {
        Some(next) => switch(k, frame, next),
        None => {
            k.current = None;
            // The CPU would idle: the time for the pages a lazy restore left away.
            if let Some(plating) = k.plating.as_mut() {
                crate::plate::lazy::finish(plating, k.res);
            }
            *frame = idle_frame();
        }
    }
}

/// Loads process `pid` into `frame` and its space into CR3. The first switch of a boot is
/// announced on the console (which process a restore runs first is part of its promise).
fn switch(k: &mut Kernel, frame: &mut TrapFrame, pid: u32) {
    let Some(p) = k.procs.get_mut(pid) else { return };
    p.state = State::Runnable as u32;
    *frame = p.regs;
    let space = p.space;
    if !k.entered_first {
        // The end of "crash to running" (after a restore), or of a boot.
        k.entered_first = true;
        println!("process {pid} ({}) runs first", p.name());
        control::running(Running::new(pid, k.header.generation));
    }
    k.current = Some(pid);
    if let Some(space) = k.res.spaces.get(space) {
        paging::switch_to(space.root);
    }
}

/// The first scheduling of a boot: process `first` if it exists (after a restore, the one
/// that asked for the write-out, as the paper's restore returns to it), else as
/// [`schedule`] picks.
pub fn schedule_first(k: &mut Kernel, frame: &mut TrapFrame, first: Option<u32>) {
    match first.filter(|&pid| k.procs.get(pid).is_some()) {
        Some(pid) => switch(k, frame, pid),
        None => schedule(k, frame),
    }
}

/// Puts the current process to sleep for `ticks` timer ticks.
pub fn sleep(k: &mut Kernel, ticks: u64) {
    if let Some(p) = k.current.and_then(|c| k.procs.get_mut(c)) {
        p.state = State::Sleeping as u32;
        p.wake_at = k.ticks + ticks.max(1);
    }
}

/// Makes every sleeper runnable: after a power cycle the tick count starts again, so a
/// sleep that spans one ends at the boot.
pub fn wake_all(k: &mut Kernel) {
    let ids: [Option<u32>; kernel_core::process::PROCESSES] = core::array::from_fn(|i| Some(i as u32));
    for id in ids.into_iter().flatten() {
        if let Some(p) = k.procs.get_mut(id) {
            p.state = State::Runnable as u32;
            p.wake_at = 0;
        }
    }
}

/// Where the CPU waits, interrupts on, when no process can run.
extern "C" fn idle() -> ! {
    loop {
        x86_64::instructions::hlt();
    }
}

/// The idle context runs on the kernel stack: nothing else is live on it while the CPU
/// waits, and an interrupt taken there (no stack switch from kernel mode) may run a whole
/// write-out, which needs the kernel stack's room.
fn idle_frame() -> TrapFrame {
    let sel = gdt::selectors();
    let top = gdt::kernel_stack_top();
    TrapFrame {
        rip: idle as *const () as u64,
        cs: u64::from(sel.kernel_code.0),
        rflags: 0x202,
        rsp: top - 8,
        ss: u64::from(sel.kernel_data.0),
        ..TrapFrame::default()
    }
}
