//! aarch64 kernels: NEON (ARMv8.0, every aarch64 CPU), the dot-product extension (`sdot`)
//! and the int8 matrix multiply (`smmla`), picked at start-up by [`crate::dispatch`].
//! Built for baseline aarch64; the `dotprod` and `i8mm` kernels enable their features with
//! `#[target_feature]` and are only reachable through [`kernels`] after runtime detection.
//! The levels add up: `dotprod` is NEON with `sdot` in every integer product, `i8mm` adds
//! `smmla` prompt products. What each kernel costs per block, against llama.cpp's NEON
//! kernels, is in `README.md` beside this file.

pub mod encoder;
pub mod i8mm;
pub mod neon;

use crate::blocks::*;
use crate::dispatch::{Isa, Kernels};
use crate::pool::Columns;
use crate::ActBlocks;
use half::{bf16, f16};
use neon::{Mull, Sdot};

// Safe entry points of the NEON level. SAFETY (all): NEON is part of every aarch64 target,
// so these run on any CPU this build runs on.
fn quantize_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    // SAFETY: see above.
    unsafe { neon::quantize_q8_0(x, y) }
}
fn quantize_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    // SAFETY: see above.
    unsafe { neon::quantize_q8_1(x, y) }
}
fn quantize_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    // SAFETY: see above.
    unsafe { neon::quantize_q8_k(x, y) }
}
fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
    // SAFETY: see above.
    unsafe { neon::dot_f32(x, y) }
}
fn tile_f32_4x3(w: &[f32], a: &[f32], cols: usize, out: &mut [f32; 12]) {
    // SAFETY: see above.
    unsafe { neon::tile_f32_4x3(w, a, cols, out) }
}
fn dot_f16(x: &[f16], y: &[f16]) -> f32 {
    // SAFETY: see above.
    unsafe { neon::dot_f16(x, y) }
}
fn dot_bf16(x: &[bf16], y: &[bf16]) -> f32 {
    // SAFETY: see above.
    unsafe { neon::dot_bf16(x, y) }
}
fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
    // SAFETY: see above.
    unsafe { neon::axpy_f16(out, w, v) }
}
fn axpy_f32(out: &mut [f32], w: f32, v: &[f32]) {
    // SAFETY: see above.
    unsafe { neon::axpy_f32(out, w, v) }
}
fn dequantize_q8_0(x: &[BlockQ8_0], y: &mut [f32]) {
    // SAFETY: see above.
    unsafe { neon::dequantize_q8_0(x, y) }
}
fn dequantize_q4_0(x: &[BlockQ4_0], y: &mut [f32]) {
    // SAFETY: see above.
    unsafe { neon::dequantize_q4_0(x, y) }
}
// The quantized cache's attention by rows over this family's dot, dequantization and axpy
// kernels (every aarch64 level has NEON's), from a table made once, not per call.
fn neon_table() -> &'static Kernels {
    static TABLE: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| Kernels::for_isa(Isa::Neon))
}
fn attend_q8_0(
    a: &crate::kvquant::AttendQuant<BlockQ8_0>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    crate::kvquant::attend_by_rows(neon_table(), a, out, scratch)
}
fn attend_q4_0(
    a: &crate::kvquant::AttendQuant<BlockQ4_0>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    crate::kvquant::attend_by_rows(neon_table(), a, out, scratch)
}
fn attend_f16(a: &crate::AttendF16, out: &mut [f32], scratch: &mut Vec<f32>) {
    crate::reference::attend_f16_by_rows(a, out, scratch, dot_f16, axpy_f16, softmax)
}
const ATTEND_F16_STEPS: crate::AttendF16Steps = crate::AttendF16Steps {
    scores: |a, ps, _| crate::reference::attend_f16_scores_by_rows(a, ps, dot_f16),
    weights: |a, r, row| crate::reference::attend_f16_weights_by_rows(a, r, row, softmax),
    values: |a, ps, c0, out| crate::reference::attend_f16_values_by_rows(a, ps, c0, out, axpy_f16),
};

fn gelu(x: &mut [f32]) {
    // SAFETY: see above.
    unsafe { encoder::gelu(x) }
}
fn softmax(x: &mut [f32]) {
    // SAFETY: see above.
    unsafe { encoder::softmax(x) }
}
fn swiglu(gate: &mut [f32], up: &[f32]) {
    // SAFETY: see above.
    unsafe { encoder::swiglu(gate, up) }
}
fn add_layer_norm(x: &mut [f32], add: Option<&[f32]>, w: &[f32], b: &[f32], eps: f32) {
    // SAFETY: see above.
    unsafe { encoder::add_layer_norm(x, add, w, b, eps) }
}
fn attend_rows(a: &crate::AttendRows, out: &mut [f32]) {
    if !a.head_dim.is_multiple_of(4) {
        return crate::reference::attend_rows(a, out);
    }
    // SAFETY: see above.
    unsafe { encoder::attend_rows(a, out) }
}

/// The scale (and sum) of a Q8_0/Q8_1 activation block, as f16 bits.
fn q8_0_d(b: &BlockQ8_0) -> u16 {
    b.d.to_bits()
}
fn q8_1_d(b: &BlockQ8_1) -> u16 {
    b.d.to_bits()
}
fn q8_1_s(b: &BlockQ8_1) -> u16 {
    b.s.to_bits()
}
fn no_sum<A>(_: &A) -> u16 {
    0
}

/// The dot product and the tiles of a 32-value type at the NEON (`Mull`) and dot-product
/// (`Sdot`) levels.
macro_rules! block32 {
    ($w:ty, $a:ty, $d:expr, $s:expr,
     $dot:ident, $dot_sdot:ident, $gemm:ident, $gemm_sdot:ident, $prefill:ident) => {
        fn $dot(w: &[$w], a: &[$a]) -> f32 {
            // SAFETY: NEON only (every aarch64 CPU).
            unsafe { neon::dot32::<$w, $a, Mull>(w, a, $d, $s) }
        }
        fn $gemm(w: &[$w], a: &ActBlocks<$a>, nb: usize, n_tok: usize, out: &mut [f32]) {
            // SAFETY: NEON only.
            unsafe { neon::gemm32::<$w, $a, Mull>(w, a, nb, n_tok, out) }
        }
        fn $dot_sdot(w: &[$w], a: &[$a]) -> f32 {
            #[target_feature(enable = "dotprod")]
            unsafe fn inner(w: &[$w], a: &[$a]) -> f32 {
                // SAFETY: FEAT_DotProd enabled on this function.
                unsafe { neon::dot32::<$w, $a, Sdot>(w, a, $d, $s) }
            }
            // SAFETY: installed by `kernels` only at the Dotprod level or above, which
            // `detect()` found on this CPU.
            unsafe { inner(w, a) }
        }
        fn $gemm_sdot(w: &[$w], a: &ActBlocks<$a>, nb: usize, n_tok: usize, out: &mut [f32]) {
            #[target_feature(enable = "dotprod")]
            unsafe fn inner(w: &[$w], a: &ActBlocks<$a>, nb: usize, n_tok: usize, out: &mut [f32]) {
                // SAFETY: FEAT_DotProd enabled on this function.
                unsafe { neon::gemm32::<$w, $a, Sdot>(w, a, nb, n_tok, out) }
            }
            // SAFETY: as above.
            unsafe { inner(w, a, nb, n_tok, out) }
        }
        fn $prefill(w: &[$w], a: &ActBlocks<$a>, nb: usize, out: &mut Columns) {
            let n_tok = out.n_tok();
            // SAFETY: installed by `kernels` only at the I8mm level, which `detect()` found
            // on this CPU.
            out.from_row_major(|o| unsafe { i8mm::gemm32::<$w, $a>(w, a, nb, n_tok, o) })
        }
    };
}

block32!(BlockQ4_0, BlockQ8_0, q8_0_d, no_sum, dot_q4_0, sdot_q4_0, gemm_q4_0, sgemm_q4_0, mm_q4_0);
block32!(BlockQ4_1, BlockQ8_1, q8_1_d, q8_1_s, dot_q4_1, sdot_q4_1, gemm_q4_1, sgemm_q4_1, mm_q4_1);
block32!(BlockQ5_0, BlockQ8_0, q8_0_d, no_sum, dot_q5_0, sdot_q5_0, gemm_q5_0, sgemm_q5_0, mm_q5_0);
block32!(BlockQ5_1, BlockQ8_1, q8_1_d, q8_1_s, dot_q5_1, sdot_q5_1, gemm_q5_1, sgemm_q5_1, mm_q5_1);
block32!(BlockQ8_0, BlockQ8_0, q8_0_d, no_sum, dot_q8_0, sdot_q8_0, gemm_q8_0, sgemm_q8_0, mm_q8_0);
block32!(
    BlockIQ4NL,
    BlockQ8_0,
    q8_0_d,
    no_sum,
    dot_iq4_nl,
    sdot_iq4_nl,
    gemm_iq4_nl,
    sgemm_iq4_nl,
    mm_iq4_nl
);

/// The same for a super-block type (Q8_K activations).
macro_rules! superblock {
    ($w:ty, $dot:ident, $dot_sdot:ident, $gemm:ident, $gemm_sdot:ident, $prefill:ident) => {
        fn $dot(w: &[$w], a: &[BlockQ8K]) -> f32 {
            // SAFETY: NEON only (every aarch64 CPU).
            unsafe { neon::dot_k::<$w, Mull>(w, a) }
        }
        fn $gemm(w: &[$w], a: &ActBlocks<BlockQ8K>, nb: usize, n_tok: usize, out: &mut [f32]) {
            // SAFETY: NEON only.
            unsafe { neon::gemm_k::<$w, Mull>(w, a.blocks, nb, n_tok, out) }
        }
        fn $dot_sdot(w: &[$w], a: &[BlockQ8K]) -> f32 {
            #[target_feature(enable = "dotprod")]
            unsafe fn inner(w: &[$w], a: &[BlockQ8K]) -> f32 {
                // SAFETY: FEAT_DotProd enabled on this function.
                unsafe { neon::dot_k::<$w, Sdot>(w, a) }
            }
            // SAFETY: installed by `kernels` only at the Dotprod level or above, which
            // `detect()` found on this CPU.
            unsafe { inner(w, a) }
        }
        fn $gemm_sdot(w: &[$w], a: &ActBlocks<BlockQ8K>, nb: usize, n_tok: usize, out: &mut [f32]) {
            #[target_feature(enable = "dotprod")]
            unsafe fn inner(w: &[$w], a: &[BlockQ8K], nb: usize, n_tok: usize, out: &mut [f32]) {
                // SAFETY: FEAT_DotProd enabled on this function.
                unsafe { neon::gemm_k::<$w, Sdot>(w, a, nb, n_tok, out) }
            }
            // SAFETY: as above.
            unsafe { inner(w, a.blocks, nb, n_tok, out) }
        }
        fn $prefill(w: &[$w], a: &ActBlocks<BlockQ8K>, nb: usize, out: &mut Columns) {
            let n_tok = out.n_tok();
            // SAFETY: installed by `kernels` only at the I8mm level, which `detect()` found
            // on this CPU.
            out.from_row_major(|o| unsafe { i8mm::gemm_k::<$w>(w, a.blocks, nb, n_tok, o) })
        }
    };
}

superblock!(BlockQ2K, dot_q2_k, sdot_q2_k, gemm_q2_k, sgemm_q2_k, mm_q2_k);
superblock!(BlockQ3K, dot_q3_k, sdot_q3_k, gemm_q3_k, sgemm_q3_k, mm_q3_k);
superblock!(BlockQ4K, dot_q4_k, sdot_q4_k, gemm_q4_k, sgemm_q4_k, mm_q4_k);
superblock!(BlockQ5K, dot_q5_k, sdot_q5_k, gemm_q5_k, sgemm_q5_k, mm_q5_k);
superblock!(BlockQ6K, dot_q6_k, sdot_q6_k, gemm_q6_k, sgemm_q6_k, mm_q6_k);
superblock!(
    BlockIQ4XS,
    dot_iq4_xs,
    sdot_iq4_xs,
    gemm_iq4_xs,
    sgemm_iq4_xs,
    mm_iq4_xs
);

/// Kernels for an aarch64 level (`Neon`, `Dotprod` or `I8mm`).
///
/// # Safety
/// The CPU must support `isa` (`dispatch::detect()` includes it): the table's safe function
/// pointers run that level's instructions unchecked. Only `Kernels::for_isa` calls this,
/// after checking the level against detection.
pub(crate) unsafe fn kernels(isa: Isa) -> Kernels {
    let neon = Kernels {
        isa,
        quantize_q8_0,
        quantize_q8_1,
        quantize_q8_k,
        dot_f32,
        tile_f32_4x3,
        dot_f16,
        dot_bf16,
        axpy_f16,
        axpy_f32,
        dequantize_q8_0,
        dequantize_q4_0,
        attend_f16,
        attend_f16_steps: ATTEND_F16_STEPS,
        attend_q8_0,
        attend_q4_0,
        gelu,
        softmax,
        swiglu,
        add_layer_norm,
        attend_rows,
        dot_q4_0,
        dot_q4_1,
        dot_q5_0,
        dot_q5_1,
        dot_q8_0,
        dot_iq4_nl,
        dot_q2_k,
        dot_q3_k,
        dot_q4_k,
        dot_q5_k,
        dot_q6_k,
        dot_iq4_xs,
        gemm_q4_0,
        gemm_q4_1,
        gemm_q5_0,
        gemm_q5_1,
        gemm_q8_0,
        gemm_iq4_nl,
        gemm_q2_k,
        gemm_q3_k,
        gemm_q4_k,
        gemm_q5_k,
        gemm_q6_k,
        gemm_iq4_xs,
        ..Kernels::scalar()
    };
    if isa == Isa::Neon {
        return neon;
    }
    let dotprod = Kernels {
        dot_q4_0: sdot_q4_0,
        dot_q4_1: sdot_q4_1,
        dot_q5_0: sdot_q5_0,
        dot_q5_1: sdot_q5_1,
        dot_q8_0: sdot_q8_0,
        dot_iq4_nl: sdot_iq4_nl,
        dot_q2_k: sdot_q2_k,
        dot_q3_k: sdot_q3_k,
        dot_q4_k: sdot_q4_k,
        dot_q5_k: sdot_q5_k,
        dot_q6_k: sdot_q6_k,
        dot_iq4_xs: sdot_iq4_xs,
        gemm_q4_0: sgemm_q4_0,
        gemm_q4_1: sgemm_q4_1,
        gemm_q5_0: sgemm_q5_0,
        gemm_q5_1: sgemm_q5_1,
        gemm_q8_0: sgemm_q8_0,
        gemm_iq4_nl: sgemm_iq4_nl,
        gemm_q2_k: sgemm_q2_k,
        gemm_q3_k: sgemm_q3_k,
        gemm_q4_k: sgemm_q4_k,
        gemm_q5_k: sgemm_q5_k,
        gemm_q6_k: sgemm_q6_k,
        gemm_iq4_xs: sgemm_iq4_xs,
        ..neon
    };
    if isa == Isa::Dotprod {
        return dotprod;
    }
    // Prompt tokens on `smmla` tiles; generated tokens keep the `sdot` kernels.
    Kernels {
        prefill_q4_0: Some(mm_q4_0),
        prefill_q4_1: Some(mm_q4_1),
        prefill_q5_0: Some(mm_q5_0),
        prefill_q5_1: Some(mm_q5_1),
        prefill_q8_0: Some(mm_q8_0),
        prefill_iq4_nl: Some(mm_iq4_nl),
        prefill_q2_k: Some(mm_q2_k),
        prefill_q3_k: Some(mm_q3_k),
        prefill_q4_k: Some(mm_q4_k),
        prefill_q5_k: Some(mm_q5_k),
        prefill_q6_k: Some(mm_q6_k),
        prefill_iq4_xs: Some(mm_iq4_xs),
        ..dotprod
    }
}
