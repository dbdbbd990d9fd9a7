//! Physical memory helpers. All of RAM is identity-mapped in the kernel half (see `paging`),
//! so a physical address is also the kernel's pointer to it.

/// Zeroes `len` bytes (a multiple of 8) at physical `addr`, 8 bytes per step: under PVM each
/// step of a `rep` costs about a microsecond, so width matters.
pub fn zero(addr: u64, len: u64) {
    // SAFETY: callers pass memory they own (fresh frames or their own tables), identity-mapped.
    unsafe {
        core::arch::asm!(
            "rep stosq",
            inout("rdi") addr => _,
            inout("rcx") len / 8 => _,
            in("rax") 0u64,
            options(nostack, preserves_flags)
        );
    }
}

/// Copies `len` bytes (a multiple of 8) from physical `src` to physical `dst`, 8 bytes a
/// step. The ranges must not overlap.
pub fn copy(dst: u64, src: u64, len: u64) {
    // SAFETY: callers pass identity-mapped ranges they own (plates and their save areas).
    unsafe {
        core::arch::asm!(
            "rep movsq",
            inout("rdi") dst => _,
            inout("rsi") src => _,
            inout("rcx") len / 8 => _,
            options(nostack, preserves_flags)
        );
    }
}
