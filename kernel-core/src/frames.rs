//! The real-memory (physical frame) allocator: a bitmap kept in NVM, one bit per 4 KiB
//! frame, 1 = in use.
//!
//! Allocation is next-fit for a run of contiguous frames: the search starts where the last
//! allocation ended (a hint kept for this boot, not in NVM) and wraps around once, so that
//! a burst of allocations (hundreds of save areas at one plate-ification) does not rescan
//! the frames already handed out. Whole words are skipped at once: under PVM every kernel
//! instruction is emulated, so the scan must touch as few words as it can.

/// Why an allocation or a free failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// No run of free frames is long enough.
    OutOfMemory,
    /// The range is outside the managed frames, or not allocated.
    BadFree,
}

/// A view of the bitmap: `words` in NVM, managing `frames` frames starting at `base`.
pub struct FrameBitmap<'a> {
    words: &'a mut [u64],
    base: u64,
    frames: u64,
    /// Where the next search starts.
    hint: u64,
}

/// Words of bitmap needed for `frames` frames.
pub const fn words_for(frames: u64) -> usize {
    frames.div_ceil(64) as usize
}

const PAGE: u64 = 4096;

impl<'a> FrameBitmap<'a> {
    /// Wraps `words` (at least [`words_for`]`(frames)` of them) managing the frames at
    /// physical `base`. A fresh (zeroed) bitmap has every frame free.
    pub fn new(words: &'a mut [u64], base: u64, frames: u64) -> Option<Self> {
        (words.len() >= words_for(frames) && base.is_multiple_of(PAGE)).then_some(Self { words, base, frames, hint: 0 })
    }

    /// The bitmap's words (for a consistency check: `nvram::fsck`).
    pub fn words(&self) -> &[u64] {
        self.words
    }

    fn is_used(&self, frame: u64) -> bool {
        self.words[(frame / 64) as usize] & (1 << (frame % 64)) != 0
    }

    fn set(&mut self, frame: u64, used: bool) {
        let word = &mut self.words[(frame / 64) as usize];
        if used {
            *word |= 1 << (frame % 64);
        } else {
            *word &= !(1 << (frame % 64));
        }
    }

    /// Allocates `count` contiguous frames; returns the physical address of the first.
    pub fn alloc(&mut self, count: u64) -> Result<u64, FrameError> {
        if count == 0 || count > self.frames {
            return Err(FrameError::OutOfMemory);
        }
        let hint = self.hint.min(self.frames);
        let found = self.search(hint, self.frames, count).or_else(|| self.search(0, hint + count - 1, count));
        let Some(start) = found else { return Err(FrameError::OutOfMemory) };
        for f in start..start + count {
            self.set(f, true);
        }
        self.hint = start + count;
        Ok(self.base + start * PAGE)
    }

    /// First run of `count` free frames starting in `from..to` (and ending by `frames`).
    fn search(&self, from: u64, to: u64, count: u64) -> Option<u64> {
        let mut start = from;
        while start < to.min(self.frames) && start + count <= self.frames {
            // Skip a full word in one step.
            if start.is_multiple_of(64) && self.words[(start / 64) as usize] == u64::MAX {
                start += 64;
                continue;
            }
            match (start..start + count).find(|&f| self.is_used(f)) {
                None => return Some(start),
                Some(used) => start = used + 1,
            }
        }
        None
    }

    /// Frees `count` frames at physical `addr`, all of which must be allocated.
    pub fn free(&mut self, addr: u64, count: u64) -> Result<(), FrameError> {
        let first = self.frame_of(addr).ok_or(FrameError::BadFree)?;
        if count == 0 || first + count > self.frames || !(first..first + count).all(|f| self.is_used(f)) {
            return Err(FrameError::BadFree);
        }
        for f in first..first + count {
            self.set(f, false);
        }
        Ok(())
    }

    /// Marks `count` frames at `addr` as used (for frames taken before the allocator ran).
    pub fn reserve(&mut self, addr: u64, count: u64) -> Result<(), FrameError> {
        let first = self.frame_of(addr).ok_or(FrameError::BadFree)?;
        if first + count > self.frames {
            return Err(FrameError::BadFree);
        }
        for f in first..first + count {
            self.set(f, true);
        }
        Ok(())
    }

    fn frame_of(&self, addr: u64) -> Option<u64> {
        let offset = addr.checked_sub(self.base)?;
        (offset.is_multiple_of(PAGE) && offset / PAGE < self.frames).then_some(offset / PAGE)
    }

    /// Frames in use.
    pub fn used(&self) -> u64 {
        let full = (self.frames / 64) as usize;
        let mut used: u64 = self.words[..full].iter().map(|w| u64::from(w.count_ones())).sum();
        for f in (full as u64 * 64)..self.frames {
            used += u64::from(self.is_used(f));
        }
        used
    }

    /// Frames managed.
    pub fn frames(&self) -> u64 {
        self.frames
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    const BASE: u64 = 16 << 20;

    #[test]
    fn allocates_next_fit_wraps_and_frees() {
        let mut words = vec![0u64; words_for(200)];
        let mut bitmap = FrameBitmap::new(&mut words, BASE, 200).unwrap();
        assert_eq!(bitmap.alloc(1), Ok(BASE));
        assert_eq!(bitmap.alloc(3), Ok(BASE + PAGE));
        assert_eq!(bitmap.alloc(70), Ok(BASE + 4 * PAGE));
        assert_eq!(bitmap.used(), 74);
        bitmap.free(BASE + PAGE, 3).unwrap();
        assert_eq!(bitmap.alloc(2), Ok(BASE + 74 * PAGE), "next fit: after the last allocation");
        assert_eq!(bitmap.alloc(124), Ok(BASE + 76 * PAGE), "up to the end");
        assert_eq!(bitmap.alloc(2), Ok(BASE + PAGE), "wraps around to the hole");
        assert_eq!(bitmap.alloc(2), Err(FrameError::OutOfMemory), "a hole of 1 is too small");
        assert_eq!(bitmap.alloc(1), Ok(BASE + 3 * PAGE));
        assert_eq!(bitmap.alloc(1000), Err(FrameError::OutOfMemory));
    }

    #[test]
    fn bad_frees_are_refused_and_change_nothing() {
        let mut words = vec![0u64; words_for(64)];
        let mut bitmap = FrameBitmap::new(&mut words, BASE, 64).unwrap();
        let a = bitmap.alloc(2).unwrap();
        assert_eq!(bitmap.free(a, 3), Err(FrameError::BadFree), "frame 2 is free");
        assert_eq!(bitmap.free(a + 1, 1), Err(FrameError::BadFree), "unaligned");
        assert_eq!(bitmap.free(BASE - PAGE, 1), Err(FrameError::BadFree), "below the base");
        assert_eq!(bitmap.free(BASE + 64 * PAGE, 1), Err(FrameError::BadFree), "past the end");
        assert_eq!(bitmap.used(), 2);
        bitmap.free(a, 2).unwrap();
        assert_eq!(bitmap.free(a, 2), Err(FrameError::BadFree), "double free");
    }

    #[test]
    fn fills_up_exactly() {
        let mut words = vec![0u64; words_for(130)];
        let mut bitmap = FrameBitmap::new(&mut words, BASE, 130).unwrap();
        for i in 0..130 {
            assert_eq!(bitmap.alloc(1), Ok(BASE + i * PAGE));
        }
        assert_eq!(bitmap.alloc(1), Err(FrameError::OutOfMemory));
        assert_eq!(bitmap.used(), 130);
    }

    proptest! {
        /// Against a model: allocations never overlap, frees release exactly, counts agree.
        #[test]
        fn never_hands_out_a_frame_twice(ops in proptest::collection::vec((1u64..20, any::<bool>()), 1..200)) {
            let frames = 300;
            let mut words = vec![0u64; words_for(frames)];
            let mut bitmap = FrameBitmap::new(&mut words, BASE, frames).unwrap();
            let mut owned: Vec<(u64, u64)> = Vec::new();
            let mut model = vec![false; frames as usize];
            for (count, free) in ops {
                if free && !owned.is_empty() {
                    let (addr, n) = owned.swap_remove((count as usize) % owned.len());
                    bitmap.free(addr, n).unwrap();
                    for f in 0..n { model[((addr - BASE) / PAGE + f) as usize] = false; }
                } else if let Ok(addr) = bitmap.alloc(count) {
                    for f in 0..count {
                        let i = ((addr - BASE) / PAGE + f) as usize;
                        prop_assert!(!model[i], "frame {} handed out twice", i);
                        model[i] = true;
                    }
                    owned.push((addr, count));
                } else {
                    // Out of memory only if no run of `count` free frames exists.
                    let run = model.windows(count as usize).any(|w| w.iter().all(|u| !u));
                    prop_assert!(!run);
                }
                prop_assert_eq!(bitmap.used(), model.iter().filter(|u| **u).count() as u64);
            }
        }
    }
}
