//! Decoding Q4_0, IQ4_NL, Q4_1 and Q5_0 rows grouped eight at a time ([`Nibbles8`],
//! [`NibblesMin8`], [`NibblesQh8`], made at load by `QMatrix::interleave`): each block
//! column of a group is the eight rows' scales (one 16-byte load, converted once for all
//! eight) followed by their nibbles, so one 64-byte load (AVX-512) or 32-byte load (AVX2)
//! brings four or two rows' values. The file's layout instead takes a load, an insert and a
//! scale pick per row and block (`vnni`, `avx2_tiles`). ggml-cpu's `repack.cpp` interleaves
//! Q4_0/IQ4_NL rows the same way.
//!
//! Weights are unsigned bytes `u` (Q4_0: the nibble `q`, value `q − 8`; IQ4_NL at AVX-512:
//! its table plus 128), so a product is `d·da·Σ u·a − offset·d·s` with `s = da·Σa` the
//! activation block's sum (Q4_1: `+ m·s`, its eight mins loaded and converted like the
//! scales; Q5_0: each value's fifth bit added as 16 under a byte mask, and its offset 16
//! taken off in integers, the dots starting from `−16·Σa`): the integer sums go four rows
//! to a 512-bit vector (four lanes per row), the offset term eight rows to a 256-bit one.
//! IQ4_NL at AVX2 multiplies its signed table values directly: `maddubs` takes `|a|`
//! (once per token and block, for all eight rows) against `w` with `a`'s sign.
//!
//! Q4_K rows grouped the same way ([`crate::blocks::Q4K8`]) keep the file's 16-byte runs of
//! nibbles, four rows to a 64-byte load, with every row's six-bit scales and mins unpacked
//! to bytes at load. A sub-block's sums (unsigned nibbles against Q8_K's signed bytes) are
//! scaled in integers, and the mins come off with the activations' 16-value sums, eight
//! rows at once. Q5_K groups ([`crate::blocks::Q5K8`]) are Q4_K's plus each row's fifth
//! bits in the file's bytes, 16 per run half, so the 64-byte load of four rows' runs has a
//! 64-byte load of their fifth bits beside it; a shift and a mask make them 16 in the
//! values (llama.cpp's AVX2 Q5_K does the same per row).
//!
//! IQ4_XS rows grouped the same way ([`IQ4XS8`]) keep the file's 16-byte runs, two rows to
//! a 32-byte load (four to 64 bytes at AVX-512), with the scales unpacked to signed bytes at
//! load. At AVX2 the table values multiply the activations with `maddubs`' sign trick, as
//! IQ4_NL's do; AVX-512 has no byte sign instruction, so there they carry 128 into
//! `vpdpbusd` and each sub-block's sums start from `−128·Σa`. (Until 2026-12-07 AVX-512 kept
//! the file's rows on the `kquant` tiles, measured near Q4_0's speed per byte on Zen 5; on
//! the Xeon family 6 model 207 they ran at 0.66 of it, the groups at 0.97–1.0.)
//!
//! Q3_K rows grouped the same way ([`Q3K8`], the file's 880 bytes per eight rows reordered)
//! keep the file's 16-byte runs of 2-bit values and of high bits, four rows to a 64-byte
//! load (two to 32 bytes at AVX2); four rows' packed scales are unpacked once per
//! super-block, one row per 128-bit lane, and a byte shuffle puts a sub-block's scale
//! times 256 in each i16 lane for `vpdpwssd` (`vpmaddwd` at AVX2).
//!
//! Q2_K rows ([`Q2K8`]) are grouped as Q3_K's without the high bits, and decoded by the
//! same tiles ([`TwoBitGroup`]); each row's 16 scale bytes are the file's, four rows to a
//! 64-byte load (one row per 128-bit lane), so the scale nibbles go to `vpdpwssd` as Q3_K's
//! do and the min nibbles meet the activations' 16-value sums once per super-block. (Until 2026-12-07 Q2_K decoded on the `kquant` tiles
//! at AVX-512 and per row at AVX2, at 0.35–0.45 of Q4_0's speed per byte on the Xeon family
//! 6 model 207.)
//!
//! Each token's arithmetic is the same whichever tokens it is decoded with, so a batch of
//! sequences gets, bit for bit, what each would alone.

use super::avx2::prefetch;
use super::encoder_vnni::dpwssd;
use super::vnni::Signed32;
use crate::blocks::{
    BlockQ8K, KGroup, Nibbles8, NibblesMin8, NibblesQh8, IQ4XS8, KVALUES_IQ4NL, Q2K8, Q3K8,
};
use crate::ActBlocks;
use half::f16;
use std::arch::x86_64::*;

/// A group of eight rows' 32-value blocks of nibbles: Q4_0 and IQ4_NL ([`Nibbles8`]), Q4_1
/// ([`NibblesMin8`], whose rows also carry a min, added as `m·s`), Q5_0 ([`NibblesQh8`],
/// whose rows also carry their values' fifth bits).
pub trait NibbleGroup: Copy {
    /// The rows' scales.
    fn d(&self) -> &[f16; 8];
    /// The rows' 16 bytes of nibbles.
    fn qs(&self) -> &[[u8; 16]; 8];
    /// The rows' mins (Q4_1), else `None`.
    #[inline(always)]
    fn m(&self) -> Option<&[f16; 8]> {
        None
    }
    /// The rows' fifth bits (Q5_0: bit `j` of value `j`, values `q − 16`), else `None`.
    #[inline(always)]
    fn qh(&self) -> Option<&[[u8; 4]; 8]> {
        None
    }
}

/// The two parts every group type has.
macro_rules! scales_and_nibbles {
    () => {
        #[inline(always)]
        fn d(&self) -> &[f16; 8] {
            &self.d
        }
        #[inline(always)]
        fn qs(&self) -> &[[u8; 16]; 8] {
            &self.qs
        }
    };
}

impl NibbleGroup for Nibbles8 {
    scales_and_nibbles!();
}

impl NibbleGroup for NibblesMin8 {
    scales_and_nibbles!();
    #[inline(always)]
    fn m(&self) -> Option<&[f16; 8]> {
        Some(&self.m)
    }
}

impl NibbleGroup for NibblesQh8 {
    scales_and_nibbles!();
    #[inline(always)]
    fn qh(&self) -> Option<&[[u8; 4]; 8]> {
        Some(&self.qh)
    }
}

/// Rows `4h .. 4h + 4` of `qh` as the masks of their low values (bits 0..16 of each row,
/// one row per 16 mask bits, as the rows' bytes lie in a 64-byte load) and high values
/// (bits 16..32).
#[inline(always)]
fn fifth_bit_masks(qh: &[[u8; 4]; 8], h: usize) -> (u64, u64) {
    let (mut lo, mut hi) = (0u64, 0u64);
    for i in 0..4 {
        let q = u32::from_le_bytes(qh[4 * h + i]) as u64;
        lo |= (q & 0xFFFF) << (16 * i);
        hi |= (q >> 16) << (16 * i);
    }
    (lo, hi)
}

/// How many blocks ahead in a group's column the loop prefetches (a group's blocks are one
/// sequential stream: 2.3 KB ahead, 2.5 KB for Q4_1).
const PREFETCH_BLOCKS: usize = 16;

/// Checks the shapes every kernel here relies on: whole groups of `nb` blocks, `n_tok`
/// tokens of `nb` activation blocks each, and room for `8 · groups · n_tok` results.
fn check<G, A>(w: &[G], a: &ActBlocks<A>, nb: usize, n_tok: usize, out: &[f32]) {
    assert!(nb > 0 && w.len().is_multiple_of(nb));
    assert!(out.len() >= w.len() / nb * 8 * n_tok);
    let acts = n_tok * nb;
    assert!(a.blocks.len() >= acts && a.d.len() >= acts && a.s.len() >= acts);
}

/// `tile(group, t0, n, out)` for each group of `nb` blocks in `w` and each run of at most
/// `tokens` tokens `t0 .. t0 + n`, `out` the group's `8 · n_tok` results.
fn by_group<G>(
    w: &[G],
    nb: usize,
    n_tok: usize,
    tokens: usize,
    out: &mut [f32],
    mut tile: impl FnMut(&[G], usize, usize, &mut [f32]),
) {
    if n_tok == 0 {
        return;
    }
    for (group, out) in w.chunks_exact(nb).zip(out.chunks_exact_mut(8 * n_tok)) {
        let mut t0 = 0;
        while t0 < n_tok {
            let n = (n_tok - t0).min(tokens);
            tile(group, t0, n, out);
            t0 += n;
        }
    }
}

/// The rows of groups `w` (`nb` blocks per row) × `n_tok` tokens at AVX-512 VNNI:
/// `out[r * n_tok + t]`. `NL`: IQ4_NL (else Q4_0, or Q4_1 for [`NibblesMin8`] against
/// Q8_1).
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn gemm_avx512<const NL: bool, G: NibbleGroup, A: Signed32>(
    w: &[G],
    a: &ActBlocks<A>,
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    check(w, a, nb, n_tok, out);
    by_group(w, nb, n_tok, 4, out, |group, t0, n, out| {
        // SAFETY: our caller vouches for the features; `check` bounds every index below.
        unsafe {
            match n {
                1 => tile512::<NL, 1, G, A>(group, a, nb, t0, n_tok, out),
                2 => tile512::<NL, 2, G, A>(group, a, nb, t0, n_tok, out),
                3 => tile512::<NL, 3, G, A>(group, a, nb, t0, n_tok, out),
                _ => tile512::<NL, 4, G, A>(group, a, nb, t0, n_tok, out),
            }
        }
    });
}

/// One group × tokens `t0 .. t0 + T`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile512<const NL: bool, const T: usize, G: NibbleGroup, A: Signed32>(
    group: &[G],
    a: &ActBlocks<A>,
    nb: usize,
    t0: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(group.len() == nb && out.len() == 8 * n_tok && t0 + T <= n_tok);
    let offset = if NL { -128.0f32 } else { -8.0 };
    let mut acc = [[_mm512_setzero_ps(); 2]; T];
    let mut acc_offset = [_mm256_setzero_ps(); T];
    let low4 = _mm512_set1_epi8(0x0F);
    // IQ4_NL's table plus 128 (unsigned) in every 128-bit lane.
    // SAFETY: reads the table's 16 bytes.
    let table = unsafe { _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i) };
    let table = _mm512_xor_si512(
        _mm512_broadcast_i32x4(table),
        _mm512_set1_epi8(0x80u8 as i8),
    );
    // Lane `4i + j` of a dot vector belongs to its `i`-th row: rows 0..4, then 4..8.
    let rows_lo = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    let rows_hi = _mm512_add_epi32(rows_lo, _mm512_set1_epi32(4));
    for b in 0..nb {
        // SAFETY (block): `b < nb == group.len()`, and `check` keeps `(t0 + t) * nb + b`
        // inside the activations; the prefetch only hints.
        unsafe {
            let blk = group.as_ptr().add(b);
            let ahead = blk.wrapping_add(PREFETCH_BLOCKS) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128));
            let d8 = _mm256_cvtph_ps(_mm_loadu_si128((*blk).d().as_ptr() as *const __m128i));
            // The per-row term of `s`: Q4_1's `m`, else the offset times `d` (Q5_0: none,
            // its offset comes off in integers below).
            let (offset8, offset) = match ((*blk).m(), (*blk).qh()) {
                (Some(m), _) => (
                    _mm256_cvtph_ps(_mm_loadu_si128(m.as_ptr() as *const __m128i)),
                    1.0,
                ),
                (None, Some(_)) => (d8, 0.0),
                (None, None) => (d8, offset),
            };
            let qs = (*blk).qs().as_ptr() as *const u8;
            let v0 = _mm512_loadu_si512(qs as *const _);
            let v1 = _mm512_loadu_si512(qs.add(64) as *const _);
            let mut lo0 = _mm512_and_si512(v0, low4);
            let mut hi0 = _mm512_and_si512(_mm512_srli_epi16::<4>(v0), low4);
            let mut lo1 = _mm512_and_si512(v1, low4);
            let mut hi1 = _mm512_and_si512(_mm512_srli_epi16::<4>(v1), low4);
            if NL {
                lo0 = _mm512_shuffle_epi8(table, lo0);
                hi0 = _mm512_shuffle_epi8(table, hi0);
                lo1 = _mm512_shuffle_epi8(table, lo1);
                hi1 = _mm512_shuffle_epi8(table, hi1);
            }
            if let Some(qh) = (*blk).qh() {
                // Q5_0: 16 added where a value's fifth bit is set (the nibble is below 16).
                let bit4 = _mm512_set1_epi8(0x10);
                let ((l0, h0), (l1, h1)) = (fifth_bit_masks(qh, 0), fifth_bit_masks(qh, 1));
                lo0 = _mm512_mask_add_epi8(lo0, l0, lo0, bit4);
                hi0 = _mm512_mask_add_epi8(hi0, h0, hi0, bit4);
                lo1 = _mm512_mask_add_epi8(lo1, l1, lo1, bit4);
                hi1 = _mm512_mask_add_epi8(hi1, h1, hi1, bit4);
            }
            for t in 0..T {
                let i = (t0 + t) * nb + b;
                let qa = (*a.blocks.as_ptr().add(i)).qs().as_ptr();
                let alo = _mm512_broadcast_i32x4(_mm_loadu_si128(qa as *const __m128i));
                let ahi = _mm512_broadcast_i32x4(_mm_loadu_si128(qa.add(16) as *const __m128i));
                let zero = _mm512_setzero_si512();
                // Q5_0: the dots start from `−16·Σa` (the same in every row's lanes), so
                // `Σ (u − 16)·a` is exact in integers, as llama.cpp computes it (an f32
                // offset term would cancel against the sum and round).
                let start = if (*blk).qh().is_some() {
                    let sixteen = _mm512_set1_epi8(16);
                    let sa =
                        _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, sixteen, alo), sixteen, ahi);
                    _mm512_sub_epi32(zero, sa)
                } else {
                    zero
                };
                let dot0 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, lo0, alo), hi0, ahi);
                let dot1 = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, lo1, alo), hi1, ahi);
                let scale =
                    _mm512_castps256_ps512(_mm256_mul_ps(d8, _mm256_set1_ps(*a.d.as_ptr().add(i))));
                let s0 = _mm512_permutexvar_ps(rows_lo, scale);
                let s1 = _mm512_permutexvar_ps(rows_hi, scale);
                acc[t][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot0), s0, acc[t][0]);
                acc[t][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot1), s1, acc[t][1]);
                if offset != 0.0 {
                    let sum = _mm256_set1_ps(offset * *a.s.as_ptr().add(i));
                    acc_offset[t] = _mm256_fmadd_ps(offset8, sum, acc_offset[t]);
                }
            }
        }
    }
    for t in 0..T {
        let [a, b] = acc[t];
        let halves = [
            _mm512_castps512_ps256(a),
            upper_half(a),
            _mm512_castps512_ps256(b),
            upper_half(b),
        ];
        store_rows(halves, acc_offset[t], out, n_tok, t0 + t);
    }
}

/// Token `t`'s results of a group: `acc[k]` holds rows `2k` (lanes 0..4) and `2k + 1`
/// (4..8); row `r`'s result is `(l0 + l1) + (l2 + l3)` of its lanes plus lane `r` of
/// `offsets`, into `out[r * n_tok + t]` (the sums in that order at every level and batch).
#[target_feature(enable = "avx")]
#[inline]
fn store_rows(acc: [__m256; 4], offsets: __m256, out: &mut [f32], n_tok: usize, t: usize) {
    // [r0 r0 r2 r2 | r1 r1 r3 r3] pair sums, then [r0 r2 r4 r6 | r1 r3 r5 r7] whole ones.
    let pairs01 = _mm256_hadd_ps(acc[0], acc[1]);
    let pairs23 = _mm256_hadd_ps(acc[2], acc[3]);
    let rows = _mm256_hadd_ps(pairs01, pairs23);
    let mut sums = [0f32; 8];
    // SAFETY: the store writes exactly the 8 floats of the array.
    unsafe {
        _mm256_storeu_ps(
            sums.as_mut_ptr(),
            _mm256_add_ps(rows, offsets_interleaved(offsets)),
        )
    };
    for (i, sum) in sums.into_iter().enumerate() {
        // Lane i holds row 2·(i % 4) + i / 4.
        out[(2 * (i % 4) + i / 4) * n_tok + t] = sum;
    }
}

/// Lanes 8..16 of `v` (AVX-512 F; `vextractf32x8` would need DQ).
#[target_feature(enable = "avx512f")]
#[inline]
fn upper_half(v: __m512) -> __m256 {
    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
}

/// `offsets` (lane `r`: row `r`) in `store_rows`' order of rows.
#[target_feature(enable = "avx")]
#[inline]
fn offsets_interleaved(offsets: __m256) -> __m256 {
    let lo = _mm256_castps256_ps128(offsets);
    let hi = _mm256_extractf128_ps::<1>(offsets);
    // [o0 o2 o4 o6 | o1 o3 o5 o7]
    let even = _mm_shuffle_ps::<0b10_00_10_00>(lo, hi);
    let odd = _mm_shuffle_ps::<0b11_01_11_01>(lo, hi);
    _mm256_set_m128(odd, even)
}

/// 0x10 in byte `j` of the result where bit `j` of `m` is set, else 0.
#[target_feature(enable = "avx2")]
#[inline]
fn fifth_bits_256(m: u32) -> __m256i {
    // Byte j takes byte j / 8 of `m`, then its bit j % 8.
    let spread = _mm256_setr_epi8(
        0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3,
        3, 3,
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let v = _mm256_shuffle_epi8(_mm256_set1_epi32(m as i32), spread);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// [`gemm_avx512`] at AVX2.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_avx2<const NL: bool, G: NibbleGroup, A: Signed32>(
    w: &[G],
    a: &ActBlocks<A>,
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    check(w, a, nb, n_tok, out);
    by_group(w, nb, n_tok, 2, out, |group, t0, n, out| {
        // SAFETY: our caller vouches for the features; `check` bounds every index below.
        unsafe {
            match n {
                1 => tile256::<NL, 1, G, A>(group, a, nb, t0, n_tok, out),
                _ => tile256::<NL, 2, G, A>(group, a, nb, t0, n_tok, out),
            }
        }
    });
}

/// One group × tokens `t0 .. t0 + T` (AVX2: two rows per 256-bit vector, four lanes each).
// `k` picks a pair of rows in the weights, their scales and every token's accumulators.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile256<const NL: bool, const T: usize, G: NibbleGroup, A: Signed32>(
    group: &[G],
    a: &ActBlocks<A>,
    nb: usize,
    t0: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(group.len() == nb && out.len() == 8 * n_tok && t0 + T <= n_tok);
    let mut acc = [[_mm256_setzero_ps(); 4]; T];
    let mut acc_offset = [_mm256_setzero_ps(); T];
    let low4 = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    // SAFETY: reads the table's 16 bytes.
    let table = unsafe { _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i) };
    let table = _mm256_set_m128i(table, table);
    for b in 0..nb {
        // SAFETY (block): as in `tile512`.
        unsafe {
            let blk = group.as_ptr().add(b);
            let ahead = blk.wrapping_add(PREFETCH_BLOCKS) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128));
            let d8 = _mm256_cvtph_ps(_mm_loadu_si128((*blk).d().as_ptr() as *const __m128i));
            let m8 = (*blk)
                .m()
                .map(|m| _mm256_cvtph_ps(_mm_loadu_si128(m.as_ptr() as *const __m128i)));
            let qs = (*blk).qs().as_ptr() as *const u8;
            let mut scale = [_mm256_setzero_ps(); T];
            let mut act = [(_mm256_setzero_si256(), _mm256_setzero_si256()); T];
            let mut act_abs = act;
            // Q5_0: each token's `16·Σa` per lane (the same for both rows of a vector), taken
            // off the dots in integers, exact as llama.cpp's.
            let mut sa16 = [_mm256_setzero_si256(); T];
            for t in 0..T {
                let i = (t0 + t) * nb + b;
                let qa = (*a.blocks.as_ptr().add(i)).qs().as_ptr();
                act[t] = (
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(qa as *const __m128i)),
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(qa.add(16) as *const __m128i)),
                );
                if NL {
                    act_abs[t] = (_mm256_abs_epi8(act[t].0), _mm256_abs_epi8(act[t].1));
                }
                scale[t] = _mm256_mul_ps(d8, _mm256_set1_ps(*a.d.as_ptr().add(i)));
                if (*blk).qh().is_some() {
                    let sixteen = _mm256_set1_epi8(16);
                    let p = _mm256_add_epi16(
                        _mm256_maddubs_epi16(sixteen, act[t].0),
                        _mm256_maddubs_epi16(sixteen, act[t].1),
                    );
                    sa16[t] = _mm256_madd_epi16(p, ones);
                }
                let s = *a.s.as_ptr().add(i);
                match m8 {
                    // Q4_1: `m·s`.
                    Some(m8) => {
                        acc_offset[t] = _mm256_fmadd_ps(m8, _mm256_set1_ps(s), acc_offset[t])
                    }
                    // Q4_0: the offset, `−8·d·s`; Q5_0's comes off in integers below; IQ4_NL's
                    // values are signed (none).
                    None if !NL && (*blk).qh().is_none() => {
                        acc_offset[t] = _mm256_fmadd_ps(d8, _mm256_set1_ps(-8.0 * s), acc_offset[t])
                    }
                    None => {}
                }
            }
            for k in 0..4 {
                // Rows 2k (low 128 bits) and 2k + 1 (high).
                let v = _mm256_loadu_si256(qs.add(32 * k) as *const __m256i);
                let mut lo = _mm256_and_si256(v, low4);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low4);
                if let Some(qh) = (*blk).qh() {
                    // Q5_0: the fifth bits of rows 2k (low 128 bits) and 2k + 1 (high) as
                    // 16 per value.
                    let (q0, q1) = (
                        u32::from_le_bytes(qh[2 * k]),
                        u32::from_le_bytes(qh[2 * k + 1]),
                    );
                    lo = _mm256_or_si256(lo, fifth_bits_256((q0 & 0xFFFF) | (q1 << 16)));
                    hi = _mm256_or_si256(hi, fifth_bits_256((q0 >> 16) | (q1 & 0xFFFF_0000)));
                }
                // IQ4_NL: the signed values (the activations' signs go onto them below).
                if NL {
                    (lo, hi) = (
                        _mm256_shuffle_epi8(table, lo),
                        _mm256_shuffle_epi8(table, hi),
                    );
                }
                let pick = _mm256_setr_epi32(
                    2 * k as i32,
                    2 * k as i32,
                    2 * k as i32,
                    2 * k as i32,
                    2 * k as i32 + 1,
                    2 * k as i32 + 1,
                    2 * k as i32 + 1,
                    2 * k as i32 + 1,
                );
                for t in 0..T {
                    let (alo, ahi) = act[t];
                    let dot = if NL {
                        // The sign trick with the activations' magnitudes as the unsigned
                        // side: they are shared by the eight rows, the weights' would not be.
                        let (ulo, uhi) = act_abs[t];
                        let pl = _mm256_maddubs_epi16(ulo, _mm256_sign_epi8(lo, alo));
                        let ph = _mm256_maddubs_epi16(uhi, _mm256_sign_epi8(hi, ahi));
                        _mm256_add_epi32(_mm256_madd_epi16(pl, ones), _mm256_madd_epi16(ph, ones))
                    } else {
                        // Pairs of at most 31·127 twice, then the halves: no i16 overflow.
                        let p = _mm256_add_epi16(
                            _mm256_maddubs_epi16(lo, alo),
                            _mm256_maddubs_epi16(hi, ahi),
                        );
                        _mm256_sub_epi32(_mm256_madd_epi16(p, ones), sa16[t])
                    };
                    let s = _mm256_permutevar8x32_ps(scale[t], pick);
                    acc[t][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[t][k]);
                }
            }
        }
    }
    for t in 0..T {
        store_rows(acc[t], acc_offset[t], out, n_tok, t0 + t);
    }
}

/// [`check`] for Q4_K, Q5_K and IQ4_XS groups against Q8_K activations.
fn check_k<G>(w: &[G], a: &[BlockQ8K], nb: usize, n_tok: usize, out: &[f32]) {
    assert!(nb > 0 && w.len().is_multiple_of(nb));
    assert!(out.len() >= w.len() / nb * 8 * n_tok && a.len() >= n_tok * nb);
}

/// The activations' 32-value sums of a Q8_K block (one per sub-block, eight i16) in every
/// 128-bit lane of the result's `lanes` (1 or 2 for 128/256 bits: see callers).
#[target_feature(enable = "avx2")]
#[inline]
fn sub_block_sums(y: &BlockQ8K) -> __m128i {
    // SAFETY: two 16-byte loads inside the 32 bytes of `bsums`.
    let (lo, hi) = unsafe {
        let p = y.bsums.as_ptr() as *const __m128i;
        (_mm_loadu_si128(p), _mm_loadu_si128(p.add(1)))
    };
    _mm_hadd_epi16(lo, hi)
}

/// Hints quarter `m` (of four) of the Q4_K/Q5_K group block four ahead of `blk` into cache:
/// a group's blocks are one stream, read 4.7 KB ahead (5.8 KB for Q5_K; two blocks ahead
/// measured slower from memory on Zen 4).
#[inline(always)]
fn prefetch_ahead<G>(blk: &G, m: usize) {
    let quarter = size_of::<G>().div_ceil(4);
    let ahead = (blk as *const G as *const u8).wrapping_add(4 * size_of::<G>() + quarter * m);
    prefetch(ahead, quarter);
}

/// Grouped Q4_K or Q5_K rows `w` (`nb` super-blocks per row) × `n_tok` tokens of Q8_K at
/// AVX-512 VNNI: `out[r * n_tok + t]`.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn gemm_k_avx512<G: KGroup>(
    w: &[G],
    a: &[BlockQ8K],
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    check_k(w, a, nb, n_tok, out);
    by_group(w, nb, n_tok, 4, out, |group, t0, n, out| {
        // SAFETY: our caller vouches for the features; `check_k` bounds the tokens.
        unsafe {
            match n {
                1 => tile512_k::<1, G>(group, a, nb, t0, n_tok, out),
                2 => tile512_k::<2, G>(group, a, nb, t0, n_tok, out),
                3 => tile512_k::<3, G>(group, a, nb, t0, n_tok, out),
                _ => tile512_k::<4, G>(group, a, nb, t0, n_tok, out),
            }
        }
    });
}

/// One Q4_K/Q5_K group × tokens `t0 .. t0 + T`: rows 0..4 in the first vector of each pair,
/// 4..8 in the second, four i32 lanes per row.
#[allow(clippy::needless_range_loop)] // `h` picks a row half in weights, scales and sums
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile512_k<const T: usize, G: KGroup>(
    group: &[G],
    a: &[BlockQ8K],
    nb: usize,
    t0: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(group.len() == nb && out.len() == 8 * n_tok && t0 + T <= n_tok);
    let mut acc = [[_mm512_setzero_ps(); 2]; T];
    let low4 = _mm512_set1_epi8(0x0F);
    // Lane `4i + j` belongs to row `i` of the half; of 16 values (two sub-blocks' eight
    // rows), `rows[s][h]` picks sub-block `s`, half `h`.
    let rows_lo = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    // Arrays are built element by element, not with `array::map`: LLVM left `map` out of
    // line here, passing every vector through memory (8x slower decoding, `perf`).
    let pick = |s: i32, h: i32| _mm512_add_epi32(rows_lo, _mm512_set1_epi32(8 * s + 4 * h));
    let rows = [[pick(0, 0), pick(0, 1)], [pick(1, 0), pick(1, 1)]];
    let bit4 = _mm512_set1_epi8(0x10);
    for b in 0..nb {
        let blk = group[b].low();
        // Q5_K: rows 4h .. 4h + 4's fifth bits of the runs of half `half`.
        let mut qh = [[_mm512_setzero_si512(); 2]; 2];
        if let Some(bits) = group[b].qh() {
            for half in 0..2 {
                for h in 0..2 {
                    // SAFETY: 64 bytes: rows 4h .. 4h + 4 of half `half`.
                    qh[half][h] =
                        unsafe { _mm512_loadu_si512(bits[half][4 * h].as_ptr() as *const _) };
                }
            }
        }
        let mut isum = [[_mm512_setzero_si512(); 2]; T];
        for m in 0..4 {
            prefetch_ahead(&group[b], m);
            // SAFETY: 16 bytes of `scales[2m..2m + 2]`.
            let s16 = _mm512_cvtepu8_epi32(unsafe {
                _mm_loadu_si128(blk.scales[2 * m].as_ptr() as *const __m128i)
            });
            let scale = |i: __m512i| _mm512_permutexvar_epi32(i, s16);
            let sc = [
                [scale(rows[0][0]), scale(rows[0][1])],
                [scale(rows[1][0]), scale(rows[1][1])],
            ];
            let mut lo = [[_mm512_setzero_si512(); 2]; 2];
            let mut hi = lo;
            for half in 0..2 {
                for h in 0..2 {
                    // SAFETY: 64 bytes: rows 4h..4h + 4 of run 2m + half.
                    let v = unsafe {
                        _mm512_loadu_si512(blk.qs[2 * m + half][4 * h].as_ptr() as *const _)
                    };
                    lo[half][h] = _mm512_and_si512(v, low4);
                    hi[half][h] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4);
                    if group[b].qh().is_some() {
                        // Q5_K: bit 2m of a byte of `qh` is 16 in a low value, bit 2m + 1
                        // in a high one (`a | (b & c)`: 0xF8).
                        let bits = _mm512_srl_epi16(qh[half][h], _mm_cvtsi32_si128(2 * m as i32));
                        lo[half][h] = _mm512_ternarylogic_epi32::<0xF8>(
                            lo[half][h],
                            _mm512_slli_epi16::<4>(bits),
                            bit4,
                        );
                        hi[half][h] = _mm512_ternarylogic_epi32::<0xF8>(
                            hi[half][h],
                            _mm512_slli_epi16::<3>(bits),
                            bit4,
                        );
                    }
                }
            }
            for t in 0..T {
                let y = &a[(t0 + t) * nb + b];
                // Values 64m + 16·half .. (sub-block 2m) and 64m + 32 + 16·half .. (2m + 1).
                // SAFETY: 16-byte loads inside the 256 bytes of `qs`.
                let act = |o: usize| unsafe {
                    _mm512_broadcast_i32x4(_mm_loadu_si128(y.qs.as_ptr().add(o) as *const __m128i))
                };
                let (al, ah) = (
                    [act(64 * m), act(64 * m + 16)],
                    [act(64 * m + 32), act(64 * m + 48)],
                );
                let zero = _mm512_setzero_si512();
                for h in 0..2 {
                    let dl = _mm512_dpbusd_epi32(
                        _mm512_dpbusd_epi32(zero, lo[0][h], al[0]),
                        lo[1][h],
                        al[1],
                    );
                    let dh = _mm512_dpbusd_epi32(
                        _mm512_dpbusd_epi32(zero, hi[0][h], ah[0]),
                        hi[1][h],
                        ah[1],
                    );
                    let scaled = _mm512_add_epi32(
                        _mm512_mullo_epi32(dl, sc[0][h]),
                        _mm512_mullo_epi32(dh, sc[1][h]),
                    );
                    isum[t][h] = _mm512_add_epi32(isum[t][h], scaled);
                }
            }
        }
        // SAFETY: 16 bytes of `d`, 16 of `dmin`, 32 of each half's `mins`.
        let (d8, dmin8, mins) = unsafe {
            (
                _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(
                    blk.d.as_ptr() as *const __m128i
                ))),
                _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(
                    blk.dmin.as_ptr() as *const __m128i
                ))),
                [
                    _mm512_cvtepu8_epi16(
                        _mm256_loadu_si256(blk.mins[0].as_ptr() as *const __m256i),
                    ),
                    _mm512_cvtepu8_epi16(
                        _mm256_loadu_si256(blk.mins[4].as_ptr() as *const __m256i),
                    ),
                ],
            )
        };
        for t in 0..T {
            let y = &a[(t0 + t) * nb + b];
            let sums = _mm512_broadcast_i32x4(sub_block_sums(y));
            let dy = _mm512_set1_ps(y.d);
            for h in 0..2 {
                // Lane 4i + k: row i's mins of sub-blocks 2k, 2k + 1 times their sums.
                let msum = _mm512_madd_epi16(mins[h], sums);
                let d = _mm512_mul_ps(_mm512_permutexvar_ps(rows[0][h], d8), dy);
                let dmin = _mm512_mul_ps(_mm512_permutexvar_ps(rows[0][h], dmin8), dy);
                acc[t][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t][h]), d, acc[t][h]);
                acc[t][h] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum), dmin, acc[t][h]);
            }
        }
    }
    for t in 0..T {
        let [a, b] = acc[t];
        let halves = [
            _mm512_castps512_ps256(a),
            upper_half(a),
            _mm512_castps512_ps256(b),
            upper_half(b),
        ];
        store_rows(halves, _mm256_setzero_ps(), out, n_tok, t0 + t);
    }
}

/// [`gemm_k_avx512`] at AVX2.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_k_avx2<G: KGroup>(
    w: &[G],
    a: &[BlockQ8K],
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    check_k(w, a, nb, n_tok, out);
    by_group(w, nb, n_tok, 2, out, |group, t0, n, out| {
        // SAFETY: our caller vouches for the features; `check_k` bounds the tokens.
        unsafe {
            match n {
                1 => tile256_k::<1, G>(group, a, nb, t0, n_tok, out),
                _ => tile256_k::<2, G>(group, a, nb, t0, n_tok, out),
            }
        }
    });
}

/// Byte shuffle spreading, from 16 scale bytes (sub-block `2m` rows 0..8, then `2m + 1`),
/// sub-block `2m + s`'s scale of row `2k` over the first 128-bit lane's i16 and of row
/// `2k + 1` over the second's.
const fn pair_scales(s: u8, k: u8) -> [u8; 32] {
    let mut c = [0x80u8; 32];
    let mut i = 0;
    while i < 32 {
        c[i] = 8 * s + 2 * k + (i / 16) as u8;
        i += 2;
    }
    c
}

/// One Q4_K/Q5_K group × tokens `t0 .. t0 + T` at AVX2: rows `2k`, `2k + 1` in vector `k`,
/// four i32 lanes per row.
#[allow(clippy::needless_range_loop)] // `k` picks a row pair in weights, scales and sums
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile256_k<const T: usize, G: KGroup>(
    group: &[G],
    a: &[BlockQ8K],
    nb: usize,
    t0: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(group.len() == nb && out.len() == 8 * n_tok && t0 + T <= n_tok);
    const PAIRS: [[[u8; 32]; 4]; 2] = [
        [
            pair_scales(0, 0),
            pair_scales(0, 1),
            pair_scales(0, 2),
            pair_scales(0, 3),
        ],
        [
            pair_scales(1, 0),
            pair_scales(1, 1),
            pair_scales(1, 2),
            pair_scales(1, 3),
        ],
    ];
    // Arrays element by element, not with `array::map` (see `tile512_k`).
    let mut pairs = [[_mm256_setzero_si256(); 4]; 2];
    for s in 0..2 {
        for k in 0..4 {
            // SAFETY: 32-byte loads of the shuffle patterns.
            pairs[s][k] = unsafe { _mm256_loadu_si256(PAIRS[s][k].as_ptr() as *const __m256i) };
        }
    }
    let mut acc = [[_mm256_setzero_ps(); 4]; T];
    let low4 = _mm256_set1_epi8(0x0F);
    let bit4 = _mm256_set1_epi8(0x10);
    for b in 0..nb {
        let blk = group[b].low();
        let mut isum = [[_mm256_setzero_si256(); 4]; T];
        for m in 0..4 {
            prefetch_ahead(&group[b], m);
            // SAFETY: 16 bytes of `scales[2m..2m + 2]`.
            let s16 = _mm256_broadcastsi128_si256(unsafe {
                _mm_loadu_si128(blk.scales[2 * m].as_ptr() as *const __m128i)
            });
            for k in 0..4 {
                let sc = [
                    _mm256_shuffle_epi8(s16, pairs[0][k]),
                    _mm256_shuffle_epi8(s16, pairs[1][k]),
                ];
                // SAFETY: 32 bytes: rows 2k, 2k + 1 of run 2m + half.
                let run = |half: usize| unsafe {
                    _mm256_loadu_si256(blk.qs[2 * m + half][2 * k].as_ptr() as *const __m256i)
                };
                let v = [run(0), run(1)];
                let mut lo = [_mm256_and_si256(v[0], low4), _mm256_and_si256(v[1], low4)];
                let mut hi = [
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v[0]), low4),
                    _mm256_and_si256(_mm256_srli_epi16::<4>(v[1]), low4),
                ];
                if let Some(bits) = group[b].qh() {
                    // Q5_K: bit 2m of a byte of `qh` is 16 in a low value, bit 2m + 1 in a
                    // high one.
                    let count = _mm_cvtsi32_si128(2 * m as i32);
                    for half in 0..2 {
                        // SAFETY: 32 bytes: rows 2k, 2k + 1 of half `half`.
                        let q = unsafe {
                            _mm256_loadu_si256(bits[half][2 * k].as_ptr() as *const __m256i)
                        };
                        let q = _mm256_srl_epi16(q, count);
                        let (l, h) = (_mm256_slli_epi16::<4>(q), _mm256_slli_epi16::<3>(q));
                        lo[half] = _mm256_or_si256(lo[half], _mm256_and_si256(l, bit4));
                        hi[half] = _mm256_or_si256(hi[half], _mm256_and_si256(h, bit4));
                    }
                }
                for t in 0..T {
                    let y = &a[(t0 + t) * nb + b];
                    // SAFETY: 16-byte loads inside the 256 bytes of `qs`.
                    let act = |o: usize| unsafe {
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(
                            y.qs.as_ptr().add(o) as *const __m128i
                        ))
                    };
                    // At most 2 · 2 · 31 · 128 per i16: no saturation.
                    let pl = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo[0], act(64 * m)),
                        _mm256_maddubs_epi16(lo[1], act(64 * m + 16)),
                    );
                    let ph = _mm256_add_epi16(
                        _mm256_maddubs_epi16(hi[0], act(64 * m + 32)),
                        _mm256_maddubs_epi16(hi[1], act(64 * m + 48)),
                    );
                    let scaled = _mm256_add_epi32(
                        _mm256_madd_epi16(pl, sc[0]),
                        _mm256_madd_epi16(ph, sc[1]),
                    );
                    isum[t][k] = _mm256_add_epi32(isum[t][k], scaled);
                }
            }
        }
        // SAFETY: 16 bytes of `d` and of `dmin`.
        let (d8, dmin8) = unsafe {
            (
                _mm256_cvtph_ps(_mm_loadu_si128(blk.d.as_ptr() as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(blk.dmin.as_ptr() as *const __m128i)),
            )
        };
        for t in 0..T {
            let y = &a[(t0 + t) * nb + b];
            let sums = _mm256_broadcastsi128_si256(sub_block_sums(y));
            let dy = _mm256_set1_ps(y.d);
            for k in 0..4 {
                let i = 2 * k as i32;
                let pick = _mm256_setr_epi32(i, i, i, i, i + 1, i + 1, i + 1, i + 1);
                // SAFETY: 16 bytes: rows 2k, 2k + 1 of `mins`.
                let mins = _mm256_cvtepu8_epi16(unsafe {
                    _mm_loadu_si128(blk.mins[2 * k].as_ptr() as *const __m128i)
                });
                let msum = _mm256_madd_epi16(mins, sums);
                let d = _mm256_mul_ps(_mm256_permutevar8x32_ps(d8, pick), dy);
                let dmin = _mm256_mul_ps(_mm256_permutevar8x32_ps(dmin8, pick), dy);
                acc[t][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t][k]), d, acc[t][k]);
                acc[t][k] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(msum), dmin, acc[t][k]);
            }
        }
    }
    for t in 0..T {
        store_rows(acc[t], _mm256_setzero_ps(), out, n_tok, t0 + t);
    }
}

/// IQ4_XS groups `w` (`nb` super-blocks per row) × `n_tok` tokens of Q8_K at AVX2:
/// `out[r * n_tok + t]`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_iq4xs_avx2(
    w: &[IQ4XS8],
    a: &[BlockQ8K],
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    check_k(w, a, nb, n_tok, out);
    by_group(w, nb, n_tok, 2, out, |group, t0, n, out| {
        // SAFETY: our caller vouches for the features; `check_k` bounds the tokens.
        unsafe {
            match n {
                1 => tile256_iq4xs::<1>(group, a, nb, t0, n_tok, out),
                _ => tile256_iq4xs::<2>(group, a, nb, t0, n_tok, out),
            }
        }
    });
}

/// Byte shuffle spreading, from eight i16 scales (row `r` in bytes `2r`, `2r + 1`), row
/// `2k`'s over the first 128-bit lane and row `2k + 1`'s over the second.
const fn row_pair_i16(k: u8) -> [u8; 32] {
    let mut c = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        c[i] = 4 * k + 2 * (i / 16) as u8 + (i % 2) as u8;
        i += 1;
    }
    c
}

/// One IQ4_XS group × tokens `t0 .. t0 + T` at AVX2: rows `2k`, `2k + 1` in vector `k`,
/// four i32 lanes per row.
#[allow(clippy::needless_range_loop)] // `k` picks a row pair in weights, scales and sums
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile256_iq4xs<const T: usize>(
    group: &[IQ4XS8],
    a: &[BlockQ8K],
    nb: usize,
    t0: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(group.len() == nb && out.len() == 8 * n_tok && t0 + T <= n_tok);
    const PAIRS: [[u8; 32]; 4] = [
        row_pair_i16(0),
        row_pair_i16(1),
        row_pair_i16(2),
        row_pair_i16(3),
    ];
    // Arrays element by element, not with `array::map` (see `tile512_k`).
    let mut pairs = [_mm256_setzero_si256(); 4];
    for k in 0..4 {
        // SAFETY: 32-byte loads of the shuffle patterns.
        pairs[k] = unsafe { _mm256_loadu_si256(PAIRS[k].as_ptr() as *const __m256i) };
    }
    // SAFETY: reads the table's 16 bytes.
    let table = unsafe { _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i) };
    let table = _mm256_set_m128i(table, table);
    let low4 = _mm256_set1_epi8(0x0F);
    let mut acc = [[_mm256_setzero_ps(); 4]; T];
    for b in 0..nb {
        let blk = &group[b];
        let mut isum = [[_mm256_setzero_si256(); 4]; T];
        for j in 0..8 {
            if j % 2 == 0 {
                prefetch_ahead(blk, j / 2);
            }
            // SAFETY: 8 bytes of `scales[j]`.
            let s16 = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(unsafe {
                _mm_loadl_epi64(blk.scales[j].as_ptr() as *const __m128i)
            }));
            let mut act = [(_mm256_setzero_si256(), _mm256_setzero_si256()); T];
            let mut act_abs = act;
            for t in 0..T {
                let y = &a[(t0 + t) * nb + b];
                // SAFETY: 16-byte loads inside the 256 bytes of `qs`.
                act[t] = unsafe {
                    let q = y.qs.as_ptr().add(32 * j);
                    (
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(q as *const __m128i)),
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(q.add(16) as *const __m128i)),
                    )
                };
                act_abs[t] = (_mm256_abs_epi8(act[t].0), _mm256_abs_epi8(act[t].1));
            }
            for k in 0..4 {
                let sc = _mm256_shuffle_epi8(s16, pairs[k]);
                // SAFETY: 32 bytes: rows 2k, 2k + 1 of sub-block j.
                let v = unsafe { _mm256_loadu_si256(blk.qs[j][2 * k].as_ptr() as *const __m256i) };
                let wl = _mm256_shuffle_epi8(table, _mm256_and_si256(v, low4));
                let wh =
                    _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16::<4>(v), low4));
                for t in 0..T {
                    let ((al, ah), (ul, uh)) = (act[t], act_abs[t]);
                    // The sign trick with the activations' magnitudes as the unsigned side
                    // (shared by the eight rows). |w·a| pairs stay below 2·128·127 < 2¹⁵;
                    // the halves are scaled apart.
                    let pl = _mm256_maddubs_epi16(ul, _mm256_sign_epi8(wl, al));
                    let ph = _mm256_maddubs_epi16(uh, _mm256_sign_epi8(wh, ah));
                    let scaled =
                        _mm256_add_epi32(_mm256_madd_epi16(pl, sc), _mm256_madd_epi16(ph, sc));
                    isum[t][k] = _mm256_add_epi32(isum[t][k], scaled);
                }
            }
        }
        // SAFETY: 16 bytes of `d`.
        let d8 = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(blk.d.as_ptr() as *const __m128i) });
        for t in 0..T {
            let dy = _mm256_set1_ps(a[(t0 + t) * nb + b].d);
            for k in 0..4 {
                let i = 2 * k as i32;
                let pick = _mm256_setr_epi32(i, i, i, i, i + 1, i + 1, i + 1, i + 1);
                let d = _mm256_mul_ps(_mm256_permutevar8x32_ps(d8, pick), dy);
                acc[t][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t][k]), d, acc[t][k]);
            }
        }
    }
    for t in 0..T {
        store_rows(acc[t], _mm256_setzero_ps(), out, n_tok, t0 + t);
    }
}

/// [`gemm_iq4xs_avx2`] at AVX-512 VNNI.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn gemm_iq4xs_avx512(
    w: &[IQ4XS8],
    a: &[BlockQ8K],
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    check_k(w, a, nb, n_tok, out);
    by_group(w, nb, n_tok, 4, out, |group, t0, n, out| {
        // SAFETY: our caller vouches for the features; `check_k` bounds the tokens.
        unsafe {
            match n {
                1 => tile512_iq4xs::<1>(group, a, nb, t0, n_tok, out),
                2 => tile512_iq4xs::<2>(group, a, nb, t0, n_tok, out),
                3 => tile512_iq4xs::<3>(group, a, nb, t0, n_tok, out),
                _ => tile512_iq4xs::<4>(group, a, nb, t0, n_tok, out),
            }
        }
    });
}

/// One IQ4_XS group × tokens `t0 .. t0 + T` at AVX-512: rows `4h .. 4h + 4` in vector `h`,
/// one row per 128-bit lane (four i32 lanes per row). AVX-512 has no `vpsignb` for the AVX2
/// sign trick, so the table values carry 128 (unsigned, 1..=241) into `vpdpbusd`, whose
/// sums start from `−32 · Σa` in each of a row's four lanes (`−128 · Σa` in all); each
/// sub-block's sum is scaled by its integer scale in `vpmulld`.
#[allow(clippy::needless_range_loop)] // `h` picks a row half in weights, scales and sums
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile512_iq4xs<const T: usize>(
    group: &[IQ4XS8],
    a: &[BlockQ8K],
    nb: usize,
    t0: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(group.len() == nb && out.len() == 8 * n_tok && t0 + T <= n_tok);
    // SAFETY: reads the table's 16 bytes.
    let table = _mm512_broadcast_i32x4(unsafe {
        _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i)
    });
    // The table's signed values plus 128, as unsigned bytes.
    let table = _mm512_xor_si512(table, _mm512_set1_epi8(0x80u8 as i8));
    let low4 = _mm512_set1_epi8(0x0F);
    let rows_lo = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    let rows = [rows_lo, _mm512_add_epi32(rows_lo, _mm512_set1_epi32(4))];
    let mut acc = [[_mm512_setzero_ps(); 2]; T];
    for b in 0..nb {
        let blk = &group[b];
        // Per token, each sub-block's `−32 · Σa` (i32, lane j: sub-block j).
        let mut offsets = [_mm512_setzero_si512(); T];
        for t in 0..T {
            let sums = _mm256_cvtepi16_epi32(sub_block_sums(&a[(t0 + t) * nb + b]));
            let minus = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<5>(sums));
            offsets[t] = _mm512_castsi256_si512(minus);
        }
        let mut isum = [[_mm512_setzero_si512(); 2]; T];
        for j in 0..8 {
            if j % 2 == 0 {
                prefetch_ahead(blk, j / 2);
            }
            // SAFETY: 8 bytes of `scales[j]`.
            let s8 = _mm512_castsi256_si512(_mm256_cvtepi8_epi32(unsafe {
                _mm_loadl_epi64(blk.scales[j].as_ptr() as *const __m128i)
            }));
            let sc = [
                _mm512_permutexvar_epi32(rows[0], s8),
                _mm512_permutexvar_epi32(rows[1], s8),
            ];
            let mut wl = [_mm512_setzero_si512(); 2];
            let mut wh = wl;
            for h in 0..2 {
                // SAFETY: 64 bytes: rows 4h .. 4h + 4 of sub-block j.
                let v = unsafe { _mm512_loadu_si512(blk.qs[j][4 * h].as_ptr() as *const _) };
                wl[h] = _mm512_shuffle_epi8(table, _mm512_and_si512(v, low4));
                wh[h] =
                    _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4));
            }
            for t in 0..T {
                let y = &a[(t0 + t) * nb + b];
                // SAFETY: 16-byte loads inside the 256 bytes of `qs`.
                let (al, ah) = unsafe {
                    let q = y.qs.as_ptr().add(32 * j);
                    (
                        _mm512_broadcast_i32x4(_mm_loadu_si128(q as *const __m128i)),
                        _mm512_broadcast_i32x4(_mm_loadu_si128(q.add(16) as *const __m128i)),
                    )
                };
                let start = _mm512_permutexvar_epi32(_mm512_set1_epi32(j as i32), offsets[t]);
                for h in 0..2 {
                    let dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, wl[h], al), wh[h], ah);
                    isum[t][h] = _mm512_add_epi32(isum[t][h], _mm512_mullo_epi32(dot, sc[h]));
                }
            }
        }
        // SAFETY: 16 bytes of `d`.
        let d8 = _mm512_castps256_ps512(_mm256_cvtph_ps(unsafe {
            _mm_loadu_si128(blk.d.as_ptr() as *const __m128i)
        }));
        for t in 0..T {
            let dy = _mm512_set1_ps(a[(t0 + t) * nb + b].d);
            for h in 0..2 {
                let d = _mm512_mul_ps(_mm512_permutexvar_ps(rows[h], d8), dy);
                acc[t][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t][h]), d, acc[t][h]);
            }
        }
    }
    for t in 0..T {
        let [a, b] = acc[t];
        let halves = [
            _mm512_castps512_ps256(a),
            upper_half(a),
            _mm512_castps512_ps256(b),
            upper_half(b),
        ];
        store_rows(halves, _mm256_setzero_ps(), out, n_tok, t0 + t);
    }
}

/// Dword indices spreading four rows' twelve packed scale bytes (three dwords each, as
/// [`Q3K8`] stores them one row after the other) one row per 128-bit lane.
const Q3K_SCALE_LANES: [i32; 16] = [0, 1, 2, 0, 3, 4, 5, 0, 6, 7, 8, 0, 9, 10, 11, 0];

/// Per 128-bit lane holding a row's twelve packed bytes of Q3_K scales (bytes 0..12), that
/// row's 16 scales as signed bytes minus 32 (byte `g`: sub-block `g`), as
/// `reference::q3k_scales`: the low four bits of scales 0..8 and 8..16 are the low and high
/// nibbles of bytes 0..8, the top two bits of scale `g` are bits `2·(g / 4)` of byte
/// `8 + g % 4`.
#[target_feature(enable = "avx2,avx512f,avx512bw")]
#[inline]
fn q3k_scales_512(v: __m512i) -> __m512i {
    let lanes = |p: [i8; 16]| {
        // SAFETY: a 16-byte load of `p`.
        _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(p.as_ptr() as *const __m128i) })
    };
    let twice = _mm512_shuffle_epi8(v, lanes([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7]));
    let low4 = _mm512_and_si512(
        _mm512_srlv_epi64(twice, _mm512_set_epi64(4, 0, 4, 0, 4, 0, 4, 0)),
        _mm512_set1_epi8(0x0F),
    );
    let top = _mm512_shuffle_epi8(
        v,
        lanes([8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11]),
    );
    let top = _mm512_and_si512(
        _mm512_srlv_epi32(
            top,
            _mm512_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6, 0, 2, 4, 6),
        ),
        _mm512_set1_epi8(3),
    );
    let six = _mm512_or_si512(low4, _mm512_slli_epi16::<4>(top));
    _mm512_sub_epi8(six, _mm512_set1_epi8(32))
}

/// [`q3k_scales_512`] at AVX2 (two rows, one per 128-bit lane).
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn q3k_scales_256(v: __m256i) -> __m256i {
    let twice = _mm256_shuffle_epi8(
        v,
        _mm256_setr_epi8(
            0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4,
            5, 6, 7,
        ),
    );
    let low4 = _mm256_and_si256(
        _mm256_srlv_epi64(twice, _mm256_set_epi64x(4, 0, 4, 0)),
        _mm256_set1_epi8(0x0F),
    );
    let top = _mm256_shuffle_epi8(
        v,
        _mm256_setr_epi8(
            8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, 8,
            9, 10, 11, 8, 9, 10, 11,
        ),
    );
    let top = _mm256_and_si256(
        _mm256_srlv_epi32(top, _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6)),
        _mm256_set1_epi8(3),
    );
    let six = _mm256_or_si256(low4, _mm256_slli_epi16::<4>(top));
    _mm256_sub_epi8(six, _mm256_set1_epi8(32))
}

/// Bits `2j ..` of every byte of `q` (a shift by an immediate for each `j`).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn two_bit_field(q: __m512i, j: usize) -> __m512i {
    match j {
        0 => q,
        1 => _mm512_srli_epi16::<2>(q),
        2 => _mm512_srli_epi16::<4>(q),
        _ => _mm512_srli_epi16::<6>(q),
    }
}

/// A `pshufb` pattern putting scale byte `g` of each 128-bit lane in the high byte of every
/// i16 (the low byte zero): the scale times 256, sign and all, with no widening.
#[inline(always)]
fn scale_times_256(g: usize) -> i16 {
    ((g as i16) << 8) | 0x80
}

/// Eight Q3_K or Q2_K rows grouped at load ([`Q3K8`], [`Q2K8`]): the same 16-byte runs of
/// 2-bit values, four rows to a 64-byte load; Q3_K adds each value's high bit, Q2_K a min
/// per sub-block (against the activations' 16-value sums once per super-block).
pub trait TwoBitGroup: Copy {
    /// The rows' scales.
    fn d(&self) -> &[f16; 8];
    /// `qs[c][r]`: row `r`'s run `c`.
    fn qs(&self) -> &[[[u8; 16]; 8]; 4];
    /// Q3_K's high bits (`hmask[e][r]`), else `None`.
    #[inline(always)]
    fn hmask(&self) -> Option<&[[[u8; 16]; 8]; 2]> {
        None
    }
    /// Q2_K's mins' scales, else `None`.
    #[inline(always)]
    fn dmin(&self) -> Option<&[f16; 8]> {
        None
    }
    /// Rows `4h .. 4h + 4`'s 16 sub-block scales as bytes, one row per 128-bit lane (Q3_K:
    /// signed, minus 32; Q2_K: 0..=15), and their mins (Q2_K; zeros for Q3_K).
    ///
    /// # Safety
    /// AVX-512 F/BW and AVX2 are present.
    unsafe fn scales512(&self, h: usize) -> (__m512i, __m512i);
    /// Rows `2k`, `2k + 1`'s, as [`TwoBitGroup::scales512`], at AVX2.
    ///
    /// # Safety
    /// AVX2 is present.
    unsafe fn scales256(&self, k: usize) -> (__m256i, __m256i);
}

impl TwoBitGroup for Q3K8 {
    #[inline(always)]
    fn d(&self) -> &[f16; 8] {
        &self.d
    }
    #[inline(always)]
    fn qs(&self) -> &[[[u8; 16]; 8]; 4] {
        &self.qs
    }
    #[inline(always)]
    fn hmask(&self) -> Option<&[[[u8; 16]; 8]; 2]> {
        Some(&self.hmask)
    }
    /// Four rows' packed scales (48 bytes) from a 64-byte load, spread one row per lane.
    #[inline(always)]
    unsafe fn scales512(&self, h: usize) -> (__m512i, __m512i) {
        const SCALES: usize = std::mem::offset_of!(Q3K8, scales);
        const _: () = assert!(SCALES + 48 + 64 <= size_of::<Q3K8>());
        assert!(h < 2);
        // SAFETY: 64 bytes at SCALES + 48h, inside the group (asserted above); the caller
        // vouches for the features.
        unsafe {
            let base = self as *const Q3K8 as *const u8;
            let v = _mm512_loadu_si512(base.add(SCALES + 48 * h) as *const _);
            let lanes = _mm512_loadu_si512(Q3K_SCALE_LANES.as_ptr() as *const _);
            let sc = q3k_scales_512(_mm512_permutexvar_epi32(lanes, v));
            (sc, _mm512_setzero_si512())
        }
    }
    /// Two rows' packed scales (24 bytes) from a 32-byte load, one row per lane.
    #[inline(always)]
    unsafe fn scales256(&self, k: usize) -> (__m256i, __m256i) {
        const SCALES: usize = std::mem::offset_of!(Q3K8, scales);
        const _: () = assert!(SCALES + 72 + 32 <= size_of::<Q3K8>());
        assert!(k < 4);
        // SAFETY: 32 bytes at SCALES + 24k, inside the group (asserted above); the caller
        // vouches for AVX2.
        unsafe {
            let base = self as *const Q3K8 as *const u8;
            let v = _mm256_loadu_si256(base.add(SCALES + 24 * k) as *const __m256i);
            let lanes = _mm256_setr_epi32(0, 1, 2, 0, 3, 4, 5, 0);
            let sc = q3k_scales_256(_mm256_permutevar8x32_epi32(v, lanes));
            (sc, _mm256_setzero_si256())
        }
    }
}

impl TwoBitGroup for Q2K8 {
    #[inline(always)]
    fn d(&self) -> &[f16; 8] {
        &self.d
    }
    #[inline(always)]
    fn qs(&self) -> &[[[u8; 16]; 8]; 4] {
        &self.qs
    }
    #[inline(always)]
    fn dmin(&self) -> Option<&[f16; 8]> {
        Some(&self.dmin)
    }
    /// Four rows' scale bytes (the file's, 16 each) in one 64-byte load: the low nibbles
    /// are the scales, the high ones the mins.
    #[inline(always)]
    unsafe fn scales512(&self, h: usize) -> (__m512i, __m512i) {
        // SAFETY: 64 bytes: rows 4h .. 4h + 4 of `scales`; the caller vouches for the
        // features.
        unsafe {
            let v = _mm512_loadu_si512(self.scales[4 * h].as_ptr() as *const _);
            let low4 = _mm512_set1_epi8(0x0F);
            (
                _mm512_and_si512(v, low4),
                _mm512_and_si512(_mm512_srli_epi16::<4>(v), low4),
            )
        }
    }
    #[inline(always)]
    unsafe fn scales256(&self, k: usize) -> (__m256i, __m256i) {
        // SAFETY: 32 bytes: rows 2k, 2k + 1 of `scales`; the caller vouches for AVX2.
        unsafe {
            let v = _mm256_loadu_si256(self.scales[2 * k].as_ptr() as *const __m256i);
            let low4 = _mm256_set1_epi8(0x0F);
            (
                _mm256_and_si256(v, low4),
                _mm256_and_si256(_mm256_srli_epi16::<4>(v), low4),
            )
        }
    }
}

/// Q3_K or Q2_K groups `w` (`nb` super-blocks per row) × `n_tok` tokens of Q8_K at AVX-512
/// VNNI: `out[r * n_tok + t]`.
///
/// # Safety
/// The CPU must have AVX-512 F/BW/VL/VNNI, AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn gemm_two_bit_avx512<G: TwoBitGroup>(
    w: &[G],
    a: &[BlockQ8K],
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    check_k(w, a, nb, n_tok, out);
    by_group(w, nb, n_tok, 4, out, |group, t0, n, out| {
        // SAFETY: our caller vouches for the features; `check_k` bounds the tokens.
        unsafe {
            match n {
                1 => tile512_two_bit::<1, G>(group, a, nb, t0, n_tok, out),
                2 => tile512_two_bit::<2, G>(group, a, nb, t0, n_tok, out),
                3 => tile512_two_bit::<3, G>(group, a, nb, t0, n_tok, out),
                _ => tile512_two_bit::<4, G>(group, a, nb, t0, n_tok, out),
            }
        }
    });
}

/// One Q3_K or Q2_K group × tokens `t0 .. t0 + T`: rows `4h .. 4h + 4` in vector `h`, one
/// row per 128-bit lane (four i32 lanes per row). A Q3_K value is held as `u = value + 4`
/// (its two low bits, plus 4 under the byte mask of its high bit): 0..=7, as the `kquant`
/// tile does, and `4 · Σ scale · bsum` comes off at the end of the super-block; a Q2_K
/// value is its two bits, and `Σ min · bsum` comes off with `dmin`. A sub-block's
/// `vpmaddubsw` pairs are scaled in `vpdpwssd` by its scale times 256 (a byte shuffle, no
/// widening); the factor 256 is taken out of the float scale: exact, as a power of two.
#[allow(clippy::needless_range_loop)] // `h` picks a row half in weights, scales and sums
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile512_two_bit<const T: usize, G: TwoBitGroup>(
    group: &[G],
    a: &[BlockQ8K],
    nb: usize,
    t0: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(group.len() == nb && out.len() == 8 * n_tok && t0 + T <= n_tok);
    let mut acc = [[_mm512_setzero_ps(); 2]; T];
    let m3 = _mm512_set1_epi8(3);
    let four = _mm512_set1_epi8(4);
    let rows_lo = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    let rows = [rows_lo, _mm512_add_epi32(rows_lo, _mm512_set1_epi32(4))];
    for b in 0..nb {
        let blk = &group[b];
        // Arrays element by element, not with `array::map` (see `tile512_k`).
        let mut sc = [_mm512_setzero_si512(); 2];
        let mut mins = sc;
        let mut hm = [[_mm512_setzero_si512(); 2]; 2];
        for h in 0..2 {
            // SAFETY: the features are enabled here.
            (sc[h], mins[h]) = unsafe { blk.scales512(h) };
            if let Some(hmask) = blk.hmask() {
                for e in 0..2 {
                    // SAFETY: 64 bytes: rows 4h .. 4h + 4 of hmask half e.
                    hm[e][h] = unsafe { _mm512_loadu_si512(hmask[e][4 * h].as_ptr() as *const _) };
                }
            }
        }
        let mut isum = [[_mm512_setzero_si512(); 2]; T];
        // Run `c` (values of half c / 2, bytes 16·(c % 2) ..): spelled out four times so that
        // its shifts, bit selectors and scale patterns are constants (LLVM kept a loop over
        // `c`, building them with scalar shifts and broadcasts).
        macro_rules! run {
            ($c:literal) => {{
                let (half, e) = ($c / 2, $c % 2);
                prefetch_ahead(blk, $c);
                let mut q = [_mm512_setzero_si512(); 2];
                for h in 0..2 {
                    // SAFETY: 64 bytes: rows 4h .. 4h + 4 of run c.
                    q[h] = unsafe { _mm512_loadu_si512(blk.qs()[$c][4 * h].as_ptr() as *const _) };
                }
                for j in 0..4 {
                    let g = 8 * half + 2 * j + e;
                    let bit = _mm512_set1_epi8((1u8 << (4 * half + j)) as i8);
                    let pick = _mm512_set1_epi16(scale_times_256(g));
                    let mut u = [_mm512_setzero_si512(); 2];
                    let mut s = [_mm512_setzero_si512(); 2];
                    for h in 0..2 {
                        u[h] = _mm512_and_si512(two_bit_field(q[h], j), m3);
                        if blk.hmask().is_some() {
                            let high = _mm512_test_epi8_mask(hm[e][h], bit);
                            u[h] = _mm512_mask_add_epi8(u[h], high, u[h], four);
                        }
                        s[h] = _mm512_shuffle_epi8(sc[h], pick);
                    }
                    for t in 0..T {
                        let y = &a[(t0 + t) * nb + b];
                        // SAFETY: 16 bytes at 16g inside the 256 of `qs`.
                        let act = _mm512_broadcast_i32x4(unsafe {
                            _mm_loadu_si128(y.qs.as_ptr().add(16 * g) as *const __m128i)
                        });
                        for h in 0..2 {
                            // At most 2 · 7 · 128 per pair, times 32 · 256.
                            let pairs = _mm512_maddubs_epi16(u[h], act);
                            // SAFETY: AVX-512 VNNI is enabled here.
                            isum[t][h] = unsafe { dpwssd(isum[t][h], pairs, s[h]) };
                        }
                    }
                }
            }};
        }
        run!(0);
        run!(1);
        run!(2);
        run!(3);
        let f16x8 = |v: &[f16; 8]| {
            // SAFETY: the 16 bytes of `v`.
            _mm512_castps256_ps512(_mm256_cvtph_ps(unsafe {
                _mm_loadu_si128(v.as_ptr() as *const __m128i)
            }))
        };
        let (d8, dmin8) = (f16x8(blk.d()), blk.dmin().map(f16x8));
        let zero = _mm512_setzero_si512();
        // Each lane's offset multipliers as i16, sub-blocks 0..8, then 8..16: Q3_K's scales
        // times 256 (taken 4 times with `d`), Q2_K's mins (with `dmin`).
        let mut wide = [[zero; 2]; 2];
        for h in 0..2 {
            wide[h] = if blk.hmask().is_some() {
                [
                    _mm512_unpacklo_epi8(zero, sc[h]),
                    _mm512_unpackhi_epi8(zero, sc[h]),
                ]
            } else {
                [
                    _mm512_unpacklo_epi8(mins[h], zero),
                    _mm512_unpackhi_epi8(mins[h], zero),
                ]
            };
        }
        for t in 0..T {
            let y = &a[(t0 + t) * nb + b];
            // SAFETY: two 16-byte loads inside the 32 bytes of `bsums`.
            let sums = unsafe {
                let p = y.bsums.as_ptr() as *const __m128i;
                [
                    _mm512_broadcast_i32x4(_mm_loadu_si128(p)),
                    _mm512_broadcast_i32x4(_mm_loadu_si128(p.add(1))),
                ]
            };
            let dy_256 = _mm512_set1_ps(y.d / 256.0);
            for h in 0..2 {
                let offset = _mm512_add_epi32(
                    _mm512_madd_epi16(wide[h][0], sums[0]),
                    _mm512_madd_epi16(wide[h][1], sums[1]),
                );
                let d = _mm512_mul_ps(_mm512_permutexvar_ps(rows[h], d8), dy_256);
                if let Some(dmin8) = dmin8 {
                    let dmin =
                        _mm512_mul_ps(_mm512_permutexvar_ps(rows[h], dmin8), _mm512_set1_ps(y.d));
                    acc[t][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t][h]), d, acc[t][h]);
                    acc[t][h] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(offset), dmin, acc[t][h]);
                } else {
                    let sum = _mm512_sub_epi32(isum[t][h], _mm512_slli_epi32::<2>(offset));
                    acc[t][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), d, acc[t][h]);
                }
            }
        }
    }
    for t in 0..T {
        let [a, b] = acc[t];
        let halves = [
            _mm512_castps512_ps256(a),
            upper_half(a),
            _mm512_castps512_ps256(b),
            upper_half(b),
        ];
        store_rows(halves, _mm256_setzero_ps(), out, n_tok, t0 + t);
    }
}

/// [`gemm_two_bit_avx512`] at AVX2.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_two_bit_avx2<G: TwoBitGroup>(
    w: &[G],
    a: &[BlockQ8K],
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    check_k(w, a, nb, n_tok, out);
    by_group(w, nb, n_tok, 2, out, |group, t0, n, out| {
        // SAFETY: our caller vouches for the features; `check_k` bounds the tokens.
        unsafe {
            match n {
                1 => tile256_two_bit::<1, G>(group, a, nb, t0, n_tok, out),
                _ => tile256_two_bit::<2, G>(group, a, nb, t0, n_tok, out),
            }
        }
    });
}

/// One Q3_K or Q2_K group × tokens `t0 .. t0 + T` at AVX2, as [`tile512_two_bit`]: rows
/// `2k`, `2k + 1` in vector `k`, one row per 128-bit lane. Q3_K's high bit moves to bit 2 of
/// its byte with a shift (bits shifted in from the neighbouring byte are masked off).
#[allow(clippy::needless_range_loop)] // `k` picks a row pair in weights, scales and sums
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tile256_two_bit<const T: usize, G: TwoBitGroup>(
    group: &[G],
    a: &[BlockQ8K],
    nb: usize,
    t0: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(group.len() == nb && out.len() == 8 * n_tok && t0 + T <= n_tok);
    let mut acc = [[_mm256_setzero_ps(); 4]; T];
    let m3 = _mm256_set1_epi8(3);
    let four = _mm256_set1_epi8(4);
    for b in 0..nb {
        let blk = &group[b];
        let mut isum = [[_mm256_setzero_si256(); 4]; T];
        let mut sc = [_mm256_setzero_si256(); 4];
        let mut mins = sc;
        for k in 0..4 {
            prefetch_ahead(blk, k);
            // SAFETY: AVX2 is enabled here.
            (sc[k], mins[k]) = unsafe { blk.scales256(k) };
            let mut hm = [_mm256_setzero_si256(); 2];
            if let Some(hmask) = blk.hmask() {
                for e in 0..2 {
                    // SAFETY: 32 bytes: rows 2k, 2k + 1 of hmask half e.
                    hm[e] =
                        unsafe { _mm256_loadu_si256(hmask[e][2 * k].as_ptr() as *const __m256i) };
                }
            }
            // Run `c`, spelled out as in `tile512_two_bit`.
            macro_rules! run {
                ($c:literal) => {{
                    let (half, e) = ($c / 2, $c % 2);
                    // SAFETY: 32 bytes: rows 2k, 2k + 1 of run c.
                    let q = unsafe {
                        _mm256_loadu_si256(blk.qs()[$c][2 * k].as_ptr() as *const __m256i)
                    };
                    for j in 0..4 {
                        let g = 8 * half + 2 * j + e;
                        let shifted = _mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * j as i32));
                        let mut u = _mm256_and_si256(shifted, m3);
                        if blk.hmask().is_some() {
                            let n = (4 * half + j) as i32;
                            let moved = if n >= 2 {
                                _mm256_srl_epi16(hm[e], _mm_cvtsi32_si128(n - 2))
                            } else {
                                _mm256_sll_epi16(hm[e], _mm_cvtsi32_si128(2 - n))
                            };
                            u = _mm256_or_si256(u, _mm256_and_si256(moved, four));
                        }
                        let s = _mm256_shuffle_epi8(sc[k], _mm256_set1_epi16(scale_times_256(g)));
                        for t in 0..T {
                            let y = &a[(t0 + t) * nb + b];
                            // SAFETY: 16 bytes at 16g inside the 256 of `qs`.
                            let act = _mm256_broadcastsi128_si256(unsafe {
                                _mm_loadu_si128(y.qs.as_ptr().add(16 * g) as *const __m128i)
                            });
                            let pairs = _mm256_maddubs_epi16(u, act);
                            isum[t][k] = _mm256_add_epi32(isum[t][k], _mm256_madd_epi16(pairs, s));
                        }
                    }
                }};
            }
            run!(0);
            run!(1);
            run!(2);
            run!(3);
        }
        let f16x8 = |v: &[f16; 8]| {
            // SAFETY: the 16 bytes of `v`.
            _mm256_cvtph_ps(unsafe { _mm_loadu_si128(v.as_ptr() as *const __m128i) })
        };
        let (d8, dmin8) = (f16x8(blk.d()), blk.dmin().map(f16x8));
        let zero = _mm256_setzero_si256();
        for t in 0..T {
            let y = &a[(t0 + t) * nb + b];
            // SAFETY: two 16-byte loads inside the 32 bytes of `bsums`.
            let sums = unsafe {
                let p = y.bsums.as_ptr() as *const __m128i;
                [
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(p)),
                    _mm256_broadcastsi128_si256(_mm_loadu_si128(p.add(1))),
                ]
            };
            let dy_256 = _mm256_set1_ps(y.d / 256.0);
            for k in 0..4 {
                // Q3_K's scales times 256 (taken 4 times with `d`), Q2_K's mins (with
                // `dmin`), each against its sub-block's sum.
                let wide = if blk.hmask().is_some() {
                    [
                        _mm256_unpacklo_epi8(zero, sc[k]),
                        _mm256_unpackhi_epi8(zero, sc[k]),
                    ]
                } else {
                    [
                        _mm256_unpacklo_epi8(mins[k], zero),
                        _mm256_unpackhi_epi8(mins[k], zero),
                    ]
                };
                let offset = _mm256_add_epi32(
                    _mm256_madd_epi16(wide[0], sums[0]),
                    _mm256_madd_epi16(wide[1], sums[1]),
                );
                let i = 2 * k as i32;
                let pick = _mm256_setr_epi32(i, i, i, i, i + 1, i + 1, i + 1, i + 1);
                let d = _mm256_mul_ps(_mm256_permutevar8x32_ps(d8, pick), dy_256);
                if let Some(dmin8) = dmin8 {
                    let dmin =
                        _mm256_mul_ps(_mm256_permutevar8x32_ps(dmin8, pick), _mm256_set1_ps(y.d));
                    acc[t][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t][k]), d, acc[t][k]);
                    acc[t][k] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(offset), dmin, acc[t][k]);
                } else {
                    let sum = _mm256_sub_epi32(isum[t][k], _mm256_slli_epi32::<2>(offset));
                    acc[t][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), d, acc[t][k]);
                }
            }
        }
    }
    for t in 0..T {
        store_rows(acc[t], _mm256_setzero_ps(), out, n_tok, t0 + t);
    }
}
