//! What the kernel does at each entry: exceptions, timer interrupts, system calls.

use nvram::control::{Cause, Request, REQUEST_IRQ};
use nvram::exit::ExitCode;

use crate::arch::frame::from_user;
use crate::arch::frame::{exception_name, ShowRegs, TrapFrame, IRQ_BASE, SYSCALL_VECTOR};
use crate::arch::{ring3, timer};
use crate::dev::{console, control, machine};
use crate::plate;
use crate::println;
use crate::proc::kernel::{self, Kernel};
use crate::proc::process;
use crate::proc::syscall;

/// Called by the entry stubs (`arch::interrupts`) with the saved state: defined here, at the
/// top, so that the stubs reach the dispatcher without their layer importing this one.
#[no_mangle]
extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    dispatch(frame);
}

/// A write-out not asked for by the interrupted code (timer or VMM).
fn checkpoint(k: &mut Kernel, frame: &mut TrapFrame) {
    if let Err(e) = k.write_out(frame, false) {
        println!("plate: write-out failed: {e:?}");
    }
}

/// Acts on the VMM's `request` (`by_interrupt`: its interrupt brought it, rather than a
/// look at a tick), or on a periodic write-out that is due.
fn serve(k: &mut Kernel, frame: &mut TrapFrame, request: Request, by_interrupt: bool, periodic: bool) {
    match request {
        Request::Shutdown => k.shutdown(frame),
        Request::Checkpoint => {
            control::set_cause(if by_interrupt { Cause::RequestInterrupt } else { Cause::RequestAtTick });
            checkpoint(k, frame)
        }
        Request::None if periodic => {
            control::set_cause(Cause::Periodic);
            checkpoint(k, frame)
        }
        Request::None => {}
    }
}

/// Handles the entry described by `frame`; on return, `frame` is the context to resume.
pub fn dispatch(frame: &mut TrapFrame) {
    if ring3::owns(frame) {
        ring3::trap(frame);
        return;
    }
    match frame.vector {
        SYSCALL_VECTOR if from_user(frame) => syscall::handle(frame),
        v if v < u64::from(IRQ_BASE) => exception(frame),
        v if v == u64::from(IRQ_BASE) => {
            timer::end_of_interrupt(0);
            kernel::with(|k| {
                k.ticks += 1 + ring3::take_missed_ticks();
                if machine::power_off_due(k.ticks) {
                    println!("run time over");
                    k.shutdown(frame);
                }
                // Half a tick early is on time: the tick that ends the interval may come a
                // hair before the TSC says so.
                let half_tick = 500_000_000 / timer::hz().max(1);
                let periodic = timer::now_ns().saturating_add(half_tick) >= k.next_checkpoint_ns;
                // Requests come by their own interrupt (a look here too would take a request
                // whose interrupt is pending behind this one's); the tick looks when that
                // interrupt was lost in ring-3 work, and once a second in case.
                let slice = k.ticks.is_multiple_of(timer::slice_ticks());
                let look = ring3::take_missed_irq(REQUEST_IRQ) || k.ticks.is_multiple_of(timer::hz());
                let request = if look { control::request() } else { Request::None };
                serve(k, frame, request, false, periodic);
                if periodic {
                    // The next one is due an interval after this one ended: a write-out
                    // that outlasts the interval (a loaded host, many dirty pages) must not
                    // start the next at once, or the processes would never run between them.
                    k.next_checkpoint_ns = timer::now_ns().saturating_add(k.checkpoint_ns);
                }
                // Preempt every slice; the idle context must notice a sleeper that woke.
                if slice || k.current.is_none() {
                    process::schedule(k, frame);
                }
            });
        }
        v if v == u64::from(IRQ_BASE + REQUEST_IRQ) => {
            timer::end_of_interrupt(REQUEST_IRQ);
            kernel::with(|k| {
                serve(k, frame, control::request(), true, false);
                if k.current.is_none() {
                    process::schedule(k, frame);
                }
            });
        }
        v if v < u64::from(IRQ_BASE) + 16 => timer::end_of_interrupt((v - u64::from(IRQ_BASE)) as u8),
        _ => {}
    }
}

/// The page fault's vector.
const PAGE_FAULT: u64 = 14;

/// A CPU exception: a user process that faults is killed and the others go on; a fault in
/// the kernel stops the machine with everything a developer needs.
fn exception(frame: &mut TrapFrame) {
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    if from_user(frame) {
        kernel::with(|k| {
            let Some(pid) = k.current else { return };
            // A touch of 2 MiB a lazy restore left away: brought back, the access runs again.
            if frame.vector == PAGE_FAULT && kernel_core::lazy::is_user_not_present(frame.error_code) {
                let space = k.procs.get(pid).map(|p| p.space);
                if let (Some(plating), Some(space)) = (k.plating.as_mut(), space) {
                    if plate::lazy::on_fault(plating, k.res, space, cr2) {
                        return;
                    }
                }
            }
            let name = k.procs.get(pid).map_or("?", |p| p.name());
            let mut label = [0u8; 16];
            let len = name.len().min(16);
            label[..len].copy_from_slice(&name.as_bytes()[..len]);
            let name = core::str::from_utf8(&label[..len]).unwrap_or("?");
            println!(
                "process {pid} ({name}) killed: {} (vector {}, error code {:#x}, cr2 {cr2:#x}) at rip {:#x} cs {:#x} rsp {:#x}",
                exception_name(frame.vector),
                frame.vector,
                frame.error_code,
                frame.rip, frame.cs, frame.rsp
            );
            process::kill(k, pid);
            process::schedule(k, frame);
        });
        return;
    }
    console::emergency_print(format_args!(
        "\nKERNEL FAULT: {} (vector {}, error code {:#x}, cr2 {:#x})\n{}\n",
        exception_name(frame.vector),
        frame.vector,
        frame.error_code,
        cr2,
        ShowRegs(frame)
    ));
    machine::exit(ExitCode::Exception);
}
