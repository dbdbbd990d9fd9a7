//! The plate store on a disk (`plate_store=disk`, the paper's volatile plate function): the
//! same commit protocol as in NVM ([`super::write_out`], [`super::restore`]), driven
//! through a second [`Persist`] whose save-area addresses are byte offsets on the disk
//! (`nvram::disk`'s layout). A write-out's copies become disk writes from the regions' RAM,
//! `flush` + `fence` one disk flush (after the areas, before the table; after the table),
//! the table's write into a slot the commit; a restore's copies become disk reads into
//! fresh RAM. One protocol for both stores, tested once for each here and in `tests`.
//!
//! A request that fails latches the error: nothing after it is written, the table least of
//! all (a write-out whose areas may be incomplete must not commit), and the caller reports
//! the write-out as failed. The restore reads the chosen slot's areas into RAM and checks
//! the regions' content sums as they now stand (the pages summed as they were read back):
//! a damaged newest commit is passed over for the older slot, as in NVM, whose restore then
//! reads its own areas over whatever the first attempt left.

use core::fmt;

use nvram::disk::{Superblock, SECTOR, SLOTS, SLOT_BYTES};
use nvram::plate::{area_sum, AreaSum, PlateKind, PlateTable, TABLE_SIZE};
use nvram::plate_check::{check_disk_entries, Choice, Rejection};

use super::{CopyRange, Persist, RangeSum};
use crate::frames::{FrameBitmap, FrameError};

const PAGE: u64 = nvram::layout::PAGE_SIZE;

/// Which request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    Read,
    Write,
    Flush,
}

/// A disk request that failed, at byte `at` of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoError {
    pub request: Request,
    pub at: u64,
}

impl fmt::Display for IoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.request {
            Request::Read => write!(f, "a read at byte {:#x} of the disk failed", self.at),
            Request::Write => write!(f, "a write at byte {:#x} of the disk failed", self.at),
            Request::Flush => write!(f, "a flush of the disk failed"),
        }
    }
}

/// The disk and the RAM its requests move bytes from and to. Offsets and lengths are
/// multiples of [`SECTOR`]; a request is one transfer however long (the guest's driver
/// hands each to the device as one descriptor chain), so the write-out issues one request
/// per run of pages, never one per page.
pub trait Disk {
    /// Writes RAM `ram..ram + len` to the disk at byte `at`.
    fn write(&mut self, at: u64, ram: u64, len: u64) -> Result<(), IoError>;
    /// Writes `bytes` to the disk at byte `at`.
    fn write_bytes(&mut self, at: u64, bytes: &[u8]) -> Result<(), IoError>;
    /// Reads the disk at byte `at` into RAM `ram..ram + len`.
    fn read(&mut self, at: u64, ram: u64, len: u64) -> Result<(), IoError>;
    /// Reads the disk at byte `at` into `bytes`.
    fn read_bytes(&mut self, at: u64, bytes: &mut [u8]) -> Result<(), IoError>;
    /// Makes every write before it durable.
    fn flush(&mut self) -> Result<(), IoError>;
    /// RAM `addr..addr + len` as the CPU sees it (to checksum regions).
    fn ram(&self, addr: u64, len: u64) -> &[u8];
    /// Whether checksumming is cheap here (see [`Persist::can_sum`]).
    fn can_sum(&self) -> bool {
        true
    }
}

/// Which way a [`DiskPersist`]'s copies go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A write-out: RAM to the areas (`CopyRange::dst` is a disk offset).
    ToDisk,
    /// A restore: the areas to RAM (`CopyRange::src` is a disk offset).
    FromDisk,
}

/// [`Persist`] over a [`Disk`] (see the module's doc).
pub struct DiskPersist<'a, D: Disk> {
    pub disk: &'a mut D,
    direction: Direction,
    /// A bounce buffer (a multiple of [`SECTOR`], at least one): a slot's last partial
    /// sector, and the old contents of areas whose known sum a partial copy moves.
    scratch: &'a mut [u8],
    unflushed: bool,
    /// The first request that failed: nothing was issued after it.
    pub error: Option<IoError>,
    /// Requests issued (reads, writes, flushes).
    pub requests: u64,
}

impl<'a, D: Disk> DiskPersist<'a, D> {
    pub fn new(disk: &'a mut D, direction: Direction, scratch: &'a mut [u8]) -> Self {
        Self { disk, direction, scratch, unflushed: false, error: None, requests: 0 }
    }

    /// Runs one request unless one failed before.
    fn request(&mut self, f: impl FnOnce(&mut D) -> Result<(), IoError>) {
        if self.error.is_some() {
            return;
        }
        self.requests += 1;
        if let Err(e) = f(self.disk) {
            self.error = Some(e);
        }
    }

    /// The content sum of disk bytes `at..at + len` (page `first` onwards), read through
    /// the scratch buffer; `None` once a request has failed.
    fn disk_sum(&mut self, at: u64, len: u64, first: u64) -> Option<u64> {
        let chunk = (self.scratch.len() as u64 / PAGE * PAGE).max(PAGE);
        let mut sum = AreaSum::new(first);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk);
            let buf = self.scratch.get_mut(..n as usize)?;
            self.requests += 1;
            if let Err(e) = self.disk.read_bytes(at + done, buf) {
                self.error = Some(e);
                return None;
            }
            buf.chunks(PAGE as usize).for_each(|p| sum.page(p));
            done += n;
        }
        Some(sum.sum())
    }
}

impl<D: Disk> Persist for DiskPersist<'_, D> {
    /// One request per range. A write-out's writes need the flush that [`Persist::fence`]
    /// issues; a restore's reads land in RAM, which has nothing to make durable.
    fn copy(&mut self, ranges: &[CopyRange]) -> bool {
        for r in ranges {
            match self.direction {
                Direction::ToDisk => {
                    self.request(|d| d.write(r.dst, r.src, r.len));
                    self.unflushed = true;
                }
                Direction::FromDisk => self.request(|d| d.read(r.src, r.dst, r.len)),
            }
        }
        self.direction == Direction::FromDisk
    }

    /// The pages written are summed in RAM before they go; the pages overwritten, when a
    /// known sum must be moved, are read back from the area first (only a partial copy asks
    /// for them: a user space's dirty pages).
    fn copy_summed(&mut self, ranges: &[CopyRange], sums: &mut [RangeSum]) -> bool {
        for (r, s) in ranges.iter().zip(sums.iter_mut()) {
            s.written = area_sum(self.disk.ram(r.src, r.len), s.first);
            s.overwritten = if s.wants_overwritten() { self.disk_sum(r.dst, r.len, s.first).unwrap_or(0) } else { 0 };
        }
        self.copy(ranges)
    }

    /// The disk flushes everything at once: [`Persist::fence`] does it.
    fn flush(&mut self, _addr: u64, _len: u64) {}

    fn fence(&mut self) {
        if self.unflushed {
            self.request(|d| d.flush());
            self.unflushed = false;
        }
    }

    /// Writes the table's meaningful ranges, widened to whole sectors (the slot's room
    /// holds them: [`SLOT_BYTES`]), into slot `slot`; the bytes past the table in its last
    /// sector go through the scratch buffer as zeros.
    fn write_slot(&mut self, slot: usize, table: &PlateTable) {
        let bytes = zerocopy::IntoBytes::as_bytes(table);
        let whole = TABLE_SIZE as u64 / SECTOR * SECTOR;
        for (at, len) in table.used_ranges() {
            if len == 0 {
                continue;
            }
            let start = at as u64 / SECTOR * SECTOR;
            let end = (at + len) as u64;
            let direct = end.div_ceil(SECTOR) * SECTOR;
            let direct = if direct <= TABLE_SIZE as u64 { direct } else { whole };
            if start < direct {
                let part = &bytes[start as usize..direct as usize];
                self.request(|d| d.write_bytes(SLOTS[slot] + start, part));
            }
            if end > direct {
                let tail = &bytes[direct as usize..];
                let Some(buf) = self.scratch.get_mut(..SECTOR as usize) else { return };
                buf.fill(0);
                buf[..tail.len()].copy_from_slice(tail);
                let at = SLOTS[slot] + direct;
                if self.error.is_none() {
                    self.requests += 1;
                    if let Err(e) = self.disk.write_bytes(at, buf) {
                        self.error = Some(e);
                    }
                }
            }
        }
        self.unflushed = true;
    }

    fn read(&self, addr: u64, len: u64) -> &[u8] {
        self.disk.ram(addr, len)
    }

    fn can_sum(&self) -> bool {
        self.direction == Direction::ToDisk && self.disk.can_sum()
    }
}

const _: () = assert!(SLOT_BYTES >= (TABLE_SIZE as u64).div_ceil(SECTOR) * SECTOR);

/// Why the disk's plate store cannot be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenError {
    Io(IoError),
    Disk(nvram::disk::DiskError),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "{e}"),
            Self::Disk(e) => write!(f, "{e}"),
        }
    }
}

/// Opens the plate store of a disk of `capacity` bytes: its superblock, and whether the
/// disk was blank and has been formatted now (a fresh start). A blank disk is formatted:
/// both slots' first sectors zeroed and flushed, then the superblock written and flushed,
/// so that a crash meanwhile leaves either a blank disk again or an empty store. A disk that
/// holds anything else is refused (`nvram::disk::read_superblock`): it is the user's, and a
/// typo in `--disk` must not cost them a file. `sector`: at least [`SECTOR`] bytes.
pub fn open<D: Disk>(disk: &mut D, capacity: u64, sector: &mut [u8]) -> Result<(Superblock, bool), OpenError> {
    let buf = sector.get_mut(..SECTOR as usize).ok_or(OpenError::Disk(nvram::disk::DiskError::Checksum))?;
    disk.read_bytes(0, buf).map_err(OpenError::Io)?;
    match nvram::disk::read_superblock(buf, capacity).map_err(OpenError::Disk)? {
        nvram::disk::Found::Store(sb) => Ok((sb, false)),
        nvram::disk::Found::Blank => {
            let sb = Superblock::new(capacity).map_err(OpenError::Disk)?;
            buf.fill(0);
            for at in SLOTS {
                disk.write_bytes(at, buf).map_err(OpenError::Io)?;
            }
            disk.flush().map_err(OpenError::Io)?;
            buf[..nvram::disk::SUPERBLOCK_SIZE].copy_from_slice(zerocopy::IntoBytes::as_bytes(&sb));
            disk.write_bytes(0, buf).map_err(OpenError::Io)?;
            disk.flush().map_err(OpenError::Io)?;
            Ok((sb, true))
        }
    }
}

/// Reads both commit slots into RAM at `ram[0]`, `ram[1]` (each [`SLOT_BYTES`] of room).
pub fn read_slots<D: Disk>(disk: &mut D, ram: [u64; 2]) -> Result<(), IoError> {
    for (at, to) in SLOTS.into_iter().zip(ram) {
        disk.read(at, to, SLOT_BYTES)?;
    }
    Ok(())
}

/// What a restore from the disk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Which slot was restored, and why the others were passed over.
    pub choice: Choice,
    /// Pages read back into RAM by the restore that stood.
    pub pages: u64,
    /// Requests issued, all attempts included.
    pub requests: u64,
}

/// Restores the newest commit that checks out from the disk into RAM: of `slots` (as read
/// from the disk), the one claiming the higher generation first; a slot is passed over if
/// its table does not check out, an entry does not fit RAM's `frames` frames from `base`
/// and the disk's area space (`nvram::plate_check::check_disk_entries`), a read fails, or a
/// region read back does not sum to its area's recorded sum (when `disk.can_sum()`).
/// `scratch`: the entries check's bitmap (RAM's frames and the area pages); `bounce`: see
/// [`DiskPersist`].
pub fn restore<D: Disk>(
    slots: [&PlateTable; 2],
    base: u64,
    frames: u64,
    sb: &Superblock,
    scratch: &mut [u64],
    disk: &mut D,
    bounce: &mut [u8],
) -> Restored {
    let mut choice = Choice { index: None, rejected: [None; 2], generations: slots.map(|t| t.generation) };
    let order = if slots[1].generation > slots[0].generation { [1, 0] } else { [0, 1] };
    let mut requests = 0;
    let mut pages = 0;
    for i in order {
        let t = slots[i];
        let checked = t
            .check()
            .map_err(Rejection::Table)
            .and_then(|()| check_disk_entries(t, base, frames, sb, scratch).map_err(Rejection::Entry));
        if let Err(r) = checked {
            choice.rejected[i] = Some(r);
            continue;
        }
        let mut p = DiskPersist::new(disk, Direction::FromDisk, bounce);
        pages = super::restore(t, &mut p, &[], |_| false);
        requests += p.requests;
        if p.error.is_some() {
            choice.rejected[i] = Some(Rejection::Unreadable);
            continue;
        }
        if let Err(n) = verify_restored(t, &*disk) {
            choice.rejected[i] = Some(Rejection::Content(n));
            continue;
        }
        choice.index = Some(i);
        break;
    }
    Restored { choice, pages, requests }
}

/// Checks each restored region against the recorded sum of the area it was read from;
/// `Err(n)`: plate `n`'s does not match. Nothing to check where summing is dear.
fn verify_restored<D: Disk>(table: &PlateTable, disk: &D) -> Result<(), usize> {
    if !disk.can_sum() {
        return Ok(());
    }
    for (i, p) in table.plates().iter().enumerate().filter(|(_, p)| p.valid != 0) {
        let v = (p.valid - 1) as usize & 1;
        if p.summed & (1 << v) != 0 && area_sum(disk.ram(p.src, p.pages * PAGE), 0) != p.sum[v] {
            return Err(i);
        }
    }
    Ok(())
}

/// Marks in `areas` (the allocator of the area space) every save area `table` names: each
/// plate's two (the fixed plates' lie outside the area space, at fixed places) and the
/// pending list's. The allocation is not stored on the disk: it follows from the committed
/// table, rebuilt at every boot; pending areas stay taken until the caller frees them.
pub fn take_areas(table: &PlateTable, areas: &mut FrameBitmap) -> Result<(), FrameError> {
    for p in table.plates().iter().filter(|p| p.kind != PlateKind::Fixed as u32 && p.pages != 0) {
        for a in p.area {
            areas.reserve(a, p.pages)?;
        }
    }
    for p in table.pending().iter().filter(|p| p.pages != 0) {
        for a in p.area {
            areas.reserve(a, p.pages)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
