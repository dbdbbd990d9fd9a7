//! The IDT and the kernel's entry stubs: CPU exceptions, the PIC's interrupts and `syscall`.
//!
//! Every entry builds the same [`TrapFrame`] on the kernel stack (a zero error code where the
//! CPU pushes none, then the vector), saves the general registers and calls
//! `trap_dispatch`, which may rewrite the frame to switch processes. That symbol is defined
//! by the top layer (`proc::trap`), not imported: this layer stays below everything it
//! dispatches to, and the linker fails if no layer defines it. The common exit restores
//! the registers from the frame and returns with `iretq`. (The `x86-interrupt` calling
//! convention would generate this, but needs nightly.)
//!
//! System calls enter by `int3` (`frame::SYSCALL_VECTOR`, the breakpoint gate, open to
//! ring 3) and leave by `iretq`. Under PVM, the hypervisor of the machines this runs on, the
//! `syscall` instruction lands at LSTAR still in user mode, `int n` from ring 3 kills the
//! VM and `sysretq` raises #GP, while a trap instruction and `iretq` work; they work on
//! VT-x/SVM alike.
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::VirtAddr;

use crate::arch::frame::{TrapFrame, IRQ_BASE};
use crate::arch::gdt;

/// Number of stubs: 32 exceptions and the 16 PIC interrupts.
const STUBS: usize = 48;

core::arch::global_asm!(
    r#"
    .section .text
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
trap_stub_\n:
    /* Vectors 8, 10-14, 17, 21, 29, 30 come with an error code from the CPU. */
    .if (\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    .else
    push $0
    .endif
    push $\n
    jmp trap_common
    .endr
    /* The breakpoint gate enters by ring3's fast path, which falls back to this stub. */
    .global trap_stub_3

trap_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    /* Keep the stack 16-byte aligned at the call, as the ABI requires. */
    mov %rsp, %rbx
    and $-16, %rsp
    call trap_dispatch
    mov %rbx, %rsp
    .global trap_return
trap_return:
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq

    .section .rodata
    .p2align 3
trap_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
    .quad trap_stub_\n
    .endr
    "#,
    options(att_syntax)
);

extern "C" {
    /// The addresses of the stubs, in vector order.
    static trap_stubs: [u64; STUBS];
}

/// The IDT, every entry missing until [`init`]: a static built at compile time, so that the
/// loader writes its 4 KiB and no emulated instruction does (building it on the stack and
/// moving it into place took 2 ms of every boot under PVM).
static IDT: IdtCell = IdtCell(core::cell::UnsafeCell::new(InterruptDescriptorTable::new()));

/// [`IDT`]'s cell: written once by [`init`], then only read by the CPU.
struct IdtCell(core::cell::UnsafeCell<InterruptDescriptorTable>);

// SAFETY: one CPU, and the only write is `init`'s, at boot, before interrupts are enabled.
unsafe impl Sync for IdtCell {}

/// Installs the exception and interrupt handlers.
pub fn init() {
    {
        // SAFETY: called once, at boot, on the only CPU and before interrupts are enabled:
        // nothing else refers to the IDT while its handlers are filled in.
        let idt = unsafe { &mut *IDT.0.get() };
        // SAFETY: `trap_stubs` is an immutable table in .rodata filled by the linker.
        let stubs = unsafe { &trap_stubs };
        let addr = |vector: usize| VirtAddr::new(stubs[vector]);
        // SAFETY: each address is the entry of a stub that saves a full TrapFrame and
        // returns with `iretq`, as an IDT handler must.
        unsafe {
            idt.divide_error.set_handler_addr(addr(0));
            idt.debug.set_handler_addr(addr(1));
            idt.non_maskable_interrupt.set_handler_addr(addr(2));
            idt.breakpoint
                .set_handler_addr(crate::arch::ring3::int3_entry())
                .set_privilege_level(x86_64::PrivilegeLevel::Ring3);
            idt.overflow.set_handler_addr(addr(4));
            idt.bound_range_exceeded.set_handler_addr(addr(5));
            idt.invalid_opcode.set_handler_addr(addr(6));
            idt.device_not_available.set_handler_addr(addr(7));
            idt.double_fault.set_handler_addr(addr(8)).set_stack_index(gdt::DOUBLE_FAULT_IST);
            idt.invalid_tss.set_handler_addr(addr(10));
            idt.segment_not_present.set_handler_addr(addr(11));
            idt.stack_segment_fault.set_handler_addr(addr(12));
            idt.general_protection_fault.set_handler_addr(addr(13));
            idt.page_fault.set_handler_addr(addr(14));
            idt.x87_floating_point.set_handler_addr(addr(16));
            idt.alignment_check.set_handler_addr(addr(17));
            idt.machine_check.set_handler_addr(addr(18));
            idt.simd_floating_point.set_handler_addr(addr(19));
            idt.virtualization.set_handler_addr(addr(20));
            idt.cp_protection_exception.set_handler_addr(addr(21));
            idt.hv_injection_exception.set_handler_addr(addr(28));
            idt.vmm_communication_exception.set_handler_addr(addr(29));
            idt.security_exception.set_handler_addr(addr(30));
            for irq in 0..16u8 {
                idt[IRQ_BASE + irq].set_handler_addr(addr(usize::from(IRQ_BASE + irq)));
            }
        }
    }
    // SAFETY: from here on the IDT is only read (by the CPU).
    unsafe { (*IDT.0.get()).load() };
}

/// Loads an empty IDT and faults: with no handler the CPU escalates to a triple fault,
/// which resets (here: stops) the machine. Used to test how the VMM reports it. (The
/// caller announces it: this layer has no console.)
pub fn triple_fault() -> ! {
    static EMPTY: x86_64::structures::DescriptorTablePointer =
        x86_64::structures::DescriptorTablePointer { limit: 0, base: VirtAddr::zero() };
    // SAFETY: deliberately breaks interrupt handling; the next instruction faults and the
    // CPU shuts down. Nothing runs after it.
    unsafe {
        x86_64::instructions::tables::lidt(&EMPTY);
        core::arch::asm!("ud2", options(noreturn));
    }
}

extern "C" {
    /// The common exit of the stubs: restores a [`TrapFrame`] at `rsp` and `iretq`s.
    fn trap_return() -> !;
}

/// Enters the context in `frame` (user or kernel) by way of the common trap exit.
pub fn enter(frame: &TrapFrame) -> ! {
    let top = gdt::kernel_stack_top();
    let size = core::mem::size_of::<TrapFrame>() as u64;
    let at = (top - size) & !15;
    // SAFETY: the kernel stack is ours alone here (nothing below it is live: this never
    // returns); the frame is copied to its top and `trap_return` pops it.
    unsafe {
        core::ptr::write(at as *mut TrapFrame, *frame);
        core::arch::asm!("mov rsp, {0}", "jmp {1}", in(reg) at, sym trap_return, options(noreturn));
    }
}
