//! Running aggregates of the guest's operation reports: a guest may report as many
//! write-outs as it likes, so the device keeps a fixed-size summary of all of them (count,
//! extremes, a log-bucketed histogram for the quantiles) beside a bounded ring of the latest
//! records, and no reading of the status has to sort an unbounded history.

use std::time::Duration;

/// Sub-buckets per power of two: a bucket spans at most 1/16 of its values, so a quantile
/// read from the histogram is within about 3% of the true one (its midpoint is reported).
const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
/// Values below `SUB` have a bucket each; above, `SUB` buckets per power of two up to 2^64.
const BUCKETS: usize = (SUB as usize) * (64 - SUB_BITS as usize + 1);

/// A histogram of nanosecond durations with logarithmic buckets: fixed size (8 KiB),
/// whatever is recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self { counts: Box::new([0; BUCKETS]) }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < SUB {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // v >= SUB: e >= SUB_BITS
    let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
    ((e - SUB_BITS + 1) as usize) * SUB as usize + sub as usize
}

/// The lowest value of bucket `i`, and how many values it spans.
fn bucket_range(i: usize) -> (u64, u64) {
    let (row, sub) = ((i / SUB as usize) as u32, (i % SUB as usize) as u64);
    if row == 0 {
        return (sub, 1);
    }
    let shift = row - 1;
    ((SUB + sub) << shift, 1 << shift)
}

impl Histogram {
    pub fn record(&mut self, nanos: u64) {
        let slot = &mut self.counts[bucket_of(nanos)];
        *slot = slot.saturating_add(1);
    }

    /// The midpoint of the bucket holding the value of rank `rank` (0-based, ascending).
    fn at_rank(&self, rank: u64) -> Option<u64> {
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen = seen.saturating_add(c);
            if seen > rank {
                let (low, width) = bucket_range(i);
                return Some(low.saturating_add(width / 2));
            }
        }
        None
    }
}

/// Everything one kind of operation reported, summed up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OperationStats {
    pub count: u64,
    pub min: Option<Duration>,
    pub max: Option<Duration>,
    /// The bytes the operations copied, in all.
    pub copied_bytes: u64,
    histogram: Histogram,
}

impl OperationStats {
    pub fn record(&mut self, total: Duration, copied_bytes: u64) {
        self.count = self.count.saturating_add(1);
        self.min = Some(self.min.map_or(total, |m| m.min(total)));
        self.max = Some(self.max.map_or(total, |m| m.max(total)));
        self.copied_bytes = self.copied_bytes.saturating_add(copied_bytes);
        self.histogram.record(u64::try_from(total.as_nanos()).unwrap_or(u64::MAX));
    }

    /// The `q` quantile (0 to 1) by the project's rule ([`crate::quantile`]), as the
    /// histogram knows it: within a bucket's width of the exact value, and never outside
    /// the extremes. `None` before any operation.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        let last = self.count.checked_sub(1)?;
        let rank = crate::quantile::rank(self.count, q)?;
        // The extremes are known exactly.
        if rank == 0 {
            return self.min;
        }
        if rank == last {
            return self.max;
        }
        let value = Duration::from_nanos(self.histogram.at_rank(rank)?);
        Some(value.clamp(self.min?, self.max?))
    }
}

/// Count, extremes, median and 99th percentile of one kind of operation's durations.
pub type DurationSummary = crate::quantile::Summary<Duration>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for v in (0..5000u64).chain([u64::MAX / 3, u64::MAX - 1, u64::MAX]) {
            let i = bucket_of(v);
            assert!(i < BUCKETS && i >= last, "{v}");
            let (low, width) = bucket_range(i);
            assert!(low <= v && v - low < width, "{v} in bucket {i} = {low} + {width}");
            assert!(width <= 1.max(low / SUB), "{v}");
            last = i;
        }
    }

    #[test]
    fn quantiles_are_close_and_extremes_exact() {
        let mut s = OperationStats::default();
        assert_eq!(s.quantile(0.5), None);
        for ms in 1..=100u64 {
            s.record(Duration::from_millis(ms), 1);
        }
        assert_eq!((s.count, s.copied_bytes), (100, 100));
        assert_eq!((s.min, s.max), (Some(Duration::from_millis(1)), Some(Duration::from_millis(100))));
        let near = |q: f64, exact: f64| {
            let got = s.quantile(q).unwrap().as_secs_f64() * 1e3;
            assert!((got - exact).abs() <= exact * 0.04, "q {q}: {got} ms, not about {exact}");
        };
        near(0.5, 51.0);
        near(0.99, 99.0);
        assert_eq!(s.quantile(0.0), s.min);
        assert_eq!(s.quantile(1.0), s.max);
    }
}
