//! Host tests of the whole device: a driver written the way virtio-drivers' `MmioTransport`
//! and `VirtIOBlk` drive it (register handshake, then requests through real descriptor
//! chains in a test guest memory), and the hostile cases of the module's contract.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, split::VirtqUsedElem, RawDescriptor};
use virtio_queue::mock::DescriptorTable;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use crate::BusDevice;

use super::block::Broken;
use super::*;

pub(super) const MEM_SIZE: usize = 0x40_0000;
const QSIZE: u16 = 16;
const QUEUE_AT: u64 = 0x1_0000;
const HEADER_AT: u64 = 0x2_0000;
const STATUS_AT: u64 = 0x2_1000;
const DATA_AT: u64 = 0x10_0000;
const DISK_SECTORS: u64 = 64;
const W: u16 = VRING_DESC_F_WRITE as u16;
const R: u16 = 0;

/// An interrupt line that counts its raises.
pub(super) struct Counter(pub(super) Arc<AtomicU32>);

impl Interrupt for Counter {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Where the driver put the queue's three areas.
#[derive(Clone, Copy)]
pub(super) struct Layout {
    pub(super) desc: u64,
    pub(super) avail: u64,
    pub(super) used: u64,
    pub(super) size: u16,
}

pub(super) struct Rig {
    pub(super) _dir: TempDir,
    pub(super) mem: GuestMem,
    pub(super) dev: MmioBlock,
    pub(super) irqs: Arc<AtomicU32>,
    pub(super) layout: Layout,
    version: MmioVersion,
}

pub(super) fn rd(dev: &mut MmioBlock, offset: u32) -> u32 {
    let mut data = [0u8; 4];
    dev.read(u64::from(offset), &mut data);
    u32::from_le_bytes(data)
}

pub(super) fn wr(dev: &mut MmioBlock, offset: u32, value: u32) {
    dev.write(u64::from(offset), &value.to_le_bytes());
}

/// What `VirtIOBlk` asks for: read-only, flush, indirect and event-idx, plus VERSION_1.
const DRIVER_SUPPORTED: u64 = 1 << VIRTIO_BLK_F_RO
    | 1 << VIRTIO_BLK_F_FLUSH
    | 1 << VIRTIO_BLK_F_BLK_SIZE
    | 1 << VIRTIO_BLK_F_SEG_MAX
    | 1 << 28 // VIRTIO_RING_F_INDIRECT_DESC
    | 1 << 29 // VIRTIO_RING_F_EVENT_IDX
    | 1 << VIRTIO_F_VERSION_1;

/// Probe and negotiate as virtio-drivers does: reset, ACKNOWLEDGE, DRIVER, features,
/// FEATURES_OK. Returns whether the device kept FEATURES_OK.
pub(super) fn negotiate(dev: &mut MmioBlock, version: MmioVersion, wanted: u64) -> bool {
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    let v = rd(dev, reg::VIRTIO_MMIO_VERSION);
    assert_eq!(v, if version == MmioVersion::Modern { 2 } else { 1 });
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_DEVICE_ID), 2);
    wr(dev, reg::VIRTIO_MMIO_STATUS, 0);
    let ack = VIRTIO_CONFIG_S_ACKNOWLEDGE;
    wr(dev, reg::VIRTIO_MMIO_STATUS, ack);
    wr(dev, reg::VIRTIO_MMIO_STATUS, ack | VIRTIO_CONFIG_S_DRIVER);
    wr(dev, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    let mut offered = u64::from(rd(dev, reg::VIRTIO_MMIO_DEVICE_FEATURES));
    wr(dev, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    offered |= u64::from(rd(dev, reg::VIRTIO_MMIO_DEVICE_FEATURES)) << 32;
    let accepted = offered & wanted;
    wr(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES, accepted as u32);
    wr(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES, (accepted >> 32) as u32);
    wr(dev, reg::VIRTIO_MMIO_STATUS, ack | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK);
    let kept = rd(dev, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK != 0;
    if version == MmioVersion::Legacy {
        wr(dev, reg::VIRTIO_MMIO_GUEST_PAGE_SIZE, 4096);
    }
    kept
}

/// Queue 0 setup as `VirtQueue::new` + `queue_set` do it, then DRIVER_OK.
pub(super) fn setup_queue(dev: &mut MmioBlock, version: MmioVersion, l: Layout) {
    wr(dev, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    let in_use = match version {
        MmioVersion::Modern => rd(dev, reg::VIRTIO_MMIO_QUEUE_READY),
        MmioVersion::Legacy => rd(dev, reg::VIRTIO_MMIO_QUEUE_PFN),
    };
    assert_eq!(in_use, 0);
    assert!(rd(dev, reg::VIRTIO_MMIO_QUEUE_NUM_MAX) >= u32::from(QSIZE));
    wr(dev, reg::VIRTIO_MMIO_QUEUE_NUM, u32::from(l.size));
    match version {
        MmioVersion::Modern => {
            for (lo, addr) in [
                (reg::VIRTIO_MMIO_QUEUE_DESC_LOW, l.desc),
                (reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, l.avail),
                (reg::VIRTIO_MMIO_QUEUE_USED_LOW, l.used),
            ] {
                wr(dev, lo, addr as u32);
                wr(dev, lo + 4, (addr >> 32) as u32);
            }
            wr(dev, reg::VIRTIO_MMIO_QUEUE_READY, 1);
        }
        MmioVersion::Legacy => {
            wr(dev, reg::VIRTIO_MMIO_QUEUE_ALIGN, 4096);
            wr(dev, reg::VIRTIO_MMIO_QUEUE_PFN, (l.desc / 4096) as u32);
        }
    }
    let status = rd(dev, reg::VIRTIO_MMIO_STATUS);
    wr(dev, reg::VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
}

fn layout(version: MmioVersion) -> Layout {
    match version {
        // Areas a page apart. (The mock's own `MockSplitQueue` layout puts the used ring
        // inside the available ring's entries, so it is not used.)
        MmioVersion::Modern => {
            Layout { desc: QUEUE_AT, avail: QUEUE_AT + 0x1000, used: QUEUE_AT + 0x2000, size: QSIZE }
        }
        MmioVersion::Legacy => {
            let n = u64::from(QSIZE);
            let avail = QUEUE_AT + 16 * n;
            let used = (avail + 6 + 2 * n).next_multiple_of(4096);
            Layout { desc: QUEUE_AT, avail, used, size: QSIZE }
        }
    }
}

impl Rig {
    pub(super) fn new(version: MmioVersion) -> Self {
        let mut rig = Self::unready(version);
        assert!(negotiate(&mut rig.dev, version, DRIVER_SUPPORTED));
        setup_queue(&mut rig.dev, version, rig.layout);
        assert_eq!(rig.dev.status() & VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_DRIVER_OK);
        rig
    }

    /// A device not yet probed.
    pub(super) fn unready(version: MmioVersion) -> Self {
        let dir = TempDir::new().unwrap();
        let disk = Disk::open(dir.as_path().join("disk.img"), DISK_SECTORS * 512).unwrap();
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let irqs = Arc::new(AtomicU32::new(0));
        let backend = BlockBackend::new(disk, "nvm-checkpoint-disk-0-and-more");
        let dev = MmioBlock::new(version, mem.clone(), backend, Box::new(Counter(irqs.clone())));
        let layout = layout(version);
        Self { _dir: dir, mem, dev, irqs, layout, version }
    }

    /// Stores `descs` at table indexes 0.., makes index `head` available and notifies.
    /// Returns the new used entry, if the device wrote one.
    fn submit_raw(&mut self, descs: &[Descriptor], head: u16) -> Option<VirtqUsedElem> {
        let l = self.layout;
        let table = DescriptorTable::new(&self.mem, GuestAddress(l.desc), l.size);
        for (i, d) in descs.iter().enumerate() {
            table.store(i as u16, RawDescriptor::from(*d)).unwrap();
        }
        // Raw ring accesses: the mock's ring constructors zero the indexes they wrap.
        let (avail_idx, used_idx) = (GuestAddress(l.avail + 2), GuestAddress(l.used + 2));
        let idx: u16 = self.mem.read_obj(avail_idx).unwrap();
        let slot = GuestAddress(l.avail + 4 + 2 * u64::from(idx % l.size));
        self.mem.write_obj(head, slot).unwrap();
        self.mem.write_obj(idx.wrapping_add(1), avail_idx).unwrap();
        let before: u16 = self.mem.read_obj(used_idx).unwrap();
        wr(&mut self.dev, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let after: u16 = self.mem.read_obj(used_idx).unwrap();
        assert!(after.wrapping_sub(before) <= 1, "{before} -> {after}, avail {idx}");
        let elem = GuestAddress(l.used + 4 + 8 * u64::from(before % l.size));
        (after != before).then(|| self.mem.read_obj(elem).unwrap())
    }

    /// A well-linked chain of `(addr, len, flags)` at indexes 0..; returns (status, used len).
    fn submit(&mut self, parts: &[(u64, u32, u16)]) -> Option<(u8, u32)> {
        let descs: Vec<Descriptor> = parts
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let more = i + 1 < parts.len();
                let next_flag = if more { VRING_DESC_F_NEXT as u16 } else { 0 };
                Descriptor::new(addr, len, flags | next_flag, if more { i as u16 + 1 } else { 0 })
            })
            .collect();
        self.mem.write_obj(0xaau8, GuestAddress(STATUS_AT)).unwrap();
        let used = self.submit_raw(&descs, 0)?;
        assert_eq!(used.id(), 0);
        Some((self.mem.read_obj(GuestAddress(STATUS_AT)).unwrap(), used.len()))
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HEADER_AT)).unwrap();
    }

    /// A request of `kind` at `sector` with `data` segments; returns (status, used len).
    fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u8, u32) {
        self.header(kind, sector);
        let mut parts = vec![(HEADER_AT, 16, R)];
        parts.extend_from_slice(data);
        parts.push((STATUS_AT, 1, W));
        self.submit(&parts).expect("the device completes the request")
    }

    fn assert_broken(&self) {
        assert!(self.dev.needs_reset(), "the device should need a reset");
        assert_ne!(self.dev.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;

fn round_trip(version: MmioVersion) {
    let mut rig = Rig::new(version);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    rig.mem.write_slice(&pattern, GuestAddress(DATA_AT)).unwrap();
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 5, &[(DATA_AT, 1024, R)]), (OK, 1));
    assert_eq!(rd(&mut rig.dev, reg::VIRTIO_MMIO_INTERRUPT_STATUS), reg::VIRTIO_MMIO_INT_VRING);
    wr(&mut rig.dev, reg::VIRTIO_MMIO_INTERRUPT_ACK, reg::VIRTIO_MMIO_INT_VRING);
    assert_eq!(rd(&mut rig.dev, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert_eq!(rig.irqs.load(Ordering::SeqCst), 1);

    let on_disk = std::fs::read(rig.dev.backend().disk().path()).unwrap();
    assert_eq!(&on_disk[5 * 512..7 * 512], &pattern[..]);

    // Read it back in two segments, landing elsewhere.
    let back = DATA_AT + 0x1_0000;
    let (status, len) = rig.request(VIRTIO_BLK_T_IN, 5, &[(back, 512, W), (back + 0x2000, 512, W)]);
    assert_eq!((status, len), (OK, 1025), "used length counts the data and the status");
    let mut got = vec![0u8; 1024];
    rig.mem.read_slice(&mut got[..512], GuestAddress(back)).unwrap();
    rig.mem.read_slice(&mut got[512..], GuestAddress(back + 0x2000)).unwrap();
    assert_eq!(got, pattern);
    assert_eq!(rig.irqs.load(Ordering::SeqCst), 2);
    assert_eq!(rig.dev.backend().errors(), 0);
}

#[test]
fn write_then_read_round_trip_modern() {
    round_trip(MmioVersion::Modern);
}

#[test]
fn write_then_read_round_trip_legacy() {
    round_trip(MmioVersion::Legacy);
}

#[test]
fn flush_get_id_and_unsupported_types() {
    let mut rig = Rig::new(MmioVersion::Modern);
    assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    assert_eq!(rig.request(VIRTIO_BLK_T_GET_ID, 0, &[(DATA_AT, 20, W)]), (OK, 21));
    let mut id = [0u8; 20];
    rig.mem.read_slice(&mut id, GuestAddress(DATA_AT)).unwrap();
    assert_eq!(&id, b"nvm-checkpoint-disk-", "the serial is cut to 20 bytes");
    for kind in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES, 99, u32::MAX] {
        let (status, len) = rig.request(kind, 0, &[(DATA_AT, 512, R)]);
        assert_eq!((status, len), (VIRTIO_BLK_S_UNSUPP as u8, 1), "type {kind}");
    }
    assert!(!rig.dev.needs_reset());
}

#[test]
fn handshake_registers_config_space_and_reset() {
    let mut rig = Rig::unready(MmioVersion::Modern);
    let dev = &mut rig.dev;
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_VENDOR_ID), mmio::VENDOR_ID);
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_CONFIG_GENERATION), 0);
    // Capacity as virtio-drivers reads it: two 32-bit halves.
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_CONFIG), DISK_SECTORS as u32);
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_CONFIG + 4), 0);
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_CONFIG + 12), block::SEG_MAX);
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_CONFIG + 20), 512);
    let mut byte = [0u8; 1];
    dev.read(u64::from(reg::VIRTIO_MMIO_CONFIG), &mut byte);
    assert_eq!(byte[0], DISK_SECTORS as u8, "the config space reads at any width");
    assert_eq!(rd(dev, 0x1fc), 0, "past the structure reads as zero");

    // A driver accepting a feature never offered (EVENT_IDX) is refused FEATURES_OK.
    wr(dev, reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    wr(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1 << 29 | 1 << VIRTIO_BLK_F_FLUSH);
    wr(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1);
    wr(dev, reg::VIRTIO_MMIO_STATUS, 0xb);
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK, 0);
    // A modern driver not accepting VERSION_1 is refused too.
    assert!(!negotiate(dev, MmioVersion::Modern, 1 << VIRTIO_BLK_F_FLUSH));
    // What virtio-drivers asks, cut to what is offered, is accepted.
    assert!(negotiate(dev, MmioVersion::Modern, DRIVER_SUPPORTED));
    let offered = dev.device_features();
    assert_eq!(dev.driver_features(), offered);
    assert_eq!(offered, 1 << 32 | 1 << 9 | 1 << 6 | 1 << 2);
    // Features cannot change after FEATURES_OK.
    wr(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(dev, reg::VIRTIO_MMIO_DRIVER_FEATURES, 0);
    assert_eq!(dev.driver_features(), offered);
    let l = rig.layout;
    setup_queue(&mut rig.dev, MmioVersion::Modern, l);
    let dev = &mut rig.dev;
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_QUEUE_READY), 1);
    wr(dev, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "only queue 0 exists");
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    // Reset forgets everything.
    wr(dev, reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_STATUS), 0);
    assert_eq!(dev.driver_features(), 0);
    wr(dev, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_QUEUE_READY), 0);
    // Misaligned or odd-sized register accesses are ignored.
    let mut two = [0xffu8; 2];
    dev.read(0, &mut two);
    assert_eq!(two, [0, 0]);
    dev.write(u64::from(reg::VIRTIO_MMIO_STATUS) + 1, &[1, 0, 0, 0]);
    assert_eq!(rd(dev, reg::VIRTIO_MMIO_STATUS), 0);
}

#[test]
fn badly_shaped_requests_get_ioerr() {
    let mut rig = Rig::new(MmioVersion::Modern);
    let data = |flags| [(DATA_AT, 512, flags)];
    // Too short: a status alone, and a header too small.
    assert_eq!(rig.submit(&[(STATUS_AT, 1, W)]), Some((IOERR, 1)));
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(rig.submit(&[(HEADER_AT, 8, R), (DATA_AT, 512, W), (STATUS_AT, 1, W)]), Some((IOERR, 1)));
    // Wrong directions: a writable header, a readable buffer to read into, a writable one to write from.
    assert_eq!(rig.submit(&[(HEADER_AT, 16, W), (DATA_AT, 512, W), (STATUS_AT, 1, W)]), Some((IOERR, 1)));
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, &data(R)), (IOERR, 1));
    assert_eq!(rig.request(VIRTIO_BLK_T_OUT, 0, &data(W)), (IOERR, 1));
    assert_eq!(rig.request(VIRTIO_BLK_T_GET_ID, 0, &data(R)), (IOERR, 1));
    // A status descriptor of two bytes: the error lands in its last byte.
    rig.header(VIRTIO_BLK_T_IN, 0);
    rig.mem.write_slice(&[0xaa, 0xaa], GuestAddress(STATUS_AT - 1)).unwrap();
    let used = rig.submit(&[(HEADER_AT, 16, R), (DATA_AT, 512, W), (STATUS_AT - 1, 2, W)]);
    assert_eq!(used, Some((IOERR, 1)));
    // Outside the disk, overflowing, not whole sectors, outside guest RAM.
    let cases: [(u64, u64, u32); 5] = [
        (DISK_SECTORS, DATA_AT, 512),
        (DISK_SECTORS - 1, DATA_AT, 1024),
        (u64::MAX / 512 + 1, DATA_AT, 512),
        (0, DATA_AT, 100),
        (0, MEM_SIZE as u64 - 256, 512),
    ];
    for (sector, addr, len) in cases {
        for kind in [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT] {
            let flags = if kind == VIRTIO_BLK_T_IN { W } else { R };
            assert_eq!(rig.request(kind, sector, &[(addr, len, flags)]), (IOERR, 1), "{kind} {sector} {addr:#x}+{len}");
        }
    }
    // More segments than seg_max.
    let many = vec![(DATA_AT, 512, W); block::SEG_MAX as usize + 1];
    // The chain needs more descriptors than a 16-entry queue holds: use a bigger one.
    let mut big = Rig::unready(MmioVersion::Modern);
    big.layout.size = 256;
    let l = big.layout;
    assert!(negotiate(&mut big.dev, MmioVersion::Modern, DRIVER_SUPPORTED));
    setup_queue(&mut big.dev, MmioVersion::Modern, Layout { avail: l.desc + 4096, used: l.desc + 8192, ..l });
    big.layout = Layout { avail: l.desc + 4096, used: l.desc + 8192, ..l };
    assert_eq!(big.request(VIRTIO_BLK_T_IN, 0, &many), (IOERR, 1));
    assert!(!rig.dev.needs_reset() && !big.dev.needs_reset(), "each of these is answered, not fatal");
    // The device still works.
    assert_eq!(rig.request(VIRTIO_BLK_T_IN, 0, &data(W)), (OK, 513));
    assert!(rig.dev.backend().errors() >= 15);
}

fn broken_by(descs: &[Descriptor], why: Broken) -> Rig {
    let mut rig = Rig::new(MmioVersion::Modern);
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert!(rig.submit_raw(descs, 0).is_none(), "no used entry for a chain that cannot be answered");
    rig.assert_broken();
    assert_eq!(rig.dev.broken(), Some(why));
    rig
}

#[test]
fn chains_that_cannot_be_answered_break_the_device() {
    let next = VRING_DESC_F_NEXT as u16;
    let hdr = |n| Descriptor::new(HEADER_AT, 16, next, n);
    // A loop, and a chain longer than the queue (every descriptor points at the next, the
    // last back to the first: 17 hops in a 16-entry table).
    broken_by(&[hdr(1), Descriptor::new(DATA_AT, 512, W | next, 0)], Broken::ChainTooLong);
    let long: Vec<_> = (0..QSIZE).map(|i| Descriptor::new(DATA_AT, 512, W | next, (i + 1) % QSIZE)).collect();
    broken_by(&long, Broken::ChainTooLong);
    // A next index beyond the queue, an indirect descriptor (never offered).
    broken_by(&[hdr(QSIZE)], Broken::DescriptorIndex);
    broken_by(&[Descriptor::new(DATA_AT, 64, VRING_DESC_F_INDIRECT as u16, 0)], Broken::Indirect);
    // No status byte: a readable last descriptor, an empty one, one outside guest RAM.
    broken_by(&[hdr(1), Descriptor::new(STATUS_AT, 1, R, 0)], Broken::NoStatus);
    broken_by(&[hdr(1), Descriptor::new(STATUS_AT, 0, W, 0)], Broken::NoStatus);
    broken_by(&[hdr(1), Descriptor::new(MEM_SIZE as u64, 1, W, 0)], Broken::NoStatus);
    broken_by(&[hdr(1), Descriptor::new(u64::MAX, 2, W, 0)], Broken::NoStatus);

    // Broken, the device answers nothing more, but says so and comes back after a reset.
    let mut rig = broken_by(&[hdr(0)], Broken::ChainTooLong);
    assert_eq!(rd(&mut rig.dev, reg::VIRTIO_MMIO_INTERRUPT_STATUS) & reg::VIRTIO_MMIO_INT_CONFIG, 2);
    let status = rig.dev.status();
    wr(&mut rig.dev, reg::VIRTIO_MMIO_STATUS, status & !VIRTIO_CONFIG_S_NEEDS_RESET);
    rig.assert_broken();
    assert!(rig.submit(&[(HEADER_AT, 16, R), (STATUS_AT, 1, W)]).is_none());
    let version = rig.version;
    assert!(negotiate(&mut rig.dev, version, DRIVER_SUPPORTED));
    let fresh = layout(version);
    rig.mem.write_slice(&[0u8; 0x3000], GuestAddress(QUEUE_AT)).unwrap(); // a driver re-creates its rings
    setup_queue(&mut rig.dev, version, fresh);
    assert!(!rig.dev.needs_reset());
    assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
}

#[test]
fn an_available_index_beyond_the_queue_breaks_the_device() {
    let mut rig = Rig::new(MmioVersion::Modern);
    rig.mem.write_obj(QSIZE + 1, GuestAddress(rig.layout.avail + 2)).unwrap();
    wr(&mut rig.dev, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    rig.assert_broken();
    assert_eq!(rig.dev.broken(), Some(Broken::AvailRing));
}

#[test]
fn bad_queue_setups_break_the_device() {
    let outside = MEM_SIZE as u64 - 64;
    type Spoil = fn(Layout) -> Layout;
    let bad_layouts: [(&str, Spoil); 6] = [
        ("size not a power of two", |l: Layout| Layout { size: 15, ..l }),
        ("size above the maximum", |l: Layout| Layout { size: 512, ..l }),
        ("size zero", |l: Layout| Layout { size: 0, ..l }),
        ("descriptors outside RAM", |l: Layout| Layout { desc: MEM_SIZE as u64 - 64, ..l }),
        ("used ring outside RAM", |l: Layout| Layout { used: 1 << 40, ..l }),
        ("misaligned descriptors", |l: Layout| Layout { desc: l.desc + 8, ..l }),
    ];
    for (what, bad) in bad_layouts {
        let mut rig = Rig::unready(MmioVersion::Modern);
        assert!(negotiate(&mut rig.dev, MmioVersion::Modern, DRIVER_SUPPORTED));
        setup_queue(&mut rig.dev, MmioVersion::Modern, bad(rig.layout));
        assert!(rig.dev.needs_reset(), "{what}");
        assert_eq!(rig.dev.broken(), Some(Broken::QueueSetup), "{what}");
        assert_eq!(rd(&mut rig.dev, reg::VIRTIO_MMIO_QUEUE_READY), 0, "{what}");
        wr(&mut rig.dev, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(rig.dev.backend().requests(), 0, "{what}");
    }
    // Legacy: a page frame beyond RAM.
    let mut rig = Rig::unready(MmioVersion::Legacy);
    assert!(negotiate(&mut rig.dev, MmioVersion::Legacy, DRIVER_SUPPORTED));
    setup_queue(&mut rig.dev, MmioVersion::Legacy, Layout { desc: outside & !0xfff, ..rig.layout });
    assert!(rig.dev.needs_reset());
}

#[test]
fn a_notify_before_the_queue_is_ready_breaks_the_device() {
    let mut rig = Rig::unready(MmioVersion::Modern);
    assert!(negotiate(&mut rig.dev, MmioVersion::Modern, DRIVER_SUPPORTED));
    wr(&mut rig.dev, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    rig.assert_broken();
    assert_eq!(rig.dev.broken(), Some(Broken::NotReady));
    assert_eq!(rig.irqs.load(Ordering::SeqCst), 0, "no interrupt before DRIVER_OK");
    // Nor may a modern driver go live with its features refused.
    let mut rig = Rig::unready(MmioVersion::Modern);
    assert!(!negotiate(&mut rig.dev, MmioVersion::Modern, 1 << VIRTIO_BLK_F_FLUSH));
    let l = rig.layout;
    setup_queue(&mut rig.dev, MmioVersion::Modern, l);
    wr(&mut rig.dev, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    rig.assert_broken();
    // A notify of a queue that does not exist is only counted.
    let mut rig = Rig::new(MmioVersion::Modern);
    wr(&mut rig.dev, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 3);
    assert!(!rig.dev.needs_reset());
}

#[test]
fn a_guest_repeating_bad_requests_is_counted_not_grown() {
    let mut rig = Rig::new(MmioVersion::Modern);
    let heap = rig.dev.backend().heap_bytes();
    for _ in 0..1000 {
        assert_eq!(rig.request(VIRTIO_BLK_T_IN, DISK_SECTORS, &[(DATA_AT, 512, W)]), (IOERR, 1));
    }
    for _ in 0..1000 {
        wr(&mut rig.dev, 0x0c4, 1); // no such register
    }
    assert_eq!(rig.dev.backend().errors(), 1000);
    assert_eq!(rig.dev.transport_errors(), 1000);
    assert_eq!(rig.dev.backend().heap_bytes(), heap);
    // A second's budget of eight lines each, for the request side and the registers: the
    // loops may straddle one window's end, not more. (Counted by the limiter itself, not
    // by a `tracing` subscriber, whose cached callsite interest makes such a count racy
    // while other tests log on other threads.)
    for (what, logged) in
        [("requests", rig.dev.backend().errors_logged()), ("registers", rig.dev.transport_errors_logged())]
    {
        assert!((8..=16).contains(&logged), "{logged} log lines for 1000 {what} errors");
    }
}

/// `queue_unset` as virtio-drivers does it when a `VirtIOBlk` is dropped.
fn unset_queue(dev: &mut MmioBlock, version: MmioVersion) {
    wr(dev, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    match version {
        MmioVersion::Legacy => {
            for r in [reg::VIRTIO_MMIO_QUEUE_NUM, reg::VIRTIO_MMIO_QUEUE_ALIGN, reg::VIRTIO_MMIO_QUEUE_PFN] {
                wr(dev, r, 0);
            }
        }
        MmioVersion::Modern => {
            wr(dev, reg::VIRTIO_MMIO_QUEUE_READY, 0);
            assert_eq!(rd(dev, reg::VIRTIO_MMIO_QUEUE_READY), 0);
            for r in [reg::VIRTIO_MMIO_QUEUE_NUM, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH] {
                wr(dev, r, 0);
            }
            for r in [reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH] {
                wr(dev, r, 0);
            }
            for r in [reg::VIRTIO_MMIO_QUEUE_USED_LOW, reg::VIRTIO_MMIO_QUEUE_USED_HIGH] {
                wr(dev, r, 0);
            }
        }
    }
}

#[test]
fn a_queue_unset_and_set_again_serves_requests() {
    for version in [MmioVersion::Modern, MmioVersion::Legacy] {
        let mut rig = Rig::new(version);
        assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
        let errors_before = rig.dev.transport_errors();
        unset_queue(&mut rig.dev, version);
        // A new driver instance probes again from reset, on fresh rings.
        rig.mem.write_slice(&[0u8; 0x3000], GuestAddress(QUEUE_AT)).unwrap();
        assert!(negotiate(&mut rig.dev, version, DRIVER_SUPPORTED));
        let l = rig.layout;
        setup_queue(&mut rig.dev, version, l);
        assert!(!rig.dev.needs_reset(), "{version:?}");
        assert_eq!(rig.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1), "{version:?}");
        assert_eq!(rig.dev.transport_errors(), errors_before, "{version:?}: the unset sequence is no error");
    }
}
