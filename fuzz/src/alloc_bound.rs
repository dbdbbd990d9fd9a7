//! The heap one input may make a decoder use. A counting global allocator records the
//! bytes live on the fuzzing thread above where the input started; [`within`] fails the
//! input whose peak passes the bound. A guest or a client that names a huge length must
//! get a refusal, not an allocation of that length.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The most heap an input may cost (well above any record the devices accept: a
/// machine-control message is at most 4 KiB, a virtio queue 256 entries).
pub const MAX_HEAP_PER_INPUT: usize = 16 << 20;

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // `try_with`: the thread-locals may be gone while the thread exits.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is passed on to the system allocator unchanged; only counts are kept.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as isize);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-(layout.size() as isize));
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as isize);
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size as isize - layout.size() as isize);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Runs `f`, failing if the heap it used at its peak passed [`MAX_HEAP_PER_INPUT`].
pub fn within<R>(f: impl FnOnce() -> R) -> R {
    let start = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(start));
    let result = f();
    let used = PEAK.with(Cell::get) - start;
    assert!(used <= MAX_HEAP_PER_INPUT as isize, "one input used {used} bytes of heap");
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_allocation_past_the_bound_is_caught() {
        let caught = std::panic::catch_unwind(|| super::within(|| vec![0u8; super::MAX_HEAP_PER_INPUT + 1].len()));
        assert!(caught.is_err());
        assert_eq!(super::within(|| vec![0u8; 1024].len()), 1024);
    }
}
