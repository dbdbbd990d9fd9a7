//! A recorded write-out on disk (`vmm explore record --out DIR`), so that runs on many hosts
//! explore the same one: the write-out a machine records differs from run to run (timing
//! decides what the workloads dirtied), so shards must share one record, not each make
//! their own.
//!
//! `DIR/base.img` is the image as the write-out left it (a sparse file; each crash image is
//! reflinked or sparse-copied from it, and it is never written), `DIR/record.bin` the
//! record, in this format (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `NVMEXPLR` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | zero |
//! | 16 | 8 | body length in bytes |
//! | 24 | 8 | CRC-64/XZ of the body |
//! | 32 | 8 | length of `base.img` |
//! | 40 | 8 | CRC-64/XZ of `base.img`'s bytes |
//! | 48 | ... | the body |
//!
//! The body: a `u32` length and that many bytes of JSON (the recording's settings: which
//! write-out, `--mem`, the guest's command line, the planted bug if any), the generation
//! (`u64`), the barriers (a `u32` count, then each: its announced ranges as a `u32` count of
//! (`u64` address, `u64` length), its lines written back as a count of (address, 64 bytes
//! before, 64 after), its pending lines and its intended lines, each as a count of
//! (address, 64 bytes)), and the lines pending at the end (a count of (address, 64 bytes)).
//!
//! A record's identity is its two checksums: shards' summaries carry it, and a merge refuses
//! summaries of different records.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use crc::{Crc, Table, CRC_64_XZ};
use devices::record::{BarrierRecord, Line, WriteOutRecord, LINE};
use nvram::persist::FlushedRange;
use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"NVMEXPLR";
/// The version of `record.bin`; a run refuses others.
pub const VERSION: u32 = 1;
const HEADER: usize = 48;
/// A record's body is at most this long (a write-out of a whole 64 GiB image, lines three
/// times over, fits): a length beyond is a damaged header, not an allocation to try.
const MAX_BODY: u64 = 1 << 40;
static CRC64: Crc<u64, Table<16>> = Crc::<u64, Table<16>>::new(&CRC_64_XZ);

/// How the write-out was recorded: what a run needs to boot its crash images as the
/// recording machine booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub write_out: u64,
    pub mem: u64,
    pub cmdline: String,
    /// The planted bug (`--plant`), if any.
    pub plant: Option<String>,
}

/// A record read back, or just made.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub settings: Settings,
    pub record: WriteOutRecord,
    /// The record's identity: the body's and the base's checksums.
    pub id: String,
}

pub fn base_path(dir: &Path) -> PathBuf {
    dir.join("base.img")
}

pub fn record_path(dir: &Path) -> PathBuf {
    dir.join("record.bin")
}

/// The checksum of an image's bytes, as the record holds it.
pub fn image_crc(bytes: &[u8]) -> u64 {
    CRC64.checksum(bytes)
}

fn id(body_crc: u64, base_crc: u64) -> String {
    format!("{body_crc:016x}-{base_crc:016x}")
}

/// The identity `record` would have on disk, over a base whose bytes checksum to `base_crc`.
pub fn identity(settings: &Settings, record: &WriteOutRecord, base_crc: u64) -> anyhow::Result<String> {
    Ok(id(CRC64.checksum(&body(settings, record)?), base_crc))
}

/// Writes `record.bin` into `dir` for `record`, whose base image's bytes checksum to
/// `base_crc` and are `base_len` long; returns the record's identity.
pub fn write(
    dir: &Path,
    settings: &Settings,
    record: &WriteOutRecord,
    base_len: u64,
    base_crc: u64,
) -> anyhow::Result<String> {
    let body = body(settings, record)?;
    let body_crc = CRC64.checksum(&body);
    let mut out = Vec::with_capacity(HEADER + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    for word in [body.len() as u64, body_crc, base_len, base_crc] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(&body);
    let path = record_path(dir);
    // Written whole under another name, then renamed: a record is there whole or not at all.
    let part = dir.join("record.bin.part");
    std::fs::write(&part, &out).with_context(|| format!("cannot write {}", part.display()))?;
    std::fs::rename(&part, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id(body_crc, base_crc))
}

fn body(settings: &Settings, record: &WriteOutRecord) -> anyhow::Result<Vec<u8>> {
    let mut b = Vec::new();
    let json = serde_json::to_vec(settings)?;
    b.extend_from_slice(&(json.len() as u32).to_le_bytes());
    b.extend_from_slice(&json);
    b.extend_from_slice(&record.generation.to_le_bytes());
    count(&mut b, record.barriers.len());
    for barrier in &record.barriers {
        count(&mut b, barrier.announced.len());
        for r in &barrier.announced {
            b.extend_from_slice(&r.addr.to_le_bytes());
            b.extend_from_slice(&r.len.to_le_bytes());
        }
        count(&mut b, barrier.lines.len());
        for (addr, before, after) in &barrier.lines {
            b.extend_from_slice(&addr.to_le_bytes());
            b.extend_from_slice(before);
            b.extend_from_slice(after);
        }
        lines(&mut b, &barrier.pending);
        lines(&mut b, &barrier.intended);
    }
    lines(&mut b, &record.pending_at_end);
    Ok(b)
}

fn count(b: &mut Vec<u8>, n: usize) {
    b.extend_from_slice(&(n as u32).to_le_bytes());
}

fn lines(b: &mut Vec<u8>, lines: &[Line]) {
    count(b, lines.len());
    for (addr, line) in lines {
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(line);
    }
}

/// Reads `dir`'s record; the base's length is checked here, its checksum by the caller
/// (who reads it whole anyway) against [`Header::base_crc`].
pub fn read(dir: &Path) -> anyhow::Result<(Recorded, Header)> {
    let path = record_path(dir);
    let mut file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).with_context(|| format!("cannot read {}", path.display()))?;
    let (recorded, header) = decode(&bytes).with_context(|| format!("{} is not a usable record", path.display()))?;
    let base = base_path(dir);
    let len = std::fs::metadata(&base).with_context(|| format!("cannot open {}", base.display()))?.len();
    if len != header.base_len {
        bail!(
            "{} is {len} bytes, but the record was made from an image of {} bytes: not its base",
            base.display(),
            header.base_len
        );
    }
    Ok((recorded, header))
}

/// What the header says of the base image.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub base_len: u64,
    pub base_crc: u64,
}

/// A record from its bytes, every length checked against what is there.
pub fn decode(bytes: &[u8]) -> anyhow::Result<(Recorded, Header)> {
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        bail!("no record's magic number at its start (not written by vmm explore record)");
    }
    if bytes.len() < HEADER {
        bail!("truncated: {} bytes, less than the {HEADER}-byte header", bytes.len());
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or_default());
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version != VERSION {
        bail!("a record of version {version}; this vmm reads version {VERSION}");
    }
    let (len, body_crc, base_len, base_crc) = (word(16), word(24), word(32), word(40));
    let have = (bytes.len() - HEADER) as u64;
    if len > MAX_BODY || len != have {
        bail!("truncated or overlong: the header announces a body of {len} bytes, the file holds {have}");
    }
    let body = &bytes[HEADER..];
    let got = CRC64.checksum(body);
    if got != body_crc {
        bail!("damaged: its body's checksum is {got:#018x}, the header records {body_crc:#018x}");
    }
    let mut r = Reader { bytes: body, at: 0 };
    let json_len = r.u32()? as usize;
    let settings: Settings =
        serde_json::from_slice(r.take(json_len)?).context("its settings are not the JSON of this version")?;
    let generation = r.u64()?;
    let mut barriers = Vec::new();
    for _ in 0..r.count(8)? {
        let mut barrier = BarrierRecord::default();
        for _ in 0..r.count(16)? {
            barrier.announced.push(FlushedRange { addr: r.u64()?, len: r.u64()? });
        }
        for _ in 0..r.count(8 + 2 * LINE as usize)? {
            barrier.lines.push((r.u64()?, r.line()?, r.line()?));
        }
        barrier.pending = r.lines()?;
        barrier.intended = r.lines()?;
        barriers.push(barrier);
    }
    let pending_at_end = r.lines()?;
    if r.at != body.len() {
        bail!("{} bytes after the record's end", body.len() - r.at);
    }
    let record = WriteOutRecord { generation, barriers, pending_at_end, done: true };
    Ok((Recorded { settings, record, id: id(body_crc, base_crc) }, Header { base_len, base_crc }))
}

/// Reads a record's body, refusing to read past it.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else { bail!("its body ends at byte {} inside a field", self.bytes.len()) };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }

    fn u64(&mut self) -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }

    /// A count of items of `size` bytes each, checked against the bytes left (a damaged
    /// count is refused before it sizes anything).
    fn count(&mut self, size: usize) -> anyhow::Result<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(size) > self.bytes.len() - self.at {
            bail!("a count of {n} items runs past its body's end");
        }
        Ok(n)
    }

    fn line(&mut self) -> anyhow::Result<[u8; LINE as usize]> {
        Ok(self.take(LINE as usize)?.try_into()?)
    }

    fn lines(&mut self) -> anyhow::Result<Vec<Line>> {
        (0..self.count(8 + LINE as usize)?).map(|_| Ok((self.u64()?, self.line()?))).collect()
    }
}

/// Checks the base's checksum (`got`, of its bytes read whole) against the record's header.
pub fn check_base(base: &Path, got: u64, header: &Header) -> anyhow::Result<()> {
    if got != header.base_crc {
        bail!(
            "{} is not the image this record was made from (its checksum is {got:#018x}, the record's {:#018x}): was it written since?",
            base.display(),
            header.base_crc
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn read_all(file: &File, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        file.read_exact_at(&mut v, 0).unwrap();
        v
    }

    fn sample() -> (Settings, WriteOutRecord) {
        let settings = Settings { write_out: 3, mem: 64 << 20, cmdline: "apps=kv".into(), plant: None };
        let barrier = BarrierRecord {
            announced: vec![FlushedRange { addr: 4096, len: 100 }],
            lines: vec![(4096, [1; 64], [2; 64]), (4160, [3; 64], [4; 64])],
            pending: vec![(8192, [5; 64])],
            intended: vec![(4096, [2; 64]), (4160, [4; 64])],
        };
        let record = WriteOutRecord {
            generation: 3,
            barriers: vec![barrier.clone(), barrier],
            pending_at_end: vec![(0, [9; 64])],
            done: true,
        };
        (settings, record)
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let (settings, record) = sample();
        std::fs::write(base_path(dir.path()), [7u8; 4096]).unwrap();
        let crc = image_crc(&[7u8; 4096]);
        let id = write(dir.path(), &settings, &record, 4096, crc).unwrap();
        let (got, header) = read(dir.path()).unwrap();
        assert_eq!(got.id, id);
        assert_eq!(got.settings, settings);
        assert_eq!(got.record.generation, 3);
        assert_eq!(got.record.barriers.len(), 2);
        assert_eq!(got.record.barriers[1].lines, record.barriers[1].lines);
        assert_eq!(got.record.barriers[0].pending, record.barriers[0].pending);
        assert_eq!(got.record.barriers[0].intended, record.barriers[0].intended);
        assert_eq!(got.record.barriers[0].announced, record.barriers[0].announced);
        assert_eq!(got.record.pending_at_end, record.pending_at_end);
        let base = File::open(base_path(dir.path())).unwrap();
        check_base(&base_path(dir.path()), image_crc(&read_all(&base, 4096)), &header).unwrap();
        let e = check_base(&base_path(dir.path()), image_crc(&[8u8; 4096]), &header).unwrap_err().to_string();
        assert!(e.contains("not the image this record was made from"), "{e}");
    }

    #[test]
    fn foreign_truncated_damaged_and_other_versions_are_refused() {
        let (settings, record) = sample();
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &settings, &record, 4096, 1).unwrap();
        let good = std::fs::read(record_path(dir.path())).unwrap();
        let err = |bytes: &[u8]| format!("{:#}", decode(bytes).unwrap_err());
        assert!(err(b"{\"format\": 1}").contains("not written by vmm explore record"));
        assert!(err(&good[..20]).contains("truncated"));
        assert!(err(&good[..good.len() - 1]).contains("truncated"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(err(&longer).contains("overlong"));
        let mut flipped = good.clone();
        flipped[HEADER + 30] ^= 1;
        assert!(err(&flipped).contains("damaged"));
        let mut version = good.clone();
        version[8] = 9;
        assert!(err(&version).contains("version 9"));
        // A body whose count runs past its end, with a checksum that fits it.
        let mut body = good[HEADER..].to_vec();
        let at = 4 + serde_json::to_vec(&settings).unwrap().len() + 8;
        body[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut forged = good[..HEADER].to_vec();
        forged[24..32].copy_from_slice(&CRC64.checksum(&body).to_le_bytes());
        forged.extend_from_slice(&body);
        assert!(err(&forged).contains("runs past its body's end"));
        // A base of another size.
        std::fs::write(base_path(dir.path()), [0u8; 100]).unwrap();
        assert!(format!("{:#}", read(dir.path()).unwrap_err()).contains("not its base"));
        assert!(format!("{:#}", read(&dir.path().join("nowhere")).unwrap_err()).contains("cannot open"));
    }

    /// A record's body edited at random and sealed again with a checksum that fits it (what
    /// a corrupt or hostile file from another host can be): decoding never panics, and what
    /// it accepts holds no more items than the body's bytes allow.
    #[test]
    fn random_bodies_with_a_fitting_checksum_are_decoded_or_refused_never_a_panic() {
        use rand::{RngExt, SeedableRng};
        let (settings, record) = sample();
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &settings, &record, 4096, 1).unwrap();
        let good = std::fs::read(record_path(dir.path())).unwrap();
        let mut rng = rand::rngs::SmallRng::seed_from_u64(0x005e_ed0f_e791);
        let (mut accepted, mut refused) = (0, 0);
        for round in 0..20_000u32 {
            let mut body = good[HEADER..].to_vec();
            for _ in 0..rng.random_range(1..=4) {
                let at = rng.random_range(0..body.len());
                body[at] = if round % 3 == 0 { 0xff } else { rng.random() };
            }
            body.truncate(rng.random_range(body.len() / 2..=body.len()));
            let mut file = good[..HEADER].to_vec();
            file[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
            file[24..32].copy_from_slice(&CRC64.checksum(&body).to_le_bytes());
            file.extend_from_slice(&body);
            match decode(&file) {
                Ok((got, _)) => {
                    accepted += 1;
                    let items: usize = got.record.barriers.iter().map(|b| b.lines.len() + b.pending.len()).sum();
                    assert!(items * 8 <= body.len(), "more items than bytes");
                }
                Err(_) => refused += 1,
            }
        }
        assert!(refused > 0 && accepted + refused == 20_000, "{accepted} accepted, {refused} refused");
    }
}
