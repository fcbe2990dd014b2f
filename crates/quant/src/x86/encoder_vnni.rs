//! AVX-512 VNNI kernels of the 16-bit encoder products ([`crate::i16mat`]): activations
//! quantized per 64-value chunk, and 6 tokens × 32 rows of results per block with
//! `vpdpwssd` (12 integer and 12 float accumulators of the 32 registers).

use std::arch::x86_64::*;

use crate::i16mat::{chunk_scale, I16Args, CHUNK};

/// Tokens per block of [`panel_matmul`].
pub const I16_TOKENS: usize = 6;

/// Quantizes the rows of `x` (`cols` values each) per chunk as
/// [`crate::i16mat::quantize_chunk`] does, bit for bit: token `t`, chunk `c` to 32 pairs
/// from `pairs[(t · chunks + c) · 32]` (zero past `cols`) and its scale to
/// `scales[t · chunks + c]`.
///
/// # Safety
/// AVX-512 F/BW.
#[target_feature(enable = "avx512f,avx512bw")]
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
    for t in 0..tokens {
        for c in 0..chunks {
            let start = c * CHUNK;
            let n = (cols - start).min(CHUNK);
            let masks: [__mmask16; 4] = std::array::from_fn(|i| {
                let left = n.saturating_sub(i * 16).min(16);
                ((1u32 << left) - 1) as u16
            });
            // SAFETY: lane `l` of load `i` reads value `start + 16i + l` of row `t`, masked
            // off past `n` (the row's end); the pairs written are the chunk's 32 of
            // `pairs`, inside it by the assertion above.
            unsafe {
                let src = x.as_ptr().add(t * cols + start);
                let v: [__m512; 4] =
                    std::array::from_fn(|i| _mm512_maskz_loadu_ps(masks[i], src.add(i * 16)));
                let abs = v.map(|v| _mm512_abs_ps(v));
                let max =
                    _mm512_max_ps(_mm512_max_ps(abs[0], abs[1]), _mm512_max_ps(abs[2], abs[3]));
                let (scale, inv) = chunk_scale(_mm512_reduce_max_ps(max));
                scales[t * chunks + c] = scale;
                let inv = _mm512_set1_ps(inv);
                let dst = pairs.as_mut_ptr().add((t * chunks + c) * 32) as *mut __m256i;
                for (i, v) in v.iter().enumerate() {
                    let q = _mm512_cvtps_epi32(_mm512_mul_ps(*v, inv));
                    _mm256_storeu_si256(dst.add(i), _mm512_cvtsepi32_epi16(q));
                }
            }
        }
    }
}

/// `out[t][off + r] = init[r] + Σ_chunks (Σ qx·qw) · (sx · sw)` for the block's tokens (up
/// to [`I16_TOKENS`]) and the panel's `valid` rows (`out`: the tokens' rows of
/// `out_stride` values).
///
/// # Safety
/// AVX-512 F/BW/VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
pub(crate) unsafe fn panel_matmul(a: &I16Args, out: &mut [f32]) {
    let tokens = a.scales.len() / a.chunks.max(1);
    assert!((1..=I16_TOKENS).contains(&tokens) && a.chunks > 0);
    assert!(a.pairs.len() == tokens * a.chunks * 32 && a.scales.len() == tokens * a.chunks);
    assert!(a.panel.len() == a.chunks * 64 && a.panel_scales.len() == a.chunks * 2);
    assert!(a.init.len() == 32 && (1..=32).contains(&a.valid));
    assert!(a.out_offset + a.valid <= a.out_stride && out.len() >= tokens * a.out_stride);
    // SAFETY: the slices' lengths were checked above.
    unsafe {
        match tokens {
            6 => block::<6>(a, out),
            5 => block::<5>(a, out),
            4 => block::<4>(a, out),
            3 => block::<3>(a, out),
            2 => block::<2>(a, out),
            _ => block::<1>(a, out),
        }
    }
}

/// `acc + Σ` of the pairwise products of `a` and `b`'s 16-bit halves, per 32-bit lane.
///
/// In `asm!` because LLVM rewrites `_mm512_dpwssd_epi32` into `vpmaddwd` + `vpaddd` for
/// generic x86-64 tuning (measured: 1.2× the f32 panels instead of ~2×).
///
/// # Safety
/// AVX512-VNNI.
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
pub(super) unsafe fn dpwssd(acc: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut acc = acc;
    // SAFETY: registers only; the caller has AVX512-VNNI.
    unsafe {
        std::arch::asm!(
            "vpdpwssd {acc}, {a}, {b}",
            acc = inout(zmm_reg) acc,
            a = in(zmm_reg) a,
            b = in(zmm_reg) b,
            options(pure, nomem, nostack, preserves_flags),
        );
    }
    acc
}

/// `T` tokens × the panel's 32 rows.
///
/// # Safety
/// AVX-512 F/BW/VNNI; the lengths [`panel_matmul`] checks, with `T` its token count.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn block<const T: usize>(a: &I16Args, out: &mut [f32]) {
    let chunks = a.chunks;
    let mask = |lo: usize| {
        let n = a.valid.saturating_sub(lo).min(16);
        ((1u32 << n) - 1) as __mmask16
    };
    let (m0, m1) = (mask(0), mask(16));
    // SAFETY: the panel has `chunks · 64` pair lines and `chunks · 2` scale lines, token
    // `t` has `chunks · 32` pairs and `chunks` scales, and `out` has `T` rows of
    // `out_stride` values, of which lanes past `valid` are masked off.
    unsafe {
        let w = a.panel.as_ptr() as *const __m512i;
        let sw = a.panel_scales.as_ptr() as *const f32;
        let init = [
            _mm512_loadu_ps(a.init.as_ptr()),
            _mm512_loadu_ps(a.init.as_ptr().add(16)),
        ];
        let mut acc = [init; T];
        for c in 0..chunks {
            let mut sums = [[_mm512_setzero_si512(); 2]; T];
            let x = a.pairs.as_ptr().add(c * 32);
            for j in 0..CHUNK / 2 {
                let w0 = _mm512_load_si512(w.add((c * 32 + j) * 2));
                let w1 = _mm512_load_si512(w.add((c * 32 + j) * 2 + 1));
                for (t, sum) in sums.iter_mut().enumerate() {
                    let xb = _mm512_set1_epi32(*x.add(t * chunks * 32 + j));
                    sum[0] = dpwssd(sum[0], xb, w0);
                    sum[1] = dpwssd(sum[1], xb, w1);
                }
            }
            let s0 = _mm512_load_ps(sw.add(c * 32));
            let s1 = _mm512_load_ps(sw.add(c * 32 + 16));
            for (t, (acc, sum)) in acc.iter_mut().zip(&sums).enumerate() {
                let sx = _mm512_set1_ps(*a.scales.get_unchecked(t * chunks + c));
                acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[0]), _mm512_mul_ps(s0, sx), acc[0]);
                acc[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[1]), _mm512_mul_ps(s1, sx), acc[1]);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            let o = out.as_mut_ptr().add(t * a.out_stride + a.out_offset);
            _mm512_mask_storeu_ps(o, m0, acc[0]);
            _mm512_mask_storeu_ps(o.wrapping_add(16), m1, acc[1]);
        }
    }
}
