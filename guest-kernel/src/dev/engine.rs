//! The guest side of the copy engine (`nvram::engine`): bulk copies at the host's memory
//! speed, durable on completion. Under PVM, where this kernel's own `rep movsq` is emulated
//! step by step, it turns the copy phase of a write-out from hundreds of milliseconds into
//! a fraction of one. Absent under QEMU: the kernel then copies by itself.

use core::sync::atomic::{AtomicBool, Ordering};

use kernel_core::plates::{CopyRange, RangeSum};
use nvram::engine::{
    BatchHeader, DirtyRequest, BASE, BATCH_MAGIC, DIRTY_MAGIC, ENGINE_ID, FLAG_DURABLE, FLAG_SUM_ONLY, MAX_DESCRIPTORS,
    REG_DIRTY, STATUS_DONE, STATUS_PENDING,
};
use spin::Mutex;
use x86_64::instructions::port::Port;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// The batch header, in kernel memory (identity-mapped: its address is physical).
static BATCH: Mutex<BatchHeader> = Mutex::new(BatchHeader {
    magic: BATCH_MAGIC,
    count: 0,
    status: 0,
    failed: 0,
    flags: FLAG_DURABLE,
    descriptors: 0,
    sums: 0,
});

/// Detects the engine; `wanted` is false with `plate_copy=cpu`. Returns whether it is used.
/// From ring-3 kernel work too (the port is read in kernel mode).
pub fn init(wanted: bool) -> bool {
    // SAFETY: reading the identification register has no side effect; without the device
    // the port reads all ones.
    let present = crate::arch::ring3::privileged(|| unsafe { Port::<u32>::new(BASE).read() }) == ENGINE_ID;
    let on = present && wanted;
    ENABLED.store(on, Ordering::Relaxed);
    on
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Copies every range through the engine, durably; `false` if the engine refused the batch
/// (nothing was copied then, and the caller copies by itself). The ranges go to the engine
/// where they are: kernel memory is identity-mapped, so their address is physical.
///
/// From ring-3 kernel work (`ring3`), the batches are built there, natively, and only each
/// doorbell (a port) traps to kernel mode (`ring3::port_write`).
pub fn copy(ranges: &[CopyRange]) -> bool {
    copy_batches(ranges, None, FLAG_DURABLE)
}

/// [`copy`], with no write-back of the destinations: for copies whose durability nothing
/// relies on (a lazy restore's copies back to the live regions: a crash restores the
/// commit again, and a shutdown writes every line back).
pub fn copy_volatile(ranges: &[CopyRange]) -> bool {
    copy_batches(ranges, None, 0)
}

/// [`copy`], and the engine returns in `sums` (one per range) the content checksums of what
/// each copy wrote and, where asked, overwrote, computed as it copied. One batch: at most
/// `MAX_DESCRIPTORS` ranges, so that `false` (refused) always means that nothing was copied
/// and no sum written, and the caller can copy and sum by itself from the old contents.
pub fn copy_summed(ranges: &[CopyRange], sums: &mut [RangeSum]) -> bool {
    if ranges.len() > MAX_DESCRIPTORS as usize || sums.len() != ranges.len() {
        return false;
    }
    copy_batches(ranges, Some(sums), FLAG_DURABLE)
}

/// The content checksums of the ranges' bytes where they are (`sums[i].written`), copying
/// nothing (`FLAG_SUM_ONLY`: the ranges' `dst` is ignored): how a restore checks the save
/// areas it is about to trust without touching them. One batch, as [`copy_summed`]'s.
pub fn sum_in_place(ranges: &[CopyRange], sums: &mut [RangeSum]) -> bool {
    if ranges.len() > MAX_DESCRIPTORS as usize || sums.len() != ranges.len() {
        return false;
    }
    copy_batches(ranges, Some(sums), FLAG_SUM_ONLY)
}

fn copy_batches(ranges: &[CopyRange], mut sums: Option<&mut [RangeSum]>, flags: u64) -> bool {
    let mut batch = BATCH.lock();
    for (i, chunk) in ranges.chunks(MAX_DESCRIPTORS as usize).enumerate() {
        let at = i * MAX_DESCRIPTORS as usize;
        batch.magic = BATCH_MAGIC;
        batch.count = chunk.len() as u32;
        batch.status = STATUS_PENDING;
        batch.flags = flags;
        batch.descriptors = chunk.as_ptr() as u64;
        // With sums, one chunk only (`copy_summed`), as long as the ranges.
        batch.sums = match sums.as_deref_mut().map(|s| s.get_mut(at..at + chunk.len())) {
            Some(Some(s)) => s.as_mut_ptr() as u64,
            Some(None) => return false,
            None => 0,
        };
        let addr = &*batch as *const BatchHeader as u64;
        // SAFETY: the doorbell takes the physical address of the batch header, which stays
        // put and locked while the engine reads it, as do the borrowed array of ranges and
        // the borrowed array of sums the engine writes (as many as ranges: checked above);
        // the port write returns once the batch is done.
        unsafe { crate::arch::ring3::port_write(BASE, addr as u32) };
        // SAFETY: the engine wrote the status in place; read it as it is now.
        let status = unsafe { core::ptr::read_volatile(&batch.status) };
        if status != STATUS_DONE {
            crate::println!("copy engine: batch refused (status {status}, descriptor {})", batch.failed);
            return false;
        }
    }
    true
}

static DIRTY: Mutex<DirtyRequest> =
    Mutex::new(DirtyRequest { magic: DIRTY_MAGIC, status: 0, first_page: 0, pages: 0, out: 0 });

/// Asks the engine for the pages of `first_page..first_page + pages` that the CPU wrote
/// since the last request, as a bitmap written at physical `out`. `false` if the engine
/// could not (the caller then finds dirty pages by itself).
///
/// From ring-3 kernel work, it runs in kernel mode (the doorbell is a port).
pub fn dirty_log(first_page: u64, pages: u64, out: u64) -> bool {
    if !enabled() {
        return false;
    }
    crate::arch::ring3::privileged(|| dirty_log_in_kernel_mode(first_page, pages, out))
}

fn dirty_log_in_kernel_mode(first_page: u64, pages: u64, out: u64) -> bool {
    let mut request = DIRTY.lock();
    *request = DirtyRequest { magic: DIRTY_MAGIC, status: STATUS_PENDING, first_page, pages, out };
    let addr = &*request as *const DirtyRequest as u64;
    // SAFETY: the request stays put and locked while the engine reads it; the engine writes
    // only `out`'s bitmap (checked against guest RAM) and the status.
    unsafe { Port::<u32>::new(BASE + REG_DIRTY).write(addr as u32) };
    // SAFETY: the engine wrote the status in place.
    unsafe { core::ptr::read_volatile(&request.status) == STATUS_DONE }
}
