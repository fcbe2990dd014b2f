//! AVX-512F kernels for encoder models: exact-form GELU and bidirectional attention over a
//! block of query rows (see `reference::gelu_erf` and `reference::attend_rows`); the
//! decoders' softmax and SwiGLU; decoder attention over the f16 cache.
//!
//! `exp` is ggml's `ggml_v_expf` range reduction + polynomial (≈1.5 ulp) with its input
//! clamped at -87 (every caller only needs `exp(x ≤ 0)`, and below -87 the result is
//! < 2⁻¹²⁵, which adds nothing to any sum here). `erf` is Abramowitz & Stegun 7.1.26
//! (|error| ≤ 1.5e-7).
#![allow(clippy::missing_safety_doc)] // callers must have detected AVX-512F

use crate::f32mat::PanelArgs;
use crate::AttendRows;
use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx512f")]
fn exp_ps(x: __m512) -> __m512 {
    // This operand order keeps a NaN input NaN (`max` returns its second operand then).
    let x = _mm512_max_ps(_mm512_set1_ps(-87.0), x);
    let r = _mm512_set1_ps(f32::from_bits(0x4b40_0000)); // 0x1.8p23
    let z = _mm512_fmadd_ps(x, _mm512_set1_ps(f32::from_bits(0x3fb8_aa3b)), r); // log2(e)
    let n = _mm512_sub_ps(z, r);
    // b = x - n·ln2, with ln2 split in two.
    let b = _mm512_fnmadd_ps(
        n,
        _mm512_set1_ps(f32::from_bits(0x35bf_be8e)), // 0x1.7f7d1cp-20
        _mm512_fnmadd_ps(n, _mm512_set1_ps(f32::from_bits(0x3f31_7200)), x), // 0x1.62e4p-1
    );
    let u = _mm512_mul_ps(b, b);
    let j = _mm512_fmadd_ps(
        _mm512_fmadd_ps(
            _mm512_fmadd_ps(
                _mm512_set1_ps(f32::from_bits(0x3c07_2010)), // 0x1.0e4020p-7
                b,
                _mm512_set1_ps(f32::from_bits(0x3d2b_9f17)), // 0x1.573e2ep-5
            ),
            u,
            _mm512_fmadd_ps(
                _mm512_set1_ps(f32::from_bits(0x3e2a_af33)), // 0x1.555e66p-3
                b,
                _mm512_set1_ps(f32::from_bits(0x3eff_fedb)), // 0x1.fffdb6p-2
            ),
        ),
        u,
        _mm512_fmadd_ps(
            _mm512_set1_ps(f32::from_bits(0x3f7f_fff6)), // 0x1.ffffecp-1
            b,
            _mm512_set1_ps(1.0),
        ),
    );
    _mm512_scalef_ps(j, n)
}

#[inline]
#[target_feature(enable = "avx512f")]
fn gelu_ps(x: __m512) -> __m512 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_72,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let sign = _mm512_set1_epi32(i32::MIN);
    let xi = _mm512_castps_si512(x);
    let a = _mm512_mul_ps(
        _mm512_castsi512_ps(_mm512_andnot_si512(sign, xi)),
        _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
    );
    let t = _mm512_div_ps(
        _mm512_set1_ps(1.0),
        _mm512_fmadd_ps(_mm512_set1_ps(P), a, _mm512_set1_ps(1.0)),
    );
    let mut poly = _mm512_set1_ps(A[4]);
    for &c in A[..4].iter().rev() {
        poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(c));
    }
    poly = _mm512_mul_ps(poly, t);
    let e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
    // erf(|x|/√2) = 1 - poly·e; erf is odd, so 1 + erf(x/√2) = 1 ± (1 - poly·e).
    let erf_abs = _mm512_fnmadd_ps(poly, e, _mm512_set1_ps(1.0));
    let erf = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(erf_abs),
        _mm512_and_si512(xi, sign),
    ));
    _mm512_mul_ps(
        _mm512_mul_ps(_mm512_set1_ps(0.5), x),
        _mm512_add_ps(_mm512_set1_ps(1.0), erf),
    )
}

/// `x = 0.5·x·(1 + erf(x/√2))` in place.
#[target_feature(enable = "avx512f")]
pub unsafe fn gelu(x: &mut [f32]) {
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: `c` has 16 values.
        unsafe { _mm512_storeu_ps(c.as_mut_ptr(), gelu_ps(_mm512_loadu_ps(c.as_ptr()))) };
    }
    let rest = chunks.into_remainder();
    let m: __mmask16 = (1u32 << rest.len()) as u16 - 1;
    // SAFETY: the mask covers only the `rest.len() < 16` values that exist.
    unsafe {
        let v = _mm512_maskz_loadu_ps(m, rest.as_ptr());
        _mm512_mask_storeu_ps(rest.as_mut_ptr(), m, gelu_ps(v));
    }
}

/// `x / (1 + e^-x) · u` (SiLU(x)·u) from `e^-|x|` alone, so `exp` only sees `x ≤ 0`:
/// the sigmoid is `1 / (1 + e)` for `x ≥ 0` and `e / (1 + e)` below.
#[inline]
#[target_feature(enable = "avx512f")]
fn swiglu_ps(x: __m512, u: __m512) -> __m512 {
    let neg_abs = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(x),
        _mm512_set1_epi32(i32::MIN),
    ));
    let e = exp_ps(neg_abs);
    let one = _mm512_set1_ps(1.0);
    let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
    let num = _mm512_mask_mov_ps(one, below, e);
    _mm512_mul_ps(
        _mm512_div_ps(_mm512_mul_ps(x, num), _mm512_add_ps(one, e)),
        u,
    )
}

/// `gate = SiLU(gate) · up` in place (see `reference::swiglu`).
#[target_feature(enable = "avx512f")]
pub unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    let mut i = 0;
    // SAFETY: every access is at `i..i + 16 <= n`, or masked to the `n - i` values left.
    unsafe {
        while i + 16 <= n {
            let v = swiglu_ps(_mm512_loadu_ps(g.add(i)), _mm512_loadu_ps(u.add(i)));
            _mm512_storeu_ps(g.add(i), v);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u32 << (n - i)) as u16 - 1;
            let v = swiglu_ps(
                _mm512_maskz_loadu_ps(m, g.add(i)),
                _mm512_maskz_loadu_ps(m, u.add(i)),
            );
            _mm512_mask_storeu_ps(g.add(i), m, v);
        }
    }
}

/// `exp(v - mx)`, exactly 0 where `v - mx < -87` (a NaN stays, to show).
#[inline]
#[target_feature(enable = "avx512f")]
fn shifted_exp(v: __m512, mx: __m512) -> __m512 {
    let d = _mm512_sub_ps(v, mx);
    let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(d, _mm512_set1_ps(-87.0));
    _mm512_maskz_mov_ps(keep, exp_ps(d))
}

/// `sum + e`, the 16 f32 lanes widened (exactly) to f64 and folded into 8.
#[inline]
#[target_feature(enable = "avx512f")]
fn add_f64(sum: __m512d, e: __m512) -> __m512d {
    let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(e));
    let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
        _mm512_castps_pd(e),
    )));
    _mm512_add_pd(sum, _mm512_add_pd(lo, hi))
}

/// `x = softmax(x)` (see `reference::softmax`): the exponentials in f32, summed in f64;
/// inputs more than 87 below the maximum (masked keys' `-inf` among them) weigh exactly 0.
#[target_feature(enable = "avx512f")]
pub unsafe fn softmax(x: &mut [f32]) {
    let n = x.len();
    let p = x.as_mut_ptr();
    let tail: __mmask16 = ((1u32 << (n % 16)) as u16).wrapping_sub(1);
    let full = n - n % 16;
    // SAFETY: every access is at `i..i + 16 <= full <= n`, or masked to the `n - full`
    // values after `full`.
    unsafe {
        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < full {
            mx = _mm512_max_ps(mx, _mm512_loadu_ps(p.add(i)));
            i += 16;
        }
        if tail != 0 {
            mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, p.add(full)));
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let mut sum = _mm512_setzero_pd();
        i = 0;
        while i < full {
            let e = shifted_exp(_mm512_loadu_ps(p.add(i)), mx);
            _mm512_storeu_ps(p.add(i), e);
            sum = add_f64(sum, e);
            i += 16;
        }
        if tail != 0 {
            let e = shifted_exp(_mm512_maskz_loadu_ps(tail, p.add(full)), mx);
            let e = _mm512_maskz_mov_ps(tail, e);
            _mm512_mask_storeu_ps(p.add(full), tail, e);
            sum = add_f64(sum, e);
        }
        let inv = _mm512_set1_ps((1.0 / _mm512_reduce_add_pd(sum)) as f32);
        i = 0;
        while i < full {
            _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
            i += 16;
        }
        if tail != 0 {
            let v = _mm512_maskz_loadu_ps(tail, p.add(full));
            _mm512_mask_storeu_ps(p.add(full), tail, _mm512_mul_ps(v, inv));
        }
    }
}

/// Attention for the query rows of `a` (see [`AttendRows`]), 8 rows at a time: the scores
/// of 8 rows × 32 keys stay in registers while the transposed keys stream past, and the
/// weighted sum of values keeps 8 rows × 32 outputs in registers. `head_dim` must be a multiple of 32.
#[target_feature(enable = "avx512f")]
pub unsafe fn attend_rows(a: &AttendRows, out: &mut [f32]) {
    let h = a.heads * a.head_dim;
    let m = out.len() / h;
    let st = a.stride;
    assert!(a.head_dim.is_multiple_of(32) && st >= h && m >= 1);
    assert!(a.q.len() >= (m - 1) * st + h && a.v.len() >= (a.len - 1) * st + h);
    assert!(a.len >= 1 && a.kt.len() >= (h - 1) * a.kt_stride + a.len);
    let len32 = a.len.div_ceil(32) * 32;
    // Probabilities of up to 8 rows (unnormalised), `len32` each.
    let mut p = vec![0f32; 8 * len32];
    for head in 0..a.heads {
        let mut r0 = 0;
        while r0 + 8 <= m {
            // SAFETY: rows r0..r0+8 exist; see `rows_block`.
            unsafe { rows_block::<8>(a, head, r0, &mut p, out) };
            r0 += 8;
        }
        if r0 + 4 <= m {
            // SAFETY: rows r0..r0+4 exist; see `rows_block`.
            unsafe { rows_block::<4>(a, head, r0, &mut p, out) };
            r0 += 4;
        }
        while r0 < m {
            // SAFETY: row r0 exists; see `rows_block`.
            unsafe { rows_block::<1>(a, head, r0, &mut p, out) };
            r0 += 1;
        }
    }
}

/// Rows `r0..r0 + R` of one head.
///
/// # Safety
/// AVX-512F; the checks at the top of `attend_rows` hold, `r0 + R ≤ m`, and `p` holds
/// `R * len32` values.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn rows_block<const R: usize>(
    a: &AttendRows,
    head: usize,
    r0: usize,
    p: &mut [f32],
    out: &mut [f32],
) {
    let (len, hd, st) = (a.len, a.head_dim, a.stride);
    let h = a.heads * hd;
    let c0 = head * hd;
    let len32 = len.div_ceil(32) * 32;
    // Lanes of the 16 keys from `j` that exist.
    let mask_at = |j: usize| -> __mmask16 {
        if j >= len {
            0
        } else if j + 16 > len {
            ((1u32 << (len - j)) - 1) as u16
        } else {
            0xffff
        }
    };
    let mut inv = [0f32; R];
    // SAFETY (whole block): every load/store below stays inside the slices, as the caller's
    // checks establish: key columns `c0 + d < h` read the `len` values of
    // `kt[(c0 + d) * kt_stride..]` (lanes past `len` masked), value rows `j < len` read `hd`
    // values at `j * stride + c0 + c`, `p` rows hold `len32` values, query rows `r0 + r < m`
    // hold `h` values at `(r0 + r) * stride` and output rows `h` values at `(r0 + r) * h`.
    unsafe {
        // scores[r][j] = scale · q_r · k_j, 32 keys at a time
        let q = a.q.as_ptr().add(r0 * st + c0);
        for j0 in (0..len32).step_by(32) {
            let (m0, m1) = (mask_at(j0), mask_at(j0 + 16));
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            let kt = a.kt.as_ptr().add(c0 * a.kt_stride + j0);
            for d in 0..hd {
                let row = kt.add(d * a.kt_stride);
                let k0 = _mm512_maskz_loadu_ps(m0, row);
                // With m1 = 0 nothing is read; the address is only formed in bounds.
                let k1 = _mm512_maskz_loadu_ps(m1, row.wrapping_add(16));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let qb = _mm512_set1_ps(*q.add(r * st + d));
                    acc[0] = _mm512_fmadd_ps(qb, k0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(qb, k1, acc[1]);
                }
            }
            let scale = _mm512_set1_ps(a.scale);
            let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
            for (r, acc) in acc.iter().enumerate() {
                let dst = p.as_mut_ptr().add(r * len32 + j0);
                let s0 = _mm512_mask_blend_ps(m0, ninf, _mm512_mul_ps(acc[0], scale));
                let s1 = _mm512_mask_blend_ps(m1, ninf, _mm512_mul_ps(acc[1], scale));
                _mm512_storeu_ps(dst, s0);
                _mm512_storeu_ps(dst.add(16), s1);
            }
        }
        // p = exp(s - max), inv = 1 / Σp
        for (r, inv) in inv.iter_mut().enumerate() {
            let row = p.as_mut_ptr().add(r * len32);
            let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
            for j0 in (0..len32).step_by(16) {
                mx = _mm512_max_ps(mx, _mm512_loadu_ps(row.add(j0)));
            }
            let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            let mut sum = _mm512_setzero_ps();
            for j0 in (0..len32).step_by(16) {
                let e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row.add(j0)), mx));
                let e = _mm512_maskz_mov_ps(mask_at(j0), e);
                _mm512_storeu_ps(row.add(j0), e);
                sum = _mm512_add_ps(sum, e);
            }
            *inv = 1.0 / _mm512_reduce_add_ps(sum);
        }
        // out[r] = inv_r · Σ_j p[r][j] · v_j, 32 outputs at a time
        for c in (0..hd).step_by(32) {
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            let mut vp = a.v.as_ptr().add(c0 + c);
            for j in 0..len {
                let (v0, v1) = (_mm512_loadu_ps(vp), _mm512_loadu_ps(vp.add(16)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let pj = _mm512_set1_ps(*p.get_unchecked(r * len32 + j));
                    acc[0] = _mm512_fmadd_ps(pj, v0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(pj, v1, acc[1]);
                }
                vp = vp.wrapping_add(st);
            }
            for (r, acc) in acc.iter().enumerate() {
                let o = out.as_mut_ptr().add((r0 + r) * h + c0 + c);
                let s = _mm512_set1_ps(inv[r]);
                _mm512_storeu_ps(o, _mm512_mul_ps(acc[0], s));
                _mm512_storeu_ps(o.add(16), _mm512_mul_ps(acc[1], s));
            }
        }
    }
}

/// Row-wise `x = LayerNorm(x + add) · w + b`, rows of `w.len()` values; mean and variance in
/// f32 (two passes, so no cancellation).
#[target_feature(enable = "avx512f")]
pub unsafe fn add_layer_norm(x: &mut [f32], add: Option<&[f32]>, w: &[f32], b: &[f32], eps: f32) {
    let dim = w.len();
    if !dim.is_multiple_of(16) || b.len() != dim {
        return crate::reference::add_layer_norm(x, add, w, b, eps);
    }
    if let Some(add) = add {
        assert!(add.len() >= x.len());
    }
    for (i, row) in x.chunks_exact_mut(dim).enumerate() {
        let p = row.as_mut_ptr();
        // SAFETY: `row` holds `dim` values, `add` at least as many as `x`, `w` and `b` `dim`
        // (checked above); every access is one of 16 consecutive values at `c < dim`.
        unsafe {
            let mut sum = _mm512_setzero_ps();
            for c in (0..dim).step_by(16) {
                let mut v = _mm512_loadu_ps(p.add(c));
                if let Some(add) = add {
                    v = _mm512_add_ps(v, _mm512_loadu_ps(add.as_ptr().add(i * dim + c)));
                    _mm512_storeu_ps(p.add(c), v);
                }
                sum = _mm512_add_ps(sum, v);
            }
            let mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / dim as f32);
            let mut sq = _mm512_setzero_ps();
            for c in (0..dim).step_by(16) {
                let d = _mm512_sub_ps(_mm512_loadu_ps(p.add(c)), mean);
                sq = _mm512_fmadd_ps(d, d, sq);
            }
            let var = _mm512_reduce_add_ps(sq) / dim as f32;
            let inv = _mm512_set1_ps(1.0 / (var + eps).sqrt());
            for c in (0..dim).step_by(16) {
                let d = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(p.add(c)), mean), inv);
                let y = _mm512_fmadd_ps(
                    d,
                    _mm512_loadu_ps(w.as_ptr().add(c)),
                    _mm512_loadu_ps(b.as_ptr().add(c)),
                );
                _mm512_storeu_ps(p.add(c), y);
            }
        }
    }
}

/// `f32 → bf16` rounding to nearest even, 16 at a time (`vcvtneps2bf16`; as
/// `bf16mat::to_bf16` except that denormal inputs become zero).
/// `Σ x·y` of two rows of 16-bit floats, `widen(p)` giving the 16 values at `p` as f32: in
/// ggml's AVX-512 order (`ggml_vec_dot_f16`), four 16-lane accumulators over steps of 64
/// columns, added as (0 + 2) + (1 + 3) then across lanes; a leftover of 16..48 columns adds
/// to the first accumulators in turn, the rest goes to `rest(i)`, the dot product of
/// columns `i..` (the AVX2 kernel).
#[inline(always)]
unsafe fn dot_widened<T, const PF: bool>(
    x: &[T],
    y: &[T],
    widen: impl Fn(*const T) -> __m512,
    rest: impl Fn(usize) -> f32,
) -> f32 {
    let n = x.len().min(y.len());
    // SAFETY (whole body): the caller vouches for AVX-512 F; every `widen` reads 16 values
    // at `i + 16k`, with `i + 16k + 16 <= n` by the loop bounds.
    unsafe {
        let mut acc = [_mm512_setzero_ps(); 4];
        let (xp, yp) = (x.as_ptr(), y.as_ptr());
        let mut i = 0;
        while i + 64 <= n {
            // The weights 4 KiB ahead (this row's, or the next rows' that follow it): the
            // hardware prefetcher alone left decoding at ~70% of the read bound (`PF`, see
            // `x86::prefetch_weights`).
            if PF {
                super::avx2::prefetch(
                    xp.wrapping_add(i + super::avx2::PREFETCH_VALUES) as *const u8,
                    128,
                );
            }
            for (k, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(widen(xp.add(i + 16 * k)), widen(yp.add(i + 16 * k)), *acc);
            }
            i += 64;
        }
        let mut k = 0;
        while i + 16 <= n {
            acc[k] = _mm512_fmadd_ps(widen(xp.add(i)), widen(yp.add(i)), acc[k]);
            (i, k) = (i + 16, k + 1);
        }
        let [a0, a1, a2, a3] = acc;
        let sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a2), _mm512_add_ps(a1, a3)));
        if i < n {
            sum + rest(i)
        } else {
            sum
        }
    }
}

/// F16 rows' dot product (see [`dot_widened`]).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn dot_f16<const PF: bool>(x: &[half::f16], y: &[half::f16]) -> f32 {
    // SAFETY: `dot_widened` reads 16 halves (32 bytes) at each pointer it passes.
    let widen =
        |p: *const half::f16| unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) };
    // SAFETY: the features are enabled here (AVX2 for the rest).
    unsafe {
        dot_widened::<_, PF>(x, y, widen, |i| {
            super::avx2::dot_f16::<false>(&x[i..], &y[i..])
        })
    }
}

/// BF16 rows' dot product (see [`dot_widened`]).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn dot_bf16<const PF: bool>(x: &[half::bf16], y: &[half::bf16]) -> f32 {
    // bf16 → f32 is the 16 bits moved to the top of the word.
    let widen = |p: *const half::bf16| {
        // SAFETY: `dot_widened` reads 16 values (32 bytes) at each pointer it passes.
        let v = unsafe { _mm256_loadu_si256(p as *const __m256i) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    };
    // SAFETY: the features are enabled here (AVX2 for the rest).
    unsafe {
        dot_widened::<_, PF>(x, y, widen, |i| {
            super::avx2::dot_bf16::<false>(&x[i..], &y[i..])
        })
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub unsafe fn to_bf16(src: &[f32], dst: &mut [u16]) {
    let n = src.len().min(dst.len());
    let mut i = 0;
    // SAFETY: every access covers values `i..i + 16` with `i + 16 ≤ n`, or only the masked
    // lanes `i..n` of the last chunk.
    unsafe {
        while i + 16 <= n {
            let b = _mm512_cvtneps_pbh(_mm512_loadu_ps(src.as_ptr().add(i)));
            _mm256_storeu_si256(
                dst.as_mut_ptr().add(i) as *mut __m256i,
                std::mem::transmute::<__m256bh, __m256i>(b),
            );
            i += 16;
        }
        if i < n {
            let m = ((1u32 << (n - i)) - 1) as u16;
            let b = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src.as_ptr().add(i)));
            _mm256_mask_storeu_epi16(
                dst.as_mut_ptr().add(i) as *mut i16,
                m,
                std::mem::transmute::<__m256bh, __m256i>(b),
            );
        }
    }
}

/// Tokens per call of [`panel_matmul`] (8 tokens × 32 rows: 16 accumulators).
pub const PANEL_TOKENS: usize = 8;

/// `out[t][r] = init[r] + Σ_k x[t][k] · w[r][k]` for the tokens of `a` (up to 8) and the
/// 32-row panels `panels` (`out`: the tokens' rows of `rows` values).
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn panel_matmul(a: &PanelArgs, panels: std::ops::Range<usize>, out: &mut [f32]) {
    let tokens = a.x.len() / a.cols;
    assert!((1..=PANEL_TOKENS).contains(&tokens) && out.len() >= tokens * a.rows);
    assert!(panels.end <= a.rows.div_ceil(32));
    assert!(a.panels.len() >= panels.end * a.cols * 2 && a.init.len() >= panels.end * 32);
    for p in panels {
        // SAFETY: see `panel_block_at`; the panel index and token count were checked above.
        unsafe {
            match tokens {
                8 => panel_block_at::<8>(a, p, 0, out),
                4..=7 => {
                    panel_block_at::<4>(a, p, 0, out);
                    for t in 4..tokens {
                        panel_block_at::<1>(a, p, t, out);
                    }
                }
                _ => {
                    for t in 0..tokens {
                        panel_block_at::<1>(a, p, t, out);
                    }
                }
            }
        }
    }
}

/// Tokens `t0..t0 + T` × rows `32p..32p + 32` (stores masked past `rows`).
///
/// # Safety
/// AVX-512F; `t0 + T` tokens exist in `a.x` and `out`, and panel `p` exists.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn panel_block_at<const T: usize>(a: &PanelArgs, p: usize, t0: usize, out: &mut [f32]) {
    let cols = a.cols;
    let r0 = p * 32;
    let valid = (a.rows - r0).min(32);
    let m0: __mmask16 = if valid >= 16 {
        0xffff
    } else {
        ((1u32 << valid) - 1) as u16
    };
    let m1: __mmask16 = if valid >= 32 {
        0xffff
    } else if valid > 16 {
        ((1u32 << (valid - 16)) - 1) as u16
    } else {
        0
    };
    // SAFETY: panel `p` has `2 * cols` lines from `p * cols * 2`; token rows `t0 + t` have
    // `cols` values in `x` and `rows` values in `out`, of which lanes past `rows` are masked.
    unsafe {
        let w = a.panels.as_ptr().add(p * cols * 2) as *const f32;
        let (i0, i1) = (
            _mm512_loadu_ps(a.init.as_ptr().add(r0)),
            _mm512_loadu_ps(a.init.as_ptr().add(r0 + 16)),
        );
        let mut acc = [[i0, i1]; T];
        let x = a.x.as_ptr().add(t0 * cols);
        for k in 0..cols {
            let w0 = _mm512_load_ps(w.add(k * 32));
            let w1 = _mm512_load_ps(w.add(k * 32 + 16));
            for (t, acc) in acc.iter_mut().enumerate() {
                let xb = _mm512_set1_ps(*x.add(t * cols + k));
                acc[0] = _mm512_fmadd_ps(xb, w0, acc[0]);
                acc[1] = _mm512_fmadd_ps(xb, w1, acc[1]);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add((t0 + t) * a.rows + r0);
            _mm512_mask_storeu_ps(o, m0, acc[0]);
            _mm512_mask_storeu_ps(o.wrapping_add(16), m1, acc[1]);
        }
    }
}

/// Decoder attention (see [`crate::AttendF16`]) for all the block's rows at once: each key
/// and value is converted from f16 once for every row, scores of all rows come from one
/// pass over the keys and outputs from one pass over the values per 16 columns. `head_dim` must be a multiple of 16.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn attend_f16(a: &crate::AttendF16, out: &mut [f32], scratch: &mut Vec<f32>) {
    let (lo, n, qs, ps) = super::attend_setup(a, 16, out.len(), scratch);
    // SAFETY: the features `block` needs are enabled here; `attend_setup`'s checks keep
    // every access of `block` inside `a.k`, `a.v`, `qs`, `ps` and `out`.
    unsafe { super::by_rows!(a.rows, block(a, lo, n, qs, ps, out)) }
}

/// The scores step of [`attend_f16`] (see [`crate::AttendF16Steps::scores`]).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn attend_f16_scores(a: &crate::AttendF16, ps: &mut [f32], qs: &mut [f32]) {
    let (lo, n) = super::attend_scores_check(a, 16, ps);
    super::round_queries(a, qs);
    // SAFETY: as in `attend_f16`, with `ps` checked to hold the rows' scores and `qs` their
    // queries.
    unsafe { super::by_rows!(a.rows, scores_rows(a, lo, n, qs, ps)) }
}

/// The values step of [`attend_f16`] (see [`crate::AttendF16Steps::values`]).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn attend_f16_values(a: &crate::AttendF16, ps: &[f32], c0: usize, out: &mut [f32]) {
    let (lo, n, w) = super::attend_values_check(a, 16, ps, c0, out);
    let at = std::array::from_fn(|r| r * w);
    let (keys, cols) = ((lo, n), (c0, c0 + w));
    // SAFETY: the checks keep keys and values `lo..lo + n`, columns `c0..c0 + w` (multiples
    // of 16 within `head_dim`), the weights and the output rows `r * w` inside their slices.
    unsafe { super::by_rows!(a.rows, values_rows(a, keys, ps, cols, out, &at)) }
}

/// `R` rows over keys `lo..lo + n`: `qs` holds the rows' f16-rounded queries (`R × hd`),
/// `ps` room for their scores (`R × n`).
///
/// # Safety
/// As `attend_setup` checks: keys and values `lo..lo + n` exist; `R == a.rows`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn block<const R: usize>(
    a: &crate::AttendF16,
    lo: usize,
    n: usize,
    qs: &[f32],
    ps: &mut [f32],
    out: &mut [f32],
) {
    let hd = a.head_dim;
    // SAFETY (whole block): `attend_setup`'s checks bound every pointer: key/value rows
    // `lo..lo + n` hold `hd` values at `j * kv_stride`, `qs` R rows of `hd`, `ps` R rows of
    // `n`, output rows `hd` values at `at[r]`.
    unsafe {
        scores_rows::<R>(a, lo, n, qs, ps);
        for r in 0..R {
            let p = &mut ps[r * n..][..n];
            softmax(p);
            super::round_through_f16(p);
        }
        values_rows::<R>(a, (lo, n), ps, (0, hd), out, &a.at);
    }
}

/// scores[r][j] = scale · q_r · k_j, or -inf where row r does not see key j; rows in groups
/// of 4, so that each row's 4 accumulators stay in registers (8 rows' 32 went to the stack:
/// a load and a store around every FMA, a quarter of a Gemma3 prompt).
///
/// # Safety
/// As [`block`].
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn scores_rows<const R: usize>(
    a: &crate::AttendF16,
    lo: usize,
    n: usize,
    qs: &[f32],
    ps: &mut [f32],
) {
    let mut r0 = 0;
    // SAFETY: as the caller's.
    unsafe {
        while r0 < R {
            match R - r0 {
                1 => scores::<1>(a, lo, n, qs, ps, r0),
                2 => scores::<2>(a, lo, n, qs, ps, r0),
                3 => scores::<3>(a, lo, n, qs, ps, r0),
                _ => scores::<4>(a, lo, n, qs, ps, r0),
            }
            r0 += 4;
        }
    }
}

/// out[at[r] + c - c0] = Σ_j w[r][j] · v_j[c] for columns `c0..c1`: as many 16-column
/// chunks per pass over the values as the rows' accumulators leave registers for (each
/// accumulator still adds its keys in order, so the sums are those of one chunk per pass).
///
/// # Safety
/// As [`block`]; `c0..c1` multiples of 16 within `head_dim`, `out` holds `c1 - c0` values
/// at each `at[r]`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn values_rows<const R: usize>(
    a: &crate::AttendF16,
    keys: (usize, usize),
    ps: &[f32],
    (c0, c1): (usize, usize),
    out: &mut [f32],
    at: &[usize; 8],
) {
    let ch = if R <= 4 { 4 } else { 2 };
    let mut c = c0;
    let cols = |c| (c, c0);
    // SAFETY: as the caller's.
    unsafe {
        while c + 16 * ch <= c1 {
            if ch == 4 {
                values_f16::<R, 4>(a, keys, cols(c), ps, out, at);
            } else {
                values_f16::<R, 2>(a, keys, cols(c), ps, out, at);
            }
            c += 16 * ch;
        }
        while c < c1 {
            values_f16::<R, 1>(a, keys, cols(c), ps, out, at);
            c += 16;
        }
    }
}

/// Scores of rows `r0..r0 + G` (see [`block`]) over keys `lo..lo + n`. The sum runs in
/// ggml's order (`ggml_vec_dot_f16`): four 16-lane accumulators over steps of 64 columns,
/// added as (0 + 2) + (1 + 3), then across lanes; a leftover of 16..48 columns adds to the
/// first accumulators in turn.
///
/// # Safety
/// As [`block`]; `r0 + G <= a.rows`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn scores<const G: usize>(
    a: &crate::AttendF16,
    lo: usize,
    n: usize,
    qs: &[f32],
    ps: &mut [f32],
    r0: usize,
) {
    let hd = a.head_dim;
    /// Columns `c..c + 16` of key `kp` into accumulator `i` of every row of the group.
    #[inline(always)]
    unsafe fn chunk<const G: usize>(
        acc: &mut [[__m512; 4]; G],
        i: usize,
        kp: *const half::f16,
        q: *const f32,
        hd: usize,
        c: usize,
    ) {
        // SAFETY: the caller's bounds: column `c + 16 <= hd` of the key and of each row.
        unsafe {
            let kv = _mm512_cvtph_ps(_mm256_loadu_si256(kp.add(c) as *const __m256i));
            for (r, acc) in acc.iter_mut().enumerate() {
                acc[i] = _mm512_fmadd_ps(kv, _mm512_loadu_ps(q.add(r * hd + c)), acc[i]);
            }
        }
    }
    // SAFETY (whole body): as in `block`: keys `lo..lo + n` hold `hd` values at
    // `j * kv_stride`, `qs` rows `r0..r0 + G` of `hd`, `ps` those rows' `n` scores.
    unsafe {
        let q = qs.as_ptr().add(r0 * hd);
        for j in 0..n {
            let kp = a.k.as_ptr().add((lo + j) * a.kv_stride);
            super::prefetch_bytes(kp.wrapping_add(PREFETCH_ROWS * a.kv_stride), 2 * hd);
            let mut acc = [[_mm512_setzero_ps(); 4]; G];
            let mut c = 0;
            while c + 64 <= hd {
                chunk(&mut acc, 0, kp, q, hd, c);
                chunk(&mut acc, 1, kp, q, hd, c + 16);
                chunk(&mut acc, 2, kp, q, hd, c + 32);
                chunk(&mut acc, 3, kp, q, hd, c + 48);
                c += 64;
            }
            if c + 16 <= hd {
                chunk(&mut acc, 0, kp, q, hd, c);
            }
            if c + 32 <= hd {
                chunk(&mut acc, 1, kp, q, hd, c + 16);
            }
            if c + 48 <= hd {
                chunk(&mut acc, 2, kp, q, hd, c + 32);
            }
            for (r, acc) in acc.iter().enumerate() {
                let (first, end) = a.keys[r0 + r];
                let key = lo + j;
                ps[(r0 + r) * n + j] = if key >= first && key < end {
                    let sum =
                        _mm512_add_ps(_mm512_add_ps(acc[0], acc[2]), _mm512_add_ps(acc[1], acc[3]));
                    crate::scaled_score(_mm512_reduce_add_ps(sum), a.scale, a.softcap)
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
    }
}

/// Columns `c..c + 16·CH` of the `R` rows' weighted sums over values `lo..lo + n`, into
/// `out[at[r] + c - c0..]`.
///
/// # Safety
/// As [`block`]; `c + 16·CH ≤ head_dim`.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn values_f16<const R: usize, const CH: usize>(
    a: &crate::AttendF16,
    (lo, n): (usize, usize),
    (c, c0): (usize, usize),
    ps: &[f32],
    out: &mut [f32],
    at: &[usize; 8],
) {
    // SAFETY (whole body): as in `block`.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); CH]; R];
        let vp = a.v.as_ptr().add(lo * a.kv_stride + c);
        for j in 0..n {
            let row = vp.add(j * a.kv_stride);
            super::prefetch_bytes(row.wrapping_add(PREFETCH_ROWS * a.kv_stride), 32 * CH);
            let mut v = [_mm512_setzero_ps(); CH];
            for (k, v) in v.iter_mut().enumerate() {
                *v = _mm512_cvtph_ps(_mm256_loadu_si256(row.add(16 * k) as *const __m256i));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*ps.get_unchecked(r * n + j));
                for (acc, v) in acc.iter_mut().zip(&v) {
                    *acc = _mm512_fmadd_ps(w, *v, *acc);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (k, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add(at[r] + c - c0 + 16 * k), *acc);
            }
        }
    }
}

/// Keys ahead that the attention kernels prefetch.
const PREFETCH_ROWS: usize = super::ATTEND_PREFETCH_KEYS;

/// Tokens per call of [`bf16_dot_block`] (8 tokens × 32 rows: 16 accumulators).
pub const BF16_DOT_TOKENS: usize = 8;

/// `out[t][r] = init[r] + Σ_k x[t][k] · w[r][k]` for 8 tokens × 32 weight rows of a
/// `Bf16Matrix`, both operands in bf16, products summed in f32 by `vdpbf16ps` (two columns
/// per instruction: twice the multiply-adds of an f32 FMA where it issues at the same rate,
/// as on AMD Zen 4/5).
///
/// `a`: the first of the 8 tokens' rows in its group's first activation tile (tiles of 16
/// tokens × 32 columns, `k_blocks` of them 512 values apart, tokens 32 apart); `b0`, `b1`:
/// the first tiles of the two 16-row groups (`[column pair][row][2]`, 512 values apart).
/// Only the first `tokens` results are stored (rows `stride` apart), `valid` lanes of each.
///
/// # Safety
/// AVX-512F/BW/VL/BF16; `a`, `b0`, `b1` each point at `k_blocks` whole tiles (`b0`, `b1`
/// 64-byte aligned); `init` has 32 values; `out` has `tokens` rows of `valid` values
/// `stride` apart.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn bf16_dot_block(
    a: *const u16,
    b0: *const u16,
    b1: *const u16,
    k_blocks: usize,
    init: *const f32,
    out: *mut f32,
    stride: usize,
    tokens: usize,
    valid: usize,
) {
    assert!(tokens <= BF16_DOT_TOKENS && valid <= 32);
    let m0 = (((1u64 << valid.min(16)) - 1) & 0xffff) as __mmask16;
    let m1 = (((1u64 << valid.saturating_sub(16)) - 1) & 0xffff) as __mmask16;
    // SAFETY: the reads stay within the `k_blocks` tiles of `a`, `b0`, `b1` (column pair
    // `kk < 16`, token `t < 8`), the stores within `tokens` rows of `valid` lanes (masked).
    unsafe {
        let i0 = _mm512_loadu_ps(init);
        let i1 = _mm512_loadu_ps(init.add(16));
        let mut acc = [[i0, i1]; BF16_DOT_TOKENS];
        for kb in 0..k_blocks {
            let (a, w0, w1) = (a.add(kb * 512), b0.add(kb * 512), b1.add(kb * 512));
            for kk in 0..16 {
                let w0: __m512bh =
                    std::mem::transmute(_mm512_load_si512(w0.add(kk * 32) as *const _));
                let w1: __m512bh =
                    std::mem::transmute(_mm512_load_si512(w1.add(kk * 32) as *const _));
                for (t, acc) in acc.iter_mut().enumerate() {
                    let pair = (a.add(t * 32 + 2 * kk) as *const i32).read_unaligned();
                    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                    acc[0] = _mm512_dpbf16_ps(acc[0], w0, x);
                    acc[1] = _mm512_dpbf16_ps(acc[1], w1, x);
                }
            }
        }
        for (t, acc) in acc.iter().enumerate().take(tokens) {
            let row = out.add(t * stride);
            _mm512_mask_storeu_ps(row, m0, acc[0]);
            _mm512_mask_storeu_ps(row.add(16), m1, acc[1]);
        }
    }
}
