//! AVX-512 VNNI kernels (256-bit `vpdpbusd`, needs AVX512F/BW/VL/VNNI) for the 32-value
//! block types against 8-bit activations, as tiles of up to 4 weight rows × 4 tokens.
//!
//! Every block type is put in one form: unsigned bytes `u` (0..=255), a scale `dw` and a
//! per-block offset `mw`, so that `w = dw · u + mw` (Q4_1: `mw = m`; Q4_0/Q5_0/Q8_0:
//! `mw = -off · dw` with off 8/16/128). Then
//! `Σ w·a = dw·da·Σ u·q + mw·sa` with `sa = da·Σq` per activation block (see `ActBlocks`).
//! `vpdpbusd` multiplies u8 × i8 and sums groups of four into i32 lanes with no
//! saturation, so the integer part is exact; only float rounding differs from the reference.
//!
//! A tile decodes each weight block once for all its tokens, and loads each activation
//! block once for all its rows; the 16 accumulators stay in registers (AVX-512VL has 32).
#![allow(clippy::missing_safety_doc)] // callers must have detected the features listed

use super::avx2::{h2f, hsum_ps, nibbles_32};
use crate::blocks::*;
use crate::ActBlocks;
use std::arch::x86_64::*;

/// A weight block type in the `dw · u + mw` form.
pub trait Unsigned32: Copy {
    unsafe fn bytes(&self) -> __m256i;
    fn scale_offset(&self) -> (f32, f32);
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

/// `(d, -off · d)`: the form of the types whose values are `d · (u - off)`.
#[inline(always)]
fn offset_by(d: half::f16, off: f32) -> (f32, f32) {
    // SAFETY: F16C is enabled in every kernel that inlines this.
    let d = unsafe { h2f(d) };
    (d, -off * d)
}

impl Unsigned32 for BlockQ4_0 {
    #[inline(always)]
    unsafe fn bytes(&self) -> __m256i {
        // SAFETY: reads the 16 bytes of qs; AVX2 is enabled in every kernel that inlines this.
        unsafe { nibbles_32(&self.qs) }
    }
    #[inline(always)]
    fn scale_offset(&self) -> (f32, f32) {
        offset_by(self.d, 8.0)
    }
}

impl Unsigned32 for BlockQ4_1 {
    #[inline(always)]
    unsafe fn bytes(&self) -> __m256i {
        // SAFETY: reads the 16 bytes of qs; AVX2 is enabled in every kernel that inlines this.
        unsafe { nibbles_32(&self.qs) }
    }
    #[inline(always)]
    fn scale_offset(&self) -> (f32, f32) {
        // SAFETY: F16C is enabled in every kernel that inlines this.
        unsafe { (h2f(self.d), h2f(self.m)) }
    }
}

impl Unsigned32 for BlockQ5_0 {
    #[inline(always)]
    unsafe fn bytes(&self) -> __m256i {
        // SAFETY: AVX2 is enabled by every caller; `nibbles_32` reads the 16 bytes of qs.
        unsafe {
            let fifth = super::avx2::bits_to_bytes_32(u32::from_le_bytes(self.qh));
            _mm256_or_si256(
                nibbles_32(&self.qs),
                _mm256_and_si256(fifth, _mm256_set1_epi8(0x10)),
            )
        }
    }
    #[inline(always)]
    fn scale_offset(&self) -> (f32, f32) {
        offset_by(self.d, 16.0)
    }
}

impl Unsigned32 for BlockQ8_0 {
    #[inline(always)]
    unsafe fn bytes(&self) -> __m256i {
        // SAFETY: reads exactly the 32 bytes of qs; AVX2 is enabled by every caller.
        unsafe {
            let q = _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i);
            _mm256_xor_si256(q, _mm256_set1_epi8(0x80u8 as i8)) // q + 128 as u8
        }
    }
    #[inline(always)]
    fn scale_offset(&self) -> (f32, f32) {
        offset_by(self.d, 128.0)
    }
}

/// How far ahead of the current block each row prefetches (at least one tile): decode
/// reads weights once, straight from memory, and the hardware prefetcher alone leaves the
/// loop waiting on loads (measured: +30–40% tokens/s on both models).
const PREFETCH_BYTES: usize = 4096;

/// `R` rows (starting at `w`, `nb` blocks each) × `T` tokens (starting at token `t0` of
/// `a`); results go to `out[r * n_tok + t0 + t]`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile<W: Unsigned32, A: Signed32, const R: usize, const T: usize>(
    w: &[W],
    a: &ActBlocks<A>,
    nb: usize,
    t0: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(w.len() >= R * nb && a.blocks.len() >= (t0 + T) * nb);
    assert!(a.d.len() >= (t0 + T) * nb && a.s.len() >= (t0 + T) * nb);
    assert!(out.len() >= (R - 1) * n_tok + t0 + T);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut offs = [[0f32; T]; R];
    for b in 0..nb {
        let mut y = [_mm256_setzero_si256(); T];
        let mut da = [0f32; T];
        let mut sa = [0f32; T];
        for t in 0..T {
            let i = (t0 + t) * nb + b;
            // SAFETY: `i` is in bounds (asserted above); 32 bytes of the block's qs.
            y[t] = unsafe { _mm256_loadu_si256(a.blocks[i].qs().as_ptr() as *const __m256i) };
            da[t] = a.d[i];
            sa[t] = a.s[i];
        }
        for r in 0..R {
            let blk = &w[r * nb + b];
            let ahead = (blk as *const W as *const i8)
                .wrapping_add(PREFETCH_BYTES.max(R * nb * size_of::<W>()));
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            // SAFETY: the block's bytes; the features are enabled here.
            let u = unsafe { blk.bytes() };
            let (dw, mw) = blk.scale_offset();
            for t in 0..T {
                let p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, y[t]);
                let scale = _mm256_set1_ps(dw * da[t]);
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), scale, acc[r][t]);
                offs[r][t] += mw * sa[t];
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            out[r * n_tok + t0 + t] = hsum_ps(acc[r][t]) + offs[r][t];
        }
    }
}

/// Two 256-bit halves as one 512-bit vector.
#[inline(always)]
fn join_ps(lo: __m256, hi: __m256) -> __m512 {
    // SAFETY: AVX-512F is enabled by every caller.
    unsafe {
        _mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
            _mm256_castps_pd(hi),
            1,
        ))
    }
}

/// The 4 rows × 4 tokens tile with 512-bit vectors: tokens go in pairs, one per half, so
/// each weight block (broadcast to both halves) costs one `vpdpbusd`, one conversion and
/// two float ops per pair of tokens instead of per token.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tile_4x4<W: Unsigned32, A: Signed32>(
    w: &[W],
    a: &ActBlocks<A>,
    nb: usize,
    t0: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(w.len() >= 4 * nb && a.blocks.len() >= (t0 + 4) * nb);
    assert!(a.d.len() >= (t0 + 4) * nb && a.s.len() >= (t0 + 4) * nb);
    assert!(out.len() >= 3 * n_tok + t0 + 4);
    let mut acc = [[_mm512_setzero_ps(); 2]; 4];
    let mut offs = [_mm_setzero_ps(); 4];
    for b in 0..nb {
        let i = |t: usize| (t0 + t) * nb + b;
        // SAFETY: indices in bounds (asserted above); 32 bytes of each block's qs.
        let y = |t: usize| unsafe {
            _mm512_castsi256_si512(_mm256_loadu_si256(
                a.blocks[i(t)].qs().as_ptr() as *const __m256i
            ))
        };
        let y01 = _mm512_inserti64x4(y(0), _mm512_castsi512_si256(y(1)), 1);
        let y23 = _mm512_inserti64x4(y(2), _mm512_castsi512_si256(y(3)), 1);
        let da01 = join_ps(_mm256_set1_ps(a.d[i(0)]), _mm256_set1_ps(a.d[i(1)]));
        let da23 = join_ps(_mm256_set1_ps(a.d[i(2)]), _mm256_set1_ps(a.d[i(3)]));
        let sa = _mm_setr_ps(a.s[i(0)], a.s[i(1)], a.s[i(2)], a.s[i(3)]);
        for r in 0..4 {
            let blk = &w[r * nb + b];
            let ahead = (blk as *const W as *const i8)
                .wrapping_add(PREFETCH_BYTES.max(4 * nb * size_of::<W>()));
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            // SAFETY: the block's bytes; the features are enabled here.
            let u = _mm512_broadcast_i64x4(unsafe { blk.bytes() });
            let (dw, mw) = blk.scale_offset();
            let dwv = _mm512_set1_ps(dw);
            // mul then add, as the scalar tiles do: a token's result must not depend on
            // its place in the batch (batched decoding equals decoding alone, bit for bit).
            offs[r] = _mm_add_ps(offs[r], _mm_mul_ps(_mm_set1_ps(mw), sa));
            let p01 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, y01);
            let p23 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, y23);
            acc[r][0] =
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(p01), _mm512_mul_ps(dwv, da01), acc[r][0]);
            acc[r][1] =
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(p23), _mm512_mul_ps(dwv, da23), acc[r][1]);
        }
    }
    for r in 0..4 {
        let mut o = [0f32; 4];
        _mm_storeu_ps(o.as_mut_ptr(), offs[r]);
        for (pair, v) in acc[r].iter().enumerate() {
            let lo = _mm512_castps512_ps256(*v);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(*v), 1));
            out[r * n_tok + t0 + 2 * pair] = hsum_ps(lo) + o[2 * pair];
            out[r * n_tok + t0 + 2 * pair + 1] = hsum_ps(hi) + o[2 * pair + 1];
        }
    }
}

/// All rows of `w` (`out.len() / n_tok` of them, `nb` blocks each) against `n_tok` tokens:
/// `out[r * n_tok + t]`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn gemm<W: Unsigned32, A: Signed32>(
    w: &[W],
    a: &ActBlocks<A>,
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    let rows = out.len() / n_tok;
    let full_rows = rows / 4 * 4;
    let full_toks = n_tok / 4 * 4;
    for r in (0..rows).step_by(4) {
        let wr = &w[r * nb..];
        let o = &mut out[r * n_tok..];
        // SAFETY (all calls): the features are enabled here; the tiles' bounds are asserted.
        unsafe {
            if r < full_rows {
                for t in (0..full_toks).step_by(4) {
                    tile_4x4::<W, A>(wr, a, nb, t, n_tok, o);
                }
                for t in full_toks..n_tok {
                    tile::<W, A, 4, 1>(wr, a, nb, t, n_tok, o);
                }
            } else {
                for i in 0..rows - r {
                    let wi = &wr[i * nb..];
                    let oi = &mut o[i * n_tok..];
                    for t in (0..full_toks).step_by(4) {
                        tile::<W, A, 1, 4>(wi, a, nb, t, n_tok, oi);
                    }
                    for t in full_toks..n_tok {
                        tile::<W, A, 1, 1>(wi, a, nb, t, n_tok, oi);
                    }
                }
            }
        }
    }
}
