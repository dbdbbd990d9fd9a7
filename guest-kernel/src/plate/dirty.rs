//! The dirty pages of user spaces, from the page tables' dirty bits, into the plate
//! function's frame-indexed dirty bitmap (which pages are re-armed: `kernel_core::dirty`).

use nvram::layout;
use nvram::plate::PlateKind;

use super::state::{Plating, PAGE};
use crate::arch::paging;

/// Collects dirty bits of one user space into the frame-indexed `dirty` bitmap.
pub(super) fn collect_into(root: u64, va: u64, pages: u64, dirty: &mut [u64], base: u64, rearm_all: bool) -> u64 {
    // The bitmap is word-indexed by frame; collect into a window starting at `base`'s word,
    // shifted so that page 0 lands on bit `base`.
    let shift = base % 64;
    let first = (base / 64) as usize;
    if shift == 0 {
        return paging::collect_dirty(root, va, pages, &mut dirty[first..], rearm_all);
    }
    // Unaligned start: collect into a small scratch window, then merge.
    let mut found = 0;
    let mut scratch = [0u64; 16];
    let mut done = 0;
    while done < pages {
        let chunk = (pages - done).min(64 * 15);
        scratch.fill(0);
        found += paging::collect_dirty(root, va + done * PAGE, chunk, &mut scratch, rearm_all);
        for i in 0..chunk {
            if scratch[(i / 64) as usize] & (1 << (i % 64)) != 0 {
                let bit = base + done + i;
                if let Some(w) = dirty.get_mut((bit / 64) as usize) {
                    *w |= 1 << (bit % 64);
                }
            }
        }
        done += chunk;
    }
    found
}

pub(super) fn clear(plating: &mut Plating) {
    for plate in plating.live.plates() {
        if plate.kind != PlateKind::UserSpace as u32 {
            continue;
        }
        let first = (plate.src - layout::FRAMES_BASE) / PAGE;
        for word in (first / 64)..=((first + plate.pages) / 64) {
            if let Some(w) = plating.dirty.get_mut(word as usize) {
                *w = 0;
            }
        }
    }
}
