//! The copy engine's host time for a write-out's batch, with and without the content
//! checksums, on the vCPU's thread alone and on two threads, so that what the sums cost
//! is measured beside the copy it rides on, in the same run.
//!
//! The batch is shaped like the paper's configuration's write-out: about 3 MB in runs of
//! one to seven pages, from pages scattered over the plates into their save areas. Before
//! each batch the sources are written again (not timed), as the workload dirties them;
//! the sums' overwritten halves come from the hashes the engine kept of its last copy.
//!
//! `cargo bench -p devices --bench engine`

use std::sync::{Arc, Mutex};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use devices::{BusDevice, CopyEngine, PersistenceDomain};
use nvram::engine::{BatchHeader, Descriptor, RangeSum};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::IntoBytes;

const RAM: u64 = 64 << 20;
const PAGE: u64 = 4096;
const HEADER: u64 = 0x1000;
const DESCRIPTORS: u64 = 0x2000;
const SUMS: u64 = 0x4000;
/// Where the plates' pages are, and where their save areas.
const PLATES: u64 = 1 << 20;
const AREAS: u64 = 32 << 20;

/// About 3 MB in runs of 1 to 7 pages, three pages apart in the plates.
fn batch() -> Vec<Descriptor> {
    let (mut src, mut dst, mut bytes) = (PLATES, AREAS, 0);
    let mut descriptors = Vec::new();
    for i in 0..256u64 {
        let len = (1 + (i * 5) % 7) * PAGE;
        descriptors.push(Descriptor { src, dst, len });
        src += len + 3 * PAGE;
        dst += len;
        bytes += len;
        if bytes >= 3 << 20 {
            break;
        }
    }
    descriptors
}

fn machine(engine: impl FnOnce(CopyEngine) -> CopyEngine) -> (GuestMemoryMmap<()>, CopyEngine) {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("guest memory");
    let domain = Arc::new(Mutex::new(PersistenceDomain::eadr(mem.clone(), false)));
    let engine = engine(CopyEngine::new(mem.clone(), domain));
    // Every page mapped once, as a running machine's are.
    mem.write_slice(&vec![1u8; RAM as usize], GuestAddress(0)).expect("prefault");
    (mem, engine)
}

/// Rings the batch (sums asked for, overwritten ones too, if `summed`).
fn ring(mem: &GuestMemoryMmap<()>, engine: &mut CopyEngine, descriptors: &[Descriptor], summed: bool) {
    let header = BatchHeader::durable(descriptors.len() as u32, DESCRIPTORS, if summed { SUMS } else { 0 });
    mem.write_slice(header.as_bytes(), GuestAddress(HEADER)).expect("header");
    if summed {
        let sums: Vec<RangeSum> = (0..descriptors.len() as u64).map(|i| RangeSum::new(i * 8, true)).collect();
        mem.write_slice(sums.as_bytes(), GuestAddress(SUMS)).expect("sums");
    }
    engine.write(0, &(HEADER as u32).to_le_bytes());
}

/// The workload's stores into the pages the batch copies.
fn dirty(mem: &GuestMemoryMmap<()>, descriptors: &[Descriptor], round: u8) {
    for d in descriptors {
        mem.write_slice(&vec![round; d.len as usize], GuestAddress(d.src)).expect("dirty");
    }
}

fn bench(c: &mut Criterion) {
    let descriptors = batch();
    let bytes: u64 = descriptors.iter().map(|d| d.len).sum();
    let mut group = c.benchmark_group("engine: a write-out's batch");
    group.throughput(Throughput::Bytes(bytes));
    type Build = fn(CopyEngine) -> CopyEngine;
    let variants: [(&str, bool, Build); 4] = [
        ("copy, one thread", false, CopyEngine::single_threaded),
        ("copy and sums, one thread", true, CopyEngine::single_threaded),
        ("copy, two threads", false, |e| e),
        ("copy and sums, two threads", true, |e| e),
    ];
    for (name, summed, build) in variants {
        let (mem, mut engine) = machine(build);
        mem.write_slice(descriptors.as_bytes(), GuestAddress(DESCRIPTORS)).expect("descriptors");
        // A first batch, so that the hashes of what it wrote are kept.
        ring(&mem, &mut engine, &descriptors, summed);
        let mut round = 0u8;
        group.bench_function(name, |b| {
            b.iter_batched(
                || {
                    round = round.wrapping_add(1);
                    dirty(&mem, &descriptors, round);
                },
                |()| ring(&mem, &mut engine, &descriptors, summed),
                BatchSize::PerIteration,
            )
        });
        let stats = *engine.stats().lock().expect("stats");
        if stats.chunks > 0 {
            eprintln!("{name}: the second thread did {} of {} chunks", stats.second_thread_chunks, stats.chunks);
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(std::time::Duration::from_secs(5));
    targets = bench
}
criterion_main!(benches);
