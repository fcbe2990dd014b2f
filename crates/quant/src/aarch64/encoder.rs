//! NEON kernels for encoder models: exact-form GELU, LayerNorm and bidirectional attention
//! over query rows (see `reference::gelu_erf`, `add_layer_norm`, `attend_rows`), and the
//! decoders' softmax and SwiGLU, with the same approximations as the x86 ones
//! (`x86/avx512.rs`): `exp` is ggml's range reduction + polynomial for `x ≤ 0` (clamped at
//! -87), `erf` is Abramowitz & Stegun 7.1.26.

use crate::AttendRows;
use core::arch::aarch64::*;

/// `exp(x)` for `x ≤ 0`.
#[inline(always)]
unsafe fn exp_ps(x: float32x4_t) -> float32x4_t {
    let c = |bits: u32| vdupq_n_f32(f32::from_bits(bits));
    // SAFETY: NEON register operations.
    unsafe {
        let x = vmaxq_f32(x, vdupq_n_f32(-87.0)); // NaN stays NaN (FMAX)
        let r = c(0x4b40_0000); // 0x1.8p23
        let z = vfmaq_f32(r, x, c(0x3fb8_aa3b)); // log2(e)
        let n = vsubq_f32(z, r);
        // b = x - n·ln2, with ln2 split in two.
        let b = vfmsq_f32(vfmsq_f32(x, n, c(0x3f31_7200)), n, c(0x35bf_be8e));
        let u = vmulq_f32(b, b);
        let j = vfmaq_f32(
            vfmaq_f32(vdupq_n_f32(1.0), c(0x3f7f_fff6), b),
            vfmaq_f32(
                vfmaq_f32(c(0x3eff_fedb), c(0x3e2a_af33), b),
                vfmaq_f32(c(0x3d2b_9f17), c(0x3c07_2010), b),
                u,
            ),
            u,
        );
        // j · 2ⁿ, n in -126..=0: the exponent bits of 2ⁿ directly.
        let e = vshlq_n_s32::<23>(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)));
        vmulq_f32(j, vreinterpretq_f32_s32(e))
    }
}

#[inline(always)]
unsafe fn gelu_ps(x: float32x4_t) -> float32x4_t {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_72,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    // SAFETY: NEON register operations.
    unsafe {
        let a = vmulq_n_f32(vabsq_f32(x), std::f32::consts::FRAC_1_SQRT_2);
        let t = vdivq_f32(vdupq_n_f32(1.0), vfmaq_n_f32(vdupq_n_f32(1.0), a, P));
        let mut poly = vdupq_n_f32(A[4]);
        for &c in A[..4].iter().rev() {
            poly = vfmaq_f32(vdupq_n_f32(c), poly, t);
        }
        poly = vmulq_f32(poly, t);
        let e = exp_ps(vnegq_f32(vmulq_f32(a, a)));
        // erf(|x|/√2) = 1 - poly·e; erf is odd, so 1 + erf(x/√2) = 1 ± (1 - poly·e).
        let erf_abs = vfmsq_f32(vdupq_n_f32(1.0), poly, e);
        let sign = vandq_u32(vreinterpretq_u32_f32(x), vdupq_n_u32(0x8000_0000));
        let erf = vreinterpretq_f32_u32(vorrq_u32(vreinterpretq_u32_f32(erf_abs), sign));
        vmulq_f32(vmulq_n_f32(x, 0.5), vaddq_f32(vdupq_n_f32(1.0), erf))
    }
}

/// `x = 0.5·x·(1 + erf(x/√2))` in place.
///
/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn gelu(x: &mut [f32]) {
    let mut chunks = x.chunks_exact_mut(4);
    for c in &mut chunks {
        // SAFETY: `c` has 4 values.
        unsafe { vst1q_f32(c.as_mut_ptr(), gelu_ps(vld1q_f32(c.as_ptr()))) };
    }
    let rest = chunks.into_remainder();
    let mut tail = [0f32; 4];
    tail[..rest.len()].copy_from_slice(rest);
    // SAFETY: 4 values of a local array.
    unsafe { vst1q_f32(tail.as_mut_ptr(), gelu_ps(vld1q_f32(tail.as_ptr()))) };
    let n = rest.len();
    rest.copy_from_slice(&tail[..n]);
}

/// `gate = SiLU(gate) · up` in place (see `reference::swiglu`): the sigmoid from
/// `e = e^-|x|` alone, so `exp` only sees `x ≤ 0` (`1 / (1 + e)` for `x ≥ 0`, `e / (1 + e)`
/// below).
///
/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let full = n - n % 4;
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    // SAFETY: every access is at `i..i + 4 <= full <= n`.
    unsafe {
        let one = vdupq_n_f32(1.0);
        for i in (0..full).step_by(4) {
            let x = vld1q_f32(g.add(i));
            let e = exp_ps(vnegq_f32(vabsq_f32(x)));
            let num = vbslq_f32(vcltzq_f32(x), e, one);
            let s = vdivq_f32(vmulq_f32(x, num), vaddq_f32(one, e));
            vst1q_f32(g.add(i), vmulq_f32(s, vld1q_f32(u.add(i))));
        }
    }
    crate::reference::swiglu(&mut gate[full..n], &up[full..n]);
}

/// `x = softmax(x)` (see `reference::softmax`): the exponentials in f32, summed in f64;
/// inputs more than 87 below the maximum (masked keys' `-inf` among them) weigh exactly 0.
///
/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn softmax(x: &mut [f32]) {
    let n = x.len();
    let full = n - n % 4;
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let p = x.as_mut_ptr();
    let mut total = 0f64;
    // SAFETY: every vector access is at `i..i + 4 <= full <= n`.
    unsafe {
        let (mx, floor) = (vdupq_n_f32(max), vdupq_n_f32(-87.0));
        let mut sum = vdupq_n_f64(0.0);
        for i in (0..full).step_by(4) {
            let d = vsubq_f32(vld1q_f32(p.add(i)), mx);
            // Not less than -87 (a NaN stays, to show).
            let keep = vmvnq_u32(vcltq_f32(d, floor));
            let e = vreinterpretq_f32_u32(vandq_u32(keep, vreinterpretq_u32_f32(exp_ps(d))));
            vst1q_f32(p.add(i), e);
            sum = vaddq_f64(
                sum,
                vaddq_f64(vcvt_f64_f32(vget_low_f32(e)), vcvt_high_f64_f32(e)),
            );
        }
        total += vaddvq_f64(sum);
    }
    for v in &mut x[full..] {
        let d = *v - max;
        *v = if d < -87.0 { 0.0 } else { d.exp() };
        total += *v as f64;
    }
    let inv = (1.0 / total) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Row-wise `x = LayerNorm(x + add) · w + b`; rows of `w.len()` values (a multiple of 4,
/// else the reference runs).
///
/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn add_layer_norm(
    x: &mut [f32],
    add: Option<&[f32]>,
    w: &[f32],
    b: &[f32],
    eps: f32,
) {
    let dim = w.len();
    if !dim.is_multiple_of(4) || b.len() != dim || dim == 0 {
        return crate::reference::add_layer_norm(x, add, w, b, eps);
    }
    if let Some(add) = add {
        assert!(add.len() >= x.len());
    }
    for (i, row) in x.chunks_exact_mut(dim).enumerate() {
        let p = row.as_mut_ptr();
        // SAFETY: `row` holds `dim` values, `add` at least as many as `x`, `w` and `b` `dim`
        // (checked above); every access is 4 consecutive values at `c < dim`.
        unsafe {
            let mut sum = vdupq_n_f32(0.0);
            for c in (0..dim).step_by(4) {
                let mut v = vld1q_f32(p.add(c));
                if let Some(add) = add {
                    v = vaddq_f32(v, vld1q_f32(add.as_ptr().add(i * dim + c)));
                    vst1q_f32(p.add(c), v);
                }
                sum = vaddq_f32(sum, v);
            }
            let mean = vdupq_n_f32(vaddvq_f32(sum) / dim as f32);
            let mut sq = vdupq_n_f32(0.0);
            for c in (0..dim).step_by(4) {
                let d = vsubq_f32(vld1q_f32(p.add(c)), mean);
                sq = vfmaq_f32(sq, d, d);
            }
            let var = vaddvq_f32(sq) / dim as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for c in (0..dim).step_by(4) {
                let d = vmulq_n_f32(vsubq_f32(vld1q_f32(p.add(c)), mean), inv);
                let y = vfmaq_f32(
                    vld1q_f32(b.as_ptr().add(c)),
                    d,
                    vld1q_f32(w.as_ptr().add(c)),
                );
                vst1q_f32(p.add(c), y);
            }
        }
    }
}

/// Attention for the query rows of `a` (see [`AttendRows`]), one row and head at a time:
/// scores 4 keys at a time from the transposed keys, softmax with the vector `exp`, the
/// weighted sum of values 4 dimensions at a time. `head_dim` must be a multiple of 4.
///
/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn attend_rows(a: &AttendRows, out: &mut [f32]) {
    let h = a.heads * a.head_dim;
    let m = out.len() / h;
    let st = a.stride;
    assert!(a.head_dim.is_multiple_of(4) && st >= h && m >= 1 && a.len >= 1);
    assert!(a.q.len() >= (m - 1) * st + h && a.v.len() >= (a.len - 1) * st + h);
    assert!(a.kt.len() >= (h - 1) * a.kt_stride + a.len && a.kt_stride >= a.len);
    let len4 = a.len / 4 * 4;
    let mut scores = vec![0f32; a.len.next_multiple_of(4)];
    for i in 0..m {
        for head in 0..a.heads {
            let c0 = head * a.head_dim;
            let q = &a.q[i * st + c0..][..a.head_dim];
            // SAFETY: key reads at `(c0 + d) * kt_stride + j + 4 ≤ … + len` and value reads
            // at `j * st + c0 + d + 4 ≤ (len - 1) * st + h`, inside the lengths checked
            // above; `scores` holds `len` rounded up to 4.
            unsafe {
                for j in (0..len4).step_by(4) {
                    let mut acc = vdupq_n_f32(0.0);
                    for (d, &qd) in q.iter().enumerate() {
                        let k = vld1q_f32(a.kt.as_ptr().add((c0 + d) * a.kt_stride + j));
                        acc = vfmaq_n_f32(acc, k, qd);
                    }
                    vst1q_f32(scores.as_mut_ptr().add(j), vmulq_n_f32(acc, a.scale));
                }
                for (j, s) in scores.iter_mut().enumerate().take(a.len).skip(len4) {
                    let dot: f32 = (0..a.head_dim)
                        .map(|d| q[d] * a.kt[(c0 + d) * a.kt_stride + j])
                        .sum();
                    *s = dot * a.scale;
                }
                let max = scores[..a.len]
                    .iter()
                    .copied()
                    .fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for j in (0..scores.len()).step_by(4) {
                    let s = vld1q_f32(scores.as_ptr().add(j));
                    let e = exp_ps(vsubq_f32(s, vdupq_n_f32(max)));
                    vst1q_f32(scores.as_mut_ptr().add(j), e);
                }
                for s in &scores[..a.len] {
                    sum += s;
                }
                let o = out[i * h + c0..][..a.head_dim].as_mut_ptr();
                for d in (0..a.head_dim).step_by(4) {
                    let mut acc = vdupq_n_f32(0.0);
                    for (j, &p) in scores[..a.len].iter().enumerate() {
                        acc = vfmaq_n_f32(acc, vld1q_f32(a.v.as_ptr().add(j * st + c0 + d)), p);
                    }
                    vst1q_f32(o.add(d), vmulq_n_f32(acc, 1.0 / sum));
                }
            }
        }
    }
}
