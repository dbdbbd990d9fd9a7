//! Which pages of guest RAM were written, for several readers at once.
//!
//! KVM keeps one log of the pages the guest's CPU writes, and reading it clears it. Two
//! parts of the machine need it with different lifetimes: the copy engine hands it to the
//! guest at each write-out, and the ADR persistence domain needs every page written since
//! it last wrote them back. So the log is read in one place and merged into a view of each
//! reader, which takes it at its own pace. Stores the VMM itself makes into guest RAM (the
//! engine's copies and status words) are not in KVM's log; they are [`DirtyTracker::mark`]ed.

const PAGE: u64 = 4096;

/// Fetches (and clears) the log of the pages the guest's CPU wrote: one bit per page of
/// guest RAM from address 0. `None` if the host has no such log.
pub type DirtyFetch = Box<dyn FnMut() -> Option<Vec<u64>> + Send>;

/// A reader of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyView(usize);

pub struct DirtyTracker {
    fetch: Option<DirtyFetch>,
    pages: u64,
    views: Vec<Vec<u64>>,
}

impl DirtyTracker {
    /// A tracker of `ram` bytes of guest RAM, reading KVM's log through `fetch`.
    pub fn new(ram: u64, fetch: Option<DirtyFetch>) -> Self {
        Self { fetch, pages: ram.div_ceil(PAGE), views: Vec::new() }
    }

    /// A new reader; it sees the pages written from now on (and, at its first take, what
    /// KVM logged before and nobody read yet).
    pub fn view(&mut self) -> DirtyView {
        self.views.push(vec![0; self.words()]);
        DirtyView(self.views.len() - 1)
    }

    fn words(&self) -> usize {
        self.pages.div_ceil(64) as usize
    }

    /// Merges KVM's log into every view; `false` if there is no log.
    fn refresh(&mut self) -> bool {
        let Some(log) = self.fetch.as_mut().and_then(|fetch| fetch()) else {
            return false;
        };
        for view in &mut self.views {
            for (word, new) in view.iter_mut().zip(&log) {
                *word |= new;
            }
        }
        true
    }

    /// Records a store of the VMM's own into `addr..addr + len` (clamped to guest RAM).
    pub fn mark(&mut self, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = addr / PAGE;
        let end = addr.saturating_add(len).div_ceil(PAGE).min(self.pages);
        for view in &mut self.views {
            for page in first..end {
                view[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
    }

    /// Takes `view`'s pages written since its previous take, one bit a page; `None` if the
    /// host keeps no log (then nothing is known, not "nothing written").
    pub fn take(&mut self, view: DirtyView) -> Option<Vec<u64>> {
        if !self.refresh() {
            return None;
        }
        let words = self.words();
        Some(std::mem::replace(&mut self.views[view.0], vec![0; words]))
    }

    /// `view`'s pages written since its previous take, left in place.
    pub fn peek(&mut self, view: DirtyView) -> Option<&[u64]> {
        if !self.refresh() {
            return None;
        }
        Some(&self.views[view.0])
    }
}

/// The page numbers whose bits are set in `bitmap`.
pub fn pages(bitmap: &[u64]) -> impl Iterator<Item = u64> + '_ {
    bitmap
        .iter()
        .enumerate()
        .flat_map(|(w, &word)| (0..64).filter(move |bit| word & (1 << bit) != 0).map(move |bit| w as u64 * 64 + bit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn every_view_sees_every_write_once() {
        let log = Arc::new(Mutex::new(vec![0u64; 2]));
        let source = log.clone();
        let mut tracker = DirtyTracker::new(
            128 * PAGE,
            Some(Box::new(move || Some(std::mem::replace(&mut *source.lock().unwrap(), vec![0; 2])))),
        );
        let (a, b) = (tracker.view(), tracker.view());
        log.lock().unwrap()[0] = 1 << 3;
        assert_eq!(pages(&tracker.take(a).unwrap()).collect::<Vec<_>>(), [3]);
        log.lock().unwrap()[1] = 1 << 1;
        tracker.mark(5 * PAGE + 100, PAGE);
        assert_eq!(pages(&tracker.take(a).unwrap()).collect::<Vec<_>>(), [5, 6, 65]);
        assert_eq!(pages(tracker.peek(b).unwrap()).collect::<Vec<_>>(), [3, 5, 6, 65], "b took nothing yet");
        assert_eq!(pages(&tracker.take(b).unwrap()).count(), 4);
        assert_eq!(pages(&tracker.take(b).unwrap()).count(), 0);
        tracker.mark(u64::MAX - 10, 100);
        tracker.mark(127 * PAGE, 10 * PAGE);
        assert_eq!(pages(&tracker.take(b).unwrap()).collect::<Vec<_>>(), [127], "clamped to RAM");
        let mut none = DirtyTracker::new(PAGE, None);
        let v = none.view();
        assert!(none.take(v).is_none(), "no log is not an empty log");
    }
}
