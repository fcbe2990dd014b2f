//! The AMX-INT8 tile products (prefill, batches of at least `i8mat::MIN_TOKENS` tokens) of
//! every quantized weight type against the scalar dot products of the same quantized
//! activations (Q6_K's prompts take the AVX-512 panels at that level, so its case checks
//! those). Integer sums are exact in both; only float rounding differs (per-group
//! scaling in the tiles, per-block in the reference), so the tolerance is 1e-5 of
//! Σ|wᵢ·xᵢ| plus 1e-6. Runs only where the tiles are in force (dispatch level `amx`):
//! elsewhere the same product would run the level's own kernels (or, for types without
//! SIMD kernels, the reference against itself), which `kernels.rs` covers; here it checks
//! that nothing is staged for tiles, and records that the `amx` level was not tested.

mod common;

use bytemuck::{Pod, Zeroable};
use half::f16;
use hearth_quant::blocks::*;
use hearth_quant::reference as r;
use hearth_quant::{i8mat, ActType, Activations, GgmlType, QMatrix};
use proptest::prelude::*;

/// `rows` random weight blocks per row of type `T`, each f16 scale made finite by `fix`.
fn blocks<T: Pod>(raw: &[u8], n: usize, fix: impl Fn(&mut T, f32)) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    (0..n)
        .map(|i| {
            let mut b = T::zeroed();
            let bytes = bytemuck::bytes_of_mut(&mut b);
            for (j, v) in bytes.iter_mut().enumerate() {
                *v = raw[(i * size + j) % raw.len()] ^ (i as u8).wrapping_mul(31);
            }
            let first = bytemuck::bytes_of(&b)[0] as f32;
            fix(&mut b, ((i as f32 * 0.37).sin() + first / 255.0) * 0.5);
            b
        })
        .collect()
}

fn h(v: f32) -> f16 {
    f16::from_f32(v)
}

struct Case<'a> {
    what: &'static str,
    ty: GgmlType,
    bytes: &'a [u8],
    rows: usize,
    cols: usize,
    act: ActType,
    /// Reference: row `r` (its dequantized values) · token `t` (its dequantized values).
    reference: &'a dyn Fn(usize, usize) -> (f32, f64),
}

fn check(c: &Case, x: &[f32], n_tok: usize) {
    let m = QMatrix::new(c.what, c.ty, c.cols, c.rows, c.bytes).unwrap();
    let mut acts = Activations::default();
    acts.quantize(c.act, x, c.cols);
    assert_eq!(acts.staged_tokens(), n_tok);
    let mut got = vec![f32::NAN; n_tok * c.rows];
    m.matmul(&acts, &mut got, &mut Vec::new());
    for t in 0..n_tok {
        for row in 0..c.rows {
            let (want, magnitude) = (c.reference)(row, t);
            let g = got[t * c.rows + row];
            let tol = 1e-5 * magnitude + 1e-6;
            assert!(
                ((g - want) as f64).abs() <= tol,
                "{}: row {row} token {t}: {g} vs reference {want} (tol {tol})",
                c.what
            );
        }
    }
    // Rows grouped eight at a time at load (where the level groups this type) are decoded
    // from their groups by the tiles: the same bits.
    if let Some(groups) = m.interleave() {
        let grouped = QMatrix::from_interleaved(c.what, c.ty, c.cols, c.rows, &groups).unwrap();
        let mut again = vec![f32::NAN; n_tok * c.rows];
        grouped.matmul(&acts, &mut again, &mut Vec::new());
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&again), bits(&got), "{}: grouped rows", c.what);
    }
}

fn magnitude(w: &[f32], x: &[f32]) -> f64 {
    w.iter()
        .zip(x)
        .map(|(a, b)| (*a as f64 * *b as f64).abs())
        .sum()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn tiles_match_reference_dots(
        n_tok in 16usize..40,
        rows in 1usize..40,
        blocks_per_row in 1usize..4,
        extra_32 in prop_oneof![Just(0usize), 0usize..8],
        raw in prop::collection::vec(any::<u8>(), 64..512),
        seed in prop::collection::vec(-4.0f32..4.0, 1..64),
    ) {
        // Columns: a multiple of 256 (K-quants) for every type, so one activation set serves.
        let tiles = i8mat::Staged::available();
        common::record("i8_tiles", if tiles { &[hearth_quant::dispatch::Isa::Amx] } else { &[] });
        let cols = 256 * blocks_per_row + 32 * extra_32;
        let x: Vec<f32> = (0..n_tok * cols)
            .map(|i| seed[i % seed.len()] * (1.0 + (i as f32 * 0.11).cos()))
            .collect();
        let tok = |t: usize| &x[t * cols..(t + 1) * cols];
        let (nb, nbk) = (cols / QK, cols / QK_K);
        let k_quants = cols % QK_K == 0;
        let q8_0: Vec<Vec<BlockQ8_0>> = (0..n_tok).map(|t| {
            let mut y = vec![BlockQ8_0::zeroed(); nb];
            r::quantize_row_q8_0(tok(t), &mut y);
            y
        }).collect();
        let q8_1: Vec<Vec<BlockQ8_1>> = (0..n_tok).map(|t| {
            let mut y = vec![BlockQ8_1::zeroed(); nb];
            r::quantize_row_q8_1(tok(t), &mut y);
            y
        }).collect();
        let q8k: Vec<Vec<BlockQ8K>> = (0..n_tok).map(|t| {
            let mut y = vec![BlockQ8K::zeroed(); nbk];
            r::quantize_row_q8_k(&tok(t)[..nbk * QK_K], &mut y);
            y
        }).collect();
        if !tiles {
            // Not comparing anything here: say so in the record (above), check no staging.
            let mut acts = Activations::default();
            acts.quantize(ActType::Q8_0, &x, cols);
            prop_assert_eq!(acts.staged_tokens(), 0);
            return Ok(());
        }
        let xf: Vec<Vec<f32>> = q8_0.iter().map(|y| {
            let mut v = vec![0.0; cols];
            r::dequantize_row_q8_0(y, &mut v);
            v
        }).collect();
        let wf = vec![0.0; cols];

        macro_rules! case {
            ($what:expr, $ty:expr, $blk:ty, $per:expr, $fix:expr, $act:expr, $acts:expr, $dot:expr, $deq:expr) => {{
                let w: Vec<$blk> = blocks(&raw, rows * $per, $fix);
                let reference = |row: usize, t: usize| {
                    let wr = &w[row * $per..(row + 1) * $per];
                    let mut wf = wf.clone();
                    $deq(wr, &mut wf);
                    ($dot(wr, &$acts[t][..]), magnitude(&wf, &xf[t]))
                };
                check(&Case {
                    what: $what, ty: $ty, bytes: bytemuck::cast_slice(&w), rows, cols,
                    act: $act, reference: &reference,
                }, &x, n_tok);
            }};
        }
        case!("q4_0", GgmlType::Q4_0, BlockQ4_0, nb, |b: &mut BlockQ4_0, d| b.d = h(d),
            ActType::Q8_0, q8_0, r::vec_dot_q4_0_q8_0, r::dequantize_row_q4_0);
        case!("q4_1", GgmlType::Q4_1, BlockQ4_1, nb, |b: &mut BlockQ4_1, d| { b.d = h(d); b.m = h(-d / 3.0) },
            ActType::Q8_1, q8_1, r::vec_dot_q4_1_q8_1, r::dequantize_row_q4_1);
        case!("q5_0", GgmlType::Q5_0, BlockQ5_0, nb, |b: &mut BlockQ5_0, d| b.d = h(d),
            ActType::Q8_0, q8_0, r::vec_dot_q5_0_q8_0, r::dequantize_row_q5_0);
        case!("q5_1", GgmlType::Q5_1, BlockQ5_1, nb, |b: &mut BlockQ5_1, d| { b.d = h(d); b.m = h(d / 5.0) },
            ActType::Q8_1, q8_1, r::vec_dot_q5_1_q8_1, r::dequantize_row_q5_1);
        case!("q8_0", GgmlType::Q8_0, BlockQ8_0, nb, |b: &mut BlockQ8_0, d| { b.d = h(d); for q in b.qs.iter_mut() { *q = (*q).max(-127) } },
            ActType::Q8_0, q8_0, r::vec_dot_q8_0_q8_0, r::dequantize_row_q8_0);
        case!("iq4_nl", GgmlType::IQ4_NL, BlockIQ4NL, nb, |b: &mut BlockIQ4NL, d| b.d = h(d / 64.0),
            ActType::Q8_0, q8_0, r::vec_dot_iq4_nl_q8_0, r::dequantize_row_iq4_nl);
        if !k_quants { return Ok(()); }
        case!("q4_K", GgmlType::Q4_K, BlockQ4K, nbk, |b: &mut BlockQ4K, d| { b.d = h(d); b.dmin = h(d.abs() / 4.0) },
            ActType::Q8K, q8k, r::vec_dot_q4_k_q8_k, r::dequantize_row_q4_k);
        case!("q5_K", GgmlType::Q5_K, BlockQ5K, nbk, |b: &mut BlockQ5K, d| { b.d = h(d); b.dmin = h(d.abs() / 4.0) },
            ActType::Q8K, q8k, r::vec_dot_q5_k_q8_k, r::dequantize_row_q5_k);
        case!("q6_K", GgmlType::Q6_K, BlockQ6K, nbk, |b: &mut BlockQ6K, d| b.d = h(d / 16.0),
            ActType::Q8K, q8k, r::vec_dot_q6_k_q8_k, r::dequantize_row_q6_k);
        case!("q2_K", GgmlType::Q2_K, BlockQ2K, nbk, |b: &mut BlockQ2K, d| { b.d = h(d); b.dmin = h(d.abs() / 4.0) },
            ActType::Q8K, q8k, r::vec_dot_q2_k_q8_k, r::dequantize_row_q2_k);
        case!("q3_K", GgmlType::Q3_K, BlockQ3K, nbk, |b: &mut BlockQ3K, d| b.d = h(d / 16.0),
            ActType::Q8K, q8k, r::vec_dot_q3_k_q8_k, r::dequantize_row_q3_k);
        case!("iq4_xs", GgmlType::IQ4_XS, BlockIQ4XS, nbk, |b: &mut BlockIQ4XS, d| b.d = h(d / 1024.0),
            ActType::Q8K, q8k, r::vec_dot_iq4_xs_q8_k, r::dequantize_row_iq4_xs);
    }
}
