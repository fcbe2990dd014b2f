//! The super-block types (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS) in one common unpacked
//! form, which the prompt panels (`kpanel`, `kpanel_avx2`) interleave: 256 unsigned bytes
//! `u`, and per group `g` of 16 values a scale `s_g` and a correction `c_g`, such that for
//! Q8_K activations `a = d_a · q`:
//! `Σ w·a = d_a · (Σ_g s_g · Σ_{i∈g} u_i·q_i − Σ_g c_g · bsum_g)`.
//! Q2_K, Q4_K, Q5_K: `u` is the stored value and `c` the scaled mins. Q3_K, Q6_K, IQ4_XS
//! store signed values, held as `u = value + offset` (offset 4, 32, 128), so
//! `c_g = s_g · offset`. (Decoding reads the blocks directly: `kquant` tiles for Q3_K to
//! Q6_K and IQ4_XS, the AVX2 dot products for Q2_K, or the grouped rows of `grouped`.)
#![allow(clippy::missing_safety_doc)] // callers must have detected the features listed

use super::avx2::{h2f, nibbles_32};
use crate::blocks::*;
use std::arch::x86_64::*;

/// A super-block's group scales as integers: per 16-value group `g`, `s_g = d · v_g` and
/// `c_g = e · w_g` (`v`, `w`: 16 signed bytes, byte g = group g).
pub struct IntScales {
    pub v: __m128i,
    pub d: f32,
    pub w: __m128i,
    pub e: f32,
}

/// A super-block type in the unpacked form.
pub trait Unpack: Copy {
    /// Whether `u − 128` is the signed value (IQ4_XS), the offset the AVX2 form undoes.
    const OFFSET_128: bool = false;
    /// The largest value `u` can hold.
    const MAX_VALUE: u32;
    /// Whether each scale covers 32 values (two 16-value groups with the same `s_g`: Q4_K,
    /// Q5_K, IQ4_XS), so a product can sum 32 values before scaling.
    const SCALE_PER_32: bool = false;
    /// Writes the block's 256 values `u` (AVX2 enabled by every caller).
    unsafe fn values(&self, u: &mut [u8; QK_K]);
    /// The block's group scales and corrections (AVX2 enabled by every caller).
    unsafe fn scales(&self) -> IntScales;
}

/// Where a prompt panel's super-blocks come from: rows in the file's layout (`&[W]`), or
/// Q4_K/Q5_K/IQ4_XS rows grouped eight at a time at load ([`GroupedRows`]), read where
/// they are (no copy back to the file's layout).
pub trait Rows: Copy {
    type Block: Unpack;
    /// Super-block `c` of row `row` (`nb` per row); panics past the rows.
    fn block(self, nb: usize, row: usize, c: usize) -> Self::Block;
    /// Asks the caches for super-block `c` of row `row` ahead of its use; nothing past the
    /// rows.
    fn prefetch(self, nb: usize, row: usize, c: usize);
}

impl<'a, W: Unpack> Rows for &'a [W] {
    type Block = &'a W;
    #[inline(always)]
    fn block(self, nb: usize, row: usize, c: usize) -> &'a W {
        &self[row * nb + c]
    }
    #[inline(always)]
    fn prefetch(self, nb: usize, row: usize, c: usize) {
        if let Some(b) = self.get(row * nb + c) {
            super::avx2::prefetch((b as *const W).cast(), std::mem::size_of::<W>());
        }
    }
}

impl<W: Unpack> Unpack for &W {
    const OFFSET_128: bool = W::OFFSET_128;
    const MAX_VALUE: u32 = W::MAX_VALUE;
    const SCALE_PER_32: bool = W::SCALE_PER_32;
    #[inline(always)]
    unsafe fn values(&self, u: &mut [u8; QK_K]) {
        // SAFETY: the caller's features, passed on.
        unsafe { (**self).values(u) }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> IntScales {
        // SAFETY: as above.
        unsafe { (**self).scales() }
    }
}

/// Q4_K, Q5_K, IQ4_XS, Q3_K or Q2_K rows grouped at load (`nb` [`Q4K8`], [`Q5K8`],
/// [`IQ4XS8`], [`Q3K8`] or [`Q2K8`] per group of eight rows).
#[derive(Clone, Copy)]
pub struct GroupedRows<'a, G>(pub &'a [G]);

/// Row `r` (of eight) of one grouped super-block.
#[derive(Clone, Copy)]
pub struct GroupRow<'a, G> {
    g: &'a G,
    r: usize,
}

impl<'a, G: Copy> Rows for GroupedRows<'a, G>
where
    GroupRow<'a, G>: Unpack,
{
    type Block = GroupRow<'a, G>;
    #[inline(always)]
    fn block(self, nb: usize, row: usize, c: usize) -> GroupRow<'a, G> {
        GroupRow {
            g: &self.0[row / 8 * nb + c],
            r: row % 8,
        }
    }
    /// Nothing: a group's super-blocks are one stream per eight rows, which the hardware
    /// prefetcher follows (fetching them here measured no faster on Zen 4).
    #[inline(always)]
    fn prefetch(self, _nb: usize, _row: usize, _c: usize) {}
}

impl<G: KGroup> Unpack for GroupRow<'_, G> {
    const SCALE_PER_32: bool = true;
    const MAX_VALUE: u32 = G::MAX_VALUE;
    /// As [`BlockQ4K`]'s and [`BlockQ5K`]'s: the row's 16-byte runs are the file's `qs` in
    /// order, its two halves of fifth bits the file's `qh`.
    #[inline(always)]
    unsafe fn values(&self, u: &mut [u8; QK_K]) {
        let (g, r) = (self.g.low(), self.r);
        // SAFETY: 16-byte loads of runs `2·chunk` and `2·chunk + 1` of row `r < 8`, and of
        // both halves of its fifth bits; AVX2 enabled by the caller.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            let bit4 = _mm256_set1_epi8(0x10);
            let qh = self.g.qh().map(|qh| {
                _mm256_loadu2_m128i(
                    qh[1][r].as_ptr() as *const __m128i,
                    qh[0][r].as_ptr() as *const __m128i,
                )
            });
            for chunk in 0..4 {
                let q = _mm256_loadu2_m128i(
                    g.qs[2 * chunk + 1][r].as_ptr() as *const __m128i,
                    g.qs[2 * chunk][r].as_ptr() as *const __m128i,
                );
                let mut lo = _mm256_and_si256(q, low);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
                if let Some(qh) = qh {
                    // Bit 2·chunk of a byte is 16 in a low value, the next bit in a high one.
                    let bits = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * chunk as i32));
                    let (l, h) = (_mm256_slli_epi16(bits, 4), _mm256_slli_epi16(bits, 3));
                    lo = _mm256_or_si256(lo, _mm256_and_si256(l, bit4));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(h, bit4));
                }
                store32(u, 64 * chunk, lo);
                store32(u, 64 * chunk + 32, hi);
            }
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> IntScales {
        let (g, r) = (self.g.low(), self.r);
        let sc = u64::from_le_bytes(std::array::from_fn(|j| g.scales[j][r]));
        let mins = u64::from_le_bytes(g.mins[r]);
        // SAFETY: register operations only (SSE2, baseline).
        unsafe {
            IntScales {
                v: twice(sc),
                d: h2f(g.d[r]),
                w: twice(mins),
                e: h2f(g.dmin[r]),
            }
        }
    }
}

impl Unpack for GroupRow<'_, IQ4XS8> {
    const SCALE_PER_32: bool = true;
    const MAX_VALUE: u32 = 255;
    const OFFSET_128: bool = true;
    /// As [`BlockIQ4XS`]'s: the row's 16-byte runs are the file's `qs` in order.
    #[inline(always)]
    unsafe fn values(&self, u: &mut [u8; QK_K]) {
        // SAFETY: AVX2 enabled by the caller.
        unsafe { iq4xs_values(|j| &self.g.qs[j][self.r], u) }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> IntScales {
        let (g, r) = (self.g, self.r);
        let sc = u64::from_le_bytes(std::array::from_fn(|j| g.scales[j][r] as u8));
        iq4xs_int_scales(sc, h2f(g.d[r]))
    }
}

impl Unpack for GroupRow<'_, Q3K8> {
    const MAX_VALUE: u32 = 7;
    /// As [`BlockQ3K`]'s, from the row's block put back together (a 110-byte copy, small
    /// against the unpacking).
    #[inline(always)]
    unsafe fn values(&self, u: &mut [u8; QK_K]) {
        // SAFETY: AVX2 enabled by the caller.
        unsafe { BlockQ3K::take(self.g, self.r).values(u) }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> IntScales {
        // SAFETY: AVX2 enabled by the caller.
        unsafe { BlockQ3K::take(self.g, self.r).scales() }
    }
}

impl Unpack for GroupRow<'_, Q2K8> {
    const MAX_VALUE: u32 = 3;
    /// As [`BlockQ2K`]'s, from the row's block put back together (an 84-byte copy, small
    /// against the unpacking).
    #[inline(always)]
    unsafe fn values(&self, u: &mut [u8; QK_K]) {
        // SAFETY: AVX2 enabled by the caller.
        unsafe { BlockQ2K::take(self.g, self.r).values(u) }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> IntScales {
        // SAFETY: AVX2 enabled by the caller.
        unsafe { BlockQ2K::take(self.g, self.r).scales() }
    }
}

/// IQ4_XS's 256 values as `u` (table value plus 128) from its eight 16-byte runs of
/// nibbles (`run(j)`: sub-block `j`'s, low nibbles its values 0..16, high 16..32).
#[inline(always)]
unsafe fn iq4xs_values<'r>(run: impl Fn(usize) -> &'r [u8; 16], u: &mut [u8; QK_K]) {
    // SAFETY: a 16-byte read of the table; AVX2 enabled by the caller.
    unsafe {
        let t = _mm_loadu_si128(KVALUES_IQ4NL.as_ptr() as *const __m128i);
        let t = _mm_xor_si128(t, _mm_set1_epi8(0x80u8 as i8)); // kv + 128
        let table = _mm256_set_m128i(t, t);
        for j in 0..8 {
            let idx = nibbles_32(run(j));
            store32(u, 32 * j, _mm256_shuffle_epi8(table, idx));
        }
    }
}

/// IQ4_XS's scales (`sc`: one signed byte per 32 values, the scale minus 32) in the
/// unpacked form, whose values carry the offset 128.
#[inline(always)]
fn iq4xs_int_scales(sc: u64, d: f32) -> IntScales {
    // SAFETY: register operations only (SSE2, baseline).
    let sc = unsafe { twice(sc) };
    IntScales {
        v: sc,
        d,
        w: sc,
        e: 128.0 * d,
    }
}

#[inline(always)]
unsafe fn store32(out: &mut [u8; QK_K], at: usize, v: __m256i) {
    assert!(at + 32 <= QK_K);
    // SAFETY: 32 bytes at `at`, inside `out` (asserted).
    unsafe { _mm256_storeu_si256(out.as_mut_ptr().add(at) as *mut __m256i, v) }
}

/// 8 bytes (one per 32-value group) as 16, each twice (one per 16-value group).
#[inline(always)]
unsafe fn twice(x: u64) -> __m128i {
    // SAFETY: register operations only (SSE2, baseline on x86-64).
    unsafe {
        let v = _mm_cvtsi64_si128(x as i64);
        _mm_unpacklo_epi8(v, v)
    }
}

impl Unpack for BlockQ2K {
    const MAX_VALUE: u32 = 3;
    #[inline(always)]
    unsafe fn values(&self, u: &mut [u8; QK_K]) {
        // SAFETY: 32-byte loads inside the 64-byte qs; AVX2 enabled by the caller.
        unsafe {
            let m3 = _mm256_set1_epi8(3);
            for half in 0..2 {
                let q = _mm256_loadu_si256(self.qs.as_ptr().add(32 * half) as *const __m256i);
                for j in 0..4 {
                    let v = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * j)), m3);
                    store32(u, 128 * half + 32 * j as usize, v);
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> IntScales {
        // SAFETY: a 16-byte load of the 16-byte scales; SSE2 is baseline.
        unsafe {
            let b = _mm_loadu_si128(self.scales.as_ptr() as *const __m128i);
            let low4 = _mm_set1_epi8(0x0F);
            let (sc, m) = (
                _mm_and_si128(b, low4),
                _mm_and_si128(_mm_srli_epi16(b, 4), low4),
            );
            IntScales {
                v: sc,
                d: h2f(self.d),
                w: m,
                e: h2f(self.dmin),
            }
        }
    }
}

impl Unpack for BlockQ3K {
    const MAX_VALUE: u32 = 7;
    #[inline(always)]
    unsafe fn values(&self, u: &mut [u8; QK_K]) {
        // SAFETY: 32-byte loads inside qs (64) and hmask (32); AVX2 enabled by the caller.
        unsafe {
            let m3 = _mm256_set1_epi8(3);
            let four = _mm256_set1_epi8(4);
            let hm = _mm256_loadu_si256(self.hmask.as_ptr() as *const __m256i);
            for half in 0..2 {
                let q = _mm256_loadu_si256(self.qs.as_ptr().add(32 * half) as *const __m256i);
                for j in 0..4 {
                    let low = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * j)), m3);
                    let bit = _mm256_set1_epi8((1u8 << (4 * half as i32 + j)) as i8);
                    let set = _mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit);
                    // u = value + 4: the low bits, plus 4 where the high bit is set.
                    let v = _mm256_or_si256(low, _mm256_and_si256(set, four));
                    store32(u, 128 * half + 32 * j as usize, v);
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> IntScales {
        // SAFETY: AVX2 enabled by the caller.
        unsafe {
            let scales = super::avx2::q3k_scales(self);
            let d = h2f(self.d);
            IntScales {
                v: scales,
                d,
                w: scales,
                e: 4.0 * d,
            }
        }
    }
}

impl Unpack for BlockQ5K {
    const SCALE_PER_32: bool = true;
    const MAX_VALUE: u32 = 31;
    #[inline(always)]
    unsafe fn values(&self, u: &mut [u8; QK_K]) {
        // SAFETY: 32-byte loads inside qs (128) and qh (32); AVX2 enabled by the caller.
        unsafe {
            let qh = _mm256_loadu_si256(self.qh.as_ptr() as *const __m256i);
            for chunk in 0..4 {
                let q = _mm256_loadu_si256(self.qs.as_ptr().add(32 * chunk) as *const __m256i);
                let (w1, w2) = super::avx2::q5k_chunk(q, qh, chunk);
                store32(u, 64 * chunk, w1);
                store32(u, 64 * chunk + 32, w2);
            }
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> IntScales {
        k4_scales(&self.scales, h2f(self.d), h2f(self.dmin))
    }
}

/// Q4_K's and Q5_K's scales and mins (6 bits each, per 32 values), per 16 values.
#[inline(always)]
fn k4_scales(scales: &[u8; K_SCALE_SIZE], d: f32, dmin: f32) -> IntScales {
    let (sc, m) = super::kquant::q4k_scales_mins(scales);
    // SAFETY: register operations only (SSE2, baseline).
    unsafe {
        IntScales {
            v: twice(sc),
            d,
            w: twice(m),
            e: dmin,
        }
    }
}

/// IQ4_XS's 8 six-bit scales minus 32, one signed byte each (as
/// `reference::iq4xs_scales`, with word operations instead of a loop).
#[inline(always)]
pub(crate) fn iq4xs_scale_bytes(b: &BlockIQ4XS) -> u64 {
    // Low nibbles: byte i of scales_l holds groups 2i (low) and 2i + 1 (high).
    let x = u32::from_le_bytes(b.scales_l) as u64;
    let x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
    let x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
    let low = (x & 0x000f_000f_000f_000f) | (((x >> 4) & 0x000f_000f_000f_000f) << 8);
    // High bits: 2 per group in scales_h.
    let h = b.scales_h as u64;
    let h = (h | (h << 24)) & 0x0000_00ff_0000_00ff;
    let h = (h | (h << 12)) & 0x000f_000f_000f_000f;
    let h = (h | (h << 6)) & 0x0303_0303_0303_0303;
    // Each byte is 0..64 before subtracting 32: per-byte subtraction without borrows.
    let biased = low | (h << 4);
    (biased | 0x8080_8080_8080_8080).wrapping_sub(0x2020_2020_2020_2020) ^ 0x8080_8080_8080_8080
}

impl Unpack for BlockIQ4XS {
    const SCALE_PER_32: bool = true;
    const MAX_VALUE: u32 = 255;
    const OFFSET_128: bool = true;
    #[inline(always)]
    unsafe fn values(&self, u: &mut [u8; QK_K]) {
        let run = |j: usize| -> &[u8; 16] { self.qs[16 * j..16 * j + 16].try_into().unwrap() };
        // SAFETY: AVX2 enabled by the caller.
        unsafe { iq4xs_values(run, u) }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> IntScales {
        iq4xs_int_scales(iq4xs_scale_bytes(self), h2f(self.d))
    }
}

impl Unpack for BlockQ4K {
    const SCALE_PER_32: bool = true;
    const MAX_VALUE: u32 = 15;
    #[inline(always)]
    unsafe fn values(&self, u: &mut [u8; QK_K]) {
        // SAFETY: 32-byte loads inside the 128-byte qs; AVX2 enabled by the caller.
        unsafe {
            let low = _mm256_set1_epi8(0x0F);
            for chunk in 0..4 {
                let q = _mm256_loadu_si256(self.qs.as_ptr().add(32 * chunk) as *const __m256i);
                store32(u, 64 * chunk, _mm256_and_si256(q, low));
                store32(
                    u,
                    64 * chunk + 32,
                    _mm256_and_si256(_mm256_srli_epi16(q, 4), low),
                );
            }
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> IntScales {
        k4_scales(&self.scales, h2f(self.d), h2f(self.dmin))
    }
}

impl Unpack for BlockQ6K {
    const MAX_VALUE: u32 = 63;
    #[inline(always)]
    unsafe fn values(&self, u: &mut [u8; QK_K]) {
        // SAFETY: AVX2 enabled by the caller.
        unsafe {
            for half in 0..2 {
                for (k, v) in super::avx2::q6k_half(self, half).into_iter().enumerate() {
                    store32(u, 128 * half + 32 * k, v);
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> IntScales {
        // SAFETY: a 16-byte load of the 16-byte scales; SSE2 is baseline.
        let sc = unsafe { _mm_loadu_si128(self.scales.as_ptr() as *const __m128i) };
        let d = h2f(self.d);
        IntScales {
            v: sc,
            d,
            w: sc,
            e: 32.0 * d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytemuck::Zeroable;

    #[test]
    fn iq4xs_scale_bytes_match_the_reference() {
        for seed in 0u32..2000 {
            let mut b = BlockIQ4XS::zeroed();
            let r = seed.wrapping_mul(2_654_435_761);
            b.scales_h = (r >> 7) as u16;
            b.scales_l = r.to_le_bytes();
            let want = crate::reference::iq4xs_scales(&b);
            let got = iq4xs_scale_bytes(&b).to_le_bytes().map(|x| x as i8);
            assert_eq!(
                got, want,
                "scales_h {:#x} scales_l {:?}",
                b.scales_h, b.scales_l
            );
        }
    }
}
