//! virtio-blk requests: walks the queue's descriptor chains, checks each against the
//! device's rules and the disk's size, runs it on the [`Disk`] and writes the status byte.
//!
//! A request is `header (16 bytes, device-readable) | data segments | status (1 byte,
//! device-writable)`, each part in its own descriptors, as Linux and virtio-drivers lay
//! it out. The device walks the chain itself, instead of `virtio_queue::DescriptorChain`,
//! because that iterator ends a looping, over-long or indirect chain silently: here each
//! such chain is an error the driver must be told about.

use std::num::Wrapping;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::disk::{Disk, SECTOR_SIZE};
use super::{ErrorLog, GuestMem, QUEUE_MAX_SIZE};

/// The most data segments one request may have; offered as `seg_max`.
pub const SEG_MAX: u32 = 128;
/// The bytes of a request header: `type: le32, reserved: le32, sector: le64`.
const HEADER_LEN: u32 = 16;
/// The serial GET_ID returns is this long (shorter serials are NUL-padded).
pub const ID_LEN: usize = 20;
/// Data moves between the file and guest memory through a bounce buffer of this size,
/// allocated once: a request of any length costs no allocation.
const BOUNCE_LEN: usize = 64 * 1024;

/// Told of every range of guest RAM the device stores into (data read from the disk, status
/// bytes, used-ring entries), as `(guest address, length)`. KVM's dirty log only sees the
/// vCPUs' stores, so the VMM marks these in its dirty tracker and persistence domain.
pub type WriteHook = Box<dyn FnMut(u64, u64) + Send>;

fn mark(hook: &mut Option<WriteHook>, addr: GuestAddress, len: u64) {
    if let Some(hook) = hook.as_mut() {
        hook(addr.raw_value(), len);
    }
}

/// Why the queue cannot be processed any further: the device needs a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// The available ring's index is unreadable or claims more entries than the queue holds.
    AvailRing,
    /// A chain head or `next` index is beyond the queue.
    DescriptorIndex,
    /// A chain is longer than the queue: a loop, or more descriptors than the queue size.
    ChainTooLong,
    /// A descriptor lies outside guest memory.
    DescriptorTable,
    /// An indirect descriptor, a feature the device never offered.
    Indirect,
    /// The chain has no device-writable last byte, so no status can be returned.
    NoStatus,
    /// The used ring could not be written.
    UsedRing,
    /// The queue was readied with a size or placement the device refused (a size not a
    /// power of two or above QueueNumMax, a misaligned area, an area outside guest RAM).
    QueueSetup,
    /// A notify came before the queue was ready or before DRIVER_OK (or, on the modern
    /// layout, without FEATURES_OK).
    NotReady,
}

/// The request-serving half of the block device, independent of the transport.
pub struct BlockBackend {
    disk: Disk,
    serial: [u8; ID_LEN],
    bounce: Vec<u8>,
    descs: Vec<Descriptor>,
    errors: ErrorLog,
    requests: u64,
    on_write: Option<WriteHook>,
}

/// What went wrong with one request, answered with a status byte.
enum Status {
    Ok,
    IoErr,
    Unsupp,
}

impl BlockBackend {
    /// Serves `disk`; GET_ID returns `serial`, cut or NUL-padded to 20 bytes.
    pub fn new(disk: Disk, serial: &str) -> Self {
        let mut id = [0u8; ID_LEN];
        let n = serial.len().min(ID_LEN);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Self {
            disk,
            serial: id,
            bounce: vec![0; BOUNCE_LEN],
            descs: Vec::with_capacity(usize::from(QUEUE_MAX_SIZE)),
            errors: ErrorLog::default(),
            requests: 0,
            on_write: None,
        }
    }

    /// Calls `hook` with each range of guest RAM the device is about to store into.
    pub fn with_write_hook(mut self, hook: WriteHook) -> Self {
        self.on_write = Some(hook);
        self
    }

    /// The disk served.
    pub fn disk(&self) -> &Disk {
        &self.disk
    }

    /// Guest errors seen so far (each malformed request or broken queue counts one).
    pub fn errors(&self) -> u64 {
        self.errors.count()
    }

    /// How many of the guest's errors were logged (the rest were only counted).
    pub fn errors_logged(&self) -> u64 {
        self.errors.logged()
    }

    /// Requests completed so far, failed ones included.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Heap bytes the backend holds: fixed at creation, whatever the guest sends (the
    /// randomized test checks it stays so).
    pub fn heap_bytes(&self) -> usize {
        self.bounce.capacity() + self.descs.capacity() * std::mem::size_of::<Descriptor>()
    }

    /// Serves the chains the driver made available, at most one queue's worth (a driver
    /// that adds more meanwhile notifies again). Returns how many were completed, or why
    /// the queue is broken; chains completed before the break stay completed.
    pub fn process_queue(&mut self, queue: &mut Queue, mem: &GuestMem) -> (u16, Result<(), Broken>) {
        let mut done = 0;
        while done < queue.size() {
            let head = match queue.iter(mem) {
                Ok(mut chains) => match chains.next() {
                    Some(chain) => chain.head_index(),
                    None => break,
                },
                Err(e) => {
                    self.errors.note("bad available ring", format_args!("{e}"));
                    return (done, Err(Broken::AvailRing));
                }
            };
            let used_len = match self.serve_chain(queue, mem, head) {
                Ok(len) => len,
                Err(b) => {
                    self.errors.note("queue broken", format_args!("{b:?} in the chain at {head}"));
                    return (done, Err(b));
                }
            };
            self.requests += 1;
            let used_ring = GuestAddress(queue.used_ring());
            mark(&mut self.on_write, used_ring, 4 + 8 * u64::from(queue.size()));
            if queue.add_used(mem, head, used_len).is_err() {
                return (done, Err(Broken::UsedRing));
            }
            done += 1;
        }
        (done, Ok(()))
    }

    /// Serves the chain starting at `head`; returns the used length (bytes written to the
    /// guest, status byte included).
    fn serve_chain(&mut self, queue: &Queue, mem: &GuestMem, head: u16) -> Result<u32, Broken> {
        self.collect_chain(mem, GuestAddress(queue.desc_table()), queue.size(), head)?;
        let last = *self.descs.last().ok_or(Broken::NoStatus)?;
        if !last.is_write_only() || last.len() == 0 {
            return Err(Broken::NoStatus);
        }
        // The status is the chain's last byte (virtio 1.x, 5.2.6).
        let status_addr = last.addr().checked_add(u64::from(last.len()) - 1).ok_or(Broken::NoStatus)?;
        if !mem.check_range(status_addr, 1) {
            return Err(Broken::NoStatus);
        }
        let (status, written) = if last.len() != 1 {
            self.errors.note("bad request", format_args!("status descriptor of {} bytes", last.len()));
            (Status::IoErr, 0)
        } else {
            self.serve_request(mem)
        };
        let byte = match status {
            Status::Ok => VIRTIO_BLK_S_OK,
            Status::IoErr => VIRTIO_BLK_S_IOERR,
            Status::Unsupp => VIRTIO_BLK_S_UNSUPP,
        } as u8;
        mark(&mut self.on_write, status_addr, 1);
        mem.write_obj(byte, status_addr).map_err(|_| Broken::NoStatus)?;
        Ok(written + 1)
    }

    /// Reads the chain into `self.descs`, refusing what the iterator would hide.
    fn collect_chain(&mut self, mem: &GuestMem, table: GuestAddress, size: u16, head: u16) -> Result<(), Broken> {
        self.descs.clear();
        let mut index = head;
        loop {
            if index >= size {
                return Err(Broken::DescriptorIndex);
            }
            if self.descs.len() >= usize::from(size) {
                return Err(Broken::ChainTooLong);
            }
            let addr = table.checked_add(u64::from(index) * 16).ok_or(Broken::DescriptorTable)?;
            let raw: RawDescriptor = mem.read_obj(addr).map_err(|_| Broken::DescriptorTable)?;
            let desc = Descriptor::from(raw);
            if desc.refers_to_indirect_table() {
                return Err(Broken::Indirect);
            }
            self.descs.push(desc);
            if !desc.has_next() {
                return Ok(());
            }
            index = desc.next();
        }
    }

    /// Runs the request in `self.descs` (whose last one is a 1-byte status); returns its
    /// status and the data bytes written into guest memory.
    fn serve_request(&mut self, mem: &GuestMem) -> (Status, u32) {
        let n = self.descs.len();
        if n < 2 {
            return self.bad("chain without a header", format_args!("{n} descriptor(s)"));
        }
        let header = self.descs[0];
        if header.is_write_only() || header.len() != HEADER_LEN {
            return self.bad("bad header descriptor", format_args!("{header:?}"));
        }
        let mut raw = [0u8; HEADER_LEN as usize];
        if mem.read_slice(&mut raw, header.addr()).is_err() {
            return self.bad("header outside guest memory", format_args!("{:#x}", header.addr().raw_value()));
        }
        let kind = u32::from_le_bytes(raw[0..4].try_into().unwrap_or_default());
        let sector = u64::from_le_bytes(raw[8..16].try_into().unwrap_or_default());
        let data = 1..n - 1;
        if data.len() > SEG_MAX as usize {
            return self.bad("too many segments", format_args!("{}", data.len()));
        }
        let device_writes = match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => true,
            VIRTIO_BLK_T_OUT => false,
            VIRTIO_BLK_T_FLUSH => {
                return match self.disk.flush() {
                    Ok(()) => (Status::Ok, 0),
                    Err(e) => self.bad("flush failed", format_args!("{e}")),
                };
            }
            _ => {
                self.errors.note("unsupported request", format_args!("type {kind}"));
                return (Status::Unsupp, 0);
            }
        };
        let mut total = 0u64;
        for d in &self.descs[data.clone()] {
            if d.is_write_only() != device_writes || !mem.check_range(d.addr(), d.len() as usize) {
                let d = *d;
                return self.bad("bad data descriptor", format_args!("type {kind}: {d:?}"));
            }
            total += u64::from(d.len());
        }
        // The used length (data plus status) is a u32; a longer chain is illegal anyway
        // (virtio 1.x, 2.7.5.2), and possible only with segments overlapping in a large RAM.
        if total >= u64::from(u32::MAX) {
            return self.bad("request of 4 GiB or more", format_args!("{total} bytes"));
        }
        if kind == VIRTIO_BLK_T_GET_ID {
            return self.get_id(mem, data);
        }
        let in_disk = sector.checked_mul(SECTOR_SIZE).and_then(|start| Some((start, start.checked_add(total)?)));
        let start = match in_disk {
            Some((start, end)) if total.is_multiple_of(SECTOR_SIZE) && end <= self.disk.len() => start,
            _ => return self.bad("request outside the disk", format_args!("sector {sector}, {total} bytes")),
        };
        match self.transfer(mem, data, start, device_writes) {
            Ok(()) if device_writes => (Status::Ok, total as u32),
            Ok(()) => (Status::Ok, 0),
            Err(written) => (Status::IoErr, written),
        }
    }

    /// Moves the data segments to or from the disk from byte `start`, through the bounce
    /// buffer. On failure returns the bytes already written into guest memory.
    fn transfer(
        &mut self,
        mem: &GuestMem,
        data: std::ops::Range<usize>,
        start: u64,
        to_guest: bool,
    ) -> Result<(), u32> {
        let mut offset = start;
        let mut written = Wrapping(0u32);
        for i in data {
            let d = self.descs[i];
            let mut done = 0u32;
            while done < d.len() {
                let n = (d.len() - done).min(BOUNCE_LEN as u32);
                let buf = &mut self.bounce[..n as usize];
                let addr = d.addr().unchecked_add(u64::from(done));
                if to_guest {
                    mark(&mut self.on_write, addr, u64::from(n));
                }
                let result = if to_guest {
                    self.disk
                        .read_at(buf, offset)
                        .map_err(|e| e.to_string())
                        .and_then(|()| mem.write_slice(buf, addr).map_err(|e| e.to_string()))
                } else {
                    mem.read_slice(buf, addr)
                        .map_err(|e| e.to_string())
                        .and_then(|()| self.disk.write_at(buf, offset).map_err(|e| e.to_string()))
                };
                if let Err(e) = result {
                    self.errors.note("disk I/O failed", format_args!("at byte {offset}: {e}"));
                    return Err(written.0);
                }
                if to_guest {
                    written += n;
                }
                done += n;
                offset += u64::from(n);
            }
        }
        Ok(())
    }

    /// Writes the serial into the request's (device-writable) data segments.
    fn get_id(&mut self, mem: &GuestMem, data: std::ops::Range<usize>) -> (Status, u32) {
        let mut id = &self.serial[..];
        let mut written = 0u32;
        for i in data {
            let d = self.descs[i];
            let n = id.len().min(d.len() as usize);
            mark(&mut self.on_write, d.addr(), n as u64);
            if mem.write_slice(&id[..n], d.addr()).is_err() {
                return self.bad("GET_ID buffer outside guest memory", format_args!("{d:?}"));
            }
            id = &id[n..];
            written += n as u32;
        }
        (Status::Ok, written)
    }

    fn bad(&mut self, what: &str, detail: std::fmt::Arguments<'_>) -> (Status, u32) {
        self.errors.note(what, detail);
        (Status::IoErr, 0)
    }
}
