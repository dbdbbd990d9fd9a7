//! The PVH entry: from the 32-bit protected mode the boot protocol hands over to long mode.
//!
//! The PVH protocol (Xen `docs/misc/pvh.pandoc`) starts us at `pvh_start` in 32-bit protected
//! mode with paging off and `ebx` holding the physical address of `hvm_start_info`. We switch
//! to long mode with identity-mapped page tables that are *data in the ELF image*: the loader
//! writes them into RAM, so no emulated guest instruction is spent building them (kernel mode
//! is emulated at about 1 µs an instruction under PVM). The same goes for the zeroed statics
//! (the image has no `.bss`: `linker.ld`). Then we call [`crate::kmain`].
//!
//! The boot page tables map the first 4 GiB (the first 2 MiB with 4 KiB pages, the rest with
//! 2 MiB pages): all of RAM (`nvram::layout::MAX_RAM` is 3 GiB) and the local APIC and
//! I/O APIC above it. They are also the kernel half of every process's space (`paging`).

core::arch::global_asm!(
    r#"
    /* The PVH note: type 18 (XEN_ELFNOTE_PHYS32_ENTRY), name "Xen", an 8-byte descriptor
       holding the 32-bit entry point (QEMU reads 8 bytes, linux-loader 4). */
    .section .note.Xen, "a"
    .p2align 2
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .p2align 2
    .quad pvh_start

    .section .data.boot, "aw"
    .global boot_pml4, boot_pdpt, boot_pd, boot_pt0
    .p2align 12
boot_pml4:
    .quad boot_pdpt + 0x3
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x3
    .quad boot_pd + 0x1000 + 0x3
    .quad boot_pd + 0x2000 + 0x3
    .quad boot_pd + 0x3000 + 0x3
    .fill 508, 8, 0
boot_pd:
    /* The first 2 MiB through a page table, so that user mode can be let into the
       kernel's text pages alone (paging::init); the rest in 2 MiB pages. */
    .quad boot_pt0 + 0x3
    .set page, 1
    .rept 2047
    .quad (page << 21) | 0x83
    .set page, page + 1
    .endr
boot_pt0:
    .set page, 0
    .rept 512
    .quad (page << 12) | 0x3
    .set page, page + 1
    .endr

    .p2align 3
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
boot_gdt_end:
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .section .text.boot, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    mov %ebx, %esi                  /* start_info, kept for kmain */
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x620, %eax                 /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $0xc0000080, %ecx           /* EFER */
    rdmsr
    or $0x900, %eax                 /* LME | NXE */
    wrmsr
    mov %cr0, %eax
    and $0xfffffffb, %eax           /* clear EM */
    or $0x80000023, %eax            /* PG | NE | MP | PE */
    mov %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $long_mode_entry

    .code64
long_mode_entry:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    xor %eax, %eax
    mov %ax, %fs
    mov %ax, %gs
    mov $__stack_top, %rsp
    /* No .bss to zero: the linker script puts the zeroed statics in .data, which the
       loader writes whole. */
    mov %esi, %edi                  /* kmain(start_info) */
    xor %ebp, %ebp
    call kmain
1:  hlt
    jmp 1b
    "#,
    options(att_syntax)
);
