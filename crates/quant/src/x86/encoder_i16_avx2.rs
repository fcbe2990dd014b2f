//! AVX2 kernels of the 16-bit encoder products ([`crate::i16mat`]), the same arithmetic as
//! `encoder_vnni` without VNNI: each pair of products is `vpmaddwd` (16 multiply-adds per
//! 256-bit instruction, twice an f32 FMA's 8) plus a `vpaddd` into the chunk's exact i32
//! sum, which runs on another port. A block is 6 tokens × 16 rows (half a 32-row panel):
//! 12 integer accumulators, two weight vectors and the broadcast token pair fill 15 of the
//! 16 registers, so the float accumulators live in memory and are touched once per chunk.

use std::arch::x86_64::*;

use crate::i16mat::{chunk_scale, I16Args, CHUNK};

/// Tokens per block of [`panel_matmul`].
pub const I16_TOKENS: usize = 6;

/// Quantizes the rows of `x` as `encoder_vnni::quantize_rows` does (and
/// [`crate::i16mat::quantize_chunk`], bit for bit), with AVX2.
///
/// # Safety
/// AVX2.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn quantize_rows(
    x: &[f32],
    cols: usize,
    chunks: usize,
    pairs: &mut [i32],
    scales: &mut [f32],
) {
    let tokens = x.len() / cols;
    assert!(chunks == cols.div_ceil(CHUNK) && x.len() == tokens * cols);
    assert!(pairs.len() >= tokens * chunks * 32 && scales.len() >= tokens * chunks);
    let mut tail = [0f32; CHUNK];
    for t in 0..tokens {
        for c in 0..chunks {
            let start = c * CHUNK;
            let n = (cols - start).min(CHUNK);
            let row = &x[t * cols + start..t * cols + start + n];
            // A short last chunk is zero-padded through a copy (no masked loads at AVX2).
            let src = if n == CHUNK {
                row
            } else {
                tail.fill(0.0);
                tail[..n].copy_from_slice(row);
                &tail[..]
            };
            // SAFETY: `src` holds 64 values (8 loads of 8); the 32 pairs written are this
            // chunk's, inside `pairs` by the assertion above.
            unsafe {
                let v: [__m256; 8] =
                    std::array::from_fn(|i| _mm256_loadu_ps(src.as_ptr().add(i * 8)));
                let sign = _mm256_set1_ps(-0.0);
                let mut max = _mm256_andnot_ps(sign, v[0]);
                for v in &v[1..] {
                    max = _mm256_max_ps(max, _mm256_andnot_ps(sign, *v));
                }
                let m4 = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps(max, 1));
                let m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                let m1 = _mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1));
                let (scale, inv) = chunk_scale(_mm_cvtss_f32(m1));
                scales[t * chunks + c] = scale;
                let inv = _mm256_set1_ps(inv);
                let dst = pairs.as_mut_ptr().add((t * chunks + c) * 32) as *mut __m256i;
                for i in 0..4 {
                    // Rounded to nearest even (the default MXCSR mode), as the reference.
                    let a = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * i], inv));
                    let b = _mm256_cvtps_epi32(_mm256_mul_ps(v[2 * i + 1], inv));
                    // `packs` interleaves 128-bit halves (a0 b0 a1 b1); restore a, b order.
                    let q = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0b11_01_10_00);
                    _mm256_storeu_si256(dst.add(i), q);
                }
            }
        }
    }
}

/// `out[t][off + r] = init[r] + Σ_chunks (Σ qx·qw) · (sx · sw)` for the block's tokens (up
/// to [`I16_TOKENS`]) and the panel's `valid` rows, as `encoder_vnni::panel_matmul`.
///
/// # Safety
/// AVX2.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn panel_matmul(a: &I16Args, out: &mut [f32]) {
    let tokens = a.scales.len() / a.chunks.max(1);
    assert!((1..=I16_TOKENS).contains(&tokens) && a.chunks > 0);
    assert!(a.pairs.len() == tokens * a.chunks * 32 && a.scales.len() == tokens * a.chunks);
    assert!(a.panel.len() == a.chunks * 64 && a.panel_scales.len() == a.chunks * 2);
    assert!(a.init.len() == 32 && (1..=32).contains(&a.valid));
    assert!(a.out_offset + a.valid <= a.out_stride && out.len() >= tokens * a.out_stride);
    for half in 0..a.valid.div_ceil(16) {
        // SAFETY: the slices' lengths were checked above; `half` < 2.
        unsafe {
            match tokens {
                6 => block::<6>(a, half, out),
                5 => block::<5>(a, half, out),
                4 => block::<4>(a, half, out),
                3 => block::<3>(a, half, out),
                2 => block::<2>(a, half, out),
                _ => block::<1>(a, half, out),
            }
        }
    }
}

/// `T` tokens × rows `16 · half ..` of the panel (16, or fewer where `valid` ends).
///
/// # Safety
/// AVX2; the lengths [`panel_matmul`] checks, with `T` its token count, `half` 0 or 1.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn block<const T: usize>(a: &I16Args, half: usize, out: &mut [f32]) {
    let chunks = a.chunks;
    // SAFETY: the panel has `chunks · 64` pair lines of 16 lanes (this half's is line
    // `2 · (32c + j) + half`) and `chunks · 2` scale lines, token `t` has `chunks · 32`
    // pairs and `chunks` scales, `init` 32 values; `out` has `T` rows of `out_stride`
    // values, written only up to `valid` rows.
    unsafe {
        let w = a.panel.as_ptr() as *const i32;
        let sw = a.panel_scales.as_ptr() as *const f32;
        let init = a.init.as_ptr().add(16 * half);
        let mut acc = [[_mm256_loadu_ps(init), _mm256_loadu_ps(init.add(8))]; T];
        for c in 0..chunks {
            let mut sums = [[_mm256_setzero_si256(); 2]; T];
            let x = a.pairs.as_ptr().add(c * 32);
            for j in 0..CHUNK / 2 {
                let line = w.add(((c * 32 + j) * 2 + half) * 16) as *const __m256i;
                let w0 = _mm256_load_si256(line);
                let w1 = _mm256_load_si256(line.add(1));
                for (t, sum) in sums.iter_mut().enumerate() {
                    let xb = _mm256_set1_epi32(*x.add(t * chunks * 32 + j));
                    sum[0] = _mm256_add_epi32(sum[0], _mm256_madd_epi16(xb, w0));
                    sum[1] = _mm256_add_epi32(sum[1], _mm256_madd_epi16(xb, w1));
                }
            }
            let s = sw.add((c * 2 + half) * 16);
            let (s0, s1) = (_mm256_load_ps(s), _mm256_load_ps(s.add(8)));
            for (t, (acc, sum)) in acc.iter_mut().zip(&sums).enumerate() {
                let sx = _mm256_set1_ps(*a.scales.get_unchecked(t * chunks + c));
                acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[0]), _mm256_mul_ps(s0, sx), acc[0]);
                acc[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[1]), _mm256_mul_ps(s1, sx), acc[1]);
            }
        }
        let n = (a.valid - 16 * half).min(16);
        for (t, acc) in acc.iter().enumerate() {
            let o = t * a.out_stride + a.out_offset + 16 * half;
            if n == 16 {
                // Straight stores: a `memcpy` call per token cost ~5% of an encoder run.
                let dst = out[o..o + 16].as_mut_ptr();
                _mm256_storeu_ps(dst, acc[0]);
                _mm256_storeu_ps(dst.add(8), acc[1]);
            } else {
                let mut row = [0f32; 16];
                _mm256_storeu_ps(row.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(row.as_mut_ptr().add(8), acc[1]);
                out[o..o + n].copy_from_slice(&row[..n]);
            }
        }
    }
}
