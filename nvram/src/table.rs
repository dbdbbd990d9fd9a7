//! A fixed-capacity table of resources, laid out in NVM: a header, a bitmap of the entries in
//! use, and the entries. Tender keeps one such management table per resource type; a
//! resource is named by (type, index in its table).
//!
//! | offset      | size       | field                                   |
//! |-------------|------------|-----------------------------------------|
//! | 0           | 4          | `kind`: the resource type it holds      |
//! | 4           | 4          | `capacity`: `N`                         |
//! | 8           | 4          | `entry_size`: `size_of::<T>()`          |
//! | 12          | 4          | `live`: entries in use                  |
//! | 16          | 128        | bitmap of entries in use (up to 1024)   |
//! | 144         | N × size   | the entries                             |
//!
//! Tables are formatted in place (they are far too large for a kernel stack) and checked
//! against the expected kind, capacity and entry size before use.

use zerocopy::{FromBytes, Immutable, KnownLayout};

/// Most entries a table can hold (the bitmap's size).
pub const MAX_ENTRIES: usize = 1024;
const WORDS: usize = MAX_ENTRIES / 64;

/// A table of `N` entries of `T`. (`FromBytes`, so that an image's tables decode offline;
/// not `IntoBytes`, which zerocopy cannot derive for a generic struct.)
#[derive(FromBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Table<T, const N: usize> {
    kind: u32,
    capacity: u32,
    entry_size: u32,
    live: u32,
    used: [u64; WORDS],
    entries: [T; N],
}

// The offsets of the module docs: the image format.
const _: () = assert!(core::mem::offset_of!(Table<u64, 1>, used) == 16);
const _: () = assert!(core::mem::offset_of!(Table<u64, 1>, entries) == 144);

/// A table's header does not match what the kernel expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableMismatch {
    pub kind: u32,
    pub capacity: u32,
    pub entry_size: u32,
}

impl<T: Copy, const N: usize> Table<T, N> {
    /// Formats the table in place: empty, of resource type `kind`.
    pub fn format(&mut self, kind: u32) {
        const { assert!(N <= MAX_ENTRIES) };
        self.kind = kind;
        self.capacity = N as u32;
        self.entry_size = core::mem::size_of::<T>() as u32;
        self.live = 0;
        self.used = [0; WORDS];
    }

    /// Checks the header of a table found in NVM.
    pub fn check(&self, kind: u32) -> Result<(), TableMismatch> {
        let expected = (kind, N as u32, core::mem::size_of::<T>() as u32);
        if (self.kind, self.capacity, self.entry_size) == expected && self.live as usize <= N {
            Ok(())
        } else {
            Err(TableMismatch { kind: self.kind, capacity: self.capacity, entry_size: self.entry_size })
        }
    }

    fn is_used(&self, id: usize) -> bool {
        id < N && self.used[id / 64] & (1 << (id % 64)) != 0
    }

    /// Stores `value` in a free entry; returns its index.
    pub fn insert(&mut self, value: T) -> Option<u32> {
        let words = N.div_ceil(64);
        for (w, word) in self.used[..words].iter_mut().enumerate() {
            let free = !*word;
            if free == 0 {
                continue;
            }
            let id = w * 64 + free.trailing_zeros() as usize;
            if id >= N {
                return None;
            }
            *word |= 1 << (id % 64);
            self.entries[id] = value;
            self.live += 1;
            return Some(id as u32);
        }
        None
    }

    /// Removes entry `id`; returns what it held.
    pub fn remove(&mut self, id: u32) -> Option<T> {
        let id = id as usize;
        if !self.is_used(id) {
            return None;
        }
        self.used[id / 64] &= !(1 << (id % 64));
        self.live -= 1;
        Some(self.entries[id])
    }

    pub fn get(&self, id: u32) -> Option<&T> {
        self.is_used(id as usize).then(|| &self.entries[id as usize])
    }

    pub fn get_mut(&mut self, id: u32) -> Option<&mut T> {
        self.is_used(id as usize).then(|| &mut self.entries[id as usize])
    }

    /// The entries in use, with their indices, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &T)> {
        self.ids().map(|i| (i, &self.entries[i as usize]))
    }

    /// Indices of the entries in use, a bitmap word at a time (empty words cost one step:
    /// this may run in the emulated kernel mode of PVM).
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.ids_except(&[])
    }

    /// Indices of the entries in use whose bit is clear in `skip` (a bitmap laid out as
    /// the used one: bit `id` of word `id / 64`; missing words skip nothing).
    pub fn ids_except<'a>(&'a self, skip: &'a [u64]) -> impl Iterator<Item = u32> + 'a {
        let words = N.div_ceil(64);
        self.used[..words].iter().enumerate().flat_map(move |(w, &word)| {
            let mut bits = word & !skip.get(w).copied().unwrap_or(0);
            core::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                Some((w * 64) as u32 + bit)
            })
        })
    }

    pub fn live(&self) -> u32 {
        self.live
    }

    pub const fn capacity() -> usize {
        N
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::boxed::Box;

    fn table<const N: usize>() -> Box<Table<u64, N>> {
        let mut t = <Table<u64, N> as zerocopy::FromZeros>::new_box_zeroed().expect("the table fits in memory");
        t.format(7);
        t
    }

    #[test]
    fn insert_get_remove() {
        let mut t = table::<100>();
        assert_eq!(t.check(7), Ok(()));
        assert!(t.check(8).is_err());
        let a = t.insert(10).unwrap();
        let b = t.insert(20).unwrap();
        assert_eq!((a, b), (0, 1));
        assert_eq!(t.get(b), Some(&20));
        assert_eq!(t.remove(a), Some(10));
        assert_eq!(t.remove(a), None);
        assert_eq!(t.get(a), None);
        assert_eq!(t.insert(30), Some(0), "the lowest free entry is reused");
        *t.get_mut(0).unwrap() += 1;
        assert_eq!(t.iter().collect::<std::vec::Vec<_>>(), [(0, &31), (1, &20)]);
        assert_eq!(t.live(), 2);
        assert_eq!(t.get(5000), None);
        assert_eq!(t.remove(99), None);
    }

    #[test]
    fn ids_except_leaves_out_the_skipped_ones() {
        let mut t = table::<200>();
        for v in 0..200 {
            t.insert(v).unwrap();
        }
        for id in (0..200).filter(|&id| ![0, 1, 3, 191].contains(&id)) {
            t.remove(id);
        }
        let skip = [0b0010u64, u64::MAX];
        assert_eq!(t.ids_except(&skip).collect::<std::vec::Vec<_>>(), [0, 3, 191]);
        assert_eq!(t.ids().collect::<std::vec::Vec<_>>(), [0, 1, 3, 191]);
    }

    #[test]
    fn fills_to_capacity_and_no_further() {
        let mut t = table::<70>();
        for i in 0..70 {
            assert_eq!(t.insert(i), Some(i as u32));
        }
        assert_eq!(t.insert(99), None);
        assert_eq!(t.live(), 70);
        t.remove(65).unwrap();
        assert_eq!(t.insert(5), Some(65));
    }
}
