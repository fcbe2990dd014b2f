//! AVX-512 VNNI products of prompt tokens for the 32-value block types, on 16-row panels
//! interleaved on the fly (the idea of ggml's repacked layouts, without a second copy of the
//! weights): a panel's blocks are put, a chunk at a time, in a buffer where each 64 bytes
//! hold 4 consecutive values of 16 rows. One `vpdpbusd` of such a vector with a token's 4
//! activation bytes broadcast then adds 4 products to each of the 16 rows, so a block costs
//! per token 8 `vpdpbusd` into one i32 vector for 16 rows, one conversion and two FMAs
//! (`dw · da` and `mw · sa`, see `vnni::Unsigned32`), instead of that per row.
//!
//! Each (row, token) goes through the same operations whatever the batch's other tokens.
#![allow(clippy::missing_safety_doc)] // callers must have detected the features listed

use super::vnni::{Signed32, Unsigned32};
use crate::blocks::Groupable;
use crate::ActBlocks;
use std::arch::x86_64::*;

/// Where a prompt panel's 32-value blocks come from: rows in the file's layout (`&[W]`),
/// or rows grouped eight at a time at load ([`Grouped`]), read where they are (no copy
/// back to the file's layout per product, which was a quarter of a 16-token prompt).
pub trait BlockRows: Copy {
    type Block: Unsigned32;
    /// Block `c` of row `row` (`nb` per row); panics past the rows.
    fn block(self, nb: usize, row: usize, c: usize) -> Self::Block;
    /// Whether all of rows `0..rows` (`nb` blocks each) are here.
    fn holds(self, nb: usize, rows: usize) -> bool;
    /// Asks the caches for block `c` of the eight rows from `row` (a multiple of 8) ahead
    /// of its use; nothing past the rows.
    fn prefetch_group(self, _nb: usize, _row: usize, _c: usize) {}
}

impl<W: Unsigned32> BlockRows for &[W] {
    type Block = W;
    #[inline(always)]
    fn block(self, nb: usize, row: usize, c: usize) -> W {
        self[row * nb + c]
    }
    #[inline(always)]
    fn holds(self, nb: usize, rows: usize) -> bool {
        self.len() >= rows * nb
    }
}

/// Rows of `B` grouped eight at a time at load (`nb` groups per eight rows).
pub struct Grouped<'a, B: Groupable>(pub &'a [B::Group]);

impl<B: Groupable> Clone for Grouped<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Groupable> Copy for Grouped<'_, B> {}

impl<B: Groupable + Unsigned32> BlockRows for Grouped<'_, B> {
    type Block = B;
    #[inline(always)]
    fn block(self, nb: usize, row: usize, c: usize) -> B {
        B::take(&self.0[row / 8 * nb + c], row % 8)
    }
    #[inline(always)]
    fn holds(self, nb: usize, rows: usize) -> bool {
        self.0.len() * 8 >= rows * nb
    }
    /// A group's blocks are one stream per eight rows (the file's rows were eight), which
    /// the hardware prefetcher alone left the packing waiting on (`perf`, Zen 5).
    #[inline(always)]
    fn prefetch_group(self, nb: usize, row: usize, c: usize) {
        if let Some(g) = self.0.get(row / 8 * nb + c) {
            super::avx2::prefetch((g as *const B::Group).cast(), size_of::<B::Group>());
        }
    }
}

/// Rows per panel (one 16-lane vector), blocks per chunk (the buffer stays in L1), tokens
/// per tile (their accumulators stay in registers).
const PANEL: usize = 16;
const CHUNK: usize = 16;
const TOKENS: usize = 8;

/// One chunk of a panel: per block, 8 × 64 bytes (4 values of each of the 16 rows), the
/// rows' `dw` and `mw`.
#[repr(C, align(64))]
struct Packed {
    u: [[[u8; 64]; 8]; CHUNK],
    dw: [[f32; PANEL]; CHUNK],
    mw: [[f32; PANEL]; CHUNK],
}

/// Puts blocks `c0..c0 + nc` of panel rows `r0..r0 + nr` (of `w`, `nb` per row) into `p`;
/// rows past `nr` are zero.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
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
        for g in (0..nr).step_by(8) {
            w.prefetch_group(nb, r0 + g, c0 + k + CHUNK);
        }
        let mut d = [0u16; PANEL];
        let mut m = [0u16; PANEL];
        // SAFETY: AVX2 and AVX-512 F are enabled; `bytes` and the scale reads are of the
        // block copy `w.block` returns (bounds-checked), and every block type here starts
        // with its f16 `d` (Q4_1, Q5_1: then `m`). The stores are the 8 64-byte groups of
        // `p.u[k]`.
        unsafe {
            let row = |i: usize| {
                if i < nr {
                    w.block(nb, r0 + i, c0 + k).bytes()
                } else {
                    _mm256_setzero_si256()
                }
            };
            store_groups(p.u[k].as_mut_ptr() as *mut __m512i, row);
            for i in 0..nr {
                let blk = w.block(nb, r0 + i, c0 + k);
                let h = &blk as *const R::Block as *const u16;
                d[i] = h.read_unaligned();
                if R::Block::HAS_M {
                    m[i] = h.add(1).read_unaligned();
                }
            }
        }
        // SAFETY: 32-byte loads of the arrays, 64-byte stores into the aligned rows.
        unsafe {
            let dw = _mm512_cvtph_ps(_mm256_loadu_si256(d.as_ptr() as *const __m256i));
            let mw = if R::Block::HAS_M {
                _mm512_cvtph_ps(_mm256_loadu_si256(m.as_ptr() as *const __m256i))
            } else {
                _mm512_mul_ps(dw, _mm512_set1_ps(-R::Block::OFFSET))
            };
            _mm512_store_ps(p.dw[k].as_mut_ptr(), dw);
            _mm512_store_ps(p.mw[k].as_mut_ptr(), mw);
        }
    }
}

/// Stores 8 vectors at `dst`: vector g holds dword g of the 32 bytes `row(i)` of each of 16
/// rows, in row order (the panels' layout, 4 values of every row per 64 bytes; the AMX
/// tiles' B layout too).
///
/// Rows i and i + 8 share a vector; an 8 × 8 transpose of dwords in each 256-bit half, then
/// the halves interleaved by 128 bits: 32 shuffles where 128 scalar stores were.
#[inline(always)]
pub(crate) unsafe fn store_groups(dst: *mut __m512i, row: impl Fn(usize) -> __m256i) {
    // SAFETY: the caller vouches for 8 × 64 writable bytes at `dst` and for AVX-512 F.
    unsafe {
        let v: [__m512i; 8] = std::array::from_fn(|i| {
            _mm512_inserti64x4::<1>(_mm512_castsi256_si512(row(i)), row(i + 8))
        });
        let t: [__m512i; 8] = std::array::from_fn(|j| {
            let (a, b) = (v[j / 2 * 2], v[j / 2 * 2 + 1]);
            if j % 2 == 0 {
                _mm512_unpacklo_epi32(a, b)
            } else {
                _mm512_unpackhi_epi32(a, b)
            }
        });
        // tt[g] holds dword g (lane 0 of each half) and g + 4 (lane 1) of rows 0–3
        // (8–11), tt[g + 4] the same of rows 4–7 (12–15).
        let tt: [__m512i; 8] = std::array::from_fn(|j| {
            let (q, g) = (j / 4, j % 4);
            let (a, b) = (t[4 * q + g / 2], t[4 * q + g / 2 + 2]);
            if g % 2 == 0 {
                _mm512_unpacklo_epi64(a, b)
            } else {
                _mm512_unpackhi_epi64(a, b)
            }
        });
        let low = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
        let high = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
        for g in 0..4 {
            let (a, b) = (tt[g], tt[g + 4]);
            _mm512_storeu_si512(dst.add(g), _mm512_permutex2var_epi64(a, low, b));
            _mm512_storeu_si512(dst.add(g + 4), _mm512_permutex2var_epi64(a, high, b));
        }
    }
}

/// `T` tokens from `t0` against the packed chunk (blocks `c0..c0 + nc`), added into
/// `acc[t]` (16 rows each).
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[inline]
unsafe fn tokens<A: Signed32, const T: usize>(
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
    // SAFETY (whole body): block indices `(t0 + t) * nb + c0 + k` with `t < T`, `k < nc`
    // are inside the activations (asserted); the packed loads are aligned and inside `p`;
    // `acc[t0 + t]` holds 16 floats.
    unsafe {
        let mut sum: [__m512; T] = std::array::from_fn(|t| _mm512_loadu_ps(acc[t0 + t].as_ptr()));
        for k in 0..nc {
            let mut isum = [_mm512_setzero_si512(); T];
            for g in 0..8 {
                let u = _mm512_load_si512(p.u[k][g].as_ptr() as *const _);
                for (t, isum) in isum.iter_mut().enumerate() {
                    let q = a.blocks.get_unchecked((t0 + t) * nb + c0 + k).qs();
                    let y =
                        _mm512_set1_epi32((q.as_ptr().add(4 * g) as *const i32).read_unaligned());
                    *isum = _mm512_dpbusd_epi32(*isum, u, y);
                }
            }
            let dw = _mm512_load_ps(p.dw[k].as_ptr());
            let mw = _mm512_load_ps(p.mw[k].as_ptr());
            for (t, (isum, sum)) in isum.iter().zip(sum.iter_mut()).enumerate() {
                let i = (t0 + t) * nb + c0 + k;
                let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*a.d.get_unchecked(i)));
                *sum = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*isum), scale, *sum);
                *sum = _mm512_fmadd_ps(mw, _mm512_set1_ps(*a.s.get_unchecked(i)), *sum);
            }
        }
        for (t, sum) in sum.iter().enumerate() {
            _mm512_storeu_ps(acc[t0 + t].as_mut_ptr(), *sum);
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
                tokens::<A, 1>(p, a, nb, t, c0, nc, acc)
            } else {
                tokens::<A, TOKENS>(p, a, nb, t, c0, nc, acc)
            }
        }
    }
}

/// All rows of `w` (`out.width()`, `nb` blocks each) against every token of `a`, into
/// each token's columns of `out`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn gemm<R: BlockRows, A: Signed32>(
    w: R,
    a: &ActBlocks<A>,
    nb: usize,
    out: &mut crate::pool::Columns,
) {
    let p = Packed {
        u: [[[0; 64]; 8]; CHUNK],
        dw: [[0.0; PANEL]; CHUNK],
        mw: [[0.0; PANEL]; CHUNK],
    };
    super::prompt_panels(&mut Steps { w, a, nb, p }, nb, out);
}
