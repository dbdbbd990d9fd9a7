//! One write-out recorded barrier by barrier, for `vmm explore` (ADR only): at each persist
//! barrier, the lines it made durable (their durable contents before and after) and the
//! lines stored since the write-out started that were not durable yet. From the image as
//! the write-out left it, these give the durable state at every crash point, and what else
//! a crash there could have left (any of the pending lines, evicted by chance).
//!
//! Once the recorded write-out has reported, the domain makes nothing durable any more: the
//! image stays as that write-out left it, the base from which every crash image is built.
//!
//! A test-only planted bug ([`Plant`]) makes the domain forget one barrier's flushes, or
//! hold them to the next barrier (a fence left out), so that a test can show that the
//! exploration finds a protocol that is not crash-consistent.

use nvram::persist::FlushedRange;

use crate::dirty::DirtyView;

/// A cache line, the unit of write-back.
pub const LINE: u64 = 64;

/// A line's address and contents.
pub type Line = (u64, [u8; LINE as usize]);

/// A bug planted in the write-out (tests only): barrier `barrier` (from 0, of the recorded
/// write-out) loses its flushes, or its fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plant {
    /// The barrier's lines are never written back (the guest forgot to flush them).
    DropFlush { barrier: usize },
    /// The barrier's lines become durable only at the next barrier (the fence that should
    /// have ordered them before the stores that follow was left out).
    DropFence { barrier: usize },
    /// The commit's lines are never written back (the barrier that writes a commit slot).
    DropCommitFlush,
    /// Nothing before the commit becomes durable until the commit's barrier: the fence
    /// that orders the save areas' copies before the commit was left out.
    DropCommitFence,
}

/// Whether a barrier writes a commit slot (`nvram::layout::PLATE_SLOTS`): the commit.
pub fn is_commit(ranges: &[FlushedRange]) -> bool {
    let slot = std::mem::size_of::<nvram::plate::PlateTable>() as u64;
    ranges.iter().any(|r| r.len > 0 && nvram::layout::PLATE_SLOTS.iter().any(|&s| (s..s + slot).contains(&r.addr)))
}

/// One persist barrier of the recorded write-out.
#[derive(Debug, Clone, Default)]
pub struct BarrierRecord {
    /// The ranges the guest announced (or the copy engine made durable).
    pub announced: Vec<FlushedRange>,
    /// Lines the barrier wrote back: address, durable contents before, and after.
    pub lines: Vec<(u64, [u8; LINE as usize], [u8; LINE as usize])>,
    /// Lines stored since the write-out started and not durable, just before the barrier.
    pub pending: Vec<Line>,
    /// Every line of `announced` as the guest held it then: what the barrier was to make
    /// durable (whatever a planted bug did with it).
    pub intended: Vec<Line>,
}

/// The recorded write-out.
#[derive(Debug, Clone, Default)]
pub struct WriteOutRecord {
    /// The generation it commits.
    pub generation: u64,
    pub barriers: Vec<BarrierRecord>,
    /// Lines stored since the write-out started and not durable when it reported.
    pub pending_at_end: Vec<Line>,
    /// The write-out has reported (committed); nothing is made durable after.
    pub done: bool,
}

/// What the domain records: the `nth` write-out to start (from 1).
#[derive(Debug)]
pub(crate) struct Recorder {
    pub(crate) nth: u64,
    pub(crate) started: u64,
    pub(crate) view: Option<DirtyView>,
    pub(crate) record: Option<WriteOutRecord>,
    pub(crate) plant: Option<Plant>,
    /// Ranges of a barrier whose fence was left out, written back at the next one.
    pub(crate) deferred: Vec<FlushedRange>,
    /// A barrier of the recorded write-out has written a commit slot.
    pub(crate) committed: bool,
}

impl Recorder {
    pub(crate) fn new(nth: u64, plant: Option<Plant>) -> Self {
        Self { nth, started: 0, view: None, record: None, plant, deferred: Vec::new(), committed: false }
    }

    /// Whether barriers now belong to the recorded write-out.
    pub(crate) fn recording(&self) -> bool {
        self.record.as_ref().is_some_and(|r| !r.done)
    }

    /// Whether the recorded write-out is over: nothing more is made durable.
    pub(crate) fn frozen(&self) -> bool {
        self.record.as_ref().is_some_and(|r| r.done)
    }

    /// Of the ranges of barrier `index`, those written back now (the rest the plant keeps).
    pub(crate) fn applied(&mut self, index: usize, ranges: &[FlushedRange]) -> Vec<FlushedRange> {
        let commit = is_commit(ranges);
        // Before the commit, an unfenced commit holds everything back.
        let hold = self.plant == Some(Plant::DropCommitFence) && !self.committed && !commit;
        self.committed |= commit;
        if hold {
            self.deferred.extend_from_slice(ranges);
            return Vec::new();
        }
        let mut now = std::mem::take(&mut self.deferred);
        match self.plant {
            Some(Plant::DropFlush { barrier }) if barrier == index => {}
            Some(Plant::DropCommitFlush) if commit => {}
            Some(Plant::DropFence { barrier }) if barrier == index => self.deferred = ranges.to_vec(),
            _ => now.extend_from_slice(ranges),
        }
        now
    }
}

/// The line addresses of `ranges`, inside `ram` bytes, each once, ascending.
pub(crate) fn lines_of(ranges: &[FlushedRange], ram: u64) -> Vec<u64> {
    let mut lines: Vec<u64> = ranges
        .iter()
        .filter(|r| r.len > 0)
        .flat_map(|r| {
            let start = r.addr & !(LINE - 1);
            let end = r.addr.saturating_add(r.len).next_multiple_of(LINE).min(ram);
            (start..end).step_by(LINE as usize)
        })
        .collect();
    lines.sort_unstable();
    lines.dedup();
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plants_drop_or_defer_one_barrier() {
        let r = |addr| FlushedRange { addr, len: 8 };
        let mut flush = Recorder::new(1, Some(Plant::DropFlush { barrier: 1 }));
        assert_eq!(flush.applied(0, &[r(0)]), [r(0)]);
        assert!(flush.applied(1, &[r(64)]).is_empty());
        assert_eq!(flush.applied(2, &[r(128)]), [r(128)]);
        let mut fence = Recorder::new(1, Some(Plant::DropFence { barrier: 0 }));
        assert!(fence.applied(0, &[r(0)]).is_empty());
        assert_eq!(fence.applied(1, &[r(64)]), [r(0), r(64)], "held to the next barrier");
        let slot = FlushedRange { addr: nvram::layout::PLATE_SLOTS[1], len: 64 };
        assert!(is_commit(&[r(0), slot]) && !is_commit(&[r(0)]));
        let mut unfenced = Recorder::new(1, Some(Plant::DropCommitFence));
        assert!(unfenced.applied(0, &[r(0)]).is_empty());
        assert!(unfenced.applied(1, &[r(64)]).is_empty());
        assert_eq!(unfenced.applied(2, &[slot]), [r(0), r(64), slot], "all at the commit");
        assert_eq!(unfenced.applied(3, &[r(128)]), [r(128)]);
        let mut unflushed = Recorder::new(1, Some(Plant::DropCommitFlush));
        assert!(unflushed.applied(0, &[slot]).is_empty());
        assert_eq!(unflushed.applied(1, &[r(0)]), [r(0)]);
        assert_eq!(lines_of(&[FlushedRange { addr: 60, len: 10 }, r(64)], 4096), [0, 64]);
        assert_eq!(lines_of(&[FlushedRange { addr: 4000, len: 500 }], 4096), [3968, 4032], "clamped to RAM");
    }
}
