//! AVX2 tiles (`vpmaddubsw`, no VNNI) for the 32-value block types against 8-bit
//! activations: up to 4 weight rows × 3 tokens per tile, for decoding (one token, 4 rows
//! streaming from the 4 quarters of the matrix) and prompts alike.
//!
//! The weights take `vnni::Unsigned32`'s form `w = dw · u + mw`. Where `u ≤ 31` (Q4_0, Q4_1,
//! Q5_0, Q5_1), `vpmaddubsw` multiplies u8 × i8 and adds pairs into i16 lanes that cannot
//! saturate (2 · 31 · 128 < 2¹⁵); `vpmaddwd` by ones widens to i32, and the block's
//! `mw · sa` (`sa = da · Σq`) is added once per 8 blocks as one FMA. Q8_0 and IQ4_NL (offset
//! 128: `u − 128` is the signed value) take the sign trick instead, |w| × (q · sign w), exact
//! for the activations' −127..=127, with no offset term.
//!
//! Per 8 blocks and (row, token), one vector product of the rows' and tokens' scales; per
//! block and (row, token), the integer product, one conversion and one FMA into an 8-lane
//! accumulator; Q4_0 and Q4_1 take two blocks per integer product (`Unsigned32::duo`: one
//! load of both blocks' nibbles, the low and high halves' pair sums added in i16), ~10%
//! quicker decoding on Zen 4 at this level. Each (row, token) goes through the same
//! operations whatever the tile's shape, so a token's result does not depend on the batch
//! it is in (batched decoding equals decoding alone, bit for bit).
#![allow(clippy::missing_safety_doc)] // callers must have detected AVX2, FMA and F16C
#![allow(clippy::needless_range_loop)] // (row, token, block) indices address several arrays

use super::avx2::hsum_ps;
use super::vnni::{Signed32, Unsigned32};
use crate::ActBlocks;
use std::arch::x86_64::*;

/// How far ahead of the current block each row prefetches (see `vnni::PREFETCH_BYTES`).
const PREFETCH_BYTES: usize = 4096;

/// Blocks per scale group.
const GROUP: usize = 8;

/// Lane mask of the first `n` (≤ 8) lanes.
#[inline(always)]
unsafe fn first_lanes(n: usize) -> __m256i {
    // SAFETY: register operations only (AVX2 is enabled by every caller).
    unsafe {
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32), lane)
    }
}

/// `dw` and `mw` of blocks `w .. w + n` (lanes past `n` are 0).
#[inline(always)]
unsafe fn scales8<W: Unsigned32>(w: *const W, n: usize) -> (__m256, __m256) {
    let mut d = [0u16; GROUP];
    let mut m = [0u16; GROUP];
    for k in 0..n {
        // SAFETY: every block type here starts with its f16 `d` (Q4_1, Q5_1: then `m`); the
        // caller vouches for blocks `w .. w + n`.
        unsafe {
            let p = w.add(k) as *const u16;
            d[k] = p.read_unaligned();
            if W::HAS_M {
                m[k] = p.add(1).read_unaligned();
            }
        }
    }
    // SAFETY: 16-byte loads of the two arrays; F16C and AVX are enabled by every caller.
    unsafe {
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr() as *const __m128i));
        let mw = if W::HAS_M {
            _mm256_cvtph_ps(_mm_loadu_si128(m.as_ptr() as *const __m128i))
        } else {
            _mm256_mul_ps(dw, _mm256_set1_ps(-W::OFFSET))
        };
        (dw, mw)
    }
}

/// `R` rows (rows `0, stride, 2·stride, …` of `w`, `nb` blocks each) × `T` tokens
/// (starting at token `t0` of `a`); row `r`'s results go to
/// `out[r * stride * n_tok + t0 + t]`.
#[target_feature(enable = "avx2,fma,f16c")]
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
    // Offset 128: the bytes are the signed values shifted; take the sign trick.
    let signed = W::OFFSET == 128.0;
    let ones = _mm256_set1_epi16(1);
    let ahead = PREFETCH_BYTES.max(nb * size_of::<W>());
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut scale = [[[0f32; GROUP]; T]; R];
    let duo_lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    // SAFETY (whole loop): every block index below is `< nb` within its row (rows
    // `r * stride` for `r < R`, tokens `t0 + t < t0 + T`), which the asserts above keep
    // inside `w`, `a.blocks`, `a.d`, `a.s`; masked loads read only the first `n` lanes;
    // prefetches only hint and may point anywhere.
    unsafe {
        for g0 in (0..nb).step_by(GROUP) {
            let n = (nb - g0).min(GROUP);
            let mask = first_lanes(n);
            for r in 0..R {
                let (dw, mw) = scales8(w.as_ptr().add(r * stride * nb + g0), n);
                for t in 0..T {
                    let i = (t0 + t) * nb + g0;
                    let da = _mm256_maskload_ps(a.d.as_ptr().add(i), mask);
                    if !signed {
                        let sa = _mm256_maskload_ps(a.s.as_ptr().add(i), mask);
                        acc[r][t] = _mm256_fmadd_ps(mw, sa, acc[r][t]);
                    }
                    _mm256_storeu_ps(scale[r][t].as_mut_ptr(), _mm256_mul_ps(dw, da));
                }
            }
            let mut k = 0;
            // Q4_0 and Q4_1 go two blocks at a time while two are left (`duo`: both blocks'
            // nibbles from one load, split by one shift and two ANDs). IQ4_NL, on the sign
            // trick, measured slower that way (its halves must widen apart).
            while W::QUAD && !signed && k + 1 < n {
                let b = g0 + k;
                let mut y = [(_mm256_setzero_si256(), _mm256_setzero_si256()); T];
                for (t, y) in y.iter_mut().enumerate() {
                    let i = (t0 + t) * nb + b;
                    let (q0, q1) = (
                        a.blocks.get_unchecked(i).qs(),
                        a.blocks.get_unchecked(i + 1).qs(),
                    );
                    let half = |q: &[i8; 32], h: usize| {
                        _mm_loadu_si128(q.as_ptr().add(16 * h) as *const __m128i)
                    };
                    *y = (
                        _mm256_set_m128i(half(q1, 0), half(q0, 0)),
                        _mm256_set_m128i(half(q1, 1), half(q0, 1)),
                    );
                }
                for r in 0..R {
                    let blk = w.as_ptr().add(r * stride * nb + b);
                    _mm_prefetch::<_MM_HINT_T0>((blk as *const i8).wrapping_add(ahead));
                    let (lo, hi) = W::duo(blk);
                    for t in 0..T {
                        // u ≤ 15: the two halves' pair sums add in i16 (≤ 4·15·128).
                        let p0 = _mm256_maddubs_epi16(lo, y[t].0);
                        let p1 = _mm256_maddubs_epi16(hi, y[t].1);
                        let dot = _mm256_madd_epi16(_mm256_add_epi16(p0, p1), ones);
                        // Lanes 0..4 take block k's scale, 4..8 block k + 1's.
                        let two =
                            _mm_castpd_ps(_mm_load_sd(scale[r][t].as_ptr().add(k) as *const f64));
                        let sc = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), duo_lanes);
                        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, acc[r][t]);
                    }
                }
                k += 2;
            }
            while k < n {
                let b = g0 + k;
                let mut y = [_mm256_setzero_si256(); T];
                for (t, y) in y.iter_mut().enumerate() {
                    let q = a.blocks.get_unchecked((t0 + t) * nb + b).qs();
                    *y = _mm256_loadu_si256(q.as_ptr() as *const __m256i);
                }
                for r in 0..R {
                    let blk = w.as_ptr().add(r * stride * nb + b);
                    _mm_prefetch::<_MM_HINT_T0>((blk as *const i8).wrapping_add(ahead));
                    let (x, s) = if signed {
                        let s = (*blk).signed_bytes();
                        (_mm256_sign_epi8(s, s), s)
                    } else {
                        let u = (*blk).bytes();
                        (u, u)
                    };
                    for t in 0..T {
                        let q = if signed {
                            _mm256_sign_epi8(y[t], s)
                        } else {
                            y[t]
                        };
                        let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(x, q), ones);
                        let sc = _mm256_broadcast_ss(&scale[r][t][k]);
                        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sc, acc[r][t]);
                    }
                }
                k += 1;
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[r * stride * n_tok + t0 + t] = hsum_ps(acc[r][t]);
        }
    }
}

/// Tokens per prompt tile, and tokens per pass over a block of rows (their activations stay
/// in L2 while the rows' weights are reused).
const TOKENS: usize = 3;
const TOKEN_PASS: usize = 48;

/// All rows of `w` (`out.len() / n_tok` of them, `nb` blocks each) against `n_tok` tokens:
/// `out[r * n_tok + t]`. One token: 4 rows at a time from the 4 quarters (see
/// `quarter_tiles`); more: 4 × 3 tiles, tokens in passes of `TOKEN_PASS`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm<W: Unsigned32, A: Signed32>(
    w: &[W],
    a: &ActBlocks<A>,
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    let rows = out.len() / n_tok;
    if n_tok == 1 {
        super::quarter_tiles(rows, |r, stride, four| {
            let (wr, o) = (&w[r * nb..], &mut out[r..]);
            // SAFETY: the features are enabled here; the tiles' bounds are asserted.
            unsafe {
                if four {
                    tile::<W, A, 4, 1>(wr, stride, a, nb, 0, 1, o);
                } else {
                    tile::<W, A, 1, 1>(wr, 0, a, nb, 0, 1, o);
                }
            }
        });
        return;
    }
    let full_rows = rows / 4 * 4;
    for p0 in (0..n_tok).step_by(TOKEN_PASS) {
        let p1 = (p0 + TOKEN_PASS).min(n_tok);
        let full_toks = p0 + (p1 - p0) / TOKENS * TOKENS;
        for r in (0..rows).step_by(4) {
            let (wr, o) = (&w[r * nb..], &mut out[r * n_tok..]);
            // SAFETY (all calls): the features are enabled here; the tiles' bounds are
            // asserted.
            unsafe {
                if r < full_rows {
                    for t in (p0..full_toks).step_by(TOKENS) {
                        tile::<W, A, 4, TOKENS>(wr, 1, a, nb, t, n_tok, o);
                    }
                    for t in full_toks..p1 {
                        tile::<W, A, 4, 1>(wr, 1, a, nb, t, n_tok, o);
                    }
                } else {
                    for rr in 0..rows - r {
                        let (wr, o) = (&wr[rr * nb..], &mut o[rr * n_tok..]);
                        for t in (p0..full_toks).step_by(TOKENS) {
                            tile::<W, A, 1, TOKENS>(wr, 0, a, nb, t, n_tok, o);
                        }
                        for t in full_toks..p1 {
                            tile::<W, A, 1, 1>(wr, 0, a, nb, t, n_tok, o);
                        }
                    }
                }
            }
        }
    }
}
