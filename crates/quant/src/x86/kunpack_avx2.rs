//! AVX2 products of prompt tokens for the super-block types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
//! IQ4_XS) with Q8_K activations, on `kunpack`'s unpacked form with integer scales.
//!
//! Rows are unpacked a few super-blocks at a time into a buffer that stays in L1: 256 bytes
//! `u`, and per 32 values the two 16-value groups' scales `v` as i16 lanes (the `vpmaddwd`
//! operand), plus the corrections `w`, `d`, `e` of [`IntScales`]. Then, per token and
//! super-block, for a row: `vpmaddubsw` (u8 × i8 pairs, at most 2 · 63 · 127: no
//! saturation) and `vpmaddwd` by the group scales for each 32 values, summed in i32 lanes;
//! `vpmaddwd` of the activations' group sums by `w`; two conversions and FMAs:
//! `Σ w·a = d_a · (d · Σ_g v_g Σ u·q − e · Σ_g w_g · bsum_g)`. IQ4_XS's values (`u − 128`)
//! take the sign trick, |value| × (q · sign), and no correction.
//!
//! Every (row, token) goes through the same operations whatever the batch.
#![allow(clippy::missing_safety_doc)] // callers must have detected AVX2, FMA and F16C

use super::avx2::hsum_ps;
use super::kunpack::Unpack;
use crate::blocks::*;
use std::arch::x86_64::*;

/// One unpacked super-block.
#[repr(C, align(32))]
#[derive(Clone, Copy)]
struct Unpacked {
    u: [u8; QK_K],
    /// Per 32 values: the first group's scale in lanes 0..8, the second's in 8..16.
    v: [[i16; 16]; QK_K / 32],
    /// Per 16-value group: the correction factor `w_g`.
    w: [i16; 16],
    d: f32,
    e: f32,
}

const EMPTY: Unpacked = Unpacked {
    u: [0; QK_K],
    v: [[0; 16]; QK_K / 32],
    w: [0; 16],
    d: 0.0,
    e: 0.0,
};

#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn unpack<W: Unpack>(b: &W, out: &mut Unpacked) {
    // SAFETY: stores inside `out` (32-byte aligned fields of 32 bytes); AVX2 is enabled.
    unsafe {
        b.values(&mut out.u);
        let s = b.scales();
        if W::OFFSET_128 {
            let flip = _mm256_set1_epi8(0x80u8 as i8);
            for c in 0..QK_K / 32 {
                let p = out.u.as_mut_ptr().add(32 * c) as *mut __m256i;
                _mm256_storeu_si256(p, _mm256_xor_si256(_mm256_loadu_si256(p), flip));
            }
            out.w = [0; 16];
            out.e = 0.0;
        } else {
            _mm256_storeu_si256(
                out.w.as_mut_ptr() as *mut __m256i,
                _mm256_cvtepi8_epi16(s.w),
            );
            out.e = s.e;
        }
        out.d = s.d;
        for c in 0..QK_K / 32 {
            // Bytes 2c (×8) then 2c + 1 (×8), widened.
            let lo = _mm_set1_epi8(2 * c as i8);
            let idx = _mm_unpacklo_epi64(lo, _mm_set1_epi8(2 * c as i8 + 1));
            let pair = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(s.v, idx));
            _mm256_storeu_si256(out.v[c].as_mut_ptr() as *mut __m256i, pair);
        }
    }
}

/// `Σ w·a` of one unpacked block and `N` activation blocks (`d_a · (d · Σ_g v_g Σ u·q −
/// e · Σ_g w_g · bsum_g)`), added into `acc`: the block's values and scales are loaded once
/// for the `N` tokens.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn block_dot<const SIGNED: bool, const N: usize>(
    b: &Unpacked,
    y: [&BlockQ8K; N],
    acc: &mut [__m256; N],
) {
    // SAFETY: 32-byte loads inside `u`, `v`, `w` and the activations' `qs` and `bsums`.
    unsafe {
        let mut isum = [_mm256_setzero_si256(); N];
        for c in 0..QK_K / 32 {
            let u = _mm256_load_si256(b.u.as_ptr().add(32 * c) as *const __m256i);
            let v = _mm256_load_si256(b.v[c].as_ptr() as *const __m256i);
            let au = _mm256_sign_epi8(u, u);
            for (y, isum) in y.iter().zip(isum.iter_mut()) {
                let q = _mm256_loadu_si256(y.qs.as_ptr().add(32 * c) as *const __m256i);
                let p = if SIGNED {
                    _mm256_maddubs_epi16(au, _mm256_sign_epi8(q, u))
                } else {
                    _mm256_maddubs_epi16(u, q)
                };
                *isum = _mm256_add_epi32(*isum, _mm256_madd_epi16(p, v));
            }
        }
        let w = _mm256_load_si256(b.w.as_ptr() as *const __m256i);
        for ((y, isum), acc) in y.iter().zip(isum).zip(acc.iter_mut()) {
            let da = y.d;
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(b.d * da), *acc);
            if !SIGNED {
                let bsums = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
                let corr = _mm256_cvtepi32_ps(_mm256_madd_epi16(bsums, w));
                *acc = _mm256_fmadd_ps(corr, _mm256_set1_ps(-b.e * da), *acc);
            }
        }
    }
}

/// `block_dot` for `N` tokens `t..t + N` of the pass starting at `p0`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn tokens_dot<W: Unpack, const N: usize>(
    b: &Unpacked,
    a: &[BlockQ8K],
    nb: usize,
    t: usize,
    p0: usize,
    blk: usize,
    acc: &mut [__m256; TOKEN_PASS],
) {
    let y: [&BlockQ8K; N] = std::array::from_fn(|i| &a[(t + i) * nb + blk]);
    let mut part: [__m256; N] = std::array::from_fn(|i| acc[t - p0 + i]);
    // SAFETY: AVX2 is enabled here.
    unsafe {
        if W::OFFSET_128 {
            block_dot::<true, N>(b, y, &mut part)
        } else {
            block_dot::<false, N>(b, y, &mut part)
        }
    }
    acc[t - p0..t - p0 + N].copy_from_slice(&part);
}

/// Rows per pass, super-blocks unpacked per pass (the buffer stays in L1), tokens per pass
/// (their activations stay in L2 while the buffer is reused).
const ROWS: usize = 4;
const CHUNK: usize = 8;
const TOKEN_PASS: usize = 64;

/// All rows of `w` (`out.len() / n_tok`, `nb` super-blocks each) against `n_tok` tokens of
/// `a`: `out[r * n_tok + t]`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm<W: Unpack>(w: &[W], a: &[BlockQ8K], nb: usize, n_tok: usize, out: &mut [f32]) {
    let rows = out.len() / n_tok;
    assert!(w.len() >= rows * nb && a.len() >= n_tok * nb);
    let mut buf = [[EMPTY; CHUNK]; ROWS];
    for p0 in (0..n_tok).step_by(TOKEN_PASS) {
        let p1 = (p0 + TOKEN_PASS).min(n_tok);
        for r0 in (0..rows).step_by(ROWS) {
            let nr = (rows - r0).min(ROWS);
            let mut acc = [[_mm256_setzero_ps(); TOKEN_PASS]; ROWS];
            for c0 in (0..nb).step_by(CHUNK) {
                let nc = (nb - c0).min(CHUNK);
                for (r, row) in buf.iter_mut().enumerate().take(nr) {
                    for (k, u) in row.iter_mut().enumerate().take(nc) {
                        // SAFETY: AVX2 is enabled here; the block is inside `w` (asserted).
                        unsafe { unpack(&w[(r0 + r) * nb + c0 + k], u) };
                    }
                }
                // Tokens in pairs (each row's unpacked block loaded once for both), the
                // last one alone: the same operations per token either way.
                let pairs_end = p0 + (p1 - p0) / 2 * 2;
                for t in (p0..p1).step_by(2) {
                    for k in 0..nc {
                        for (row, acc) in buf.iter().zip(acc.iter_mut()).take(nr) {
                            // SAFETY: AVX2 is enabled here.
                            unsafe {
                                if t < pairs_end {
                                    tokens_dot::<W, 2>(&row[k], a, nb, t, p0, c0 + k, acc)
                                } else {
                                    tokens_dot::<W, 1>(&row[k], a, nb, t, p0, c0 + k, acc)
                                }
                            }
                        }
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate().take(nr) {
                for t in p0..p1 {
                    out[(r0 + r) * n_tok + t] = hsum_ps(acc[t - p0]);
                }
            }
        }
    }
}
