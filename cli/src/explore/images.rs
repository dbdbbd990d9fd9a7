//! The crash images of a recorded write-out: for each crash point (before each persist
//! barrier, and after the last), the durable state there, plus subsets of what was stored
//! but not yet durable.
//!
//! Which pending lines each image keeps is [`super::subsets`]'s choice.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use devices::record::{Line, WriteOutRecord, LINE};

use super::subsets::Subset;

/// A crash point: before barrier `index` (from 0), or after the last (`index` = barriers).
#[derive(Debug, Clone)]
pub struct Point {
    pub index: usize,
    /// Lines whose durable contents there differ from the base image (the write-out's end).
    pub durable: BTreeMap<u64, [u8; LINE as usize]>,
    /// Runs of contiguous lines stored and not durable there.
    pub extents: Vec<Vec<Line>>,
}

/// The crash points of `record`, in order.
pub fn points(record: &WriteOutRecord) -> Vec<Point> {
    let count = record.barriers.len();
    (0..=count)
        .map(|index| {
            // Undo the barriers from `index` on, the last first: each line ends as it was
            // before the first of them that wrote it.
            let mut durable = BTreeMap::new();
            for barrier in record.barriers[index..].iter().rev() {
                for (addr, before, _) in &barrier.lines {
                    durable.insert(*addr, *before);
                }
            }
            let pending = record.barriers.get(index).map_or(&record.pending_at_end, |b| &b.pending);
            Point { index, durable, extents: extents(pending) }
        })
        .collect()
}

/// `lines` (ascending) cut into runs of contiguous lines.
pub fn extents(lines: &[Line]) -> Vec<Vec<Line>> {
    let mut out: Vec<Vec<Line>> = Vec::new();
    for line in lines {
        match out.last_mut() {
            Some(run) if run.last().is_some_and(|l| l.0 + LINE == line.0) => run.push(*line),
            _ => out.push(vec![*line]),
        }
    }
    out
}

/// Makes `work` a copy of `base` that shares its blocks where the file system can
/// (reflink), else copies only its data (a sparse copy): images are built from one base.
pub fn clone_base(base: &File, work: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor; both descriptors are open files.
    if unsafe { libc::ioctl(work.as_raw_fd(), libc::FICLONE as _, base.as_raw_fd()) } == 0 {
        return Ok(());
    }
    let len = base.metadata()?.len();
    work.set_len(0)?;
    work.set_len(len)?;
    let mut at = 0i64;
    let mut buf = vec![0u8; 1 << 20];
    while (at as u64) < len {
        // SAFETY: lseek on an open descriptor; a failure (ENXIO: no data after) ends the copy.
        let data = unsafe { libc::lseek(base.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(base.as_raw_fd(), data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        let mut pos = data as u64;
        while pos < end as u64 {
            let n = buf.len().min((end as u64 - pos) as usize);
            base.read_exact_at(&mut buf[..n], pos)?;
            work.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
        }
        at = end;
    }
    Ok(())
}

/// Writes the image of `point` with `subset` of its pending extents into `work`, a clone of
/// the base.
pub fn write_image(work: &File, point: &Point, subset: &Subset) -> io::Result<()> {
    for (addr, line) in patch(point, subset) {
        work.write_all_at(line, addr)?;
    }
    Ok(())
}

/// The lines an image changes from the base: the point's durable state, then the subset's
/// pending lines over it.
pub fn patch<'a>(point: &'a Point, subset: &'a Subset) -> impl Iterator<Item = (u64, &'a [u8; LINE as usize])> {
    point.durable.iter().map(|(a, l)| (*a, l)).chain(kept(point, subset).map(|(a, l)| (*a, l)))
}

/// The pending lines `subset` keeps.
pub fn kept<'a>(point: &'a Point, subset: &'a Subset) -> impl Iterator<Item = &'a Line> {
    super::subsets::kept(&point.extents, subset)
}

/// The base image in memory, 8-byte aligned, for `inspect --check` of each crash image
/// without a file: patched, checked, and put back.
pub struct InMemory {
    words: Vec<u64>,
    len: usize,
}

impl InMemory {
    pub fn read(file: &File) -> io::Result<Self> {
        let len = file.metadata()?.len() as usize;
        let mut words = vec![0u64; len.div_ceil(8)];
        file.read_exact_at(&mut zerocopy::IntoBytes::as_mut_bytes(&mut words[..])[..len], 0)?;
        Ok(Self { words, len })
    }

    /// The image's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The checksum of the image's bytes, as a record holds it.
    pub fn crc(&self) -> u64 {
        super::store::image_crc(&zerocopy::IntoBytes::as_bytes(&self.words[..])[..self.len])
    }

    /// `inspect --check` of the base with `lines` written over it, and `also` of its bytes.
    pub fn check<'a, T>(
        &mut self,
        lines: impl Iterator<Item = (u64, &'a [u8; LINE as usize])>,
        also: impl FnOnce(&[u8]) -> T,
    ) -> (crate::inspect::Check, T) {
        let len = self.len;
        let bytes = &mut zerocopy::IntoBytes::as_mut_bytes(&mut self.words[..])[..len];
        let mut saved = Vec::new();
        for (addr, line) in lines {
            let at = addr as usize;
            if at + LINE as usize <= len {
                let mut old = [0u8; LINE as usize];
                old.copy_from_slice(&bytes[at..at + LINE as usize]);
                saved.push((at, old));
                bytes[at..at + LINE as usize].copy_from_slice(line);
            }
        }
        let check = crate::inspect::check_words(&self.words, len);
        let other = also(&zerocopy::IntoBytes::as_bytes(&self.words[..])[..len]);
        let bytes = &mut zerocopy::IntoBytes::as_mut_bytes(&mut self.words[..])[..len];
        // Put back in reverse: a line patched twice ends as the base had it.
        for (at, old) in saved.into_iter().rev() {
            bytes[at..at + LINE as usize].copy_from_slice(&old);
        }
        (check, other)
    }
}

/// What the guest announced durable before the commit (barriers before `commit`), each
/// line as it was to be: a crash image that holds the commit must hold these too.
pub fn before_commit(record: &WriteOutRecord, commit: usize) -> BTreeMap<u64, [u8; LINE as usize]> {
    record.barriers[..commit.min(record.barriers.len())].iter().flat_map(|b| b.intended.iter().copied()).collect()
}

/// Of `before`, the lines an image (`bytes`) lacks: those not rewritten later (by barriers
/// from `commit` to the point, or by a pending line the image kept) whose contents differ.
pub fn missing(
    bytes: &[u8],
    before: &BTreeMap<u64, [u8; LINE as usize]>,
    record: &WriteOutRecord,
    commit: usize,
    point: &Point,
    subset: &Subset,
) -> Vec<u64> {
    let later: std::collections::BTreeSet<u64> = record.barriers[commit.min(point.index)..point.index]
        .iter()
        .flat_map(|b| b.intended.iter().map(|l| l.0))
        .chain(kept(point, subset).map(|l| l.0))
        .collect();
    before
        .iter()
        .filter(|(addr, _)| !later.contains(addr))
        .filter(|(addr, line)| bytes.get(**addr as usize..**addr as usize + LINE as usize) != Some(&line[..]))
        .map(|(addr, _)| *addr)
        .collect()
}

/// Opens `path` for reading and writing, created if missing (the work image, kept ones).
pub fn create(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devices::record::BarrierRecord;

    fn line(addr: u64, byte: u8) -> Line {
        (addr, [byte; 64])
    }

    #[test]
    fn points_undo_the_later_barriers_and_cut_pending_lines_into_extents() {
        let barrier = |lines: Vec<(u64, u8, u8)>, pending: Vec<Line>| BarrierRecord {
            announced: vec![],
            intended: lines.iter().map(|&(a, _, c)| (a, [c; 64])).collect(),
            lines: lines.into_iter().map(|(a, b, c)| (a, [b; 64], [c; 64])).collect(),
            pending,
        };
        let record = WriteOutRecord {
            generation: 5,
            barriers: vec![
                barrier(vec![(0, 1, 2), (64, 1, 2)], vec![line(0, 2), line(64, 2), line(4096, 9)]),
                barrier(vec![(0, 2, 3)], vec![line(0, 3), line(4096, 9)]),
            ],
            pending_at_end: vec![line(4096, 9)],
            done: true,
        };
        let points = points(&record);
        assert_eq!(points.len(), 3, "before each of 2 barriers, and after the last");
        assert_eq!(points[0].durable[&0], [1; 64], "as before the first barrier that wrote it");
        assert_eq!(points[0].durable[&64], [1; 64]);
        assert_eq!(points[1].durable[&0], [2; 64]);
        assert!(!points[1].durable.contains_key(&64));
        assert!(points[2].durable.is_empty(), "the base is the state after the last");
        assert_eq!(points[0].extents.len(), 2, "0..128 and 4096..4160");
        assert_eq!(points[0].extents[0].len(), 2);
    }

    #[test]
    fn a_clone_holds_the_base_and_an_image_its_lines() {
        let dir = tempfile::tempdir().unwrap();
        let base = create(&dir.path().join("base")).unwrap();
        base.set_len(1 << 20).unwrap();
        base.write_all_at(&[7; 100], 8192).unwrap();
        let work = create(&dir.path().join("work")).unwrap();
        work.write_all_at(&[1; 10], 0).unwrap();
        clone_base(&base, &work).unwrap();
        let mut got = vec![0u8; 1 << 20];
        work.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got[..10], [0; 10], "nothing left of the work file's old contents");
        assert_eq!(got[8192..8292], [7; 100]);
        let point = Point { index: 0, durable: [(0, [5; 64])].into(), extents: vec![vec![line(128, 6)]] };
        write_image(&work, &point, &Subset::All).unwrap();
        work.read_exact_at(&mut got, 0).unwrap();
        assert_eq!((got[0], got[128], got[192]), (5, 6, 0));
    }
}
