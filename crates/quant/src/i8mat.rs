//! Quantized products for many tokens at once (prompt prefill) on AMX-INT8 tiles.
//!
//! Every weight type is read as groups of `LEN` values (32, or a whole block) of signed bytes
//! `q` with a scale `dw` and an offset `mw` per group and row: `w = dw·q + mw`. The
//! activations, already quantized for the type (Q8_0, Q8_1 or Q8_K, as the dot-product
//! kernels use them), are staged once per product as a token-major matrix of signed bytes
//! with, per 32-column window and token, the scale `da` and `sa = da·Σq`. Then
//!
//! `Σ_k w·a = Σ_groups dw·da·(Σ q·qa) + mw·sa`
//!
//! where `tdpbssd` gives the integer sums of 16 tokens × 16 rows per group exactly, and the
//! float part runs in AVX-512 registers (16 tokens × 16 rows of f32 accumulators). Weights
//! are decoded with SIMD per 16-row panel once for all the tokens of the product
//! (up to 256), so the decoding is shared; they are read in the layout the decoding kernels
//! use (the file's, or rows grouped eight at a time at load), so no memory is added.
//! Results equal the dot-product kernels' up to float rounding (the integer parts are exact).

use crate::blocks::*;
use crate::reference::{iq4xs_scales, q2k_values, q3k_scales, q3k_values, q5_values, scale_min_k4};
#[cfg(target_arch = "x86_64")]
use crate::x86::avx2::h2f;

/// Shortest prompt whose tokens run on the tiles (a tile holds 16 tokens); shorter prompts
/// and generated tokens take the dot-product kernels. [`crate::Activations::quantize`] uses
/// it as a product size; the models apply it per prompt (`hearth_models::Part`), so that a
/// prompt's numbers do not depend on how it is chunked.
pub const MIN_TOKENS: usize = 16;

/// A weight block type as groups of signed bytes with a scale and offset per group.
pub trait Groups: Copy + Sync {
    /// Values per block.
    const BLOCK: usize;
    /// Values per group: 32, or the whole block when [`Groups::FOLDED`].
    const LEN: usize;
    /// Whether any group has an offset (`mw ≠ 0`).
    const HAS_MIN: bool;
    /// Whether the values come multiplied by their integer sub-block scales, one group per
    /// block (`LEN == BLOCK == QK_K`) and its windows summed in one tile: then `decode`
    /// also writes, after the `BLOCK` values, `BLOCK` offset multipliers where `HAS_MIN`
    /// (the offset is `mw · Σ a·multiplier`, a second tile product), and `simd` writes the
    /// windows' values to `q[..BLOCK / 32]`. The offset multipliers are one per 16-value
    /// run: `simd` writes them after the windows as two vectors of eight words, run `j`'s
    /// byte four times in word `j % 8` of vector `j / 8`, so the tiles repeat each run's
    /// column of 16 rows instead of transposing a window of bytes per tile. Only with
    /// `SIMD`; the activations' scale must be one per block (Q8_K).
    const FOLDED: bool = false;
    /// The block's values in element order (`BLOCK` bytes of `q`) and each group's
    /// `(dw, mw)` (`BLOCK / LEN` entries of `scales`).
    fn decode(&self, q: &mut [i8], scales: &mut [(f32, f32)]);
    /// Whether [`Groups::simd`] is implemented.
    const SIMD: bool = false;
    /// Decodes with SIMD: group `g`'s 32-column window of signed bytes to `q[g]`, its
    /// `(dw, mw)` to `scales[g]`.
    ///
    /// # Safety
    /// AVX2, F16C and AVX-512 F/BW/VL are present.
    #[cfg(target_arch = "x86_64")]
    unsafe fn simd(&self, _q: &mut [std::arch::x86_64::__m256i], _scales: &mut [(f32, f32)]) {
        unreachable!("no SIMD decoding for this type")
    }
    /// Whether [`Groups::simd`] leaves the scales to [`Groups::simd_scales8`], which gives
    /// eight rows' at once (rows grouped at load keep their scales side by side).
    const GROUP_SCALES: bool = false;
    /// For this row and the seven after it (this must be row 0 of a group of eight): each
    /// group `g`'s `(dw, mw)` of row `r` to `dw[g][lane + r]`, `mw[g][lane + r]`.
    ///
    /// # Safety
    /// As [`Groups::simd`]'s.
    #[cfg(target_arch = "x86_64")]
    unsafe fn simd_scales8(&self, _dw: &mut [[f32; 16]], _mw: &mut [[f32; 16]], _lane: usize) {
        unreachable!("no grouped scales for this type")
    }
}

/// `simd` for the types the VNNI kernels decode: their unsigned bytes minus the offset;
/// `$scales` gives the block's `(dw, mw)`.
#[cfg(target_arch = "x86_64")]
macro_rules! simd_32 {
    ($d:ident) => {
        simd_32!(@ |b: &Self| (h2f(b.$d), 0.0));
    };
    ($d:ident, $m:ident) => {
        simd_32!(@ |b: &Self| (h2f(b.$d), h2f(b.$m)));
    };
    (@ $scales:expr) => {
        const SIMD: bool = true;
        #[cfg(target_arch = "x86_64")]
        #[inline(always)]
        unsafe fn simd(&self, q: &mut [std::arch::x86_64::__m256i], scales: &mut [(f32, f32)]) {
            use crate::x86::vnni::Unsigned32;
            use std::arch::x86_64::*;
            // SAFETY: the caller vouches for AVX2, F16C and AVX-512 BW/VL.
            unsafe {
                let off = _mm256_set1_epi8(<Self as Unsigned32>::OFFSET as i32 as i8);
                q[0] = _mm256_sub_epi8(self.bytes_bw(), off);
                scales[0] = $scales(self);
            }
        }
    };
}

fn nibbles(qs: &[u8; 16], off: i8, q: &mut [i8]) {
    for j in 0..16 {
        q[j] = (qs[j] & 0xF) as i8 - off;
        q[j + 16] = (qs[j] >> 4) as i8 - off;
    }
}

/// The 5-bit values of a Q5 block minus `off`, as signed bytes.
fn fifth_bits(qs: &[u8; 16], qh: [u8; 4], off: i8, q: &mut [i8]) {
    for (q, v) in q.iter_mut().zip(q5_values(qs, qh)) {
        *q = v as i8 - off;
    }
}

impl Groups for BlockQ4_0 {
    const BLOCK: usize = QK;
    const LEN: usize = QK;
    const HAS_MIN: bool = false;
    fn decode(&self, q: &mut [i8], scales: &mut [(f32, f32)]) {
        nibbles(&self.qs, 8, q);
        scales[0] = (self.d.to_f32(), 0.0);
    }
    #[cfg(target_arch = "x86_64")]
    simd_32!(d);
}

impl Groups for BlockQ4_1 {
    const BLOCK: usize = QK;
    const LEN: usize = QK;
    const HAS_MIN: bool = true;
    fn decode(&self, q: &mut [i8], scales: &mut [(f32, f32)]) {
        nibbles(&self.qs, 0, q);
        scales[0] = (self.d.to_f32(), self.m.to_f32());
    }
    #[cfg(target_arch = "x86_64")]
    simd_32!(d, m);
}

impl Groups for BlockQ5_0 {
    const BLOCK: usize = QK;
    const LEN: usize = QK;
    const HAS_MIN: bool = false;
    fn decode(&self, q: &mut [i8], scales: &mut [(f32, f32)]) {
        fifth_bits(&self.qs, self.qh, 16, q);
        scales[0] = (self.d.to_f32(), 0.0);
    }
    #[cfg(target_arch = "x86_64")]
    simd_32!(d);
}

impl Groups for BlockQ5_1 {
    const BLOCK: usize = QK;
    const LEN: usize = QK;
    const HAS_MIN: bool = true;
    fn decode(&self, q: &mut [i8], scales: &mut [(f32, f32)]) {
        fifth_bits(&self.qs, self.qh, 0, q);
        scales[0] = (self.d.to_f32(), self.m.to_f32());
    }
    #[cfg(target_arch = "x86_64")]
    simd_32!(d, m);
}

impl Groups for BlockQ8_0 {
    const BLOCK: usize = QK;
    const LEN: usize = QK;
    const HAS_MIN: bool = false;
    fn decode(&self, q: &mut [i8], scales: &mut [(f32, f32)]) {
        q[..QK].copy_from_slice(&self.qs);
        scales[0] = (self.d.to_f32(), 0.0);
    }
    #[cfg(target_arch = "x86_64")]
    simd_32!(d);
}

/// The 8 sub-blocks' `(dw, mw)` of a Q4_K/Q5_K block: `d·scale`, `-dmin·min`.
#[inline(always)]
fn k_scales(d: f32, dmin: f32, packed: &[u8; K_SCALE_SIZE], out: &mut [(f32, f32)]) {
    for (g, s) in out.iter_mut().take(8).enumerate() {
        let (sc, m) = scale_min_k4(g, packed);
        *s = (d * sc as f32, -dmin * m as f32);
    }
}

impl Groups for BlockQ4K {
    const BLOCK: usize = QK_K;
    const LEN: usize = 32;
    const HAS_MIN: bool = true;
    fn decode(&self, q: &mut [i8], scales: &mut [(f32, f32)]) {
        for chunk in 0..4 {
            let src = &self.qs[32 * chunk..][..32];
            for l in 0..32 {
                q[64 * chunk + l] = (src[l] & 0xF) as i8;
                q[64 * chunk + 32 + l] = (src[l] >> 4) as i8;
            }
        }
        k_scales(self.d.to_f32(), self.dmin.to_f32(), &self.scales, scales);
    }
    const SIMD: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd(&self, q: &mut [std::arch::x86_64::__m256i], scales: &mut [(f32, f32)]) {
        use std::arch::x86_64::*;
        // SAFETY: the caller vouches for AVX2; each load reads 32 of the 128 bytes of qs.
        unsafe {
            k_nibbles(
                |c| _mm256_loadu_si256(self.qs.as_ptr().add(32 * c) as *const __m256i),
                q,
            );
        }
        // SAFETY: F16C is present (the caller vouches).
        unsafe { k_scales(h2f(self.d), h2f(self.dmin), &self.scales, scales) };
    }
}

/// Q4_K's (and Q5_K's low) nibbles: `chunk(c)` loads the 32 bytes of `qs[32c..]`, whose low
/// nibbles are sub-block `2c`'s values and high nibbles sub-block `2c + 1`'s.
///
/// # Safety
/// AVX2 is present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn k_nibbles(
    chunk: impl Fn(usize) -> std::arch::x86_64::__m256i,
    q: &mut [std::arch::x86_64::__m256i],
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller vouches for AVX2.
    unsafe {
        let low = _mm256_set1_epi8(0x0F);
        for c in 0..4 {
            let v = chunk(c);
            q[2 * c] = _mm256_and_si256(v, low);
            q[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
        }
    }
}

/// Q5_K's values: [`k_nibbles`] plus 16 where `qh` (the block's 32 bytes) has the value's
/// fifth bit.
///
/// # Safety
/// AVX2 and AVX-512 BW/VL are present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn k_fifth_bits(
    chunk: impl Fn(usize) -> std::arch::x86_64::__m256i,
    qh: std::arch::x86_64::__m256i,
    q: &mut [std::arch::x86_64::__m256i],
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller vouches for AVX2 and AVX-512 BW/VL.
    unsafe {
        let (low, sixteen) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(16));
        for c in 0..4 {
            let v = chunk(c);
            // Value l of the chunk's two groups has its fifth bit in qh[l], bits 2c and
            // 2c + 1: a byte mask each, and a masked add of 16.
            let bit = _mm256_set1_epi8(1 << (2 * c));
            let (h1, h2) = (
                _mm256_test_epi8_mask(qh, bit),
                _mm256_test_epi8_mask(qh, _mm256_add_epi8(bit, bit)),
            );
            let (l1, l2) = (
                _mm256_and_si256(v, low),
                _mm256_and_si256(_mm256_srli_epi16::<4>(v), low),
            );
            q[2 * c] = _mm256_mask_add_epi8(l1, h1, l1, sixteen);
            q[2 * c + 1] = _mm256_mask_add_epi8(l2, h2, l2, sixteen);
        }
    }
}

impl Groups for BlockQ5K {
    const BLOCK: usize = QK_K;
    const LEN: usize = 32;
    const HAS_MIN: bool = true;
    fn decode(&self, q: &mut [i8], scales: &mut [(f32, f32)]) {
        for chunk in 0..4 {
            let src = &self.qs[32 * chunk..][..32];
            let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
            for l in 0..32 {
                let h1 = if self.qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if self.qh[l] & u2 != 0 { 16 } else { 0 };
                q[64 * chunk + l] = ((src[l] & 0xF) + h1) as i8;
                q[64 * chunk + 32 + l] = ((src[l] >> 4) + h2) as i8;
            }
        }
        k_scales(self.d.to_f32(), self.dmin.to_f32(), &self.scales, scales);
    }
    const SIMD: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd(&self, q: &mut [std::arch::x86_64::__m256i], scales: &mut [(f32, f32)]) {
        use std::arch::x86_64::*;
        // SAFETY: the caller vouches for AVX2 and AVX-512 BW/VL; the loads read 32 of the
        // 128 bytes of qs, and the 32 bytes of qh.
        unsafe {
            let qh = _mm256_loadu_si256(self.qh.as_ptr() as *const __m256i);
            k_fifth_bits(
                |c| _mm256_loadu_si256(self.qs.as_ptr().add(32 * c) as *const __m256i),
                qh,
                q,
            );
        }
        // SAFETY: F16C is present (the caller vouches).
        unsafe { k_scales(h2f(self.d), h2f(self.dmin), &self.scales, scales) };
    }
}

/// The values of a Q2_K or Q3_K block times their sub-block's integer scale, and Q2_K's
/// offsets as per-value multipliers (its `min` of each 16 values): both fit a signed byte
/// (Q2_K: 0..=45 and 0..=15; Q3_K negated, `-(scale·q)` in -128..=124), so the tiles sum
/// a whole super-block's integer products at once (`Groups::FOLDED`).
impl Groups for BlockQ2K {
    const BLOCK: usize = QK_K;
    const LEN: usize = QK_K;
    const HAS_MIN: bool = true;
    const FOLDED: bool = true;
    fn decode(&self, q: &mut [i8], scales: &mut [(f32, f32)]) {
        for (i, v) in q2k_values(self).into_iter().enumerate() {
            let sc = self.scales[i / 16];
            q[i] = ((sc & 0xF) * v) as i8;
            q[QK_K + i] = (sc >> 4) as i8;
        }
        scales[0] = (self.d.to_f32(), -self.dmin.to_f32());
    }
    const SIMD: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd(&self, q: &mut [std::arch::x86_64::__m256i], scales: &mut [(f32, f32)]) {
        use std::arch::x86_64::*;
        // SAFETY: the caller vouches for AVX2 and AVX-512 BW/VL; the loads read 32 of the 64
        // bytes of qs and the 16 bytes of scales.
        unsafe {
            q2k_folded(
                |half| _mm256_loadu_si256(self.qs.as_ptr().add(32 * half) as *const __m256i),
                _mm_loadu_si128(self.scales.as_ptr() as *const __m128i),
                q,
            );
        }
        // SAFETY: F16C is present (the caller vouches).
        unsafe { scales[0] = (h2f(self.d), -h2f(self.dmin)) };
    }
}

/// Q2_K's values times their sub-block's scale, and its offset multipliers (see
/// [`BlockQ2K`]'s `Groups`): `half(h)` loads `qs[32h..32h + 32]`, `scales` holds the 16
/// scale bytes (scale in the low nibble, min in the high one).
///
/// # Safety
/// AVX2 and AVX-512 BW/VL are present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q2k_folded(
    half: impl Fn(usize) -> std::arch::x86_64::__m256i,
    scales: std::arch::x86_64::__m128i,
    q: &mut [std::arch::x86_64::__m256i],
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller vouches for AVX2 and AVX-512 BW/VL.
    unsafe {
        let (three, low) = (_mm256_set1_epi8(3), _mm256_set1_epi8(0x0F));
        // Sub-block k's scale byte in bytes 0..16 of window k/2 for even k, 16..32 odd.
        let sc = _mm256_broadcastsi128_si256(scales);
        let pick_lo = _mm256_setr_epi64x(0, 0, 0x0101_0101_0101_0101, 0x0101_0101_0101_0101);
        for h in 0..2 {
            let v = half(h);
            let runs = [
                v,
                _mm256_srli_epi16::<2>(v),
                _mm256_srli_epi16::<4>(v),
                _mm256_srli_epi16::<6>(v),
            ];
            for (j, run) in runs.into_iter().enumerate() {
                let w = 4 * h + j;
                // Sub-blocks 2w (bytes 0..16) and 2w + 1 (16..32).
                let idx = _mm256_add_epi8(pick_lo, _mm256_set1_epi8(2 * w as i8));
                let both = _mm256_shuffle_epi8(sc, idx);
                // Both bytes of a 16-bit lane are in one sub-block: its scale in the
                // low byte.
                let scale = _mm256_and_si256(both, _mm256_set1_epi16(0x0F));
                let v = _mm256_and_si256(run, three);
                // Products ≤ 45.
                q[w] = mul_bytes_lane_scale(v, scale);
            }
        }
        // Each run's min (the scale byte's high nibble) four times per word
        // (`Groups::FOLDED`).
        let mins = _mm256_and_si256(_mm256_srli_epi16::<4>(sc), low);
        let runs = _mm256_setr_epi64x(
            0x0101_0101_0000_0000,
            0x0303_0303_0202_0202,
            0x0505_0505_0404_0404,
            0x0707_0707_0606_0606,
        );
        q[8] = _mm256_shuffle_epi8(mins, runs);
        q[9] = _mm256_shuffle_epi8(mins, _mm256_add_epi8(runs, _mm256_set1_epi8(8)));
    }
}

/// Byte-wise `a · s` where each 16-bit lane of `s` holds the scale of both its bytes in
/// its low byte (the high byte zero): the products' low bytes, exact for products that fit
/// a byte, signed or not.
///
/// # Safety
/// AVX2 and AVX-512 BW/VL are present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn mul_bytes_lane_scale(
    a: std::arch::x86_64::__m256i,
    s: std::arch::x86_64::__m256i,
) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the caller vouches for AVX2 and AVX-512 BW/VL.
    unsafe {
        // Low byte of `a·s`: the low byte's product (mod 256); high byte of
        // `(a & 0xFF00)·s`: the high byte's.
        let even = _mm256_mullo_epi16(a, s);
        let odd = _mm256_mullo_epi16(_mm256_and_si256(a, _mm256_set1_epi16(0xFF00u16 as i16)), s);
        _mm256_mask_blend_epi8(0xAAAA_AAAA, even, odd)
    }
}

impl Groups for BlockQ3K {
    const BLOCK: usize = QK_K;
    const LEN: usize = QK_K;
    const HAS_MIN: bool = false;
    const FOLDED: bool = true;
    fn decode(&self, q: &mut [i8], scales: &mut [(f32, f32)]) {
        let scale = q3k_scales(self);
        for (i, v) in q3k_values(self).into_iter().enumerate() {
            q[i] = (-(scale[i / 16] as i32 * v as i32)) as i8;
        }
        scales[0] = (-self.d.to_f32(), 0.0);
    }
    const SIMD: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd(&self, q: &mut [std::arch::x86_64::__m256i], scales: &mut [(f32, f32)]) {
        use std::arch::x86_64::*;
        // SAFETY: the caller vouches for AVX2 and AVX-512 BW/VL; the loads read 32 bytes
        // inside qs (64) and hmask (32).
        unsafe {
            q3k_folded(
                _mm256_loadu_si256(self.hmask.as_ptr() as *const __m256i),
                |half| _mm256_loadu_si256(self.qs.as_ptr().add(32 * half) as *const __m256i),
                crate::x86::avx2::q3k_scales(self),
                q,
            );
        }
        // SAFETY: F16C is present (the caller vouches).
        unsafe { scales[0] = (-h2f(self.d), 0.0) };
    }
}

/// Q3_K's values times their sub-block's scale, negated (see [`BlockQ3K`]'s `Groups`):
/// `hmask` holds the block's 32 bytes of high bits, `half(h)` loads `qs[32h..32h + 32]`,
/// `scale` holds the 16 sub-block scales (signed bytes).
///
/// # Safety
/// AVX2 and AVX-512 BW/VL are present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q3k_folded(
    hmask: std::arch::x86_64::__m256i,
    half: impl Fn(usize) -> std::arch::x86_64::__m256i,
    scale: std::arch::x86_64::__m128i,
    q: &mut [std::arch::x86_64::__m256i],
) {
    use std::arch::x86_64::*;
    // SAFETY: the caller vouches for AVX2 and AVX-512 BW/VL.
    unsafe {
        let (three, four) = (_mm256_set1_epi8(3), _mm256_set1_epi8(4));
        // Negated once here rather than every product.
        let minus = _mm_sub_epi8(_mm_setzero_si128(), scale);
        let sc = _mm256_broadcastsi128_si256(minus);
        // Sub-block 2w's scale in the low byte of bytes 0..16's lanes, 2w + 1's in 16..32;
        // high bytes zero (index bit 7 set).
        let pick_lo = _mm256_setr_epi64x(
            0x8000_8000_8000_8000u64 as i64,
            0x8000_8000_8000_8000u64 as i64,
            0x8001_8001_8001_8001u64 as i64,
            0x8001_8001_8001_8001u64 as i64,
        );
        for h in 0..2 {
            let v = half(h);
            let runs = [
                v,
                _mm256_srli_epi16::<2>(v),
                _mm256_srli_epi16::<4>(v),
                _mm256_srli_epi16::<6>(v),
            ];
            for (j, run) in runs.into_iter().enumerate() {
                let w = 4 * h + j;
                let low = _mm256_and_si256(run, three);
                // Minus 4 where the value's hmask bit is clear.
                let bit = _mm256_set1_epi8((1u8 << w) as i8);
                let clear = _mm256_testn_epi8_mask(hmask, bit);
                let v = _mm256_mask_sub_epi8(low, clear, low, four);
                let idx = _mm256_add_epi8(pick_lo, _mm256_set1_epi8(2 * w as i8));
                let minus_s = _mm256_shuffle_epi8(sc, idx);
                // (-s)·v: |s·v| ≤ 128 and -(s·v) ≥ -128, so it fits a byte.
                q[w] = mul_bytes_lane_scale(v, minus_s);
            }
        }
    }
}

/// The 32 values of an IQ4_NL-coded run (16 bytes of nibbles) as signed bytes.
fn iq4_values(qs: &[u8], q: &mut [i8]) {
    for l in 0..16 {
        q[l] = KVALUES_IQ4NL[(qs[l] & 0xF) as usize];
        q[l + 16] = KVALUES_IQ4NL[(qs[l] >> 4) as usize];
    }
}

/// [`iq4_values`] with SIMD: the low nibbles to bytes 0..16, the high ones to 16..32, both
/// looked up in the table.
///
/// # Safety
/// AVX2 is present; `qs` points to 16 readable bytes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn iq4_values_simd(qs: *const u8) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the caller vouches for AVX2 and the 16 bytes; the table holds 16.
    unsafe {
        let table =
            _mm256_broadcastsi128_si256(_mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i));
        let low = _mm_set1_epi8(0x0F);
        let v = _mm_loadu_si128(qs as *const __m128i);
        let idx = _mm256_setr_m128i(
            _mm_and_si128(v, low),
            _mm_and_si128(_mm_srli_epi16::<4>(v), low),
        );
        _mm256_shuffle_epi8(table, idx)
    }
}

impl Groups for BlockIQ4NL {
    const BLOCK: usize = QK;
    const LEN: usize = QK;
    const HAS_MIN: bool = false;
    fn decode(&self, q: &mut [i8], scales: &mut [(f32, f32)]) {
        iq4_values(&self.qs, q);
        scales[0] = (self.d.to_f32(), 0.0);
    }
    const SIMD: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd(&self, q: &mut [std::arch::x86_64::__m256i], scales: &mut [(f32, f32)]) {
        // SAFETY: the caller vouches for AVX2; qs holds 16 bytes.
        q[0] = unsafe { iq4_values_simd(self.qs.as_ptr()) };
        // SAFETY: F16C is present (the caller vouches).
        unsafe { scales[0] = (h2f(self.d), 0.0) };
    }
}

impl Groups for BlockIQ4XS {
    const BLOCK: usize = QK_K;
    const LEN: usize = 32;
    const HAS_MIN: bool = false;
    fn decode(&self, q: &mut [i8], scales: &mut [(f32, f32)]) {
        for ib in 0..8 {
            iq4_values(&self.qs[16 * ib..], &mut q[32 * ib..]);
        }
        iq4xs_group_scales(self, self.d.to_f32(), scales);
    }
    const SIMD: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd(&self, q: &mut [std::arch::x86_64::__m256i], scales: &mut [(f32, f32)]) {
        for (ib, q) in q.iter_mut().take(8).enumerate() {
            // SAFETY: the caller vouches for AVX2; 16 of qs's 128 bytes.
            *q = unsafe { iq4_values_simd(self.qs.as_ptr().add(16 * ib)) };
        }
        // SAFETY: F16C is present (the caller vouches).
        iq4xs_group_scales(self, unsafe { h2f(self.d) }, scales);
    }
}

/// IQ4_XS's 8 groups' `(d·scale, 0)`.
#[inline(always)]
fn iq4xs_group_scales(b: &BlockIQ4XS, d: f32, out: &mut [(f32, f32)]) {
    for (s, sc) in out.iter_mut().zip(iq4xs_scales(b)) {
        *s = (d * sc as f32, 0.0);
    }
}

/// Row `r` of a group of eight rows of `B` blocks (grouped at load, `Groupable`), as the
/// tiles decode it without leaving the group: a [`Groups`] whose constants and scalar
/// decoding are `B`'s.
pub struct GroupRow<'a, B: Groupable> {
    g: &'a B::Group,
    r: usize,
}

impl<B: Groupable> Clone for GroupRow<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Groupable> Copy for GroupRow<'_, B> {}

/// A block type whose grouped rows the tiles decode where they lie ([`GroupRow`]): each
/// row's values, and the eight rows' scales at once, which the group keeps side by side
/// (gathering each row's scales from the group and scattering them to the panel one float
/// at a time led `perf annotate` of a 16-token prompt's decoding).
pub trait InPlaceRows: Groups + Groupable {
    /// [`Groups::simd`]'s values of row `r` of `g`. By default its block taken out of the
    /// group (18 to 22 bytes for the 32-value types, whose scales the compiler then drops);
    /// the K-quants read their runs in place, as taking a Q4_K block out repacks its scales.
    ///
    /// # Safety
    /// As [`Groups::simd`]'s.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_row(g: &Self::Group, r: usize, q: &mut [std::arch::x86_64::__m256i]) {
        let mut unused = [(0.0f32, 0.0f32); 8];
        // SAFETY: the caller vouches (as `Groups::simd`).
        unsafe { Self::take(g, r).simd(q, &mut unused[..Self::BLOCK / <Self as Groups>::LEN]) }
    }
    /// [`Groups::simd_scales8`] of the group's eight rows.
    ///
    /// # Safety
    /// As [`Groups::simd`]'s.
    #[cfg(target_arch = "x86_64")]
    unsafe fn simd_scales8(
        g: &Self::Group,
        dw: &mut [[f32; 16]],
        mw: &mut [[f32; 16]],
        lane: usize,
    );
}

impl<B: InPlaceRows> Groups for GroupRow<'_, B> {
    const BLOCK: usize = <B as Groups>::BLOCK;
    const LEN: usize = <B as Groups>::LEN;
    const HAS_MIN: bool = <B as Groups>::HAS_MIN;
    const FOLDED: bool = <B as Groups>::FOLDED;
    fn decode(&self, q: &mut [i8], scales: &mut [(f32, f32)]) {
        B::take(self.g, self.r).decode(q, scales)
    }
    const SIMD: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd(&self, q: &mut [std::arch::x86_64::__m256i], _scales: &mut [(f32, f32)]) {
        // SAFETY: the caller vouches for what `simd_row` needs (as `simd`).
        unsafe { B::simd_row(self.g, self.r, q) }
    }
    const GROUP_SCALES: bool = true;
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_scales8(&self, dw: &mut [[f32; 16]], mw: &mut [[f32; 16]], lane: usize) {
        assert!(self.r == 0 && lane <= 8 && dw.len() >= Self::BLOCK / Self::LEN);
        assert!(mw.len() >= dw.len());
        // SAFETY: the caller vouches for what `simd_scales8` needs (as `simd`).
        unsafe { <B as InPlaceRows>::simd_scales8(self.g, dw, mw, lane) }
    }
}

/// [`InPlaceRows`] for the 32-value types: the eight rows' `d`, and Q4_1's `m` (the
/// groups' parts as the grouped kernels read them, `NibbleGroup`).
macro_rules! in_place_32 {
    ($($block:ty),+) => {$(
        impl InPlaceRows for $block {
            #[cfg(target_arch = "x86_64")]
            #[inline(always)]
            unsafe fn simd_scales8(
                g: &Self::Group,
                dw: &mut [[f32; 16]],
                mw: &mut [[f32; 16]],
                lane: usize,
            ) {
                use crate::x86::grouped::NibbleGroup;
                // SAFETY: the caller vouches for AVX2, F16C and the lanes.
                unsafe {
                    store8(&mut dw[0], lane, f16x8(g.d()));
                    let m = g.m().map_or(std::arch::x86_64::_mm256_setzero_ps(), |m| f16x8(m));
                    store8(&mut mw[0], lane, m);
                }
            }
        }
    )+};
}
in_place_32!(BlockQ4_0, BlockIQ4NL, BlockQ5_0, BlockQ4_1);

/// Eight f16 scales as f32.
///
/// # Safety
/// F16C is present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn f16x8(d: &[half::f16; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: the caller vouches for F16C; the load reads the 16 bytes of `d`.
    unsafe { _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr() as *const __m128i)) }
}

/// `-v` as the scalar code negates (the sign bit flipped, also of zeros and NaNs).
///
/// # Safety
/// AVX is present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn neg(v: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: the caller vouches for AVX.
    unsafe { _mm256_xor_ps(v, _mm256_set1_ps(-0.0)) }
}

/// The low eight bytes of `v`, unsigned (`signed`: signed), as f32.
///
/// # Safety
/// AVX2 is present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn bytes8_f32(v: std::arch::x86_64::__m128i, signed: bool) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: the caller vouches for AVX2.
    unsafe {
        _mm256_cvtepi32_ps(if signed {
            _mm256_cvtepi8_epi32(v)
        } else {
            _mm256_cvtepu8_epi32(v)
        })
    }
}

/// Stores eight rows' f32 to lanes `lane..lane + 8` of a panel's scale vector.
///
/// # Safety
/// AVX is present; `lane <= 8`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store8(to: &mut [f32; 16], lane: usize, v: std::arch::x86_64::__m256) {
    assert!(lane <= 8);
    // SAFETY: the caller vouches for AVX and `lane <= 8`: 8 floats inside `to`.
    unsafe { std::arch::x86_64::_mm256_storeu_ps(to.as_mut_ptr().add(lane), v) }
}

/// `scales[j]` (8 rows' bytes) for each `j`, from `rows[r][j]`: an 8 × 8 byte transpose;
/// `j` even in bytes 0..8 of vector `j / 2`, odd in 8..16.
///
/// # Safety
/// SSE2 is present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose_8x8(rows: &[[u8; 8]; 8]) -> [std::arch::x86_64::__m128i; 4] {
    use std::arch::x86_64::*;
    // SAFETY: the caller vouches for SSE2; each load reads one row's 8 bytes.
    unsafe {
        let r = |i: usize| _mm_loadl_epi64(rows[i].as_ptr() as *const __m128i);
        let (s0, s1) = (_mm_unpacklo_epi8(r(0), r(1)), _mm_unpacklo_epi8(r(2), r(3)));
        let (s2, s3) = (_mm_unpacklo_epi8(r(4), r(5)), _mm_unpacklo_epi8(r(6), r(7)));
        // j0..4 of rows 0..4, j4..8 of rows 0..4, then of rows 4..8.
        let (u0, u1) = (_mm_unpacklo_epi16(s0, s1), _mm_unpackhi_epi16(s0, s1));
        let (u2, u3) = (_mm_unpacklo_epi16(s2, s3), _mm_unpackhi_epi16(s2, s3));
        [
            _mm_unpacklo_epi32(u0, u2),
            _mm_unpackhi_epi32(u0, u2),
            _mm_unpacklo_epi32(u1, u3),
            _mm_unpackhi_epi32(u1, u3),
        ]
    }
}

/// [`Groups::simd_scales8`] of a Q4_K/Q5_K group: `d·scale`, `-dmin·min` per sub-block.
///
/// # Safety
/// AVX2 and F16C are present; `lane <= 8`, 8 entries in `dw` and `mw`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn k_scales8(g: &Q4K8, dw: &mut [[f32; 16]], mw: &mut [[f32; 16]], lane: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller vouches for AVX2, F16C and the lanes; loads read 8 bytes of
    // `scales[j]`.
    unsafe {
        let d = f16x8(&g.d);
        let minus_dmin = neg(f16x8(&g.dmin));
        let mins = transpose_8x8(&g.mins);
        for j in 0..8 {
            let sc = _mm_loadl_epi64(g.scales[j].as_ptr() as *const __m128i);
            store8(&mut dw[j], lane, _mm256_mul_ps(d, bytes8_f32(sc, false)));
            let m = if j % 2 == 0 {
                mins[j / 2]
            } else {
                _mm_srli_si128::<8>(mins[j / 2])
            };
            store8(
                &mut mw[j],
                lane,
                _mm256_mul_ps(minus_dmin, bytes8_f32(m, false)),
            );
        }
    }
}

/// Two 16-byte runs as one 32-byte vector (`lo` in bytes 0..16).
///
/// # Safety
/// AVX2 is present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn two_runs(lo: &[u8; 16], hi: &[u8; 16]) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    // SAFETY: the caller vouches for AVX2; each load reads one 16-byte array.
    unsafe { _mm256_loadu2_m128i(hi.as_ptr() as *const __m128i, lo.as_ptr() as *const __m128i) }
}

impl InPlaceRows for BlockQ4K {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_row(g: &Q4K8, r: usize, q: &mut [std::arch::x86_64::__m256i]) {
        // SAFETY: the caller vouches for AVX2; `qs[2c][r]`, `qs[2c + 1][r]` are the file's
        // `qs[32c..32c + 32]`.
        unsafe { k_nibbles(|c| two_runs(&g.qs[2 * c][r], &g.qs[2 * c + 1][r]), q) }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_scales8(g: &Q4K8, dw: &mut [[f32; 16]], mw: &mut [[f32; 16]], lane: usize) {
        // SAFETY: the caller vouches (as `Groups::simd_scales8`).
        unsafe { k_scales8(g, dw, mw, lane) }
    }
}

impl InPlaceRows for BlockQ5K {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_row(g: &Q5K8, r: usize, q: &mut [std::arch::x86_64::__m256i]) {
        let low = &g.low;
        // SAFETY: the caller vouches for AVX2 and AVX-512 BW/VL; `qh[0][r]`, `qh[1][r]` are
        // the file's 32 bytes of qh, and the runs as for Q4_K.
        unsafe {
            let qh = two_runs(&g.qh[0][r], &g.qh[1][r]);
            k_fifth_bits(
                |c| two_runs(&low.qs[2 * c][r], &low.qs[2 * c + 1][r]),
                qh,
                q,
            );
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_scales8(g: &Q5K8, dw: &mut [[f32; 16]], mw: &mut [[f32; 16]], lane: usize) {
        // SAFETY: the caller vouches (as `Groups::simd_scales8`).
        unsafe { k_scales8(&g.low, dw, mw, lane) }
    }
}

/// Row `r`'s 16 Q3_K scales of a group (signed bytes), unpacked in registers: unpacked
/// bit by bit and reloaded as a vector, they were a third of a 16-token prompt's decoding.
///
/// # Safety
/// AVX2 is present.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q3k_row_scales(g: &Q3K8, r: usize) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    const AT: usize = std::mem::offset_of!(Q3K8, scales);
    // The last row's 12 bytes and the next 4 (hmask's) are inside the group.
    const _: () = assert!(AT + 12 * 7 + 16 <= std::mem::size_of::<Q3K8>());
    assert!(r < 8);
    // SAFETY: the caller vouches for AVX2; bytes AT + 12r .. AT + 12r + 16 of the group
    // (asserted above), read through a pointer to the whole group.
    unsafe {
        let at = (g as *const Q3K8 as *const u8).add(AT + 12 * r);
        let v = _mm_loadu_si128(at as *const __m128i);
        _mm256_castsi256_si128(crate::x86::grouped::q3k_scales_256(
            _mm256_broadcastsi128_si256(v),
        ))
    }
}

impl InPlaceRows for BlockQ3K {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_row(g: &Q3K8, r: usize, q: &mut [std::arch::x86_64::__m256i]) {
        // SAFETY: the caller vouches for AVX2 and AVX-512 BW/VL; `hmask[0][r]`,
        // `hmask[1][r]` are the file's 32 bytes of hmask, `qs[2h][r]`, `qs[2h + 1][r]` its
        // `qs[32h..32h + 32]`.
        unsafe {
            q3k_folded(
                two_runs(&g.hmask[0][r], &g.hmask[1][r]),
                |h| two_runs(&g.qs[2 * h][r], &g.qs[2 * h + 1][r]),
                q3k_row_scales(g, r),
                q,
            );
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_scales8(g: &Q3K8, dw: &mut [[f32; 16]], mw: &mut [[f32; 16]], lane: usize) {
        use std::arch::x86_64::*;
        // SAFETY: the caller vouches for AVX2, F16C and the lanes (one folded group).
        unsafe {
            let minus_d = neg(f16x8(&g.d));
            store8(&mut dw[0], lane, minus_d);
            store8(&mut mw[0], lane, _mm256_setzero_ps());
        }
    }
}

impl InPlaceRows for BlockQ2K {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_row(g: &Q2K8, r: usize, q: &mut [std::arch::x86_64::__m256i]) {
        use std::arch::x86_64::*;
        // SAFETY: the caller vouches for AVX2 and AVX-512 BW/VL; `qs[2h][r]`,
        // `qs[2h + 1][r]` are the file's `qs[32h..32h + 32]`, `scales[r]` its 16 bytes.
        unsafe {
            q2k_folded(
                |h| two_runs(&g.qs[2 * h][r], &g.qs[2 * h + 1][r]),
                _mm_loadu_si128(g.scales[r].as_ptr() as *const __m128i),
                q,
            );
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_scales8(g: &Q2K8, dw: &mut [[f32; 16]], mw: &mut [[f32; 16]], lane: usize) {
        // SAFETY: the caller vouches for AVX2, F16C and the lanes (one folded group).
        unsafe {
            store8(&mut dw[0], lane, f16x8(&g.d));
            store8(&mut mw[0], lane, neg(f16x8(&g.dmin)));
        }
    }
}

impl InPlaceRows for BlockIQ4XS {
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_row(g: &IQ4XS8, r: usize, q: &mut [std::arch::x86_64::__m256i]) {
        for (ib, q) in q.iter_mut().take(8).enumerate() {
            // SAFETY: the caller vouches for AVX2; sub-block ib's 16 bytes.
            *q = unsafe { iq4_values_simd(g.qs[ib][r].as_ptr()) };
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn simd_scales8(g: &IQ4XS8, dw: &mut [[f32; 16]], mw: &mut [[f32; 16]], lane: usize) {
        use std::arch::x86_64::*;
        // SAFETY: the caller vouches for AVX2, F16C and the lanes; loads read 8 bytes of
        // `scales[j]`.
        unsafe {
            let d = f16x8(&g.d);
            for j in 0..8 {
                let sc = _mm_loadl_epi64(g.scales[j].as_ptr() as *const __m128i);
                store8(&mut dw[j], lane, _mm256_mul_ps(d, bytes8_f32(sc, true)));
                store8(&mut mw[j], lane, _mm256_setzero_ps());
            }
        }
    }
}

/// Activations staged for the tiles: `n_pad` tokens (a multiple of 16, padding zeros) of
/// `cols` signed bytes, and per 32-column window `w` and token `t` the scale
/// `d[w * n_pad + t]` and `s[w * n_pad + t] = d · Σq` over the window.
#[derive(Default)]
pub struct Staged {
    n_tok: usize,
    n_pad: usize,
    cols: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    /// Staged from Q8_K blocks: `d` is the same for a block's 8 windows.
    q8k: bool,
}

impl Staged {
    /// Whether the tiles run for products of this process (AMX level in force).
    pub fn available() -> bool {
        crate::dispatch::kernels().isa == crate::Isa::Amx
    }

    /// Tokens staged (0: nothing is).
    pub fn n_tok(&self) -> usize {
        self.n_tok
    }

    pub(crate) fn clear(&mut self) {
        self.n_tok = 0;
    }

    /// Stages `n_tok` tokens of `cols` values; `window(t, w)` gives token `t`'s bytes of
    /// window `w` with their `(d, d·Σq)`.
    fn stage<'a>(
        &mut self,
        n_tok: usize,
        cols: usize,
        window: impl Fn(usize, usize) -> (&'a [i8], f32, f32),
    ) {
        let n_pad = n_tok.next_multiple_of(16);
        let windows = cols / 32;
        self.n_tok = n_tok;
        self.n_pad = n_pad;
        self.cols = cols;
        self.q.resize(n_pad * cols, 0);
        self.q[n_tok * cols..].fill(0);
        self.d.resize(windows * n_pad, 0.0);
        self.s.resize(windows * n_pad, 0.0);
        self.q8k = false;
        for t in 0..n_pad {
            for w in 0..windows {
                let (d, s) = if t < n_tok {
                    let (q, d, s) = window(t, w);
                    self.q[t * cols + 32 * w..][..32].copy_from_slice(q);
                    (d, s)
                } else {
                    (0.0, 0.0)
                };
                self.d[w * n_pad + t] = d;
                self.s[w * n_pad + t] = s;
            }
        }
    }

    /// The first `n_tok` tokens of Q8_0 or Q8_1 blocks (`qs(i)`: block `i`'s values; `d`,
    /// `s`: each block's scale and `d·Σq`).
    pub(crate) fn stage_32<'a>(
        &mut self,
        n_tok: usize,
        qs: impl Fn(usize) -> &'a [i8; 32],
        d: &[f32],
        s: &[f32],
        cols: usize,
    ) {
        let nb = cols / 32;
        assert!(n_tok * nb <= d.len() && n_tok * nb <= s.len());
        self.stage(n_tok, cols, |t, w| {
            let i = t * nb + w;
            (&qs(i)[..], d[i], s[i])
        });
    }

    /// The first `n_tok` tokens of Q8_K blocks.
    pub(crate) fn stage_q8k(&mut self, n_tok: usize, blocks: &[BlockQ8K], cols: usize) {
        let nb = cols / QK_K;
        assert!(n_tok * nb <= blocks.len());
        self.stage(n_tok, cols, |t, w| {
            let b = &blocks[t * nb + w / 8];
            let j = w % 8;
            let sum = b.bsums[2 * j] as i32 + b.bsums[2 * j + 1] as i32;
            (&b.qs[32 * j..][..32], b.d, b.d * sum as f32)
        });
        self.q8k = true;
    }
}

/// `out[t * rows + r] = Σ_c w[r][c] · a[t][c]` for the staged tokens: `w` holds `rows`
/// rows of `cols / W::BLOCK` blocks, `a` was staged for `cols` columns, `out` is
/// token-major. Only call when [`Staged::available`].
pub fn matmul<W: Groups>(w: &[W], rows: usize, a: &Staged, out: &mut [f32]) {
    let nb = a.cols / W::BLOCK;
    check::<W>(rows, a, out);
    assert_eq!(w.len(), rows * nb, "weights are not {rows} rows");
    #[cfg(target_arch = "x86_64")]
    amx::matmul(rows, a, out, |row, b| {
        let block = &w[row * nb + b];
        (*block, block as *const W as *const i8)
    });
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, nb);
}

/// [`matmul`] for rows grouped eight at a time at load (`QMatrix::interleave`): each row is
/// decoded from its group ([`InPlaceRows`]), so a machine with AMX keeps the grouped rows its
/// decoding kernels read fastest.
pub fn matmul_grouped<W: InPlaceRows>(w: &[W::Group], rows: usize, a: &Staged, out: &mut [f32]) {
    let nb = a.cols / W::BLOCK;
    check::<W>(rows, a, out);
    assert!(
        rows.is_multiple_of(8) && w.len() == rows / 8 * nb,
        "weights are not {rows} rows in groups of eight"
    );
    #[cfg(target_arch = "x86_64")]
    amx::matmul(rows, a, out, |row, b| {
        let group = &w[row / 8 * nb + b];
        (
            GroupRow::<W> {
                g: group,
                r: row % 8,
            },
            group as *const W::Group as *const i8,
        )
    });
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (w, nb);
}

fn check<W: Groups>(rows: usize, a: &Staged, out: &[f32]) {
    assert!(a.n_tok > 0 && a.cols.is_multiple_of(W::BLOCK) && a.cols.is_multiple_of(32));
    assert!(out.len() >= a.n_tok * rows);
    assert!(Staged::available(), "AMX tiles are not in force");
    assert!(
        W::LEN == 32 || (W::FOLDED && W::LEN == W::BLOCK),
        "groups are 32-value windows or folded blocks"
    );
    assert!(
        !W::FOLDED || (W::BLOCK == QK_K && a.q8k),
        "folded blocks need Q8_K activations"
    );
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use super::{Groups, Staged};
    use crate::pool::SendPtr;
    use crate::x86::amx as tiles;
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// Block `b` of row `row`, and an address in its bytes for prefetching.
    pub(super) trait Source<W>: Fn(usize, usize) -> (W, *const i8) + Sync {}
    impl<W, F: Fn(usize, usize) -> (W, *const i8) + Sync> Source<W> for F {}

    /// One tile of weight bytes (16 rows × 32 columns in `tdpbssd`'s B order) on whole
    /// cache lines.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct BTile([u32; 128]);
    const _: () = assert!(std::mem::size_of::<BTile>() == 512);

    /// A result tile: 16 tokens × 16 rows of i32.
    #[repr(C, align(64))]
    struct CTile([i32; 256]);

    /// 16 weight rows decoded for the tiles: per group, its B tile and the 16 rows'
    /// `dw`, `mw`.
    #[derive(Default)]
    struct Panel {
        tiles: Vec<BTile>,
        dw: Vec<[f32; 16]>,
        mw: Vec<[f32; 16]>,
    }

    thread_local! {
        static PANEL: RefCell<Panel> = RefCell::new(Panel::default());
    }

    impl Panel {
        /// Decodes rows `r0..r0 + 16` of `w` (rows past `rows` get zero scales).
        fn fill<W: Groups>(
            &mut self,
            w: &impl Source<W>,
            rows: usize,
            nb: usize,
            r0: usize,
            few: bool,
        ) {
            // Every type's tile decoding is SIMD (`simd_decoding_equals_scalar` checks it
            // against its scalar `decode`).
            assert!(W::SIMD, "no SIMD decoding for the tiles");
            // SAFETY: tiles run only at the Amx level, which implies AVX2, F16C and
            // AVX-512 F/BW/VL (`dispatch::detect`).
            unsafe { self.fill_simd(w, rows, nb, r0, few) }
        }

        /// `fill`'s work: a block column of all 16 rows at a time, each group's 16 rows of
        /// 32 bytes transposed in registers into its B tile.
        ///
        /// # Safety
        /// AVX2, F16C and AVX-512 F/BW/VL are present.
        #[target_feature(enable = "avx2,f16c,avx512f,avx512bw,avx512vl")]
        #[allow(clippy::needless_range_loop)] // `n` indexes q's rows and every scale array
        unsafe fn fill_simd<W: Groups>(
            &mut self,
            w: &impl Source<W>,
            rows: usize,
            nb: usize,
            r0: usize,
            few: bool,
        ) {
            let per_block = W::BLOCK / W::LEN;
            // B tiles per block: one per group, or a folded block's windows (and as many
            // of offset multipliers).
            let tiles = if W::FOLDED {
                W::BLOCK / 32 * (1 + W::HAS_MIN as usize)
            } else {
                per_block
            };
            // Tiles of values, each a vector per row from `simd`; a folded block's offset
            // multipliers come as two vectors per row, one word per 16-value run
            // (`Groups::FOLDED`).
            let runs = W::FOLDED && W::HAS_MIN;
            let values = if runs { W::BLOCK / 32 } else { tiles };
            let vectors = values + if runs { 2 } else { 0 };
            assert!(tiles <= 16 && vectors <= 16 && per_block <= 8);
            let parts = nb * per_block;
            self.tiles.resize(nb * tiles, BTile([0; 128]));
            self.dw.resize(parts, [0.0; 16]);
            self.mw.resize(parts, [0.0; 16]);
            // Borrowed once, with the block's scales on the stack: through `self`, each
            // store made the compiler reload the vectors' pointers.
            let (b_tiles, dw, mw) = (&mut self.tiles[..], &mut self.dw[..], &mut self.mw[..]);
            let mut scales = [(0.0f32, 0.0f32); 8];
            let scales = &mut scales[..per_block];
            // Row n's bytes of group g: q[g][n].
            let mut q = [[_mm256_setzero_si256(); 16]; 16];
            let mut one = [_mm256_setzero_si256(); 16];
            for b in 0..nb {
                let p0 = b * per_block;
                for n in 0..16 {
                    let row = r0 + n;
                    if row < rows {
                        let (block, at) = w(row, b);
                        if few {
                            // The 16 rows are 16 streams the hardware prefetcher does not
                            // keep ahead of: with few tokens to share the decoding, a prompt
                            // spent most of its time waiting on them. (With many, the
                            // prefetches measured slightly slower.)
                            let ahead = at.wrapping_add(PREFETCH_BYTES);
                            // A prefetch is a hint: it never faults.
                            _mm_prefetch::<_MM_HINT_T0>(ahead);
                        }
                        if W::GROUP_SCALES && n % 8 == 0 {
                            let parts = p0..p0 + per_block;
                            let (dw, mw) = (&mut dw[parts.clone()], &mut mw[parts]);
                            // SAFETY: as `simd` below; rows grouped by eight start a group
                            // every eight rows, and `n` is 0 or 8.
                            unsafe { block.simd_scales8(dw, mw, n) };
                        }
                        // SAFETY: AVX2, F16C and AVX-512 BW/VL are enabled here.
                        unsafe { block.simd(&mut one, scales) };
                    } else {
                        one = [_mm256_setzero_si256(); 16];
                        scales.fill((0.0, 0.0));
                        if W::GROUP_SCALES {
                            for g in p0..p0 + per_block {
                                (dw[g][n], mw[g][n]) = (0.0, 0.0);
                            }
                        }
                    }
                    for i in 0..vectors {
                        q[i][n] = one[i];
                    }
                    if !W::GROUP_SCALES {
                        for g in 0..per_block {
                            (dw[p0 + g][n], mw[p0 + g][n]) = scales[g];
                        }
                    }
                }
                for (i, rows16) in q.iter().enumerate().take(values) {
                    b_tiles[b * tiles + i].0 = transpose_16x8(rows16);
                }
                if runs {
                    // Run j's multipliers of the 16 rows: word j % 8 of vector j / 8.
                    let run = [transpose_16x8(&q[values]), transpose_16x8(&q[values + 1])];
                    for w in 0..values {
                        let tile = &mut b_tiles[b * tiles + values + w].0;
                        // Tile row k holds bytes 4k..4k + 4 of window w: run 2w + k / 4.
                        for k in 0..8 {
                            let j = 2 * w + k / 4;
                            tile[16 * k..16 * k + 16]
                                .copy_from_slice(&run[j / 8][16 * (j % 8)..16 * (j % 8) + 16]);
                        }
                    }
                }
            }
        }
    }

    /// Products of at most this many tokens prefetch their weight rows.
    const FEW_TOKENS: usize = 64;
    /// How far ahead of its decoding each weight row is prefetched.
    const PREFETCH_BYTES: usize = 512;

    /// 16 rows of 8 words → the B tile: word `j` of row `n` at `j * 16 + n`.
    #[inline]
    #[target_feature(enable = "avx2,avx512f")]
    fn transpose_16x8(r: &[__m256i; 16]) -> [u32; 128] {
        let mut out = [0u32; 128];
        // SAFETY: AVX-512 F is enabled; `store_groups` writes 8 × 64 bytes, all of `out`.
        unsafe { crate::x86::panel::store_groups(out.as_mut_ptr() as *mut __m512i, |i| r[i]) };
        out
    }

    pub(super) fn matmul<W: Groups>(rows: usize, a: &Staged, out: &mut [f32], w: impl Source<W>) {
        let nb = a.cols / W::BLOCK;
        let panels = rows.div_ceil(16);
        let out = SendPtr(out.as_mut_ptr());
        crate::pool::run(panels, |p| {
            let out = &out;
            PANEL.with(|cell| {
                let panel = &mut *cell.borrow_mut();
                let r0 = p * 16;
                panel.fill(&w, rows, nb, r0, a.n_tok <= FEW_TOKENS);
                // SAFETY: `matmul` runs only where `Staged::available` (dispatch level Amx:
                // tiles granted by `tiles::enable`, AVX-512F present); the int8 configuration
                // is loaded on this thread first. Each task writes only the columns
                // `r0..r0 + 16` (clipped to `rows`) of the `n_tok` rows of `out`, which holds
                // `n_tok * rows` values (asserted by the caller); tasks' columns are
                // disjoint.
                unsafe {
                    tiles::configure_i8();
                    for m0 in (0..a.n_pad).step_by(16) {
                        if W::HAS_MIN {
                            token_group::<W, true>(panel, a, m0, r0, rows, out.0);
                        } else {
                            token_group::<W, false>(panel, a, m0, r0, rows, out.0);
                        }
                    }
                    tiles::release();
                }
            });
        });
    }

    /// `token_group` for folded blocks (`Groups::FOLDED`): per block, one tile sum over its
    /// windows (and one of the offset multipliers), scaled once.
    ///
    /// # Safety
    /// As `token_group`'s.
    #[target_feature(enable = "avx512f")]
    unsafe fn token_group_folded<W: Groups, const MIN: bool>(
        panel: &Panel,
        a: &Staged,
        m0: usize,
        r0: usize,
        rows: usize,
        out: *mut f32,
    ) {
        let windows = W::BLOCK / 32;
        let tiles = windows * (1 + MIN as usize);
        let mut acc = [_mm512_setzero_ps(); 16];
        let (mut c, mut c_min) = (CTile([0; 256]), CTile([0; 256]));
        for b in 0..panel.dw.len() {
            let first = &panel.tiles[b * tiles];
            let min = MIN.then(|| panel.tiles[b * tiles + windows].0.as_ptr() as *const i8);
            // SAFETY: A: 16 rows of the block's 32·windows bytes, `cols` apart from token
            // m0 (inside `q`, `n_pad * cols` bytes); B: the block's `tiles` consecutive
            // tiles; C: 256 i32 each.
            unsafe {
                tiles::dot_i8_run(
                    a.q[m0 * a.cols + W::BLOCK * b..].as_ptr(),
                    a.cols,
                    first.0.as_ptr() as *const i8,
                    min,
                    windows,
                    c.0.as_mut_ptr(),
                    c_min.0.as_mut_ptr(),
                );
            }
            // The activations' scale is the block's (Q8_K): its first window's.
            let win = (W::BLOCK / 32 * b) * a.n_pad + m0;
            let da = &a.d[win..win + 16];
            // SAFETY: 16 floats each.
            let (dw, mw) = unsafe {
                (
                    _mm512_loadu_ps(panel.dw[b].as_ptr()),
                    _mm512_loadu_ps(panel.mw[b].as_ptr()),
                )
            };
            for m in 0..16 {
                let d = _mm512_set1_ps(da[m]);
                // SAFETY: row m of the result tiles, 16 i32.
                let sum = unsafe { _mm512_loadu_si512(c.0.as_ptr().add(16 * m) as *const _) };
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(dw, d), acc[m]);
                if MIN {
                    // SAFETY: as above.
                    let sum =
                        unsafe { _mm512_loadu_si512(c_min.0.as_ptr().add(16 * m) as *const _) };
                    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(mw, d), acc[m]);
                }
            }
        }
        // SAFETY: as `token_group`'s stores.
        unsafe { store_tokens(&acc, a, m0, r0, rows, out) };
    }

    /// Tokens `m0..m0 + 16` × the panel's 16 rows, accumulated over every group.
    ///
    /// # Safety
    /// As in `matmul`: tiles configured for int8 on this thread, AVX-512F present, `out`
    /// holds `a.n_tok * rows` values.
    #[target_feature(enable = "avx512f")]
    unsafe fn token_group<W: Groups, const MIN: bool>(
        panel: &Panel,
        a: &Staged,
        m0: usize,
        r0: usize,
        rows: usize,
        out: *mut f32,
    ) {
        if W::FOLDED {
            // SAFETY: as this function's.
            return unsafe { token_group_folded::<W, MIN>(panel, a, m0, r0, rows, out) };
        }
        let parts = panel.tiles.len();
        let mut acc = [_mm512_setzero_ps(); 16];
        let mut c = [CTile([0; 256]), CTile([0; 256])];
        let window = |p: usize| p * W::LEN / 32;
        let a_at = |p: usize| a.q[(m0 * a.cols + 32 * window(p))..].as_ptr();
        let mut p = 0;
        while p < parts {
            // Two groups per tile call (the last one twice when the count is odd).
            let p1 = (p + 1).min(parts - 1);
            let [c0, c1] = &mut c;
            // SAFETY: A: 16 rows of 32 bytes `cols` apart from token `m0`, window of
            // group p (inside `q`, which holds `n_pad * cols` bytes); B: the groups' tiles;
            // C: 256 i32 each.
            unsafe {
                tiles::dot_i8_pair(
                    a_at(p),
                    a_at(p1),
                    a.cols,
                    panel.tiles[p].0.as_ptr() as *const i8,
                    panel.tiles[p1].0.as_ptr() as *const i8,
                    c0.0.as_mut_ptr(),
                    c1.0.as_mut_ptr(),
                );
            }
            for (ci, part) in [(&c[0], p), (&c[1], p1)]
                .into_iter()
                .take(1 + (p1 > p) as usize)
            {
                let win = window(part) * a.n_pad + m0;
                let da = &a.d[win..win + 16];
                let sa = &a.s[win..win + 16];
                // SAFETY: 16 floats each.
                let (dw, mw) = unsafe {
                    (
                        _mm512_loadu_ps(panel.dw[part].as_ptr()),
                        _mm512_loadu_ps(panel.mw[part].as_ptr()),
                    )
                };
                for m in 0..16 {
                    // SAFETY: row m of the result tile, 16 i32.
                    let sum = unsafe { _mm512_loadu_si512(ci.0.as_ptr().add(16 * m) as *const _) };
                    let scale = _mm512_mul_ps(dw, _mm512_set1_ps(da[m]));
                    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[m]);
                    if MIN {
                        acc[m] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sa[m]), acc[m]);
                    }
                }
            }
            p += 2;
        }
        // SAFETY: as this function's.
        unsafe { store_tokens(&acc, a, m0, r0, rows, out) };
    }

    /// Stores tokens `m0..` (those staged) × rows `r0..r0 + 16` (those below `rows`).
    ///
    /// # Safety
    /// AVX-512F is present; `out` holds `a.n_tok * rows` values.
    #[target_feature(enable = "avx512f")]
    unsafe fn store_tokens(
        acc: &[__m512; 16],
        a: &Staged,
        m0: usize,
        r0: usize,
        rows: usize,
        out: *mut f32,
    ) {
        let valid_rows = (rows - r0).min(16);
        let mask: __mmask16 = if valid_rows == 16 {
            0xffff
        } else {
            (1u16 << valid_rows) - 1
        };
        for (m, v) in acc
            .iter()
            .enumerate()
            .take(a.n_tok.saturating_sub(m0).min(16))
        {
            // SAFETY: token m0 + m < n_tok; columns r0..r0 + valid_rows of its row.
            unsafe { _mm512_mask_storeu_ps(out.add((m0 + m) * rows + r0), mask, *v) };
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use bytemuck::Pod;
    use std::arch::x86_64::__m256i;

    fn random<W: Pod>(seed: u64) -> W {
        let mut state = seed;
        let mut block = W::zeroed();
        for b in bytemuck::bytes_of_mut(&mut block) {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (state >> 33) as u8;
        }
        block
    }

    /// `Groups::simd` against `Groups::decode` (the scalar one) on random blocks: the same
    /// bytes in each group's window and the same scales, bit for bit.
    fn simd_equals_decode<W: Groups + Pod>(seed: u64) {
        let block: W = random(seed);
        let mut q = vec![0i8; 2 * W::BLOCK];
        let mut want_scales = vec![(0.0f32, 0.0f32); W::BLOCK / W::LEN];
        block.decode(&mut q, &mut want_scales);
        simd_gives(&block, &q, &want_scales);
    }

    /// Each row of a group of eight random blocks, decoded in place (`GroupRow`), with
    /// SIMD and without, against its block's scalar decoding.
    fn rows_equal_blocks<B: InPlaceRows + Pod>(seed: u64) {
        let blocks: [B; 8] = std::array::from_fn(|r| random(seed * 8 + r as u64));
        let mut group = <B::Group as bytemuck::Zeroable>::zeroed();
        for (r, b) in blocks.iter().enumerate() {
            b.put(&mut group, r);
        }
        for (r, b) in blocks.iter().enumerate() {
            let mut q = vec![0i8; 2 * B::BLOCK];
            let mut want_scales = vec![(0.0f32, 0.0f32); B::BLOCK / <B as Groups>::LEN];
            b.decode(&mut q, &mut want_scales);
            let row = GroupRow::<B> { g: &group, r };
            let mut got_q = vec![0i8; 2 * B::BLOCK];
            let mut got_scales = want_scales.clone();
            row.decode(&mut got_q, &mut got_scales);
            assert_eq!(got_q, q, "{} row {r}", std::any::type_name::<B>());
            // Random halves include NaNs: compared as bits.
            let bits = |v: &[(f32, f32)]| -> Vec<(u32, u32)> {
                v.iter().map(|(a, b)| (a.to_bits(), b.to_bits())).collect()
            };
            assert_eq!(bits(&got_scales), bits(&want_scales));
            simd_gives(&row, &q, &want_scales);
            // The eight rows' scales, as the second half of a panel.
            let parts = want_scales.len();
            let (mut dw, mut mw) = (vec![[f32::NAN; 16]; parts], vec![[f32::NAN; 16]; parts]);
            // SAFETY: the callers checked AVX2, F16C and AVX-512 F/BW/VL.
            unsafe { GroupRow::<B> { g: &group, r: 0 }.simd_scales8(&mut dw, &mut mw, 8) };
            let got: Vec<(f32, f32)> = (0..parts).map(|g| (dw[g][8 + r], mw[g][8 + r])).collect();
            let name = std::any::type_name::<B>();
            assert_eq!(bits(&got), bits(&want_scales), "{name} row {r} scales");
        }
    }

    /// `v.simd` gives `q` (decode's bytes) and `want_scales`, bit for bit.
    fn simd_gives<V: Groups>(v: &V, q: &[i8], want_scales: &[(f32, f32)]) {
        let name = std::any::type_name::<V>();
        let mut got: [__m256i; 16] = bytemuck::cast([[0u8; 32]; 16]);
        let mut scales = vec![(0.0f32, 0.0f32); want_scales.len()];
        // SAFETY: the callers checked AVX2, F16C and AVX-512 F/BW/VL.
        unsafe { v.simd(&mut got, &mut scales) };
        if V::FOLDED {
            // Windows of values, then each run's offset multiplier four times per word.
            let windows = V::BLOCK / 32;
            for (w, got) in got.iter().enumerate().take(windows) {
                let bytes: [i8; 32] = bytemuck::cast(*got);
                assert_eq!(bytes[..], q[32 * w..][..32], "{name} window {w}");
            }
            for j in (0..V::BLOCK / 16).filter(|_| V::HAS_MIN) {
                let bytes: [i8; 32] = bytemuck::cast(got[windows + j / 8]);
                for (i, &m) in q[V::BLOCK + 16 * j..][..16].iter().enumerate() {
                    assert_eq!(bytes[4 * (j % 8) + i % 4], m, "{name} run {j}");
                }
            }
        }
        for g in (0..want_scales.len()).filter(|_| !V::FOLDED) {
            let bytes: [i8; 32] = bytemuck::cast(got[g]);
            assert_eq!(bytes[..], q[32 * g..][..32], "{name} group {g}");
        }
        let bits = |v: &[(f32, f32)]| -> Vec<(u32, u32)> {
            v.iter().map(|(a, b)| (a.to_bits(), b.to_bits())).collect()
        };
        if !V::GROUP_SCALES {
            assert_eq!(bits(&scales), bits(want_scales), "{name} scales");
        }
    }

    #[test]
    fn simd_decoding_equals_scalar() {
        let has = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl");
        if !has {
            eprintln!("i8mat SIMD decoding not tested: no AVX-512 BW/VL on this CPU");
            return;
        }
        for seed in 0..64 {
            simd_equals_decode::<BlockQ4_0>(seed);
            simd_equals_decode::<BlockQ4_1>(seed);
            simd_equals_decode::<BlockQ5_0>(seed);
            simd_equals_decode::<BlockQ5_1>(seed);
            simd_equals_decode::<BlockQ8_0>(seed);
            simd_equals_decode::<BlockQ4K>(seed);
            simd_equals_decode::<BlockQ5K>(seed);
            simd_equals_decode::<BlockQ2K>(seed);
            simd_equals_decode::<BlockQ3K>(seed);
            simd_equals_decode::<BlockIQ4NL>(seed);
            simd_equals_decode::<BlockIQ4XS>(seed);
            rows_equal_blocks::<BlockQ4_0>(seed);
            rows_equal_blocks::<BlockQ4_1>(seed);
            rows_equal_blocks::<BlockQ5_0>(seed);
            rows_equal_blocks::<BlockIQ4NL>(seed);
            rows_equal_blocks::<BlockQ4K>(seed);
            rows_equal_blocks::<BlockQ5K>(seed);
            rows_equal_blocks::<BlockQ3K>(seed);
            rows_equal_blocks::<BlockQ2K>(seed);
            rows_equal_blocks::<BlockIQ4XS>(seed);
        }
    }
}
