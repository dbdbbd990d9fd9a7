//! A bug planted in the CPU copier's write-outs, for `vmm explore` to find: `test_plant=` on
//! the command line (a test knob: the VMM refuses it unless built with `test-knobs`). The
//! copy engine's copies are durable by themselves, so only the CPU copier's flushes and
//! fences can be left out. Without the knob nothing here changes what a write-out does.
//!
//! - `fence:commit`: each write-out's first fence, the one that makes the save areas'
//!   copies durable before the commit is written, is left out; their flushed ranges go with
//!   the commit's own fence, so that a crash before it may keep the commit without them.
//! - `flush:K`: each write-out's flush number K (from 0) is left out: its lines are never
//!   written back, and the commit declares them valid.

use core::sync::atomic::{AtomicU64, Ordering};

use nvram::cmdline::TestPlant;

/// No plant.
const NONE: u64 = u64::MAX;
/// `fence:commit`; any smaller value is the flush `flush:K` leaves out.
const UNFENCED_COMMIT: u64 = u64::MAX - 1;

static PLANT: AtomicU64 = AtomicU64::new(NONE);

/// Plants `plant` in the write-outs from now on (none: the correct write-out).
pub fn set(plant: Option<TestPlant>) {
    let value = match plant {
        None => NONE,
        Some(TestPlant::UnfencedCommit) => UNFENCED_COMMIT,
        Some(TestPlant::DropFlush(k)) => k.min(UNFENCED_COMMIT - 1),
    };
    PLANT.store(value, Ordering::Relaxed);
}

/// Whether a bug is planted (the boot log says so).
pub fn active() -> bool {
    PLANT.load(Ordering::Relaxed) != NONE
}

/// The flushes and fences of one write-out so far, to place the plant among them.
#[derive(Debug, Default)]
pub(super) struct Count {
    flushes: u64,
    fences: u64,
}

impl Count {
    /// Counts a flush; whether the plant leaves it out.
    pub(super) fn skip_flush(&mut self) -> bool {
        let k = self.flushes;
        self.flushes += 1;
        PLANT.load(Ordering::Relaxed) == k
    }

    /// Counts a fence; whether the plant leaves it out (the write-out's first).
    pub(super) fn skip_fence(&mut self) -> bool {
        let k = self.fences;
        self.fences += 1;
        k == 0 && PLANT.load(Ordering::Relaxed) == UNFENCED_COMMIT
    }
}
