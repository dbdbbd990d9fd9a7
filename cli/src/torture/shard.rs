//! A campaign split over many runs: `--shard I/N`, and each crash's schedule drawn from the
//! seed and the crash's index alone, so that the runs of a split draw exactly what one run
//! of the whole campaign would.
//!
//! Crash `k` of a campaign (0 to `--crashes` - 1) belongs to shard `k mod N`: shard `I` runs
//! crashes `I`, `I + N`, `I + 2N`... Interleaved rather than in blocks, so that shards of a
//! campaign stopped early have each run their share of every part of the schedule, and the
//! shard of a crash needs no arithmetic on the total. Each shard runs its crashes one after
//! the other on its own image: what a crash finds in the image follows from the crashes
//! before it in that shard, as in any torture run; what is the same is the schedule (when
//! each crash is aimed, which lines it evicts), and so every count that does not depend on
//! timing.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Shard `index` of `count` (from 0): the crashes whose index is `index` modulo `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Shard {
    /// The whole campaign in one run.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// The indexes of this shard's crashes, of a campaign of `crashes`.
    pub fn crashes(self, crashes: u64) -> impl Iterator<Item = u64> {
        (self.index..crashes).step_by(self.count as usize)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Parses `I/N` (shard I of N, from 0: `0/4` to `3/4`).
pub fn parse_shard(text: &str) -> Result<Shard, String> {
    let bad = || format!("\"{text}\" is not a shard: give I/N, shard I (from 0) of N, e.g. 0/4 to 3/4");
    let (index, count) = text.split_once('/').ok_or_else(bad)?;
    let index: u64 = index.trim().parse().map_err(|_| bad())?;
    let count: u64 = count.trim().parse().map_err(|_| bad())?;
    if count == 0 || count > u64::from(u32::MAX) {
        return Err(format!("\"{text}\": the number of shards must be 1 to {}", u32::MAX));
    }
    if index >= count {
        return Err(format!("\"{text}\": shards of {count} are numbered 0 to {}", count - 1));
    }
    Ok(Shard { index, count })
}

/// What one crash of the campaign does, drawn from the seed and its index only.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Aimed inside a write-out (waits for one to start), or after `run_ms`.
    pub aimed_inside: bool,
    pub run_ms: u64,
    /// Aimed at the restore's lazy part instead (not inside a write-out): `lazy_us` after the
    /// restored processes run, before their verification (the next boot verifies).
    pub aimed_lazy: bool,
    pub lazy_us: u64,
    /// Seed of the lines `--crash-evict` writes at this crash.
    pub evict_seed: u64,
}

/// Crash `index`'s plan in the campaign of `seed`.
pub fn plan(seed: u64, index: u64, inside_share: f64, max_run_ms: u64) -> Plan {
    // ChaCha keyed by (seed, index): any two crashes of any two campaigns draw apart.
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&index.to_le_bytes());
    let mut rng = StdRng::from_seed(key);
    let aimed_inside = rng.random::<f64>() < inside_share;
    let run_ms = rng.random_range(0..max_run_ms.max(1));
    let evict_seed = rng.random();
    // Drawn after the others, which stay what they were for a seed.
    let aimed_lazy = !aimed_inside && rng.random::<f64>() < LAZY_SHARE;
    let lazy_us = rng.random_range(0..MAX_LAZY_US);
    Plan { aimed_inside, run_ms, evict_seed, aimed_lazy, lazy_us }
}

/// The share of the crashes not aimed inside a write-out that are aimed at a lazy restore.
const LAZY_SHARE: f64 = 0.25;
/// How long after the restored processes run a crash aimed at a lazy restore comes, at most.
const MAX_LAZY_US: u64 = 5000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_partition_the_crashes() {
        assert_eq!(parse_shard("1/3"), Ok(Shard { index: 1, count: 3 }));
        assert_eq!(parse_shard("0/1"), Ok(Shard::WHOLE));
        for bad in ["3/3", "1/0", "x/2", "1", "-1/2", "1/2/3", ""] {
            assert!(parse_shard(bad).is_err(), "{bad}");
        }
        assert!(parse_shard("3/3").unwrap_err().contains("numbered 0 to 2"));
        let mut all: Vec<u64> = (0..3).flat_map(|i| Shard { index: i, count: 3 }.crashes(10)).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(Shard { index: 2, count: 3 }.crashes(10).collect::<Vec<_>>(), [2, 5, 8]);
        assert_eq!(Shard { index: 3, count: 4 }.crashes(2).count(), 0, "a shard may have no crash");
    }

    #[test]
    fn a_crash_plan_depends_on_the_seed_and_its_index_only() {
        assert_eq!(plan(7, 5, 0.4, 300), plan(7, 5, 0.4, 300));
        assert_ne!(plan(7, 5, 0.4, 300), plan(7, 6, 0.4, 300));
        assert_ne!(plan(7, 5, 0.4, 300), plan(8, 5, 0.4, 300));
        let aimed = (0..1000).filter(|&i| plan(1, i, 0.4, 300).aimed_inside).count();
        assert!((300..500).contains(&aimed), "{aimed} of 1000 aimed inside at a share of 0.4");
        assert!((0..1000).all(|i| plan(1, i, 0.4, 300).run_ms < 300));
        let lazy = (0..1000).filter(|&i| plan(1, i, 0.4, 300).aimed_lazy).count();
        assert!((100..200).contains(&lazy), "{lazy} of 1000 aimed at a lazy restore");
        assert!((0..1000).all(|i| !(plan(1, i, 0.4, 300).aimed_lazy && plan(1, i, 0.4, 300).aimed_inside)));
    }
}
