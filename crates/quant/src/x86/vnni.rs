//! AVX-512 VNNI kernels (`vpdpbusd`, needs AVX512F/BW/VL/VNNI) for the 32-value block
//! types against 8-bit activations, as tiles of up to 4 weight rows × 4 tokens: decoding
//! (one token) and small batches; large batches take the AMX tiles where they exist.
//!
//! Every block type is put in one form: unsigned bytes `u` (0..=255), a scale `dw` and a
//! per-block offset `mw`, so that `w = dw · u + mw` (Q4_1: `mw = m`; Q4_0/Q5_0/Q8_0:
//! `mw = -off · dw` with off 8/16/128). Then
//! `Σ w·a = dw·da·Σ u·q + mw·sa` with `sa = da·Σq` per activation block (see `ActBlocks`).
//! `vpdpbusd` multiplies u8 × i8 and sums groups of four into i32 lanes with no
//! saturation, so the integer part is exact; only float rounding differs from the reference.
//!
//! Blocks go in pairs, one per 256-bit half of a 512-bit vector, and in groups of 16 whose
//! scales are picked into one vector (`scales16`): per pair and (row, token), one
//! `vpdpbusd`, one conversion, one permute-and-multiply for the pair's two scales and one
//! FMA; per group, one FMA adds the 16 blocks' `mw·sa`. Q8_0, whose 34-byte blocks are too
//! far apart for `scales16`, takes its two scales per pair from one masked load instead
//! (`pair_scales`), and its dots start from `-128·Σq` so they need no `mw·sa` term.
//! The 4-bit types (Q4_0, Q4_1, IQ4_NL) go four blocks at a time instead (`quad_bw`): the
//! four blocks' 16 bytes of nibbles fill one vector, whose low nibbles (each block's values
//! 0..16) and high nibbles (16..32) are two `vpdpbusd` against the activations laid out the
//! same way (`act_quad`) into one sum per block lane — about 1.25× the pairs' rate on
//! Zen 4 (`examples/qmatmul`), as the pairs spend more on unpacking than on products.
//! Everything lands in one 16-lane accumulator per (row, token), summed at the end. Each (row, token) goes through the same operations
//! whatever the tile's shape, so a token's result does not depend on the batch it is in
//! (batched decoding equals decoding alone, bit for bit).
#![allow(clippy::missing_safety_doc)] // callers must have detected the features listed

use super::avx2::nibbles_32;
use crate::blocks::*;
use crate::ActBlocks;
use std::arch::x86_64::*;

/// A weight block type in the `dw · u + mw` form.
pub trait Unsigned32: Copy {
    /// `off` of the `d · (u - off)` types (0 for Q4_1, whose offset is its `m`).
    const OFFSET: f32;
    /// Whether the block starts with `d` then `m` (both f16): Q4_1.
    const HAS_M: bool = false;
    /// Bits per value: `u < 2^BITS`.
    const BITS: u32;
    /// The 32 unsigned values (needs AVX2).
    unsafe fn bytes(&self) -> __m256i;
    /// For the offset-128 types (Q8_0, IQ4_NL): the 32 signed values `u − 128`, which the
    /// AVX2 sign trick takes (needs AVX2).
    #[inline(always)]
    unsafe fn signed_bytes(&self) -> __m256i {
        // SAFETY: as `bytes`.
        unsafe { _mm256_xor_si256(self.bytes(), _mm256_set1_epi8(0x80u8 as i8)) }
    }
    /// The same where AVX-512 BW/VL are enabled too (the tiles here), if that is quicker.
    #[inline(always)]
    unsafe fn bytes_bw(&self) -> __m256i {
        // SAFETY: as `bytes`.
        unsafe { self.bytes() }
    }
    /// Whether `quad_bw` is quicker than two `pair_bw` (the 4-bit types, whose nibbles
    /// split into the quad's two vectors with one shift and two ANDs); the AVX2 tiles take
    /// the same types two at a time (`duo`), except those on the sign trick (IQ4_NL).
    const QUAD: bool = false;
    /// Blocks `w .. w + 4` as two vectors: lane `k` (128 bits) of the first holds block
    /// `w + k`'s values 0..16, of the second its values 16..32 (AVX-512 BW/VL enabled).
    #[inline(always)]
    unsafe fn quad_bw(w: *const Self) -> (__m512i, __m512i) {
        // SAFETY: the caller vouches for the four blocks and the features.
        unsafe {
            let (mut lo, mut hi) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for k in 0..4 {
                let v = (*w.add(k)).bytes_bw();
                lo = _mm512_mask_broadcast_i32x4(lo, 0xf << (4 * k), _mm256_castsi256_si128(v));
                hi = _mm512_mask_broadcast_i32x4(
                    hi,
                    0xf << (4 * k),
                    _mm256_extracti128_si256::<1>(v),
                );
            }
            (lo, hi)
        }
    }
    /// Blocks `w` and `w + 1` as two 256-bit vectors, `quad_bw`'s layout at half the
    /// width: lane `k` (128 bits) of the first holds block `w + k`'s values 0..16, of the
    /// second its values 16..32 (needs AVX2; quick for Q4_0 and Q4_1, which the AVX2 tiles
    /// take two blocks at a time).
    #[inline(always)]
    unsafe fn duo(w: *const Self) -> (__m256i, __m256i) {
        // SAFETY: the caller vouches for both blocks and the features.
        unsafe {
            let (a, b) = ((*w).bytes(), (*w.add(1)).bytes());
            (
                _mm256_permute2x128_si256::<0x20>(a, b),
                _mm256_permute2x128_si256::<0x31>(a, b),
            )
        }
    }
    /// Blocks `w` and `w + 1` as one vector (AVX-512 BW/VL enabled).
    #[inline(always)]
    unsafe fn pair_bw(w: *const Self) -> __m512i {
        // SAFETY: the caller vouches for both blocks and the features.
        unsafe {
            let lo = _mm512_castsi256_si512((*w).bytes_bw());
            _mm512_inserti64x4(lo, (*w.add(1)).bytes_bw(), 1)
        }
    }
}

/// The nibbles of two blocks' 16 bytes `a`, `b` as 64 bytes: `a`'s low nibbles, `a`'s high
/// nibbles, then `b`'s (the order of `nibbles_32`, per block).
#[inline(always)]
unsafe fn nibble_pair(a: &[u8; 16], b: &[u8; 16]) -> __m512i {
    // SAFETY: reads the 16 bytes of each; AVX-512 F/BW are enabled by every caller.
    unsafe {
        let ab = _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(a.as_ptr() as *const __m128i)),
            _mm_loadu_si128(b.as_ptr() as *const __m128i),
        );
        let z = _mm512_castsi256_si512(ab);
        let aabb = _mm512_shuffle_i64x2::<0x50>(z, z);
        let shifted = _mm512_srlv_epi64(aabb, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4));
        _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F))
    }
}

/// Four blocks' 16-byte `qs` (4-bit values: value `j` in the low nibble of byte `j`, value
/// `16 + j` in its high nibble) as the quad's two vectors (see `Unsigned32::quad_bw`).
#[inline(always)]
unsafe fn nibble_quad(qs: [&[u8; 16]; 4]) -> (__m512i, __m512i) {
    // SAFETY: reads the 16 bytes of each; AVX-512 F/BW are enabled by every caller.
    unsafe {
        let load = |k: usize| _mm_loadu_si128(qs[k].as_ptr() as *const __m128i);
        let ab = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(load(0)), load(1));
        let cd = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(load(2)), load(3));
        let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(ab), cd);
        let low4 = _mm512_set1_epi8(0x0F);
        (
            _mm512_and_si512(q, low4),
            _mm512_and_si512(_mm512_srli_epi16::<4>(q), low4),
        )
    }
}

/// Two blocks' 16-byte `qs` as `duo`'s two vectors (AVX2 enabled by every caller).
#[inline(always)]
unsafe fn nibble_duo(a: &[u8; 16], b: &[u8; 16]) -> (__m256i, __m256i) {
    // SAFETY: reads the 16 bytes of each.
    unsafe {
        let q = _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(a.as_ptr() as *const __m128i)),
            _mm_loadu_si128(b.as_ptr() as *const __m128i),
        );
        let low4 = _mm256_set1_epi8(0x0F);
        (
            _mm256_and_si256(q, low4),
            _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4),
        )
    }
}

/// An activation block type: 32 signed bytes.
pub trait Signed32: Copy {
    fn qs(&self) -> &[i8; 32];
}
impl Signed32 for BlockQ8_0 {
    #[inline(always)]
    fn qs(&self) -> &[i8; 32] {
        &self.qs
    }
}
impl Signed32 for BlockQ8_1 {
    #[inline(always)]
    fn qs(&self) -> &[i8; 32] {
        &self.qs
    }
}

/// The value methods of the types whose 32 values are the nibbles of a 16-byte `qs` (value
/// `j` low in byte `j`, value `16 + j` high): Q4_0 and Q4_1.
macro_rules! nibble_methods {
    () => {
        #[inline(always)]
        unsafe fn bytes(&self) -> __m256i {
            // SAFETY: reads the 16 bytes of qs; AVX2 is enabled wherever this is inlined.
            unsafe { nibbles_32(&self.qs) }
        }
        #[inline(always)]
        unsafe fn pair_bw(w: *const Self) -> __m512i {
            // SAFETY: the caller vouches for both blocks and the features.
            unsafe { nibble_pair(&(*w).qs, &(*w.add(1)).qs) }
        }
        const QUAD: bool = true;
        #[inline(always)]
        unsafe fn duo(w: *const Self) -> (__m256i, __m256i) {
            // SAFETY: the caller vouches for both blocks and the features.
            unsafe { nibble_duo(&(*w).qs, &(*w.add(1)).qs) }
        }
        #[inline(always)]
        unsafe fn quad_bw(w: *const Self) -> (__m512i, __m512i) {
            // SAFETY: the caller vouches for the four blocks and the features.
            unsafe { nibble_quad(std::array::from_fn(|k| &(*w.add(k)).qs)) }
        }
    };
}

impl Unsigned32 for BlockQ4_0 {
    const OFFSET: f32 = 8.0;
    const BITS: u32 = 4;
    nibble_methods!();
}

impl Unsigned32 for BlockQ4_1 {
    const OFFSET: f32 = 0.0;
    const BITS: u32 = 4;
    const HAS_M: bool = true;
    nibble_methods!();
}

/// 32 five-bit values: the nibbles of `qs` plus 16 where the value's bit of `qh` is set.
#[inline(always)]
unsafe fn q5_bytes(qs: &[u8; 16], qh: [u8; 4]) -> __m256i {
    // SAFETY: AVX2 is enabled by every caller; `nibbles_32` reads the 16 bytes of qs.
    unsafe {
        let fifth = super::avx2::bits_to_bytes_32(u32::from_le_bytes(qh));
        _mm256_or_si256(
            nibbles_32(qs),
            _mm256_and_si256(fifth, _mm256_set1_epi8(0x10)),
        )
    }
}

/// `q5_bytes` with AVX-512 BW/VL (enabled by every caller): bit j of qh is value j's fifth
/// bit, so one masked add sets them all.
#[inline(always)]
unsafe fn q5_bytes_bw(qs: &[u8; 16], qh: [u8; 4]) -> __m256i {
    // SAFETY: reads the 16 bytes of qs; the features are the caller's.
    unsafe {
        let low = nibbles_32(qs);
        _mm256_mask_add_epi8(low, u32::from_le_bytes(qh), low, _mm256_set1_epi8(0x10))
    }
}

/// Two blocks' five-bit values as one vector (AVX-512 BW/VL enabled by every caller): bit j
/// of qh is value j's fifth bit, so one masked add sets them all.
#[inline(always)]
unsafe fn q5_pair(qs_a: &[u8; 16], qh_a: [u8; 4], qs_b: &[u8; 16], qh_b: [u8; 4]) -> __m512i {
    // SAFETY: reads the 16 bytes of each qs; the features are the caller's.
    unsafe {
        let low = nibble_pair(qs_a, qs_b);
        let qh = u32::from_le_bytes(qh_a) as u64 | (u32::from_le_bytes(qh_b) as u64) << 32;
        _mm512_mask_add_epi8(low, qh, low, _mm512_set1_epi8(0x10))
    }
}

impl Unsigned32 for BlockQ5_0 {
    const OFFSET: f32 = 16.0;
    const BITS: u32 = 5;
    #[inline(always)]
    unsafe fn bytes(&self) -> __m256i {
        // SAFETY: AVX2 is enabled by every caller.
        unsafe { q5_bytes(&self.qs, self.qh) }
    }
    #[inline(always)]
    unsafe fn bytes_bw(&self) -> __m256i {
        // SAFETY: AVX2 and AVX-512 BW/VL are enabled by every caller (the tiles).
        unsafe { q5_bytes_bw(&self.qs, self.qh) }
    }
    #[inline(always)]
    unsafe fn pair_bw(w: *const Self) -> __m512i {
        // SAFETY: the caller vouches for both blocks and the features.
        unsafe { q5_pair(&(*w).qs, (*w).qh, &(*w.add(1)).qs, (*w.add(1)).qh) }
    }
}

/// Q5_1's values are Q5_0's (nibbles plus the fifth bit), with `m` instead of an offset.
impl Unsigned32 for BlockQ5_1 {
    const OFFSET: f32 = 0.0;
    const BITS: u32 = 5;
    const HAS_M: bool = true;
    #[inline(always)]
    unsafe fn bytes(&self) -> __m256i {
        // SAFETY: as Q5_0's, on the same fields.
        unsafe { q5_bytes(&self.qs, self.qh) }
    }
    #[inline(always)]
    unsafe fn bytes_bw(&self) -> __m256i {
        // SAFETY: as Q5_0's, on the same fields.
        unsafe { q5_bytes_bw(&self.qs, self.qh) }
    }
    #[inline(always)]
    unsafe fn pair_bw(w: *const Self) -> __m512i {
        // SAFETY: the caller vouches for both blocks and the features.
        unsafe { q5_pair(&(*w).qs, (*w).qh, &(*w.add(1)).qs, (*w.add(1)).qh) }
    }
}

/// IQ4_NL's table, shifted to unsigned (`kv + 128`), in every 128-bit lane.
#[inline(always)]
unsafe fn iq4nl_table_u8() -> __m512i {
    // SAFETY: reads the 16 bytes of the table; AVX-512 F is enabled by every caller.
    unsafe {
        let t = _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i);
        _mm512_xor_si512(_mm512_broadcast_i32x4(t), _mm512_set1_epi8(0x80u8 as i8))
    }
}

/// IQ4_NL is Q4_0's layout with a table instead of `q − 8`: the table's values plus 128 are
/// the unsigned bytes (offset 128).
impl Unsigned32 for BlockIQ4NL {
    const OFFSET: f32 = 128.0;
    const BITS: u32 = 8;
    #[inline(always)]
    unsafe fn bytes(&self) -> __m256i {
        // SAFETY: AVX2 is enabled by every caller; reads the 16 bytes of qs and the table.
        unsafe {
            let t = _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i);
            let t = _mm_xor_si128(t, _mm_set1_epi8(0x80u8 as i8));
            _mm256_shuffle_epi8(_mm256_set_m128i(t, t), nibbles_32(&self.qs))
        }
    }
    #[inline(always)]
    unsafe fn signed_bytes(&self) -> __m256i {
        // SAFETY: AVX2 is enabled by every caller; reads the 16 bytes of qs and the table.
        unsafe {
            let t = _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i);
            _mm256_shuffle_epi8(_mm256_set_m128i(t, t), nibbles_32(&self.qs))
        }
    }
    #[inline(always)]
    unsafe fn pair_bw(w: *const Self) -> __m512i {
        // SAFETY: the caller vouches for both blocks and the features.
        unsafe { _mm512_shuffle_epi8(iq4nl_table_u8(), nibble_pair(&(*w).qs, &(*w.add(1)).qs)) }
    }
    const QUAD: bool = true;
    #[inline(always)]
    unsafe fn quad_bw(w: *const Self) -> (__m512i, __m512i) {
        // SAFETY: the caller vouches for the four blocks and the features.
        unsafe {
            let (lo, hi) = nibble_quad(std::array::from_fn(|k| &(*w.add(k)).qs));
            let t = iq4nl_table_u8();
            (_mm512_shuffle_epi8(t, lo), _mm512_shuffle_epi8(t, hi))
        }
    }
}

impl Unsigned32 for BlockQ8_0 {
    const OFFSET: f32 = 128.0;
    const BITS: u32 = 8;
    #[inline(always)]
    unsafe fn bytes(&self) -> __m256i {
        // SAFETY: reads exactly the 32 bytes of qs; AVX2 is enabled by every caller.
        unsafe {
            let q = _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i);
            _mm256_xor_si256(q, _mm256_set1_epi8(0x80u8 as i8)) // q + 128 as u8
        }
    }
}

/// How far ahead of the current block each row prefetches (at least one tile): decode
/// reads weights once, straight from memory, and the hardware prefetcher alone leaves the
/// loop waiting on loads (measured: +30–40% tokens/s on both models).
const PREFETCH_BYTES: usize = 4096;

/// Blocks `b` and `b + 1` (`both`), or `b` alone (upper half zero), as one vector.
#[inline(always)]
unsafe fn weight_pair<W: Unsigned32>(w: *const W, both: bool) -> __m512i {
    // SAFETY: the caller vouches for block `w` (and `w + 1` when `both`); the features are
    // enabled in every kernel that inlines this.
    unsafe {
        if both {
            W::pair_bw(w)
        } else {
            _mm512_castsi256_si512((*w).bytes_bw())
        }
    }
}

/// The signed bytes of activation blocks `b` and `b + 1` (`both`), or `b` alone.
#[inline(always)]
unsafe fn act_pair<A: Signed32>(a: *const A, both: bool) -> __m512i {
    // SAFETY: as for `weight_pair`: 32 bytes of each block's qs.
    unsafe {
        let lo = _mm512_castsi256_si512(_mm256_loadu_si256((*a).qs().as_ptr() as *const __m256i));
        if both {
            let hi = _mm256_loadu_si256((*a.add(1)).qs().as_ptr() as *const __m256i);
            _mm512_inserti64x4(lo, hi, 1)
        } else {
            lo
        }
    }
}

/// The signed bytes of activation blocks `a .. a + 4` as `quad_bw` lays out weights: lane
/// `k` of the first vector holds block `a + k`'s bytes 0..16, of the second its bytes 16..32.
#[inline(always)]
unsafe fn act_quad<A: Signed32>(a: *const A) -> (__m512i, __m512i) {
    // SAFETY: as for `act_pair`: 32 bytes of each of the four blocks' qs.
    unsafe {
        let (mut lo, mut hi) = (_mm512_setzero_si512(), _mm512_setzero_si512());
        for k in 0..4 {
            let qs = (*a.add(k)).qs().as_ptr();
            let l = _mm_loadu_si128(qs as *const __m128i);
            let h = _mm_loadu_si128(qs.add(16) as *const __m128i);
            lo = _mm512_mask_broadcast_i32x4(lo, 0xf << (4 * k), l);
            hi = _mm512_mask_broadcast_i32x4(hi, 0xf << (4 * k), h);
        }
        (lo, hi)
    }
}

/// How to pick, out of the 64-word windows of a run of 16 blocks of `bytes` bytes each,
/// every block's first two f16 words (`d`, then `m` for Q4_1): output word `i` is block
/// `i`'s word 0, word `16 + i` its word 1. Per window: the permute's index (source word
/// `j` of the window's two 32-word chunks is index `j`) and the output words it supplies.
struct ScalePicks {
    idx: [[u16; 32]; Self::WINDOWS],
    take: [u32; Self::WINDOWS],
    /// Windows a run of 16 blocks spans.
    windows: usize,
}

impl ScalePicks {
    /// Q8_0, the longest block here (34 bytes), spans 16 · 17 = 272 words: 5 windows.
    const WINDOWS: usize = 5;

    const fn new(bytes: usize) -> Self {
        assert!(bytes.is_multiple_of(2) && bytes * 8 <= Self::WINDOWS * 64);
        let mut p = ScalePicks {
            idx: [[0; 32]; Self::WINDOWS],
            take: [0; Self::WINDOWS],
            windows: (bytes * 8).div_ceil(64),
        };
        let mut out = 0;
        while out < 32 {
            let word = (out % 16) * (bytes / 2) + out / 16;
            p.idx[word / 64][out] = (word % 64) as u16;
            p.take[word / 64] |= 1 << out;
            out += 1;
        }
        p
    }
}

/// The picks for block type `W`.
struct Picks<W>(std::marker::PhantomData<W>);
impl<W: Unsigned32> Picks<W> {
    const P: ScalePicks = ScalePicks::new(size_of::<W>());
}

/// A run of `n` (≤ 16) blocks of `W` as `scales16` loads it, worked out once per run for
/// all the rows that take it: the lanes its blocks fill, the masks of its 32-word chunks
/// (words past the run neither read nor able to fault) and how many 64-word windows hold
/// words of it (a short run at a row's end needs fewer than a full one).
struct Run {
    lanes: __mmask16,
    chunks: [__mmask32; 2 * ScalePicks::WINDOWS],
    windows: usize,
}

impl Run {
    fn new<W: Unsigned32>(n: usize) -> Self {
        let words = n * size_of::<W>() / 2;
        let chunks = std::array::from_fn(|c| {
            let valid = words.saturating_sub(32 * c).min(32);
            if valid == 32 {
                !0
            } else {
                (1u32 << valid) - 1
            }
        });
        Run {
            lanes: if n == 16 { !0 } else { (1u16 << n) - 1 },
            chunks,
            windows: words.div_ceil(64).min(Picks::<W>::P.windows),
        }
    }
}

/// `dw` and `mw` of the run's blocks from `w` (lanes past them are 0), for the types whose
/// run of 16 blocks spans at most 3 windows of 64 words (every type here but Q8_0, which
/// takes its scales per pair instead: `pair_scales`).
///
/// A 16-lane gather costs AMD Zen 4/5 microcode, so the run is loaded as 32-word chunks
/// (masked at the run's end, so nothing past its last block is read) and each window gives
/// its words with one two-source word permute: Q4_1 decoding of 576-column rows measured
/// +15–25% on Zen 5 against the gather.
#[inline(always)]
unsafe fn scales16<W: Unsigned32>(w: *const W, run: &Run) -> (__m512, __m512) {
    let picks = &Picks::<W>::P;
    assert!(picks.windows <= 3);
    // SAFETY: the chunk loads are masked to the words of the run's blocks, which the caller
    // vouches for (masked-off words are neither read nor able to fault); `run.windows` ≤
    // `ScalePicks::WINDOWS` keeps the chunk and pick indices in their arrays; AVX-512 F/BW
    // are enabled in every kernel that inlines this.
    unsafe {
        let src = w as *const u16;
        let chunk = |c: usize| _mm512_maskz_loadu_epi16(run.chunks[c], src.add(32 * c) as *const _);
        let mut out = _mm512_setzero_si512();
        for k in 0..run.windows {
            let idx = _mm512_loadu_si512(picks.idx[k].as_ptr() as *const _);
            let window = _mm512_permutex2var_epi16(chunk(2 * k), idx, chunk(2 * k + 1));
            out = _mm512_mask_mov_epi16(out, picks.take[k], window);
        }
        let dw = _mm512_maskz_cvtph_ps(run.lanes, _mm512_castsi512_si256(out));
        let mw = if W::HAS_M {
            _mm512_maskz_cvtph_ps(run.lanes, _mm512_extracti64x4_epi64::<1>(out))
        } else {
            _mm512_mul_ps(dw, _mm512_set1_ps(-W::OFFSET))
        };
        (dw, mw)
    }
}

/// The permute index for `pair_scales` over blocks of `words` 16-bit words: lanes 0..8
/// take word 0 (the first block's `d`), lanes 8..16 word `words` (the second's).
#[inline(always)]
unsafe fn pair_scale_picks(words: usize) -> __m512i {
    // SAFETY: AVX-512 F is enabled in every kernel that inlines this.
    unsafe {
        let second = _mm512_set1_epi16(words as i16);
        _mm512_maskz_mov_epi16(0xff00, second)
    }
}

/// `dw` of blocks `w` and `w + 1` (`both`; else `w` alone and 0 for the second) spread
/// like a pair's dot lanes: lanes 0..8 the first block's, 8..16 the second's.
#[inline(always)]
unsafe fn pair_scales<W: Unsigned32>(w: *const W, both: bool, picks: __m512i) -> __m512 {
    let words = size_of::<W>() / 2;
    let mask: __mmask32 = if both { (1u32 << (words + 1)) - 1 } else { 1 };
    // SAFETY: the masked load reads only the words of `w` (and the first of `w + 1` when
    // `both`) that the caller vouches for; AVX-512 F/BW are enabled where this is inlined.
    unsafe {
        let raw = _mm512_maskz_loadu_epi16(mask, w as *const _);
        _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(picks, raw)))
    }
}

/// `R` rows (rows `0, stride, 2·stride, …` of `w`, `nb` blocks each) × `T` tokens
/// (starting at token `t0` of `a`); row `r`'s results go to
/// `out[r * stride * n_tok + t0 + t]`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile<W: Unsigned32, A: Signed32, const R: usize, const T: usize>(
    w: &[W],
    stride: usize,
    a: &ActBlocks<A>,
    nb: usize,
    t0: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(R == 1 || stride > 0);
    assert!(w.len() >= ((R - 1) * stride + 1) * nb && a.blocks.len() >= (t0 + T) * nb);
    assert!(a.d.len() >= (t0 + T) * nb && a.s.len() >= (t0 + T) * nb);
    assert!(out.len() >= (R - 1) * stride * n_tok + t0 + T);
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    // Lanes 0..8 take the first block of a pair, 8..16 the second.
    let halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    // Quads: lanes 4k..4k + 4 take block k of the four.
    let quarters = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    // Each row prefetches ahead in its own stream (the rows after it, up to the next tile's).
    let ahead = PREFETCH_BYTES.max(nb * size_of::<W>());
    // Q8_0: its 16-block runs span too many windows for `scales16`, and the gather it would
    // take instead is microcode on AMD Zen (40% of decoding time, measured on Zen 5); its
    // scales come per pair instead, picked from one masked load (`pair_scales`).
    let per_pair = Picks::<W>::P.windows > 3;
    assert!(!(per_pair && (W::HAS_M || W::QUAD)));
    let offset = _mm512_set1_epi8(W::OFFSET as u8 as i8);
    // SAFETY: the features are enabled here.
    let pair_words = unsafe { pair_scale_picks(size_of::<W>() / 2) };
    // SAFETY (whole loop): every block index below is `< nb` within its row (rows
    // `r * stride` for `r < R`, tokens `t0 + t < t0 + T`), which the asserts above keep
    // inside `w`, `a.blocks`, `a.d`, `a.s`; prefetches only hint and may point anywhere.
    // A full run's masks are the same for every group: worked out once (a row's last,
    // shorter run works out its own).
    let full_run = Run::new::<W>(16);
    unsafe {
        for g0 in (0..nb).step_by(16) {
            let n = (nb - g0).min(16);
            let mask: __mmask16 = if n == 16 { 0xffff } else { (1u16 << n) - 1 };
            let mut da = [_mm512_setzero_ps(); T];
            for (t, da) in da.iter_mut().enumerate() {
                let i = (t0 + t) * nb + g0;
                *da = _mm512_maskz_loadu_ps(mask, a.d.as_ptr().add(i));
            }
            // Per-pair types take their scales in the pair loop below instead.
            let short_run;
            let run = if n == 16 {
                &full_run
            } else {
                short_run = Run::new::<W>(n);
                &short_run
            };
            let mut dw = [_mm512_setzero_ps(); R];
            let group_scaled = if per_pair { 0 } else { R };
            for (r, (dw, acc)) in dw
                .iter_mut()
                .zip(acc.iter_mut())
                .enumerate()
                .take(group_scaled)
            {
                let (d, mw) = scales16(w.as_ptr().add(r * stride * nb + g0), run);
                // One token: `dw·da` once per group rather than per pair (the same products
                // in the same lanes, so the same bits as the general path below).
                *dw = if T == 1 { _mm512_mul_ps(d, da[0]) } else { d };
                for (t, acc) in acc.iter_mut().enumerate() {
                    let sa = _mm512_maskz_loadu_ps(mask, a.s.as_ptr().add((t0 + t) * nb + g0));
                    *acc = _mm512_fmadd_ps(mw, sa, *acc);
                }
            }
            let mut p = 0;
            // The 4-bit types go four blocks at a time while four are left (two `vpdpbusd`
            // per quad, against one per pair plus the pair's unpacking), then in pairs.
            while W::QUAD && p + 4 <= n {
                let b = g0 + p;
                let pick = _mm512_add_epi32(quarters, _mm512_set1_epi32(p as i32));
                let mut y = [(_mm512_setzero_si512(), _mm512_setzero_si512()); T];
                let mut pda = [_mm512_setzero_ps(); T];
                for t in 0..T {
                    y[t] = act_quad(a.blocks.as_ptr().add((t0 + t) * nb + b));
                    pda[t] = _mm512_permutexvar_ps(pick, da[t]);
                }
                for r in 0..R {
                    let blk = w.as_ptr().add(r * stride * nb + b);
                    // A quad spans more than a cache line: two hints keep every line covered.
                    let ahead_at = (blk as *const i8).wrapping_add(ahead);
                    _mm_prefetch::<_MM_HINT_T0>(ahead_at);
                    _mm_prefetch::<_MM_HINT_T0>(ahead_at.wrapping_add(2 * size_of::<W>()));
                    let (lo, hi) = W::quad_bw(blk);
                    let pdw = _mm512_permutexvar_ps(pick, dw[r]);
                    for t in 0..T {
                        let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, y[t].0);
                        let dot = _mm512_dpbusd_epi32(dot, hi, y[t].1);
                        let scale = if T == 1 {
                            pdw
                        } else {
                            _mm512_mul_ps(pdw, pda[t])
                        };
                        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r][t]);
                    }
                }
                p += 4;
            }
            while p < n {
                let both = p + 1 < n;
                let b = g0 + p;
                let pick = _mm512_add_epi32(halves, _mm512_set1_epi32(p as i32));
                let mut y = [_mm512_setzero_si512(); T];
                let mut pda = [_mm512_setzero_ps(); T];
                // Per-pair scales: each dot starts from `-off · Σa` (per lane), so it comes
                // out as the exact `Σ w·a` and needs no `mw · sa` term.
                let mut start = [_mm512_setzero_si512(); T];
                for t in 0..T {
                    y[t] = act_pair(a.blocks.as_ptr().add((t0 + t) * nb + b), both);
                    pda[t] = _mm512_permutexvar_ps(pick, da[t]);
                    if per_pair {
                        let off = _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, y[t]);
                        start[t] = _mm512_sub_epi32(_mm512_setzero_si512(), off);
                    }
                }
                for r in 0..R {
                    let blk = w.as_ptr().add(r * stride * nb + b);
                    _mm_prefetch::<_MM_HINT_T0>((blk as *const i8).wrapping_add(ahead));
                    let u = weight_pair(blk, both);
                    let pdw = if per_pair {
                        pair_scales(blk, both, pair_words)
                    } else {
                        _mm512_permutexvar_ps(pick, dw[r])
                    };
                    for t in 0..T {
                        let dot = _mm512_dpbusd_epi32(start[t], u, y[t]);
                        let scale = if T == 1 && !per_pair {
                            pdw
                        } else {
                            _mm512_mul_ps(pdw, pda[t])
                        };
                        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[r][t]);
                    }
                }
                p += 2;
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[r * stride * n_tok + t0 + t] = _mm512_reduce_add_ps(acc[r][t]);
        }
    }
}

/// All rows of `w` (`out.len() / n_tok` of them, `nb` blocks each) against `n_tok` tokens:
/// `out[r * n_tok + t]`, 4 rows at a time from the 4 quarters (see `quarter_tiles`).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn gemm<W: Unsigned32, A: Signed32>(
    w: &[W],
    a: &ActBlocks<A>,
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    let full_toks = n_tok / 4 * 4;
    super::quarter_tiles(out.len() / n_tok, |r, stride, four| {
        let (wr, o) = (&w[r * nb..], &mut out[r * n_tok..]);
        // SAFETY (all calls): the features are enabled here; the tiles' bounds are asserted.
        unsafe {
            if four {
                for t in (0..full_toks).step_by(4) {
                    tile::<W, A, 4, 4>(wr, stride, a, nb, t, n_tok, o);
                }
                for t in full_toks..n_tok {
                    tile::<W, A, 4, 1>(wr, stride, a, nb, t, n_tok, o);
                }
            } else {
                for t in (0..full_toks).step_by(4) {
                    tile::<W, A, 1, 4>(wr, 0, a, nb, t, n_tok, o);
                }
                for t in full_toks..n_tok {
                    tile::<W, A, 1, 1>(wr, 0, a, nb, t, n_tok, o);
                }
            }
        }
    });
}
