//! AVX2 + FMA + F16C kernels. Integer dot products use `maddubs` (u8 × i8 pairs into i16)
//! and `madd` (i16 pairs into i32), exactly the integer sums of the scalar reference; only
//! the float accumulation order differs.
//!
//! Every function here is `unsafe` with `#[target_feature]`: callers must have checked that
//! the CPU has AVX2, FMA and F16C (the dispatcher does, once).
#![allow(clippy::missing_safety_doc)] // the module doc above states the one safety condition

use crate::blocks::*;
use half::f16;
use std::arch::x86_64::*;

/// f16 → f32 with the F16C instruction, inlined (`half`'s conversion is a call that checks
/// the CPU each time: four of them per block cost more than the block's arithmetic).
#[inline]
#[target_feature(enable = "f16c")]
pub(crate) fn h2f(h: f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum_ps(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Stores the first `valid` (≤ 16) of the 16 values `lo`, `hi` at `o`.
///
/// # Safety
/// AVX2; `o` is valid for `valid` writes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn store_16(o: *mut f32, lo: __m256, hi: __m256, valid: usize) {
    // SAFETY: the caller's; the partial case writes through a 16-value buffer.
    unsafe {
        if valid == 16 {
            _mm256_storeu_ps(o, lo);
            _mm256_storeu_ps(o.add(8), hi);
        } else {
            let mut tmp = [0f32; 16];
            _mm256_storeu_ps(tmp.as_mut_ptr(), lo);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), hi);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), o, valid.min(16));
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum_epi32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// How far ahead of the block it reads a decoding dot product prefetches its weights (see
/// `vnni::PREFETCH_BYTES`): one row streamed alone leaves the loads waiting on memory
/// (measured on Ice Lake: ~90% of the Q4_K dot product's samples on the instruction after
/// each weight load).
const PREFETCH_BYTES: usize = 4096;

/// Prefetches every cache line of the `size` bytes at `p` (hints only; any address).
#[inline(always)]
pub(crate) fn prefetch(p: *const u8, size: usize) {
    let mut off = 0;
    while off < size {
        // SAFETY: a prefetch only hints; it never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8) };
        off += 64;
    }
    // SAFETY: as above.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(size - 1) as *const i8) };
}

/// Prefetches the block `PREFETCH_BYTES` past `b` (the rest of the row, or the next rows,
/// which follow it in memory).
#[inline(always)]
fn prefetch_ahead<B>(b: &B) {
    prefetch(
        (b as *const B as *const u8).wrapping_add(PREFETCH_BYTES),
        size_of::<B>(),
    );
}

/// 16 bytes of packed nibbles → 32 bytes: low nibbles first, then high nibbles.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn nibbles_32(qs: &[u8; 16]) -> __m256i {
    // SAFETY: reads exactly the 16 bytes of `qs`.
    let tmp = unsafe { _mm_loadu_si128(qs.as_ptr() as *const __m128i) };
    let both = _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// 32 bits → 32 bytes, 0xFF where the bit is set.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn bits_to_bytes_32(bits: u32) -> __m256i {
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// Σ x·y of 32 signed bytes each, as 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn dot_i8_pairs(x: __m256i, y: __m256i) -> __m256i {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    _mm256_madd_epi16(_mm256_maddubs_epi16(ax, sy), _mm256_set1_epi16(1))
}

/// Σ x·y of 32 unsigned (x) and signed (y) bytes, as 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn dot_u8_i8(x: __m256i, y: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), _mm256_set1_epi16(1))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn load32(p: &[i8; 32]) -> __m256i {
    // SAFETY: reads exactly the 32 bytes of `p`.
    unsafe { _mm256_loadu_si256(p.as_ptr() as *const __m256i) }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let mut pairs_x = x.chunks_exact(2);
    let mut pairs_y = y.chunks_exact(2);
    for (a, b) in (&mut pairs_x).zip(&mut pairs_y) {
        let d0 = _mm256_set1_ps(h2f(a[0].d) * h2f(b[0].d));
        let d1 = _mm256_set1_ps(h2f(a[1].d) * h2f(b[1].d));
        // SAFETY: whole blocks.
        let (qx0, qy0, qx1, qy1) = unsafe {
            (
                load32(&a[0].qs),
                load32(&b[0].qs),
                load32(&a[1].qs),
                load32(&b[1].qs),
            )
        };
        acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(dot_i8_pairs(qx0, qy0)), acc0);
        acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(dot_i8_pairs(qx1, qy1)), acc1);
    }
    for (a, b) in pairs_x.remainder().iter().zip(pairs_y.remainder()) {
        let d = _mm256_set1_ps(h2f(a.d) * h2f(b.d));
        // SAFETY: whole blocks.
        let (qx, qy) = unsafe { (load32(&a.qs), load32(&b.qs)) };
        acc0 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_i8_pairs(qx, qy)), acc0);
    }
    hsum_ps(_mm256_add_ps(acc0, acc1))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (a, b) in x.iter().zip(y) {
        let d = _mm256_set1_ps(h2f(a.d) * h2f(b.d));
        // SAFETY: whole blocks.
        let (qx, qy) = unsafe { (nibbles_32(&a.qs), load32(&b.qs)) };
        let qx = _mm256_sub_epi8(qx, _mm256_set1_epi8(8));
        let q = _mm256_cvtepi32_ps(dot_i8_pairs(qx, qy));
        acc = _mm256_fmadd_ps(d, q, acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    // Two blocks per iteration into independent accumulators: the loop is bound by the
    // latency of the accumulation chains, not by arithmetic.
    let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    let (mut summs0, mut summs1) = (0.0f32, 0.0f32);
    let mut pairs_x = x.chunks_exact(2);
    let mut pairs_y = y.chunks_exact(2);
    for (a, b) in (&mut pairs_x).zip(&mut pairs_y) {
        summs0 += h2f(a[0].m) * h2f(b[0].s);
        summs1 += h2f(a[1].m) * h2f(b[1].s);
        let d0 = _mm256_set1_ps(h2f(a[0].d) * h2f(b[0].d));
        let d1 = _mm256_set1_ps(h2f(a[1].d) * h2f(b[1].d));
        // SAFETY: whole blocks.
        let (qx0, qy0, qx1, qy1) = unsafe {
            (
                nibbles_32(&a[0].qs),
                load32(&b[0].qs),
                nibbles_32(&a[1].qs),
                load32(&b[1].qs),
            )
        };
        acc0 = _mm256_fmadd_ps(d0, _mm256_cvtepi32_ps(dot_u8_i8(qx0, qy0)), acc0);
        acc1 = _mm256_fmadd_ps(d1, _mm256_cvtepi32_ps(dot_u8_i8(qx1, qy1)), acc1);
    }
    for (a, b) in pairs_x.remainder().iter().zip(pairs_y.remainder()) {
        summs0 += h2f(a.m) * h2f(b.s);
        let d = _mm256_set1_ps(h2f(a.d) * h2f(b.d));
        // SAFETY: whole blocks.
        let (qx, qy) = unsafe { (nibbles_32(&a.qs), load32(&b.qs)) };
        acc0 = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_u8_i8(qx, qy)), acc0);
    }
    hsum_ps(_mm256_add_ps(acc0, acc1)) + (summs0 + summs1)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q5_0(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (a, b) in x.iter().zip(y) {
        let d = _mm256_set1_ps(h2f(a.d) * h2f(b.d));
        // SAFETY: whole blocks.
        let (lo, qy) = unsafe { (nibbles_32(&a.qs), load32(&b.qs)) };
        // Where the fifth bit is clear, q - 16 is the nibble with 0xF0 set (negative).
        let hi = _mm256_andnot_si256(
            bits_to_bytes_32(u32::from_le_bytes(a.qh)),
            _mm256_set1_epi8(0xF0u8 as i8),
        );
        let qx = _mm256_or_si256(lo, hi);
        let q = _mm256_cvtepi32_ps(dot_i8_pairs(qx, qy));
        acc = _mm256_fmadd_ps(d, q, acc);
    }
    hsum_ps(acc)
}

/// Q4_K and Q5_K: the same scales, mins and order of values. `values(block, chunk)` gives
/// the unsigned values 64·chunk.. of a block as two runs of 32; `fields` its d, dmin and
/// packed scales. The 8 scales and 8 mins are unpacked at once (`q4k_scales_mins`); each
/// run's scale is picked for `vpmaddwd` by one shuffle, and the mins meet the activations'
/// 32-value sums in one `vpmaddwd`.
#[inline(always)]
unsafe fn dot_k4<B>(
    x: &[B],
    y: &[BlockQ8K],
    fields: impl Fn(&B) -> (f16, f16, &[u8; K_SCALE_SIZE]),
    values: impl Fn(&B, usize) -> (__m256i, __m256i),
) -> f32 {
    // SAFETY (whole body): AVX2, FMA and F16C are enabled by every caller; the loads are
    // 32 bytes at 64·chunk and 64·chunk + 32 inside the activations' 256-byte qs, and the
    // 32 bytes of bsums.
    unsafe {
        let mut acc = _mm256_setzero_ps();
        let mut acc_m = _mm256_setzero_ps();
        for (a, b) in x.iter().zip(y) {
            prefetch_ahead(a);
            let (d, dmin, packed) = fields(a);
            let (sc, m) = super::kquant::q4k_scales_mins(packed);
            // The 8 scales as i16 in both 128-bit lanes; run k's picked by bytes 2k, 2k + 1.
            let sc16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64));
            let scales = _mm256_set_m128i(sc16, sc16);
            let mut sumi = _mm256_setzero_si256();
            for chunk in 0..4 {
                let (w1, w2) = values(a, chunk);
                let y1 = _mm256_loadu_si256(b.qs.as_ptr().add(64 * chunk) as *const __m256i);
                let y2 = _mm256_loadu_si256(b.qs.as_ptr().add(64 * chunk + 32) as *const __m256i);
                let k1 = (4 * chunk) as i8;
                let pick1 = _mm256_set1_epi16(i16::from_le_bytes([k1 as u8, k1 as u8 + 1]));
                let pick2 = _mm256_set1_epi16(i16::from_le_bytes([k1 as u8 + 2, k1 as u8 + 3]));
                let s1 = _mm256_shuffle_epi8(scales, pick1);
                let s2 = _mm256_shuffle_epi8(scales, pick2);
                let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(w1, y1), s1);
                let p2 = _mm256_madd_epi16(_mm256_maddubs_epi16(w2, y2), s2);
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p1, p2));
            }
            // Σ_j m_j · (bsum 2j + bsum 2j+1): the 16 sums in pairs against the mins, each
            // min twice.
            let bsums = _mm256_loadu_si256(b.bsums.as_ptr() as *const __m256i);
            let m16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(
                _mm_cvtsi64_si128(m as i64),
                _mm_cvtsi64_si128(m as i64),
            ));
            let mins = _mm256_madd_epi16(bsums, m16);
            let dv = _mm256_set1_ps(h2f(d) * b.d);
            acc = _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(sumi), acc);
            let mv = _mm256_set1_ps(h2f(dmin) * b.d);
            acc_m = _mm256_fmadd_ps(mv, _mm256_cvtepi32_ps(mins), acc_m);
        }
        hsum_ps(acc) - hsum_ps(acc_m)
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q4_k(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    let low = _mm256_set1_epi8(0x0F);
    let values = |a: &BlockQ4K, chunk: usize| {
        // SAFETY: 32 bytes inside the 128-byte qs (chunk < 4); AVX2 enabled here.
        let q = unsafe { _mm256_loadu_si256(a.qs.as_ptr().add(32 * chunk) as *const __m256i) };
        (
            _mm256_and_si256(q, low),
            _mm256_and_si256(_mm256_srli_epi16(q, 4), low),
        )
    };
    // SAFETY: the features `dot_k4` needs are enabled here.
    unsafe { dot_k4(x, y, |a| (a.d, a.dmin, &a.scales), values) }
}

/// The stored values (q + 32, 0..=63) of half `half` of a Q6_K block, 4 × 32 in element
/// order (as `reference::q6k_values`).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn q6k_half(a: &BlockQ6K, half: usize) -> [__m256i; 4] {
    assert!(half < 2);
    let m4 = _mm256_set1_epi8(0x0F);
    // SAFETY: 32-byte loads inside ql (128) and qh (64), `half` < 2.
    let (ql0, ql1, qh) = unsafe {
        (
            _mm256_loadu_si256(a.ql.as_ptr().add(64 * half) as *const __m256i),
            _mm256_loadu_si256(a.ql.as_ptr().add(64 * half + 32) as *const __m256i),
            _mm256_loadu_si256(a.qh.as_ptr().add(32 * half) as *const __m256i),
        )
    };
    [
        _mm256_or_si256(
            _mm256_and_si256(ql0, m4),
            _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x03)), 4),
        ),
        _mm256_or_si256(
            _mm256_and_si256(ql1, m4),
            _mm256_slli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0x0C)), 2),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
            _mm256_and_si256(qh, _mm256_set1_epi8(0x30)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
            _mm256_srli_epi16(_mm256_and_si256(qh, _mm256_set1_epi8(0xC0u8 as i8)), 2),
        ),
    ]
}

/// The 5-bit values (0..=31) of values 64·chunk.. of a Q5_K block: the low nibbles of `q`
/// (its 32 bytes of qs) with qh bit 2·chunk, then the high nibbles with bit 2·chunk + 1.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn q5k_chunk(q: __m256i, qh: __m256i, chunk: usize) -> (__m256i, __m256i) {
    let (low, one) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(1));
    let shift = _mm_cvtsi32_si128(2 * chunk as i32);
    let h1 = _mm256_and_si256(_mm256_srl_epi16(qh, shift), one);
    let h2 = _mm256_and_si256(_mm256_srl_epi16(_mm256_srli_epi16(qh, 1), shift), one);
    (
        _mm256_or_si256(_mm256_and_si256(q, low), _mm256_slli_epi16(h1, 4)),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(q, 4), low),
            _mm256_slli_epi16(h2, 4),
        ),
    )
}

/// `PF`: whether the weights are prefetched ahead in software (see `x86::prefetch_weights`).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q6_k<const PF: bool>(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (a, b) in x.iter().zip(y) {
        if PF {
            prefetch_ahead(a);
        }
        // SAFETY: 16-byte loads of the 16 scales and 32-byte loads of the 16 bsums.
        let (scales, bsums) = unsafe {
            (
                _mm_loadu_si128(a.scales.as_ptr() as *const __m128i),
                _mm256_loadu_si256(b.bsums.as_ptr() as *const __m256i),
            )
        };
        // The values are stored as `value + 32`: Σ scale · 32 · Σy comes off once per block,
        // as one i16 product of the bsums with the scales times 32 (|scale · 32| ≤ 4096).
        let offset = _mm256_madd_epi16(bsums, _mm256_slli_epi16(_mm256_cvtepi8_epi16(scales), 5));
        let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), offset);
        let halves = scale_halves(scales);
        for (half, &half_scales) in halves.iter().enumerate() {
            let q = q6k_half(a, half);
            for (k, qk) in q.iter().enumerate() {
                // SAFETY: 32 activations at 128*half + 32*k.
                let yk = unsafe {
                    _mm256_loadu_si256(b.qs.as_ptr().add(128 * half + 32 * k) as *const __m256i)
                };
                let p = _mm256_maddubs_epi16(*qk, yk);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scale_pair(half_scales, k)));
            }
        }
        let d = _mm256_set1_ps(h2f(a.d) * b.d);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

/// How far ahead (in 16-bit values, 4 KiB) the F16/BF16 dot products prefetch their first
/// row, here and in `avx512`.
pub(crate) const PREFETCH_VALUES: usize = 2048;

/// `Σ x·y` of two rows of 16-bit floats, `widen(p)` giving the 8 values at `p` as f32: in
/// ggml's AVX2 order (`ggml_vec_dot_f16`), four 8-lane accumulators over steps of 32
/// columns, added as (0 + 2) + (1 + 3) then across lanes; a leftover of 8..24 columns adds
/// to the first accumulators in turn, the last few in scalar (`scalar(i)`: column `i`'s
/// product). Four accumulators rather than one keep the FMAs from waiting on each other
/// (one chain of 4-cycle FMAs held F16 rows to 7 GB/s on the Xeon family 6 model 207).
#[inline(always)]
unsafe fn dot_widened<T, const PF: bool>(
    x: &[T],
    y: &[T],
    widen: impl Fn(*const T) -> __m256,
    scalar: impl Fn(usize) -> f32,
) -> f32 {
    let n = x.len().min(y.len());
    // SAFETY (whole body): the caller vouches for AVX2 and FMA; every `widen` reads 8 values
    // at `i + 8k`, with `i + 8k + 8 <= n` by the loop bounds.
    unsafe {
        let mut acc = [_mm256_setzero_ps(); 4];
        let (xp, yp) = (x.as_ptr(), y.as_ptr());
        let mut i = 0;
        while i + 32 <= n {
            // `x` 4 KiB ahead where the CPU wants it (`PF`, see `x86::prefetch_weights`).
            if PF {
                prefetch(xp.wrapping_add(i + PREFETCH_VALUES) as *const u8, 64);
            }
            for (k, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(widen(xp.add(i + 8 * k)), widen(yp.add(i + 8 * k)), *acc);
            }
            i += 32;
        }
        let mut k = 0;
        while i + 8 <= n {
            acc[k] = _mm256_fmadd_ps(widen(xp.add(i)), widen(yp.add(i)), acc[k]);
            (i, k) = (i + 8, k + 1);
        }
        let [a0, a1, a2, a3] = acc;
        let mut sum = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3)));
        for j in i..n {
            sum += scalar(j);
        }
        sum
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16<const PF: bool>(x: &[f16], y: &[f16]) -> f32 {
    // SAFETY: `dot_widened` reads 8 halves (16 bytes) at each pointer it passes.
    let widen = |p: *const f16| unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) };
    // SAFETY: the features are enabled here.
    unsafe { dot_widened::<_, PF>(x, y, widen, |j| x[j].to_f32() * y[j].to_f32()) }
}

/// 4 weight rows × 3 activation rows at once: each loaded vector feeds 3 or 4 FMAs instead
/// of one, so the loop is bound by the FMA units rather than by loads.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn tile_f32_4x3(w: &[f32], a: &[f32], cols: usize, out: &mut [f32; 12]) {
    assert!(w.len() >= 4 * cols && a.len() >= 3 * cols);
    let mut acc = [_mm256_setzero_ps(); 12];
    let mut k = 0;
    while k + 8 <= cols {
        // SAFETY: 8 floats at row * cols + k, inside w (4 rows) and a (3 rows) as asserted.
        let (w0, w1, w2, w3, a0, a1, a2) = unsafe {
            let (wp, ap) = (w.as_ptr().add(k), a.as_ptr().add(k));
            (
                _mm256_loadu_ps(wp),
                _mm256_loadu_ps(wp.add(cols)),
                _mm256_loadu_ps(wp.add(2 * cols)),
                _mm256_loadu_ps(wp.add(3 * cols)),
                _mm256_loadu_ps(ap),
                _mm256_loadu_ps(ap.add(cols)),
                _mm256_loadu_ps(ap.add(2 * cols)),
            )
        };
        for (r, wr) in [w0, w1, w2, w3].into_iter().enumerate() {
            acc[r * 3] = _mm256_fmadd_ps(wr, a0, acc[r * 3]);
            acc[r * 3 + 1] = _mm256_fmadd_ps(wr, a1, acc[r * 3 + 1]);
            acc[r * 3 + 2] = _mm256_fmadd_ps(wr, a2, acc[r * 3 + 2]);
        }
        k += 8;
    }
    for r in 0..4 {
        for t in 0..3 {
            let mut sum = hsum_ps(acc[r * 3 + t]);
            for j in k..cols {
                sum += w[r * cols + j] * a[t * cols + j];
            }
            out[r * 3 + t] = sum;
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: 8 floats at i, inside both slices.
        let (a, b) = unsafe {
            (
                _mm256_loadu_ps(x.as_ptr().add(i)),
                _mm256_loadu_ps(y.as_ptr().add(i)),
            )
        };
        acc = _mm256_fmadd_ps(a, b, acc);
        i += 8;
    }
    let mut sum = hsum_ps(acc);
    for j in i..n {
        sum += x[j] * y[j];
    }
    sum
}

/// `out += w · v` with `v` in f16.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
    let n = out.len().min(v.len());
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: 8 values at i, inside both slices.
        unsafe {
            let vv = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(i) as *const __m128i));
            let o = out.as_mut_ptr().add(i);
            _mm256_storeu_ps(o, _mm256_fmadd_ps(wv, vv, _mm256_loadu_ps(o)));
        }
        i += 8;
    }
    for j in i..n {
        out[j] += w * h2f(v[j]);
    }
}

/// `out += w · v`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn axpy_f32(out: &mut [f32], w: f32, v: &[f32]) {
    let n = out.len().min(v.len());
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: 8 values at i, inside both slices.
        unsafe {
            let o = out.as_mut_ptr().add(i);
            let x = _mm256_loadu_ps(v.as_ptr().add(i));
            _mm256_storeu_ps(o, _mm256_fmadd_ps(wv, x, _mm256_loadu_ps(o)));
        }
        i += 8;
    }
    for j in i..n {
        out[j] += w * v[j];
    }
}

/// Q8_0 blocks to f32: `q · d` per value, as the reference computes it.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequantize_q8_0(x: &[BlockQ8_0], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = _mm256_set1_ps(h2f(b.d));
        for (q, o) in b.qs.chunks_exact(8).zip(ys.chunks_exact_mut(8)) {
            // SAFETY: 8 bytes of `q` loaded, 8 floats of `o` stored.
            unsafe {
                let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(q.as_ptr() as *const __m128i));
                _mm256_storeu_ps(o.as_mut_ptr(), _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
            }
        }
    }
}

/// Q4_0 blocks to f32: `(nibble - 8) · d`, low nibbles first, as the reference computes it.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dequantize_q4_0(x: &[BlockQ4_0], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = _mm256_set1_ps(h2f(b.d));
        // SAFETY: the block's 16 bytes loaded, 32 floats of `ys` stored.
        unsafe {
            let bytes = _mm_loadu_si128(b.qs.as_ptr() as *const __m128i);
            let lo = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
            let hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), _mm_set1_epi8(0x0F));
            let eight = _mm_set1_epi8(8);
            let (lo, hi) = (_mm_sub_epi8(lo, eight), _mm_sub_epi8(hi, eight));
            for (k, half) in [lo, hi].into_iter().enumerate() {
                let a = _mm256_cvtepi8_epi32(half);
                let b8 = _mm256_cvtepi8_epi32(_mm_srli_si128(half, 8));
                let o = ys.as_mut_ptr().add(k * 16);
                _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_cvtepi32_ps(a), d));
                _mm256_storeu_ps(o.add(8), _mm256_mul_ps(_mm256_cvtepi32_ps(b8), d));
            }
        }
    }
}

/// One block of 32 floats → (d, 32 rounded int8, Σq), exactly as the reference: the same
/// f32 multiply and round-half-to-even, only vectorised.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn quantize_block(xs: &[f32; 32], qs: &mut [i8; 32]) -> (f32, i32) {
    // SAFETY (loads/store): exactly the 32 floats of `xs` and the 32 bytes of `qs`.
    let v = unsafe {
        [
            _mm256_loadu_ps(xs.as_ptr()),
            _mm256_loadu_ps(xs.as_ptr().add(8)),
            _mm256_loadu_ps(xs.as_ptr().add(16)),
            _mm256_loadu_ps(xs.as_ptr().add(24)),
        ]
    };
    // NaN counts as 0, as in the reference (`f32::max` skips it, `NaN as i8` is 0).
    let no_nan = |x| _mm256_and_ps(x, _mm256_cmp_ps(x, x, _CMP_ORD_Q));
    let v = v.map(no_nan);
    let sign = _mm256_set1_ps(-0.0);
    let abs = |x| _mm256_andnot_ps(sign, x);
    let m = _mm256_max_ps(
        _mm256_max_ps(abs(v[0]), abs(v[1])),
        _mm256_max_ps(abs(v[2]), abs(v[3])),
    );
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    let d = amax / 127.0;
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let q: [__m256i; 4] = std::array::from_fn(|i| {
        // An infinite value times `id` = 0 is NaN: 0 too.
        _mm256_cvtps_epi32(_mm256_round_ps(
            no_nan(_mm256_mul_ps(v[i], id)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        ))
    });
    let sum = hsum_epi32(_mm256_add_epi32(
        _mm256_add_epi32(q[0], q[1]),
        _mm256_add_epi32(q[2], q[3]),
    ));
    // i32 → i16 → i8 packs interleave 128-bit lanes; the permute puts them back in order.
    let p = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    // SAFETY: see above.
    unsafe { _mm256_storeu_si256(qs.as_mut_ptr() as *mut __m256i, p) };
    (d, sum)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    for (xs, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let (d, _) = quantize_block(xs.try_into().expect("32 floats"), &mut b.qs);
        b.d = f16::from_f32(d);
    }
}

/// Q8_K activation blocks, bit-identical to `reference::quantize_row_q8_k`: the scale comes
/// from the first value of largest magnitude (its sign included), values round half to even.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    for (xs, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        // SAFETY: `xs` holds QK_K floats: every load below reads 8 of them at i < QK_K.
        let load = |i: usize| unsafe { _mm256_loadu_ps(xs.as_ptr().add(i)) };
        let sign = _mm256_set1_ps(-0.0);
        let mut m = _mm256_setzero_ps();
        for i in (0..QK_K).step_by(8) {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, load(i)));
        }
        let m2 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m2 = _mm_max_ps(m2, _mm_movehl_ps(m2, m2));
        let amax = _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
        // The first value whose magnitude is `amax` (NaNs or all zeros: the reference decides).
        let first = (0..QK_K).step_by(8).find_map(|i| {
            let eq = _mm256_cmp_ps(
                _mm256_andnot_ps(sign, load(i)),
                _mm256_set1_ps(amax),
                _CMP_EQ_OQ,
            );
            let mask = _mm256_movemask_ps(eq);
            (mask != 0).then(|| i + mask.trailing_zeros() as usize)
        });
        let (Some(at), true) = (first, amax > 0.0 && amax.is_finite()) else {
            crate::reference::quantize_row_q8_k(xs, std::slice::from_mut(b));
            continue;
        };
        let iscale = -127.0 / xs[at];
        let vscale = _mm256_set1_ps(iscale);
        let top = _mm256_set1_epi32(127);
        for (j, chunk) in (0..QK_K).step_by(32).enumerate() {
            let q: [__m256i; 4] = std::array::from_fn(|k| {
                let r = _mm256_round_ps(
                    _mm256_mul_ps(load(chunk + 8 * k), vscale),
                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
                );
                _mm256_min_epi32(_mm256_cvtps_epi32(r), top)
            });
            let p16a = _mm256_packs_epi32(q[0], q[1]);
            let p16b = _mm256_packs_epi32(q[2], q[3]);
            let p = _mm256_packs_epi16(p16a, p16b);
            let p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            // SAFETY: bytes chunk..chunk+32 of the QK_K-byte `qs`.
            unsafe { _mm256_storeu_si256(b.qs.as_mut_ptr().add(chunk) as *mut __m256i, p) };
            // Sums of 16 in order: q[0..2] hold values 0..16 of this chunk, q[2..4] 16..32.
            b.bsums[2 * j] = hsum_epi32(_mm256_add_epi32(q[0], q[1])) as i16;
            b.bsums[2 * j + 1] = hsum_epi32(_mm256_add_epi32(q[2], q[3])) as i16;
        }
        b.d = 1.0 / iscale;
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    for (xs, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let (d, sum) = quantize_block(xs.try_into().expect("32 floats"), &mut b.qs);
        b.d = f16::from_f32(d);
        b.s = f16::from_f32(d * sum as f32);
    }
}

// ------------------------------------------------ Q5_1, Q5_K, Q2_K, Q3_K, IQ4_NL, IQ4_XS, BF16

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q5_1(x: &[BlockQ5_1], y: &[BlockQ8_1]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let mut summs = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        summs += h2f(a.m) * h2f(b.s);
        let d = _mm256_set1_ps(h2f(a.d) * h2f(b.d));
        // SAFETY: whole blocks.
        let (lo, qy) = unsafe { (nibbles_32(&a.qs), load32(&b.qs)) };
        // The fifth bit adds 16.
        let hi = _mm256_and_si256(
            bits_to_bytes_32(u32::from_le_bytes(a.qh)),
            _mm256_set1_epi8(0x10),
        );
        let qx = _mm256_or_si256(lo, hi);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_u8_i8(qx, qy)), acc);
    }
    hsum_ps(acc) + summs
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q5_k(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
    let values = |a: &BlockQ5K, chunk: usize| {
        // SAFETY: the 32 bytes of qh and 32 inside the 128-byte qs (chunk < 4); AVX2
        // enabled here.
        let (q, qh) = unsafe {
            (
                _mm256_loadu_si256(a.qs.as_ptr().add(32 * chunk) as *const __m256i),
                _mm256_loadu_si256(a.qh.as_ptr() as *const __m256i),
            )
        };
        q5k_chunk(q, qh, chunk)
    };
    // SAFETY: the features `dot_k4` needs are enabled here.
    unsafe { dot_k4(x, y, |a| (a.d, a.dmin, &a.scales), values) }
}

/// `pshufb` masks that pick, from 8 i16 scales repeated in both 128-bit lanes, scale `2j`
/// into every i16 of the lower lane and scale `2j + 1` into every i16 of the upper lane.
static SCALE_PAIR_SHUFFLE: [[u8; 32]; 4] = {
    let mut t = [[0u8; 32]; 4];
    let mut j = 0;
    while j < 4 {
        let mut i = 0;
        while i < 32 {
            let scale = 2 * j + i / 16;
            t[j][i] = (2 * scale + i % 2) as u8;
            i += 1;
        }
        j += 1;
    }
    t
};

/// A super-block's 16 sub-block scales (i8) as i16, for [`scale_pair`]: `[0]` holds scales
/// 0..8 and `[1]` scales 8..16, each repeated in both 128-bit lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn scale_halves(scales: __m128i) -> [__m256i; 2] {
    let s = _mm256_cvtepi8_epi16(scales);
    [
        _mm256_permute2x128_si256::<0x00>(s, s),
        _mm256_permute2x128_si256::<0x11>(s, s),
    ]
}

/// Scales `2j` (lower lane) and `2j + 1` (upper lane) of a half from [`scale_halves`].
#[inline]
#[target_feature(enable = "avx2,fma")]
fn scale_pair(half: __m256i, j: usize) -> __m256i {
    // SAFETY: reads the 32 bytes of one mask.
    let m = unsafe { _mm256_loadu_si256(SCALE_PAIR_SHUFFLE[j].as_ptr() as *const __m256i) };
    _mm256_shuffle_epi8(half, m)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q2_k(x: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
    let m3 = _mm256_set1_epi8(3);
    let m4 = _mm_set1_epi8(0xF);
    let mut acc = _mm256_setzero_ps();
    for (a, b) in x.iter().zip(y) {
        prefetch_ahead(a);
        // SAFETY: the 16 scale bytes and the 16 i16 sums of the activations.
        let (sc, bsums) = unsafe {
            (
                _mm_loadu_si128(a.scales.as_ptr() as *const __m128i),
                _mm256_loadu_si256(b.bsums.as_ptr() as *const __m256i),
            )
        };
        // Σ min · (sum of 16 activations), from the high nibbles.
        let mins = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc, 4), m4));
        let summ = _mm256_madd_epi16(mins, bsums);
        let halves = scale_halves(_mm_and_si128(sc, m4));
        let mut sumi = _mm256_setzero_si256();
        for (half, &scales) in halves.iter().enumerate() {
            // SAFETY: 32 bytes at 32·half inside the 64-byte qs.
            let q = unsafe { _mm256_loadu_si256(a.qs.as_ptr().add(32 * half) as *const __m256i) };
            for j in 0..4 {
                let shift = _mm_cvtsi32_si128(2 * j as i32);
                let w = _mm256_and_si256(_mm256_srl_epi16(q, shift), m3);
                // SAFETY: 32 activations at 128·half + 32·j inside 256.
                let yj = unsafe {
                    _mm256_loadu_si256(b.qs.as_ptr().add(128 * half + 32 * j) as *const __m256i)
                };
                let p = _mm256_maddubs_epi16(w, yj);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scale_pair(scales, j)));
            }
        }
        let dall = _mm256_set1_ps(h2f(a.d) * b.d);
        let dmin = _mm256_set1_ps(h2f(a.dmin) * b.d);
        acc = _mm256_fmadd_ps(dall, _mm256_cvtepi32_ps(sumi), acc);
        acc = _mm256_fnmadd_ps(dmin, _mm256_cvtepi32_ps(summ), acc);
    }
    hsum_ps(acc)
}

/// Q3_K's 16 six-bit scales (12 bytes) as i8 minus 32, as `reference::q3k_scales`: the
/// low 4 bits of scales 0..8 and 8..16 are the low and high nibbles of bytes 0..8, the top
/// 2 bits of scale `i` are bits `2·(i / 4)` of byte `8 + i % 4`. In vector registers from
/// one 16-byte load (the last 2 bytes of `qs`, the scales, `d`), where scalar unpacking
/// needed four inserts to reach a vector.
#[target_feature(enable = "avx2")]
#[inline]
pub(crate) fn q3k_scales(b: &BlockQ3K) -> __m128i {
    const AT: usize = std::mem::offset_of!(BlockQ3K, scales) - 2;
    const _: () = assert!(AT + 16 == size_of::<BlockQ3K>());
    // SAFETY: bytes AT..AT + 16 are the block's last 16 (asserted above), read through a
    // pointer to the whole block.
    let v =
        unsafe { _mm_loadu_si128((b as *const BlockQ3K as *const u8).add(AT) as *const __m128i) };
    // Bytes 0..8 of the scales twice: low nibbles in the first 8 bytes, high in the last 8.
    let twice = _mm_shuffle_epi8(
        v,
        _mm_setr_epi8(2, 3, 4, 5, 6, 7, 8, 9, 2, 3, 4, 5, 6, 7, 8, 9),
    );
    let low4 = _mm_and_si128(
        _mm_srlv_epi64(twice, _mm_set_epi64x(4, 0)),
        _mm_set1_epi8(0x0F),
    );
    // Bytes 8..12 in every dword; dword k (scales 4k..4k + 4) shifted right by 2k.
    let top = _mm_shuffle_epi8(
        v,
        _mm_setr_epi8(
            10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13, 10, 11, 12, 13,
        ),
    );
    let top = _mm_and_si128(
        _mm_srlv_epi32(top, _mm_setr_epi32(0, 2, 4, 6)),
        _mm_set1_epi8(3),
    );
    let six = _mm_or_si128(low4, _mm_slli_epi16::<4>(top));
    _mm_sub_epi8(six, _mm_set1_epi8(32))
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_q3_k(x: &[BlockQ3K], y: &[BlockQ8K]) -> f32 {
    let m3 = _mm256_set1_epi8(3);
    let four = _mm256_set1_epi8(4);
    let mut acc = _mm256_setzero_ps();
    for (a, b) in x.iter().zip(y) {
        prefetch_ahead(a);
        let scales = q3k_scales(a);
        let halves = scale_halves(scales);
        // SAFETY: the 32 bytes of hmask and the 16 i16 sums of the activations.
        let (hm, bsums) = unsafe {
            (
                _mm256_loadu_si256(a.hmask.as_ptr() as *const __m256i),
                _mm256_loadu_si256(b.bsums.as_ptr() as *const __m256i),
            )
        };
        // Values held as `u = w + 4` (0..=7): Σ scale · 4 · Σy comes off once per block
        // (|scale · 4| ≤ 128).
        let offset = _mm256_madd_epi16(bsums, _mm256_slli_epi16(_mm256_cvtepi8_epi16(scales), 2));
        let mut sumi = _mm256_sub_epi32(_mm256_setzero_si256(), offset);
        for (half, &scales) in halves.iter().enumerate() {
            // SAFETY: 32 bytes at 32·half inside the 64-byte qs.
            let q = unsafe { _mm256_loadu_si256(a.qs.as_ptr().add(32 * half) as *const __m256i) };
            for j in 0..4 {
                let low = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * j)), m3);
                // hmask bit n = 4·half + j moved to bit 2 of its own byte (bits shifted in
                // from the neighbouring byte are masked off): 4 where it is set.
                let n = 4 * half as i32 + j;
                let moved = if n >= 2 {
                    _mm256_srl_epi16(hm, _mm_cvtsi32_si128(n - 2))
                } else {
                    _mm256_sll_epi16(hm, _mm_cvtsi32_si128(2 - n))
                };
                let u = _mm256_or_si256(low, _mm256_and_si256(moved, four));
                // SAFETY: 32 activations at 128·half + 32·j inside 256.
                let yj = unsafe {
                    _mm256_loadu_si256(
                        b.qs.as_ptr().add(128 * half + 32 * j as usize) as *const __m256i
                    )
                };
                let p = _mm256_maddubs_epi16(u, yj);
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scale_pair(scales, j as usize)));
            }
        }
        let d = _mm256_set1_ps(h2f(a.d) * b.d);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

/// IQ4_NL's 16 values in both 128-bit lanes, for `pshufb` lookups.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn iq4nl_table() -> __m256i {
    // SAFETY: reads the 16 bytes of the table.
    let t = unsafe { _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i) };
    _mm256_set_m128i(t, t)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_iq4_nl(x: &[BlockIQ4NL], y: &[BlockQ8_0]) -> f32 {
    let table = iq4nl_table();
    let mut acc = _mm256_setzero_ps();
    for (a, b) in x.iter().zip(y) {
        let d = _mm256_set1_ps(h2f(a.d) * h2f(b.d));
        // SAFETY: whole blocks.
        let (idx, qy) = unsafe { (nibbles_32(&a.qs), load32(&b.qs)) };
        let w = _mm256_shuffle_epi8(table, idx);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_i8_pairs(w, qy)), acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_iq4_xs(x: &[BlockIQ4XS], y: &[BlockQ8K]) -> f32 {
    let table = iq4nl_table();
    let mut acc = _mm256_setzero_ps();
    for (a, b) in x.iter().zip(y) {
        prefetch_ahead(a);
        // The 8 scales as i16 in both 128-bit lanes; sub-block ib's picked by bytes 2ib, 2ib + 1.
        let sc16 = _mm_cvtepi8_epi16(_mm_cvtsi64_si128(
            super::kunpack::iq4xs_scale_bytes(a) as i64
        ));
        let scales = _mm256_set_m128i(sc16, sc16);
        let mut sumi = _mm256_setzero_si256();
        for ib in 0..QK_K / 32 {
            // SAFETY: 16 bytes at 16·ib inside the 128-byte qs; 32 activations at 32·ib.
            let (idx, qy) = unsafe {
                (
                    nibbles_32(&*(a.qs.as_ptr().add(16 * ib) as *const [u8; 16])),
                    _mm256_loadu_si256(b.qs.as_ptr().add(32 * ib) as *const __m256i),
                )
            };
            let w = _mm256_shuffle_epi8(table, idx);
            // |w · y| pairs stay below 2·127·127 < 2¹⁵.
            let p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(qy, w));
            let pick = _mm256_set1_epi16(i16::from_le_bytes([2 * ib as u8, 2 * ib as u8 + 1]));
            let sc = _mm256_shuffle_epi8(scales, pick);
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, sc));
        }
        let d = _mm256_set1_ps(h2f(a.d) * b.d);
        acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum_ps(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_bf16<const PF: bool>(x: &[half::bf16], y: &[half::bf16]) -> f32 {
    // bf16 → f32 is the 16 bits moved to the top of the word.
    let widen = |p: *const half::bf16| {
        // SAFETY: `dot_widened` reads 8 values (16 bytes) at each pointer it passes.
        let v = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16))
    };
    // SAFETY: the features are enabled here.
    unsafe { dot_widened::<_, PF>(x, y, widen, |j| x[j].to_f32() * y[j].to_f32()) }
}

/// Scores of rows `r0..r0 + G` (see [`attend_block`]) over keys `lo..lo + n`: four 8-lane
/// accumulators over steps of 32 columns (ggml's AVX2 order), added as (0 + 2) + (1 + 3),
/// then across lanes; a leftover of 8..24 columns adds to the first accumulators in turn.
///
/// # Safety
/// As [`attend_block`]; `r0 + G <= a.rows`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_scores<const G: usize>(
    a: &crate::AttendF16,
    lo: usize,
    n: usize,
    qs: &[f32],
    ps: &mut [f32],
    r0: usize,
) {
    let hd = a.head_dim;
    /// Columns `c..c + 8` of key `kp` into accumulator `i` of every row of the group.
    #[inline(always)]
    unsafe fn chunk<const G: usize>(
        acc: &mut [[__m256; 4]; G],
        i: usize,
        kp: *const f16,
        q: *const f32,
        hd: usize,
        c: usize,
    ) {
        // SAFETY: the caller's bounds: column `c + 8 <= hd` of the key and of each row.
        unsafe {
            let kv = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(c) as *const __m128i));
            for (r, acc) in acc.iter_mut().enumerate() {
                acc[i] = _mm256_fmadd_ps(kv, _mm256_loadu_ps(q.add(r * hd + c)), acc[i]);
            }
        }
    }
    // SAFETY (whole body): as in `attend_block`: keys `lo..lo + n` hold `hd` values at
    // `j * kv_stride`, `qs` rows `r0..r0 + G` of `hd`, `ps` those rows' `n` scores.
    unsafe {
        let q = qs.as_ptr().add(r0 * hd);
        for j in 0..n {
            let kp = a.k.as_ptr().add((lo + j) * a.kv_stride);
            let ahead = super::ATTEND_PREFETCH_KEYS * a.kv_stride;
            super::prefetch_bytes(kp.wrapping_add(ahead), 2 * hd);
            let mut acc = [[_mm256_setzero_ps(); 4]; G];
            let mut c = 0;
            while c + 32 <= hd {
                chunk(&mut acc, 0, kp, q, hd, c);
                chunk(&mut acc, 1, kp, q, hd, c + 8);
                chunk(&mut acc, 2, kp, q, hd, c + 16);
                chunk(&mut acc, 3, kp, q, hd, c + 24);
                c += 32;
            }
            if c + 8 <= hd {
                chunk(&mut acc, 0, kp, q, hd, c);
            }
            if c + 16 <= hd {
                chunk(&mut acc, 1, kp, q, hd, c + 8);
            }
            if c + 24 <= hd {
                chunk(&mut acc, 2, kp, q, hd, c + 16);
            }
            for (r, acc) in acc.iter().enumerate() {
                let (first, end) = a.keys[r0 + r];
                let key = lo + j;
                ps[(r0 + r) * n + j] = if key >= first && key < end {
                    let sum =
                        _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
                    crate::scaled_score(hsum_ps(sum), a.scale, a.softcap)
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
    }
}

/// Decoder attention (see [`crate::AttendF16`]) for all the block's rows at once, as
/// `avx512::attend_f16` does with 8-lane vectors: each key and value is converted from f16
/// once for every row. `head_dim` must be a multiple of 8.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attend_f16(a: &crate::AttendF16, out: &mut [f32], scratch: &mut Vec<f32>) {
    let (lo, n, qs, ps) = super::attend_setup(a, 8, out.len(), scratch);
    // SAFETY: the features `attend_block` needs are enabled here; `attend_setup`'s checks keep
    // every access of `attend_block` inside `a.k`, `a.v`, `qs`, `ps` and `out`.
    unsafe { super::by_rows!(a.rows, attend_block(a, lo, n, qs, ps, out)) }
}

/// The scores step of [`attend_f16`] (see [`crate::AttendF16Steps::scores`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attend_f16_scores(a: &crate::AttendF16, ps: &mut [f32], qs: &mut [f32]) {
    let (lo, n) = super::attend_scores_check(a, 8, ps);
    super::round_queries(a, qs);
    // SAFETY: as in `attend_f16`, with `ps` checked to hold the rows' scores and `qs` their
    // queries.
    unsafe { super::by_rows!(a.rows, attend_scores_rows(a, lo, n, qs, ps)) }
}

/// The values step of [`attend_f16`] (see [`crate::AttendF16Steps::values`]).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn attend_f16_values(a: &crate::AttendF16, ps: &[f32], c0: usize, out: &mut [f32]) {
    let (lo, n, w) = super::attend_values_check(a, 8, ps, c0, out);
    let at = std::array::from_fn(|r| r * w);
    let (keys, cols) = ((lo, n), (c0, c0 + w));
    // SAFETY: the checks keep keys and values `lo..lo + n`, columns `c0..c0 + w` (multiples
    // of 8 within `head_dim`), the weights and the output rows `r * w` inside their slices.
    unsafe { super::by_rows!(a.rows, attend_values(a, keys, ps, cols, out, &at)) }
}

/// `R` rows over keys `lo..lo + n`: `qs` holds the rows' f16-rounded queries (`R × hd`),
/// `ps` room for their scores (`R × n`).
///
/// # Safety
/// As `attend_setup` checks: keys and values `lo..lo + n` exist; `R == a.rows`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_block<const R: usize>(
    a: &crate::AttendF16,
    lo: usize,
    n: usize,
    qs: &[f32],
    ps: &mut [f32],
    out: &mut [f32],
) {
    // SAFETY (whole block): `attend_setup`'s checks bound every pointer: key/value rows
    // `lo..lo + n` hold `hd` values at `j * kv_stride`, `qs` R rows of `hd`, `ps` R rows of
    // `n`, output rows `hd` values at `at[r]`.
    unsafe {
        attend_scores_rows::<R>(a, lo, n, qs, ps);
        for r in 0..R {
            let p = &mut ps[r * n..][..n];
            super::encoder_avx2::softmax(p);
            super::round_through_f16(p);
        }
        attend_values::<R>(a, (lo, n), ps, (0, a.head_dim), out, &a.at);
    }
}

/// scores[r][j] = scale · q_r · k_j, or -inf where row r does not see key j; rows in
/// groups of 3, so that each row's 4 accumulators stay in the 16 registers.
///
/// # Safety
/// As [`attend_block`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_scores_rows<const R: usize>(
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
                1 => attend_scores::<1>(a, lo, n, qs, ps, r0),
                2 => attend_scores::<2>(a, lo, n, qs, ps, r0),
                _ => attend_scores::<3>(a, lo, n, qs, ps, r0),
            }
            r0 += 3;
        }
    }
}

/// out[at[r] + c - c0] = Σ_j w[r][j] · v_j[c] for columns `c0..c1`, 8 at a time, over keys
/// `lo..lo + n`.
///
/// # Safety
/// As [`attend_block`]; `c0..c1` multiples of 8 within `head_dim`, `out` holds `c1 - c0`
/// values at each `at[r]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_values<const R: usize>(
    a: &crate::AttendF16,
    (lo, n): (usize, usize),
    ps: &[f32],
    (c0, c1): (usize, usize),
    out: &mut [f32],
    at: &[usize; 8],
) {
    // SAFETY: as the caller's.
    unsafe {
        for c in (c0..c1).step_by(8) {
            let mut acc = [_mm256_setzero_ps(); R];
            let vp = a.v.as_ptr().add(lo * a.kv_stride + c);
            for j in 0..n {
                let ahead = (j + super::ATTEND_PREFETCH_KEYS) * a.kv_stride;
                super::prefetch_bytes(vp.wrapping_add(ahead), 16);
                let v = _mm256_cvtph_ps(_mm_loadu_si128(vp.add(j * a.kv_stride) as *const __m128i));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let w = *ps.get_unchecked(r * n + j);
                    *acc = _mm256_fmadd_ps(_mm256_set1_ps(w), v, *acc);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add(at[r] + c - c0), *acc);
            }
        }
    }
}
