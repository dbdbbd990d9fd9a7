//! Kernel work run at CPL 3: the plate function's bookkeeping (plate-ification, the plan and
//! commit of a write-out, the restore) executed by the CPU in user mode, in an address space
//! of its own.
//!
//! Why: under PVM, the hypervisor of the machines this runs on, kernel mode is emulated at
//! about a microsecond an instruction while user mode runs natively. The bookkeeping is a
//! few ten thousand instructions of pure computation over tables in NVM; at CPL 3 it takes
//! microseconds instead of tens of milliseconds. On VT-x/SVM both modes run natively and
//! the detour costs two ring crossings. `bookkeeping=ring0` on the command line keeps all of
//! it in kernel mode (to compare).
//!
//! How: [`run`] switches to the *work space*, a page table that maps all of RAM at the same
//! addresses as the kernel's identity map but open to user mode, and `iretq`s into
//! [`ring3_main`] on a stack of its own, with interrupts off: nothing else runs meanwhile,
//! as a write-out requires. The work returns with a trap (`int3`, [`DONE`] in `rax`);
//! the trap's fast path (`ring3_int3`) puts the kernel's address space and entry stack back
//! and resumes the kernel where it called [`run`]. What must stay privileged (the doorbells of
//! the copy engine and of the persist barrier, which are port writes) goes through
//! [`privileged`]: a trap ([`CALL`]) that runs a closure in kernel mode and returns.
//! While the work runs, an entry from user mode lands below the kernel's live frames
//! (the entry stack is moved down), never on top of them.
//!
//! The work is the kernel's own code, trusted as the kernel is; no process can reach the
//! work space, which is loaded only between [`run`] and its return.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use x86_64::registers::control::Cr3;

use crate::arch::frame::{exception_name, ShowRegs, TrapFrame, IRQ_BASE, SYSCALL_VECTOR};
use crate::arch::{fatal, gdt, timer};

/// `rax` of the trap that ends the work.
pub const DONE: u64 = 0x7e4d_0001;
/// `rax` of the trap that runs a closure (`rdi`) in kernel mode.
pub const CALL: u64 = 0x7e4d_0002;
/// `rax` of the trap that writes `esi` to the port `dx` ([`port_write`]).
pub const OUT: u64 = 0x7e4d_0003;

const _: () = assert!(nvram::layout::MAX_RAM <= 4 << 30, "the work space maps the first 4 GiB");

// The work space: data in the ELF image, like the boot page tables (`boot`), so that the
// loader writes it and no emulated instruction builds it. It maps the first 4 GiB (all of
// RAM, `nvram::layout::MAX_RAM` being 3 GiB) in 2 MiB pages, present, writable and open to
// user mode (0x87).
core::arch::global_asm!(
    r#"
    .section .data.boot, "aw"
    .p2align 12
ring3_pml4:
    .quad ring3_pdpt + 0x7
    .fill 511, 8, 0
ring3_pdpt:
    .quad ring3_pd + 0x7
    .quad ring3_pd + 0x1000 + 0x7
    .quad ring3_pd + 0x2000 + 0x7
    .quad ring3_pd + 0x3000 + 0x7
    .fill 508, 8, 0
ring3_pd:
    .set page, 0
    .rept 2048
    .quad (page << 21) | 0x87
    .set page, page + 1
    .endr
"#,
    options(att_syntax)
);

extern "C" {
    /// The work space's PML4.
    static ring3_pml4: u8;
    /// The work's stack (linker script: neither loaded nor zeroed).
    static __work_stack_top: u8;
    static __work_stack_bottom: u8;
}

/// The kernel's stack pointer inside `ring3_enter`, where the work's end resumes it.
static mut SAVED_RSP: u64 = 0;
/// The kernel's address space while the work runs.
static mut SAVED_CR3: u64 = 0;
/// The address of the TSS's ring-0 stack slot, and what it holds outside the work: for the
/// fast path of DONE, which puts it back.
static mut TSS_SLOT: u64 = 0;
static mut KERNEL_ENTRY_STACK: u64 = 0;

/// Runs of the work since the kernel started ([`runs`]).
static RUNS: AtomicU32 = AtomicU32::new(0);

/// Runs of the work since the kernel started (a trip to CPL 3 and back each; a run inside
/// a run is not one): what the boot reports, so that a boot that crosses more often than
/// it must shows.
pub fn runs() -> u32 {
    RUNS.load(Ordering::Relaxed)
}

/// Timer ticks taken while the work ran.
static MISSED_TICKS: AtomicU64 = AtomicU64::new(0);
/// Other interrupt lines taken (and acknowledged) while the work ran, one bit each.
static MISSED_IRQS: AtomicU64 = AtomicU64::new(0);
/// Written at the bottom of the work's stack by `run`, checked when the work ends.
const STACK_CANARY: u64 = 0x5354_4143_4b21_7e4d;

/// `bookkeeping=ring0` was not asked for.
static ENABLED: AtomicBool = AtomicBool::new(false);
/// Between `run`'s switch to ring 3 and the trap that ends the work.
static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Turns the work at CPL 3 on (`enabled`) or off (`bookkeeping=ring0`). The work space is
/// built already: the loader wrote it.
pub fn init(enabled: bool) {
    // SAFETY: set once at boot, before any work runs; read by the fast path of DONE.
    unsafe {
        TSS_SLOT = gdt::entry_stack_slot() as u64;
        KERNEL_ENTRY_STACK = gdt::kernel_stack_top();
    }
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether the bookkeeping runs at CPL 3.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

core::arch::global_asm!(
    r#"
    .section .text
    .global ring3_enter
/* rdi: the work, rsi: its stack top, rdx: &SAVED_RSP, rcx: &the TSS's ring-0 stack,
   r8: user code selector, r9: user data selector */
ring3_enter:
    push %rbp
    push %rbx
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, (%rdx)
    /* Entries from user mode now start below this frame. */
    lea -64(%rsp), %rax
    and $-16, %rax
    mov %rax, (%rcx)
    push %r9
    push %rsi
    push $0x2               /* rflags: interrupts off */
    push %r8
    lea ring3_main(%rip), %rax
    push %rax
    iretq

    .global ring3_leave
/* rdi: the stack pointer saved by ring3_enter; returns from ring3_enter */
ring3_leave:
    mov %rdi, %rsp
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %rbx
    pop %rbp
    ret
"#,
    options(att_syntax)
);

type Work<'a> = &'a mut dyn FnMut();

extern "C" {
    fn ring3_enter(work: *mut (), stack_top: u64, saved_rsp: *mut u64, entry_stack: *mut u64, cs: u64, ss: u64);
}

// The fast path of the two traps the work makes, before the common trap stub: under PVM
// each instruction of kernel mode costs about a microsecond, and the common path (every
// register saved, the dispatcher, the match) is about a hundred of them. Anything else,
// or a check that fails, goes the common way (`trap_stub_3`, then `trap` below, which
// reports what went wrong).
core::arch::global_asm!(
    r#"
    .section .text
    .global ring3_int3
ring3_int3:
    cmpb $0, {active}(%rip)         /* no work runs: a system call (two steps spent) */
    je trap_stub_3
    testb $3, 8(%rsp)               /* the CS the CPU pushed: from the work, at CPL 3? */
    jz 1f
    cmp {saved_rsp}(%rip), %rsp     /* the entry landed below the kernel's frames */
    jae 1f
    cmp ${done}, %rax
    je 2f
    cmp ${out}, %rax
    je 4f
    cmp ${call}, %rax
    je 3f
1:  jmp trap_stub_3

4:  /* OUT: one port write, the doorbell of a device (four instructions in kernel mode,
       where CALL takes some sixty). */
    push %rax
    mov %esi, %eax
    out %eax, %dx
    pop %rax
    iretq

2:  /* DONE: the stack canary holds; back to the kernel's space and entry stack; resume
       the kernel in run(), in ring3_enter's caller. */
    movabs ${canary}, %rcx
    cmp %rcx, {stack_bottom}(%rip)
    jne 1b
    movb $0, {active}(%rip)
    mov {saved_cr3}(%rip), %rax
    mov %rax, %cr3
    mov {tss_slot}(%rip), %rcx
    mov {kernel_entry}(%rip), %rax
    mov %rax, (%rcx)
    mov {saved_rsp}(%rip), %rdi
    jmp ring3_leave

3:  /* CALL: run the closure at rdi in kernel mode, saving what a call may clobber (nine
       registers: with the CPU's five, 16-byte aligned at the call), and return. */
    push %rax
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %r8
    push %r9
    push %r10
    push %r11
    call {call_work}
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rax
    iretq
"#,
    active = sym ACTIVE,
    saved_rsp = sym SAVED_RSP,
    saved_cr3 = sym SAVED_CR3,
    tss_slot = sym TSS_SLOT,
    kernel_entry = sym KERNEL_ENTRY_STACK,
    stack_bottom = sym __work_stack_bottom,
    call_work = sym ring3_call_work,
    done = const DONE,
    call = const CALL,
    out = const OUT,
    canary = const STACK_CANARY,
    options(att_syntax)
);

extern "C" {
    fn ring3_int3();
}

/// The entry of the breakpoint gate (the system-call trap): the fast path above.
pub fn int3_entry() -> x86_64::VirtAddr {
    x86_64::VirtAddr::new(ring3_int3 as *const () as u64)
}

/// Runs a privileged call's closure, for the fast path.
extern "C" fn ring3_call_work(work: *mut Work) {
    // SAFETY: `privileged` passed a pointer to its closure, which lives until the trap
    // returns to it.
    unsafe { (*work)() };
}

/// Where the work starts, at CPL 3 (`rdi` is left as `ring3_enter` had it).
#[no_mangle]
extern "C" fn ring3_main(work: *mut Work) -> ! {
    // SAFETY: `work` points at `run`'s closure, alive until the DONE trap below.
    unsafe { (*work)() };
    // SAFETY: the DONE trap does not return here: the kernel resumes in `run`.
    unsafe { core::arch::asm!("int3", in("rax") DONE, options(noreturn)) }
}

/// Runs `f` at CPL 3 in the work space (in kernel mode if the work space is off), and
/// returns its result. Called in kernel mode, interrupts off; returns with interrupts off.
pub fn run<R>(f: impl FnOnce() -> R) -> R {
    // Already in the work, or in a privileged call from it (the work space and the saved
    // state are in use): run here.
    if !enabled() || ACTIVE.load(Ordering::SeqCst) || in_user_mode() {
        return f();
    }
    as_work(f, |work| {
        let sel = gdt::selectors();
        RUNS.fetch_add(1, Ordering::Relaxed);
        ACTIVE.store(true, Ordering::SeqCst);
        // SAFETY: the work space maps all of RAM (the kernel's code, data, stacks and NVM)
        // at the kernel's addresses, so everything the work refers to stays reachable; the
        // bottom word of the work's stack is ours alone (the canary, checked at DONE); the
        // entry stack moves below this frame until DONE puts it back; `ring3_enter` returns
        // (through `ring3_leave`) when the work traps with DONE.
        unsafe {
            (&raw const __work_stack_bottom as *mut u64).write_volatile(STACK_CANARY);
            SAVED_CR3 = Cr3::read_raw().0.start_address().as_u64();
            load_cr3(&raw const ring3_pml4 as u64);
            // At the entry of `ring3_main`, as after a call: 8 below a 16-byte boundary.
            let top = &raw const __work_stack_top as u64 - 8;
            ring3_enter(
                (work as *mut Work).cast(),
                top,
                &raw mut SAVED_RSP,
                gdt::entry_stack_slot(),
                u64::from(sel.user_code.0),
                u64::from(sel.user_data.0),
            );
        }
    })
}

/// Runs `f` in kernel mode: directly when already there, else by a trap from the work.
pub fn privileged<R>(f: impl FnOnce() -> R) -> R {
    if !in_user_mode() || !ACTIVE.load(Ordering::SeqCst) {
        return f();
    }
    as_work(f, |work| {
        let ptr: *mut Work = work;
        // SAFETY: the CALL trap runs `work` in kernel mode and returns here, every register
        // as it was (the trap stub restores them).
        unsafe { core::arch::asm!("int3", inout("rax") CALL => _, in("rdi") ptr) };
    })
}

/// Writes `value` to the port `port`: directly in kernel mode, by a trap from the work
/// ([`OUT`], handled by the trap's fast path alone). Why not [`privileged`]: a device's
/// doorbell is one instruction, and under PVM each instruction of kernel mode costs about a
/// microsecond; a closure's call through the trap costs some sixty of them (the registers
/// saved, the closure's frames), the fast path four.
///
/// # Safety
///
/// As for any port write: whatever the device does with `value` (a doorbell's address, the
/// memory it names) must be sound; the caller is that device's driver.
pub unsafe fn port_write(port: u16, value: u32) {
    if !in_user_mode() || !ACTIVE.load(Ordering::SeqCst) {
        // SAFETY: per the caller's contract.
        unsafe { x86_64::instructions::port::Port::<u32>::new(port).write(value) };
        return;
    }
    // SAFETY: the OUT trap's fast path writes `esi` to the port `dx` and returns here with
    // every register as it was (it saves the one it uses, `rax`); the write per the caller.
    unsafe { core::arch::asm!("int3", in("rax") OUT, in("dx") port, in("esi") value) };
}

/// Hands `f` to `enter` as a [`Work`] (what the traps and `ring3_main` call through a
/// pointer), and returns `f`'s result once `enter` has had it run.
fn as_work<R>(f: impl FnOnce() -> R, enter: impl FnOnce(&mut Work)) -> R {
    let mut f = Some(f);
    let mut result = None;
    {
        let mut call = || {
            if let Some(f) = f.take() {
                result = Some(f());
            }
        };
        let mut work: Work = &mut call;
        enter(&mut work);
    }
    result.expect("the work ran to its end")
}

/// Whether the CPU runs at CPL 3 now (the work), from the code segment's RPL.
pub fn in_user_mode() -> bool {
    let cs: u16;
    // SAFETY: reading CS has no effect.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3 == 3
}

/// Loads `root` into CR3.
///
/// # Safety
///
/// `root` must map the running code, its stack and everything it will touch.
unsafe fn load_cr3(root: u64) {
    // SAFETY: per the caller's contract.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) root, options(nostack, preserves_flags)) };
}

/// Whether an entry came from the work (it then belongs to [`trap`]).
pub fn owns(frame: &TrapFrame) -> bool {
    frame.cs & 3 == 3 && ACTIVE.load(Ordering::SeqCst)
}

/// Handles an entry from the work that the fast path (`ring3_int3`) did not: an interrupt,
/// a fault (a kernel fault), or an end or a call whose checks failed. The work runs with IF
/// clear; should a hypervisor deliver an interrupt at CPL 3 regardless (PVM's documentation
/// allows it; none arrived in our runs), a timer tick is counted (see
/// [`take_missed_ticks`]) and nothing else runs.
pub fn trap(frame: &mut TrapFrame) {
    // The entry must have started below the kernel's live frames (the TSS's moved entry
    // stack): a hypervisor that ignored it would have written over them.
    // SAFETY: reading a static the kernel set before entering the work.
    if (frame as *const TrapFrame as u64) >= unsafe { SAVED_RSP } {
        broke_rule(frame, "an entry from it did not start below the kernel's frames");
    }
    match frame.vector {
        // The entry was checked above; the fast path declines an end only for the canary.
        SYSCALL_VECTOR if frame.rax == DONE => broke_rule(frame, "its stack overflowed"),
        v if (u64::from(IRQ_BASE)..u64::from(IRQ_BASE) + 16).contains(&v) => {
            if v == u64::from(IRQ_BASE) {
                MISSED_TICKS.fetch_add(1, Ordering::Relaxed);
            } else {
                MISSED_IRQS.fetch_or(1 << (v - u64::from(IRQ_BASE)), Ordering::Relaxed);
            }
            timer::end_of_interrupt((v - u64::from(IRQ_BASE)) as u8);
        }
        v => {
            let cr2 = x86_64::registers::control::Cr2::read_raw();
            fatal(
                format_args!(
                    "\nKERNEL FAULT in ring-3 kernel work: {} (vector {v}, error code {:#x}, cr2 {cr2:#x})\n{}\n",
                    exception_name(v),
                    frame.error_code,
                    ShowRegs(frame)
                ),
                nvram::exit::ExitCode::Exception,
            );
        }
    }
}

/// Stops the machine: the work broke a rule it cannot recover from. (`ACTIVE` stays set:
/// nothing runs after this.)
fn broke_rule(frame: &TrapFrame, what: &str) -> ! {
    fatal(
        format_args!("\nKERNEL FAULT in ring-3 kernel work: {what}\n{}\n", ShowRegs(frame)),
        nvram::exit::ExitCode::Exception,
    );
}

/// Timer ticks that arrived while the work ran (and were acknowledged there), since the
/// last call: the timer handler adds them to the kernel's tick count.
pub fn take_missed_ticks() -> u64 {
    MISSED_TICKS.swap(0, Ordering::Relaxed)
}

/// Whether interrupt line `irq` (not the timer's) arrived while the work ran, since the
/// last call: its handler never ran, so the timer handler acts for it.
pub fn take_missed_irq(irq: u8) -> bool {
    MISSED_IRQS.fetch_and(!(1 << irq), Ordering::Relaxed) & (1 << irq) != 0
}
