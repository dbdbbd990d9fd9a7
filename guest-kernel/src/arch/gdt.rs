//! The kernel's GDT and TSS: flat kernel and user segments, the kernel stack the CPU
//! switches to on an interrupt from user mode, and a separate stack for double faults.
//!
//! The layout is Linux's, the one hypervisors know best (PVM among them).
//!
//! | selector | descriptor                         |
//! |----------|------------------------------------|
//! | 0x08     | kernel code, 32-bit (unused)       |
//! | 0x10     | kernel code                        |
//! | 0x18     | kernel data                        |
//! | 0x20     | user code, 32-bit (unused)         |
//! | 0x28     | user data (RPL 3: 0x2b)            |
//! | 0x30     | user code (RPL 3: 0x33)            |
//! | 0x38     | TSS (two slots)                    |

use core::cell::UnsafeCell;

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// IST slot of the double-fault stack.
pub const DOUBLE_FAULT_IST: u16 = 0;

const FAULT_STACK_SIZE: usize = 16 * 1024;

#[repr(align(16))]
#[allow(dead_code)] // Only its address is used.
struct Stack([u8; FAULT_STACK_SIZE]);

static mut DOUBLE_FAULT_STACK: Stack = Stack([0; FAULT_STACK_SIZE]);

/// The TSS. The CPU reads it at each entry from user mode; the kernel writes its ring-0
/// stack while ring-3 kernel work runs (`ring3`), so it is a cell, not a `Once`.
struct TssCell(UnsafeCell<TaskStateSegment>);

// SAFETY: one CPU; the TSS is written at init and by `ring3` with interrupts off.
unsafe impl Sync for TssCell {}

static TSS: TssCell = TssCell(UnsafeCell::new(TaskStateSegment::new()));
static GDT: Once<(GlobalDescriptorTable<10>, Selectors)> = Once::new();

/// The selectors of the GDT.
#[derive(Debug, Clone, Copy)]
pub struct Selectors {
    pub kernel_code: SegmentSelector,
    pub kernel_data: SegmentSelector,
    pub user_data: SegmentSelector,
    pub user_code: SegmentSelector,
    tss: SegmentSelector,
}

extern "C" {
    /// Top of the kernel stack (linker script): where every entry from user mode starts.
    static __stack_top: u8;
}

/// Top of the kernel stack.
pub fn kernel_stack_top() -> u64 {
    &raw const __stack_top as u64
}

/// The TSS's ring-0 stack slot: where the CPU starts the kernel stack at an entry from user
/// mode. `ring3` moves it below the live frames while kernel work runs at CPL 3 (from asm:
/// the TSS is packed, so the slot may not be 8-byte aligned).
pub fn entry_stack_slot() -> *mut u64 {
    // SAFETY: only the address is taken; `VirtAddr` is a transparent `u64`.
    unsafe { (&raw mut (*TSS.0.get()).privilege_stack_table[0]).cast::<u64>() }
}

/// The GDT's selectors (after [`init`]).
pub fn selectors() -> Selectors {
    GDT.get().expect("the GDT is loaded first thing at boot").1
}

/// Loads the GDT and the TSS and reloads every segment register.
pub fn init() -> Selectors {
    // SAFETY: init runs once, first thing at boot, before any entry from user mode reads
    // the TSS; no reference to it outlives this block (the CPU reads it, and `ring3` writes
    // its ring-0 stack slot through a raw pointer).
    unsafe {
        let tss = &mut *TSS.0.get();
        let stack_top = VirtAddr::from_ptr(&raw const DOUBLE_FAULT_STACK) + FAULT_STACK_SIZE as u64;
        tss.interrupt_stack_table[DOUBLE_FAULT_IST as usize] = stack_top;
        tss.privilege_stack_table[0] = VirtAddr::new(kernel_stack_top());
    }
    let (gdt, selectors) = GDT.call_once(|| {
        let mut gdt = GlobalDescriptorTable::<10>::empty();
        gdt.append(Descriptor::kernel_data_segment()); // 0x08: placeholder
        let kernel_code = gdt.append(Descriptor::kernel_code_segment());
        let kernel_data = gdt.append(Descriptor::kernel_data_segment());
        gdt.append(Descriptor::user_data_segment()); // 0x20: placeholder
        let user_data = gdt.append(Descriptor::user_data_segment());
        let user_code = gdt.append(Descriptor::user_code_segment());
        // SAFETY: the TSS is a static, valid for the whole boot, with no I/O map.
        let tss = gdt.append(unsafe { Descriptor::tss_segment_unchecked(TSS.0.get()) });
        (gdt, Selectors { kernel_code, kernel_data, user_data, user_code, tss })
    });
    gdt.load();
    // SAFETY: the selectors come from the GDT just loaded, which lives for the whole boot.
    unsafe {
        CS::set_reg(selectors.kernel_code);
        DS::set_reg(selectors.kernel_data);
        ES::set_reg(selectors.kernel_data);
        SS::set_reg(selectors.kernel_data);
        load_tss(selectors.tss);
    }
    *selectors
}
