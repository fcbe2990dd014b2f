//! AVX-512 VNNI products of prompt tokens for the super-block types (Q2_K, Q3_K, Q4_K,
//! Q5_K, Q6_K, IQ4_XS) with Q8_K activations, on 16-row panels interleaved on the fly (as
//! `panel` does for the 32-value types).
//!
//! A panel's super-blocks are unpacked (`kunpack::Unpack`: 256 unsigned values, group
//! scales `s_g = d · v_g` and corrections `e · w_g` per 16 values) a chunk at a time
//! into a buffer where each 64 bytes hold 4 consecutive values of the 16 rows, with the 16
//! rows' `s_g` as vectors and `w_g` as i16 pairs. Then per token, super-block and group: 4
//! `vpdpbusd` (the token's 4 activation bytes broadcast) into one i32 vector for 16 rows,
//! one conversion and FMA by the rows' `s_g` (per two groups, 8 `vpdpbusd`, where the
//! type's scales cover 32 values: Q4_K, Q5_K, IQ4_XS); per super-block 8 `vpdpwssd` of the
//! `w_g` pairs with the token's pairs of group sums (4 of 32-value pairs where the scales
//! cover 32 values; exact in i32), one conversion and FMA by the rows' `e`, and one FMA by
//! the token's `d`:
//! `Σ w·a = d_a · (Σ_g s_g · Σ_{i∈g} u_i·q_i − e · Σ_g w_g · bsum_g)`.
//!
//! The 16 rows' group scales reach the panel's columns through four dword gathers per
//! kind (each row's 16 bytes stored, then read group by group), not a scatter per row, and
//! the next chunk's blocks are prefetched: a 64-token prompt from memory spent a quarter of
//! its time packing, half of that in scatters and waiting for the weights.
//!
//! Each (row, token) goes through the same operations whatever the batch's other tokens.
#![allow(clippy::missing_safety_doc)] // callers must have detected the features listed

use super::kunpack::{Rows, Unpack};
use crate::blocks::*;
use std::arch::x86_64::*;

/// Rows per panel (one 16-lane vector), super-blocks per chunk (the buffer, 22 KB, stays in
/// L1; 4 measured 2-5% faster than 2 and 1 slower),
/// tokens per tile (their accumulators stay in registers).
const PANEL: usize = 16;
const CHUNK: usize = 4;
const TOKENS: usize = 8;
const GROUPS: usize = QK_K / 16;

/// One chunk of a panel: per super-block, 64 × 64 bytes (4 values of each of the 16 rows),
/// per group the rows' scales, and the corrections as integers: per pair of groups the
/// rows' `(w_g, w_g+1)` as two i16 in one i32 lane (for `vpdpwssd` with the activations'
/// pair of 16-value sums; where the scales cover 32 values, the first 4 entries hold
/// `(w_4q, w_4q+2)` for pairs of 32-value sums) and per super-block the rows' factor `e`.
#[repr(C, align(64))]
struct Packed {
    u: [[[u8; 64]; QK_K / 4]; CHUNK],
    s: [[[f32; PANEL]; GROUPS]; CHUNK],
    w: [[[i32; PANEL]; GROUPS / 2]; CHUNK],
    e: [[f32; PANEL]; CHUNK],
}

/// Puts super-blocks `c0..c0 + nc` of panel rows `r0..r0 + nr` (of `w`, `nb` per row) into
/// `p`; rows past `nr` are zero.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
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
    // The next chunk's blocks, from 16 rows at once: more streams than the hardware
    // prefetcher follows, and the pack is where a prompt reads the weights from memory.
    if c0 + nc < nb {
        for i in 0..nr {
            for k in c0 + nc..(c0 + nc + CHUNK).min(nb) {
                w.prefetch(nb, r0 + i, k);
            }
        }
    }
    // Rows past `nr` stay zero.
    let mut vals = [[0u8; QK_K]; PANEL];
    // Byte offset of row `i` in the `[[i8; 16]; PANEL]` arrays below.
    let rows = _mm512_setr_epi32(
        0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240,
    );
    let odd_words = 0xAAAA_AAAA;
    for k in 0..nc {
        // Each row's group scales `v` and corrections `w` (one byte per group), stored row
        // by row and read back group by group (rows past `nr` zero).
        let mut v = [[0i8; GROUPS]; PANEL];
        let mut wb = [[0i8; GROUPS]; PANEL];
        let mut d = [0f32; PANEL];
        let mut e = [0f32; PANEL];
        for (i, vals) in vals.iter_mut().enumerate().take(nr) {
            let blk = w.block(nb, r0 + i, c0 + k);
            // SAFETY: AVX2 is enabled; `values` and `scales` read the block; 16-byte stores
            // into rows `i < 16` of `v` and `wb`.
            unsafe {
                blk.values(vals);
                let sc = blk.scales();
                _mm_storeu_si128(v[i].as_mut_ptr() as *mut __m128i, sc.v);
                _mm_storeu_si128(wb[i].as_mut_ptr() as *mut __m128i, sc.w);
                d[i] = sc.d;
                e[i] = sc.e;
            }
        }
        // SAFETY: AVX-512 F/BW are enabled; the gathers read dword `q < 4` of each of the
        // 16 rows of `v` and `wb` (byte offsets `16 i + 4 q`, inside the 256 bytes); the
        // stores write whole 16-lane rows of `p.s[k]` and `p.w[k]`.
        unsafe {
            let dv = _mm512_loadu_ps(d.as_ptr());
            for q in 0..GROUPS / 4 {
                // Lane i: groups 4q..4q + 4 of row i, one byte each.
                let x = _mm512_i32gather_epi32::<1>(rows, v.as_ptr().cast::<u8>().add(4 * q) as _);
                for b in 0..4 {
                    // Byte b of each lane, sign-extended (as `cvtepi8_epi32`).
                    let up = _mm_cvtsi32_si128(24 - 8 * b as i32);
                    let vi = _mm512_srai_epi32::<24>(_mm512_sll_epi32(x, up));
                    let s = _mm512_mul_ps(_mm512_cvtepi32_ps(vi), dv);
                    _mm512_storeu_ps(p.s[k][4 * q + b].as_mut_ptr(), s);
                }
                // Pairs (w_g, w_g+1) as two i16 per lane, for g = 4q and 4q + 2.
                let y = _mm512_i32gather_epi32::<1>(rows, wb.as_ptr().cast::<u8>().add(4 * q) as _);
                let even = _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(y)); // bytes 0, 2
                let odd = _mm512_srai_epi16::<8>(y); // bytes 1, 3
                if S::Block::SCALE_PER_32 {
                    // Groups 4q + 1 and 4q + 3 repeat 4q and 4q + 2: one pair (w_4q,
                    // w_4q+2), for the activations' 32-value sums (`sums32`).
                    _mm512_storeu_si512(p.w[k][q].as_mut_ptr() as *mut _, even);
                } else {
                    let first =
                        _mm512_mask_blend_epi16(odd_words, even, _mm512_slli_epi32::<16>(odd));
                    let second =
                        _mm512_mask_blend_epi16(odd_words, _mm512_srli_epi32::<16>(even), odd);
                    _mm512_storeu_si512(p.w[k][2 * q].as_mut_ptr() as *mut _, first);
                    _mm512_storeu_si512(p.w[k][2 * q + 1].as_mut_ptr() as *mut _, second);
                }
            }
        }
        p.e[k] = e;
        // SAFETY: AVX-512 F is enabled; 32-byte loads inside each row of `vals`; 8 groups
        // of 64 bytes per 32 values, inside `p.u[k]` (QK_K / 4 groups).
        unsafe {
            let base = p.u[k].as_mut_ptr() as *mut __m512i;
            for c in 0..QK_K / 32 {
                super::panel::store_groups(base.add(8 * c), |i| {
                    _mm256_loadu_si256(vals[i].as_ptr().add(32 * c) as *const __m256i)
                });
            }
        }
    }
}

/// `T` tokens from `t0` against the packed chunk (super-blocks `c0..c0 + nc`), added into
/// `acc[t]` (16 rows each).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tokens<W: Unpack, const T: usize>(
    p: &Packed,
    a: &[BlockQ8K],
    sums32: &[[i32; 4]],
    nb: usize,
    t0: usize,
    c0: usize,
    nc: usize,
    acc: &mut [[f32; PANEL]],
) {
    assert!(a.len() >= (t0 + T) * nb && acc.len() >= t0 + T && c0 + nc <= nb);
    assert!(!W::SCALE_PER_32 || sums32.len() == a.len());
    // SAFETY (whole body): block indices `(t0 + t) * nb + c0 + k` with `t < T`, `k < nc`
    // are inside the activations and `sums32` where it is read (asserted), `gp < 4`; the
    // packed loads are aligned and inside `p`; `acc[t0 + t]` holds 16 floats.
    unsafe {
        let mut sum: [__m512; T] = std::array::from_fn(|t| _mm512_loadu_ps(acc[t0 + t].as_ptr()));
        for k in 0..nc {
            let y: [&BlockQ8K; T] =
                std::array::from_fn(|t| a.get_unchecked((t0 + t) * nb + c0 + k));
            let mut part = [_mm512_setzero_ps(); T];
            // Groups sharing a scale are summed before it is applied (one conversion and
            // FMA per 32 values rather than 16).
            let step = if W::SCALE_PER_32 { 2 } else { 1 };
            for g in (0..GROUPS).step_by(step) {
                let mut isum = [_mm512_setzero_si512(); T];
                for j in 4 * g..4 * (g + step) {
                    let u = _mm512_load_si512(p.u[k][j].as_ptr() as *const _);
                    for t in 0..T {
                        let q = (y[t].qs.as_ptr().add(4 * j) as *const i32).read_unaligned();
                        isum[t] = _mm512_dpbusd_epi32(isum[t], u, _mm512_set1_epi32(q));
                    }
                }
                let s = _mm512_load_ps(p.s[k][g].as_ptr());
                for t in 0..T {
                    part[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), s, part[t]);
                }
            }
            // Σ_g w_g · bsum_g, exact in i32 (|w| < 2⁷, |bsum| ≤ 16·127), two groups per
            // `vpdpwssd`: the activations' sums are consecutive i16, so one i32 holds a pair.
            // Where the scales cover 32 values, two 32-value groups per `vpdpwssd` (the
            // same sum: w_2j = w_2j+1), against `sums32`, half as many.
            let mut corr = [_mm512_setzero_si512(); T];
            let pairs = if W::SCALE_PER_32 {
                GROUPS / 4
            } else {
                GROUPS / 2
            };
            for gp in 0..pairs {
                let w = _mm512_load_si512(p.w[k][gp].as_ptr() as *const _);
                for t in 0..T {
                    let b = if W::SCALE_PER_32 {
                        *sums32
                            .get_unchecked((t0 + t) * nb + c0 + k)
                            .get_unchecked(gp)
                    } else {
                        (y[t].bsums.as_ptr().add(2 * gp) as *const i32).read_unaligned()
                    };
                    corr[t] = _mm512_dpwssd_epi32(corr[t], w, _mm512_set1_epi32(b));
                }
            }
            let e = _mm512_load_ps(p.e[k].as_ptr());
            for t in 0..T {
                part[t] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(corr[t]), e, part[t]);
                sum[t] = _mm512_fmadd_ps(part[t], _mm512_set1_ps(y[t].d), sum[t]);
            }
        }
        for (t, sum) in sum.iter().enumerate() {
            _mm512_storeu_ps(acc[t0 + t].as_mut_ptr(), *sum);
        }
    }
}

/// The panel steps over one matrix and its activations.
struct Steps<'a, S> {
    w: S,
    a: &'a [BlockQ8K],
    /// Per activation block, pairs of 32-value sums as two i16 (empty unless the type's
    /// scales cover 32 values).
    sums32: Vec<[i32; 4]>,
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
        let (p, a, sums32, nb) = (&*self.p, self.a, &self.sums32[..], self.nb);
        // SAFETY: as above; `tokens` asserts its bounds.
        unsafe {
            if one {
                tokens::<S::Block, 1>(p, a, sums32, nb, t, c0, nc, acc)
            } else {
                tokens::<S::Block, TOKENS>(p, a, sums32, nb, t, c0, nc, acc)
            }
        }
    }
}

/// All rows of `w` (`out.width()`, `nb` super-blocks each) against every token of `a`,
/// into each token's columns of `out`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn gemm<S: Rows>(w: S, a: &[BlockQ8K], nb: usize, out: &mut crate::pool::Columns) {
    let p = Box::new(Packed {
        u: [[[0; 64]; QK_K / 4]; CHUNK],
        s: [[[0.0; PANEL]; GROUPS]; CHUNK],
        w: [[[0; PANEL]; GROUPS / 2]; CHUNK],
        e: [[0.0; PANEL]; CHUNK],
    });
    let sums32 = if S::Block::SCALE_PER_32 {
        a.iter().map(sums32).collect()
    } else {
        Vec::new()
    };
    super::prompt_panels(
        &mut Steps {
            w,
            a,
            sums32,
            nb,
            p,
        },
        nb,
        out,
    );
}

/// A block's 32-value sums `B_j = bsum_2j + bsum_2j+1` in pairs `(B_2p, B_2p+1)`, two i16
/// in one i32 (|B| ≤ 32·128 fits).
fn sums32(b: &BlockQ8K) -> [i32; 4] {
    let s = |j: usize| (b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32) as i16 as u16 as u32;
    std::array::from_fn(|p| (s(2 * p) | s(2 * p + 1) << 16) as i32)
}
