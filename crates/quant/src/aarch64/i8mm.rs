//! Prompt products on `smmla` (FEAT_I8MM): one instruction multiplies 8 bytes of two
//! weight rows with 8 bytes of two tokens into a 2×2 tile of int32 sums. The activations
//! are interleaved once per product (two tokens' 8-byte runs side by side, as `smmla`
//! reads them); each weight block is unpacked once per row pair and its two rows
//! interleaved the same way, then multiplied with every token pair. An odd last row or
//! token is paired with itself and its copy's results dropped.

use super::neon::{f16_to_f32, mins_dot, smmla, widen_scales, Act32, Block32, SuperBlock};
use crate::blocks::*;
use crate::ActBlocks;
use core::arch::aarch64::*;

/// `[a.lo, b.lo]` and `[a.hi, b.hi]` (64-bit halves): two rows' 8-byte runs side by side.
#[inline(always)]
unsafe fn pair(a: int8x16_t, b: int8x16_t) -> (int8x16_t, int8x16_t) {
    // SAFETY: NEON register operations.
    unsafe {
        let (a, b) = (vreinterpretq_s64_s8(a), vreinterpretq_s64_s8(b));
        (
            vreinterpretq_s8_s64(vzip1q_s64(a, b)),
            vreinterpretq_s8_s64(vzip2q_s64(a, b)),
        )
    }
}

/// The lanes `[x0·y0, x0·y1, x1·y0, x1·y1]` of a 2×2 tile.
#[inline(always)]
unsafe fn outer(x: [f32; 2], y: [f32; 2]) -> float32x4_t {
    let v = [x[0] * y[0], x[0] * y[1], x[1] * y[0], x[1] * y[1]];
    // SAFETY: 4 floats read from a local array.
    unsafe { vld1q_f32(v.as_ptr()) }
}

/// Writes a 2×2 tile's lanes to `out[r * n_tok + t]` for the rows `r0, r0 + 1` and tokens
/// `t0, t0 + 1` that exist.
fn store(tile: [f32; 4], r0: usize, t0: usize, rows: usize, n_tok: usize, out: &mut [f32]) {
    for (i, v) in tile.into_iter().enumerate() {
        let (r, t) = (r0 + i / 2, t0 + i % 2);
        if r < rows && t < n_tok {
            out[r * n_tok + t] = v;
        }
    }
}

/// The product of 32-value weight rows with `n_tok` tokens (`out[r * n_tok + t]`).
///
/// # Safety
/// The CPU has FEAT_I8MM.
#[target_feature(enable = "i8mm")]
pub(crate) unsafe fn gemm32<W: Block32, A: Act32>(
    w: &[W],
    a: &ActBlocks<A>,
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    let rows = out.len() / n_tok;
    let pairs = n_tok.div_ceil(2);
    assert!(w.len() >= rows * nb && a.blocks.len() >= n_tok * nb && a.d.len() >= n_tok * nb);
    assert!(!W::HAS_MIN || a.s.len() >= n_tok * nb);
    // SAFETY: loads read whole blocks inside the lengths checked above; FEAT_I8MM is the
    // caller's.
    unsafe {
        // Per token pair and block: 4 interleaved 16-byte operands, the two scales, sums.
        let mut acts = vec![vdupq_n_s8(0); pairs * nb * 4];
        let mut scales = vec![[[0f32; 2]; 2]; pairs * nb];
        for p in 0..pairs {
            let (t0, t1) = (2 * p, (2 * p + 1).min(n_tok - 1));
            for b in 0..nb {
                let (x, y) = (a.blocks[t0 * nb + b].qs(), a.blocks[t1 * nb + b].qs());
                let (x0, x1) = (vld1q_s8(x.as_ptr()), vld1q_s8(x.as_ptr().add(16)));
                let (y0, y1) = (vld1q_s8(y.as_ptr()), vld1q_s8(y.as_ptr().add(16)));
                let o = &mut acts[(p * nb + b) * 4..][..4];
                (o[0], o[1]) = pair(x0, y0);
                (o[2], o[3]) = pair(x1, y1);
                let s = |t: usize| if W::HAS_MIN { a.s[t * nb + b] } else { 0.0 };
                scales[p * nb + b] = [[a.d[t0 * nb + b], a.d[t1 * nb + b]], [s(t0), s(t1)]];
            }
        }
        let mut acc = vec![vdupq_n_f32(0.0); pairs];
        for r0 in (0..rows).step_by(2) {
            let r1 = (r0 + 1).min(rows - 1);
            acc.fill(vdupq_n_f32(0.0));
            for b in 0..nb {
                let (u, v) = (&w[r0 * nb + b], &w[r1 * nb + b]);
                let (u0, u1) = u.values();
                let (v0, v1) = v.values();
                let (w0, w1) = pair(u0, v0);
                let (w2, w3) = pair(u1, v1);
                let d = [f16_to_f32(u.d()), f16_to_f32(v.d())];
                let m = [f16_to_f32(u.m()), f16_to_f32(v.m())];
                for (p, acc) in acc.iter_mut().enumerate() {
                    let x = &acts[(p * nb + b) * 4..][..4];
                    let s = smmla(vdupq_n_s32(0), w0, x[0]);
                    let s = smmla(s, w1, x[1]);
                    let s = smmla(s, w2, x[2]);
                    let s = smmla(s, w3, x[3]);
                    let [da, sa] = scales[p * nb + b];
                    *acc = vfmaq_f32(*acc, vcvtq_f32_s32(s), outer(d, da));
                    if W::HAS_MIN {
                        *acc = vaddq_f32(*acc, outer(m, sa));
                    }
                }
            }
            for (p, acc) in acc.iter().enumerate() {
                let mut tile = [0f32; 4];
                vst1q_f32(tile.as_mut_ptr(), *acc);
                store(tile, r0, 2 * p, rows, n_tok, out);
            }
        }
    }
}

/// The product of super-block rows with `n_tok` Q8_K tokens (`out[r * n_tok + t]`).
///
/// # Safety
/// The CPU has FEAT_I8MM.
#[target_feature(enable = "i8mm")]
pub(crate) unsafe fn gemm_k<W: SuperBlock>(
    w: &[W],
    a: &[BlockQ8K],
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    let rows = out.len() / n_tok;
    let pairs = n_tok.div_ceil(2);
    assert!(w.len() >= rows * nb && a.len() >= n_tok * nb);
    // SAFETY: loads read inside whole blocks of the lengths checked above; FEAT_I8MM is
    // the caller's.
    unsafe {
        // Per token pair and block: 32 interleaved operands (two per 16-value group).
        let mut acts = vec![vdupq_n_s8(0); pairs * nb * 32];
        for p in 0..pairs {
            let (t0, t1) = (2 * p, (2 * p + 1).min(n_tok - 1));
            for b in 0..nb {
                let (x, y) = (&a[t0 * nb + b].qs, &a[t1 * nb + b].qs);
                let o = &mut acts[(p * nb + b) * 32..][..32];
                for g in 0..16 {
                    let xg = vld1q_s8(x.as_ptr().add(16 * g));
                    let yg = vld1q_s8(y.as_ptr().add(16 * g));
                    (o[2 * g], o[2 * g + 1]) = pair(xg, yg);
                }
            }
        }
        let mut acc = vec![vdupq_n_f32(0.0); pairs];
        let (mut u, mut v) = ([vdupq_n_s8(0); 16], [vdupq_n_s8(0); 16]);
        let mut wz = [vdupq_n_s8(0); 32];
        // Per scale (16, or 8 when `WIDE`): `[su, su, sv, sv]` for the two rows' lanes.
        let mut sv = [vdupq_n_s32(0); 16];
        let (n_scales, per_scale) = if W::WIDE { (8, 2) } else { (16, 1) };
        for r0 in (0..rows).step_by(2) {
            let r1 = (r0 + 1).min(rows - 1);
            acc.fill(vdupq_n_f32(0.0));
            for b in 0..nb {
                let (bu, bv) = (&w[r0 * nb + b], &w[r1 * nb + b]);
                bu.values(&mut u);
                bv.values(&mut v);
                let ((su, du), (sw, dv)) = (bu.scales(), bv.scales());
                let (su, sw) = (widen_scales(su), widen_scales(sw));
                for j in 0..n_scales / 4 {
                    // [u0, w0, u1, w1] → [u0, u0, w0, w0] and [u1, u1, w1, w1]; likewise 2, 3.
                    let (a, b) = (vzip1q_s32(su[j], sw[j]), vzip2q_s32(su[j], sw[j]));
                    sv[4 * j] = vzip1q_s32(a, a);
                    sv[4 * j + 1] = vzip2q_s32(a, a);
                    sv[4 * j + 2] = vzip1q_s32(b, b);
                    sv[4 * j + 3] = vzip2q_s32(b, b);
                }
                for g in 0..16 {
                    (wz[2 * g], wz[2 * g + 1]) = pair(u[g], v[g]);
                }
                let (mu0, mu1, dmu) = bu.mins();
                let (mw0, mw1, dmv) = bv.mins();
                for (p, acc) in acc.iter_mut().enumerate() {
                    let x = &acts[(p * nb + b) * 32..][..32];
                    let mut isum = vdupq_n_s32(0);
                    for (k, scale) in sv[..n_scales].iter().enumerate() {
                        let mut s = vdupq_n_s32(0);
                        for g in k * per_scale..(k + 1) * per_scale {
                            s = smmla(s, wz[2 * g], x[2 * g]);
                            s = smmla(s, wz[2 * g + 1], x[2 * g + 1]);
                        }
                        isum = vmlaq_s32(isum, s, *scale);
                    }
                    let (t0, t1) = (2 * p, (2 * p + 1).min(n_tok - 1));
                    let (a0, a1) = (&a[t0 * nb + b], &a[t1 * nb + b]);
                    *acc = vfmaq_f32(*acc, vcvtq_f32_s32(isum), outer([du, dv], [a0.d, a1.d]));
                    if W::HAS_MIN {
                        let md = |m0, m1, bs| mins_dot(m0, m1, W::WIDE, bs) as f32;
                        let m = [
                            dmu * a0.d * md(mu0, mu1, &a0.bsums),
                            dmu * a1.d * md(mu0, mu1, &a1.bsums),
                            dmv * a0.d * md(mw0, mw1, &a0.bsums),
                            dmv * a1.d * md(mw0, mw1, &a1.bsums),
                        ];
                        *acc = vsubq_f32(*acc, vld1q_f32(m.as_ptr()));
                    }
                }
            }
            for (p, acc) in acc.iter().enumerate() {
                let mut tile = [0f32; 4];
                vst1q_f32(tile.as_mut_ptr(), *acc);
                store(tile, r0, 2 * p, rows, n_tok, out);
            }
        }
    }
}
