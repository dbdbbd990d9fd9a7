//! The corpus's binary seeds, built from the ABI's own records so that they stay valid as
//! the formats change: `cargo test -p fuzz -- --ignored write_seeds` writes them into
//! `corpus/` (the text seeds there are written by hand).

use nvram::control::{Cause, Heartbeat, Started, Verified};
use nvram::engine::{
    BatchHeader, Descriptor, DirtyRequest, RangeSum, BATCH_MAGIC, DIRTY_MAGIC, FLAG_DURABLE, FLAG_SUM_ONLY,
};
use nvram::header::RootHeader;
use nvram::persist::{BarrierHeader, FlushedRange, BARRIER_MAGIC};
use zerocopy::IntoBytes;

/// An access of the device targets (`devices_targets::accesses`): a write of `value` (an
/// address inside RAM) to register `offset`, 4 bytes wide.
fn write_op(offset: u8, value: u32) -> [u8; 6] {
    let v = value.to_le_bytes();
    [offset, 0, v[0], v[1], v[2], v[3]]
}

/// The same, for a value that is not an address (kept as is).
fn write_raw(offset: u8, value: u32) -> [u8; 6] {
    let v = value.to_le_bytes();
    [offset, 0x40, v[0], v[1], v[2], v[3]]
}

/// A device target's input: the accesses, padded to their share, then RAM from address 0.
fn device_input(ops: &[[u8; 6]], records: &[(usize, &[u8])]) -> Vec<u8> {
    let mut input: Vec<u8> = ops.concat();
    // Padding accesses: reads of register 0.
    while input.len() < 96 {
        input.extend_from_slice(&[0, 0x20, 0, 0, 0, 0]);
    }
    let end = records.iter().map(|(at, bytes)| at + bytes.len()).max().unwrap_or(0);
    let mut ram = vec![0u8; end];
    for (at, bytes) in records {
        ram[*at..*at + bytes.len()].copy_from_slice(bytes);
    }
    input.extend_from_slice(&ram);
    input
}

/// Every binary seed: `(target, name, bytes)`.
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let started = Started::new(7, Cause::Periodic);
    let heartbeat = Heartbeat::new("kv", 3, 1000, 0xfeed, Verified::Passed);
    let heartbeat_bytes = heartbeat.as_bytes();
    let batch = BatchHeader {
        magic: BATCH_MAGIC,
        count: 2,
        status: 0,
        failed: 0,
        flags: FLAG_DURABLE,
        descriptors: 0x2000,
        sums: 0x3000,
    };
    let sums = [RangeSum::new(0, true), RangeSum::new(3, false)];
    // Sums alone: the same descriptors, nothing copied.
    let sum_only = BatchHeader { flags: FLAG_SUM_ONLY, ..batch };
    let sum_only_requests = [RangeSum::new(0, false), RangeSum::new(3, false)];
    let descriptors =
        [Descriptor { dst: 0x8000, src: 0x4000, len: 0x1000 }, Descriptor { dst: 0x9000, src: 0x100, len: 64 }];
    let dirty = DirtyRequest { magic: DIRTY_MAGIC, status: 0, first_page: 0, pages: 64, out: 0x5000 };
    let barrier = BarrierHeader { magic: BARRIER_MAGIC, count: 2, status: 0, failed: 0 };
    let ranges = [FlushedRange { addr: 0x8000, len: 0x1000 }, FlushedRange { addr: 0x20, len: 8 }];
    let mut barrier_bytes = barrier.as_bytes().to_vec();
    barrier_bytes.extend_from_slice(ranges.as_bytes());
    let mut header = RootHeader::new(0x1234);
    header.seal();
    let mut image = 256u16.to_le_bytes().to_vec(); // a file of 256 MiB
    image.extend_from_slice(&header.to_bytes());
    let mut disk = 256u16.to_le_bytes().to_vec(); // a disk of 16 MiB
    let superblock = nvram::disk::Superblock::new(16 << 20).expect("16 MiB holds a plate store");
    disk.extend_from_slice(superblock.as_bytes());
    disk.resize(2 + nvram::disk::SECTOR as usize, 0);
    let control_base = nvram::control::REG_DOORBELL as u8;
    vec![
        (
            "machine_control",
            "started",
            device_input(&[write_op(control_base, 0x1000)], &[(0x1000, started.as_bytes())]),
        ),
        ("machine_control", "heartbeat", device_input(&[write_op(control_base, 0x1000)], &[(0x1000, heartbeat_bytes)])),
        (
            "copy_engine",
            "batch",
            device_input(
                &[write_op(0, 0x1000)],
                &[(0x1000, batch.as_bytes()), (0x2000, descriptors.as_bytes()), (0x3000, sums.as_bytes())],
            ),
        ),
        (
            "copy_engine",
            "sum-only",
            device_input(
                &[write_op(0, 0x1000)],
                &[
                    (0x1000, sum_only.as_bytes()),
                    (0x2000, descriptors.as_bytes()),
                    (0x3000, sum_only_requests.as_bytes()),
                ],
            ),
        ),
        (
            "copy_engine",
            "dirty",
            device_input(&[write_op(nvram::engine::REG_DIRTY as u8, 0x3000)], &[(0x3000, dirty.as_bytes())]),
        ),
        ("persist_barrier", "list", device_input(&[write_op(0, 0x1000)], &[(0x1000, &barrier_bytes)])),
        ("virtio_blk", "handshake", device_input(&virtio_handshake(), &[])),
        ("image", "sealed-header", image),
        ("disk", "superblock", disk),
        // The bundled programs: real files of the linker script users build with.
        ("program", "counter", vmm::apps::embedded("counter").expect("bundled").elf.to_vec()),
        ("program", "kv", vmm::apps::embedded("kv").expect("bundled").elf.to_vec()),
    ]
}

/// A modern driver's probe and queue setup, then a notify (register offsets / 4).
fn virtio_handshake() -> Vec<[u8; 6]> {
    vec![
        write_raw(0x70 / 4, 1),     // status: acknowledge
        write_raw(0x70 / 4, 3),     // driver
        write_raw(0x24 / 4, 1),     // driver features select: high word
        write_raw(0x20 / 4, 1),     // VIRTIO_F_VERSION_1
        write_raw(0x70 / 4, 11),    // features ok
        write_raw(0x30 / 4, 0),     // queue select
        write_raw(0x38 / 4, 16),    // queue size
        write_op(0x80 / 4, 0x1000), // descriptor table
        write_op(0x90 / 4, 0x2000), // available ring
        write_op(0xa0 / 4, 0x3000), // used ring
        write_raw(0x44 / 4, 1),     // queue ready
        write_raw(0x70 / 4, 15),    // driver ok
        write_raw(0x50 / 4, 0),     // notify
    ]
}

#[test]
#[ignore = "writes the corpus; run by hand when a format changes"]
fn write_seeds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, name, bytes) in seeds() {
        std::fs::write(root.join(target).join(format!("seed-{name}")), bytes).expect("write a seed");
    }
}
