//! Bounding the log lines a guest can cause at will: a guest that rings a doorbell or pokes
//! an unknown port in a loop must not fill the host's disk or drown the operator's log.
//! Every device uses this one limiter. Each kind of message gets a budget of lines per
//! window; past it, lines are counted, and the count is logged with the next line allowed,
//! so a guest that keeps misbehaving is still seen, once a window, with how often.

use std::time::{Duration, Instant};

use tracing::{debug, info, warn, Level};

/// A budget of log lines for one kind of message.
#[derive(Debug)]
pub struct LogLimit {
    what: &'static str,
    /// The level of the lines limited: the count of those held back is logged at it too,
    /// so that it shows exactly when they would have.
    level: Level,
    burst: u32,
    window: Duration,
    started: Option<Instant>,
    in_window: u32,
    suppressed: u64,
    /// Lines allowed in all: what the limiter let through, for tests and statistics.
    allowed: u64,
}

impl LogLimit {
    /// A second's budget of `burst` lines: what every device uses for its guest errors.
    pub const fn per_second(what: &'static str, level: Level, burst: u32) -> Self {
        Self::new(what, level, burst, Duration::from_secs(1))
    }

    /// At most `burst` lines about `what` (a phrase that names the device and the kind,
    /// such as "virtio-blk guest error"), logged at `level`, every `window`.
    pub const fn new(what: &'static str, level: Level, burst: u32, window: Duration) -> Self {
        Self { what, level, burst, window, started: None, in_window: 0, suppressed: 0, allowed: 0 }
    }

    /// Whether a line may be logged at `now`; if lines were held back before it, says how
    /// many first.
    pub fn allow(&mut self, now: Instant) -> bool {
        if self.started.is_none_or(|s| now.saturating_duration_since(s) >= self.window) {
            self.started = Some(now);
            self.in_window = 0;
        }
        if self.in_window >= self.burst {
            self.suppressed += 1;
            return false;
        }
        self.in_window += 1;
        self.allowed += 1;
        if self.suppressed > 0 {
            let (n, what, burst, window) = (self.suppressed, self.what, self.burst, self.window);
            let line = format_args!("{what}: {n} more were not logged (more than {burst} in {window:?})");
            match self.level {
                Level::ERROR | Level::WARN => warn!("{line}"),
                Level::INFO => info!("{line}"),
                _ => debug!("{line}"),
            }
            self.suppressed = 0;
        }
        true
    }

    /// [`allow`](Self::allow) at the present instant.
    pub fn allow_now(&mut self) -> bool {
        self.allow(Instant::now())
    }

    /// Lines let through so far.
    pub fn allowed(&self) -> u64 {
        self.allowed
    }

    /// Lines held back and not yet reported.
    #[cfg(test)]
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_a_count() {
        let mut limit = LogLimit::new("test", Level::INFO, 3, Duration::from_secs(1));
        let t0 = Instant::now();
        let allowed = (0..1000).filter(|i| limit.allow(t0 + Duration::from_micros(*i))).count();
        assert_eq!(allowed, 3);
        assert_eq!(limit.allowed(), 3);
        assert_eq!(limit.suppressed(), 997);
        assert!(limit.allow(t0 + Duration::from_secs(1)), "a new window");
        assert_eq!(limit.suppressed(), 0, "the count was reported");
    }
}
