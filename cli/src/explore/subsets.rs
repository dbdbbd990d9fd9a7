//! Which of a crash point's pending lines (stored, not yet durable) each crash image keeps.
//!
//! Under ADR any pending line may have been evicted into the image before the power went,
//! each on its own: 2^n crash states for n lines, too many beyond a few. What is built:
//!
//! - at most `--subsets-up-to K` pending lines: every subset of the lines;
//! - else, when some of the pending lines are a commit slot's: those alone, and all but
//!   those (the commit evicted before what it declares valid, or held back after it: a
//!   commit slot's changed lines are seldom contiguous, so no extent holds them all);
//! - then, by extents (runs of contiguous lines, a structure the kernel wrote in one go):
//!   none, all, and every subset of the extents when there are at most K of them, else each
//!   extent alone and `--sample` seeded subsets of them; then, within the extents, each
//!   line alone and each proper prefix of a run (a torn run: the first lines of a structure
//!   evicted, the rest not), which is where a structure torn inside itself shows;
//! - at most `--max-images-per-point` in all: the candidates are ranked in that order
//!   (none and all, the extents, the samples, the lines and prefixes) and a class that does
//!   not fit whole is thinned by a seeded draw, keeping its order. The report gives each
//!   point's candidates beside the images built.

use devices::record::Line;
use rand::rngs::StdRng;
use rand::seq::index;
use rand::SeedableRng;

/// Which of a point's pending lines an image keeps. Lines are numbered in address order
/// across the point's extents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subset {
    None,
    All,
    /// Exactly these extents (by index).
    Extents(Vec<usize>),
    /// Exactly these lines (by index).
    Lines(Vec<usize>),
    /// The first `lines` lines of extent `extent` (a torn run).
    Prefix {
        extent: usize,
        lines: usize,
    },
    /// The commit slots' lines alone.
    CommitAlone,
    /// Every line but the commit slots'.
    AllButCommit,
}

impl std::fmt::Display for Subset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Subset::None => f.write_str("no pending line"),
            Subset::All => f.write_str("every pending line"),
            Subset::Extents(v) => write!(f, "pending extents {v:?}"),
            Subset::Lines(v) => write!(f, "pending lines {v:?}"),
            Subset::Prefix { extent, lines } => write!(f, "the first {lines} line(s) of pending extent {extent}"),
            Subset::CommitAlone => f.write_str("the commit slot's pending lines alone"),
            Subset::AllButCommit => f.write_str("every pending line but the commit slot's"),
        }
    }
}

/// How many images a point may have, and how they are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Every subset of the lines (else of the extents) when there are at most this many.
    pub up_to: usize,
    /// Seeded subsets of the extents when they are too many to enumerate.
    pub sample: usize,
    /// At most this many images a point (at least 2: none and all).
    pub max: usize,
    /// Only none and all (`--quick`).
    pub quick: bool,
}

/// The most lines or extents whose subsets are all enumerated, whatever `--subsets-up-to`
/// says: 2^20 images is already more than a run can boot.
const ENUMERATE_AT_MOST: usize = 20;

/// The subsets to build for a point whose pending lines form `extents` (as cut by
/// [`super::images::extents`]), and how many candidates there were before the cap.
pub fn subsets(extents: &[Vec<Line>], limits: Limits, seed: u64) -> (Vec<Subset>, usize) {
    let lines: usize = extents.iter().map(Vec::len).sum();
    if lines == 0 {
        return (vec![Subset::None], 1);
    }
    if limits.quick {
        return (vec![Subset::None, Subset::All], 2);
    }
    let up_to = limits.up_to.min(ENUMERATE_AT_MOST);
    let mut classes: Vec<Vec<Subset>> = vec![vec![Subset::None, Subset::All]];
    if lines <= up_to {
        classes.push(every(lines, Subset::Lines));
    } else {
        let commit = extents.iter().flatten().filter(|l| commit_line(l.0)).count();
        if commit > 0 && commit < lines {
            classes.push(vec![Subset::CommitAlone, Subset::AllButCommit]);
        }
        let n = extents.len();
        if n <= up_to {
            classes.push(every(n, Subset::Extents));
        } else {
            classes.push((0..n).map(|i| Subset::Extents(vec![i])).collect());
            let mut rng = StdRng::seed_from_u64(seed);
            let drawn = (0..limits.sample).map(|_| {
                let chosen: Vec<usize> = (0..n).filter(|_| rand::RngExt::random::<bool>(&mut rng)).collect();
                Subset::Extents(chosen)
            });
            classes.push(drawn.collect());
        }
        // Inside the runs: each line alone, and each torn run (its first lines, two or
        // more: one is a line alone). Runs of one line are already there as extents.
        let mut inside = Vec::new();
        let mut first = 0;
        for (e, run) in extents.iter().enumerate() {
            if run.len() > 1 {
                inside.extend((first..first + run.len()).map(|i| Subset::Lines(vec![i])));
                inside.extend((2..run.len()).map(|k| Subset::Prefix { extent: e, lines: k }));
            }
            first += run.len();
        }
        classes.push(inside);
    }
    let candidates = classes.iter().map(Vec::len).sum();
    (capped(classes, limits.max.max(2), seed), candidates)
}

/// Every subset of `n` things, from none to all, as `make` names a proper one.
fn every(n: usize, make: fn(Vec<usize>) -> Subset) -> Vec<Subset> {
    let all = (1u64 << n) - 1;
    (1..all).map(|mask| make((0..n).filter(|i| mask & (1 << i) != 0).collect())).collect()
}

/// The classes in order, whole while they fit in `max`; the first that does not is thinned
/// to the room left by a seeded draw (in its order), and the rest dropped.
fn capped(classes: Vec<Vec<Subset>>, max: usize, seed: u64) -> Vec<Subset> {
    let mut out = Vec::new();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_cab5);
    for class in classes {
        let room = max - out.len();
        if class.len() <= room {
            out.extend(class);
            continue;
        }
        let mut chosen = index::sample(&mut rng, class.len(), room).into_vec();
        chosen.sort_unstable();
        out.extend(chosen.into_iter().map(|i| class[i].clone()));
        break;
    }
    out
}

/// Whether the line at `addr` is a commit slot's.
fn commit_line(addr: u64) -> bool {
    devices::record::is_commit(&[nvram::persist::FlushedRange { addr, len: 1 }])
}

/// The pending lines `subset` keeps, of a point cut into `extents`.
pub fn kept<'a>(extents: &'a [Vec<Line>], subset: &'a Subset) -> Box<dyn Iterator<Item = &'a Line> + 'a> {
    match subset {
        Subset::None => Box::new(std::iter::empty()),
        Subset::All => Box::new(extents.iter().flatten()),
        Subset::Extents(v) => Box::new(v.iter().filter_map(|&i| extents.get(i)).flatten()),
        Subset::Lines(v) => {
            let all: Vec<&Line> = extents.iter().flatten().collect();
            Box::new(v.iter().filter_map(move |&i| all.get(i).copied()))
        }
        Subset::Prefix { extent, lines } => {
            Box::new(extents.get(*extent).into_iter().flat_map(move |run| run.iter().take(*lines)))
        }
        Subset::CommitAlone => Box::new(extents.iter().flatten().filter(|l| commit_line(l.0))),
        Subset::AllButCommit => Box::new(extents.iter().flatten().filter(|l| !commit_line(l.0))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(first: u64, n: u64) -> Vec<Line> {
        (0..n).map(|i| ((first + i) * 64, [i as u8; 64])).collect()
    }

    const LIMITS: Limits = Limits { up_to: 8, sample: 4, max: 1000, quick: false };

    #[test]
    fn few_lines_give_every_subset_of_them() {
        assert_eq!(subsets(&[], LIMITS, 1), (vec![Subset::None], 1));
        let extents = [run(0, 2), run(10, 1)];
        let (all, candidates) = subsets(&extents, LIMITS, 1);
        assert_eq!((all.len(), candidates), (8, 8), "2^3 subsets of 3 lines");
        assert!(all.contains(&Subset::Lines(vec![1])), "the second line of the first run alone: {all:?}");
        let addrs: Vec<u64> = kept(&extents, &Subset::Lines(vec![0, 2])).map(|l| l.0).collect();
        assert_eq!(addrs, [0, 640]);
        let quick = Limits { quick: true, ..LIMITS };
        assert_eq!(subsets(&extents, quick, 1).0, [Subset::None, Subset::All]);
    }

    #[test]
    fn many_lines_give_extents_then_each_line_and_each_torn_run() {
        // 3 extents, 9 lines: every subset of the extents, then inside the runs.
        let extents = [run(0, 4), run(10, 1), run(20, 4)];
        let (got, candidates) = subsets(&extents, LIMITS, 1);
        let extent_subsets = 8 - 2;
        let inside = 4 + 2 + 4 + 2; // lines alone, prefixes of 2 and 3 lines, in each run of 4
        assert_eq!(candidates, 2 + extent_subsets + inside);
        assert_eq!(got.len(), candidates, "under the cap, all of them");
        assert!(got.contains(&Subset::Lines(vec![6])), "the second line of the third run");
        assert!(got.contains(&Subset::Prefix { extent: 2, lines: 3 }));
        assert!(!got.contains(&Subset::Lines(vec![4])), "a run of one line is an extent already");
        let torn: Vec<u64> = kept(&extents, &Subset::Prefix { extent: 2, lines: 3 }).map(|l| l.0 / 64).collect();
        assert_eq!(torn, [20, 21, 22]);
        let one: Vec<u64> = kept(&extents, &Subset::Lines(vec![6])).map(|l| l.0 / 64).collect();
        assert_eq!(one, [21]);
    }

    #[test]
    fn a_commit_slot_s_lines_go_alone_and_are_held_back_alone() {
        let slot = nvram::layout::PLATE_SLOTS[1] / 64;
        // The slot's header line and a plate's line, apart, and two runs of other lines.
        let extents = [run(100, 3), vec![(slot * 64, [1; 64])], vec![((slot + 6) * 64, [2; 64])], run(200, 6)];
        let (got, _) = subsets(&extents, LIMITS, 1);
        assert_eq!(got[2..4], [Subset::CommitAlone, Subset::AllButCommit], "{got:?}");
        let alone: Vec<u64> = kept(&extents, &Subset::CommitAlone).map(|l| l.0 / 64 - slot).collect();
        assert_eq!(alone, [0, 6]);
        assert_eq!(kept(&extents, &Subset::AllButCommit).count(), 9);
        let (without, _) = subsets(&[run(100, 3), run(200, 6)], LIMITS, 1);
        assert!(!without.contains(&Subset::CommitAlone), "no commit line pending: {without:?}");
    }

    #[test]
    fn too_many_extents_are_taken_alone_and_sampled_and_the_cap_thins_the_last_class() {
        let extents: Vec<Vec<Line>> = (0..12).map(|i| run(i * 10, 3)).collect();
        let (got, candidates) = subsets(&extents, LIMITS, 7);
        assert_eq!(candidates, 2 + 12 + 4 + 12 * (3 + 1));
        assert_eq!(got[..3], [Subset::None, Subset::All, Subset::Extents(vec![0])]);
        assert_eq!(got, subsets(&extents, LIMITS, 7).0, "the seed decides");
        let capped = Limits { max: 30, ..LIMITS };
        let (few, _) = subsets(&extents, capped, 7);
        assert_eq!(few.len(), 30);
        assert_eq!(few[..18], got[..18], "none, all, the extents and the samples whole");
        assert!(few[18..].iter().all(|s| matches!(s, Subset::Lines(_) | Subset::Prefix { .. })), "{few:?}");
        assert_eq!(subsets(&extents, Limits { max: 0, ..LIMITS }, 7).0, [Subset::None, Subset::All]);
    }
}
