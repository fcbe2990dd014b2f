//! NEON kernels (ARMv8.0 Advanced SIMD), generic over the int8 dot product so that one body
//! serves the NEON level (`smull` + `sadalp`) and the dot-product level (`sdot`).
//!
//! Weights are unpacked to signed bytes in registers (a 32-value block: two vectors; a
//! 256-value super-block: sixteen, one per 16-value group of Q8_K), then multiplied with the
//! activations' bytes. Each (row, token) sum keeps its own float accumulator, so a token's
//! result never depends on which other tokens share the product.

use crate::blocks::*;
use crate::ActBlocks;
use core::arch::aarch64::*;
use core::arch::asm;
use half::{bf16, f16};

/// Four 32-bit partial sums of `acc + a · b` over 16 byte pairs (which lane holds which
/// products differs by level; only the lanes' total is used).
pub(crate) trait I8Dot {
    /// # Safety
    /// The CPU has this level's instructions.
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t;
}

/// ARMv8.0: widening multiplies, pairwise add-accumulate.
pub(crate) struct Mull;
impl I8Dot for Mull {
    #[inline(always)]
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        // SAFETY: NEON is part of every aarch64 target.
        unsafe {
            let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
            let hi = vmull_high_s8(a, b);
            vpadalq_s16(vpadalq_s16(acc, lo), hi)
        }
    }
}

/// FEAT_DotProd: `sdot` (written as assembly: its intrinsic is not stable in Rust).
pub(crate) struct Sdot;
impl I8Dot for Sdot {
    #[inline(always)]
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let mut acc = acc;
        // SAFETY: the caller runs on a CPU with FEAT_DotProd; registers only.
        unsafe {
            asm!("sdot {0:v}.4s, {1:v}.16b, {2:v}.16b",
                 inout(vreg) acc, in(vreg) a, in(vreg) b,
                 options(pure, nomem, nostack, preserves_flags));
        }
        acc
    }
}

/// `smmla`: the 2×2 int32 product of two 2×8 byte matrices (FEAT_I8MM), added to `acc`:
/// lanes `[a0·b0, a0·b1, a1·b0, a1·b1]` where `a0` is the low 8 bytes of `a`.
///
/// # Safety
/// The CPU has FEAT_I8MM.
#[inline(always)]
pub(crate) unsafe fn smmla(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    let mut acc = acc;
    // SAFETY: the caller runs on a CPU with FEAT_I8MM; registers only.
    unsafe {
        asm!("smmla {0:v}.4s, {1:v}.16b, {2:v}.16b",
             inout(vreg) acc, in(vreg) a, in(vreg) b,
             options(pure, nomem, nostack, preserves_flags));
    }
    acc
}

/// Four f16 values (bits) widened to f32 (`fcvtl`, ARMv8.0).
#[inline(always)]
pub(crate) fn f16x4(bits: uint16x4_t) -> float32x4_t {
    let r: float32x4_t;
    // SAFETY: FCVTL is part of ARMv8.0 Advanced SIMD; registers only.
    unsafe {
        asm!("fcvtl {0:v}.4s, {1:v}.4h", out(vreg) r, in(vreg) bits,
             options(pure, nomem, nostack, preserves_flags));
    }
    r
}

/// One f16 (bits) as f32, exactly.
#[inline(always)]
pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    // SAFETY: NEON is part of every aarch64 target.
    unsafe { vgetq_lane_f32::<0>(f16x4(vdup_n_u16(bits))) }
}

#[inline(always)]
fn bits(h: f16) -> u16 {
    h.to_bits()
}

// ---------------------------------------------------------------- 32-value blocks

/// A 32-value weight block unpacked to two vectors of signed bytes (elements 0..16,
/// 16..32), with its scale and, for the types with an offset, its min.
pub(crate) trait Block32: Copy {
    const HAS_MIN: bool;
    /// # Safety
    /// NEON only (every aarch64 CPU).
    unsafe fn values(&self) -> (int8x16_t, int8x16_t);
    fn d(&self) -> u16;
    fn m(&self) -> u16 {
        0
    }
}

/// The activation blocks paired with 32-value weights (Q8_0, Q8_1).
pub(crate) trait Act32: Copy {
    fn qs(&self) -> &[i8; QK];
}
impl Act32 for BlockQ8_0 {
    #[inline(always)]
    fn qs(&self) -> &[i8; QK] {
        &self.qs
    }
}
impl Act32 for BlockQ8_1 {
    #[inline(always)]
    fn qs(&self) -> &[i8; QK] {
        &self.qs
    }
}

/// Low and high nibbles of 16 bytes.
#[inline(always)]
unsafe fn nibbles(qs: &[u8; 16]) -> (uint8x16_t, uint8x16_t) {
    // SAFETY: 16 bytes read from a 16-byte array.
    unsafe {
        let q = vld1q_u8(qs.as_ptr());
        (vandq_u8(q, vdupq_n_u8(0xF)), vshrq_n_u8::<4>(q))
    }
}

/// The fifth bits of a Q5 block as 0x10 per element (element `j` takes bit `j` of `qh`).
#[inline(always)]
unsafe fn fifth_bits(qh: [u8; 4]) -> (uint8x16_t, uint8x16_t) {
    // SAFETY: NEON register operations on local values.
    unsafe {
        let h = vreinterpretq_u8_u32(vdupq_n_u32(u32::from_le_bytes(qh)));
        const LO: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
        const HI: [u8; 16] = [2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3];
        const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
        let bit = vld1q_u8(BIT.as_ptr());
        let lo = vtstq_u8(vqtbl1q_u8(h, vld1q_u8(LO.as_ptr())), bit);
        let hi = vtstq_u8(vqtbl1q_u8(h, vld1q_u8(HI.as_ptr())), bit);
        let v = vdupq_n_u8(0x10);
        (vandq_u8(lo, v), vandq_u8(hi, v))
    }
}

impl Block32 for BlockQ4_0 {
    const HAS_MIN: bool = false;
    #[inline(always)]
    unsafe fn values(&self) -> (int8x16_t, int8x16_t) {
        // SAFETY: NEON register operations on this block's bytes.
        unsafe {
            let (lo, hi) = nibbles(&self.qs);
            let eight = vdupq_n_s8(8);
            (
                vsubq_s8(vreinterpretq_s8_u8(lo), eight),
                vsubq_s8(vreinterpretq_s8_u8(hi), eight),
            )
        }
    }
    fn d(&self) -> u16 {
        bits(self.d)
    }
}

impl Block32 for BlockQ4_1 {
    const HAS_MIN: bool = true;
    #[inline(always)]
    unsafe fn values(&self) -> (int8x16_t, int8x16_t) {
        // SAFETY: as above.
        unsafe {
            let (lo, hi) = nibbles(&self.qs);
            (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi))
        }
    }
    fn d(&self) -> u16 {
        bits(self.d)
    }
    fn m(&self) -> u16 {
        bits(self.m)
    }
}

impl Block32 for BlockQ5_0 {
    const HAS_MIN: bool = false;
    #[inline(always)]
    unsafe fn values(&self) -> (int8x16_t, int8x16_t) {
        // SAFETY: as above.
        unsafe {
            let (lo, hi) = nibbles(&self.qs);
            let (h0, h1) = fifth_bits(self.qh);
            let sixteen = vdupq_n_s8(16);
            (
                vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(lo, h0)), sixteen),
                vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(hi, h1)), sixteen),
            )
        }
    }
    fn d(&self) -> u16 {
        bits(self.d)
    }
}

impl Block32 for BlockQ5_1 {
    const HAS_MIN: bool = true;
    #[inline(always)]
    unsafe fn values(&self) -> (int8x16_t, int8x16_t) {
        // SAFETY: as above.
        unsafe {
            let (lo, hi) = nibbles(&self.qs);
            let (h0, h1) = fifth_bits(self.qh);
            (
                vreinterpretq_s8_u8(vorrq_u8(lo, h0)),
                vreinterpretq_s8_u8(vorrq_u8(hi, h1)),
            )
        }
    }
    fn d(&self) -> u16 {
        bits(self.d)
    }
    fn m(&self) -> u16 {
        bits(self.m)
    }
}

impl Block32 for BlockQ8_0 {
    const HAS_MIN: bool = false;
    #[inline(always)]
    unsafe fn values(&self) -> (int8x16_t, int8x16_t) {
        // SAFETY: 32 bytes read from this block's 32-byte array.
        unsafe {
            (
                vld1q_s8(self.qs.as_ptr()),
                vld1q_s8(self.qs.as_ptr().add(16)),
            )
        }
    }
    fn d(&self) -> u16 {
        bits(self.d)
    }
}

/// IQ4_NL/IQ4_XS nibbles through the non-linear table.
#[inline(always)]
unsafe fn iq4_lookup(qs: &[u8; 16]) -> (int8x16_t, int8x16_t) {
    // SAFETY: NEON register operations; the table is 16 bytes.
    unsafe {
        let table = vld1q_s8(KVALUES_IQ4NL.as_ptr());
        let (lo, hi) = nibbles(qs);
        (vqtbl1q_s8(table, lo), vqtbl1q_s8(table, hi))
    }
}

impl Block32 for BlockIQ4NL {
    const HAS_MIN: bool = false;
    #[inline(always)]
    unsafe fn values(&self) -> (int8x16_t, int8x16_t) {
        // SAFETY: as above.
        unsafe { iq4_lookup(&self.qs) }
    }
    fn d(&self) -> u16 {
        bits(self.d)
    }
}

/// A tile of `R` rows × `T` tokens of a 32-value product (blocks `nb` per row; rows from
/// `w`, tokens `t0..t0 + T` of `a`), written to `out[r * n_tok + t]`.
#[inline(always)]
unsafe fn tile32<W: Block32, A: Act32, D: I8Dot, const R: usize, const T: usize>(
    w: &[W],
    a: &ActBlocks<A>,
    nb: usize,
    n_tok: usize,
    t0: usize,
    out: &mut [f32],
) {
    assert!(w.len() >= R * nb && out.len() >= (R - 1) * n_tok + t0 + T);
    assert!(a.blocks.len() >= (t0 + T) * nb && a.d.len() >= (t0 + T) * nb);
    assert!(!W::HAS_MIN || a.s.len() >= (t0 + T) * nb);
    // SAFETY: every load reads a whole block checked above; NEON only (or the level `D`
    // needs, which the caller has).
    unsafe {
        let zero = vdupq_n_s32(0);
        let mut acc = [[vdupq_n_f32(0.0); T]; R];
        let mut mins = [[0f32; T]; R];
        for b in 0..nb {
            let mut act = [(vdupq_n_s8(0), vdupq_n_s8(0)); T];
            let mut da = [0f32; T];
            for t in 0..T {
                let ab = a.blocks.get_unchecked((t0 + t) * nb + b).qs();
                act[t] = (vld1q_s8(ab.as_ptr()), vld1q_s8(ab.as_ptr().add(16)));
                da[t] = *a.d.get_unchecked((t0 + t) * nb + b);
            }
            for r in 0..R {
                let wb = w.get_unchecked(r * nb + b);
                let (v0, v1) = wb.values();
                let dw = f16_to_f32(wb.d());
                for t in 0..T {
                    let s = D::dot(D::dot(zero, v0, act[t].0), v1, act[t].1);
                    acc[r][t] = vfmaq_n_f32(acc[r][t], vcvtq_f32_s32(s), dw * da[t]);
                }
                if W::HAS_MIN {
                    let m = f16_to_f32(wb.m());
                    for (t, sum) in mins[r].iter_mut().enumerate() {
                        *sum += m * *a.s.get_unchecked((t0 + t) * nb + b);
                    }
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                out[r * n_tok + t0 + t] = vaddvq_f32(acc[r][t]) + mins[r][t];
            }
        }
    }
}

/// `R` rows × every token, two tokens at a time.
#[inline(always)]
unsafe fn rows32<W: Block32, A: Act32, D: I8Dot, const R: usize>(
    w: &[W],
    a: &ActBlocks<A>,
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    let pairs = n_tok / 2 * 2;
    // SAFETY: the level `D` needs is the caller's; `tile32` checks its bounds.
    unsafe {
        for t0 in (0..pairs).step_by(2) {
            tile32::<W, A, D, R, 2>(w, a, nb, n_tok, t0, out);
        }
        if pairs < n_tok {
            tile32::<W, A, D, R, 1>(w, a, nb, n_tok, pairs, out);
        }
    }
}

/// The product of 32-value weight rows with `n_tok` tokens (`out[r * n_tok + t]`), in
/// tiles of 4 rows × 2 tokens.
///
/// # Safety
/// The CPU has the level `D` needs.
#[inline(always)]
pub(crate) unsafe fn gemm32<W: Block32, A: Act32, D: I8Dot>(
    w: &[W],
    a: &ActBlocks<A>,
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    let rows = out.len() / n_tok;
    // SAFETY: the caller's level; each tile checks its bounds.
    unsafe {
        for r0 in (0..rows).step_by(4) {
            let (w, o) = (&w[r0 * nb..], &mut out[r0 * n_tok..]);
            match rows - r0 {
                1 => rows32::<W, A, D, 1>(w, a, nb, n_tok, o),
                2 => rows32::<W, A, D, 2>(w, a, nb, n_tok, o),
                3 => rows32::<W, A, D, 3>(w, a, nb, n_tok, o),
                _ => rows32::<W, A, D, 4>(w, a, nb, n_tok, o),
            }
        }
    }
}

/// One row dotted with one token's blocks.
///
/// # Safety
/// The CPU has the level `D` needs.
#[inline(always)]
pub(crate) unsafe fn dot32<W: Block32, A: Act32, D: I8Dot>(
    w: &[W],
    a: &[A],
    d: impl Fn(&A) -> u16,
    s: impl Fn(&A) -> u16,
) -> f32 {
    let nb = w.len().min(a.len());
    let (w, a) = (&w[..nb], &a[..nb]);
    // SAFETY: the caller's level; loads read whole blocks of `w` and `a`.
    unsafe {
        let zero = vdupq_n_s32(0);
        let mut acc = vdupq_n_f32(0.0);
        let mut mins = 0f32;
        for (wb, ab) in w.iter().zip(a) {
            let (v0, v1) = wb.values();
            let q = ab.qs();
            let x = D::dot(zero, v0, vld1q_s8(q.as_ptr()));
            let x = D::dot(x, v1, vld1q_s8(q.as_ptr().add(16)));
            let scale = f16_to_f32(wb.d()) * f16_to_f32(d(ab));
            acc = vfmaq_n_f32(acc, vcvtq_f32_s32(x), scale);
            if W::HAS_MIN {
                mins += f16_to_f32(wb.m()) * f16_to_f32(s(ab));
            }
        }
        vaddvq_f32(acc) + mins
    }
}

// ---------------------------------------------------------------- super-blocks (Q8_K)

/// A 256-value super-block unpacked to 16 groups of 16 signed bytes (group `g` pairs with
/// Q8_K's `qs[16g..]` and `bsums[g]`), with its integer scales and mins.
pub(crate) trait SuperBlock: Copy {
    const HAS_MIN: bool;
    /// Scales (and mins) per 32 values (Q4_K, Q5_K, IQ4_XS), else per 16.
    const WIDE: bool;
    /// # Safety
    /// NEON only (every aarch64 CPU).
    unsafe fn values(&self, v: &mut [int8x16_t; 16]);
    /// The scales as bytes (16 per group, or 8 per pair of groups in the low half when
    /// `WIDE`) and the block's `d`.
    ///
    /// # Safety
    /// NEON only.
    unsafe fn scales(&self) -> (int8x16_t, f32);
    /// The mins (16, or 8 when `WIDE` in the low lanes) and `dmin`; zeros without mins.
    ///
    /// # Safety
    /// NEON only.
    unsafe fn mins(&self) -> (int16x8_t, int16x8_t, f32) {
        // SAFETY: NEON.
        unsafe { (vdupq_n_s16(0), vdupq_n_s16(0), 0.0) }
    }
}

/// Q4_K/Q5_K: 8 six-bit scales and 8 mins packed in 12 bytes, as ggml unpacks them with
/// three 32-bit words: `(scales, mins)` as 8 bytes each.
#[inline(always)]
fn k4_scales_mins(s: &[u8; K_SCALE_SIZE]) -> (u64, u64) {
    const M1: u32 = 0x3f3f_3f3f;
    const M2: u32 = 0x0f0f_0f0f;
    const M3: u32 = 0x0303_0303;
    let w = |i: usize| u32::from_le_bytes(s[4 * i..4 * i + 4].try_into().unwrap());
    let (u0, u1, u2) = (w(0), w(1), w(2));
    let sc_lo = u0 & M1;
    let sc_hi = (u2 & M2) | (((u0 >> 6) & M3) << 4);
    let mn_lo = u1 & M1;
    let mn_hi = ((u2 >> 4) & M2) | (((u1 >> 6) & M3) << 4);
    (
        sc_lo as u64 | (sc_hi as u64) << 32,
        mn_lo as u64 | (mn_hi as u64) << 32,
    )
}

/// 8 bytes as the low half of a vector.
#[inline(always)]
unsafe fn low8(x: u64) -> int8x16_t {
    // SAFETY: NEON register operations.
    unsafe { vreinterpretq_s8_u64(vsetq_lane_u64::<0>(x, vdupq_n_u64(0))) }
}

/// 8 unsigned bytes widened to the 8 lanes of an i16 vector.
#[inline(always)]
unsafe fn widen8(x: u64) -> int16x8_t {
    // SAFETY: NEON register operations.
    unsafe { vreinterpretq_s16_u16(vmovl_u8(vcreate_u8(x))) }
}

/// The nibbles of Q4_K/Q5_K's 128 bytes in element order: run `c` of 32 bytes holds
/// values `64c..64c + 32` in its low nibbles and the next 32 in its high ones.
#[inline(always)]
unsafe fn k4_nibbles(qs: &[u8; QK_K / 2], v: &mut [int8x16_t; 16]) {
    // SAFETY: 16-byte reads inside the 128 bytes of `qs`.
    unsafe {
        for c in 0..4 {
            for h in 0..2 {
                let q = vld1q_u8(qs.as_ptr().add(32 * c + 16 * h));
                v[4 * c + h] = vreinterpretq_s8_u8(vandq_u8(q, vdupq_n_u8(0xF)));
                v[4 * c + 2 + h] = vreinterpretq_s8_u8(vshrq_n_u8::<4>(q));
            }
        }
    }
}

/// Q4_K/Q5_K: the 8 scales (one per 32 values) and `d`.
#[inline(always)]
unsafe fn k4_scales(s: &[u8; K_SCALE_SIZE], d: f16) -> (int8x16_t, f32) {
    // SAFETY: NEON.
    unsafe { (low8(k4_scales_mins(s).0), f16_to_f32(bits(d))) }
}

/// Q4_K/Q5_K: the 8 mins and `dmin`.
#[inline(always)]
unsafe fn k4_mins(s: &[u8; K_SCALE_SIZE], dmin: f16) -> (int16x8_t, int16x8_t, f32) {
    // SAFETY: NEON.
    unsafe {
        let m = widen8(k4_scales_mins(s).1);
        (m, vdupq_n_s16(0), f16_to_f32(bits(dmin)))
    }
}

impl SuperBlock for BlockQ4K {
    const HAS_MIN: bool = true;
    const WIDE: bool = true;
    #[inline(always)]
    unsafe fn values(&self, v: &mut [int8x16_t; 16]) {
        // SAFETY: NEON.
        unsafe { k4_nibbles(&self.qs, v) }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> (int8x16_t, f32) {
        // SAFETY: NEON.
        unsafe { k4_scales(&self.scales, self.d) }
    }
    #[inline(always)]
    unsafe fn mins(&self) -> (int16x8_t, int16x8_t, f32) {
        // SAFETY: NEON.
        unsafe { k4_mins(&self.scales, self.dmin) }
    }
}

impl SuperBlock for BlockQ5K {
    const HAS_MIN: bool = true;
    const WIDE: bool = true;
    #[inline(always)]
    unsafe fn values(&self, v: &mut [int8x16_t; 16]) {
        // SAFETY: NEON; 16-byte reads inside this block's 32 bytes of high bits.
        unsafe {
            k4_nibbles(&self.qs, v);
            // Value `64c + l` takes bit `2c` of `qh[l]`, value `64c + 32 + l` bit `2c + 1`.
            let qh = [
                vld1q_u8(self.qh.as_ptr()),
                vld1q_u8(self.qh.as_ptr().add(16)),
            ];
            let sixteen = vdupq_n_u8(16);
            for c in 0..4 {
                let (b0, b1) = (vdupq_n_u8(1 << (2 * c)), vdupq_n_u8(2 << (2 * c)));
                for h in 0..2 {
                    let h0 = vandq_u8(vtstq_u8(qh[h], b0), sixteen);
                    let h1 = vandq_u8(vtstq_u8(qh[h], b1), sixteen);
                    v[4 * c + h] = vorrq_s8(v[4 * c + h], vreinterpretq_s8_u8(h0));
                    v[4 * c + 2 + h] = vorrq_s8(v[4 * c + 2 + h], vreinterpretq_s8_u8(h1));
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> (int8x16_t, f32) {
        // SAFETY: NEON.
        unsafe { k4_scales(&self.scales, self.d) }
    }
    #[inline(always)]
    unsafe fn mins(&self) -> (int16x8_t, int16x8_t, f32) {
        // SAFETY: NEON.
        unsafe { k4_mins(&self.scales, self.dmin) }
    }
}

impl SuperBlock for BlockQ6K {
    const HAS_MIN: bool = false;
    const WIDE: bool = false;
    #[inline(always)]
    unsafe fn values(&self, v: &mut [int8x16_t; 16]) {
        // SAFETY: 16-byte reads inside this block's `ql` (128) and `qh` (64) bytes.
        unsafe {
            let (m4, m3, m32) = (vdupq_n_u8(0xF), vdupq_n_u8(0x30), vdupq_n_s8(32));
            for half in 0..2 {
                for h in 0..2 {
                    let ql0 = vld1q_u8(self.ql.as_ptr().add(64 * half + 16 * h));
                    let ql1 = vld1q_u8(self.ql.as_ptr().add(64 * half + 32 + 16 * h));
                    let qh = vld1q_u8(self.qh.as_ptr().add(32 * half + 16 * h));
                    let parts = [
                        vorrq_u8(vandq_u8(ql0, m4), vandq_u8(vshlq_n_u8::<4>(qh), m3)),
                        vorrq_u8(vandq_u8(ql1, m4), vandq_u8(vshlq_n_u8::<2>(qh), m3)),
                        vorrq_u8(vshrq_n_u8::<4>(ql0), vandq_u8(qh, m3)),
                        vorrq_u8(vshrq_n_u8::<4>(ql1), vandq_u8(vshrq_n_u8::<2>(qh), m3)),
                    ];
                    for (j, p) in parts.into_iter().enumerate() {
                        v[8 * half + 2 * j + h] = vsubq_s8(vreinterpretq_s8_u8(p), m32);
                    }
                }
            }
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> (int8x16_t, f32) {
        // SAFETY: 16 bytes read from this block's 16 scales.
        unsafe { (vld1q_s8(self.scales.as_ptr()), f16_to_f32(bits(self.d))) }
    }
}

/// Q2_K/Q3_K: the 2-bit fields of 32 bytes of `qs`, four runs of 32 values.
#[inline(always)]
unsafe fn two_bits(qs: *const u8, v: &mut [int8x16_t], high: Option<&[uint8x16_t; 2]>, hbit0: u8) {
    // SAFETY: the caller passes 32 readable bytes at `qs`.
    unsafe {
        let m3 = vdupq_n_u8(3);
        let q = [vld1q_u8(qs), vld1q_u8(qs.add(16))];
        for j in 0..4 {
            for h in 0..2 {
                let x = match j {
                    0 => q[h],
                    1 => vshrq_n_u8::<2>(q[h]),
                    2 => vshrq_n_u8::<4>(q[h]),
                    _ => vshrq_n_u8::<6>(q[h]),
                };
                let x = vreinterpretq_s8_u8(vandq_u8(x, m3));
                v[2 * j + h] = match high {
                    // Q3_K: minus 4 where the value's high bit is clear.
                    Some(hm) => {
                        let set = vtstq_u8(hm[h], vdupq_n_u8(hbit0 << j));
                        let four = vreinterpretq_s8_u8(vbicq_u8(vdupq_n_u8(4), set));
                        vsubq_s8(x, four)
                    }
                    None => x,
                };
            }
        }
    }
}

impl SuperBlock for BlockQ2K {
    const HAS_MIN: bool = true;
    const WIDE: bool = false;
    #[inline(always)]
    unsafe fn values(&self, v: &mut [int8x16_t; 16]) {
        // SAFETY: two runs of 32 bytes inside this block's 64 bytes of `qs`.
        unsafe {
            two_bits(self.qs.as_ptr(), &mut v[..8], None, 0);
            two_bits(self.qs.as_ptr().add(32), &mut v[8..], None, 0);
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> (int8x16_t, f32) {
        // SAFETY: 16 bytes read from this block's 16 scale bytes.
        unsafe {
            let s = vld1q_u8(self.scales.as_ptr());
            let sc = vreinterpretq_s8_u8(vandq_u8(s, vdupq_n_u8(0xF)));
            (sc, f16_to_f32(bits(self.d)))
        }
    }
    #[inline(always)]
    unsafe fn mins(&self) -> (int16x8_t, int16x8_t, f32) {
        // SAFETY: as above.
        unsafe {
            let m = vshrq_n_u8::<4>(vld1q_u8(self.scales.as_ptr()));
            (
                vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(m))),
                vreinterpretq_s16_u16(vmovl_high_u8(m)),
                f16_to_f32(bits(self.dmin)),
            )
        }
    }
}

impl SuperBlock for BlockQ3K {
    const HAS_MIN: bool = false;
    const WIDE: bool = false;
    #[inline(always)]
    unsafe fn values(&self, v: &mut [int8x16_t; 16]) {
        // SAFETY: reads inside this block's `qs` (64) and `hmask` (32) bytes.
        unsafe {
            let hm = [
                vld1q_u8(self.hmask.as_ptr()),
                vld1q_u8(self.hmask.as_ptr().add(16)),
            ];
            two_bits(self.qs.as_ptr(), &mut v[..8], Some(&hm), 1);
            two_bits(self.qs.as_ptr().add(32), &mut v[8..], Some(&hm), 16);
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> (int8x16_t, f32) {
        // 16 six-bit scales (stored +32): low nibbles in bytes 0..8, high pairs in 8..12,
        // unpacked with 32-bit words as ggml does.
        const M1: u32 = 0x0303_0303;
        const M2: u32 = 0x0f0f_0f0f;
        let s = &self.scales;
        let w = |i: usize| u32::from_le_bytes(s[4 * i..4 * i + 4].try_into().unwrap());
        let (a0, a1, t) = (w(0), w(1), w(2));
        let words = [
            (a0 & M2) | ((t & M1) << 4),
            (a1 & M2) | (((t >> 2) & M1) << 4),
            ((a0 >> 4) & M2) | (((t >> 4) & M1) << 4),
            ((a1 >> 4) & M2) | (((t >> 6) & M1) << 4),
        ];
        // SAFETY: NEON register operations on a local array.
        unsafe {
            let v = vreinterpretq_s8_u32(vld1q_u32(words.as_ptr()));
            (vsubq_s8(v, vdupq_n_s8(32)), f16_to_f32(bits(self.d)))
        }
    }
}

impl SuperBlock for BlockIQ4XS {
    const HAS_MIN: bool = false;
    const WIDE: bool = true;
    #[inline(always)]
    unsafe fn values(&self, v: &mut [int8x16_t; 16]) {
        // SAFETY: 16-byte runs inside this block's 128 bytes of nibbles.
        unsafe {
            let table = vld1q_s8(KVALUES_IQ4NL.as_ptr());
            for ib in 0..8 {
                let q = vld1q_u8(self.qs.as_ptr().add(16 * ib));
                v[2 * ib] = vqtbl1q_s8(table, vandq_u8(q, vdupq_n_u8(0xF)));
                v[2 * ib + 1] = vqtbl1q_s8(table, vshrq_n_u8::<4>(q));
            }
        }
    }
    #[inline(always)]
    unsafe fn scales(&self) -> (int8x16_t, f32) {
        // 8 six-bit scales (stored +32): low nibbles in `scales_l`, high pairs in `scales_h`.
        const SHIFTS: [i16; 8] = [0, -2, -4, -6, -8, -10, -12, -14];
        // SAFETY: NEON register operations; 8 lanes read from a local array.
        unsafe {
            let l = vcreate_u8(u32::from_le_bytes(self.scales_l) as u64);
            let low = vzip1_u8(vand_u8(l, vdup_n_u8(0xF)), vshr_n_u8::<4>(l));
            let h = vshlq_u16(vdupq_n_u16(self.scales_h), vld1q_s16(SHIFTS.as_ptr()));
            let high = vmovn_u16(vandq_u16(h, vdupq_n_u16(3)));
            let sc = vcombine_u8(vorr_u8(low, vshl_n_u8::<4>(high)), vdup_n_u8(32));
            let sc = vsubq_s8(vreinterpretq_s8_u8(sc), vdupq_n_s8(32));
            (sc, f16_to_f32(bits(self.d)))
        }
    }
}

/// `Σ mins · bsums` (per 16 values, or per 32 when `wide`: the bsums summed in pairs).
#[inline(always)]
pub(crate) unsafe fn mins_dot(m0: int16x8_t, m1: int16x8_t, wide: bool, bsums: &[i16; 16]) -> i32 {
    // SAFETY: 8-lane reads inside a 16-element array.
    unsafe {
        let (b0, b1) = (vld1q_s16(bsums.as_ptr()), vld1q_s16(bsums.as_ptr().add(8)));
        if wide {
            let b = vpaddq_s16(b0, b1);
            let p = vmull_s16(vget_low_s16(m0), vget_low_s16(b));
            return vaddvq_s32(vmlal_high_s16(p, m0, b));
        }
        let p = vmull_s16(vget_low_s16(m0), vget_low_s16(b0));
        let p = vmlal_high_s16(p, m0, b0);
        let p = vmlal_s16(p, vget_low_s16(m1), vget_low_s16(b1));
        vaddvq_s32(vmlal_high_s16(p, m1, b1))
    }
}

/// The 16 (or 8) scales widened to 4 (or 2) vectors of 4 int32 lanes.
#[inline(always)]
pub(crate) unsafe fn widen_scales(s: int8x16_t) -> [int32x4_t; 4] {
    // SAFETY: NEON register operations.
    unsafe {
        let lo = vmovl_s8(vget_low_s8(s));
        let hi = vmovl_high_s8(s);
        [
            vmovl_s16(vget_low_s16(lo)),
            vmovl_high_s16(lo),
            vmovl_s16(vget_low_s16(hi)),
            vmovl_high_s16(hi),
        ]
    }
}

/// `acc += x · s[lane]` for a constant lane of one of the scale vectors.
macro_rules! mla_lane {
    ($acc:ident, $x:expr, $s:expr, $v:literal, $l:literal) => {
        $acc = vmlaq_laneq_s32::<$l>($acc, $x, $s[$v])
    };
}

/// One unpacked super-block dotted with one Q8_K block, as the reference sums it:
/// `d · d_a · Σ scale · dot − dmin · d_a · Σ min · bsum`.
#[inline(always)]
unsafe fn super_dot<W: SuperBlock, D: I8Dot>(
    v: &[int8x16_t; 16],
    s: &[int32x4_t; 4],
    mins: (int16x8_t, int16x8_t, f32),
    d: f32,
    a: &BlockQ8K,
) -> f32 {
    // SAFETY: 16-byte reads inside the activation block's 256 bytes; the caller's level.
    unsafe {
        let q = |g: usize| vld1q_s8(a.qs.as_ptr().add(16 * g));
        let z = vdupq_n_s32(0);
        let mut acc = vdupq_n_s32(0);
        if W::WIDE {
            let x = |k: usize| D::dot(D::dot(z, v[2 * k], q(2 * k)), v[2 * k + 1], q(2 * k + 1));
            mla_lane!(acc, x(0), s, 0, 0);
            mla_lane!(acc, x(1), s, 0, 1);
            mla_lane!(acc, x(2), s, 0, 2);
            mla_lane!(acc, x(3), s, 0, 3);
            mla_lane!(acc, x(4), s, 1, 0);
            mla_lane!(acc, x(5), s, 1, 1);
            mla_lane!(acc, x(6), s, 1, 2);
            mla_lane!(acc, x(7), s, 1, 3);
        } else {
            let x = |g: usize| D::dot(z, v[g], q(g));
            mla_lane!(acc, x(0), s, 0, 0);
            mla_lane!(acc, x(1), s, 0, 1);
            mla_lane!(acc, x(2), s, 0, 2);
            mla_lane!(acc, x(3), s, 0, 3);
            mla_lane!(acc, x(4), s, 1, 0);
            mla_lane!(acc, x(5), s, 1, 1);
            mla_lane!(acc, x(6), s, 1, 2);
            mla_lane!(acc, x(7), s, 1, 3);
            mla_lane!(acc, x(8), s, 2, 0);
            mla_lane!(acc, x(9), s, 2, 1);
            mla_lane!(acc, x(10), s, 2, 2);
            mla_lane!(acc, x(11), s, 2, 3);
            mla_lane!(acc, x(12), s, 3, 0);
            mla_lane!(acc, x(13), s, 3, 1);
            mla_lane!(acc, x(14), s, 3, 2);
            mla_lane!(acc, x(15), s, 3, 3);
        }
        let mut part = d * a.d * vaddvq_s32(acc) as f32;
        if W::HAS_MIN {
            let (m0, m1, dmin) = mins;
            part -= dmin * a.d * mins_dot(m0, m1, W::WIDE, &a.bsums) as f32;
        }
        part
    }
}

/// The product of super-block rows with `n_tok` Q8_K tokens (`out[r * n_tok + t]`): each
/// block is unpacked once and dotted with every token.
///
/// # Safety
/// The CPU has the level `D` needs.
#[inline(always)]
pub(crate) unsafe fn gemm_k<W: SuperBlock, D: I8Dot>(
    w: &[W],
    a: &[BlockQ8K],
    nb: usize,
    n_tok: usize,
    out: &mut [f32],
) {
    let rows = out.len() / n_tok;
    assert!(w.len() >= rows * nb && a.len() >= n_tok * nb);
    if n_tok == 1 {
        for (r, o) in out.iter_mut().enumerate() {
            // SAFETY: the caller's level.
            *o = unsafe { dot_k::<W, D>(&w[r * nb..(r + 1) * nb], a) };
        }
        return;
    }
    out.fill(0.0);
    let mut v = [vdupq_n_s8(0); 16];
    // SAFETY: the caller's level; blocks indexed inside the lengths checked above.
    unsafe {
        for r in 0..rows {
            for b in 0..nb {
                let wb = w.get_unchecked(r * nb + b);
                wb.values(&mut v);
                let (sc, d) = wb.scales();
                let s = widen_scales(sc);
                let mins = wb.mins();
                for t in 0..n_tok {
                    let ab = a.get_unchecked(t * nb + b);
                    *out.get_unchecked_mut(r * n_tok + t) += super_dot::<W, D>(&v, &s, mins, d, ab);
                }
            }
        }
    }
}

/// One super-block row dotted with one token.
///
/// # Safety
/// The CPU has the level `D` needs.
#[inline(always)]
pub(crate) unsafe fn dot_k<W: SuperBlock, D: I8Dot>(w: &[W], a: &[BlockQ8K]) -> f32 {
    let mut sum = 0f32;
    // SAFETY: the caller's level.
    unsafe {
        for (wb, ab) in w.iter().zip(a) {
            let mut v = [vdupq_n_s8(0); 16];
            wb.values(&mut v);
            let (sc, d) = wb.scales();
            sum += super_dot::<W, D>(&v, &widen_scales(sc), wb.mins(), d, ab);
        }
    }
    sum
}

// ---------------------------------------------------------------- activations

/// Q8_0/Q8_1 quantization of one block (bit-exact with the reference): the bytes, `d`,
/// and the sum of the bytes.
#[inline(always)]
unsafe fn quantize32(x: &[f32], qs: &mut [i8; QK]) -> (f32, i32) {
    // SAFETY: 32 floats read from `x` (checked), 32 bytes written to `qs`.
    unsafe {
        assert!(x.len() >= QK);
        let p = x.as_ptr();
        let v: [float32x4_t; 8] = std::array::from_fn(|i| vld1q_f32(p.add(4 * i)));
        // maxNum ignores NaN, as the reference's `f32::max` from 0 does (an all-NaN block
        // gets amax 0).
        let mut m = vdupq_n_f32(0.0);
        for x in &v {
            m = vmaxnmq_f32(m, vabsq_f32(*x));
        }
        let amax = vmaxnmvq_f32(m);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = vdupq_n_s32(0);
        for i in 0..4 {
            // Round half to even, as the reference's `round_ties_even`.
            let a = vcvtnq_s32_f32(vmulq_n_f32(v[2 * i], id));
            let b = vcvtnq_s32_f32(vmulq_n_f32(v[2 * i + 1], id));
            sum = vaddq_s32(sum, vaddq_s32(a, b));
            let h = vqmovn_s32(a);
            let h = vcombine_s16(h, vqmovn_s32(b));
            vst1_s8(qs.as_mut_ptr().add(8 * i), vqmovn_s16(h));
        }
        (d, vaddvq_s32(sum))
    }
}

/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn quantize_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    for (xs, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        // SAFETY: NEON.
        let (d, _) = unsafe { quantize32(xs, &mut b.qs) };
        b.d = f16::from_f32(d);
    }
}

/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn quantize_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    for (xs, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        // SAFETY: NEON.
        let (d, sum) = unsafe { quantize32(xs, &mut b.qs) };
        b.d = f16::from_f32(d);
        b.s = f16::from_f32(d * sum as f32);
    }
}

/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn quantize_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    for (xs, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let (max, amax) = crate::reference::largest_magnitude(xs);
        if amax == 0.0 {
            b.d = 0.0;
            b.qs = [0; QK_K];
            b.bsums = [0; QK_K / 16];
            continue;
        }
        let iscale = -127.0 / max;
        // SAFETY: 256 floats read from `xs`, 256 bytes written to `b.qs`.
        unsafe {
            let cap = vdupq_n_s32(127);
            for g in 0..16 {
                let mut q16 = [vdupq_n_s32(0); 4];
                for (i, q) in q16.iter_mut().enumerate() {
                    let v = vld1q_f32(xs.as_ptr().add(16 * g + 4 * i));
                    *q = vminq_s32(vcvtnq_s32_f32(vmulq_n_f32(v, iscale)), cap);
                }
                let lo = vcombine_s16(vqmovn_s32(q16[0]), vqmovn_s32(q16[1]));
                let hi = vcombine_s16(vqmovn_s32(q16[2]), vqmovn_s32(q16[3]));
                b.bsums[g] = vaddvq_s16(vaddq_s16(lo, hi));
                vst1q_s8(
                    b.qs.as_mut_ptr().add(16 * g),
                    vcombine_s8(vqmovn_s16(lo), vqmovn_s16(hi)),
                );
            }
        }
        b.d = 1.0 / iscale;
    }
}

// ---------------------------------------------------------------- floats

/// `Σ x·y` in one 4-lane accumulator (chunks of 4, then the lanes, then the tail): the
/// order [`tile_f32_4x3`] keeps, so a tile equals the dot products it replaces.
///
/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
    let n = x.len().min(y.len());
    let full = n / 4 * 4;
    // SAFETY: reads of 4 floats below `full` ≤ both lengths.
    unsafe {
        let mut acc = vdupq_n_f32(0.0);
        for i in (0..full).step_by(4) {
            acc = vfmaq_f32(
                acc,
                vld1q_f32(x.as_ptr().add(i)),
                vld1q_f32(y.as_ptr().add(i)),
            );
        }
        let mut sum = vaddvq_f32(acc);
        for i in full..n {
            sum += x[i] * y[i];
        }
        sum
    }
}

/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn tile_f32_4x3(w: &[f32], a: &[f32], cols: usize, out: &mut [f32; 12]) {
    assert!(w.len() >= 4 * cols && a.len() >= 3 * cols);
    let full = cols / 4 * 4;
    // SAFETY: reads of 4 floats below `full` inside each of the 4 rows and 3 tokens.
    unsafe {
        let mut acc = [[vdupq_n_f32(0.0); 3]; 4];
        for i in (0..full).step_by(4) {
            let x: [float32x4_t; 3] =
                std::array::from_fn(|t| vld1q_f32(a.as_ptr().add(t * cols + i)));
            for (r, acc) in acc.iter_mut().enumerate() {
                let wv = vld1q_f32(w.as_ptr().add(r * cols + i));
                for t in 0..3 {
                    acc[t] = vfmaq_f32(acc[t], wv, x[t]);
                }
            }
        }
        for r in 0..4 {
            for t in 0..3 {
                let mut sum = vaddvq_f32(acc[r][t]);
                for i in full..cols {
                    sum += w[r * cols + i] * a[t * cols + i];
                }
                out[r * 3 + t] = sum;
            }
        }
    }
}

/// 8 f16 values from `p` widened to two f32 vectors.
#[inline(always)]
unsafe fn load_f16x8(p: *const f16) -> (float32x4_t, float32x4_t) {
    // SAFETY: the caller passes 8 readable values.
    unsafe {
        let h = vld1q_u16(p as *const u16);
        (f16x4(vget_low_u16(h)), f16x4(vget_high_u16(h)))
    }
}

/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn dot_f16(x: &[f16], y: &[f16]) -> f32 {
    let n = x.len().min(y.len());
    let full = n / 8 * 8;
    // SAFETY: reads of 8 values below `full` ≤ both lengths.
    unsafe {
        let (mut a0, mut a1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        for i in (0..full).step_by(8) {
            let (x0, x1) = load_f16x8(x.as_ptr().add(i));
            let (y0, y1) = load_f16x8(y.as_ptr().add(i));
            a0 = vfmaq_f32(a0, x0, y0);
            a1 = vfmaq_f32(a1, x1, y1);
        }
        let mut sum = vaddvq_f32(vaddq_f32(a0, a1));
        for i in full..n {
            sum += x[i].to_f32() * y[i].to_f32();
        }
        sum
    }
}

/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn dot_bf16(x: &[bf16], y: &[bf16]) -> f32 {
    let n = x.len().min(y.len());
    let full = n / 8 * 8;
    // SAFETY: reads of 8 values below `full` ≤ both lengths.
    unsafe {
        let widen = |p: *const bf16| {
            let h = vld1q_u16(p as *const u16);
            (
                vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(h))),
                vreinterpretq_f32_u32(vshll_high_n_u16::<16>(h)),
            )
        };
        let (mut a0, mut a1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        for i in (0..full).step_by(8) {
            let (x0, x1) = widen(x.as_ptr().add(i));
            let (y0, y1) = widen(y.as_ptr().add(i));
            a0 = vfmaq_f32(a0, x0, y0);
            a1 = vfmaq_f32(a1, x1, y1);
        }
        let mut sum = vaddvq_f32(vaddq_f32(a0, a1));
        for i in full..n {
            sum += x[i].to_f32() * y[i].to_f32();
        }
        sum
    }
}

/// `out += w · v`.
///
/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn axpy_f32(out: &mut [f32], w: f32, v: &[f32]) {
    let n = out.len().min(v.len());
    let full = n / 4 * 4;
    // SAFETY: reads and writes of 4 values below `full` ≤ both lengths.
    unsafe {
        for i in (0..full).step_by(4) {
            let o = out.as_mut_ptr().add(i);
            vst1q_f32(
                o,
                vfmaq_n_f32(vld1q_f32(o), vld1q_f32(v.as_ptr().add(i)), w),
            );
        }
    }
    for i in full..n {
        out[i] += w * v[i];
    }
}

/// 16 signed bytes to f32 times `d`, stored at `o[..16]`.
///
/// # Safety
/// NEON only; `o` valid for 16 floats.
unsafe fn store_scaled_i8x16(q: int8x16_t, d: f32, o: *mut f32) {
    // SAFETY: our caller guarantees `o[..16]`.
    unsafe {
        for (k, h) in [vmovl_s8(vget_low_s8(q)), vmovl_s8(vget_high_s8(q))]
            .into_iter()
            .enumerate()
        {
            let lo = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h)));
            let hi = vcvtq_f32_s32(vmovl_s16(vget_high_s16(h)));
            vst1q_f32(o.add(8 * k), vmulq_n_f32(lo, d));
            vst1q_f32(o.add(8 * k + 4), vmulq_n_f32(hi, d));
        }
    }
}

/// Q8_0 blocks to f32: `q · d` per value, as the reference computes it.
///
/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn dequantize_q8_0(x: &[BlockQ8_0], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        // SAFETY: the block's 32 bytes read, 32 floats of `ys` written.
        unsafe {
            store_scaled_i8x16(vld1q_s8(b.qs.as_ptr()), d, ys.as_mut_ptr());
            store_scaled_i8x16(vld1q_s8(b.qs.as_ptr().add(16)), d, ys.as_mut_ptr().add(16));
        }
    }
}

/// Q4_0 blocks to f32: `(nibble - 8) · d`, low nibbles first, as the reference computes it.
///
/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn dequantize_q4_0(x: &[BlockQ4_0], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        // SAFETY: the block's 16 bytes read, 32 floats of `ys` written.
        unsafe {
            let bytes = vld1q_u8(b.qs.as_ptr());
            let eight = vdupq_n_s8(8);
            let lo = vsubq_s8(
                vreinterpretq_s8_u8(vandq_u8(bytes, vdupq_n_u8(0x0F))),
                eight,
            );
            let hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(bytes, 4)), eight);
            store_scaled_i8x16(lo, d, ys.as_mut_ptr());
            store_scaled_i8x16(hi, d, ys.as_mut_ptr().add(16));
        }
    }
}

/// `out += w · v` with `v` in f16.
///
/// # Safety
/// NEON only (every aarch64 CPU).
pub(crate) unsafe fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
    let n = out.len().min(v.len());
    let full = n / 8 * 8;
    // SAFETY: reads and writes of 8 values below `full` ≤ both lengths.
    unsafe {
        for i in (0..full).step_by(8) {
            let (v0, v1) = load_f16x8(v.as_ptr().add(i));
            let o = out.as_mut_ptr().add(i);
            vst1q_f32(o, vfmaq_n_f32(vld1q_f32(o), v0, w));
            vst1q_f32(o.add(4), vfmaq_n_f32(vld1q_f32(o.add(4)), v1, w));
        }
    }
    for i in full..n {
        out[i] += w * v[i].to_f32();
    }
}
