//! Prompt tokens of F16/BF16 products (see `dispatch::FloatTiles`): a few weight rows,
//! widened to f32, against a block of tokens whose activations are stored transposed
//! (column `k` of the block's tokens side by side). Each weight value is broadcast once and
//! multiplied with a whole vector of tokens, so the rows stream from L1 and the tokens'
//! block from L2, and every FMA adds a weight to many tokens' sums: up to 8 rows × 32
//! tokens at AVX-512 (16 accumulators of the 32 registers), or 16 rows × 16 tokens where at
//! most 16 of the block's tokens are used (a 16-token prompt ran half its FMAs on padding),
//! 6 rows × 16 tokens at AVX2 (12 of 16).
#![allow(clippy::missing_safety_doc)] // callers must have detected the features listed

use half::{bf16, f16};
use std::arch::x86_64::*;

/// Tokens per transposed block and rows per call at each level.
pub const TOKENS_512: usize = 32;
pub const ROWS_512: usize = 16;
pub const TOKENS_AVX2: usize = 16;
pub const ROWS_AVX2: usize = 6;

/// The checks every tile makes: `w` holds 1..=`max_rows` rows of `cols`, `xt` a block of
/// `cols × tokens`, and `out` room for `valid` tokens of each row, `stride` apart.
fn check(w: &[f32], xt: &[f32], cols: usize, out: &[f32], stride: usize, valid: usize) -> usize {
    let rows = w.len().checked_div(cols).unwrap_or(0);
    assert!(
        rows >= 1 && w.len() == rows * cols,
        "weights are not whole rows"
    );
    assert!(xt.len() >= cols * valid && valid >= 1 && stride >= valid);
    assert!(out.len() >= (rows - 1) * stride + valid);
    rows
}

/// `out[r · stride + t] = Σ_k w[r][k] · xt[k · 32 + t]` for the rows of `w` (at most 16)
/// and the first `valid` of the block's 32 tokens.
#[target_feature(enable = "avx512f")]
pub unsafe fn tile_avx512(
    w: &[f32],
    xt: &[f32],
    cols: usize,
    out: &mut [f32],
    stride: usize,
    valid: usize,
) {
    let rows = check(w, xt, cols, out, stride, valid);
    assert!(rows <= ROWS_512 && valid <= TOKENS_512 && xt.len() >= cols * TOKENS_512);
    // SAFETY: the sizes were checked above; `block512` reads `R` rows of `cols` from `w`,
    // `cols × 32` values from `xt`, and writes `valid` values of each row of `out`.
    unsafe {
        macro_rules! rows {
            ($h:literal, $w:expr, $out:expr, $($r:literal)+) => {
                match $w.len() / cols {
                    $($r => block512::<$r, $h>($w, xt, cols, $out, stride, valid),)+
                    _ => unreachable!(),
                }
            };
        }
        if valid <= 16 {
            // One accumulator per row: up to 16 rows in the 16 accumulators.
            rows!(1, w, out, 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16)
        } else {
            // Two accumulators per row: 8 rows at a time.
            for (i, w) in w.chunks(8 * cols).enumerate() {
                rows!(2, w, &mut out[8 * i * stride..], 1 2 3 4 5 6 7 8)
            }
        }
    }
}

/// # Safety
/// AVX-512F; as checked by `tile_avx512` for `R` rows.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn block512<const R: usize, const H: usize>(
    w: &[f32],
    xt: &[f32],
    cols: usize,
    out: &mut [f32],
    stride: usize,
    valid: usize,
) {
    // SAFETY (whole body): row `r < R` of `w` has `cols` values at `r · cols`; the block
    // has 32 values per column `k < cols`; output row `r` has `valid` values from
    // `r · stride`, and lanes past `valid` are masked.
    unsafe {
        let (wp, xp) = (w.as_ptr(), xt.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for k in 0..cols {
            let x0 = _mm512_loadu_ps(xp.add(k * 32));
            let x1 = if H == 2 {
                _mm512_loadu_ps(xp.add(k * 32 + 16))
            } else {
                _mm512_setzero_ps()
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                let wb = _mm512_set1_ps(*wp.add(r * cols + k));
                acc[0] = _mm512_fmadd_ps(wb, x0, acc[0]);
                if H == 2 {
                    acc[1] = _mm512_fmadd_ps(wb, x1, acc[1]);
                }
            }
        }
        let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as u16 };
        let (m0, m1) = (lanes(valid), lanes(valid.saturating_sub(16)));
        for (r, acc) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add(r * stride);
            _mm512_mask_storeu_ps(o, m0, acc[0]);
            // With m1 = 0 nothing is written; the address is only formed.
            _mm512_mask_storeu_ps(o.wrapping_add(16), m1, acc[1]);
        }
    }
}

/// `out[r · stride + t] = Σ_k w[r][k] · xt[k · 16 + t]` for the rows of `w` (at most 6)
/// and the first `valid` of the block's 16 tokens.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_avx2(
    w: &[f32],
    xt: &[f32],
    cols: usize,
    out: &mut [f32],
    stride: usize,
    valid: usize,
) {
    let rows = check(w, xt, cols, out, stride, valid);
    assert!(rows <= ROWS_AVX2 && valid <= TOKENS_AVX2 && xt.len() >= cols * TOKENS_AVX2);
    // SAFETY: as in `tile_avx512`, for blocks of 16 tokens.
    unsafe {
        match rows {
            6 => block_avx2::<6>(w, xt, cols, out, stride, valid),
            5 => block_avx2::<5>(w, xt, cols, out, stride, valid),
            4 => block_avx2::<4>(w, xt, cols, out, stride, valid),
            3 => block_avx2::<3>(w, xt, cols, out, stride, valid),
            2 => block_avx2::<2>(w, xt, cols, out, stride, valid),
            _ => block_avx2::<1>(w, xt, cols, out, stride, valid),
        }
    }
}

/// # Safety
/// AVX2 and FMA; as checked by `tile_avx2` for `R` rows.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2<const R: usize>(
    w: &[f32],
    xt: &[f32],
    cols: usize,
    out: &mut [f32],
    stride: usize,
    valid: usize,
) {
    // SAFETY (whole body): as in `block512`, with 16 values per column of the block; the
    // results pass through a 16-value buffer, of which `valid` are copied out.
    unsafe {
        let (wp, xp) = (w.as_ptr(), xt.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for k in 0..cols {
            let x0 = _mm256_loadu_ps(xp.add(k * 16));
            let x1 = _mm256_loadu_ps(xp.add(k * 16 + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let wb = _mm256_broadcast_ss(&*wp.add(r * cols + k));
                acc[0] = _mm256_fmadd_ps(wb, x0, acc[0]);
                acc[1] = _mm256_fmadd_ps(wb, x1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add(r * stride);
            super::avx2::store_16(o, acc[0], acc[1], valid);
        }
    }
}

/// `y = x` widened from f16 (exact), 8 at a time.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn widen_f16(x: &[f16], y: &mut [f32]) {
    assert!(y.len() >= x.len());
    let n8 = x.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        // SAFETY: 8 values at `i + 8 ≤ x.len() ≤ y.len()`.
        unsafe {
            let h = _mm_loadu_si128(x.as_ptr().add(i) as *const __m128i);
            _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
    }
    for i in n8..x.len() {
        y[i] = x[i].to_f32();
    }
}

/// `y = x` widened from bf16 (exact: the bits moved to the top half), 8 at a time.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn widen_bf16(x: &[bf16], y: &mut [f32]) {
    assert!(y.len() >= x.len());
    let n8 = x.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        // SAFETY: 8 values at `i + 8 ≤ x.len() ≤ y.len()`.
        unsafe {
            let h = _mm_loadu_si128(x.as_ptr().add(i) as *const __m128i);
            let v = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
            _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_castsi256_ps(v));
        }
    }
    for i in n8..x.len() {
        y[i] = x[i].to_f32();
    }
}
