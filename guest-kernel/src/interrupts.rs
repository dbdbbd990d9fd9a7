//! The IDT, the entry stubs of the CPU exceptions and their dispatch.
//!
//! Handlers are installed by address: each vector has a small assembly stub that pushes a
//! uniform [`TrapFrame`] (a zero error code where the CPU pushes none, then the vector) and
//! jumps to a common path that saves the general registers and calls [`trap_dispatch`].
//! (The `x86-interrupt` calling convention would do this for us, but needs nightly.)

use core::fmt;

use spin::Once;
use x86_64::structures::idt::InterruptDescriptorTable;
use x86_64::VirtAddr;

use crate::{gdt, machine, println};

/// The state of the interrupted code, as the stubs leave it on the stack.
#[derive(Debug)]
#[repr(C)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl fmt::Display for TrapFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  rip {:#018x}  cs {:#06x}  rflags {:#010x}", self.rip, self.cs, self.rflags)?;
        writeln!(f, "  rsp {:#018x}  ss {:#06x}", self.rsp, self.ss)?;
        writeln!(f, "  rax {:#018x} rbx {:#018x} rcx {:#018x}", self.rax, self.rbx, self.rcx)?;
        writeln!(f, "  rdx {:#018x} rsi {:#018x} rdi {:#018x}", self.rdx, self.rsi, self.rdi)?;
        writeln!(f, "  rbp {:#018x} r8  {:#018x} r9  {:#018x}", self.rbp, self.r8, self.r9)?;
        writeln!(f, "  r10 {:#018x} r11 {:#018x} r12 {:#018x}", self.r10, self.r11, self.r12)?;
        write!(f, "  r13 {:#018x} r14 {:#018x} r15 {:#018x}", self.r13, self.r14, self.r15)
    }
}

/// Number of exception vectors (0 to 31).
const EXCEPTIONS: usize = 32;

core::arch::global_asm!(
    r#"
    .section .text
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
trap_stub_\n:
    /* Vectors 8, 10-14, 17, 21, 29, 30 come with an error code from the CPU. */
    .if (\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    .else
    push $0
    .endif
    push $\n
    jmp trap_common
    .endr

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
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .quad trap_stub_\n
    .endr
    "#,
    options(att_syntax)
);

extern "C" {
    /// The addresses of the 32 exception stubs, in vector order.
    static trap_stubs: [u64; EXCEPTIONS];
}

static IDT: Once<InterruptDescriptorTable> = Once::new();

/// Installs the exception handlers.
pub fn init() {
    let idt = IDT.call_once(|| {
        let mut idt = InterruptDescriptorTable::new();
        // SAFETY: `trap_stubs` is an immutable table in .rodata filled by the linker.
        let stubs = unsafe { &trap_stubs };
        let addr = |vector: usize| VirtAddr::new(stubs[vector]);
        // SAFETY: each address is the entry of a stub that saves a full TrapFrame and
        // returns with `iretq`, as an IDT handler must.
        unsafe {
            idt.divide_error.set_handler_addr(addr(0));
            idt.debug.set_handler_addr(addr(1));
            idt.non_maskable_interrupt.set_handler_addr(addr(2));
            idt.breakpoint.set_handler_addr(addr(3));
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
        }
        idt
    });
    idt.load();
}

/// Name of an exception vector.
fn exception_name(vector: u64) -> &'static str {
    const NAMES: [&str; 22] = [
        "divide error",
        "debug",
        "non-maskable interrupt",
        "breakpoint",
        "overflow",
        "bound range exceeded",
        "invalid opcode",
        "device not available",
        "double fault",
        "coprocessor segment overrun",
        "invalid TSS",
        "segment not present",
        "stack-segment fault",
        "general protection fault",
        "page fault",
        "reserved",
        "x87 floating-point error",
        "alignment check",
        "machine check",
        "SIMD floating-point error",
        "virtualization exception",
        "control protection exception",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("exception")
}

/// Called by the stubs with the saved state. A CPU exception in the kernel is fatal: report
/// everything a developer needs and stop the machine.
#[no_mangle]
extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    let cr2 = x86_64::registers::control::Cr2::read_raw();
    crate::console::emergency_print(format_args!(
        "\nKERNEL FAULT: {} (vector {}, error code {:#x}, cr2 {:#x})\n{}\n",
        exception_name(frame.vector),
        frame.vector,
        frame.error_code,
        cr2,
        frame
    ));
    machine::exit(nvram::exit::ExitCode::Exception);
}

/// Loads an empty IDT and faults: with no handler the CPU escalates to a triple fault,
/// which resets (here: stops) the machine. Used to test how the VMM reports it.
pub fn triple_fault() -> ! {
    static EMPTY: x86_64::structures::DescriptorTablePointer =
        x86_64::structures::DescriptorTablePointer { limit: 0, base: VirtAddr::zero() };
    println!("provoking a triple fault");
    // SAFETY: deliberately breaks interrupt handling; the next instruction faults and the
    // CPU shuts down. Nothing runs after it.
    unsafe {
        x86_64::instructions::tables::lidt(&EMPTY);
        core::arch::asm!("ud2", options(noreturn));
    }
}
