//! The one quantile rule of the project (nearest rank, rounded): the machine-control
//! device's histograms, the control API's distributions, the torture summary and the
//! benchmarks' medians agree on what "median" and "p99" mean. It sits at the bottom of the
//! host's crates so that the devices use it too (`vmm::quantile` re-exports it).

/// The rank (0-based) of the `q` quantile (0 to 1) among `len` ordered values; `None` if
/// there are none.
pub fn rank(len: u64, q: f64) -> Option<u64> {
    let last = len.checked_sub(1)?;
    Some((last as f64 * q.clamp(0.0, 1.0)).round() as u64)
}

/// The `q` quantile (0 to 1) of `sorted`, which must be in ascending order; `None` if empty.
pub fn quantile<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    let at = usize::try_from(rank(sorted.len() as u64, q)?).ok()?;
    sorted.get(at).copied()
}

/// Count, extremes, median and 99th percentile of a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary<T> {
    /// How many values; may exceed those the quantiles were taken from, where a bounded
    /// history stands for a longer run (the machine-control device's histograms).
    pub count: u64,
    pub min: T,
    pub median: T,
    pub p99: T,
    pub max: T,
}

impl<T: Copy + Ord> Summary<T> {
    /// The summary of `values` (in any order); `None` if there are none.
    pub fn of(mut values: Vec<T>) -> Option<Self> {
        values.sort_unstable();
        Some(Self {
            count: values.len() as u64,
            min: *values.first()?,
            median: quantile(&values, 0.5)?,
            p99: quantile(&values, 0.99)?,
            max: *values.last()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_nearest_rank() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(quantile(&values, 0.5), Some(51));
        assert_eq!(quantile(&values, 0.99), Some(99));
        assert_eq!(quantile(&values, 0.0), Some(1));
        assert_eq!(quantile(&values, 1.0), Some(100));
        assert_eq!(quantile::<u32>(&[], 0.5), None);
        assert_eq!(quantile(&[1, 2, 3, 4], 0.5), Some(3), "the upper middle, as len / 2 picks");
        let s = Summary::of(vec![3, 1, 2]).unwrap();
        assert_eq!((s.count, s.min, s.median, s.p99, s.max), (3, 1, 2, 3, 3));
        assert_eq!(Summary::<u8>::of(Vec::new()), None);
    }
}
