//! System calls: entered with `int3` (number in `rax`, arguments in `rdi`, `rsi`, `rdx`,
//! `r10`; see `interrupts` for why this trap), left with `iretq`; the result is in `rax`,
//! an error is `-errno`-like (see [`err`]). Every other register is preserved.
//!
//! | nr | call                                  | result                              |
//! |----|---------------------------------------|-------------------------------------|
//! | 0  | `write(ptr, len)` to the console      | bytes written                       |
//! | 1  | `yield()`                             | 0                                   |
//! | 2  | `sleep(ms)`                           | 0                                   |
//! | 3  | `time()`                              | nanoseconds since boot              |
//! | 4  | `map(pages)`: new user space, zeroed (and plated: its save areas too) | its address; [`err::NO_MEMORY`] when a table or the frames run out |
//! | 5  | `unmap(addr)`: delete that user space | 0                                   |
//! | 6  | `exit(code)`                          | does not return                     |
//! | 7  | `checkpoint()`: a write-out           | 0 (saved) now; 1 (restored) when the process resumes from it after a crash; [`err::UNSUPPORTED`] with `plate=off` |
//! | 8  | `report(name, progress, checksum, verified)`: a heartbeat to the VMM | 0    |
//! | 9  | `shutdown()`: a graceful shutdown of the machine | does not return; the next boot resumes here with 0 |

use nvram::control::{Heartbeat, Verified, NAME_LEN};
use nvram::resources::USER_WRITABLE;

use crate::arch::frame::TrapFrame;
use crate::arch::timer;
use crate::dev::control;
use crate::nvm::resources::{self, Place};
use crate::plate::{self, WriteOutError, SAVED};
use crate::print;
use crate::println;
use crate::proc::kernel::{self, Kernel};
use crate::proc::process;
use crate::res_op;

pub use nvram::abi::{err, nr};

/// Most pages one `map` may ask for (32 MiB: a space's page-table pool maps 58 MiB).
const MAX_MAP_PAGES: u64 = 8192;

/// Handles the system call in `frame`.
pub fn handle(frame: &mut TrapFrame) {
    kernel::with(|k| {
        let Some(pid) = k.current else { return };
        let [a, b, c, d] = [frame.rdi, frame.rsi, frame.rdx, frame.r10];
        let result = match frame.rax {
            nr::WRITE => write(k, a, b),
            nr::YIELD => {
                frame.rax = 0;
                process::schedule(k, frame);
                return;
            }
            nr::SLEEP => {
                frame.rax = 0;
                process::sleep(k, timer::ms_to_ticks(a));
                process::schedule(k, frame);
                return;
            }
            nr::TIME => timer::now_ns(),
            nr::MAP => map(k, a),
            nr::UNMAP => unmap(k, a),
            nr::EXIT => {
                println!("process {pid} exited with code {a}");
                process::kill(k, pid);
                process::schedule(k, frame);
                return;
            }
            nr::CHECKPOINT => {
                control::set_cause(nvram::control::Cause::Call);
                match k.write_out(frame, true) {
                    Ok(_) => SAVED,
                    Err(WriteOutError::Disabled) => err::UNSUPPORTED,
                    Err(WriteOutError::NoRoom) => err::NO_MEMORY,
                    Err(WriteOutError::Disk(_)) => err::IO,
                }
            }
            nr::REPORT => report(k, pid, a, b, c, d),
            nr::SHUTDOWN => {
                // The caller resumes from here after the next boot, with a 0 result.
                frame.rax = 0;
                k.shutdown(frame);
            }
            _ => err::NO_SUCH_CALL,
        };
        frame.rax = result;
    });
}

/// The bytes `addr..addr + len` of the current process, if it may read them; borrowed as
/// long as the kernel's state is, so that no unmap can free them meanwhile. Read through
/// the identity map of their frames (a user space is one run of frames), not at their user
/// address: the kernel's work at CPL 3, which formats what is printed (`dev::console`),
/// runs in an address space without the process's mappings. What a lazy restore left away
/// there is brought back first (its frames are behind until then).
fn user_bytes(k: &mut Kernel, addr: u64, len: u64) -> Option<&[u8]> {
    let space = k.procs.get(k.current?)?.space;
    let (id, user) = resources::user_space_at(k.res, space, addr, len)?;
    if let Some(plating) = k.plating.as_mut() {
        plate::lazy::settle_range(plating, k.res, space, addr, len);
    }
    let phys = resources::user_space_phys(k.res, id)? + (addr - user.vaddr);
    // SAFETY: the range lies in a user space of the current process, whose frames are
    // identity-mapped RAM in the kernel's and the work's address spaces.
    Some(unsafe { core::slice::from_raw_parts(phys as *const u8, len as usize) })
}

fn write(k: &mut Kernel, addr: u64, len: u64) -> u64 {
    let len = len.min(4096);
    match user_bytes(k, addr, len) {
        Some(bytes) => {
            print!("{}", core::str::from_utf8(bytes).unwrap_or("<invalid UTF-8>"));
            len
        }
        None => err::BAD_ADDRESS,
    }
}

fn map(k: &mut Kernel, pages: u64) -> u64 {
    if pages == 0 || pages > MAX_MAP_PAGES {
        return err::INVALID;
    }
    let Some(space) = k.current.and_then(|c| k.procs.get(c)).map(|p| p.space) else { return err::INVALID };
    // The space's page tables change: nothing of it may be left away by a lazy restore.
    if let Some(plating) = k.plating.as_mut() {
        plate::lazy::settle(plating, k.res, space);
    }
    let Ok(id) = res_op!(user_space.create(&mut k.mem(), space, pages, USER_WRITABLE, Place::Next)) else {
        return err::NO_MEMORY;
    };
    // With the plate function, the region gets its plate (two save areas) at once: if the
    // frames for them are not there, this map is what fails, cleanly, and not every
    // write-out from now on.
    if let Some(plating) = k.plating.as_mut() {
        if plate::plate_now(plating, k.res, &mut k.frames).is_err() {
            // Unplated, so deleted (and its frames freed) at once.
            let _ = res_op!(user_space.delete(&mut k.mem(), id));
            return err::NO_MEMORY;
        }
    }
    k.res.user_spaces.get(id).map_or(err::NO_MEMORY, |u| u.vaddr)
}

fn unmap(k: &mut Kernel, addr: u64) -> u64 {
    let Some(space) = k.current.and_then(|c| k.procs.get(c)).map(|p| p.space) else { return err::INVALID };
    match resources::user_space_at(k.res, space, addr, 1) {
        Some((id, user)) if user.vaddr == addr => match settle_then_delete(k, space, id) {
            Ok(()) => 0,
            Err(_) => err::INVALID,
        },
        _ => err::BAD_ADDRESS,
    }
}

/// Deletes user space `id` of `space`, whose page tables change: nothing of the space may
/// be left away by a lazy restore then.
fn settle_then_delete(k: &mut Kernel, space: u32, id: u32) -> Result<(), crate::nvm::resources::ResError> {
    if let Some(plating) = k.plating.as_mut() {
        plate::lazy::settle(plating, k.res, space);
    }
    res_op!(user_space.delete(&mut k.mem(), id))
}

fn report(k: &mut Kernel, pid: u32, name: u64, progress: u64, checksum: u64, verified: u64) -> u64 {
    let Some(bytes) = user_bytes(k, name, NAME_LEN as u64) else { return err::BAD_ADDRESS };
    let len = bytes.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    let Ok(name) = core::str::from_utf8(&bytes[..len]) else { return err::INVALID };
    let verified = match verified {
        1 => Verified::Passed,
        2 => Verified::Failed,
        _ => Verified::Unknown,
    };
    control::heartbeat(Heartbeat::new(name, pid, progress, checksum, verified));
    0
}
