//! Randomized hostile guests: random queue placements and sizes, random descriptors
//! (addresses, lengths, flags, next indexes), random headers and available rings, then
//! notifies. The device must never panic, must write only into the used ring and into
//! device-writable buffers the guest offered, must never publish a used entry for a head
//! outside the queue, must announce every store to its write hook (the VMM's dirty
//! tracking depends on it), and must not grow its memory.

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use super::tests::{negotiate, setup_queue, wr, Counter, Layout};
use super::*;

/// Small guest RAM: the rings live in the first 16 KiB, data buffers above.
const RAM: u64 = 0x10_0000;
const DATA_BASE: u64 = 0x4000;

/// A ring area: inside its window, or at one of the hostile places.
fn area(window: u64, span: u64, align: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        60 => (0..span / align).prop_map(move |i| window + i * align),
        1 => Just(RAM - 8),
        1 => Just(1 << 40),
        1 => Just(u64::MAX - 15),
        1 => Just(window + 1),
    ]
}

fn queue_size() -> impl Strategy<Value = u16> {
    prop_oneof![2 => (0..=3u32).prop_map(|e| 1u16 << e), 8 => (4..=8u32).prop_map(|e| 1u16 << e), 1 => any::<u16>()]
}

#[derive(Debug, Clone)]
struct RandomDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
    header: (u32, u64),
}

fn descriptor() -> impl Strategy<Value = RandomDesc> {
    let addr = prop_oneof![
        8 => DATA_BASE..RAM + 0x1000,
        1 => any::<u64>().prop_map(|a| a.max(DATA_BASE)),
    ];
    let len = prop_oneof![Just(0u32), Just(1), Just(16), Just(512), Just(1024), 0..8192u32, Just(u32::MAX),];
    let flags = prop_oneof![8 => 0..8u16, 1 => any::<u16>()];
    let next = prop_oneof![8 => 0..16u16, 1 => any::<u16>()];
    let kind = prop_oneof![Just(0u32), Just(1), Just(4), Just(8), any::<u32>()];
    let sector = prop_oneof![0..80u64, any::<u64>()];
    (addr, len, flags, next, (kind, sector)).prop_map(|(addr, len, flags, next, header)| RandomDesc {
        addr,
        len,
        flags,
        next,
        header,
    })
}

#[derive(Debug, Clone)]
struct Guest {
    legacy: bool,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    descs: Vec<RandomDesc>,
    heads: Vec<u16>,
    /// Available-index bumps, one notify each.
    bumps: Vec<u16>,
}

fn guest() -> impl Strategy<Value = Guest> {
    (
        (any::<bool>(), any::<bool>()),
        queue_size(),
        area(0, 0x1000, 16),
        area(0x2000, 0x800, 2),
        area(0x3000, 0x700, 4),
        prop::collection::vec(descriptor(), 1..24),
        prop::collection::vec(prop_oneof![8 => 0..16u16, 1 => any::<u16>()], 0..24),
        prop::collection::vec(prop_oneof![16 => 0..4u16, 1 => any::<u16>()], 1..4),
    )
        .prop_map(|((legacy, shaped), size, desc, avail, used, mut descs, heads, bumps)| {
            let mut heads = heads;
            if shaped {
                shape(&mut descs);
                // Mostly heads of whole triples that were written.
                let triples = (descs.len() as u16).div_ceil(3);
                heads.iter_mut().filter(|h| **h < 16).for_each(|h| *h = *h % triples * 3);
            }
            Guest { legacy, size, desc, avail, used, descs, heads, bumps }
        })
}

/// Descriptor `3k` becomes a 16-byte header, `3k + 1` a sector of data (its direction kept
/// random), `3k + 2` a one-byte status, linked in that order.
fn shape(descs: &mut [RandomDesc]) {
    let next = VRING_DESC_F_NEXT as u16;
    let write = VRING_DESC_F_WRITE as u16;
    for (i, d) in descs.iter_mut().enumerate() {
        let (len, flags) = match i % 3 {
            0 => (16, next),
            1 => (512 * (d.len % 3), next | (d.flags & write)),
            _ => (1, write),
        };
        d.len = len;
        d.flags = flags;
        d.next = i as u16 + 1;
    }
}

/// The bytes the device may change: the used ring (flags, idx, entries) and every
/// device-writable buffer in the descriptor table.
fn allowed(g: &Layout, descs: &[RandomDesc]) -> Vec<(u64, u64)> {
    let mut ranges = vec![(g.used, g.used.saturating_add(4 + 8 * u64::from(g.size)))];
    for d in descs {
        if d.flags & VRING_DESC_F_WRITE as u16 != 0 {
            ranges.push((d.addr, d.addr.saturating_add(u64::from(d.len))));
        }
    }
    ranges
}

fn run(g: Guest) {
    let version = if g.legacy { MmioVersion::Legacy } else { MmioVersion::Modern };
    let layout = if g.legacy {
        let n = u64::from(g.size);
        let avail = 0x1000 + 16 * n;
        Layout { desc: 0x1000, avail, used: (avail + 6 + 2 * n).next_multiple_of(4096), size: g.size }
    } else {
        Layout { desc: g.desc, avail: g.avail, used: g.used, size: g.size }
    };
    let dir = TempDir::new().unwrap();
    let disk = Disk::open(dir.as_path().join("disk.img"), 64 * 512).unwrap();
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let irqs = Arc::new(AtomicU32::new(0));
    let marked = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let log = marked.clone();
    let hook = Box::new(move |addr: u64, len: u64| log.lock().unwrap().push((addr, addr.saturating_add(len))));
    let backend = BlockBackend::new(disk, "fuzz").with_write_hook(hook);
    let mut dev = MmioBlock::new(version, mem.clone(), backend, Box::new(Counter(irqs)));

    // The guest's side, written wherever it lands in RAM (writes outside RAM just fail).
    for (i, d) in g.descs.iter().enumerate() {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&d.header.0.to_le_bytes());
        header[8..16].copy_from_slice(&d.header.1.to_le_bytes());
        let _ = mem.write_slice(&header, GuestAddress(d.addr));
        let raw = RawDescriptor::from(Descriptor::new(d.addr, d.len, d.flags, d.next));
        let _ = mem.write_obj(raw, GuestAddress(layout.desc.wrapping_add(16 * i as u64)));
    }
    for (i, head) in g.heads.iter().enumerate() {
        let _ = mem.write_obj(*head, GuestAddress(layout.avail.wrapping_add(4 + 2 * i as u64)));
    }
    negotiate(&mut dev, version, u64::MAX);
    setup_queue(&mut dev, version, layout);
    let heap = dev.backend().heap_bytes();
    let may_change = allowed(&layout, &g.descs);

    let mut avail_idx = 0u16;
    let mut published = 0u64;
    for bump in &g.bumps {
        avail_idx = avail_idx.wrapping_add(*bump);
        published += u64::from(*bump);
        let _ = mem.write_obj(avail_idx, GuestAddress(layout.avail.wrapping_add(2)));
        let mut before = vec![0u8; RAM as usize];
        mem.read_slice(&mut before, GuestAddress(0)).unwrap();
        wr(&mut dev, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let mut after = vec![0u8; RAM as usize];
        mem.read_slice(&mut after, GuestAddress(0)).unwrap();
        // Page by page (a memcmp each), byte by byte only in the pages that changed.
        for (page, (b, a)) in before.chunks(4096).zip(after.chunks(4096)).enumerate() {
            if b == a {
                continue;
            }
            for (i, _) in b.iter().zip(a).enumerate().filter(|(_, (x, y))| x != y) {
                let at = (page * 4096 + i) as u64;
                assert!(
                    may_change.iter().any(|&(s, e)| at >= s && at < e),
                    "the device wrote {at:#x}, not its to write"
                );
                let marked = marked.lock().unwrap();
                assert!(marked.iter().any(|&(s, e)| at >= s && at < e), "the device wrote {at:#x} unannounced");
            }
        }
        assert_eq!(dev.backend().heap_bytes(), heap, "the device's memory grew");
    }
    // Every used entry is for a head inside the queue, and no more entries than published
    // (judged only where the driver's own table and available ring, which this test wrote,
    // do not overlap the used ring).
    let n = u64::from(layout.size);
    let used = (layout.used, layout.used.saturating_add(6 + 8 * n));
    let overlaps = |start: u64, len: u64| start < used.1 && used.0 < start.saturating_add(len);
    if overlaps(layout.desc, 16 * n) || overlaps(layout.avail, 6 + 2 * n) {
        return;
    }
    if let Ok(used_idx) = mem.read_obj::<u16>(GuestAddress(layout.used.wrapping_add(2))) {
        let completed = u64::from(used_idx);
        assert!(completed <= published, "{completed} used entries for {published} published");
        assert!(completed == 0 || dev.status() & VIRTIO_CONFIG_S_DRIVER_OK_BIT != 0);
        for i in 0..completed.min(u64::from(layout.size)) {
            let id: u32 = mem.read_obj(GuestAddress(layout.used + 4 + 8 * i)).unwrap();
            assert!(id < u32::from(layout.size), "used entry {i} names head {id}");
        }
    }
}

const VIRTIO_CONFIG_S_DRIVER_OK_BIT: u32 = virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn hostile_queues_never_panic_stray_or_grow(g in guest()) {
        run(g);
    }
}
