//! AVX2 products of prompt tokens for the 32-value block types, on 8-row panels
//! interleaved on the fly (as `panel` does at AVX-512 with 16 rows): each 32 bytes of the
//! buffer hold 4 consecutive values of 8 rows, and `vpmaddubsw` of such a vector with a
//! token's 4 activation bytes broadcast gives 2 pair sums per row. Those i16 sums add up
//! over several groups of 4 values before widening where they cannot overflow (4-bit
//! values: a whole block, 2 · 8 · 15 · 127 < 2¹⁵; 5-bit: half a block), so a block costs
//! per token and 8 rows 8 `vpmaddubsw`, a few i16 adds, one or two `vpmaddwd`, one
//! conversion and two FMAs. Q8_0 and IQ4_NL (offset 128) hold their signed values and take
//! the sign trick per group.
//!
//! Each (row, token) goes through the same operations whatever the batch's other tokens.
#![allow(clippy::missing_safety_doc)] // callers must have detected AVX2, FMA and F16C

use super::panel::BlockRows;
use super::vnni::{Signed32, Unsigned32};
use crate::ActBlocks;
use std::arch::x86_64::*;

/// Rows per panel (one 8-lane vector), blocks per chunk (the buffer stays in L1), tokens
/// per tile (their accumulators stay in registers).
const PANEL: usize = 8;
const CHUNK: usize = 16;
const TOKENS: usize = 4;

/// One chunk of a panel: per block, 8 × 32 bytes (4 values of each of the 8 rows), the
/// rows' `dw` and `mw`.
#[repr(C, align(32))]
struct Packed {
    u: [[[u8; 32]; 8]; CHUNK],
    dw: [[f32; PANEL]; CHUNK],
    mw: [[f32; PANEL]; CHUNK],
}

/// Whether `W`'s bytes are signed values (offset 128): the sign trick, no `mw`.
const fn signed<W: Unsigned32>() -> bool {
    W::BITS == 8
}

/// Stores 8 vectors at `dst`: vector g holds dword g of the 32 bytes `row(i)` of each of 8
/// rows, in row order (the panels' layout, 4 values of every row per 32 bytes): an 8 × 8
/// transpose of dwords, 24 shuffles where 64 scalar stores were.
#[inline(always)]
pub(super) unsafe fn store_groups(dst: *mut __m256i, row: impl Fn(usize) -> __m256i) {
    // SAFETY: the caller vouches for 8 × 32 writable bytes at `dst` and for AVX2.
    unsafe {
        let v: [__m256i; 8] = std::array::from_fn(row);
        let t: [__m256i; 8] = std::array::from_fn(|j| {
            let (a, b) = (v[j / 2 * 2], v[j / 2 * 2 + 1]);
            if j % 2 == 0 {
                _mm256_unpacklo_epi32(a, b)
            } else {
                _mm256_unpackhi_epi32(a, b)
            }
        });
        // tt[g] holds dword g (low 128 bits) and g + 4 (high) of rows 0–3, tt[g + 4] the
        // same of rows 4–7.
        let tt: [__m256i; 8] = std::array::from_fn(|j| {
            let (q, g) = (j / 4, j % 4);
            let (a, b) = (t[4 * q + g / 2], t[4 * q + g / 2 + 2]);
            if g % 2 == 0 {
                _mm256_unpacklo_epi64(a, b)
            } else {
                _mm256_unpackhi_epi64(a, b)
            }
        });
        for g in 0..4 {
            let (a, b) = (tt[g], tt[g + 4]);
            _mm256_storeu_si256(dst.add(g), _mm256_permute2x128_si256::<0x20>(a, b));
            _mm256_storeu_si256(dst.add(g + 4), _mm256_permute2x128_si256::<0x31>(a, b));
        }
    }
}

/// Puts blocks `c0..c0 + nc` of panel rows `r0..r0 + nr` (of `w`, `nb` per row) into `p`;
/// rows past `nr` are zero.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn pack<R: BlockRows>(
    w: R,
    nb: usize,
    r0: usize,
    nr: usize,
    c0: usize,
    nc: usize,
    p: &mut Packed,
) {
    assert!(nr <= PANEL && nc <= CHUNK && w.holds(nb, r0 + nr) && c0 + nc <= nb);
    for k in 0..nc {
        w.prefetch_group(nb, r0, c0 + k + CHUNK);
        let mut d = [0u16; PANEL];
        let mut m = [0u16; PANEL];
        // SAFETY: AVX2 is enabled; `bytes` and the scale reads are of the block copy
        // `w.block` returns (bounds-checked), and every block type here starts with its f16
        // `d` (Q4_1, Q5_1: then `m`). The stores are the 8 32-byte groups of `p.u[k]`.
        unsafe {
            let row = |i: usize| {
                if i < nr {
                    let blk = w.block(nb, r0 + i, c0 + k);
                    if signed::<R::Block>() {
                        blk.signed_bytes()
                    } else {
                        blk.bytes()
                    }
                } else {
                    _mm256_setzero_si256()
                }
            };
            store_groups(p.u[k].as_mut_ptr() as *mut __m256i, row);
            for i in 0..nr {
                let blk = w.block(nb, r0 + i, c0 + k);
                let h = &blk as *const R::Block as *const u16;
                d[i] = h.read_unaligned();
                if R::Block::HAS_M {
                    m[i] = h.add(1).read_unaligned();
                }
            }
        }
        // SAFETY: 16-byte loads of the arrays, 32-byte stores into the aligned rows.
        unsafe {
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr() as *const __m128i));
            let mw = if R::Block::HAS_M {
                _mm256_cvtph_ps(_mm_loadu_si128(m.as_ptr() as *const __m128i))
            } else {
                _mm256_mul_ps(dw, _mm256_set1_ps(-R::Block::OFFSET))
            };
            _mm256_store_ps(p.dw[k].as_mut_ptr(), dw);
            _mm256_store_ps(p.mw[k].as_mut_ptr(), mw);
        }
    }
}

/// `T` tokens from `t0` against the packed chunk (blocks `c0..c0 + nc`), added into
/// `acc[t]` (8 rows each).
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn tokens<W: Unsigned32, A: Signed32, const T: usize>(
    p: &Packed,
    a: &ActBlocks<A>,
    nb: usize,
    t0: usize,
    c0: usize,
    nc: usize,
    acc: &mut [[f32; PANEL]],
) {
    assert!(a.blocks.len() >= (t0 + T) * nb && a.d.len() >= (t0 + T) * nb);
    assert!(a.s.len() >= (t0 + T) * nb && acc.len() >= t0 + T && c0 + nc <= nb);
    let is_signed = signed::<W>();
    // Groups of 4 values whose i16 pair sums add up before widening.
    let run = match W::BITS {
        4 => 8,
        5 => 4,
        _ => 1,
    };
    let ones = _mm256_set1_epi16(1);
    // SAFETY (whole body): block indices `(t0 + t) * nb + c0 + k` with `t < T`, `k < nc`
    // are inside the activations (asserted); the packed loads are aligned and inside `p`;
    // `acc[t0 + t]` holds 8 floats.
    unsafe {
        let mut sum: [__m256; T] = std::array::from_fn(|t| _mm256_loadu_ps(acc[t0 + t].as_ptr()));
        for k in 0..nc {
            let q: [&[i8; 32]; T] =
                std::array::from_fn(|t| a.blocks.get_unchecked((t0 + t) * nb + c0 + k).qs());
            let mut isum = [_mm256_setzero_si256(); T];
            for g0 in (0..8).step_by(run) {
                let mut pairs = [_mm256_setzero_si256(); T];
                for g in g0..g0 + run {
                    let u = _mm256_load_si256(p.u[k][g].as_ptr() as *const __m256i);
                    let x = if is_signed { _mm256_sign_epi8(u, u) } else { u };
                    for t in 0..T {
                        let y = _mm256_set1_epi32(
                            (q[t].as_ptr().add(4 * g) as *const i32).read_unaligned(),
                        );
                        let y = if is_signed { _mm256_sign_epi8(y, u) } else { y };
                        pairs[t] = _mm256_add_epi16(pairs[t], _mm256_maddubs_epi16(x, y));
                    }
                }
                for t in 0..T {
                    isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(pairs[t], ones));
                }
            }
            let dw = _mm256_load_ps(p.dw[k].as_ptr());
            let mw = _mm256_load_ps(p.mw[k].as_ptr());
            for t in 0..T {
                let i = (t0 + t) * nb + c0 + k;
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(*a.d.get_unchecked(i)));
                sum[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), scale, sum[t]);
                if !is_signed {
                    sum[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(*a.s.get_unchecked(i)), sum[t]);
                }
            }
        }
        for (t, sum) in sum.iter().enumerate() {
            _mm256_storeu_ps(acc[t0 + t].as_mut_ptr(), *sum);
        }
    }
}

/// The panel steps over one matrix and its activations.
struct Steps<'a, R, A> {
    w: R,
    a: &'a ActBlocks<'a, A>,
    nb: usize,
    p: Packed,
}

impl<R: BlockRows, A: Signed32> super::PanelSteps<PANEL> for Steps<'_, R, A> {
    const CHUNK: usize = CHUNK;
    const TOKENS: usize = TOKENS;
    fn pack(&mut self, r0: usize, nr: usize, c0: usize, nc: usize) {
        // SAFETY: `Steps` is only built by `gemm`, whose caller detected the features;
        // `pack` asserts its bounds.
        unsafe { pack(self.w, self.nb, r0, nr, c0, nc, &mut self.p) }
    }
    fn tokens(&mut self, t: usize, one: bool, c0: usize, nc: usize, acc: &mut [[f32; PANEL]]) {
        let (p, a, nb) = (&self.p, self.a, self.nb);
        // SAFETY: as above; `tokens` asserts its bounds.
        unsafe {
            if one {
                tokens::<R::Block, A, 1>(p, a, nb, t, c0, nc, acc)
            } else {
                tokens::<R::Block, A, TOKENS>(p, a, nb, t, c0, nc, acc)
            }
        }
    }
}

/// All rows of `w` (`out.width()`, `nb` blocks each) against every token of `a`, into
/// each token's columns of `out`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm<R: BlockRows, A: Signed32>(
    w: R,
    a: &ActBlocks<A>,
    nb: usize,
    out: &mut crate::pool::Columns,
) {
    let p = Packed {
        u: [[[0; 32]; 8]; CHUNK],
        dw: [[0.0; PANEL]; CHUNK],
        mw: [[0.0; PANEL]; CHUNK],
    };
    super::prompt_panels(&mut Steps { w, a, nb, p }, nb, out);
}
