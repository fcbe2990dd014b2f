//! AVX2 + FMA kernels for encoder models on CPUs without AVX-512: exact-form GELU,
//! LayerNorm, bidirectional attention over blocks of query rows, and f32 products on
//! 16-row panels (see `f32mat`); the decoders' softmax and SwiGLU. The same approximations
//! as `avx512.rs`: ggml's `exp` for `x ≤ 0` (clamped at -87) and Abramowitz & Stegun 7.1.26
//! for `erf`; without `vscalefps`, `2ⁿ` is built in the exponent bits.
#![allow(clippy::missing_safety_doc)] // callers must have detected AVX2 and FMA

use super::avx2::hsum_ps;
use crate::f32mat::PanelArgs;
use crate::AttendRows;
use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx2,fma")]
fn splat(bits: u32) -> __m256 {
    _mm256_set1_ps(f32::from_bits(bits))
}

/// `exp(x)` for `x ≤ 0`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp_ps(x: __m256) -> __m256 {
    // This operand order keeps a NaN input NaN (`max` returns its second operand then).
    let x = _mm256_max_ps(_mm256_set1_ps(-87.0), x);
    let r = splat(0x4b40_0000); // 0x1.8p23
    let z = _mm256_fmadd_ps(x, splat(0x3fb8_aa3b), r); // log2(e)
    let n = _mm256_sub_ps(z, r);
    // b = x - n·ln2, with ln2 split in two.
    let b = _mm256_fnmadd_ps(
        n,
        splat(0x35bf_be8e),
        _mm256_fnmadd_ps(n, splat(0x3f31_7200), x),
    );
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(splat(0x3c07_2010), b, splat(0x3d2b_9f17)),
            u,
            _mm256_fmadd_ps(splat(0x3e2a_af33), b, splat(0x3eff_fedb)),
        ),
        u,
        _mm256_fmadd_ps(splat(0x3f7f_fff6), b, _mm256_set1_ps(1.0)),
    );
    // j · 2ⁿ, n in -126..=0: the exponent bits of 2ⁿ directly.
    let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(j, _mm256_castsi256_ps(e))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn gelu_ps(x: __m256) -> __m256 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_72,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let sign = _mm256_set1_ps(-0.0);
    let a = _mm256_mul_ps(
        _mm256_andnot_ps(sign, x),
        _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
    );
    let t = _mm256_div_ps(
        _mm256_set1_ps(1.0),
        _mm256_fmadd_ps(_mm256_set1_ps(P), a, _mm256_set1_ps(1.0)),
    );
    let mut poly = _mm256_set1_ps(A[4]);
    for &c in A[..4].iter().rev() {
        poly = _mm256_fmadd_ps(poly, t, _mm256_set1_ps(c));
    }
    poly = _mm256_mul_ps(poly, t);
    let e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
    // erf(|x|/√2) = 1 - poly·e; erf is odd, so 1 + erf(x/√2) = 1 ± (1 - poly·e).
    let erf_abs = _mm256_fnmadd_ps(poly, e, _mm256_set1_ps(1.0));
    let erf = _mm256_or_ps(erf_abs, _mm256_and_ps(x, sign));
    _mm256_mul_ps(
        _mm256_mul_ps(_mm256_set1_ps(0.5), x),
        _mm256_add_ps(_mm256_set1_ps(1.0), erf),
    )
}

/// `x = 0.5·x·(1 + erf(x/√2))` in place.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn gelu(x: &mut [f32]) {
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: `c` has 8 values.
        unsafe { _mm256_storeu_ps(c.as_mut_ptr(), gelu_ps(_mm256_loadu_ps(c.as_ptr()))) };
    }
    let rest = chunks.into_remainder();
    if !rest.is_empty() {
        let mut tail = [0f32; 8];
        tail[..rest.len()].copy_from_slice(rest);
        // SAFETY: `tail` has 8 values.
        unsafe { _mm256_storeu_ps(tail.as_mut_ptr(), gelu_ps(_mm256_loadu_ps(tail.as_ptr()))) };
        rest.copy_from_slice(&tail[..rest.len()]);
    }
}

/// `x / (1 + e^-x) · u` (SiLU(x)·u) from `e^-|x|` alone, so `exp` only sees `x ≤ 0`:
/// the sigmoid is `1 / (1 + e)` for `x ≥ 0` and `e / (1 + e)` below.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn swiglu_ps(x: __m256, u: __m256) -> __m256 {
    let neg_abs = _mm256_or_ps(x, _mm256_set1_ps(-0.0));
    let e = exp_ps(neg_abs);
    let one = _mm256_set1_ps(1.0);
    let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps());
    let num = _mm256_blendv_ps(one, e, below);
    _mm256_mul_ps(
        _mm256_div_ps(_mm256_mul_ps(x, num), _mm256_add_ps(one, e)),
        u,
    )
}

/// `gate = SiLU(gate) · up` in place (see `reference::swiglu`).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn swiglu(gate: &mut [f32], up: &[f32]) {
    let n = gate.len().min(up.len());
    let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
    let mut i = 0;
    // SAFETY: every access is at `i..i + 8 <= n`.
    unsafe {
        while i + 8 <= n {
            let v = swiglu_ps(_mm256_loadu_ps(g.add(i)), _mm256_loadu_ps(u.add(i)));
            _mm256_storeu_ps(g.add(i), v);
            i += 8;
        }
    }
    crate::reference::swiglu(&mut gate[i..n], &up[i..n]);
}

/// `exp(v - mx)`, exactly 0 where `v - mx < -87` (a NaN stays, to show).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn shifted_exp(v: __m256, mx: __m256) -> __m256 {
    let d = _mm256_sub_ps(v, mx);
    let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(d, _mm256_set1_ps(-87.0));
    _mm256_and_ps(keep, exp_ps(d))
}

/// `x = softmax(x)` (see `reference::softmax`): the exponentials in f32, summed in f64;
/// inputs more than 87 below the maximum (masked keys' `-inf` among them) weigh exactly 0.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn softmax(x: &mut [f32]) {
    let n = x.len();
    let full = n - n % 8;
    let p = x.as_mut_ptr();
    // SAFETY: every vector access is at `i..i + 8 <= full <= n`; the rest are slice
    // accesses.
    unsafe {
        let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i < full {
            mx = _mm256_max_ps(mx, _mm256_loadu_ps(p.add(i)));
            i += 8;
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), mx);
        let max = lanes
            .iter()
            .chain(&x[full..])
            .copied()
            .fold(f32::NEG_INFINITY, f32::max);
        let mxv = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_pd();
        i = 0;
        while i < full {
            let e = shifted_exp(_mm256_loadu_ps(p.add(i)), mxv);
            _mm256_storeu_ps(p.add(i), e);
            let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(e));
            let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(e));
            sum = _mm256_add_pd(sum, _mm256_add_pd(lo, hi));
            i += 8;
        }
        let mut halves = [0f64; 4];
        _mm256_storeu_pd(halves.as_mut_ptr(), sum);
        let mut total: f64 = halves.iter().sum();
        for v in &mut x[full..] {
            let d = *v - max;
            *v = if d < -87.0 { 0.0 } else { d.exp() };
            total += *v as f64;
        }
        let inv = (1.0 / total) as f32;
        let invv = _mm256_set1_ps(inv);
        let p = x.as_mut_ptr();
        i = 0;
        while i < full {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), invv));
            i += 8;
        }
        for v in &mut x[full..] {
            *v *= inv;
        }
    }
}

/// Row-wise `x = LayerNorm(x + add) · w + b`, rows of `w.len()` values; mean and variance in
/// f32 (two passes, so no cancellation).
#[target_feature(enable = "avx2,fma")]
pub unsafe fn add_layer_norm(x: &mut [f32], add: Option<&[f32]>, w: &[f32], b: &[f32], eps: f32) {
    let dim = w.len();
    if !dim.is_multiple_of(8) || b.len() != dim {
        return crate::reference::add_layer_norm(x, add, w, b, eps);
    }
    if let Some(add) = add {
        assert!(add.len() >= x.len());
    }
    for (i, row) in x.chunks_exact_mut(dim).enumerate() {
        let p = row.as_mut_ptr();
        // SAFETY: `row` holds `dim` values, `add` at least as many as `x`, `w` and `b` `dim`
        // (checked above); every access is one of 8 consecutive values at `c < dim`.
        unsafe {
            let mut sum = _mm256_setzero_ps();
            for c in (0..dim).step_by(8) {
                let mut v = _mm256_loadu_ps(p.add(c));
                if let Some(add) = add {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(add.as_ptr().add(i * dim + c)));
                    _mm256_storeu_ps(p.add(c), v);
                }
                sum = _mm256_add_ps(sum, v);
            }
            let mean = _mm256_set1_ps(hsum_ps(sum) / dim as f32);
            let mut sq = _mm256_setzero_ps();
            for c in (0..dim).step_by(8) {
                let d = _mm256_sub_ps(_mm256_loadu_ps(p.add(c)), mean);
                sq = _mm256_fmadd_ps(d, d, sq);
            }
            let var = hsum_ps(sq) / dim as f32;
            let inv = _mm256_set1_ps(1.0 / (var + eps).sqrt());
            for c in (0..dim).step_by(8) {
                let d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(p.add(c)), mean), inv);
                let y = _mm256_fmadd_ps(
                    d,
                    _mm256_loadu_ps(w.as_ptr().add(c)),
                    _mm256_loadu_ps(b.as_ptr().add(c)),
                );
                _mm256_storeu_ps(p.add(c), y);
            }
        }
    }
}

/// All ones in the lanes `j + i < len` (i = 0..8).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn lanes_below(j: usize, len: usize) -> __m256i {
    let left = len.saturating_sub(j).min(8) as i32;
    _mm256_cmpgt_epi32(
        _mm256_set1_epi32(left),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    )
}

/// Attention for the query rows of `a` (see [`AttendRows`]), 4 rows at a time: the scores
/// of 4 rows × 16 keys stay in registers while the transposed keys stream past, and the
/// weighted sum of values keeps 4 rows × 16 outputs in registers. `head_dim` must be a
/// multiple of 16.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn attend_rows(a: &AttendRows, out: &mut [f32]) {
    let h = a.heads * a.head_dim;
    let m = out.len() / h;
    let st = a.stride;
    assert!(a.head_dim.is_multiple_of(16) && st >= h && m >= 1);
    assert!(a.q.len() >= (m - 1) * st + h && a.v.len() >= (a.len - 1) * st + h);
    assert!(a.len >= 1 && a.kt_stride >= a.len && a.kt.len() >= (h - 1) * a.kt_stride + a.len);
    let len16 = a.len.div_ceil(16) * 16;
    // Probabilities of up to 4 rows (unnormalised), `len16` each.
    let mut p = vec![0f32; 4 * len16];
    for head in 0..a.heads {
        let mut r0 = 0;
        while r0 + 4 <= m {
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
/// AVX2 and FMA; the checks at the top of `attend_rows` hold, `r0 + R ≤ m`, and `p` holds
/// `R * len16` values.
#[inline]
#[target_feature(enable = "avx2,fma")]
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
    let len16 = len.div_ceil(16) * 16;
    let mut inv = [0f32; R];
    // SAFETY (whole block): every access stays inside the slices, as the caller's checks
    // establish: key columns `c0 + d < h` read the `len` values of `kt[(c0 + d) *
    // kt_stride..]` (lanes past `len` masked, and `kt_stride ≥ len`), value rows `j < len`
    // read `hd` values at `j * stride + c0 + c`, `p` rows hold `len16` values, query rows
    // `r0 + r < m` hold `h` values at `(r0 + r) * stride` and output rows `h` values at
    // `(r0 + r) * h`.
    unsafe {
        // scores[r][j] = scale · q_r · k_j, 16 keys at a time
        let q = a.q.as_ptr().add(r0 * st + c0);
        let scale = _mm256_set1_ps(a.scale);
        let ninf = _mm256_set1_ps(f32::NEG_INFINITY);
        for j0 in (0..len16).step_by(16) {
            let (m0, m1) = (lanes_below(j0, len), lanes_below(j0 + 8, len));
            let whole = j0 + 16 <= len;
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let kt = a.kt.as_ptr().add(c0 * a.kt_stride + j0);
            for d in 0..hd {
                let row = kt.add(d * a.kt_stride);
                let (k0, k1) = if whole {
                    (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)))
                } else {
                    // Masked lanes are not read; the address is only formed.
                    (
                        _mm256_maskload_ps(row, m0),
                        _mm256_maskload_ps(row.wrapping_add(8), m1),
                    )
                };
                for (r, acc) in acc.iter_mut().enumerate() {
                    let qb = _mm256_broadcast_ss(&*q.add(r * st + d));
                    acc[0] = _mm256_fmadd_ps(qb, k0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(qb, k1, acc[1]);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let dst = p.as_mut_ptr().add(r * len16 + j0);
                let s0 =
                    _mm256_blendv_ps(ninf, _mm256_mul_ps(acc[0], scale), _mm256_castsi256_ps(m0));
                let s1 =
                    _mm256_blendv_ps(ninf, _mm256_mul_ps(acc[1], scale), _mm256_castsi256_ps(m1));
                _mm256_storeu_ps(dst, s0);
                _mm256_storeu_ps(dst.add(8), s1);
            }
        }
        // p = exp(s - max), inv = 1 / Σp
        for (r, inv) in inv.iter_mut().enumerate() {
            let row = p.as_mut_ptr().add(r * len16);
            let mut mx = ninf;
            for j0 in (0..len16).step_by(8) {
                mx = _mm256_max_ps(mx, _mm256_loadu_ps(row.add(j0)));
            }
            let mx = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            let mx = _mm_max_ps(mx, _mm_movehl_ps(mx, mx));
            let mx = _mm_max_ss(mx, _mm_movehdup_ps(mx));
            let mx = _mm256_set1_ps(_mm_cvtss_f32(mx));
            let mut sum = _mm256_setzero_ps();
            for j0 in (0..len16).step_by(8) {
                let e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(row.add(j0)), mx));
                let e = _mm256_and_ps(e, _mm256_castsi256_ps(lanes_below(j0, len)));
                _mm256_storeu_ps(row.add(j0), e);
                sum = _mm256_add_ps(sum, e);
            }
            *inv = 1.0 / hsum_ps(sum);
        }
        // out[r] = inv_r · Σ_j p[r][j] · v_j, 16 outputs at a time
        for c in (0..hd).step_by(16) {
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            let mut vp = a.v.as_ptr().add(c0 + c);
            for j in 0..len {
                let (v0, v1) = (_mm256_loadu_ps(vp), _mm256_loadu_ps(vp.add(8)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let pj = _mm256_broadcast_ss(&*p.as_ptr().add(r * len16 + j));
                    acc[0] = _mm256_fmadd_ps(pj, v0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(pj, v1, acc[1]);
                }
                vp = vp.wrapping_add(st);
            }
            for (r, acc) in acc.iter().enumerate() {
                let o = out.as_mut_ptr().add((r0 + r) * h + c0 + c);
                let s = _mm256_set1_ps(inv[r]);
                _mm256_storeu_ps(o, _mm256_mul_ps(acc[0], s));
                _mm256_storeu_ps(o.add(8), _mm256_mul_ps(acc[1], s));
            }
        }
    }
}

/// Tokens per call of [`panel_matmul`] (6 tokens × 16 rows: 12 accumulators, two weight
/// vectors and one broadcast in the 16 registers).
pub const PANEL_TOKENS: usize = 6;

/// `out[t][r] = init[r] + Σ_k x[t][k] · w[r][k]` for the tokens of `a` (up to 6) and the
/// 16-row panels `panels` (`out`: the tokens' rows of `rows` values).
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn panel_matmul(a: &PanelArgs, panels: std::ops::Range<usize>, out: &mut [f32]) {
    let tokens = a.x.len() / a.cols;
    assert!((1..=PANEL_TOKENS).contains(&tokens) && out.len() >= tokens * a.rows);
    assert!(panels.end <= a.rows.div_ceil(16));
    assert!(a.panels.len() >= panels.end * a.cols && a.init.len() >= panels.end * 16);
    for p in panels {
        // SAFETY: see `panel_block`; the panel index and token count were checked above.
        unsafe {
            match tokens {
                6 => panel_block::<6>(a, p, out),
                5 => panel_block::<5>(a, p, out),
                4 => panel_block::<4>(a, p, out),
                3 => panel_block::<3>(a, p, out),
                2 => panel_block::<2>(a, p, out),
                _ => panel_block::<1>(a, p, out),
            }
        }
    }
}

/// The `T` tokens of `a` × rows `16p..16p + 16` (stores cut at `rows`).
///
/// # Safety
/// AVX2 and FMA; `T` tokens exist in `a.x` and `out`, and panel `p` exists.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_block<const T: usize>(a: &PanelArgs, p: usize, out: &mut [f32]) {
    let cols = a.cols;
    let r0 = p * 16;
    let valid = (a.rows - r0).min(16);
    // SAFETY: panel `p` has `cols` lines from `p * cols`; token rows `t` have `cols` values
    // in `x` and `rows` values in `out`, of which only the `valid` ones from `r0` are written.
    unsafe {
        let w = a.panels.as_ptr().add(p * cols) as *const f32;
        let (i0, i1) = (
            _mm256_loadu_ps(a.init.as_ptr().add(r0)),
            _mm256_loadu_ps(a.init.as_ptr().add(r0 + 8)),
        );
        let mut acc = [[i0, i1]; T];
        let x = a.x.as_ptr();
        for k in 0..cols {
            let w0 = _mm256_load_ps(w.add(k * 16));
            let w1 = _mm256_load_ps(w.add(k * 16 + 8));
            for (t, acc) in acc.iter_mut().enumerate() {
                let xb = _mm256_broadcast_ss(&*x.add(t * cols + k));
                acc[0] = _mm256_fmadd_ps(xb, w0, acc[0]);
                acc[1] = _mm256_fmadd_ps(xb, w1, acc[1]);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add(t * a.rows + r0);
            super::avx2::store_16(o, acc[0], acc[1], valid);
        }
    }
}
