//! AVX2 products of prompt tokens for the super-block types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
//! IQ4_XS) with Q8_K activations, on 8-row panels interleaved on the fly (as `kpanel` does
//! at AVX-512 with 16 rows).
//!
//! A panel's super-blocks are unpacked (`kunpack::Unpack`) into a buffer where each 32
//! bytes hold 4 consecutive values of the 8 rows; per 16-value group the rows' integer
//! scales `v_g` and corrections `w_g` sit as i16 pairs, one pair per row. Per token and
//! group, `vpmaddubsw` of the buffer with the token's 4 activation bytes broadcast gives 2
//! pair sums per row; these add up in i16 over as many groups of 4 as cannot overflow
//! (`2 · max · 127 · run < 2¹⁵`), then one `vpmaddwd` by the rows' `v_g` adds them into one
//! i32 sum per row for the whole super-block, exactly. The corrections are a `vpmaddwd` of
//! two groups' `w` by the two activation sums; per super-block two conversions and FMAs:
//! `Σ w·a = d_a · (d · Σ_g v_g Σ u·q − e · Σ_g w_g · bsum_g)`. IQ4_XS's values (`u − 128`)
//! are held signed and take the sign trick, with no correction.
//!
//! Each (row, token) goes through the same operations whatever the batch's other tokens.
#![allow(clippy::missing_safety_doc)] // callers must have detected AVX2, FMA and F16C

use super::kunpack::{Rows, Unpack};
use crate::blocks::*;
use std::arch::x86_64::*;

/// Rows per panel (one 8-lane vector), super-blocks per chunk (the buffer stays in L1),
/// tokens per tile.
const PANEL: usize = 8;
const CHUNK: usize = 4;
const TOKENS: usize = 4;
const GROUPS: usize = QK_K / 16;

/// One chunk of a panel: per super-block, 64 × 32 bytes (4 values of each of the 8 rows),
/// per group the rows' scales as i16 pairs, per two groups the rows' corrections (lanes
/// 2i, 2i + 1: row i's `w` of the two groups), and the rows' `d` and `e`.
#[repr(C, align(32))]
struct Packed {
    u: [[[u8; 32]; QK_K / 4]; CHUNK],
    v: [[[i16; 16]; GROUPS]; CHUNK],
    w: [[[i16; 16]; GROUPS / 2]; CHUNK],
    d: [[f32; PANEL]; CHUNK],
    e: [[f32; PANEL]; CHUNK],
}

/// Puts super-blocks `c0..c0 + nc` of panel rows `r0..r0 + nr` (of `w`, `nb` per row) into
/// `p`; rows past `nr` are zero.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pack<S: Rows>(
    w: S,
    nb: usize,
    r0: usize,
    nr: usize,
    c0: usize,
    nc: usize,
    p: &mut Packed,
) {
    assert!(nr <= PANEL && nc <= CHUNK && c0 + nc <= nb);
    // Rows past `nr` stay zero.
    let mut vals = [[0u8; QK_K]; PANEL];
    let flip = _mm256_set1_epi8(if S::Block::OFFSET_128 {
        0x80u8 as i8
    } else {
        0
    });
    for k in 0..nc {
        for i in nr..PANEL {
            for g in 0..GROUPS {
                p.v[k][g][2 * i] = 0;
                p.v[k][g][2 * i + 1] = 0;
            }
            for h in 0..GROUPS / 2 {
                p.w[k][h][2 * i] = 0;
                p.w[k][h][2 * i + 1] = 0;
            }
            p.d[k][i] = 0.0;
            p.e[k][i] = 0.0;
        }
        for i in 0..nr {
            let blk = w.block(nb, r0 + i, c0 + k);
            // SAFETY: AVX2 is enabled; `values` and `scales` read the block.
            let sc = unsafe {
                blk.values(&mut vals[i]);
                blk.scales()
            };
            let (mut v, mut wv) = ([0i8; 16], [0i8; 16]);
            // SAFETY: 16-byte stores into the 16-byte arrays (SSE2, baseline).
            unsafe {
                _mm_storeu_si128(v.as_mut_ptr() as *mut __m128i, sc.v);
                _mm_storeu_si128(wv.as_mut_ptr() as *mut __m128i, sc.w);
            }
            for (pv, &v) in p.v[k].iter_mut().zip(&v) {
                pv[2 * i] = v as i16;
                pv[2 * i + 1] = v as i16;
            }
            for h in 0..GROUPS / 2 {
                let (w0, w1) = if S::Block::OFFSET_128 {
                    (0, 0)
                } else {
                    (wv[2 * h] as i16, wv[2 * h + 1] as i16)
                };
                p.w[k][h][2 * i] = w0;
                p.w[k][h][2 * i + 1] = w1;
            }
            p.d[k][i] = sc.d;
            p.e[k][i] = if S::Block::OFFSET_128 { 0.0 } else { sc.e };
        }
        // SAFETY: AVX2 is enabled; 32-byte loads inside each row of `vals`; 8 groups of
        // 32 bytes per 32 values, inside `p.u[k]` (QK_K / 4 groups).
        unsafe {
            let base = p.u[k].as_mut_ptr() as *mut __m256i;
            for c in 0..QK_K / 32 {
                super::panel_avx2::store_groups(base.add(8 * c), |i| {
                    let v = _mm256_loadu_si256(vals[i].as_ptr().add(32 * c) as *const __m256i);
                    // Rows past `nr` stay zero (their values are not flipped).
                    if i < nr {
                        _mm256_xor_si256(v, flip)
                    } else {
                        v
                    }
                });
            }
        }
    }
}

/// `T` tokens from `t0` against the packed chunk (super-blocks `c0..c0 + nc`), added into
/// `acc[t]` (8 rows each).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tokens<W: Unpack, const T: usize>(
    p: &Packed,
    a: &[BlockQ8K],
    nb: usize,
    t0: usize,
    c0: usize,
    nc: usize,
    acc: &mut [[f32; PANEL]],
) {
    assert!(a.len() >= (t0 + T) * nb && acc.len() >= t0 + T && c0 + nc <= nb);
    // Groups of 4 values whose i16 pair sums add up before widening (each is at most
    // 2 · max · 127; signed values: 2 · 127 · 127).
    let max = if W::OFFSET_128 { 127 } else { W::MAX_VALUE };
    // Groups sharing a scale (32 values) are one run where the sums allow it (Q4_K).
    let step: usize = if W::SCALE_PER_32 { 2 } else { 1 };
    let run = (32767 / (2 * max as usize * 127)).clamp(1, 4 * step);
    // SAFETY (whole body): block indices `(t0 + t) * nb + c0 + k` with `t < T`, `k < nc`
    // are inside the activations (asserted); the packed loads are aligned and inside `p`;
    // `acc[t0 + t]` holds 8 floats.
    unsafe {
        let mut sum: [__m256; T] = std::array::from_fn(|t| _mm256_loadu_ps(acc[t0 + t].as_ptr()));
        for k in 0..nc {
            let y: [&BlockQ8K; T] =
                std::array::from_fn(|t| a.get_unchecked((t0 + t) * nb + c0 + k));
            let mut isum = [_mm256_setzero_si256(); T];
            for g in (0..GROUPS).step_by(step) {
                let sv = _mm256_load_si256(p.v[k][g].as_ptr() as *const __m256i);
                for j0 in (4 * g..4 * (g + step)).step_by(run) {
                    let mut pairs = [_mm256_setzero_si256(); T];
                    for j in j0..j0 + run {
                        let u = _mm256_load_si256(p.u[k][j].as_ptr() as *const __m256i);
                        let x = if W::OFFSET_128 {
                            _mm256_sign_epi8(u, u)
                        } else {
                            u
                        };
                        for t in 0..T {
                            let q = (y[t].qs.as_ptr().add(4 * j) as *const i32).read_unaligned();
                            let q = _mm256_set1_epi32(q);
                            let q = if W::OFFSET_128 {
                                _mm256_sign_epi8(q, u)
                            } else {
                                q
                            };
                            pairs[t] = _mm256_add_epi16(pairs[t], _mm256_maddubs_epi16(x, q));
                        }
                    }
                    for t in 0..T {
                        isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(pairs[t], sv));
                    }
                }
            }
            let d = _mm256_load_ps(p.d[k].as_ptr());
            let e = _mm256_load_ps(p.e[k].as_ptr());
            for t in 0..T {
                let mut corr = _mm256_setzero_si256();
                if !W::OFFSET_128 {
                    for h in 0..GROUPS / 2 {
                        let wv = _mm256_load_si256(p.w[k][h].as_ptr() as *const __m256i);
                        let b = (y[t].bsums.as_ptr().add(2 * h) as *const i32).read_unaligned();
                        corr = _mm256_add_epi32(corr, _mm256_madd_epi16(wv, _mm256_set1_epi32(b)));
                    }
                }
                let part = _mm256_mul_ps(_mm256_cvtepi32_ps(isum[t]), d);
                let part = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(corr), e, part);
                sum[t] = _mm256_fmadd_ps(part, _mm256_set1_ps(y[t].d), sum[t]);
            }
        }
        for (t, sum) in sum.iter().enumerate() {
            _mm256_storeu_ps(acc[t0 + t].as_mut_ptr(), *sum);
        }
    }
}

/// The panel steps over one matrix and its activations.
struct Steps<'a, S> {
    w: S,
    a: &'a [BlockQ8K],
    nb: usize,
    p: Box<Packed>,
}

impl<S: Rows> super::PanelSteps<PANEL> for Steps<'_, S> {
    const CHUNK: usize = CHUNK;
    const TOKENS: usize = TOKENS;
    fn pack(&mut self, r0: usize, nr: usize, c0: usize, nc: usize) {
        // SAFETY: `Steps` is only built by `gemm`, whose caller detected the features;
        // `pack` asserts its bounds.
        unsafe { pack(self.w, self.nb, r0, nr, c0, nc, &mut self.p) }
    }
    fn tokens(&mut self, t: usize, one: bool, c0: usize, nc: usize, acc: &mut [[f32; PANEL]]) {
        let (p, a, nb) = (&*self.p, self.a, self.nb);
        // SAFETY: as above; `tokens` asserts its bounds.
        unsafe {
            if one {
                tokens::<S::Block, 1>(p, a, nb, t, c0, nc, acc)
            } else {
                tokens::<S::Block, TOKENS>(p, a, nb, t, c0, nc, acc)
            }
        }
    }
}

/// All rows of `w` (`out.width()`, `nb` super-blocks each) against every token of `a`,
/// into each token's columns of `out`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm<S: Rows>(w: S, a: &[BlockQ8K], nb: usize, out: &mut crate::pool::Columns) {
    let p = Box::new(Packed {
        u: [[[0; 32]; QK_K / 4]; CHUNK],
        v: [[[0; 16]; GROUPS]; CHUNK],
        w: [[[0; 16]; GROUPS / 2]; CHUNK],
        d: [[0.0; PANEL]; CHUNK],
        e: [[0.0; PANEL]; CHUNK],
    });
    super::prompt_panels(&mut Steps { w, a, nb, p }, nb, out);
}
