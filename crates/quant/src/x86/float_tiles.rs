//! Prompt tokens of F16/BF16 products (see `dispatch::FloatTiles`): a few weight rows,
//! widened to f32, against a block of tokens whose activations are stored transposed
//! (column `k` of the block's tokens side by side). Each weight value is broadcast once and
//! multiplied with a whole vector of tokens, so the rows stream from L1 and the tokens'
//! block from L2, and every FMA adds a weight to many tokens' sums: up to 8 rows × 32
//! tokens at AVX-512 (16 accumulators of the 32 registers), or 16 rows × 16 tokens where at
//! most 16 of the block's tokens are used (a 16-token prompt ran half its FMAs on padding),
//! 6 rows × 16 tokens at AVX2 (12 of 16). F16 at AVX2 takes dot tiles instead
//! (`dots_f16_avx2`), which widen rows and tokens as they read them.
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

/// Weight rows and tokens per call of the AVX2 F16 dot tiles: 12 sums, the 3 tokens'
/// vectors and one row's fill the 16 registers.
pub const DOT_ROWS_AVX2: usize = 4;
pub const DOT_TOKENS_AVX2: usize = 3;

/// `out[r · stride + t] = Σ_k w[r][k] · a[t][k]` for the rows of `w` (at most 4) and of `a`
/// (at most 3), both F16 and widened in registers as they are read (as llamafile's
/// tinyBLAS does): no widened copy of the weights or transposed copy of the tokens goes
/// through memory. Each sum runs in 8 lanes over columns `k ≡ lane (mod 8)`, added across
/// lanes at the end; leftover columns past a multiple of 8 are added last, in order.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dots_f16_avx2(w: &[f16], a: &[f16], cols: usize, out: &mut [f32], stride: usize) {
    let rows = w.len().checked_div(cols).unwrap_or(0);
    let toks = a.len().checked_div(cols).unwrap_or(0);
    assert!((1..=DOT_ROWS_AVX2).contains(&rows) && w.len() == rows * cols);
    assert!((1..=DOT_TOKENS_AVX2).contains(&toks) && a.len() == toks * cols);
    assert!(stride >= toks && out.len() >= (rows - 1) * stride + toks);
    // SAFETY: the features are enabled here and the shapes were checked above.
    unsafe {
        macro_rules! shapes {
            ($($r:literal $t:literal),+) => {
                match (rows, toks) {
                    $(($r, $t) => dots_f16::<$r, $t>(w, a, cols, out, stride),)+
                    _ => unreachable!(),
                }
            };
        }
        shapes!(4 3, 4 2, 4 1, 3 3, 3 2, 3 1, 2 3, 2 2, 2 1, 1 3, 1 2, 1 1)
    }
}

/// # Safety
/// AVX2, FMA and F16C; `w` holds `R` rows of `cols`, `a` `N`, and `out` room for `N`
/// values of each row, `stride` apart.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dots_f16<const R: usize, const N: usize>(
    w: &[f16],
    a: &[f16],
    cols: usize,
    out: &mut [f32],
    stride: usize,
) {
    let (wp, ap) = (w.as_ptr(), a.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    let whole = cols / 8 * 8;
    // SAFETY (both branches): every widening reads 8 values at `row · cols + k` with
    // `k + 8 ≤ whole ≤ cols`, inside the row.
    if R == 4 && N == 3 && whole > 0 {
        let sums = unsafe { main_4x3_f16(wp, ap, cols) };
        for (acc, sums) in acc.iter_mut().zip(&sums) {
            acc.copy_from_slice(sums);
        }
    } else {
        let widen = |p: *const f16| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) };
        for k in (0..whole).step_by(8) {
            let x: [__m256; N] = std::array::from_fn(|t| widen(ap.wrapping_add(t * cols + k)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let wr = widen(wp.wrapping_add(r * cols + k));
                for (acc, x) in acc.iter_mut().zip(&x) {
                    *acc = _mm256_fmadd_ps(wr, *x, *acc);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (t, acc) in acc.iter().enumerate() {
            let mut sum = super::avx2::hsum_ps(*acc);
            for k in whole..cols {
                sum += w[r * cols + k].to_f32() * a[t * cols + k].to_f32();
            }
            out[r * stride + t] = sum;
        }
    }
}

/// One widening of 8 f16 in `asm!`: register `d` from `[b + i]`.
macro_rules! widen_f16_asm {
    ($d:literal, $b:literal) => {
        concat!("vcvtph2ps {", $d, "}, xmmword ptr [{", $b, "} + {i}]")
    };
}

/// The 8-lane sums of 4 rows × 3 tokens over the first `cols / 8 * 8` columns (`w` and `a`
/// the first row and token, `cols` values apart). In assembly because the 12 sums, 3
/// tokens and one row take all 16 registers, and the compiler's schedule kept one sum on
/// the stack: a store and a reload on its chain every step held the tile to about half
/// the rate of llama.cpp's on Zen 3 (`qmatmul 1 F16 512`: 17 against ~30 GMAC/s).
///
/// Each step also prefetches one line of the next 4 rows (`w + 4·cols`, where the caller's
/// next tile of rows starts), so they are in cache when it does: a row of 2048 f16 is a
/// page of its own, and the hardware prefetcher does not follow a stream into a new page
/// (bench-big F16 pp16 on 2 threads of a Zen 3: 114–131 → 122–138 t/s with it). Prefetching past the last
/// row is harmless: a prefetch never faults.
///
/// # Safety
/// AVX2, FMA and F16C; 4 rows from `w` and 3 from `a`, `cols ≥ 8` each.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn main_4x3_f16(w: *const f16, a: *const f16, cols: usize) -> [[__m256; 3]; 4] {
    let z = _mm256_setzero_ps();
    let [mut c00, mut c01, mut c02, mut c10, mut c11, mut c12] = [z; 6];
    let [mut c20, mut c21, mut c22, mut c30, mut c31, mut c32] = [z; 6];
    let end = cols / 8 * 16;
    // SAFETY: each step reads 16 bytes at byte `i < end` of the 4 rows and 3 tokens, inside
    // them (the prefetch reads nothing); `end > 0` as `cols ≥ 8`. Only the listed
    // registers are written, no memory.
    unsafe {
        let (w1, w2, w3) = (w.add(cols), w.add(2 * cols), w.add(3 * cols));
        let (a1, a2) = (a.add(cols), a.add(2 * cols));
        std::arch::asm!(
            "2:",
            "prefetcht0 [{pf} + {i} * 4]",
            widen_f16_asm!("x0", "a0"),
            widen_f16_asm!("x1", "a1"),
            widen_f16_asm!("x2", "a2"),
            widen_f16_asm!("v", "w0"),
            "vfmadd231ps {c00}, {v}, {x0}",
            "vfmadd231ps {c01}, {v}, {x1}",
            "vfmadd231ps {c02}, {v}, {x2}",
            widen_f16_asm!("v", "w1"),
            "vfmadd231ps {c10}, {v}, {x0}",
            "vfmadd231ps {c11}, {v}, {x1}",
            "vfmadd231ps {c12}, {v}, {x2}",
            widen_f16_asm!("v", "w2"),
            "vfmadd231ps {c20}, {v}, {x0}",
            "vfmadd231ps {c21}, {v}, {x1}",
            "vfmadd231ps {c22}, {v}, {x2}",
            widen_f16_asm!("v", "w3"),
            "vfmadd231ps {c30}, {v}, {x0}",
            "vfmadd231ps {c31}, {v}, {x1}",
            "vfmadd231ps {c32}, {v}, {x2}",
            "add {i}, 16",
            "cmp {i}, {end}",
            "jb 2b",
            i = inout(reg) 0usize => _,
            end = in(reg) end,
            a0 = in(reg) a,
            a1 = in(reg) a1,
            a2 = in(reg) a2,
            w0 = in(reg) w,
            w1 = in(reg) w1,
            w2 = in(reg) w2,
            w3 = in(reg) w3,
            pf = in(reg) w.wrapping_add(4 * cols),
            x0 = out(ymm_reg) _,
            x1 = out(ymm_reg) _,
            x2 = out(ymm_reg) _,
            v = out(ymm_reg) _,
            c00 = inout(ymm_reg) c00,
            c01 = inout(ymm_reg) c01,
            c02 = inout(ymm_reg) c02,
            c10 = inout(ymm_reg) c10,
            c11 = inout(ymm_reg) c11,
            c12 = inout(ymm_reg) c12,
            c20 = inout(ymm_reg) c20,
            c21 = inout(ymm_reg) c21,
            c22 = inout(ymm_reg) c22,
            c30 = inout(ymm_reg) c30,
            c31 = inout(ymm_reg) c31,
            c32 = inout(ymm_reg) c32,
            options(nostack, readonly),
        );
    }
    [
        [c00, c01, c02],
        [c10, c11, c12],
        [c20, c21, c22],
        [c30, c31, c32],
    ]
}
