//! Decoder attention over a Q8_0/Q4_0 KV cache ([`crate::kvquant`]) for all of a block's
//! query rows at once, as `avx2::attend_f16` does over f16: each key block is loaded once
//! for every row's score, and each chunk of 8 value columns is converted once for every
//! row's weighted sum. The AVX-512 level runs these too.

use std::arch::x86_64::*;

use super::avx2::{dot_i8_pairs, h2f, hsum_ps, load32, nibbles_32, quantize_q8_0};
use crate::blocks::{BlockQ4_0, BlockQ8_0, QK};
use crate::kvquant::{AttendQuant, KvBlock, MAX_HEAD_DIM};

/// A cache block type as the kernel reads it.
pub(crate) trait KvLoad: KvBlock {
    fn scale(&self) -> f32;
    /// The block's 32 values as signed bytes.
    ///
    /// # Safety
    /// AVX2.
    unsafe fn values_i8(&self) -> __m256i;
    /// Values `c..c + 8` (`c` a multiple of 8 below 32) as f32, unscaled.
    ///
    /// # Safety
    /// AVX2.
    unsafe fn values_f32(&self, c: usize) -> __m256;
}

impl KvLoad for BlockQ8_0 {
    #[inline]
    fn scale(&self) -> f32 {
        // SAFETY: this level's kernels run only on CPUs with F16C (`kernels`).
        unsafe { h2f(self.d) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values_i8(&self) -> __m256i {
        // SAFETY: the block's 32 bytes.
        unsafe { load32(&self.qs) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values_f32(&self, c: usize) -> __m256 {
        // SAFETY: 8 bytes at `c` ≤ 24, inside the 32.
        let q = unsafe { _mm_loadl_epi64(self.qs.as_ptr().add(c) as *const __m128i) };
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
    }
}

impl KvLoad for BlockQ4_0 {
    #[inline]
    fn scale(&self) -> f32 {
        // SAFETY: as for Q8_0.
        unsafe { h2f(self.d) }
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values_i8(&self) -> __m256i {
        // SAFETY: the block's 16 bytes.
        _mm256_sub_epi8(unsafe { nibbles_32(&self.qs) }, _mm256_set1_epi8(8))
    }
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn values_f32(&self, c: usize) -> __m256 {
        // Values 0..16 are the low nibbles of bytes 0..16, values 16..32 the high ones.
        // SAFETY: 8 bytes at `c % 16` ≤ 8, inside the 16.
        let bytes = unsafe { _mm_loadl_epi64(self.qs.as_ptr().add(c % 16) as *const __m128i) };
        let bytes = if c < 16 {
            bytes
        } else {
            _mm_srli_epi16(bytes, 4)
        };
        let q = _mm_sub_epi8(_mm_and_si128(bytes, _mm_set1_epi8(0x0F)), _mm_set1_epi8(8));
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
    }
}

/// [`crate::kvquant::attend_by_rows`] for all rows at once (the same arithmetic per row, in
/// another order).
///
/// # Safety
/// AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn attend<B: KvLoad>(
    a: &AttendQuant<B>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (hd, nb) = (a.head_dim, a.head_dim / QK);
    let (lo, n) = a.checked_span(out.len());
    // Scores, then weights.
    let need = a.rows * n;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let mut q8 = [[bytemuck::Zeroable::zeroed(); MAX_HEAD_DIM / QK]; 8];
    let mut qd = [[0f32; MAX_HEAD_DIM / QK]; 8];
    for r in 0..a.rows {
        // SAFETY: AVX2, FMA and F16C are enabled here.
        unsafe { quantize_q8_0(&a.q[a.at[r]..][..hd], &mut q8[r][..nb]) };
        for (d, b) in qd[r].iter_mut().zip(&q8[r][..nb]) {
            *d = h2f(b.d);
        }
    }
    let ps = &mut scratch[..need];
    // SAFETY: the checks above keep every key and value row `lo..hi` inside `a.k`/`a.v`,
    // and each row's output inside `out`.
    unsafe {
        match a.rows {
            1 => rows_block::<1, B>(a, lo, n, (&q8, &qd), ps, out),
            2 => rows_block::<2, B>(a, lo, n, (&q8, &qd), ps, out),
            3 => rows_block::<3, B>(a, lo, n, (&q8, &qd), ps, out),
            4 => rows_block::<4, B>(a, lo, n, (&q8, &qd), ps, out),
            5 => rows_block::<5, B>(a, lo, n, (&q8, &qd), ps, out),
            6 => rows_block::<6, B>(a, lo, n, (&q8, &qd), ps, out),
            7 => rows_block::<7, B>(a, lo, n, (&q8, &qd), ps, out),
            _ => rows_block::<8, B>(a, lo, n, (&q8, &qd), ps, out),
        }
    }
}

/// The query rows' Q8_0 blocks and their scales as f32.
type Queries<'q> = (
    &'q [[BlockQ8_0; MAX_HEAD_DIM / QK]; 8],
    &'q [[f32; MAX_HEAD_DIM / QK]; 8],
);

/// `R` rows over keys `lo..lo + n`: scores into `ps` (`R × n`), then the weighted sums.
///
/// # Safety
/// As `attend` checks: keys and values `lo..lo + n` exist; `R == a.rows`; `ps` holds
/// `R × n`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_block<const R: usize, B: KvLoad>(
    a: &AttendQuant<B>,
    lo: usize,
    n: usize,
    (q8, qd): Queries,
    ps: &mut [f32],
    out: &mut [f32],
) {
    let hd = a.head_dim;
    let nb = hd / QK;
    // SAFETY (whole body): `attend`'s checks bound every index: key/value rows `lo..lo + n`
    // hold `nb` blocks at `(lo + j) * kv_stride`, `ps` `R × n` floats, output rows `hd`
    // floats at `at[r]`.
    unsafe {
        let ahead = super::ATTEND_PREFETCH_KEYS * a.kv_stride;
        for j in 0..n {
            let key = a.k.as_ptr().add((lo + j) * a.kv_stride);
            super::prefetch_bytes(key.wrapping_add(ahead), nb * std::mem::size_of::<B>());
            let mut acc = [_mm256_setzero_ps(); R];
            for b in 0..nb {
                let kb = &*key.add(b);
                let kq = kb.values_i8();
                let dk = kb.scale();
                for (r, acc) in acc.iter_mut().enumerate() {
                    let d = _mm256_set1_ps(dk * qd[r][b]);
                    let qq = load32(&q8[r][b].qs);
                    *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(dot_i8_pairs(kq, qq)), *acc);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let (first, end) = a.keys[r];
                *ps.get_unchecked_mut(r * n + j) = if (first..end).contains(&(lo + j)) {
                    crate::scaled_score(hsum_ps(*acc), a.scale, a.softcap)
                } else {
                    f32::NEG_INFINITY
                };
            }
        }
        for r in 0..R {
            super::encoder_avx2::softmax(&mut ps[r * n..][..n]);
        }
        // out_r = Σ_j p[r][j] · d_j · q_j, a value block at a time: as many 8-column
        // chunks per pass over the keys as the rows' accumulators leave registers for.
        for b in 0..nb {
            match R {
                1..=3 => values_pass::<R, 4, B>(a, lo, n, b, ps, out),
                4..=6 => values_pass::<R, 2, B>(a, lo, n, b, ps, out),
                _ => values_pass::<R, 1, B>(a, lo, n, b, ps, out),
            }
        }
    }
}

/// Columns of value block `b` for the `R` rows, `CH` chunks of 8 per pass over the keys.
///
/// # Safety
/// As [`rows_block`].
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn values_pass<const R: usize, const CH: usize, B: KvLoad>(
    a: &AttendQuant<B>,
    lo: usize,
    n: usize,
    b: usize,
    ps: &[f32],
    out: &mut [f32],
) {
    // SAFETY (whole body): as in `rows_block`.
    unsafe {
        let vrow = a.v.as_ptr().add(lo * a.kv_stride + b);
        for c0 in (0..QK).step_by(8 * CH) {
            let mut acc = [[_mm256_setzero_ps(); CH]; R];
            for j in 0..n {
                let ahead = (j + super::ATTEND_PREFETCH_KEYS) * a.kv_stride;
                super::prefetch_bytes(vrow.wrapping_add(ahead), std::mem::size_of::<B>());
                let vb = &*vrow.add(j * a.kv_stride);
                let d = vb.scale();
                let mut v = [_mm256_setzero_ps(); CH];
                for (k, v) in v.iter_mut().enumerate() {
                    *v = vb.values_f32(c0 + 8 * k);
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    // The weight times the block's scale: p · (d · q) as p·d · q.
                    let w = _mm256_set1_ps(*ps.get_unchecked(r * n + j) * d);
                    for (acc, v) in acc.iter_mut().zip(&v) {
                        *acc = _mm256_fmadd_ps(w, *v, *acc);
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (k, acc) in acc.iter().enumerate() {
                    let o = out.as_mut_ptr().add(a.at[r] + b * QK + c0 + 8 * k);
                    _mm256_storeu_ps(o, *acc);
                }
            }
        }
    }
}
