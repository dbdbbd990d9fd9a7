//! The state an entry saves ([`TrapFrame`]) and what is known about entries: the vectors,
//! the exceptions' names, how to print a frame. Apart from the IDT and its stubs
//! (`interrupts`), so that the CPL-3 work runner (`ring3`), whose fast path the IDT
//! installs, can use them without a circle between the two.

use core::fmt;

/// The state of the interrupted code, as the stubs leave it on the stack; the same layout
/// as a process's saved registers in NVM.
pub type TrapFrame = kernel_core::process::Regs;

/// Vector of a system call: `int3`, the breakpoint trap.
pub const SYSCALL_VECTOR: u64 = 3;
/// First vector of the PIC's interrupts (IRQ 0, the timer).
pub const IRQ_BASE: u8 = 32;

/// Whether `frame` interrupted user mode.
pub fn from_user(frame: &TrapFrame) -> bool {
    frame.cs & 3 == 3
}

/// Prints a frame's registers.
pub struct ShowRegs<'a>(pub &'a TrapFrame);

impl fmt::Display for ShowRegs<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        writeln!(f, "  rip {:#018x}  cs {:#06x}  rflags {:#010x}", r.rip, r.cs, r.rflags)?;
        writeln!(f, "  rsp {:#018x}  ss {:#06x}", r.rsp, r.ss)?;
        writeln!(f, "  rax {:#018x} rbx {:#018x} rcx {:#018x}", r.rax, r.rbx, r.rcx)?;
        writeln!(f, "  rdx {:#018x} rsi {:#018x} rdi {:#018x}", r.rdx, r.rsi, r.rdi)?;
        writeln!(f, "  rbp {:#018x} r8  {:#018x} r9  {:#018x}", r.rbp, r.r8, r.r9)?;
        writeln!(f, "  r10 {:#018x} r11 {:#018x} r12 {:#018x}", r.r10, r.r11, r.r12)?;
        write!(f, "  r13 {:#018x} r14 {:#018x} r15 {:#018x}", r.r13, r.r14, r.r15)
    }
}

/// Name of an exception vector.
pub fn exception_name(vector: u64) -> &'static str {
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
