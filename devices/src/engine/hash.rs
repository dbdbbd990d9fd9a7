//! `nvram::plate::page_hash` of many whole pages at once, for the copy engine.
//!
//! The hash is four chains of dependent steps (xor, rotate, multiply), so one page at a
//! time runs at the latency of a chain: about 12-17 GB/s on the host, which made the sums
//! a third of a write-out. The chains of different pages are independent, though: with
//! AVX-512 (64-bit multiplies in vector lanes) this computes eight pages side by side, one
//! 256-bit vector per page holding its four lanes, at 30-40 GB/s. The result is the same
//! function, bit for bit (integer arithmetic), so a restore in the guest and `vmm inspect
//! --check` recompute exactly what the engine returned; the tests hold it to the
//! definition. Without AVX-512 the pages are hashed one by one by the definition itself.

use nvram::plate::page_hash;
use zerocopy::IntoBytes;

/// Words of a page.
pub(super) const PAGE_WORDS: usize = nvram::layout::PAGE_SIZE as usize / 8;
/// Pages hashed side by side: enough independent chains (eight vectors of two pages) to
/// hide a vector multiply's latency.
pub(super) const GROUP: usize = 16;

/// `out[k] = page_hash(indices[k], pages[k])`, for at most [`GROUP`] whole pages (fewer
/// take as long as a group).
pub(super) fn hash_group(pages: &[&[u64; PAGE_WORDS]], indices: &[u64], out: &mut [u64]) {
    let n = pages.len().min(indices.len()).min(out.len()).min(GROUP);
    #[cfg(target_arch = "x86_64")]
    if n > 0 && avx512() {
        // The missing pages are the first again, their hashes dropped.
        let group: [&[u64; PAGE_WORDS]; GROUP] = core::array::from_fn(|k| pages[if k < n { k } else { 0 }]);
        let at: [u64; GROUP] = core::array::from_fn(|k| indices[if k < n { k } else { 0 }]);
        let mut hashes = [0; GROUP];
        // SAFETY: the CPU has the features `group_avx512` is compiled for (checked at run
        // time by `avx512`).
        unsafe { group_avx512(&group, &at, &mut hashes) };
        out[..n].copy_from_slice(&hashes[..n]);
        return;
    }
    for k in 0..n {
        out[k] = page_hash(indices[k], pages[k].as_bytes());
    }
}

/// Whether this CPU has what [`group_avx512`] needs (detected once, then cached by std).
#[cfg(target_arch = "x86_64")]
pub(super) fn avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512dq")
}

/// [`GROUP`] whole pages (page `k` as page `indices[k]` of its plate) hashed side by side,
/// two to a 512-bit vector: each page's four lanes take its words four at a time, as
/// `page_hash` does, lane `l` word `4k + l - 1`. The first step takes the index in lane 0;
/// the last word goes to lane 0 alone, and the lanes are mixed by `checksum_finish`, both
/// scalar. Eight vectors in flight hide the multiply's latency.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512dq")]
fn group_avx512(pages: &[&[u64; PAGE_WORDS]; GROUP], indices: &[u64; GROUP], out: &mut [u64; GROUP]) {
    use nvram::plate::{checksum_finish, checksum_step, CHECKSUM_MUL, CHECKSUM_ROTATE, CHECKSUM_SEEDS};
    use std::arch::x86_64::{
        __m512i, _mm256_loadu_si256, _mm512_castsi256_si512, _mm512_inserti64x4, _mm512_mullo_epi64, _mm512_rol_epi64,
        _mm512_set1_epi64, _mm512_set_epi64, _mm512_storeu_si512, _mm512_xor_si512,
    };
    const ROTATE: i32 = CHECKSUM_ROTATE as i32;
    const PAIRS: usize = GROUP / 2;
    let mul = _mm512_set1_epi64(CHECKSUM_MUL as i64);
    let [s0, s1, s2, s3] = CHECKSUM_SEEDS.map(|s| s as i64);
    let seeds = _mm512_set_epi64(s3, s2, s1, s0, s3, s2, s1, s0);
    let step = |lanes: __m512i, words: __m512i| {
        _mm512_mullo_epi64(_mm512_rol_epi64::<ROTATE>(_mm512_xor_si512(lanes, words)), mul)
    };
    let mut lanes: [__m512i; PAIRS] = core::array::from_fn(|v| {
        let (a, b) = (pages[2 * v], pages[2 * v + 1]);
        let (ia, ib) = (indices[2 * v] as i64, indices[2 * v + 1] as i64);
        step(
            seeds,
            _mm512_set_epi64(b[2] as i64, b[1] as i64, b[0] as i64, ib, a[2] as i64, a[1] as i64, a[0] as i64, ia),
        )
    });
    let base: [[*const u64; 2]; PAIRS] = core::array::from_fn(|v| [pages[2 * v].as_ptr(), pages[2 * v + 1].as_ptr()]);
    for k in 1..PAGE_WORDS / 4 {
        for (lane, &[a, b]) in lanes.iter_mut().zip(&base) {
            // SAFETY: words `4k - 1..4k + 3` of two pages (`k < 128`), read unaligned: no
            // bounds check in the loop, which is the whole of the hash.
            let words = unsafe {
                let low = _mm512_castsi256_si512(_mm256_loadu_si256(a.add(4 * k - 1).cast()));
                _mm512_inserti64x4::<1>(low, _mm256_loadu_si256(b.add(4 * k - 1).cast()))
            };
            *lane = step(*lane, words);
        }
    }
    for (v, pair) in out.chunks_exact_mut(2).enumerate() {
        let mut l = [0u64; 8];
        // SAFETY: `l` is eight words, written unaligned.
        unsafe { _mm512_storeu_si512(l.as_mut_ptr().cast(), lanes[v]) };
        for (half, hash) in pair.iter_mut().enumerate() {
            let mut page_lanes = [l[4 * half], l[4 * half + 1], l[4 * half + 2], l[4 * half + 3]];
            page_lanes[0] = checksum_step(page_lanes[0], pages[2 * v + half][PAGE_WORDS - 1]);
            *hash = checksum_finish(page_lanes, PAGE_WORDS as u64 + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of words that differ in every bit position somewhere.
    fn pages(n: usize, seed: u64) -> Vec<u64> {
        let mut x = seed | 1;
        (0..n * PAGE_WORDS)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            })
            .collect()
    }

    /// Of any number of pages up to a group, any indices: nvram's `page_hash`.
    #[test]
    fn the_hashes_are_nvrams_page_hash() {
        for (n, first) in [(0, 0), (1, 0), (3, 7), (7, 3), (8, 0), (8, 1 << 40)] {
            let words = pages(n, n as u64 + first);
            let group: Vec<&[u64; PAGE_WORDS]> = words.as_chunks().0.iter().collect();
            let indices: Vec<u64> = (0..n as u64).map(|k| first + 3 * k).collect();
            let mut out = vec![0; n];
            hash_group(&group, &indices, &mut out);
            for (k, &h) in out.iter().enumerate() {
                assert_eq!(h, page_hash(indices[k], group[k].as_bytes()), "page {k} of {n}, first {first}");
            }
        }
    }

    /// The vector path itself, where the CPU has it (else the test says so): one bit flipped
    /// anywhere in a group changes that page's hash and no other.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_path_is_the_definition_bit_for_bit() {
        if !avx512() {
            eprintln!("no AVX-512 here: the pages are hashed by the definition itself");
            return;
        }
        let mut words = pages(GROUP, 42);
        let indices: [u64; GROUP] = core::array::from_fn(|k| 9 + k as u64);
        let hash = |words: &[u64]| {
            let group: [&[u64; PAGE_WORDS]; GROUP] = core::array::from_fn(|k| &words.as_chunks().0[k]);
            let mut out = [0; GROUP];
            // SAFETY: checked above.
            unsafe { group_avx512(&group, &indices, &mut out) };
            out
        };
        let base = hash(&words);
        for (k, &h) in base.iter().enumerate() {
            assert_eq!(h, page_hash(9 + k as u64, words[k * PAGE_WORDS..(k + 1) * PAGE_WORDS].as_bytes()));
        }
        for (word, bit) in [(0, 0), (1, 63), (2, 5), (3, 31), (PAGE_WORDS + 510, 17), (GROUP * PAGE_WORDS - 1, 40)] {
            words[word] ^= 1 << bit;
            let out = hash(&words);
            words[word] ^= 1 << bit;
            let page = word / PAGE_WORDS;
            for k in 0..GROUP {
                assert_eq!(out[k] != base[k], k == page, "bit {bit} of word {word}: page {k}");
            }
        }
    }
}
