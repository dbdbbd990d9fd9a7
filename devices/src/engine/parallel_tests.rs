//! The two-thread path of the copy engine against the one-thread path: random batches of
//! copies apart, with random sum requests, leave the same RAM and return the same sums, and
//! the hashes each keeps give the same sums to the next batch.

use proptest::prelude::*;

use super::*;

const RAM: u64 = 8 << 20;
/// RAM is cut into slots; each range of a batch has a slot of its own, so they are apart.
const SLOT: u64 = 64 << 10;

fn machine(single: bool) -> CopyEngine {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let domain = Arc::new(Mutex::new(PersistenceDomain::eadr(mem.clone(), false)));
    let engine = CopyEngine::new(mem, domain);
    if single {
        engine.single_threaded()
    } else {
        engine
    }
}

/// Rings `descriptors` with `requests` (none: no sums) at fixed places in slot 0; returns the
/// status and the sums.
fn ring(e: &mut CopyEngine, descriptors: &[Descriptor], requests: Option<&[RangeSum]>) -> (u32, Vec<RangeSum>) {
    let head = BatchHeader::durable(descriptors.len() as u32, 0x1000, if requests.is_some() { 0x4000 } else { 0 });
    e.mem.write_slice(head.as_bytes(), GuestAddress(0)).unwrap();
    e.mem.write_slice(descriptors.as_bytes(), GuestAddress(0x1000)).unwrap();
    let requests = requests.unwrap_or_default();
    e.mem.write_slice(requests.as_bytes(), GuestAddress(0x4000)).unwrap();
    e.write(0, &0u32.to_le_bytes());
    let mut done = BatchHeader::default();
    e.mem.read_slice(done.as_mut_bytes(), GuestAddress(0)).unwrap();
    let mut sums = vec![RangeSum::default(); requests.len()];
    e.mem.read_slice(sums.as_mut_bytes(), GuestAddress(0x4000)).unwrap();
    (done.status, sums)
}

fn ram(e: &CopyEngine) -> Vec<u8> {
    let mut bytes = vec![0u8; RAM as usize];
    e.mem.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    bytes
}

/// A batch: per copy, its source and destination slots (distinct, never slot 0, which holds
/// the batch), offsets in them and a length that fits both.
fn batch() -> impl Strategy<Value = Vec<Descriptor>> {
    let slots = (RAM / SLOT) as usize;
    (1usize..48).prop_flat_map(move |n| {
        (
            Just((1..slots).collect::<Vec<usize>>()).prop_shuffle(),
            proptest::collection::vec((0u64..SLOT / 2, 0u64..SLOT / 2, 1u64..SLOT / 2), n),
        )
            .prop_map(|(slots, copies)| {
                copies
                    .iter()
                    .enumerate()
                    .map(|(i, &(from, to, len))| Descriptor {
                        src: slots[2 * i] as u64 * SLOT + from,
                        dst: slots[2 * i + 1] as u64 * SLOT + to,
                        len,
                    })
                    .collect()
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn two_threads_do_what_one_does(
        descriptors in batch(),
        firsts in proptest::collection::vec(any::<u64>(), 48),
        overwritten in any::<bool>(),
        summed in any::<bool>(),
        seed in any::<u64>(),
    ) {
        prop_assert!(parallel::copies_apart(&descriptors));
        let requests: Vec<RangeSum> =
            descriptors.iter().zip(&firsts).map(|(_, &first)| RangeSum::new(first, overwritten)).collect();
        let requests = summed.then_some(&requests[..]);
        let mut engines = [machine(true), machine(false)];
        for e in &mut engines {
            // The same random RAM in both.
            let mut x = seed | 1;
            let fill: Vec<u8> = (0..RAM).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 }).collect();
            e.mem.write_slice(&fill, GuestAddress(0)).unwrap();
        }
        let [one, two] = &mut engines;
        let (a, b) = (ring(one, &descriptors, requests), ring(two, &descriptors, requests));
        prop_assert_eq!(a.0, STATUS_DONE);
        prop_assert_eq!(&a, &b);
        prop_assert!(ram(one) == ram(two), "the same RAM");
        let bytes: u64 = descriptors.iter().map(|d| d.len).sum();
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let expected = u64::from(bytes >= parallel::WORTH_FROM && cpus > 1);
        prop_assert_eq!(lock(&two.stats).parallel, expected, "two threads when worth it");
        // Again over the same destinations: the overwritten sums come from what each kept.
        let again = (ring(one, &descriptors, requests), ring(two, &descriptors, requests));
        prop_assert_eq!(&again.0, &again.1);
    }
}
