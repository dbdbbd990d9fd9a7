//! Starting a user program from its ELF file, a boot module: checked with
//! `nvram::program::check` (the very function the host tests and fuzzes), then each
//! `PT_LOAD` segment copied into a user space of the program's own at the address it was
//! linked for, a stack with the argument string on top, and a process entered at the ELF's
//! entry point as `nvram::abi` says.
//!
//! The spaces are in NVM like every other: plated with the process, so a restored or
//! resumed machine runs the program without its file. The file is read once, here, at the
//! cold boot that starts it. Nothing in it is trusted: a refusal is said on the console
//! and to the VMM (`nvram::control::Refused`), and the boot goes on with the other programs.
//!
//! The check and the copies run at CPL 3 when the kernel's work runs there (`ring3`):
//! they are pure computation over bytes, which PVM emulates at about a microsecond an
//! instruction in kernel mode.

use kernel_core::process::{Process, Regs, State};
use nvram::abi::{MAX_ARGS_LEN, STACK_PAGES};
use nvram::program::{self, ProgramError};
use nvram::pvh::ModListEntry;
use nvram::resources::{USER_EXECUTABLE, USER_WRITABLE};

use crate::arch::{gdt, pvh, ring3};
use crate::dev::control;
use crate::nvm::resources::{self, Place};
use crate::println;
use crate::proc::kernel::Kernel;
use crate::res_op;

const PAGE: u64 = 4096;

/// A boot module, located and named: its bytes not yet read.
#[derive(Debug, Clone, Copy)]
pub struct Module {
    pub name: &'static str,
    pub args: &'static str,
    paddr: u64,
    size: u64,
}

impl Module {
    /// The module `entry` of the start info; `kernel_cmdline` is the arguments of one
    /// without a command line (QEMU's `-initrd`).
    ///
    /// # Safety
    ///
    /// `entry` must come from `pvh::BootInfo::modules`.
    pub unsafe fn new(entry: &ModListEntry, kernel_cmdline: &'static str) -> Self {
        // SAFETY: per the caller.
        let cmdline = unsafe { pvh::module_cmdline(entry) };
        let (name, args) = nvram::pvh::split_module_cmdline(cmdline, kernel_cmdline);
        Self { name, args, paddr: entry.paddr, size: entry.size }
    }
}

/// Starts the program in `module`; says why not when it cannot.
pub fn start(k: &mut Kernel, module: &Module) -> Option<u32> {
    match try_start(k, module) {
        Ok(pid) => Some(pid),
        Err(e) => {
            println!("program {} REFUSED: {e}", module.name);
            control::refused(module.name, e);
            None
        }
    }
}

fn try_start(k: &mut Kernel, module: &Module) -> Result<u32, ProgramError> {
    let file = module_bytes(k, module)?;
    if module.args.len() > MAX_ARGS_LEN {
        return Err(ProgramError::ArgsTooLong);
    }
    let image = ring3::run(|| program::check(file))?;
    let pid = spawn(k, module.name, &image, file, module.args).ok_or(ProgramError::NoMemory)?;
    println!(
        "process {pid} ({}) started from its ELF file: {} segments, {} KiB",
        module.name,
        image.segments().len(),
        image.memory_bytes() >> 10
    );
    Ok(pid)
}

/// The module's bytes, if they lie where the kernel owns nothing: above the frame area
/// (the top reserve of RAM, where QEMU puts `-initrd`, or the VMM's module window above
/// RAM) and inside the identity map.
fn module_bytes(k: &Kernel, module: &Module) -> Result<&'static [u8], ProgramError> {
    let frames_end = k.header.frames_base + k.header.frames * PAGE;
    let end = module.paddr.checked_add(module.size);
    if module.paddr < frames_end || end.is_none_or(|e| e > 4 << 30) {
        return Err(ProgramError::Misplaced(module.paddr));
    }
    // SAFETY: the range is identity-mapped (below 4 GiB), holds no kernel or NVM structure
    // (above the frame area), and the loader wrote the module there; it is only read.
    Ok(unsafe { core::slice::from_raw_parts(module.paddr as *const u8, module.size as usize) })
}

/// Creates the process: its space, a user space per segment with the file's bytes, a
/// stack with `args` on top. `None` if NVM has no room (nothing of it is left then).
fn spawn(k: &mut Kernel, name: &str, image: &program::Program, file: &[u8], args: &str) -> Option<u32> {
    let mut padded = [0u8; 16];
    let len = name.len().min(15);
    padded[..len].copy_from_slice(&name.as_bytes()[..len]);
    let placeholder = Process { state: 0, space: 0, name: padded, wake_at: 0, regs: Regs::default() };
    let pid = k.procs.insert(placeholder)?;
    let Ok(space) = res_op!(space.create(&mut k.mem(), pid)) else {
        k.procs.remove(pid);
        return None;
    };
    let built = build(k, space, image, file, args);
    let Some((args_at, rsp)) = built else {
        // Frees every user space made so far with the space.
        let _ = res_op!(space.delete(&mut k.mem(), space));
        k.procs.remove(pid);
        return None;
    };
    let sel = gdt::selectors();
    let regs = Regs {
        rip: image.entry,
        cs: u64::from(sel.user_code.0),
        rflags: 0x202, // IF
        rsp,
        ss: u64::from(sel.user_data.0),
        rdi: args_at,
        rsi: args.len() as u64,
        ..Regs::default()
    };
    let p = k.procs.get_mut(pid)?;
    p.space = space;
    p.regs = regs;
    p.state = State::Runnable as u32;
    Some(pid)
}

/// The segments and the stack of `space`; the arguments' address and the initial `rsp`.
fn build(k: &mut Kernel, space: u32, image: &program::Program, file: &[u8], args: &str) -> Option<(u64, u64)> {
    for segment in image.segments() {
        let flags = match (segment.writable, segment.executable) {
            (true, _) => USER_WRITABLE,
            (false, true) => USER_EXECUTABLE,
            (false, false) => 0,
        };
        let id =
            res_op!(user_space.create(&mut k.mem(), space, segment.pages, flags, Place::At(segment.vaddr))).ok()?;
        let phys = resources::user_space_phys(k.res, id)?;
        let from = segment.file_offset as usize;
        let bytes = &file[from..from + segment.file_len as usize];
        copy_in(phys + segment.start_in_page, bytes);
    }
    let stack = res_op!(user_space.create(&mut k.mem(), space, STACK_PAGES, USER_WRITABLE, Place::Next)).ok()?;
    let phys = resources::user_space_phys(k.res, stack)?;
    let top = k.res.user_spaces.get(stack).map(|s| s.vaddr + s.pages * PAGE)?;
    // The arguments on top, 16-byte aligned; below them the stack as after a `call`.
    let room = (args.len() as u64).div_ceil(16) * 16;
    let args_at = top - room;
    copy_in(phys + (args_at - (top - STACK_PAGES * PAGE)), args.as_bytes());
    Some((args_at, args_at - 8))
}

/// Copies `bytes` to physical `dst` (fresh, zeroed frames of the program's own).
fn copy_in(dst: u64, bytes: &[u8]) {
    // SAFETY: `dst` is the start of a range inside a user space just created for these
    // bytes (the check bounded every segment by its pages), identity-mapped, and not the
    // source's memory (the module lies above the frame area).
    ring3::run(|| unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), dst as *mut u8, bytes.len()) });
}
