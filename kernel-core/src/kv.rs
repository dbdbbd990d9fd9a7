//! The `kv` workload's store: a hash table of `u64` keys to `u64` values, entirely inside
//! one memory region the caller provides, driven by a seeded, deterministic stream of puts
//! and deletes.
//!
//! Everything (header, slots, generator state, counters) lives in the region: the region is
//! the process's persistent memory, and the machine may be checkpointed and restored at any
//! instruction; the program then goes on from there. The code runs in ring 3 as part of a
//! workload: no allocation, no statics, no formatting.
//!
//! | offset | size          | field                                                      |
//! |--------|---------------|------------------------------------------------------------|
//! | 0      | 8             | magic `KVSTORE1`                                           |
//! | 8      | 8             | capacity (slots)                                           |
//! | 16     | 8             | seed                                                       |
//! | 24     | 8             | generator state                                            |
//! | 32     | 8             | operations done                                            |
//! | 40     | 8             | live keys                                                  |
//! | 48     | 8             | running checksum: wrapping sum of `mix(key, value)`        |
//! | 56     | 8             | key space: keys are drawn from `1..=key_space`             |
//! | 64     | 16 × capacity | slots: `(key, value)`, key 0 = empty                       |
//!
//! Open addressing with linear probing and backward-shift deletion, so no tombstones ever
//! accumulate and every live key is reachable from its home slot without a gap.

use crate::rng::{mix, SplitMix64};

const MAGIC: u64 = u64::from_le_bytes(*b"KVSTORE1");
const HEADER: usize = 64;
const SLOT: usize = 16;

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Header {
    magic: u64,
    capacity: u64,
    seed: u64,
    rng: u64,
    ops: u64,
    live: u64,
    checksum: u64,
    key_space: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    key: u64,
    value: u64,
}

/// Why a region cannot hold (or does not hold) a store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvError {
    /// Too small for a header and a few slots, or not 8-byte aligned.
    BadRegion,
    /// No store of this layout in the region.
    NotFormatted,
}

/// What `verify` found wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyError {
    /// The live count disagrees with the slots.
    LiveCount { header: u64, slots: u64 },
    /// The running checksum disagrees with the slots.
    Checksum { header: u64, slots: u64 },
    /// A live key cannot be reached from its home slot.
    Unreachable { slot: u64 },
    /// A key appears twice.
    Duplicate { slot: u64 },
    /// A key outside the key space.
    BadKey { slot: u64 },
}

/// One operation of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put { key: u64, value: u64 },
    Delete { key: u64 },
}

/// A store in a region.
pub struct Kv<'a> {
    header: &'a mut Header,
    slots: &'a mut [Slot],
}

fn entry_sum(key: u64, value: u64) -> u64 {
    mix(key ^ mix(value))
}

impl<'a> Kv<'a> {
    fn split(region: &'a mut [u8]) -> Result<(&'a mut Header, &'a mut [Slot]), KvError> {
        if region.len() < HEADER + 4 * SLOT || !(region.as_ptr() as usize).is_multiple_of(8) {
            return Err(KvError::BadRegion);
        }
        let capacity = (region.len() - HEADER) / SLOT;
        let (head, rest) = region.split_at_mut(HEADER);
        // SAFETY: `head` is 64 bytes, 8-byte aligned (checked above), and `Header` is 64
        // bytes of integers, valid for any bit pattern; `rest` holds `capacity` slots of 16
        // bytes, 8-byte aligned (64 bytes past an aligned start), integers only. Both
        // borrows come from disjoint halves of the region.
        unsafe {
            Ok((
                &mut *(head.as_mut_ptr() as *mut Header),
                core::slice::from_raw_parts_mut(rest.as_mut_ptr() as *mut Slot, capacity),
            ))
        }
    }

    /// Formats a new, empty store in `region`.
    pub fn format(region: &'a mut [u8], seed: u64) -> Result<Self, KvError> {
        let (header, slots) = Self::split(region)?;
        for slot in slots.iter_mut() {
            *slot = Slot { key: 0, value: 0 };
        }
        let capacity = slots.len() as u64;
        *header = Header {
            magic: MAGIC,
            capacity,
            seed,
            rng: seed,
            ops: 0,
            live: 0,
            checksum: 0,
            // Twice the slots that may be live: puts overwrite and deletes hit often.
            key_space: (capacity * 7 / 10).max(1) * 2,
        };
        Ok(Self { header, slots })
    }

    /// Reopens the store in `region`.
    pub fn open(region: &'a mut [u8]) -> Result<Self, KvError> {
        let (header, slots) = Self::split(region)?;
        if header.magic != MAGIC || header.capacity != slots.len() as u64 || header.key_space == 0 {
            return Err(KvError::NotFormatted);
        }
        Ok(Self { header, slots })
    }

    pub fn capacity(&self) -> u64 {
        self.header.capacity
    }

    pub fn ops_done(&self) -> u64 {
        self.header.ops
    }

    pub fn live(&self) -> u64 {
        self.header.live
    }

    pub fn checksum(&self) -> u64 {
        self.header.checksum
    }

    /// Most live keys: deletes take over from puts above this (70 % load).
    fn max_live(&self) -> u64 {
        (self.header.capacity * 7 / 10).max(1)
    }

    /// The next operation of the stream (advances the generator).
    pub fn next_op(&mut self) -> Op {
        let mut rng = SplitMix64::new(self.header.rng);
        let key = rng.below(self.header.key_space) + 1;
        let dice = rng.below(4);
        let value = rng.next_u64();
        self.header.rng = rng.state;
        if dice == 0 || self.header.live >= self.max_live() {
            Op::Delete { key }
        } else {
            Op::Put { key, value }
        }
    }

    /// Performs the next `n` operations of the stream.
    pub fn step(&mut self, n: u64) {
        for _ in 0..n {
            match self.next_op() {
                Op::Put { key, value } => self.put(key, value),
                Op::Delete { key } => {
                    self.delete(key);
                }
            }
            self.header.ops += 1;
        }
    }

    fn home(&self, key: u64) -> usize {
        (((u128::from(mix(key))) * u128::from(self.header.capacity)) >> 64) as usize
    }

    fn find(&self, key: u64) -> Result<usize, usize> {
        let cap = self.slots.len();
        let mut i = self.home(key);
        for _ in 0..cap {
            match self.slots[i].key {
                0 => return Err(i),
                k if k == key => return Ok(i),
                _ => i = if i + 1 == cap { 0 } else { i + 1 },
            }
        }
        Err(cap)
    }

    pub fn get(&self, key: u64) -> Option<u64> {
        self.find(key).ok().map(|i| self.slots[i].value)
    }

    /// Inserts or overwrites `key`.
    pub fn put(&mut self, key: u64, value: u64) {
        if key == 0 {
            return;
        }
        match self.find(key) {
            Ok(i) => {
                let old = self.slots[i].value;
                self.header.checksum =
                    self.header.checksum.wrapping_sub(entry_sum(key, old)).wrapping_add(entry_sum(key, value));
                self.slots[i].value = value;
            }
            Err(i) if i < self.slots.len() && self.header.live < self.header.capacity - 1 => {
                self.slots[i] = Slot { key, value };
                self.header.live += 1;
                self.header.checksum = self.header.checksum.wrapping_add(entry_sum(key, value));
            }
            Err(_) => {}
        }
    }

    /// Removes `key`; returns whether it was there.
    pub fn delete(&mut self, key: u64) -> bool {
        let Ok(mut hole) = self.find(key) else { return false };
        let removed = self.slots[hole];
        self.header.checksum = self.header.checksum.wrapping_sub(entry_sum(removed.key, removed.value));
        self.header.live -= 1;
        // Backward shift: pull later entries of the cluster into the hole when their home
        // slot does not lie cyclically in (hole, i].
        let cap = self.slots.len();
        let mut i = hole;
        loop {
            i = if i + 1 == cap { 0 } else { i + 1 };
            let slot = self.slots[i];
            if slot.key == 0 {
                break;
            }
            let home = self.home(slot.key);
            let stays = if hole <= i { hole < home && home <= i } else { hole < home || home <= i };
            if !stays {
                self.slots[hole] = slot;
                hole = i;
            }
        }
        self.slots[hole] = Slot { key: 0, value: 0 };
        true
    }

    /// Checks the whole table against its header and its invariants.
    pub fn verify(&self) -> Result<(), VerifyError> {
        let mut live = 0u64;
        let mut checksum = 0u64;
        for (i, slot) in self.slots.iter().enumerate() {
            if slot.key == 0 {
                continue;
            }
            if slot.key > self.header.key_space {
                return Err(VerifyError::BadKey { slot: i as u64 });
            }
            match self.find(slot.key) {
                Ok(j) if j == i => {}
                Ok(_) => return Err(VerifyError::Duplicate { slot: i as u64 }),
                Err(_) => return Err(VerifyError::Unreachable { slot: i as u64 }),
            }
            live += 1;
            checksum = checksum.wrapping_add(entry_sum(slot.key, slot.value));
        }
        if live != self.header.live {
            return Err(VerifyError::LiveCount { header: self.header.live, slots: live });
        }
        if checksum != self.header.checksum {
            return Err(VerifyError::Checksum { header: self.header.checksum, slots: checksum });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::vec;
    use std::vec::Vec;

    fn region(bytes: usize) -> Vec<u64> {
        vec![0u64; bytes / 8]
    }

    fn bytes(words: &mut [u64]) -> &mut [u8] {
        // SAFETY: reinterpreting u64s as bytes is always valid; the length covers them.
        unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, words.len() * 8) }
    }

    #[test]
    fn format_then_open_and_bad_regions() {
        let mut mem = region(4096);
        assert_eq!(Kv::open(bytes(&mut mem)).err(), Some(KvError::NotFormatted));
        assert_eq!(Kv::format(bytes(&mut mem), 7).unwrap().capacity(), (4096 - 64) / 16);
        let kv = Kv::open(bytes(&mut mem)).unwrap();
        assert_eq!(kv.ops_done(), 0);
        let mut small = region(64);
        assert_eq!(Kv::format(bytes(&mut small), 1).err(), Some(KvError::BadRegion));
    }

    #[test]
    fn the_stream_is_deterministic_and_steps_compose() {
        let (mut a, mut b) = (region(16384), region(16384));
        let sum_a = {
            let mut ka = Kv::format(bytes(&mut a), 99).unwrap();
            ka.step(5000);
            ka.checksum()
        };
        let sum_b = {
            let mut kb = Kv::format(bytes(&mut b), 99).unwrap();
            kb.step(1234);
            kb.step(5000 - 1234);
            kb.checksum()
        };
        assert_eq!(sum_a, sum_b);
        assert_eq!(a, b, "identical bytes");
    }

    /// Replays the stream on a model and compares every key.
    fn agrees_with_model(seed: u64, ops: u64, size: usize) {
        let mut mem = region(size);
        let mut kv = Kv::format(bytes(&mut mem), seed).unwrap();
        let mut model: HashMap<u64, u64> = HashMap::new();
        for _ in 0..ops {
            let op = kv.next_op();
            match op {
                Op::Put { key, value } => {
                    kv.put(key, value);
                    model.insert(key, value);
                }
                Op::Delete { key } => {
                    assert_eq!(kv.delete(key), model.remove(&key).is_some());
                }
            }
            kv.header.ops += 1;
        }
        kv.verify().unwrap();
        assert_eq!(kv.live(), model.len() as u64);
        for (k, v) in &model {
            assert_eq!(kv.get(*k), Some(*v));
        }
        let sum = model.iter().fold(0u64, |s, (k, v)| s.wrapping_add(entry_sum(*k, *v)));
        assert_eq!(kv.checksum(), sum);
    }

    #[test]
    fn agrees_with_a_hash_map() {
        agrees_with_model(1, 50_000, 8192);
        agrees_with_model(2, 20_000, 65536);
    }

    #[test]
    fn step_keeps_the_table_valid() {
        let mut mem = region(32768);
        let mut kv = Kv::format(bytes(&mut mem), 5).unwrap();
        for _ in 0..20 {
            kv.step(3000);
            kv.verify().unwrap();
            assert!(kv.live() <= kv.max_live());
        }
    }

    #[test]
    fn corruption_is_detected() {
        let mut mem = region(8192);
        let mut kv = Kv::format(bytes(&mut mem), 3).unwrap();
        kv.step(2000);
        let live = kv.slots.iter().position(|s| s.key != 0).unwrap();
        kv.slots[live].value ^= 1;
        assert!(matches!(kv.verify(), Err(VerifyError::Checksum { .. })));
        kv.slots[live].value ^= 1;
        kv.verify().unwrap();
        let key = kv.slots[live].key;
        kv.slots[live].key = 0;
        assert!(kv.verify().is_err());
        kv.slots[live].key = key;
        kv.header.checksum ^= 4;
        assert!(matches!(kv.verify(), Err(VerifyError::Checksum { .. })));
    }

    proptest! {
        #[test]
        fn random_seeds_agree_with_the_model(seed in any::<u64>(), ops in 0u64..5000, pages in 1usize..4) {
            agrees_with_model(seed, ops, pages * 4096);
        }
    }
}
