//! x86-64 SIMD kernels. Built for baseline x86-64; each kernel enables its features with
//! `#[target_feature]` and is only reachable through [`kernels`] after runtime detection.
//! The AVX-512 level adds the VNNI tiles for the 32-value block types and otherwise runs
//! the AVX2 kernels.

/// `$block::<R>(args)` for `R = $rows` (1..=8; more is 8).
macro_rules! by_rows {
    ($rows:expr, $block:ident($($arg:expr),*)) => {
        match $rows {
            1 => $block::<1>($($arg),*),
            2 => $block::<2>($($arg),*),
            3 => $block::<3>($($arg),*),
            4 => $block::<4>($($arg),*),
            5 => $block::<5>($($arg),*),
            6 => $block::<6>($($arg),*),
            7 => $block::<7>($($arg),*),
            _ => $block::<8>($($arg),*),
        }
    };
}
pub(crate) use by_rows;

pub mod amx;
pub mod avx2;
pub mod avx2_tiles;
pub mod avx512;
pub mod encoder_avx2;
pub mod encoder_i16_avx2;
pub mod encoder_vnni;
pub mod float_tiles;
pub mod grouped;
pub mod kpanel;
pub mod kpanel_avx2;
pub mod kquant;
pub mod kunpack;
pub mod kvattn;
pub mod panel;
pub mod panel_avx2;
pub mod vnni;

use crate::blocks::*;
use crate::dispatch::{gemm_from_dot, Isa, Kernels};
use crate::kvquant::AttendQuant;

/// The order in which the decode kernels (`vnni`, `kquant`) visit a product's `rows`:
/// `tile(r, stride, true)` for rows `r, r + stride, r + 2·stride, r + 3·stride` with `r` in
/// the first quarter and `stride` a quarter of the rows, then `tile(r, 0, false)` for each
/// row left over. Taking a tile's 4 rows from the 4 quarters, not 4 neighbours, makes the
/// weights stream from memory as 4 sequential reads at once: one core's hardware prefetcher
/// keeps more loads in flight over several streams than over one (measured on one core
/// here: ~9 GB/s for one stream, ~12 GB/s for 4, each with the software prefetch).
#[inline(always)]
fn quarter_tiles(rows: usize, mut tile: impl FnMut(usize, usize, bool)) {
    let quarter = rows / 4;
    for r in 0..quarter {
        tile(r, quarter, true);
    }
    for r in 4 * quarter..rows {
        tile(r, 0, false);
    }
}
use crate::pool::Columns;
use crate::ActBlocks;
use half::f16;
use half::slice::HalfFloatSliceExt;

/// What the block attention kernels (`avx2::attend_f16`, `avx512::attend_f16`) share:
/// checks every row's keys, values, query and output (`head_dim` a multiple of `lanes`),
/// sizes `scratch` once for the whole cache, and fills the first part with the rows'
/// queries rounded to f16 (then exact in f32). Returns the keys' span `lo..lo + n`, the
/// queries (`rows × head_dim`) and room for the scores (`rows × n`).
pub(crate) fn attend_setup<'s>(
    a: &crate::AttendF16,
    lanes: usize,
    out_len: usize,
    scratch: &'s mut Vec<f32>,
) -> (usize, usize, &'s mut [f32], &'s mut [f32]) {
    let (lo, n) = attend_check(a, lanes);
    for r in 0..a.rows {
        assert!(a.at[r] + a.head_dim <= out_len);
    }
    let (qs, ps) = attend_queries(a, n, scratch);
    (lo, n, qs, ps)
}

/// [`attend_setup`]'s checks of the rows' keys, values and queries; returns their span.
pub(crate) fn attend_check(a: &crate::AttendF16, lanes: usize) -> (usize, usize) {
    let hd = a.head_dim;
    assert!(hd.is_multiple_of(lanes) && (1..=8).contains(&a.rows));
    for r in 0..a.rows {
        let (first, end) = a.keys[r];
        assert!(first < end && a.at[r] + hd <= a.q.len());
        assert!((end - 1) * a.kv_stride + hd <= a.k.len().min(a.v.len()));
    }
    a.span()
}

/// The rows' queries rounded to f16 at the start of `scratch`, followed by room for their
/// scores over `n` keys (see [`attend_setup`]).
fn attend_queries<'s>(
    a: &crate::AttendF16,
    n: usize,
    scratch: &'s mut Vec<f32>,
) -> (&'s mut [f32], &'s mut [f32]) {
    let hd = a.head_dim;
    // Room for the whole cache's length at once, so decoding never grows this buffer; every
    // value used is written first, so the buffer is only ever grown, never cleared.
    let need = a.rows * (hd + n);
    if scratch.len() < need {
        let whole = 8 * (hd + a.k.len() / a.kv_stride.max(1) + 1);
        scratch.resize(need.max(whole), 0.0);
    }
    let (qs, ps) = scratch[..need].split_at_mut(a.rows * hd);
    round_queries(a, qs);
    (qs, ps)
}

/// The rows' queries rounded to f16 (then exact in f32) into `qs` (`rows × head_dim`).
pub(crate) fn round_queries(a: &crate::AttendF16, qs: &mut [f32]) {
    let hd = a.head_dim;
    assert!(qs.len() >= a.rows * hd);
    for r in 0..a.rows {
        let (dst, src) = (&mut qs[r * hd..][..hd], &a.q[a.at[r]..][..hd]);
        dst.copy_from_slice(src);
        round_through_f16(dst);
    }
}

/// Checks a block kernel's `scores` step: returns the span; `ps` holds its scores.
pub(crate) fn attend_scores_check(
    a: &crate::AttendF16,
    lanes: usize,
    ps: &[f32],
) -> (usize, usize) {
    let (lo, n) = attend_check(a, lanes);
    assert!(ps.len() >= a.rows * n);
    (lo, n)
}

/// Checks a block kernel's `values` step; returns the span and the width of `out`'s rows.
pub(crate) fn attend_values_check(
    a: &crate::AttendF16,
    lanes: usize,
    ps: &[f32],
    c0: usize,
    out: &[f32],
) -> (usize, usize, usize) {
    let (lo, n) = attend_scores_check(a, lanes, ps);
    let w = out.len() / a.rows;
    crate::reference::check_value_columns(a, c0, w);
    (lo, n, w)
}

/// Keys ahead whose cache rows the decoder attention kernels prefetch. A decoding token's
/// keys and values come from memory (the weights streamed since its last visit evicted
/// them), and one KV head's slice of each row, `kv_stride` apart, is too sparse a pattern
/// for the hardware prefetchers: SmolLM2's attention over 2048 keys read 7.5 GB/s on one
/// thread without this (Zen 5).
pub(crate) const ATTEND_PREFETCH_KEYS: usize = 16;

/// Prefetches the cache lines of `bytes` bytes from `p`. A hint only: an address past the
/// cache is never read and does not fault.
#[inline(always)]
pub(crate) fn prefetch_bytes<T>(p: *const T, bytes: usize) {
    // From the start of `p`'s cache line.
    let misalign = p as usize & 63;
    let first = (p as *const i8).wrapping_sub(misalign);
    let mut off = 0;
    while off < misalign + bytes {
        // SAFETY: a prefetch reads nothing architecturally and does not fault on any
        // address; the pointer is only computed, never dereferenced.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                first.wrapping_add(off),
            );
        }
        off += 64;
    }
}

/// Each value rounded to f16 and back, a run at a time (half's slice conversions: vector
/// instructions, the CPU checked once per run rather than per value).
pub(crate) fn round_through_f16(values: &mut [f32]) {
    const RUN: usize = 64;
    let mut halves = [f16::ZERO; RUN];
    for run in values.chunks_mut(RUN) {
        let h = &mut halves[..run.len()];
        h.convert_from_f32_slice(run);
        h.convert_to_f32_slice(run);
    }
}

/// A panel kernel's steps for [`prompt_panels`].
pub(crate) trait PanelSteps<const PANEL: usize> {
    /// Blocks per packed chunk and tokens per tile.
    const CHUNK: usize;
    const TOKENS: usize;
    /// Packs blocks `c0..c0 + nc` of panel rows `r0..r0 + nr`.
    fn pack(&mut self, r0: usize, nr: usize, c0: usize, nc: usize);
    /// Runs `TOKENS` tokens from `t` (or one token, `one`) over the packed chunk, adding
    /// into their accumulators.
    fn tokens(&mut self, t: usize, one: bool, c0: usize, nc: usize, acc: &mut [[f32; PANEL]]);
}

/// The prompt-panel skeleton (`panel`, `kpanel` and their AVX2 twins): for each panel of
/// `PANEL` rows, chunk by chunk of blocks, pack the chunk then run every token over it; the
/// panel's results go straight into each token's columns of `out`.
pub(crate) fn prompt_panels<const PANEL: usize, S: PanelSteps<PANEL>>(
    steps: &mut S,
    nb: usize,
    out: &mut Columns,
) {
    let (rows, n_tok) = (out.width(), out.n_tok());
    let mut acc = vec![[0f32; PANEL]; n_tok];
    let full = n_tok / S::TOKENS * S::TOKENS;
    for r0 in (0..rows).step_by(PANEL) {
        let nr = (rows - r0).min(PANEL);
        acc.iter_mut().for_each(|a| *a = [0.0; PANEL]);
        for c0 in (0..nb).step_by(S::CHUNK) {
            let nc = (nb - c0).min(S::CHUNK);
            steps.pack(r0, nr, c0, nc);
            for t in (0..full).step_by(S::TOKENS) {
                steps.tokens(t, false, c0, nc, &mut acc);
            }
            for t in full..n_tok {
                steps.tokens(t, true, c0, nc, &mut acc);
            }
        }
        // A whole panel is a fixed-size copy (inlined vector moves, not a memmove call
        // per token).
        for (t, acc) in acc.iter().enumerate() {
            let row = &mut out.token(t)[r0..r0 + nr];
            if nr == PANEL {
                row[..PANEL].copy_from_slice(acc);
            } else {
                row.copy_from_slice(&acc[..nr]);
            }
        }
    }
}

// Safe entry points. SAFETY (all): `kernels` hands these out only when `detect()` found
// AVX2, FMA and F16C on this CPU.
fn dot_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_q8_0(x, y) }
}
fn dot_q4_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_q4_0(x, y) }
}
fn dot_q4_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_q4_1(x, y) }
}
fn dot_q5_0(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_q5_0(x, y) }
}
fn dot_q4_k(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_q4_k(x, y) }
}
fn dot_q6_k(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_q6_k::<true>(x, y) }
}
/// [`dot_q6_k`] without the software prefetch (AMD: see [`prefetch_weights`]).
fn dot_q6_k_no_prefetch(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_q6_k::<false>(x, y) }
}
fn dot_q5_1(x: &[BlockQ5_1], y: &[BlockQ8_1]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_q5_1(x, y) }
}
fn dot_q5_k(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_q5_k(x, y) }
}
fn dot_q2_k(x: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_q2_k(x, y) }
}
fn dot_q3_k(x: &[BlockQ3K], y: &[BlockQ8K]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_q3_k(x, y) }
}
fn dot_iq4_nl(x: &[BlockIQ4NL], y: &[BlockQ8_0]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_iq4_nl(x, y) }
}
fn dot_iq4_xs(x: &[BlockIQ4XS], y: &[BlockQ8K]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_iq4_xs(x, y) }
}
fn dot_bf16<const PF: bool>(x: &[half::bf16], y: &[half::bf16]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_bf16::<PF>(x, y) }
}
fn dot_f16<const PF: bool>(x: &[f16], y: &[f16]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_f16::<PF>(x, y) }
}
/// F16 and BF16 rows at the Avx512 level. SAFETY (both): installed by `kernels` only when
/// `detect()` found AVX-512 F (with AVX2, FMA, F16C).
fn dot_f16_avx512<const PF: bool>(x: &[f16], y: &[f16]) -> f32 {
    // SAFETY: see above.
    unsafe { avx512::dot_f16::<PF>(x, y) }
}
fn dot_bf16_avx512<const PF: bool>(x: &[half::bf16], y: &[half::bf16]) -> f32 {
    // SAFETY: see above.
    unsafe { avx512::dot_bf16::<PF>(x, y) }
}
fn tile_f32_4x3(w: &[f32], a: &[f32], cols: usize, out: &mut [f32; 12]) {
    // SAFETY: only installed by `kernels` for CPUs with AVX2, FMA and F16C.
    unsafe { avx2::tile_f32_4x3(w, a, cols, out) }
}

fn quantize_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    // SAFETY: see above.
    unsafe { avx2::quantize_q8_0(x, y) }
}
fn quantize_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    // SAFETY: see above.
    unsafe { avx2::quantize_q8_1(x, y) }
}
fn quantize_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    // SAFETY: see above.
    unsafe { avx2::quantize_q8_k(x, y) }
}

fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
    // SAFETY: see above.
    unsafe { avx2::axpy_f16(out, w, v) }
}

fn axpy_f32(out: &mut [f32], w: f32, v: &[f32]) {
    // SAFETY: see above.
    unsafe { avx2::axpy_f32(out, w, v) }
}
fn dequantize_q8_0(x: &[BlockQ8_0], y: &mut [f32]) {
    // SAFETY: see above.
    unsafe { avx2::dequantize_q8_0(x, y) }
}
fn dequantize_q4_0(x: &[BlockQ4_0], y: &mut [f32]) {
    // SAFETY: see above.
    unsafe { avx2::dequantize_q4_0(x, y) }
}

fn attend_q8_0(a: &AttendQuant<BlockQ8_0>, out: &mut [f32], scratch: &mut Vec<f32>) {
    // SAFETY: see above.
    unsafe { kvattn::attend(a, out, scratch) }
}
fn attend_q4_0(a: &AttendQuant<BlockQ4_0>, out: &mut [f32], scratch: &mut Vec<f32>) {
    // SAFETY: see above.
    unsafe { kvattn::attend(a, out, scratch) }
}

fn attend_f16(a: &crate::AttendF16, out: &mut [f32], scratch: &mut Vec<f32>) {
    if !a.head_dim.is_multiple_of(8) {
        return crate::reference::attend_f16_by_rows(
            a,
            out,
            scratch,
            dot_f16::<false>,
            axpy_f16,
            softmax_avx2,
        );
    }
    // SAFETY: installed by `kernels` only when `detect()` found AVX2, FMA and F16C.
    unsafe { avx2::attend_f16(a, out, scratch) }
}

// `attend_f16`'s steps: the block kernels' where `attend_f16` takes those, else its rows'.
const ATTEND_F16_STEPS: crate::AttendF16Steps = crate::AttendF16Steps {
    scores: |a, ps, qs| {
        if !a.head_dim.is_multiple_of(8) {
            return crate::reference::attend_f16_scores_by_rows(a, ps, dot_f16::<false>);
        }
        // SAFETY: installed by `kernels` only when `detect()` found AVX2, FMA and F16C.
        unsafe { avx2::attend_f16_scores(a, ps, qs) }
    },
    weights: |a, r, row| {
        if !a.head_dim.is_multiple_of(8) {
            return crate::reference::attend_f16_weights_by_rows(a, r, row, softmax_avx2);
        }
        softmax_avx2(row);
        round_through_f16(row);
    },
    values: |a, ps, c0, out| {
        if !a.head_dim.is_multiple_of(8) {
            return crate::reference::attend_f16_values_by_rows(a, ps, c0, out, axpy_f16);
        }
        // SAFETY: as for `scores`.
        unsafe { avx2::attend_f16_values(a, ps, c0, out) }
    },
};

const ATTEND_F16_STEPS_AVX512: crate::AttendF16Steps = crate::AttendF16Steps {
    scores: |a, ps, qs| {
        if !a.head_dim.is_multiple_of(16) {
            return (ATTEND_F16_STEPS.scores)(a, ps, qs);
        }
        // SAFETY: installed by `kernels` only when `detect()` found AVX-512F (with AVX2,
        // FMA and F16C).
        unsafe { avx512::attend_f16_scores(a, ps, qs) }
    },
    weights: |a, r, row| {
        if !a.head_dim.is_multiple_of(16) {
            return (ATTEND_F16_STEPS.weights)(a, r, row);
        }
        softmax_avx512(row);
        round_through_f16(row);
    },
    values: |a, ps, c0, out| {
        if !a.head_dim.is_multiple_of(16) {
            return (ATTEND_F16_STEPS.values)(a, ps, c0, out);
        }
        // SAFETY: as for `scores`.
        unsafe { avx512::attend_f16_values(a, ps, c0, out) }
    },
};

fn attend_f16_avx512(a: &crate::AttendF16, out: &mut [f32], scratch: &mut Vec<f32>) {
    if !a.head_dim.is_multiple_of(16) {
        return attend_f16(a, out, scratch);
    }
    // SAFETY: installed by `kernels` only when `detect()` found AVX-512F (with AVX2, FMA
    // and F16C).
    unsafe { avx512::attend_f16(a, out, scratch) }
}

fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
    // SAFETY: see above.
    unsafe { avx2::dot_f32(x, y) }
}

/// AVX2 tiles. SAFETY (all): installed by `kernels` only when `detect()` found AVX2, FMA
/// and F16C on this CPU.
macro_rules! avx2_gemm {
    ($name:ident, $w:ty, $a:ty) => {
        fn $name(w: &[$w], a: &ActBlocks<$a>, nb: usize, n_tok: usize, out: &mut [f32]) {
            // SAFETY: see above.
            unsafe { avx2_tiles::gemm(w, a, nb, n_tok, out) }
        }
    };
}
avx2_gemm!(gemm_q4_0, BlockQ4_0, BlockQ8_0);
avx2_gemm!(gemm_q4_1, BlockQ4_1, BlockQ8_1);
avx2_gemm!(gemm_q5_0, BlockQ5_0, BlockQ8_0);
avx2_gemm!(gemm_q8_0, BlockQ8_0, BlockQ8_0);
avx2_gemm!(gemm_q5_1, BlockQ5_1, BlockQ8_1);
avx2_gemm!(gemm_iq4_nl, BlockIQ4NL, BlockQ8_0);
gemm_from_dot!(gemm_q4_k, BlockQ4K, BlockQ8K, dot_q4_k);
gemm_from_dot!(gemm_q6_k, BlockQ6K, BlockQ8K, dot_q6_k);
gemm_from_dot!(
    gemm_q6_k_no_prefetch,
    BlockQ6K,
    BlockQ8K,
    dot_q6_k_no_prefetch
);
gemm_from_dot!(gemm_q5_k, BlockQ5K, BlockQ8K, dot_q5_k);
gemm_from_dot!(gemm_q2_k, BlockQ2K, BlockQ8K, dot_q2_k);
gemm_from_dot!(gemm_q3_k, BlockQ3K, BlockQ8K, dot_q3_k);
gemm_from_dot!(gemm_iq4_xs, BlockIQ4XS, BlockQ8K, dot_iq4_xs);

/// VNNI tiles. SAFETY (all): installed by `kernels` only when `detect()` found AVX-512
/// F/BW/VL/VNNI (with AVX2, FMA, F16C) on this CPU.
macro_rules! vnni_gemm {
    ($name:ident, $w:ty, $a:ty) => {
        fn $name(w: &[$w], a: &ActBlocks<$a>, nb: usize, n_tok: usize, out: &mut [f32]) {
            // SAFETY: see above.
            unsafe { vnni::gemm(w, a, nb, n_tok, out) }
        }
    };
}
fn gelu_avx512(x: &mut [f32]) {
    // SAFETY: installed by `kernels` only when `detect()` found AVX-512F.
    unsafe { avx512::gelu(x) }
}
fn softmax_avx512(x: &mut [f32]) {
    // SAFETY: installed by `kernels` only when `detect()` found AVX-512F.
    unsafe { avx512::softmax(x) }
}
fn swiglu_avx512(gate: &mut [f32], up: &[f32]) {
    // SAFETY: installed by `kernels` only when `detect()` found AVX-512F.
    unsafe { avx512::swiglu(gate, up) }
}

fn add_layer_norm_avx512(x: &mut [f32], add: Option<&[f32]>, w: &[f32], b: &[f32], eps: f32) {
    // SAFETY: installed by `kernels` only when `detect()` found AVX-512F.
    unsafe { avx512::add_layer_norm(x, add, w, b, eps) }
}

fn attend_rows_avx512(a: &crate::AttendRows, out: &mut [f32]) {
    if !a.head_dim.is_multiple_of(32) {
        return crate::reference::attend_rows(a, out);
    }
    // SAFETY: installed by `kernels` only when `detect()` found AVX-512F.
    unsafe { avx512::attend_rows(a, out) }
}

// SAFETY (the five below): installed by `kernels` only when `detect()` found what each
// enables (AVX2, FMA and F16C; AVX-512F for `tile_512`).
fn float_tile_512(w: &[f32], xt: &[f32], cols: usize, out: &mut [f32], stride: usize, n: usize) {
    // SAFETY: see above.
    unsafe { float_tiles::tile_avx512(w, xt, cols, out, stride, n) }
}
fn float_tile_avx2(w: &[f32], xt: &[f32], cols: usize, out: &mut [f32], stride: usize, n: usize) {
    // SAFETY: see above.
    unsafe { float_tiles::tile_avx2(w, xt, cols, out, stride, n) }
}
fn float_dots_f16(w: &[half::f16], a: &[half::f16], cols: usize, out: &mut [f32], stride: usize) {
    // SAFETY: see above.
    unsafe { float_tiles::dots_f16_avx2(w, a, cols, out, stride) }
}
fn widen_f16(x: &[half::f16], y: &mut [f32]) {
    // SAFETY: see above.
    unsafe { float_tiles::widen_f16(x, y) }
}
fn widen_bf16(x: &[half::bf16], y: &mut [f32]) {
    // SAFETY: see above.
    unsafe { float_tiles::widen_bf16(x, y) }
}

fn gelu_avx2(x: &mut [f32]) {
    // SAFETY: installed by `kernels` only when `detect()` found AVX2 and FMA.
    unsafe { encoder_avx2::gelu(x) }
}
fn softmax_avx2(x: &mut [f32]) {
    // SAFETY: installed by `kernels` only when `detect()` found AVX2 and FMA.
    unsafe { encoder_avx2::softmax(x) }
}
fn swiglu_avx2(gate: &mut [f32], up: &[f32]) {
    // SAFETY: installed by `kernels` only when `detect()` found AVX2 and FMA.
    unsafe { encoder_avx2::swiglu(gate, up) }
}

fn add_layer_norm_avx2(x: &mut [f32], add: Option<&[f32]>, w: &[f32], b: &[f32], eps: f32) {
    // SAFETY: installed by `kernels` only when `detect()` found AVX2 and FMA.
    unsafe { encoder_avx2::add_layer_norm(x, add, w, b, eps) }
}

fn attend_rows_avx2(a: &crate::AttendRows, out: &mut [f32]) {
    if !a.head_dim.is_multiple_of(16) {
        return crate::reference::attend_rows(a, out);
    }
    // SAFETY: installed by `kernels` only when `detect()` found AVX2 and FMA.
    unsafe { encoder_avx2::attend_rows(a, out) }
}

/// Prompt tokens on interleaved 16-row panels. SAFETY (all): installed by `kernels` only
/// when `detect()` found AVX-512 F/BW/VL/VNNI (with AVX2, FMA, F16C).
macro_rules! panel_gemm {
    ($name:ident, $w:ty, $a:ty) => {
        fn $name(w: &[$w], a: &ActBlocks<$a>, nb: usize, out: &mut Columns) {
            // SAFETY: see above.
            unsafe { panel::gemm(w, a, nb, out) }
        }
    };
}
panel_gemm!(panel_q4_0, BlockQ4_0, BlockQ8_0);
/// The panels of rows grouped at load (`B`'s groups), read in place.
macro_rules! panel_grouped_gemm {
    ($name:ident, $module:ident, $b:ty, $a:ty) => {
        fn $name(w: &[<$b as Groupable>::Group], a: &ActBlocks<$a>, nb: usize, out: &mut Columns) {
            // SAFETY: see above.
            unsafe { $module::gemm(panel::Grouped::<$b>(w), a, nb, out) }
        }
    };
}
panel_grouped_gemm!(panel_q4_0x8, panel, BlockQ4_0, BlockQ8_0);
panel_grouped_gemm!(panel_iq4_nlx8, panel, BlockIQ4NL, BlockQ8_0);
panel_grouped_gemm!(panel_q4_1x8, panel, BlockQ4_1, BlockQ8_1);
panel_grouped_gemm!(panel8_q4_0x8, panel_avx2, BlockQ4_0, BlockQ8_0);
panel_grouped_gemm!(panel8_iq4_nlx8, panel_avx2, BlockIQ4NL, BlockQ8_0);
panel_grouped_gemm!(panel8_q4_1x8, panel_avx2, BlockQ4_1, BlockQ8_1);
panel_grouped_gemm!(panel_q5_0x8, panel, BlockQ5_0, BlockQ8_0);
panel_grouped_gemm!(panel8_q5_0x8, panel_avx2, BlockQ5_0, BlockQ8_0);
panel_gemm!(panel_q4_1, BlockQ4_1, BlockQ8_1);
panel_gemm!(panel_q5_0, BlockQ5_0, BlockQ8_0);
panel_gemm!(panel_q5_1, BlockQ5_1, BlockQ8_1);
panel_gemm!(panel_q8_0, BlockQ8_0, BlockQ8_0);
panel_gemm!(panel_iq4_nl, BlockIQ4NL, BlockQ8_0);

/// Prompt tokens on interleaved 8-row panels at the AVX2 level. SAFETY (all): installed by
/// `kernels` only when `detect()` found AVX2, FMA and F16C.
macro_rules! panel_avx2_gemm {
    ($name:ident, $w:ty, $a:ty) => {
        fn $name(w: &[$w], a: &ActBlocks<$a>, nb: usize, out: &mut Columns) {
            // SAFETY: see above.
            unsafe { panel_avx2::gemm(w, a, nb, out) }
        }
    };
}
panel_avx2_gemm!(panel8_q4_0, BlockQ4_0, BlockQ8_0);
panel_avx2_gemm!(panel8_q4_1, BlockQ4_1, BlockQ8_1);
panel_avx2_gemm!(panel8_q5_0, BlockQ5_0, BlockQ8_0);
panel_avx2_gemm!(panel8_q5_1, BlockQ5_1, BlockQ8_1);
panel_avx2_gemm!(panel8_q8_0, BlockQ8_0, BlockQ8_0);
panel_avx2_gemm!(panel8_iq4_nl, BlockIQ4NL, BlockQ8_0);

vnni_gemm!(vnni_q4_0, BlockQ4_0, BlockQ8_0);
vnni_gemm!(vnni_q4_1, BlockQ4_1, BlockQ8_1);
vnni_gemm!(vnni_q5_0, BlockQ5_0, BlockQ8_0);
vnni_gemm!(vnni_q8_0, BlockQ8_0, BlockQ8_0);
vnni_gemm!(vnni_q5_1, BlockQ5_1, BlockQ8_1);
vnni_gemm!(vnni_iq4_nl, BlockIQ4NL, BlockQ8_0);

/// Rows grouped eight at a time (`grouped`). SAFETY (all): installed by `kernels` only at
/// the level whose features each one enables, after detection.
macro_rules! grouped_gemm {
    ($name:ident, $kernel:ident, $nl:literal, $group:ty, $a:ty) => {
        fn $name(w: &[$group], a: &ActBlocks<$a>, nb: usize, n: usize, out: &mut [f32]) {
            // SAFETY: see above.
            unsafe { grouped::$kernel::<$nl, _, _>(w, a, nb, n, out) }
        }
    };
}
grouped_gemm!(grouped512_q4_0, gemm_avx512, false, Nibbles8, BlockQ8_0);
grouped_gemm!(grouped512_iq4_nl, gemm_avx512, true, Nibbles8, BlockQ8_0);
grouped_gemm!(grouped512_q4_1, gemm_avx512, false, NibblesMin8, BlockQ8_1);
grouped_gemm!(grouped512_q5_0, gemm_avx512, false, NibblesQh8, BlockQ8_0);
grouped_gemm!(grouped256_q4_0, gemm_avx2, false, Nibbles8, BlockQ8_0);
grouped_gemm!(grouped256_iq4_nl, gemm_avx2, true, Nibbles8, BlockQ8_0);
grouped_gemm!(grouped256_q4_1, gemm_avx2, false, NibblesMin8, BlockQ8_1);
grouped_gemm!(grouped256_q5_0, gemm_avx2, false, NibblesQh8, BlockQ8_0);
/// Q4_K, Q5_K, IQ4_XS, Q3_K and Q2_K groups (SAFETY: as above).
macro_rules! grouped_k_gemm {
    ($name:ident, $kernel:ident, $group:ty) => {
        fn $name(w: &[$group], a: &ActBlocks<BlockQ8K>, nb: usize, n: usize, out: &mut [f32]) {
            // SAFETY: see above.
            unsafe { grouped::$kernel(w, a.blocks, nb, n, out) }
        }
    };
}
grouped_k_gemm!(grouped512_q4_k, gemm_k_avx512, Q4K8);
grouped_k_gemm!(grouped512_q5_k, gemm_k_avx512, Q5K8);
grouped_k_gemm!(grouped256_q4_k, gemm_k_avx2, Q4K8);
grouped_k_gemm!(grouped256_q5_k, gemm_k_avx2, Q5K8);
grouped_k_gemm!(grouped512_iq4_xs, gemm_iq4xs_avx512, IQ4XS8);
grouped_k_gemm!(grouped256_iq4_xs, gemm_iq4xs_avx2, IQ4XS8);
grouped_k_gemm!(grouped512_q3_k, gemm_two_bit_avx512, Q3K8);
grouped_k_gemm!(grouped256_q3_k, gemm_two_bit_avx2, Q3K8);
grouped_k_gemm!(grouped512_q2_k, gemm_two_bit_avx512, Q2K8);
grouped_k_gemm!(grouped256_q2_k, gemm_two_bit_avx2, Q2K8);

/// Super-block types on the `kquant` tiles. SAFETY (all): installed by `kernels` only at
/// the Avx512 level (AVX-512 F/BW/VL/VNNI detected).
macro_rules! kquant_entry {
    ($name:ident, $w:ty, $gemm:ident) => {
        fn $name<const PF: bool>(
            w: &[$w],
            a: &ActBlocks<BlockQ8K>,
            nb: usize,
            n_tok: usize,
            out: &mut [f32],
        ) {
            // SAFETY: see above.
            unsafe { kquant::$gemm::<PF>(w, a.blocks, nb, n_tok, out) }
        }
    };
}

/// Whether the `kquant` decode tiles prefetch their weights ahead in software. On Intel
/// (the AMX Xeon) the hardware prefetcher alone left the tiles waiting on loads (+30–40%
/// tokens/s with the prefetch, `vnni::PREFETCH_BYTES`). On AMD Zen 4 (family 25) the
/// prefetch made them slower from memory (`examples/qmatmul 1 Q6_K,Q5_K,IQ4_XS 1
/// 2048x5632,5632x2048 16` at avx512, two interleaved runs: Q6_K 17–20 → 21–25 GB/s, Q5_K
/// 16–19 → 20–22, IQ4_XS 16–19 → 19–21; Q3_K and Q2_K, bound by unpacking, unchanged), so
/// it is off there. On Zen 5 (family 26) it is what keeps them fed: the same command, two
/// interleaved runs, 2026-12-05, with/without: avx512 Q5_K 29–34 against 10–12 GB/s, Q6_K
/// 39–43 against 30–35, Q3_K 23–25 against 14–19, IQ4_XS 33–38 against 23–29; avx2 Q6_K
/// 33–34 against 29–31. Zen 3 (family 25 too, model 1: an EPYC with AVX2 only) gains from
/// it as well, 2026-12-07: `qmatmul T F16,BF16,Q6_K 1 2048x5632,5632x2048 16` at avx2, six
/// interleaved runs each, with/without, 1 thread: F16 8.8–12.5 against 8.9–11.6 GB/s, BF16
/// 8.7–12.5 against 8.0–10.0, Q6_K 9.1–11.9 against 8.1–9.5; 2 threads: F16 14.7–21.7
/// against 13.2–17.1, BF16 16.4–20.6 against 13.5–16.8, Q6_K 14.5–19.9 against 11.7–16.3.
/// So it is off on Zen 4 alone.
fn prefetch_weights() -> bool {
    !zen4()
}

/// Whether the CPU is an AMD Zen 4 (family 25, whose other models are Zen 3): Genoa,
/// Raphael, Phoenix, Bergamo/Siena.
fn zen4() -> bool {
    amd() && cpu_family() == 25 && matches!(cpu_model(), 0x10..=0x1F | 0x60..=0x7F | 0xA0..=0xAF)
}

/// Whether the CPU is AMD's (CPUID leaf 0's vendor string).
fn amd() -> bool {
    let leaf0 = std::arch::x86_64::__cpuid(0);
    let vendor = [leaf0.ebx, leaf0.edx, leaf0.ecx].map(u32::to_le_bytes);
    vendor.concat() == b"AuthenticAMD"
}

/// The CPU's model (CPUID leaf 1: the base model, with the extended model as its high
/// nibble where the base family is 6 or 15), as /proc/cpuinfo's `model` shows it.
fn cpu_model() -> u32 {
    let eax = std::arch::x86_64::__cpuid(1).eax;
    let (base, family) = ((eax >> 4) & 0xF, (eax >> 8) & 0xF);
    if family == 0x6 || family == 0xF {
        base | (((eax >> 16) & 0xF) << 4)
    } else {
        base
    }
}

/// The CPU's family (CPUID leaf 1: the base family, plus the extended family where the
/// base is 15), as /proc/cpuinfo's `cpu family` shows it.
fn cpu_family() -> u32 {
    let eax = std::arch::x86_64::__cpuid(1).eax;
    let base = (eax >> 8) & 0xF;
    if base == 0xF {
        base + ((eax >> 20) & 0xFF)
    } else {
        base
    }
}
kquant_entry!(kquant_q2_k, BlockQ2K, gemm_q2k);
kquant_entry!(kquant_q3_k, BlockQ3K, gemm_q3k);
kquant_entry!(kquant_q4_k, BlockQ4K, gemm_q4k);
kquant_entry!(kquant_q5_k, BlockQ5K, gemm_q5k);
kquant_entry!(kquant_q6_k, BlockQ6K, gemm_q6k);
kquant_entry!(kquant_iq4_xs, BlockIQ4XS, gemm_iq4xs);

/// Prompt tokens of the super-block types on interleaved 16-row panels. SAFETY (all):
/// installed by `kernels` only when `detect()` found AVX-512 F/BW/VL/VNNI (with AVX2, FMA,
/// F16C).
macro_rules! kpanel_gemm {
    ($name:ident, $w:ty) => {
        fn $name(w: &[$w], a: &ActBlocks<BlockQ8K>, nb: usize, out: &mut Columns) {
            // SAFETY: see above.
            unsafe { kpanel::gemm(w, a.blocks, nb, out) }
        }
    };
}
kpanel_gemm!(kpanel_q2_k, BlockQ2K);
kpanel_gemm!(kpanel_q3_k, BlockQ3K);
kpanel_gemm!(kpanel_q4_k, BlockQ4K);
kpanel_gemm!(kpanel_q5_k, BlockQ5K);
kpanel_gemm!(kpanel_q6_k, BlockQ6K);
kpanel_gemm!(kpanel_iq4_xs, BlockIQ4XS);
/// Q4_K, Q5_K, IQ4_XS, Q3_K and Q2_K rows grouped at load, read in place by the panels (SAFETY:
/// as above).
fn kpanel_q4_kx8(w: &[Q4K8], a: &ActBlocks<BlockQ8K>, nb: usize, out: &mut Columns) {
    // SAFETY: see above.
    unsafe { kpanel::gemm(kunpack::GroupedRows(w), a.blocks, nb, out) }
}
fn kpanel_q5_kx8(w: &[Q5K8], a: &ActBlocks<BlockQ8K>, nb: usize, out: &mut Columns) {
    // SAFETY: see above.
    unsafe { kpanel::gemm(kunpack::GroupedRows(w), a.blocks, nb, out) }
}
fn kpanel_iq4_xsx8(w: &[IQ4XS8], a: &ActBlocks<BlockQ8K>, nb: usize, out: &mut Columns) {
    // SAFETY: see above.
    unsafe { kpanel::gemm(kunpack::GroupedRows(w), a.blocks, nb, out) }
}
fn kpanel_q3_kx8(w: &[Q3K8], a: &ActBlocks<BlockQ8K>, nb: usize, out: &mut Columns) {
    // SAFETY: see above.
    unsafe { kpanel::gemm(kunpack::GroupedRows(w), a.blocks, nb, out) }
}
fn kpanel_q2_kx8(w: &[Q2K8], a: &ActBlocks<BlockQ8K>, nb: usize, out: &mut Columns) {
    // SAFETY: see above.
    unsafe { kpanel::gemm(kunpack::GroupedRows(w), a.blocks, nb, out) }
}

/// Prompt tokens of the super-block types on interleaved 8-row panels at the AVX2 level.
/// SAFETY (all): installed by `kernels` only when `detect()` found AVX2, FMA and F16C.
macro_rules! kpanel_avx2_gemm {
    ($name:ident, $w:ty) => {
        fn $name(w: &[$w], a: &ActBlocks<BlockQ8K>, nb: usize, out: &mut Columns) {
            // SAFETY: see above.
            unsafe { kpanel_avx2::gemm(w, a.blocks, nb, out) }
        }
    };
}
kpanel_avx2_gemm!(prompt_q2_k, BlockQ2K);
kpanel_avx2_gemm!(prompt_q3_k, BlockQ3K);
kpanel_avx2_gemm!(prompt_q4_k, BlockQ4K);
kpanel_avx2_gemm!(prompt_q5_k, BlockQ5K);
kpanel_avx2_gemm!(prompt_q6_k, BlockQ6K);
kpanel_avx2_gemm!(prompt_iq4_xs, BlockIQ4XS);
/// Q4_K, Q5_K, IQ4_XS, Q3_K and Q2_K rows grouped at load, read in place by the panels (SAFETY:
/// as above).
fn prompt_q4_kx8(w: &[Q4K8], a: &ActBlocks<BlockQ8K>, nb: usize, out: &mut Columns) {
    // SAFETY: see above.
    unsafe { kpanel_avx2::gemm(kunpack::GroupedRows(w), a.blocks, nb, out) }
}
fn prompt_q5_kx8(w: &[Q5K8], a: &ActBlocks<BlockQ8K>, nb: usize, out: &mut Columns) {
    // SAFETY: see above.
    unsafe { kpanel_avx2::gemm(kunpack::GroupedRows(w), a.blocks, nb, out) }
}
fn prompt_iq4_xsx8(w: &[IQ4XS8], a: &ActBlocks<BlockQ8K>, nb: usize, out: &mut Columns) {
    // SAFETY: see above.
    unsafe { kpanel_avx2::gemm(kunpack::GroupedRows(w), a.blocks, nb, out) }
}
fn prompt_q3_kx8(w: &[Q3K8], a: &ActBlocks<BlockQ8K>, nb: usize, out: &mut Columns) {
    // SAFETY: see above.
    unsafe { kpanel_avx2::gemm(kunpack::GroupedRows(w), a.blocks, nb, out) }
}
fn prompt_q2_kx8(w: &[Q2K8], a: &ActBlocks<BlockQ8K>, nb: usize, out: &mut Columns) {
    // SAFETY: see above.
    unsafe { kpanel_avx2::gemm(kunpack::GroupedRows(w), a.blocks, nb, out) }
}

/// Kernels for an x86 level (`isa >= Avx2`).
///
/// # Safety
/// The CPU must support `isa` (`dispatch::detect() >= isa`): the table's safe function
/// pointers run that level's instructions unchecked. Only `Kernels::for_isa` calls this,
/// after capping the level by detection.
pub(crate) unsafe fn kernels(isa: Isa) -> Kernels {
    if isa.includes(Isa::Avx512) {
        let pf = prefetch_weights();
        // The K-quant tiles with or without the weights' software prefetch.
        macro_rules! kq {
            ($f:ident) => {
                if pf {
                    $f::<true>
                } else {
                    $f::<false>
                }
            };
        }
        return Kernels {
            isa,
            dot_f16: kq!(dot_f16_avx512),
            dot_bf16: kq!(dot_bf16_avx512),
            gemm_q4_0: vnni_q4_0,
            gemm_q4_1: vnni_q4_1,
            gemm_q5_0: vnni_q5_0,
            gemm_q8_0: vnni_q8_0,
            gemm_q5_1: vnni_q5_1,
            gemm_iq4_nl: vnni_iq4_nl,
            gemm_q4_k: kq!(kquant_q4_k),
            gemm_q6_k: kq!(kquant_q6_k),
            gemm_q2_k: kq!(kquant_q2_k),
            gemm_q3_k: kq!(kquant_q3_k),
            gemm_q5_k: kq!(kquant_q5_k),
            gemm_iq4_xs: kq!(kquant_iq4_xs),
            // Grouped rows at AMX too: the tiles decode each row from its group for a
            // prompt (`i8mat::matmul_grouped`), and generated tokens decode on the grouped
            // kernels.
            gemm_q4_0x8: Some(grouped512_q4_0),
            gemm_iq4_nlx8: Some(grouped512_iq4_nl),
            gemm_q4_1x8: Some(grouped512_q4_1),
            gemm_q5_0x8: Some(grouped512_q5_0),
            gemm_q4_kx8: Some(grouped512_q4_k),
            prefill_q4_kx8: Some(kpanel_q4_kx8),
            gemm_q5_kx8: Some(grouped512_q5_k),
            prefill_q5_kx8: Some(kpanel_q5_kx8),
            gemm_iq4_xsx8: Some(grouped512_iq4_xs),
            prefill_iq4_xsx8: Some(kpanel_iq4_xsx8),
            gemm_q3_kx8: Some(grouped512_q3_k),
            prefill_q3_kx8: Some(kpanel_q3_kx8),
            gemm_q2_kx8: Some(grouped512_q2_k),
            prefill_q2_kx8: Some(kpanel_q2_kx8),
            prefill_q4_0x8: Some(panel_q4_0x8),
            prefill_iq4_nlx8: Some(panel_iq4_nlx8),
            prefill_q4_1x8: Some(panel_q4_1x8),
            prefill_q5_0x8: Some(panel_q5_0x8),
            // Prompt tokens: the unpacked path reuses each row for many tokens (decoding
            // keeps the Q4_K/Q6_K tiles above).
            prefill_q4_0: Some(panel_q4_0),
            prefill_q4_1: Some(panel_q4_1),
            prefill_q5_0: Some(panel_q5_0),
            prefill_q5_1: Some(panel_q5_1),
            prefill_q8_0: Some(panel_q8_0),
            prefill_iq4_nl: Some(panel_iq4_nl),
            prefill_q4_k: Some(kpanel_q4_k),
            prefill_q6_k: Some(kpanel_q6_k),
            prefill_q5_k: Some(kpanel_q5_k),
            prefill_q2_k: Some(kpanel_q2_k),
            prefill_q3_k: Some(kpanel_q3_k),
            prefill_iq4_xs: Some(kpanel_iq4_xs),
            attend_f16: attend_f16_avx512,
            attend_f16_steps: ATTEND_F16_STEPS_AVX512,
            gelu: gelu_avx512,
            softmax: softmax_avx512,
            swiglu: swiglu_avx512,
            attend_rows: attend_rows_avx512,
            add_layer_norm: add_layer_norm_avx512,
            float_tiles: Some(crate::dispatch::FloatTiles {
                tokens: float_tiles::TOKENS_512,
                rows: float_tiles::ROWS_512,
                tile: float_tile_512,
                widen_f16,
                widen_bf16,
                f16_dots: None,
            }),
            // SAFETY: a CPU with the Avx512 level has the Avx2 level (`detect`); our caller
            // guarantees the former.
            ..unsafe { kernels(Isa::Avx2) }
        };
    }
    Kernels {
        quantize_q8_0,
        quantize_q8_1,
        quantize_q8_k,
        axpy_f16,
        axpy_f32,
        dequantize_q8_0,
        dequantize_q4_0,
        attend_f16,
        attend_f16_steps: ATTEND_F16_STEPS,
        attend_q8_0,
        attend_q4_0,
        gemm_q4_0,
        gemm_q4_1,
        gemm_q5_0,
        gemm_q8_0,
        gemm_q4_k,
        // AVX2 Q6_K on Zen 4 from memory, 1 thread (qmatmul as for `prefetch_weights`):
        // 19–20 GB/s with the prefetch, 22–23 without.
        gemm_q6_k: if prefetch_weights() {
            gemm_q6_k
        } else {
            gemm_q6_k_no_prefetch
        },
        isa,
        dot_f32,
        tile_f32_4x3,
        dot_f16: if prefetch_weights() {
            dot_f16::<true>
        } else {
            dot_f16::<false>
        },
        dot_q4_0,
        dot_q4_1,
        dot_q5_0,
        dot_q8_0,
        dot_q4_k,
        dot_q6_k,
        dot_q5_1,
        dot_q5_k,
        dot_q2_k,
        dot_q3_k,
        dot_iq4_nl,
        dot_iq4_xs,
        dot_bf16: if prefetch_weights() {
            dot_bf16::<true>
        } else {
            dot_bf16::<false>
        },
        gemm_q5_1,
        gemm_q5_k,
        gemm_q2_k,
        gemm_q3_k,
        gemm_iq4_nl,
        gemm_iq4_xs,
        gemm_q4_0x8: Some(grouped256_q4_0),
        gemm_iq4_nlx8: Some(grouped256_iq4_nl),
        gemm_q4_1x8: Some(grouped256_q4_1),
        gemm_q5_0x8: Some(grouped256_q5_0),
        gemm_q4_kx8: Some(grouped256_q4_k),
        prefill_q4_kx8: Some(prompt_q4_kx8),
        gemm_q5_kx8: Some(grouped256_q5_k),
        prefill_q5_kx8: Some(prompt_q5_kx8),
        gemm_iq4_xsx8: Some(grouped256_iq4_xs),
        prefill_iq4_xsx8: Some(prompt_iq4_xsx8),
        gemm_q3_kx8: Some(grouped256_q3_k),
        prefill_q3_kx8: Some(prompt_q3_kx8),
        gemm_q2_kx8: Some(grouped256_q2_k),
        prefill_q2_kx8: Some(prompt_q2_kx8),
        prefill_q4_0x8: Some(panel8_q4_0x8),
        prefill_iq4_nlx8: Some(panel8_iq4_nlx8),
        prefill_q4_1x8: Some(panel8_q4_1x8),
        prefill_q5_0x8: Some(panel8_q5_0x8),
        // Prompt tokens reuse each unpacked row for many tokens (decoding keeps the dot
        // products above).
        prefill_q4_0: Some(panel8_q4_0),
        prefill_q4_1: Some(panel8_q4_1),
        prefill_q5_0: Some(panel8_q5_0),
        prefill_q5_1: Some(panel8_q5_1),
        prefill_q8_0: Some(panel8_q8_0),
        prefill_iq4_nl: Some(panel8_iq4_nl),
        prefill_q2_k: Some(prompt_q2_k),
        prefill_q3_k: Some(prompt_q3_k),
        prefill_q4_k: Some(prompt_q4_k),
        prefill_q5_k: Some(prompt_q5_k),
        prefill_q6_k: Some(prompt_q6_k),
        prefill_iq4_xs: Some(prompt_iq4_xs),
        gelu: gelu_avx2,
        softmax: softmax_avx2,
        swiglu: swiglu_avx2,
        attend_rows: attend_rows_avx2,
        add_layer_norm: add_layer_norm_avx2,
        float_tiles: Some(crate::dispatch::FloatTiles {
            tokens: float_tiles::TOKENS_AVX2,
            rows: float_tiles::ROWS_AVX2,
            tile: float_tile_avx2,
            widen_f16,
            widen_bf16,
            // F16 on dot tiles, which widen rows and tokens as they read them: on Zen 3,
            // 16-token prompts 1.1–1.3× the widened tiles' rate and 512-token ones even.
            // BF16 stays on the widened tiles: its two-instruction widening made its dot
            // tiles slower there.
            f16_dots: Some(crate::dispatch::FloatDots {
                rows: float_tiles::DOT_ROWS_AVX2,
                tokens: float_tiles::DOT_TOKENS_AVX2,
                tile: float_dots_f16,
            }),
        }),
    }
}

/// Whether this CPU has AVX512-BF16 and issues `vdpbf16ps` at the rate of an f32 FMA, so
/// that bf16 products do twice the multiply-adds per instruction. AMD's (Zen 4 and 5; 32
/// multiply-adds per cycle against 16 for 512-bit FMAs, measured on Zen 4) do; on the Intel
/// cores measured (Sapphire Rapids, run at the Avx512 level) they issue at a quarter of the
/// FMA rate, and those cores have AMX tiles for bf16 anyway.
pub fn fast_bf16_dot_products() -> bool {
    static FAST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FAST.get_or_init(|| amd() && std::arch::is_x86_feature_detected!("avx512bf16"))
}

#[cfg(test)]
mod tests {
    /// The family and model `prefetch_weights` picks by are the ones Linux reports.
    #[test]
    fn cpu_family_and_model_match_proc_cpuinfo() {
        let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        let field = |name: &str| {
            let line = info
                .lines()
                .find(|l| l.split(':').next().map(str::trim) == Some(name));
            line.and_then(|l| l.split(':').nth(1)?.trim().parse::<u32>().ok())
        };
        assert_eq!(Some(super::cpu_family()), field("cpu family"));
        assert_eq!(Some(super::cpu_model()), field("model"));
    }
}
