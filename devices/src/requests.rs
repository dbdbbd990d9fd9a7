//! The requests waiting for the guest to read them (the machine-control device's
//! `REG_REQUEST`). One slot would lose a shutdown to a checkpoint asked right after it, so
//! they are a set of kinds: a shutdown pending is never dropped and is read first (the
//! guest's shutdown writes everything back anyway); a checkpoint asked while one is pending
//! joins it.

use nvram::control::Request;

/// What became of a request when it was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asked {
    /// Now pending.
    Queued,
    /// The same kind was pending already: the guest acts on both at once.
    Joined,
    /// A shutdown was asked before: the machine is shutting down, and a checkpoint is not
    /// queued (the guest would never read it).
    ShuttingDown,
}

/// The set of pending requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PendingRequests {
    checkpoint: bool,
    shutdown: bool,
    /// A shutdown was asked at some time (still pending, or read by the guest).
    shutting_down: bool,
}

impl PendingRequests {
    /// Queues `request` (`None` asks nothing).
    pub fn ask(&mut self, request: Request) -> Asked {
        let slot = match request {
            Request::None => return Asked::Joined,
            Request::Checkpoint if self.shutting_down => return Asked::ShuttingDown,
            Request::Checkpoint => &mut self.checkpoint,
            Request::Shutdown => {
                self.shutting_down = true;
                &mut self.shutdown
            }
        };
        if std::mem::replace(slot, true) {
            Asked::Joined
        } else {
            Asked::Queued
        }
    }

    /// The next request for the guest, shutdown first; reading takes it.
    pub fn take(&mut self) -> Option<Request> {
        if std::mem::take(&mut self.shutdown) {
            // Whatever checkpoint was pending, the shutdown's write-out covers it.
            self.checkpoint = false;
            return Some(Request::Shutdown);
        }
        std::mem::take(&mut self.checkpoint).then_some(Request::Checkpoint)
    }

    /// Whether a shutdown has been asked for (it may have been read already).
    pub fn shutting_down(&self) -> bool {
        self.shutting_down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shutdown_is_never_lost_to_a_checkpoint() {
        let mut pending = PendingRequests::default();
        assert_eq!(pending.ask(Request::Shutdown), Asked::Queued);
        assert_eq!(pending.ask(Request::Checkpoint), Asked::ShuttingDown);
        assert_eq!(pending.take(), Some(Request::Shutdown));
        assert_eq!(pending.take(), None);
        assert_eq!(pending.ask(Request::Checkpoint), Asked::ShuttingDown, "still shutting down once read");
        assert!(pending.shutting_down());
    }

    #[test]
    fn checkpoints_join_and_a_later_shutdown_goes_first() {
        let mut pending = PendingRequests::default();
        assert_eq!(pending.ask(Request::Checkpoint), Asked::Queued);
        assert_eq!(pending.ask(Request::Checkpoint), Asked::Joined);
        assert_eq!(pending.ask(Request::Shutdown), Asked::Queued);
        assert_eq!(pending.ask(Request::Shutdown), Asked::Joined);
        assert_eq!(pending.take(), Some(Request::Shutdown));
        assert_eq!(pending.take(), None);
        let mut pending = PendingRequests::default();
        pending.ask(Request::Checkpoint);
        assert_eq!(pending.take(), Some(Request::Checkpoint));
        assert_eq!(pending.take(), None);
    }
}
