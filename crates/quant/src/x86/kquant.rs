//! AVX-512 (F/BW/VL/VNNI) products of Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS weights with
//! Q8_K activations, for decoding and small batches: 4 weight rows × 1 token per tile, the rows taken from the 4 quarters
//! of the product's rows so that one core streams the weights as 4 sequential reads
//! (`quarter_tiles`, as `vnni::gemm`).
//!
//! A super-block (256 values) is four 64-byte vectors of weights against four of
//! activations. `vpmaddubsw` multiplies the unsigned weight values (Q4_K 0..=15, Q6_K
//! 0..=63) by the signed activations into pairs of i16 (at most 2·63·128, no saturation),
//! `vpdpwssd` multiplies the pairs by each lane's sub-block scale and adds them into i32
//! (`vpmaddwd` and the add in one instruction), and the
//! per-sub-block offsets (Q4_K's mins, Q6_K's −32) come from the activations' 16-value sums
//! (`bsums`) in one more `vpmaddwd`. Integer sums are exact; each super-block's sum is
//! scaled once into a 16-lane f32 accumulator, reduced at the end. Every (row, token) goes
//! through the same operations whatever tile it is in, so batched decoding equals decoding
//! alone bit for bit.
#![allow(clippy::missing_safety_doc)] // callers must have detected the features listed

use super::avx2::{h2f, hsum_ps, prefetch};
use crate::blocks::*;
use std::arch::x86_64::*;

/// How far ahead each row prefetches (see `vnni::PREFETCH_BYTES`).
const PREFETCH_BYTES: usize = 4096;

/// Hints `n` bytes at `p` into cache where the tiles prefetch their weights (`PF`: chosen
/// per CPU family by `x86::kernels`, see `prefetch_weights` there).
#[inline(always)]
fn prefetch_if<const PF: bool>(p: *const u8, n: usize) {
    if PF {
        prefetch(p, n)
    }
}

/// Q4_K's 8 six-bit scales and 8 six-bit mins, unpacked from its 12 bytes (as
/// `reference::scale_min_k4` for every sub-block at once).
#[inline(always)]
pub(crate) fn q4k_scales_mins(s: &[u8; K_SCALE_SIZE]) -> (u64, u64) {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const HIGH2: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (w0, w1, w2) = (w(0), w(1), w(2));
    let scales_lo = w0 & LOW6;
    let scales_hi = (w2 & LOW4) | (((w0 >> 6) & HIGH2) << 4);
    let mins_lo = w1 & LOW6;
    let mins_hi = ((w2 >> 4) & LOW4) | (((w1 >> 6) & HIGH2) << 4);
    (
        scales_lo as u64 | (scales_hi as u64) << 32,
        mins_lo as u64 | (mins_hi as u64) << 32,
    )
}

/// Asserts what a tile of `rows` rows relies on (its rows of `w`, token `t` of `a`, its
/// outputs; see [`tile_q4k`]) and returns how far ahead its rows prefetch.
#[allow(clippy::too_many_arguments)]
fn check_tile<W>(
    rows: usize,
    w: &[W],
    stride: usize,
    a: &[BlockQ8K],
    nb: usize,
    t: usize,
    n_tok: usize,
    out: &[f32],
) -> usize {
    assert!(rows == 1 || stride > 0);
    assert!(w.len() >= ((rows - 1) * stride + 1) * nb && a.len() >= (t + 1) * nb);
    assert!(out.len() > (rows - 1) * stride * n_tok + t);
    PREFETCH_BYTES.max(nb * size_of::<W>())
}

/// Byte shuffle making i16 lanes of scale byte `x` (first 256 bits) and `y` (last 256).
const fn pick_pair(x: u8, y: u8) -> [u8; 64] {
    let mut c = [0x80u8; 64];
    let mut i = 0;
    while i < 64 {
        c[i] = if i < 32 { x } else { y };
        i += 2;
    }
    c
}

/// Per 64-byte weight vector of a Q4_K super-block: the sub-blocks its low and high
/// nibbles hold (first half, second half).
const Q4K_PAIRS: [[u8; 64]; 4] = [
    pick_pair(0, 2),
    pick_pair(1, 3),
    pick_pair(4, 6),
    pick_pair(5, 7),
];

/// Q4_K and Q5_K: the same scales, mins and value order; Q5_K adds a fifth bit per value.
trait Q4KLike {
    fn d(&self) -> half::f16;
    fn dmin(&self) -> half::f16;
    fn scales(&self) -> &[u8; K_SCALE_SIZE];
    /// The 256 values as four vectors of bytes in `Q4K_PAIRS` order (low nibbles of
    /// qs[0..64], high nibbles, then of qs[64..128]).
    unsafe fn values(&self) -> [__m512i; 4];
}

/// The low and high nibbles of a super-block's 128 bytes of `qs`.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn nibbles(qs: &[u8; QK_K / 2]) -> [__m512i; 4] {
    let low4 = _mm512_set1_epi8(0x0F);
    // SAFETY: two 64-byte loads covering the 128 bytes.
    let (q0, q1) = unsafe {
        (
            _mm512_loadu_si512(qs.as_ptr() as *const _),
            _mm512_loadu_si512(qs.as_ptr().add(64) as *const _),
        )
    };
    [
        _mm512_and_si512(q0, low4),
        _mm512_and_si512(_mm512_srli_epi16::<4>(q0), low4),
        _mm512_and_si512(q1, low4),
        _mm512_and_si512(_mm512_srli_epi16::<4>(q1), low4),
    ]
}

impl Q4KLike for BlockQ4K {
    fn d(&self) -> half::f16 {
        self.d
    }
    fn dmin(&self) -> half::f16 {
        self.dmin
    }
    fn scales(&self) -> &[u8; K_SCALE_SIZE] {
        &self.scales
    }
    #[inline(always)]
    unsafe fn values(&self) -> [__m512i; 4] {
        // SAFETY: the caller (the tile) has AVX-512 F/BW enabled.
        unsafe { nibbles(&self.qs) }
    }
}

/// Per 64-byte weight vector of a Q5_K super-block: the `qh` bit that holds each half's
/// fifth bit (the sub-blocks of `Q4K_PAIRS`: bit j for sub-block j).
const fn q5k_bits(x: u8, y: u8) -> [u8; 64] {
    let mut c = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        c[i] = 1 << if i < 32 { x } else { y };
        i += 1;
    }
    c
}
const Q5K_BITS: [[u8; 64]; 4] = [
    q5k_bits(0, 2),
    q5k_bits(1, 3),
    q5k_bits(4, 6),
    q5k_bits(5, 7),
];

impl Q4KLike for BlockQ5K {
    fn d(&self) -> half::f16 {
        self.d
    }
    fn dmin(&self) -> half::f16 {
        self.dmin
    }
    fn scales(&self) -> &[u8; K_SCALE_SIZE] {
        &self.scales
    }
    /// Each value's fifth bit (`qh`, byte l bit j for value l of sub-block j) added as 16
    /// under a byte mask: values 0..=31, pairs at most 2·31·128 in i16.
    #[inline(always)]
    unsafe fn values(&self) -> [__m512i; 4] {
        // SAFETY: AVX-512 F/BW enabled by the caller (the tile); 32 bytes of qh, 64-byte
        // bit selectors.
        unsafe {
            let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(self.qh.as_ptr() as *const __m256i));
            let sixteen = _mm512_set1_epi8(16);
            let nib = nibbles(&self.qs);
            std::array::from_fn(|k| {
                let bits = _mm512_loadu_si512(Q5K_BITS[k].as_ptr() as *const _);
                let high = _mm512_test_epi8_mask(qh, bits);
                _mm512_mask_add_epi8(nib[k], high, nib[k], sixteen)
            })
        }
    }
}

/// Rows `0, stride, 2·stride, 3·stride` (`R` of them) of `w` (`nb` super-blocks each)
/// against token `t` of `a`; row `r`'s result goes to `out[r * stride * n_tok + t]`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile_q4k<B: Q4KLike, const R: usize, const PF: bool>(
    w: &[B],
    stride: usize,
    a: &[BlockQ8K],
    nb: usize,
    t: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    let ahead = check_tile(R, w, stride, a, nb, t, n_tok, out);
    // SAFETY: the four shuffle patterns are 64 bytes each.
    let pairs = Q4K_PAIRS.map(|p| unsafe { _mm512_loadu_si512(p.as_ptr() as *const _) });
    let mut acc = [_mm512_setzero_ps(); R];
    let mut acc_min = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let y = &a[t * nb + b];
        // SAFETY: 64-byte loads inside the 256-byte qs, 32 bytes of bsums.
        let (y0, y1, y2, y3, bsums) = unsafe {
            let p = y.qs.as_ptr();
            (
                _mm512_loadu_si512(p as *const _),
                _mm512_loadu_si512(p.add(64) as *const _),
                _mm512_loadu_si512(p.add(128) as *const _),
                _mm512_loadu_si512(p.add(192) as *const _),
                _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i),
            )
        };
        // Activations in the weights' order: low nibbles of qs[0..64] are sub-blocks 0 and
        // 2, high nibbles 1 and 3; of qs[64..128], 4 and 6, then 5 and 7.
        let ya = [
            _mm512_shuffle_i64x2::<0x44>(y0, y1),
            _mm512_shuffle_i64x2::<0xEE>(y0, y1),
            _mm512_shuffle_i64x2::<0x44>(y2, y3),
            _mm512_shuffle_i64x2::<0xEE>(y2, y3),
        ];
        for r in 0..R {
            let x = &w[r * stride * nb + b];
            prefetch_if::<PF>(
                (x as *const B as *const u8).wrapping_add(ahead),
                size_of::<B>(),
            );
            let (scales, mins) = q4k_scales_mins(x.scales());
            let sc = _mm512_set1_epi64(scales as i64);
            // SAFETY: the features are enabled here.
            let u = unsafe { x.values() };
            let mut sum = _mm512_setzero_si512();
            for k in 0..4 {
                let pairs16 = _mm512_maddubs_epi16(u[k], ya[k]);
                let scale16 = _mm512_shuffle_epi8(sc, pairs[k]);
                sum = _mm512_dpwssd_epi32(sum, pairs16, scale16);
            }
            let d = h2f(x.d()) * y.d;
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(d), acc[r]);
            // Σ min_j · (bsums[2j] + bsums[2j + 1]), each min twice to meet both sums.
            let m8 = _mm_cvtsi64_si128(mins as i64);
            let m16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
            let msum = _mm256_madd_epi16(m16, bsums);
            let dmin = h2f(x.dmin()) * y.d;
            acc_min[r] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_set1_ps(dmin), acc_min[r]);
        }
    }
    for r in 0..R {
        out[r * stride * n_tok + t] = _mm512_reduce_add_ps(acc[r]) - hsum_ps(acc_min[r]);
    }
}

/// Byte shuffle making i16 lanes of scale `j` in 128-bit lane `j` (scales `first..first
/// + 4`, from 8 i16 in every 128-bit lane).
const fn lane_scales(first: u8) -> [u8; 64] {
    let mut c = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        let j = first + (i / 16) as u8;
        c[i] = 2 * j + (i % 2) as u8;
        i += 1;
    }
    c
}
const IQ4XS_LANES: [[u8; 64]; 2] = [lane_scales(0), lane_scales(4)];

/// IQ4_XS: rows `0, stride, …` (`R`) of `w` against token `t` of `a`, as [`tile_q4k`].
/// The nibbles look up the signed IQ4 values (`vpshufb`); `vpmaddubsw` takes the
/// activations' magnitudes (|q| ≤ 128 as u8) against the values with the activations'
/// signs (|v| ≤ 127, so negating never overflows): pairs at most 2·128·127 in i16. Each
/// 128-bit lane of a weight vector is one 32-value sub-block, scaled by `vpmaddwd`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile_iq4xs<const R: usize, const PF: bool>(
    w: &[BlockIQ4XS],
    stride: usize,
    a: &[BlockQ8K],
    nb: usize,
    t: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    let ahead = check_tile(R, w, stride, a, nb, t, n_tok, out);
    let low4 = _mm512_set1_epi8(0x0F);
    let zero = _mm512_setzero_si512();
    // SAFETY: 16 table bytes; the lane patterns are 64 bytes each.
    let (table, lanes) = unsafe {
        (
            _mm512_broadcast_i32x4(_mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i)),
            IQ4XS_LANES.map(|p| _mm512_loadu_si512(p.as_ptr() as *const _)),
        )
    };
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let y = &a[t * nb + b];
        // SAFETY: 64-byte loads inside the 256-byte qs.
        let [y0, y1, y2, y3] = unsafe {
            let p = y.qs.as_ptr();
            [0, 64, 128, 192].map(|o| _mm512_loadu_si512(p.add(o) as *const _))
        };
        // Per weight vector (low nibbles of qs[0..64], high, then of qs[64..128]), 128-bit
        // lane j is values 0..16 (low) or 16..32 (high) of sub-block j (+4): the matching
        // activations, as magnitudes and sign masks.
        let ya = [
            _mm512_shuffle_i64x2::<0x88>(y0, y1),
            _mm512_shuffle_i64x2::<0xDD>(y0, y1),
            _mm512_shuffle_i64x2::<0x88>(y2, y3),
            _mm512_shuffle_i64x2::<0xDD>(y2, y3),
        ];
        let mag = ya.map(|v| _mm512_abs_epi8(v));
        let neg = ya.map(|v| _mm512_movepi8_mask(v));
        for r in 0..R {
            let x = &w[r * stride * nb + b];
            prefetch_if::<PF>(
                (x as *const BlockIQ4XS as *const u8).wrapping_add(ahead),
                136,
            );
            let ls = _mm_cvtsi64_si128(super::kunpack::iq4xs_scale_bytes(x) as i64);
            let sc = _mm512_broadcast_i32x4(_mm_cvtepi8_epi16(ls));
            // SAFETY: two 64-byte loads covering the 128-byte qs.
            let (q0, q1) = unsafe {
                (
                    _mm512_loadu_si512(x.qs.as_ptr() as *const _),
                    _mm512_loadu_si512(x.qs.as_ptr().add(64) as *const _),
                )
            };
            let nib = [
                _mm512_and_si512(q0, low4),
                _mm512_and_si512(_mm512_srli_epi16::<4>(q0), low4),
                _mm512_and_si512(q1, low4),
                _mm512_and_si512(_mm512_srli_epi16::<4>(q1), low4),
            ];
            let mut sum = _mm512_setzero_si512();
            for k in 0..4 {
                let v = _mm512_shuffle_epi8(table, nib[k]);
                let signed = _mm512_mask_sub_epi8(v, neg[k], zero, v);
                let pairs16 = _mm512_maddubs_epi16(mag[k], signed);
                let scale16 = _mm512_shuffle_epi8(sc, lanes[k / 2]);
                sum = _mm512_dpwssd_epi32(sum, pairs16, scale16);
            }
            let d = h2f(x.d) * y.d;
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(d), acc[r]);
        }
    }
    for r in 0..R {
        out[r * stride * n_tok + t] = _mm512_reduce_add_ps(acc[r]);
    }
}

/// Token `y`'s activations in the order of Q2_K's and Q3_K's 2-bit values (vector `j`:
/// values `32j..32j + 32` of the first 128-value half, then of the second), and its
/// 16-value sums.
#[target_feature(enable = "avx2,avx512f")]
#[inline]
fn two_bit_acts(y: &BlockQ8K) -> ([__m512i; 4], __m256i) {
    // SAFETY: 64-byte loads inside the 256-byte qs, 32 bytes of bsums.
    let ([y0, y1, y2, y3], bsums) = unsafe {
        let p = y.qs.as_ptr();
        (
            [0, 64, 128, 192].map(|o| _mm512_loadu_si512(p.add(o) as *const _)),
            _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i),
        )
    };
    let ya = [
        _mm512_shuffle_i64x2::<0x44>(y0, y2),
        _mm512_shuffle_i64x2::<0xEE>(y0, y2),
        _mm512_shuffle_i64x2::<0x44>(y1, y3),
        _mm512_shuffle_i64x2::<0xEE>(y1, y3),
    ];
    (ya, bsums)
}

/// The 2-bit fields `j` (bits `2j..2j + 2`) of the 64 bytes of `qs`: values `32j..32j +
/// 32` of each half (the order of [`two_bit_acts`]).
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn two_bits(q: __m512i, j: usize) -> __m512i {
    let shifted = match j {
        0 => q,
        1 => _mm512_srli_epi16::<2>(q),
        2 => _mm512_srli_epi16::<4>(q),
        _ => _mm512_srli_epi16::<6>(q),
    };
    _mm512_and_si512(shifted, _mm512_set1_epi8(3))
}

/// Per shift `j` of Q3_K's 2-bit values (values `32j..32j + 32` of each 128-value half):
/// the `hmask` bit of each half's values (first 32 bytes: bit j; last 32: bit 4 + j).
const fn q3k_bits(j: u8) -> [u8; 64] {
    let mut c = [0u8; 64];
    let mut i = 0;
    while i < 64 {
        c[i] = 1 << if i < 32 { j } else { 4 + j };
        i += 1;
    }
    c
}
const Q3K_BITS: [[u8; 64]; 4] = [q3k_bits(0), q3k_bits(1), q3k_bits(2), q3k_bits(3)];

/// i16 lane indices spreading 16-value sub-block scales over a vector of values
/// `32j..32j + 32` of each half: scales 2j, 2j + 1, 8 + 2j, 9 + 2j, each over 8 lanes.
const fn q3k_spread(j: u16) -> [u16; 32] {
    let mut c = [0u16; 32];
    let mut i = 0;
    while i < 32 {
        c[i] = 2 * j + (i as u16 / 8) % 2 + 8 * (i as u16 / 16);
        i += 1;
    }
    c
}
const Q3K_SPREAD: [[u16; 32]; 4] = [q3k_spread(0), q3k_spread(1), q3k_spread(2), q3k_spread(3)];

/// Q3_K: rows `0, stride, …` (`R`) of `w` against token `t` of `a`, as [`tile_q4k`]. Each
/// value is held as `u = value + 4` (the 2-bit part plus 4 where its `hmask` bit is set,
/// under a byte mask): 0..=7; `4 · Σ scale · bsum` is taken away at the end, as Q6_K does
/// with its offset 32.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile_q3k<const R: usize, const PF: bool>(
    w: &[BlockQ3K],
    stride: usize,
    a: &[BlockQ8K],
    nb: usize,
    t: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    let ahead = check_tile(R, w, stride, a, nb, t, n_tok, out);
    let four = _mm512_set1_epi8(4);
    // SAFETY: the bit selectors are 64 bytes, the lane indices 32 × 2 bytes.
    let (bits, spread) = unsafe {
        (
            Q3K_BITS.map(|p| _mm512_loadu_si512(p.as_ptr() as *const _)),
            Q3K_SPREAD.map(|p| _mm512_loadu_si512(p.as_ptr() as *const _)),
        )
    };
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let y = &a[t * nb + b];
        let (ya, bsums) = two_bit_acts(y);
        for r in 0..R {
            let x = &w[r * stride * nb + b];
            prefetch_if::<PF>((x as *const BlockQ3K as *const u8).wrapping_add(ahead), 110);
            // SAFETY: register operations on the 12 scale bytes; a 64-byte load of qs and
            // a 32-byte load of hmask.
            let (scales, q, hm) = unsafe {
                (
                    _mm256_cvtepi8_epi16(super::avx2::q3k_scales(x)),
                    _mm512_loadu_si512(x.qs.as_ptr() as *const _),
                    _mm512_broadcast_i64x4(_mm256_loadu_si256(x.hmask.as_ptr() as *const __m256i)),
                )
            };
            let scales512 = _mm512_castsi256_si512(scales);
            let mut sum = _mm512_setzero_si512();
            for j in 0..4 {
                let low = two_bits(q, j);
                let high = _mm512_test_epi8_mask(hm, bits[j]);
                let u = _mm512_mask_add_epi8(low, high, low, four);
                let pairs16 = _mm512_maddubs_epi16(u, ya[j]);
                let scale16 = _mm512_permutexvar_epi16(spread[j], scales512);
                sum = _mm512_dpwssd_epi32(sum, pairs16, scale16);
            }
            let offset = _mm256_slli_epi32::<2>(_mm256_madd_epi16(scales, bsums));
            let sum = _mm512_sub_epi32(sum, _mm512_zextsi256_si512(offset));
            let d = h2f(x.d) * y.d;
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(d), acc[r]);
        }
    }
    for r in 0..R {
        out[r * stride * n_tok + t] = _mm512_reduce_add_ps(acc[r]);
    }
}

/// Q2_K: rows `0, stride, …` (`R`) of `w` against token `t` of `a`, as [`tile_q4k`]. The
/// 2-bit values sit in `qs` as Q3_K's do (value `32j + l` of a half in bits `2j` of byte
/// `l`), so the activations and the scales' lanes are arranged as in [`tile_q3k`]; each
/// 16-value sub-block has a 4-bit scale (low nibble) and a 4-bit min (high nibble), the
/// mins meeting the activations' 16-value sums (`bsums`) in one `vpmaddwd`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile_q2k<const R: usize, const PF: bool>(
    w: &[BlockQ2K],
    stride: usize,
    a: &[BlockQ8K],
    nb: usize,
    t: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    let ahead = check_tile(R, w, stride, a, nb, t, n_tok, out);
    let low4 = _mm_set1_epi8(0x0F);
    // SAFETY: the lane indices are 32 × 2 bytes.
    let spread = unsafe { Q3K_SPREAD.map(|p| _mm512_loadu_si512(p.as_ptr() as *const _)) };
    let mut acc = [_mm512_setzero_ps(); R];
    let mut acc_min = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let y = &a[t * nb + b];
        let (ya, bsums) = two_bit_acts(y);
        for r in 0..R {
            let x = &w[r * stride * nb + b];
            prefetch_if::<PF>((x as *const BlockQ2K as *const u8).wrapping_add(ahead), 84);
            // SAFETY: a 16-byte load of the scales and a 64-byte load of qs.
            let (sc, q) = unsafe {
                (
                    _mm_loadu_si128(x.scales.as_ptr() as *const __m128i),
                    _mm512_loadu_si512(x.qs.as_ptr() as *const _),
                )
            };
            let scales = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_and_si128(sc, low4)));
            let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(sc), low4));
            let mut sum = _mm512_setzero_si512();
            for j in 0..4 {
                let u = two_bits(q, j);
                let pairs16 = _mm512_maddubs_epi16(u, ya[j]);
                let scale16 = _mm512_permutexvar_epi16(spread[j], scales);
                sum = _mm512_dpwssd_epi32(sum, pairs16, scale16);
            }
            let d = h2f(x.d) * y.d;
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(d), acc[r]);
            let msum = _mm256_madd_epi16(mins, bsums);
            let dmin = h2f(x.dmin) * y.d;
            acc_min[r] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(msum), _mm256_set1_ps(dmin), acc_min[r]);
        }
    }
    for r in 0..R {
        out[r * stride * n_tok + t] = _mm512_reduce_add_ps(acc[r]) - hsum_ps(acc_min[r]);
    }
}

/// Q6_K: rows `0, stride, …` (`R`) of `w` against token `t` of `a`, as [`tile_q4k`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile_q6k<const R: usize, const PF: bool>(
    w: &[BlockQ6K],
    stride: usize,
    a: &[BlockQ8K],
    nb: usize,
    t: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    let ahead = check_tile(R, w, stride, a, nb, t, n_tok, out);
    let low4 = _mm512_set1_epi8(0x0F);
    let bits45 = _mm512_set1_epi8(0x30);
    // The high bits of values 0..32 and 32..64 of a half are qh's bits 0-1 and 2-3 (shift
    // left 4 and 2 into bits 4-5); of values 64..96 and 96..128, bits 4-5 and 6-7 (shift
    // right 0 and 2). Shifts are per i16 lane; the mask drops what crosses bytes.
    let shl = _mm512_inserti64x4::<1>(_mm512_set1_epi16(4), _mm256_set1_epi16(2));
    let shr = _mm512_inserti64x4::<1>(_mm512_set1_epi16(0), _mm256_set1_epi16(2));
    // i16 lanes of scales 4k..4k+4, each over 8 lanes (16 values).
    let spread = |k: i16| {
        let q = |j: i16| 4 * k + j;
        _mm512_set_epi16(
            q(3),
            q(3),
            q(3),
            q(3),
            q(3),
            q(3),
            q(3),
            q(3),
            q(2),
            q(2),
            q(2),
            q(2),
            q(2),
            q(2),
            q(2),
            q(2),
            q(1),
            q(1),
            q(1),
            q(1),
            q(1),
            q(1),
            q(1),
            q(1),
            q(0),
            q(0),
            q(0),
            q(0),
            q(0),
            q(0),
            q(0),
            q(0),
        )
    };
    let spreads = [spread(0), spread(1), spread(2), spread(3)];
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let y = &a[t * nb + b];
        // SAFETY: 64-byte loads inside the 256-byte qs, 32 bytes of bsums.
        let (ys, bsums) = unsafe {
            let p = y.qs.as_ptr();
            (
                [0, 64, 128, 192].map(|o| _mm512_loadu_si512(p.add(o) as *const _)),
                _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i),
            )
        };
        for r in 0..R {
            let x = &w[r * stride * nb + b];
            prefetch_if::<PF>((x as *const BlockQ6K as *const u8).wrapping_add(ahead), 210);
            // SAFETY: 16 scale bytes, two 64-byte loads of the 128-byte ql, two 32-byte
            // loads of the 64-byte qh.
            let (scales, ql, qh) = unsafe {
                (
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(x.scales.as_ptr() as *const __m128i)),
                    [0, 64].map(|o| _mm512_loadu_si512(x.ql.as_ptr().add(o) as *const _)),
                    [0, 32].map(|o| {
                        let h = _mm256_loadu_si256(x.qh.as_ptr().add(o) as *const __m256i);
                        _mm512_broadcast_i64x4(h)
                    }),
                )
            };
            let scales = _mm512_castsi256_si512(scales);
            let mut sum = _mm512_setzero_si512();
            for half in 0..2 {
                let (l, h) = (ql[half], qh[half]);
                let u = [
                    _mm512_or_si512(
                        _mm512_and_si512(l, low4),
                        _mm512_and_si512(_mm512_sllv_epi16(h, shl), bits45),
                    ),
                    _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(l), low4),
                        _mm512_and_si512(_mm512_srlv_epi16(h, shr), bits45),
                    ),
                ];
                for (k, u) in u.iter().enumerate() {
                    let pairs16 = _mm512_maddubs_epi16(*u, ys[2 * half + k]);
                    let scale16 = _mm512_permutexvar_epi16(spreads[2 * half + k], scales);
                    sum = _mm512_dpwssd_epi32(sum, pairs16, scale16);
                }
            }
            // The stored values are q + 32: take 32 · Σ scale · bsum away.
            let offset =
                _mm256_slli_epi32::<5>(_mm256_madd_epi16(_mm512_castsi512_si256(scales), bsums));
            let sum = _mm512_sub_epi32(sum, _mm512_zextsi256_si512(offset));
            let d = h2f(x.d) * y.d;
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(d), acc[r]);
        }
    }
    for r in 0..R {
        out[r * stride * n_tok + t] = _mm512_reduce_add_ps(acc[r]);
    }
}

macro_rules! kquant_gemm {
    ($name:ident, $block:ty, $tile:ident $(::<$generic:ty>)?) => {
        /// All rows of `w` (`out.len() / n_tok`, `nb` super-blocks each) against `n_tok`
        /// tokens of `a`: `out[r * n_tok + t]`, in `quarter_tiles` order.
        #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
        pub unsafe fn $name<const PF: bool>(
            w: &[$block],
            a: &[BlockQ8K],
            nb: usize,
            n_tok: usize,
            out: &mut [f32],
        ) {
            super::quarter_tiles(out.len() / n_tok, |r, stride, four| {
                let (wr, o) = (&w[r * nb..], &mut out[r * n_tok..]);
                for t in 0..n_tok {
                    // SAFETY: the features are enabled here; the tiles assert bounds.
                    unsafe {
                        if four {
                            $tile::<$($generic,)? 4, PF>(wr, stride, a, nb, t, n_tok, o);
                        } else {
                            $tile::<$($generic,)? 1, PF>(wr, 0, a, nb, t, n_tok, o);
                        }
                    }
                }
            });
        }
    };
}

kquant_gemm!(gemm_q4k, BlockQ4K, tile_q4k::<BlockQ4K>);
kquant_gemm!(gemm_q5k, BlockQ5K, tile_q4k::<BlockQ5K>);
kquant_gemm!(gemm_q6k, BlockQ6K, tile_q6k);
kquant_gemm!(gemm_iq4xs, BlockIQ4XS, tile_iq4xs);
kquant_gemm!(gemm_q3k, BlockQ3K, tile_q3k);
kquant_gemm!(gemm_q2k, BlockQ2K, tile_q2k);
