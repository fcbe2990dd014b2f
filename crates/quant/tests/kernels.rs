//! Every SIMD kernel against the scalar reference on random blocks, at every dispatch
//! level this CPU has. Integer sums are exact in both; only float accumulation order
//! differs, so the tolerance is relative to Σ|xᵢ·yᵢ|: 1e-5 of it, plus 1e-6.

mod common;

use bytemuck::Zeroable;
use half::f16;
use hearth_quant::blocks::*;
use hearth_quant::dispatch::{Kernels, Prefill};
use hearth_quant::pool::OutColumns;
use hearth_quant::reference as r;
use hearth_quant::ActBlocks;
use proptest::prelude::*;

fn levels() -> Vec<Kernels> {
    common::levels("kernels")
}

/// Random weight blocks of type `T` from raw bytes, with every f16 scale made finite.
fn blocks<T: bytemuck::Pod>(bytes: &[u8], fix: impl Fn(&mut T, f32)) -> Vec<T> {
    let size = std::mem::size_of::<T>();
    bytes
        .chunks_exact(size)
        .enumerate()
        .map(|(i, c)| {
            let mut b = T::zeroed();
            bytemuck::bytes_of_mut(&mut b).copy_from_slice(c);
            fix(
                &mut b,
                ((i as f32 * 0.37).sin() + c[0] as f32 / 255.0) * 0.5,
            );
            b
        })
        .collect()
}

/// Runs a prompt kernel into a token-major result and returns it row-major
/// (`got[r * n_tok + t]`, as the checks read it). Where there are more than 16 rows they go
/// in two tasks' columns (rows 0..16 and the rest), as the thread pool splits them.
fn prefill_rows<W, A>(
    prefill: Prefill<W, A>,
    w: &[W],
    a: &ActBlocks<A>,
    nb: usize,
    n_tok: usize,
    got: &mut [f32],
) {
    let rows = w.len() / nb;
    let mut token_major = vec![f32::NAN; n_tok * rows];
    let columns = OutColumns::new(&mut token_major, n_tok, rows);
    let split = if rows > 16 { 16 } else { rows };
    columns.with(0, split, |o| prefill(&w[..split * nb], a, nb, o));
    if split < rows {
        columns.with(split, rows - split, |o| prefill(&w[split * nb..], a, nb, o));
    }
    for t in 0..n_tok {
        for r in 0..rows {
            got[r * n_tok + t] = token_major[t * rows + r];
        }
    }
}

/// `in_place` (the panels reading `file`'s rows grouped eight at a time) against `plain`
/// (the file's rows), bit for bit, run as the model runs them: tasks of whole 16-row
/// panels (two groups).
fn grouped_prompt_equals_file<B: Groupable, A>(
    k: &Kernels,
    file: &[B],
    a: &ActBlocks<A>,
    nb: usize,
    n_tok: usize,
    in_place: Option<Prefill<B::Group, A>>,
    plain: Option<Prefill<B, A>>,
) -> Result<(), TestCaseError> {
    let (Some(in_place), Some(plain)) = (in_place, plain) else {
        return Ok(());
    };
    let rows = file.len() / nb;
    let grouped = hearth_quant::interleave8(file, nb);
    let mut want = vec![f32::NAN; rows * n_tok];
    prefill_rows(plain, file, a, nb, n_tok, &mut want);
    let mut token_major = vec![f32::NAN; n_tok * rows];
    let columns = OutColumns::new(&mut token_major, n_tok, rows);
    for r0 in (0..rows).step_by(16) {
        let n = (rows - r0).min(16);
        columns.with(r0, n, |o| {
            in_place(&grouped[r0 / 8 * nb..(r0 + n) / 8 * nb], a, nb, o)
        });
    }
    for (i, w) in want.iter().enumerate() {
        let got = token_major[(i % n_tok) * rows + i / n_tok];
        prop_assert!(
            got.to_bits() == w.to_bits(),
            "{:?} row {} token {}: {} vs {}",
            k.isa,
            i / n_tok,
            i % n_tok,
            got,
            w
        );
    }
    Ok(())
}

/// A level's kernel for grouped rows of `B` against activations `A`, if it has one.
type GroupedKernel<B, A> =
    fn(&Kernels) -> Option<hearth_quant::dispatch::Gemm<<B as Groupable>::Group, A>>;

/// Activations for `check_grouped`: the blocks (`nb` per token), their `d` and `s` where the
/// kernels take them (Q8_0; empty for Q8_K), and their values.
struct GroupedActs<'a, A> {
    y: &'a [A],
    d: &'a [f32],
    s: &'a [f32],
    values: &'a [f32],
}

impl<A> GroupedActs<'_, A> {
    /// Tokens `t..` as the kernels take them.
    fn from(&self, t: usize, nb: usize) -> ActBlocks<'_, A> {
        ActBlocks {
            blocks: &self.y[t * nb..],
            d: self.d.get(t * nb..).unwrap_or(&[]),
            s: self.s.get(t * nb..).unwrap_or(&[]),
        }
    }
}

/// See `grouped_rows_match_reference`: `file` (`nb` blocks per row, whole groups of eight
/// rows) grouped, against activations `acts` (`nb` blocks per token), at every level.
fn check_grouped<B: Groupable, A>(
    ty: hearth_quant::GgmlType,
    file: &[B],
    nb: usize,
    acts: &GroupedActs<A>,
    kernel: GroupedKernel<B, A>,
    dot: fn(&[B], &[A]) -> f32,
) -> Result<(), TestCaseError> {
    use hearth_quant::{interleave8, ungroup, QMatrix};
    let (rows, n, n_tok) = (file.len() / nb, nb * B::LEN, acts.y.len() / nb);
    let grouped = interleave8(file, nb);
    let back = ungroup::<B>(&grouped, nb);
    prop_assert!(bytemuck::cast_slice::<_, u8>(&back) == bytemuck::cast_slice::<_, u8>(file));
    let m = QMatrix::from_interleaved("w", ty, n, rows, bytemuck::cast_slice(&grouped)).unwrap();
    let plain = QMatrix::new("w", ty, n, rows, bytemuck::cast_slice(file)).unwrap();
    let (mut wf, mut row) = (vec![0.0; rows * n], vec![0.0; n]);
    for r0 in 0..rows {
        plain.dequantize_row(r0, &mut wf[r0 * n..(r0 + 1) * n]);
        m.dequantize_row(r0, &mut row);
        prop_assert!(
            row == wf[r0 * n..(r0 + 1) * n],
            "{:?} grouped row {}",
            ty,
            r0
        );
    }
    for k in levels() {
        let Some(gemm) = kernel(&k) else { continue };
        let mut got = vec![f32::NAN; rows * n_tok];
        gemm(&grouped, &acts.from(0, nb), nb, n_tok, &mut got);
        for r0 in 0..rows {
            for t in 0..n_tok {
                let (wr, at) = (&file[r0 * nb..(r0 + 1) * nb], &acts.y[t * nb..(t + 1) * nb]);
                let mag = magnitude(&wf[r0 * n..(r0 + 1) * n], &acts.values[t * n..(t + 1) * n]);
                let what = format!("{:?} {ty:?} grouped", k.isa);
                close(got[r0 * n_tok + t], dot(wr, at), mag, &what);
            }
        }
        for t in 0..n_tok {
            let mut alone = vec![f32::NAN; rows];
            gemm(&grouped, &acts.from(t, nb), nb, 1, &mut alone);
            for r0 in 0..rows {
                let batched = got[r0 * n_tok + t];
                prop_assert!(
                    alone[r0].to_bits() == batched.to_bits(),
                    "{:?} {ty:?} token {t} alone {} vs batched {batched}",
                    k.isa,
                    alone[r0]
                );
            }
        }
    }
    Ok(())
}

fn h(v: f32) -> f16 {
    f16::from_f32(v)
}

fn close(got: f32, want: f32, magnitude: f64, what: &str) {
    let tol = 1e-5 * magnitude + 1e-6;
    assert!(
        ((got - want) as f64).abs() <= tol,
        "{what}: {got} vs reference {want} (tol {tol})"
    );
}

fn magnitude(x: &[f32], y: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(a, b)| (*a as f64 * *b as f64).abs())
        .sum()
}

fn acts(n: usize, seed: &[f32]) -> Vec<f32> {
    (0..n)
        .map(|i| seed[i % seed.len()] * (1.0 + (i as f32 * 0.11).cos()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn q32_kernels_match_reference(
        nb in 1usize..9,
        raw in prop::collection::vec(any::<u8>(), 34 * 8),
        seed in prop::collection::vec(-4.0f32..4.0, 1..64),
    ) {
        let n = nb * QK;
        let x = acts(n, &seed);
        let mut y0 = vec![BlockQ8_0::zeroed(); nb];
        let mut y1 = vec![BlockQ8_1::zeroed(); nb];
        r::quantize_row_q8_0(&x, &mut y0);
        r::quantize_row_q8_1(&x, &mut y1);
        let mut yf = vec![0.0; n];
        r::dequantize_row_q8_0(&y0, &mut yf);
        let mut w = vec![0.0; n];

        let q40: Vec<BlockQ4_0> = blocks(&raw[..18 * nb], |b: &mut BlockQ4_0, d| b.d = h(d));
        let q41: Vec<BlockQ4_1> = blocks(&raw[..20 * nb], |b: &mut BlockQ4_1, d| { b.d = h(d); b.m = h(-d / 3.0) });
        let q50: Vec<BlockQ5_0> = blocks(&raw[..22 * nb], |b: &mut BlockQ5_0, d| b.d = h(d));
        let mut q80: Vec<BlockQ8_0> = blocks(&raw[..34 * nb], |b: &mut BlockQ8_0, d| b.d = h(d));
        for b in q80.iter_mut() { for q in b.qs.iter_mut() { *q = (*q).max(-127); } }

        for k in levels() {
            r::dequantize_row_q4_0(&q40, &mut w);
            close((k.dot_q4_0)(&q40, &y0), r::vec_dot_q4_0_q8_0(&q40, &y0), magnitude(&w, &yf), "q4_0");
            r::dequantize_row_q4_1(&q41, &mut w);
            close((k.dot_q4_1)(&q41, &y1), r::vec_dot_q4_1_q8_1(&q41, &y1), magnitude(&w, &yf), "q4_1");
            r::dequantize_row_q5_0(&q50, &mut w);
            close((k.dot_q5_0)(&q50, &y0), r::vec_dot_q5_0_q8_0(&q50, &y0), magnitude(&w, &yf), "q5_0");
            r::dequantize_row_q8_0(&q80, &mut w);
            close((k.dot_q8_0)(&q80, &y0), r::vec_dot_q8_0_q8_0(&q80, &y0), magnitude(&w, &yf), "q8_0");
        }
    }

    /// Q4_0, IQ4_NL, Q4_1, Q5_0, Q4_K, Q5_K, IQ4_XS, Q3_K and Q2_K rows grouped eight at a time: every (row,
    /// token) against the reference dot product, each token alone bit for bit what it got
    /// with the others (batched decoding), and the grouping undone and dequantized exactly.
    #[test]
    fn grouped_rows_match_reference(
        nb in 1usize..6,
        groups in 1usize..4,
        n_tok in 1usize..8,
        raw in prop::collection::vec(any::<u8>(), 176 * 3 * 24),
        seed in prop::collection::vec(-4.0f32..4.0, 1..64),
    ) {
        use hearth_quant::GgmlType;
        let rows = 8 * groups;
        let x = acts(n_tok * nb * QK, &seed);
        let mut y = vec![BlockQ8_0::zeroed(); n_tok * nb];
        r::quantize_row_q8_0(&x, &mut y);
        let d: Vec<f32> = y.iter().map(|b| b.d.to_f32()).collect();
        let s: Vec<f32> = y
            .iter()
            .map(|b| b.d.to_f32() * b.qs.iter().map(|&q| q as i32).sum::<i32>() as f32)
            .collect();
        let mut values = vec![0.0; x.len()];
        r::dequantize_row_q8_0(&y, &mut values);
        let q8 = GroupedActs { y: &y, d: &d, s: &s, values: &values };
        let q40: Vec<BlockQ4_0> = blocks(&raw[..18 * rows * nb], |b: &mut BlockQ4_0, d| b.d = h(d));
        let nl4: Vec<BlockIQ4NL> = blocks(&raw[..18 * rows * nb], |b: &mut BlockIQ4NL, d| b.d = h(d / 16.0));
        check_grouped(GgmlType::Q4_0, &q40, nb, &q8, |k| k.gemm_q4_0x8, r::vec_dot_q4_0_q8_0)?;
        check_grouped(GgmlType::IQ4_NL, &nl4, nb, &q8, |k| k.gemm_iq4_nlx8, r::vec_dot_iq4_nl_q8_0)?;
        let q50: Vec<BlockQ5_0> = blocks(&raw[..22 * rows * nb], |b: &mut BlockQ5_0, d| b.d = h(d));
        check_grouped(GgmlType::Q5_0, &q50, nb, &q8, |k| k.gemm_q5_0x8, r::vec_dot_q5_0_q8_0)?;
        // Q4_1 against Q8_1 (its `s` as the kernels take it: the block's f16 `s`), mins of
        // either sign.
        let mut y1 = vec![BlockQ8_1::zeroed(); n_tok * nb];
        r::quantize_row_q8_1(&x, &mut y1);
        let d1: Vec<f32> = y1.iter().map(|b| b.d.to_f32()).collect();
        let s1: Vec<f32> = y1.iter().map(|b| b.s.to_f32()).collect();
        let values1: Vec<f32> = y1.iter().flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d.to_f32())).collect();
        let q81 = GroupedActs { y: &y1, d: &d1, s: &s1, values: &values1 };
        let q41: Vec<BlockQ4_1> = blocks(&raw[..20 * rows * nb], |b: &mut BlockQ4_1, d| { b.d = h(d); b.m = h(-d / 3.0) });
        check_grouped(GgmlType::Q4_1, &q41, nb, &q81, |k| k.gemm_q4_1x8, r::vec_dot_q4_1_q8_1)?;
        // Q4_K: up to 3 super-blocks a row against Q8_K (every scale and min bit random).
        let nbk = nb.min(3);
        let xk = acts(n_tok * nbk * QK_K, &seed);
        let mut yk = vec![BlockQ8K::zeroed(); n_tok * nbk];
        r::quantize_row_q8_k(&xk, &mut yk);
        let values: Vec<f32> = yk.iter().flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d)).collect();
        let q8k = GroupedActs { y: &yk, d: &[], s: &[], values: &values };
        let q4k: Vec<BlockQ4K> = blocks(&raw[..144 * rows * nbk], |b: &mut BlockQ4K, d| { b.d = h(d); b.dmin = h(d.abs() / 4.0) });
        check_grouped(GgmlType::Q4_K, &q4k, nbk, &q8k, |k| k.gemm_q4_kx8, r::vec_dot_q4_k_q8_k)?;
        // Q5_K: every fifth bit random too.
        let q5k: Vec<BlockQ5K> = blocks(&raw[..176 * rows * nbk], |b: &mut BlockQ5K, d| { b.d = h(d); b.dmin = h(d.abs() / 4.0) });
        check_grouped(GgmlType::Q5_K, &q5k, nbk, &q8k, |k| k.gemm_q5_kx8, r::vec_dot_q5_k_q8_k)?;
        let xs4: Vec<BlockIQ4XS> = blocks(&raw[..136 * rows * nbk], |b: &mut BlockIQ4XS, d| b.d = h(d / 16.0));
        check_grouped(GgmlType::IQ4_XS, &xs4, nbk, &q8k, |k| k.gemm_iq4_xsx8, r::vec_dot_iq4_xs_q8_k)?;
        // Q3_K: every scale, low and high bit random.
        let q3k: Vec<BlockQ3K> = blocks(&raw[..110 * rows * nbk], |b: &mut BlockQ3K, d| b.d = h(d));
        check_grouped(GgmlType::Q3_K, &q3k, nbk, &q8k, |k| k.gemm_q3_kx8, r::vec_dot_q3_k_q8_k)?;
        // Q2_K: every scale, min and value random.
        let q2k: Vec<BlockQ2K> = blocks(&raw[..84 * rows * nbk], |b: &mut BlockQ2K, d| { b.d = h(d); b.dmin = h(d.abs() / 4.0) });
        check_grouped(GgmlType::Q2_K, &q2k, nbk, &q8k, |k| k.gemm_q2_kx8, r::vec_dot_q2_k_q8_k)?;
    }

    /// The prompt panels reading grouped Q4_K, Q5_K, IQ4_XS, Q3_K and Q2_K rows in place
    /// (`prefill_*x8`) give, bit for bit, what the file's rows give (`prefill_q4_k`,
    /// `prefill_q5_k`, `prefill_iq4_xs`, `prefill_q3_k`, `prefill_q2_k`), whose kernels are checked against the reference
    /// in `k_quant_tiles_match_reference`.
    #[test]
    fn grouped_k_prompts_equal_file_rows(
        nb in 1usize..4,
        groups in 1usize..4,
        // Past 8 tokens (the panels' token tiles) and 16 (the AVX2 passes).
        n_tok in prop_oneof![1usize..4, 15usize..19],
        raw in prop::collection::vec(any::<u8>(), 176 * 3 * 24),
        seed in prop::collection::vec(-4.0f32..4.0, 1..64),
    ) {
        let rows = 8 * groups;
        let x = acts(n_tok * nb * QK_K, &seed);
        let mut yk = vec![BlockQ8K::zeroed(); n_tok * nb];
        r::quantize_row_q8_k(&x, &mut yk);
        let a = ActBlocks { blocks: &yk, d: &[], s: &[] };
        let q4k: Vec<BlockQ4K> = blocks(&raw[..144 * rows * nb], |b: &mut BlockQ4K, d| { b.d = h(d); b.dmin = h(d.abs() / 4.0) });
        let q5k: Vec<BlockQ5K> = blocks(&raw[..176 * rows * nb], |b: &mut BlockQ5K, d| { b.d = h(d); b.dmin = h(d.abs() / 4.0) });
        let xs4: Vec<BlockIQ4XS> = blocks(&raw[..136 * rows * nb], |b: &mut BlockIQ4XS, d| b.d = h(d / 16.0));
        let q3k: Vec<BlockQ3K> = blocks(&raw[..110 * rows * nb], |b: &mut BlockQ3K, d| b.d = h(d));
        let q2k: Vec<BlockQ2K> = blocks(&raw[..84 * rows * nb], |b: &mut BlockQ2K, d| { b.d = h(d); b.dmin = h(d.abs() / 4.0) });
        for k in levels() {
            // Where a level groups these rows, its prompts read them in place.
            prop_assert_eq!(k.gemm_q4_kx8.is_some(), k.prefill_q4_kx8.is_some(), "{:?}", k.isa);
            prop_assert_eq!(k.gemm_q5_kx8.is_some(), k.prefill_q5_kx8.is_some(), "{:?}", k.isa);
            grouped_prompt_equals_file(&k, &q4k, &a, nb, n_tok, k.prefill_q4_kx8, k.prefill_q4_k)?;
            grouped_prompt_equals_file(&k, &q5k, &a, nb, n_tok, k.prefill_q5_kx8, k.prefill_q5_k)?;
            prop_assert_eq!(k.gemm_iq4_xsx8.is_some(), k.prefill_iq4_xsx8.is_some(), "{:?}", k.isa);
            grouped_prompt_equals_file(&k, &xs4, &a, nb, n_tok, k.prefill_iq4_xsx8, k.prefill_iq4_xs)?;
            prop_assert_eq!(k.gemm_q3_kx8.is_some(), k.prefill_q3_kx8.is_some(), "{:?}", k.isa);
            grouped_prompt_equals_file(&k, &q3k, &a, nb, n_tok, k.prefill_q3_kx8, k.prefill_q3_k)?;
            prop_assert_eq!(k.gemm_q2_kx8.is_some(), k.prefill_q2_kx8.is_some(), "{:?}", k.isa);
            grouped_prompt_equals_file(&k, &q2k, &a, nb, n_tok, k.prefill_q2_kx8, k.prefill_q2_k)?;
        }
    }

    /// The prompt panels reading grouped Q4_0, IQ4_NL, Q4_1 and Q5_0 rows in place
    /// (`prefill_*x8`) give, bit for bit, what the file's rows give (`prefill_*`, checked
    /// against the reference in `q32_tiles_match_reference`).
    #[test]
    fn grouped_q32_prompts_equal_file_rows(
        // Past 16 blocks (the panels' chunks).
        nb in prop_oneof![1usize..4, 16usize..19],
        groups in 1usize..5,
        // Past 8 tokens (the AVX-512 panels' token tiles; 4 at AVX2).
        n_tok in prop_oneof![1usize..4, 7usize..10],
        raw in prop::collection::vec(any::<u8>(), 22 * 18 * 32),
        seed in prop::collection::vec(-4.0f32..4.0, 1..64),
    ) {
        let rows = 8 * groups;
        let x = acts(n_tok * nb * QK, &seed);
        let mut y0 = vec![BlockQ8_0::zeroed(); n_tok * nb];
        r::quantize_row_q8_0(&x, &mut y0);
        let d0: Vec<f32> = y0.iter().map(|b| b.d.to_f32()).collect();
        let s0: Vec<f32> = y0.iter().map(|b| b.d.to_f32() * b.qs.iter().map(|&q| q as i32).sum::<i32>() as f32).collect();
        let a0 = ActBlocks { blocks: &y0, d: &d0, s: &s0 };
        let mut y1 = vec![BlockQ8_1::zeroed(); n_tok * nb];
        r::quantize_row_q8_1(&x, &mut y1);
        let d1: Vec<f32> = y1.iter().map(|b| b.d.to_f32()).collect();
        let s1: Vec<f32> = y1.iter().map(|b| b.s.to_f32()).collect();
        let a1 = ActBlocks { blocks: &y1, d: &d1, s: &s1 };
        let q40: Vec<BlockQ4_0> = blocks(&raw[..18 * rows * nb], |b: &mut BlockQ4_0, d| b.d = h(d));
        let nl4: Vec<BlockIQ4NL> = blocks(&raw[..18 * rows * nb], |b: &mut BlockIQ4NL, d| b.d = h(d / 16.0));
        let q41: Vec<BlockQ4_1> = blocks(&raw[..20 * rows * nb], |b: &mut BlockQ4_1, d| { b.d = h(d); b.m = h(-d / 3.0) });
        let q50: Vec<BlockQ5_0> = blocks(&raw[..22 * rows * nb], |b: &mut BlockQ5_0, d| b.d = h(d));
        for k in levels() {
            // Where a level groups these rows, its prompts read them in place.
            prop_assert_eq!(k.gemm_q4_0x8.is_some(), k.prefill_q4_0x8.is_some(), "{:?}", k.isa);
            prop_assert_eq!(k.gemm_iq4_nlx8.is_some(), k.prefill_iq4_nlx8.is_some(), "{:?}", k.isa);
            prop_assert_eq!(k.gemm_q4_1x8.is_some(), k.prefill_q4_1x8.is_some(), "{:?}", k.isa);
            grouped_prompt_equals_file(&k, &q40, &a0, nb, n_tok, k.prefill_q4_0x8, k.prefill_q4_0)?;
            grouped_prompt_equals_file(&k, &nl4, &a0, nb, n_tok, k.prefill_iq4_nlx8, k.prefill_iq4_nl)?;
            grouped_prompt_equals_file(&k, &q41, &a1, nb, n_tok, k.prefill_q4_1x8, k.prefill_q4_1)?;
            prop_assert_eq!(k.gemm_q5_0x8.is_some(), k.prefill_q5_0x8.is_some(), "{:?}", k.isa);
            grouped_prompt_equals_file(&k, &q50, &a0, nb, n_tok, k.prefill_q5_0x8, k.prefill_q5_0)?;
        }
    }

    #[test]
    fn q32_tiles_match_reference(
        // Past 8 blocks (the AVX2 tiles' scale groups) and 48 tokens (their token passes).
        nb in 1usize..20,
        // Past 16 rows (the AVX-512 prompt kernels' panels).
        rows in prop_oneof![1usize..10, 15usize..19],
        n_tok in prop_oneof![1usize..10, 46usize..53],
        raw in prop::collection::vec(any::<u8>(), 34 * 19 * 18),
        seed in prop::collection::vec(-4.0f32..4.0, 1..64),
    ) {
        let x = acts(n_tok * nb * QK, &seed);
        let mut y0 = vec![BlockQ8_0::zeroed(); n_tok * nb];
        let mut y1 = vec![BlockQ8_1::zeroed(); n_tok * nb];
        r::quantize_row_q8_0(&x, &mut y0);
        r::quantize_row_q8_1(&x, &mut y1);
        let d0: Vec<f32> = y0.iter().map(|b| b.d.to_f32()).collect();
        let s0: Vec<f32> = y0.iter().map(|b| b.d.to_f32() * b.qs.iter().map(|&q| q as i32).sum::<i32>() as f32).collect();
        let d1: Vec<f32> = y1.iter().map(|b| b.d.to_f32()).collect();
        let s1: Vec<f32> = y1.iter().map(|b| b.s.to_f32()).collect();
        let a0 = ActBlocks { blocks: &y0, d: &d0, s: &s0 };
        let a1 = ActBlocks { blocks: &y1, d: &d1, s: &s1 };
        let nw = rows * nb;
        let q40: Vec<BlockQ4_0> = blocks(&raw[..18 * nw], |b: &mut BlockQ4_0, d| b.d = h(d));
        let q41: Vec<BlockQ4_1> = blocks(&raw[..20 * nw], |b: &mut BlockQ4_1, d| { b.d = h(d); b.m = h(-d / 3.0) });
        let q50: Vec<BlockQ5_0> = blocks(&raw[..22 * nw], |b: &mut BlockQ5_0, d| b.d = h(d));
        let mut q80: Vec<BlockQ8_0> = blocks(&raw[..34 * nw], |b: &mut BlockQ8_0, d| b.d = h(d));
        for b in q80.iter_mut() { for q in b.qs.iter_mut() { *q = (*q).max(-127); } }
        let mut yf = vec![0.0; n_tok * nb * QK];
        r::dequantize_row_q8_0(&y0, &mut yf);
        let mut wf = vec![0.0; rows * nb * QK];
        let mut got = vec![0.0; rows * n_tok];
        #[allow(clippy::too_many_arguments)]
        fn check<W>(
            what: &str, w: &[W], wf: &[f32], yf: &[f32], nb: usize, n_tok: usize,
            got: &[f32], dot: impl Fn(&[W], usize) -> f32,
        ) {
            let n = nb * QK;
            for (i, &g) in got.iter().enumerate() {
                let (row, t) = (i / n_tok, i % n_tok);
                let want = dot(&w[row * nb..(row + 1) * nb], t);
                close(g, want, magnitude(&wf[row * n..(row + 1) * n], &yf[t * n..(t + 1) * n]), what);
            }
        }
        for k in levels() {
            r::dequantize_row_q4_0(&q40, &mut wf);
            (k.gemm_q4_0)(&q40, &a0, nb, n_tok, &mut got);
            check("q4_0 tile", &q40, &wf, &yf, nb, n_tok, &got, |w, t| r::vec_dot_q4_0_q8_0(w, &y0[t * nb..(t + 1) * nb]));
            r::dequantize_row_q4_1(&q41, &mut wf);
            (k.gemm_q4_1)(&q41, &a1, nb, n_tok, &mut got);
            check("q4_1 tile", &q41, &wf, &yf, nb, n_tok, &got, |w, t| r::vec_dot_q4_1_q8_1(w, &y1[t * nb..(t + 1) * nb]));
            r::dequantize_row_q5_0(&q50, &mut wf);
            (k.gemm_q5_0)(&q50, &a0, nb, n_tok, &mut got);
            check("q5_0 tile", &q50, &wf, &yf, nb, n_tok, &got, |w, t| r::vec_dot_q5_0_q8_0(w, &y0[t * nb..(t + 1) * nb]));
            r::dequantize_row_q8_0(&q80, &mut wf);
            (k.gemm_q8_0)(&q80, &a0, nb, n_tok, &mut got);
            check("q8_0 tile", &q80, &wf, &yf, nb, n_tok, &got, |w, t| r::vec_dot_q8_0_q8_0(w, &y0[t * nb..(t + 1) * nb]));
            // The prompt kernels, where the level has them.
            if let Some(prefill) = k.prefill_q4_0 {
                r::dequantize_row_q4_0(&q40, &mut wf);
                prefill_rows(prefill, &q40, &a0, nb, n_tok, &mut got);
                check("q4_0 prompt", &q40, &wf, &yf, nb, n_tok, &got, |w, t| r::vec_dot_q4_0_q8_0(w, &y0[t * nb..(t + 1) * nb]));
            }
            if let Some(prefill) = k.prefill_q4_1 {
                r::dequantize_row_q4_1(&q41, &mut wf);
                prefill_rows(prefill, &q41, &a1, nb, n_tok, &mut got);
                check("q4_1 prompt", &q41, &wf, &yf, nb, n_tok, &got, |w, t| r::vec_dot_q4_1_q8_1(w, &y1[t * nb..(t + 1) * nb]));
            }
            if let Some(prefill) = k.prefill_q5_0 {
                r::dequantize_row_q5_0(&q50, &mut wf);
                prefill_rows(prefill, &q50, &a0, nb, n_tok, &mut got);
                check("q5_0 prompt", &q50, &wf, &yf, nb, n_tok, &got, |w, t| r::vec_dot_q5_0_q8_0(w, &y0[t * nb..(t + 1) * nb]));
            }
            if let Some(prefill) = k.prefill_q8_0 {
                r::dequantize_row_q8_0(&q80, &mut wf);
                prefill_rows(prefill, &q80, &a0, nb, n_tok, &mut got);
                check("q8_0 prompt", &q80, &wf, &yf, nb, n_tok, &got, |w, t| r::vec_dot_q8_0_q8_0(w, &y0[t * nb..(t + 1) * nb]));
            }
        }
    }

    #[test]
    fn k_quant_tiles_match_reference(
        // Past 8 super-blocks and 64 tokens (the AVX2 prompt kernels' passes).
        nb in prop_oneof![1usize..4, 8usize..11],
        // Past 16 rows (the AVX-512 prompt kernels' panels).
        rows in prop_oneof![1usize..10, 15usize..19],
        n_tok in prop_oneof![1usize..4, 63usize..67],
        raw in prop::collection::vec(any::<u8>(), 210 * 10 * 18),
        seed in prop::collection::vec(-4.0f32..4.0, 1..64),
    ) {
        let n = nb * QK_K;
        let x = acts(n_tok * n, &seed);
        let mut yk = vec![BlockQ8K::zeroed(); n_tok * nb];
        r::quantize_row_q8_k(&x, &mut yk);
        let yf: Vec<f32> = yk.iter().flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d)).collect();
        let a = ActBlocks { blocks: &yk, d: &[], s: &[] };
        let nw = rows * nb;
        let q4k: Vec<BlockQ4K> = blocks(&raw[..144 * nw], |b: &mut BlockQ4K, d| { b.d = h(d); b.dmin = h(d.abs() / 4.0) });
        let q6k: Vec<BlockQ6K> = blocks(&raw[..210 * nw], |b: &mut BlockQ6K, d| b.d = h(d / 16.0));
        let mut wf = vec![0.0; rows * n];
        let mut got = vec![0.0; rows * n_tok];
        let check = |what: &str, got: &[f32], wf: &[f32], dot: &dyn Fn(usize, usize) -> f32| {
            for (i, &g) in got.iter().enumerate() {
                let (row, t) = (i / n_tok, i % n_tok);
                let m = magnitude(&wf[row * n..(row + 1) * n], &yf[t * n..(t + 1) * n]);
                close(g, dot(row, t), m, what);
            }
        };
        for k in levels() {
            r::dequantize_row_q4_k(&q4k, &mut wf);
            (k.gemm_q4_k)(&q4k, &a, nb, n_tok, &mut got);
            check("q4_K tile", &got, &wf, &|row, t| {
                r::vec_dot_q4_k_q8_k(&q4k[row * nb..(row + 1) * nb], &yk[t * nb..(t + 1) * nb])
            });
            r::dequantize_row_q6_k(&q6k, &mut wf);
            (k.gemm_q6_k)(&q6k, &a, nb, n_tok, &mut got);
            check("q6_K tile", &got, &wf, &|row, t| {
                r::vec_dot_q6_k_q8_k(&q6k[row * nb..(row + 1) * nb], &yk[t * nb..(t + 1) * nb])
            });
            // The prompt kernels, where the level has them.
            if let Some(prefill) = k.prefill_q4_k {
                r::dequantize_row_q4_k(&q4k, &mut wf);
                prefill_rows(prefill, &q4k, &a, nb, n_tok, &mut got);
                check("q4_K prefill", &got, &wf, &|row, t| {
                    r::vec_dot_q4_k_q8_k(&q4k[row * nb..(row + 1) * nb], &yk[t * nb..(t + 1) * nb])
                });
            }
            if let Some(prefill) = k.prefill_q6_k {
                r::dequantize_row_q6_k(&q6k, &mut wf);
                prefill_rows(prefill, &q6k, &a, nb, n_tok, &mut got);
                check("q6_K prefill", &got, &wf, &|row, t| {
                    r::vec_dot_q6_k_q8_k(&q6k[row * nb..(row + 1) * nb], &yk[t * nb..(t + 1) * nb])
                });
            }
        }
    }

    #[test]
    fn k_quant_kernels_match_reference(
        nb in 1usize..4,
        raw in prop::collection::vec(any::<u8>(), 210 * 3),
        seed in prop::collection::vec(-4.0f32..4.0, 1..64),
    ) {
        let n = nb * QK_K;
        let x = acts(n, &seed);
        let mut yk = vec![BlockQ8K::zeroed(); nb];
        r::quantize_row_q8_k(&x, &mut yk);
        let yf: Vec<f32> = yk.iter().flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d)).collect();
        let mut w = vec![0.0; n];
        let q4k: Vec<BlockQ4K> = blocks(&raw[..144 * nb], |b: &mut BlockQ4K, d| { b.d = h(d); b.dmin = h(d.abs() / 4.0) });
        let q6k: Vec<BlockQ6K> = blocks(&raw[..210 * nb], |b: &mut BlockQ6K, d| b.d = h(d / 16.0));
        for k in levels() {
            r::dequantize_row_q4_k(&q4k, &mut w);
            close((k.dot_q4_k)(&q4k, &yk), r::vec_dot_q4_k_q8_k(&q4k, &yk), magnitude(&w, &yf), "q4_K");
            r::dequantize_row_q6_k(&q6k, &mut w);
            close((k.dot_q6_k)(&q6k, &yk), r::vec_dot_q6_k_q8_k(&q6k, &yk), magnitude(&w, &yf), "q6_K");
        }
    }

    /// The types added for the downloads users pick (Q2_K, Q3_K, IQ4_NL, IQ4_XS) and the
    /// ones that had only the reference (Q5_1, Q5_K, BF16): dot products (decode) and the
    /// rows × tokens products (prefill), against the scalar reference.
    #[test]
    fn more_types_match_reference(
        nb in 1usize..4,
        rows in prop_oneof![1usize..6, 16usize..18],
        n_tok in 1usize..4,
        raw in prop::collection::vec(any::<u8>(), 192 * 3 * 17),
        seed in prop::collection::vec(-4.0f32..4.0, 1..64),
    ) {
        let n = nb * QK_K;
        let x = acts(n_tok * n, &seed);
        let mut yk = vec![BlockQ8K::zeroed(); n_tok * nb];
        r::quantize_row_q8_k(&x, &mut yk);
        let ykf: Vec<f32> = yk.iter().flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d)).collect();
        let nb32 = n / QK;
        let (mut y0, mut y1) = (vec![BlockQ8_0::zeroed(); n_tok * nb32], vec![BlockQ8_1::zeroed(); n_tok * nb32]);
        r::quantize_row_q8_0(&x, &mut y0);
        r::quantize_row_q8_1(&x, &mut y1);
        let mut y0f = vec![0.0; n_tok * n];
        r::dequantize_row_q8_0(&y0, &mut y0f);
        let d0: Vec<f32> = y0.iter().map(|b| b.d.to_f32()).collect();
        let s0: Vec<f32> = y0.iter().map(|b| b.d.to_f32() * b.qs.iter().map(|&q| q as i32).sum::<i32>() as f32).collect();
        let d1: Vec<f32> = y1.iter().map(|b| b.d.to_f32()).collect();
        let s1: Vec<f32> = y1.iter().map(|b| b.s.to_f32()).collect();
        let (a0, a1) = (ActBlocks { blocks: &y0, d: &d0, s: &s0 }, ActBlocks { blocks: &y1, d: &d1, s: &s1 });
        let ak = ActBlocks { blocks: &yk, d: &[], s: &[] };
        let nw = rows * nb;
        let q2k: Vec<BlockQ2K> = blocks(&raw[..84 * nw], |b: &mut BlockQ2K, d| { b.d = h(d); b.dmin = h(-d / 5.0) });
        let q3k: Vec<BlockQ3K> = blocks(&raw[..110 * nw], |b: &mut BlockQ3K, d| b.d = h(d / 8.0));
        let q5k: Vec<BlockQ5K> = blocks(&raw[..176 * nw], |b: &mut BlockQ5K, d| { b.d = h(d); b.dmin = h(d.abs() / 4.0) });
        let xs4: Vec<BlockIQ4XS> = blocks(&raw[..136 * nw], |b: &mut BlockIQ4XS, d| b.d = h(d / 16.0));
        let nl4: Vec<BlockIQ4NL> = blocks(&raw[..18 * nw * 8], |b: &mut BlockIQ4NL, d| b.d = h(d / 16.0));
        let q51: Vec<BlockQ5_1> = blocks(&raw[..24 * nw * 8], |b: &mut BlockQ5_1, d| { b.d = h(d); b.m = h(-d / 3.0) });
        let mut wf = vec![0.0; rows * n];
        let mut got = vec![0.0; rows * n_tok];
        // Every (row, token) of a product, and the decode dot of token 0, against the reference.
        #[allow(clippy::too_many_arguments)]
        fn check<W, A>(
            what: &str, w: &[W], wf: &[f32], a: &[A], af: &[f32], per_row: usize, n: usize, n_tok: usize,
            got: &[f32], dot: fn(&[W], &[A]) -> f32, want: fn(&[W], &[A]) -> f32,
        ) {
            for (i, &g) in got.iter().enumerate() {
                let (row, t) = (i / n_tok, i % n_tok);
                let (wr, at) = (&w[row * per_row..(row + 1) * per_row], &a[t * per_row..(t + 1) * per_row]);
                let m = magnitude(&wf[row * n..(row + 1) * n], &af[t * n..(t + 1) * n]);
                close(g, want(wr, at), m, &format!("{what} product"));
                close(dot(wr, at), want(wr, at), m, &format!("{what} dot"));
            }
        }
        for k in levels() {
            r::dequantize_row_q2_k(&q2k, &mut wf);
            (k.gemm_q2_k)(&q2k, &ak, nb, n_tok, &mut got);
            check("q2_K", &q2k, &wf, &yk, &ykf, nb, n, n_tok, &got, k.dot_q2_k, r::vec_dot_q2_k_q8_k);
            r::dequantize_row_q3_k(&q3k, &mut wf);
            (k.gemm_q3_k)(&q3k, &ak, nb, n_tok, &mut got);
            check("q3_K", &q3k, &wf, &yk, &ykf, nb, n, n_tok, &got, k.dot_q3_k, r::vec_dot_q3_k_q8_k);
            r::dequantize_row_q5_k(&q5k, &mut wf);
            (k.gemm_q5_k)(&q5k, &ak, nb, n_tok, &mut got);
            check("q5_K", &q5k, &wf, &yk, &ykf, nb, n, n_tok, &got, k.dot_q5_k, r::vec_dot_q5_k_q8_k);
            r::dequantize_row_iq4_xs(&xs4, &mut wf);
            (k.gemm_iq4_xs)(&xs4, &ak, nb, n_tok, &mut got);
            check("iq4_xs", &xs4, &wf, &yk, &ykf, nb, n, n_tok, &got, k.dot_iq4_xs, r::vec_dot_iq4_xs_q8_k);
            r::dequantize_row_iq4_nl(&nl4, &mut wf);
            (k.gemm_iq4_nl)(&nl4, &a0, nb32, n_tok, &mut got);
            check("iq4_nl", &nl4, &wf, &y0, &y0f, nb32, n, n_tok, &got, k.dot_iq4_nl, r::vec_dot_iq4_nl_q8_0);
            r::dequantize_row_q5_1(&q51, &mut wf);
            (k.gemm_q5_1)(&q51, &a1, nb32, n_tok, &mut got);
            check("q5_1", &q51, &wf, &y1, &y0f, nb32, n, n_tok, &got, k.dot_q5_1, r::vec_dot_q5_1_q8_1);
            // The prompt kernels, where the level has them.
            if let Some(prefill) = k.prefill_iq4_nl {
                r::dequantize_row_iq4_nl(&nl4, &mut wf);
                prefill_rows(prefill, &nl4, &a0, nb32, n_tok, &mut got);
                check("iq4_nl prompt", &nl4, &wf, &y0, &y0f, nb32, n, n_tok, &got, k.dot_iq4_nl, r::vec_dot_iq4_nl_q8_0);
            }
            if let Some(prefill) = k.prefill_q5_1 {
                r::dequantize_row_q5_1(&q51, &mut wf);
                prefill_rows(prefill, &q51, &a1, nb32, n_tok, &mut got);
                check("q5_1 prompt", &q51, &wf, &y1, &y0f, nb32, n, n_tok, &got, k.dot_q5_1, r::vec_dot_q5_1_q8_1);
            }
            if let Some(prefill) = k.prefill_q2_k {
                r::dequantize_row_q2_k(&q2k, &mut wf);
                prefill_rows(prefill, &q2k, &ak, nb, n_tok, &mut got);
                check("q2_K prompt", &q2k, &wf, &yk, &ykf, nb, n, n_tok, &got, k.dot_q2_k, r::vec_dot_q2_k_q8_k);
            }
            if let Some(prefill) = k.prefill_q3_k {
                r::dequantize_row_q3_k(&q3k, &mut wf);
                prefill_rows(prefill, &q3k, &ak, nb, n_tok, &mut got);
                check("q3_K prompt", &q3k, &wf, &yk, &ykf, nb, n, n_tok, &got, k.dot_q3_k, r::vec_dot_q3_k_q8_k);
            }
            if let Some(prefill) = k.prefill_q5_k {
                r::dequantize_row_q5_k(&q5k, &mut wf);
                prefill_rows(prefill, &q5k, &ak, nb, n_tok, &mut got);
                check("q5_K prompt", &q5k, &wf, &yk, &ykf, nb, n, n_tok, &got, k.dot_q5_k, r::vec_dot_q5_k_q8_k);
            }
            if let Some(prefill) = k.prefill_iq4_xs {
                r::dequantize_row_iq4_xs(&xs4, &mut wf);
                prefill_rows(prefill, &xs4, &ak, nb, n_tok, &mut got);
                check("iq4_xs prompt", &xs4, &wf, &yk, &ykf, nb, n, n_tok, &got, k.dot_iq4_xs, r::vec_dot_iq4_xs_q8_k);
            }
        }
    }

    #[test]
    fn bf16_dot_matches_reference(x in prop::collection::vec(-8.0f32..8.0, 1..300)) {
        use half::bf16;
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let yb: Vec<bf16> = x.iter().rev().map(|&v| bf16::from_f32(v * 0.5)).collect();
        let xs: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        let ys: Vec<f32> = yb.iter().map(|v| v.to_f32()).collect();
        for k in levels() {
            close((k.dot_bf16)(&xb, &yb), r::vec_dot_bf16(&xb, &yb), magnitude(&xs, &ys), "bf16");
        }
    }

    #[test]
    fn activation_quantization_is_bit_exact(
        x in prop::collection::vec(-50.0f32..50.0, 32..320),
        zero_block in any::<bool>(),
        nan_block in any::<bool>(),
        inf_value in any::<bool>(),
    ) {
        let n = x.len() / QK * QK;
        let mut x = x[..n].to_vec();
        if zero_block { x[..QK].fill(0.0); }
        // Broken activations upstream (NaN, infinity) quantize as the reference does.
        if inf_value { x[QK / 2] = f32::INFINITY; }
        if nan_block { x[n - QK..].fill(f32::NAN); }
        let (mut w0, mut w1) = (vec![BlockQ8_0::zeroed(); n / QK], vec![BlockQ8_1::zeroed(); n / QK]);
        r::quantize_row_q8_0(&x, &mut w0);
        r::quantize_row_q8_1(&x, &mut w1);
        for k in levels() {
            let (mut g0, mut g1) = (vec![BlockQ8_0::zeroed(); n / QK], vec![BlockQ8_1::zeroed(); n / QK]);
            (k.quantize_q8_0)(&x, &mut g0);
            (k.quantize_q8_1)(&x, &mut g1);
            prop_assert_eq!(bytemuck::cast_slice::<_, u8>(&g0), bytemuck::cast_slice::<_, u8>(&w0));
            prop_assert_eq!(bytemuck::cast_slice::<_, u8>(&g1), bytemuck::cast_slice::<_, u8>(&w1));
        }
    }

    #[test]
    fn q8_k_quantization_is_bit_exact(
        x in prop::collection::vec(-50.0f32..50.0, 256..1024),
        zero_block in any::<bool>(),
        tie in any::<bool>(),
    ) {
        let n = x.len() / QK_K * QK_K;
        let mut x = x[..n].to_vec();
        if zero_block { x[..QK_K].fill(0.0); }
        if tie {
            // Two values of the largest magnitude with opposite signs: the first one wins.
            x[n - 7] = 99.0;
            x[n - 3] = -99.0;
        }
        let mut want = vec![BlockQ8K::zeroed(); n / QK_K];
        r::quantize_row_q8_k(&x, &mut want);
        for k in levels() {
            let mut got = vec![BlockQ8K::zeroed(); n / QK_K];
            (k.quantize_q8_k)(&x, &mut got);
            prop_assert_eq!(bytemuck::cast_slice::<_, u8>(&got), bytemuck::cast_slice::<_, u8>(&want));
        }
    }

    #[test]
    fn float_kernels_match_reference(x in prop::collection::vec(-8.0f32..8.0, 1..300)) {
        let y: Vec<f32> = x.iter().rev().copied().collect();
        let xh: Vec<f16> = x.iter().map(|&v| h(v)).collect();
        let yh: Vec<f16> = y.iter().map(|&v| h(v)).collect();
        let xs: Vec<f32> = xh.iter().map(|v| v.to_f32()).collect();
        let ys: Vec<f32> = yh.iter().map(|v| v.to_f32()).collect();
        for k in levels() {
            close((k.dot_f32)(&x, &y), r::vec_dot_f32(&x, &y), magnitude(&x, &y), "f32");
            close((k.dot_f16)(&xh, &yh), r::vec_dot_f16(&xh, &yh), magnitude(&xs, &ys), "f16");
            let (mut got, mut want) = (x.clone(), x.clone());
            (k.axpy_f16)(&mut got, -0.75, &yh);
            r::axpy_f16(&mut want, -0.75, &yh);
            for (g, w) in got.iter().zip(&want) {
                close(*g, *w, 1e-2, "axpy f16");
            }
        }
    }

    /// SwiGLU and softmax with vector `exp` (ggml's, ≈1.5 ulp): within a few ulp of the
    /// reference's `f32::exp`, every length (vector bodies and tails); the softmax with
    /// masked (`-inf`) and far-below-maximum inputs, which must weigh (almost exactly) 0.
    #[test]
    fn activation_kernels_match_reference(
        x in prop::collection::vec(-100.0f32..100.0, 1..200),
        masked in prop::collection::vec(any::<bool>(), 1..200),
    ) {
        let up: Vec<f32> = x.iter().map(|v| (v * 0.37).sin() * 4.0).collect();
        let scores: Vec<f32> = x
            .iter()
            .zip(masked.iter().cycle())
            .enumerate()
            .map(|(i, (&v, &m))| if m && i > 0 { f32::NEG_INFINITY } else { v * 0.3 })
            .collect();
        let mut want_glu = x.clone();
        r::swiglu(&mut want_glu, &up);
        let mut want_sm = scores.clone();
        r::softmax(&mut want_sm);
        for k in levels() {
            let mut got = x.clone();
            (k.swiglu)(&mut got, &up);
            for (i, (g, w)) in got.iter().zip(&want_glu).enumerate() {
                prop_assert!((g - w).abs() <= 2e-6 * w.abs() + 1e-30,
                    "{:?} swiglu({}, {}) = {g}, reference {w}", k.isa, x[i], up[i]);
            }
            let mut got = scores.clone();
            (k.softmax)(&mut got);
            for (i, (g, w)) in got.iter().zip(&want_sm).enumerate() {
                prop_assert!((g - w).abs() <= 2e-6 * w.abs() + 1e-37,
                    "{:?} softmax[{i}] of {} = {g}, reference {w}", k.isa, scores[i]);
            }
        }
    }

    /// The quantized KV cache's value rows: dequantization bit-equal to the reference
    /// (the same `q · d` products), `axpy_f32` within rounding (FMA against mul + add).
    #[test]
    fn kv_block_kernels_match_reference(nb in 1usize..10, seed in prop::collection::vec(-6.0f32..6.0, 1..80)) {
        let x = acts(nb * 32, &seed);
        let mut q8 = vec![BlockQ8_0::zeroed(); nb];
        let mut q4 = vec![BlockQ4_0::zeroed(); nb];
        r::quantize_row_q8_0(&x, &mut q8);
        r::quantize_row_q4_0(&x, &mut q4);
        let (mut want8, mut want4) = (vec![0f32; nb * 32], vec![0f32; nb * 32]);
        r::dequantize_row_q8_0(&q8, &mut want8);
        r::dequantize_row_q4_0(&q4, &mut want4);
        for k in levels() {
            let (mut got8, mut got4) = (vec![f32::NAN; nb * 32], vec![f32::NAN; nb * 32]);
            (k.dequantize_q8_0)(&q8, &mut got8);
            (k.dequantize_q4_0)(&q4, &mut got4);
            prop_assert_eq!(&got8, &want8, "q8_0 at {:?}", k.isa);
            prop_assert_eq!(&got4, &want4, "q4_0 at {:?}", k.isa);
            let (mut got, mut want) = (want4.clone(), want4.clone());
            (k.axpy_f32)(&mut got, -0.37, &want8);
            r::axpy_f32(&mut want, -0.37, &want8);
            for (g, w) in got.iter().zip(&want) {
                close(*g, *w, 10.0, "axpy f32");
            }
        }
    }

    #[test]
    fn f32_tile_matches_reference(cols in 1usize..100, seed in prop::collection::vec(-4.0f32..4.0, 1..50)) {
        let w = acts(4 * cols, &seed);
        let a: Vec<f32> = acts(3 * cols + 7, &seed).into_iter().skip(7).collect();
        let mut want = [0f32; 12];
        r::tile_f32_4x3(&w, &a, cols, &mut want);
        for k in levels() {
            let mut got = [0f32; 12];
            (k.tile_f32_4x3)(&w, &a, cols, &mut got);
            for i in 0..12 {
                let (rw, ta) = (&w[i / 3 * cols..][..cols], &a[i % 3 * cols..][..cols]);
                close(got[i], want[i], magnitude(rw, ta), "f32 tile");
            }
        }
    }

    #[test]
    fn float_tiles_match_reference(
        cols in 1usize..100,
        rows in 1usize..17,
        valid in 1usize..33,
        seed in prop::collection::vec(-4.0f32..4.0, 1..50),
    ) {
        // The tiles sum in the reference's order with the same fused multiply-adds: equal bits.
        for k in levels() {
            let Some(ft) = k.float_tiles else { continue };
            let (rows, valid) = (rows.min(ft.rows), valid.min(ft.tokens));
            let w = acts(rows * cols, &seed);
            let xt: Vec<f32> = acts(cols * ft.tokens + 5, &seed).into_iter().skip(5).collect();
            let stride = valid + 3;
            let mut want = vec![f32::NAN; rows * stride];
            r::float_tile(&w, &xt, cols, ft.tokens, &mut want, stride, valid);
            let mut got = vec![f32::NAN; rows * stride];
            (ft.tile)(&w, &xt, cols, &mut got, stride, valid);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                // Past `valid` in a row both stay NaN (nothing written).
                prop_assert!(g.to_bits() == w.to_bits(), "{:?} at {i}: {g} vs {w}", k.isa);
            }
            let h16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let b16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let (mut wide, mut want) = (vec![0f32; w.len()], vec![0f32; w.len()]);
            (ft.widen_f16)(&h16, &mut wide);
            r::dequantize_row_f16(&h16, &mut want);
            prop_assert!(wide == want, "{:?} f16 widening", k.isa);
            (ft.widen_bf16)(&b16, &mut wide);
            r::dequantize_row_bf16(&b16, &mut want);
            prop_assert!(wide == want, "{:?} bf16 widening", k.isa);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The F16 dot tiles (AVX2) against the reference dot products, at every shape a
    /// product hands them (partial tiles, columns past a multiple of 8).
    #[test]
    fn float_dots_match_reference(
        cols in 1usize..100,
        rows in 1usize..5,
        toks in 1usize..4,
        seed in prop::collection::vec(-4.0f32..4.0, 1..50),
    ) {
        for k in levels() {
            let Some(dots) = k.float_tiles.and_then(|ft| ft.f16_dots) else { continue };
            let (rows, toks) = (rows.min(dots.rows), toks.min(dots.tokens));
            let w: Vec<f16> = acts(rows * cols, &seed).iter().map(|&v| f16::from_f32(v)).collect();
            let a: Vec<f16> = acts(toks * cols + 3, &seed)[3..].iter().map(|&v| f16::from_f32(v)).collect();
            let stride = toks + 2;
            let mut want = vec![f32::NAN; rows * stride];
            r::float_dots(&w, &a, cols, &mut want, stride);
            let mut got = vec![f32::NAN; rows * stride];
            (dots.tile)(&w, &a, cols, &mut got, stride);
            let widen = |v: &[f16]| v.iter().map(|h| h.to_f32()).collect::<Vec<f32>>();
            let (wf, af) = (widen(&w), widen(&a));
            for r in 0..rows {
                for t in 0..stride {
                    let (g, x) = (got[r * stride + t], want[r * stride + t]);
                    if t >= toks {
                        // Past the tokens nothing is written.
                        prop_assert!(g.is_nan(), "{:?}: wrote past the tokens", k.isa);
                        continue;
                    }
                    let mag = magnitude(&wf[r * cols..][..cols], &af[t * cols..][..cols]);
                    close(g, x, mag, &format!("{:?} f16 dots row {r} token {t}", k.isa));
                }
            }
        }
    }
}

/// The tiled F32 product (several tokens) equals one dot product per row and token, for
/// shapes that leave partial tiles.
#[test]
fn tiled_f32_matmul_matches_row_dots() {
    use hearth_quant::{ActType, Activations, Blocks, GgmlType, QMatrix};
    for (rows, cols, n_tok) in [(4, 8, 3), (13, 37, 7), (64, 384, 5), (9, 16, 3)] {
        let w = acts(rows * cols, &[0.5, -1.25, 2.0, 0.75]);
        let x = acts(n_tok * cols, &[1.5, -0.5, 0.25]);
        let m = QMatrix {
            ty: GgmlType::F32,
            rows,
            cols,
            blocks: Blocks::F32(&w),
        };
        let mut a = Activations::default();
        a.quantize(ActType::F32, &x, cols);
        let (mut out, mut scratch) = (vec![0f32; rows * n_tok], Vec::new());
        m.matmul(&a, &mut out, &mut scratch);
        for t in 0..n_tok {
            for r in 0..rows {
                let (wr, xt) = (&w[r * cols..(r + 1) * cols], &x[t * cols..(t + 1) * cols]);
                close(
                    out[t * rows + r],
                    r::vec_dot_f32(wr, xt),
                    magnitude(wr, xt),
                    "tiled matmul",
                );
            }
        }
    }
}

#[test]
fn reference_dequantize_matches_hand_computed_blocks() {
    // Q4_0: d = 0.5, nibbles 0x21 → low 1, high 2 → (1-8)*0.5, (2-8)*0.5.
    let b = BlockQ4_0 {
        d: h(0.5),
        qs: [0x21; 16],
    };
    let mut out = [0.0; 32];
    r::dequantize_row_q4_0(&[b], &mut out);
    assert_eq!(out[0], -3.5);
    assert_eq!(out[16], -3.0);
    // Q4_1: d = 2, m = 1 → 1*2+1, 2*2+1.
    let b = BlockQ4_1 {
        d: h(2.0),
        m: h(1.0),
        qs: [0x21; 16],
    };
    r::dequantize_row_q4_1(&[b], &mut out);
    assert_eq!((out[0], out[16]), (3.0, 5.0));
    // Q5_0: fifth bit of element 0 set: (1 | 16) - 16 = 1; element 1 without: 1 - 16.
    let b = BlockQ5_0 {
        d: h(1.0),
        qh: [1, 0, 0, 0],
        qs: [0x11; 16],
    };
    r::dequantize_row_q5_0(&[b], &mut out);
    assert_eq!((out[0], out[1]), (1.0, -15.0));
    // Q8_0.
    let mut b = BlockQ8_0 {
        d: h(0.25),
        qs: [0; 32],
    };
    b.qs[3] = -8;
    r::dequantize_row_q8_0(&[b], &mut out);
    assert_eq!(out[3], -2.0);
    // Q6_K: all ql/qh zero → q = -32; scale 2, d = 0.5 → -32.
    let b = BlockQ6K {
        ql: [0; 128],
        qh: [0; 64],
        scales: [2; 16],
        d: h(0.5),
    };
    let mut out = [0.0; 256];
    r::dequantize_row_q6_k(&[b], &mut out);
    assert!(out.iter().all(|&v| v == -32.0));
    // Q4_K: scales 1 (6-bit) and mins 1 for sub-blocks 0..4; d = 1, dmin = 0.5, nibble 3 → 3 - 0.5.
    let mut s = [0u8; 12];
    s[..4].copy_from_slice(&[1; 4]);
    s[4..8].copy_from_slice(&[1; 4]);
    let b = BlockQ4K {
        d: h(1.0),
        dmin: h(0.5),
        scales: s,
        qs: [0x33; 128],
    };
    r::dequantize_row_q4_k(&[b], &mut out);
    assert_eq!(out[0], 2.5);
}

#[test]
fn quantize_q8_rounds_like_ggml() {
    let mut x = [0.0f32; 32];
    x[0] = 127.0;
    x[1] = 2.5; // ties to even
    x[2] = -3.5;
    let mut b = [BlockQ8_0::zeroed()];
    r::quantize_row_q8_0(&x, &mut b);
    assert_eq!(b[0].d.to_f32(), 1.0);
    assert_eq!(&b[0].qs[..3], &[127, 2, -4]);
    let mut k = vec![0.0f32; 256];
    k[5] = -2.0;
    let mut kb = [BlockQ8K::zeroed()];
    r::quantize_row_q8_k(&k, &mut kb);
    assert_eq!(kb[0].qs[5], -127);
    assert_eq!(kb[0].bsums[0], -127);
}

/// Prompt tokens (`quantize_split`) take the prefill kernels where a type has them (16-bit
/// floats: widened rows in F32 tiles; Q4_K/Q6_K at avx512: the unpacked path): the same
/// products as the dot-product kernels, up to float rounding.
#[test]
fn prompt_token_products_match_dot_products() {
    // 37 tokens: a whole block of transposed tokens and a partial one (float tiles); 13
    // rows: three whole tiles of F16 dots and one of a row; 37 tokens are 11 dot tiles of
    // 3 and 2 of 2.
    product_of_prompt_tokens_matches_dot_products(13, 512, 37);
    // 4096 columns: F16 dots take 30 tokens at a time (whole tiles of 16-bit tokens in
    // 256 KiB), so a block of ten tiles of 3, then one of 3 and two of 2.
    product_of_prompt_tokens_matches_dot_products(6, 4096, 37);
}

fn product_of_prompt_tokens_matches_dot_products(rows: usize, cols: usize, n_tok: usize) {
    use hearth_quant::{Activations, GgmlType, QMatrix};
    let x = acts(n_tok * cols, &[0.5, -1.25, 2.0, 0.75, -0.3]);
    for ty in [
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        let block = ty.block_bytes() as usize;
        let n_blocks = rows * cols / ty.block_len() as usize;
        let mut raw: Vec<u8> = (0..n_blocks * block)
            .map(|i| (i * 7919 % 251) as u8)
            .collect();
        // Finite scales: every f16 / bf16 value (16-bit floats), the d fields (K-quants).
        match ty {
            GgmlType::F16 | GgmlType::BF16 => {
                for (i, v) in raw.chunks_exact_mut(2).enumerate() {
                    let f = ((i % 37) as f32 - 18.0) / 16.0;
                    let bits = if ty == GgmlType::F16 {
                        f16::from_f32(f).to_bits()
                    } else {
                        half::bf16::from_f32(f).to_bits()
                    };
                    v.copy_from_slice(&bits.to_le_bytes());
                }
            }
            GgmlType::Q4_K => {
                for b in raw.chunks_exact_mut(block) {
                    b[..2].copy_from_slice(&h(0.01).to_bits().to_le_bytes());
                    b[2..4].copy_from_slice(&h(0.002).to_bits().to_le_bytes());
                }
            }
            _ => {
                for b in raw.chunks_exact_mut(block) {
                    b[208..].copy_from_slice(&h(0.003).to_bits().to_le_bytes());
                }
            }
        }
        let mut aligned = vec![0u64; raw.len().div_ceil(8)];
        let bytes: &mut [u8] = &mut bytemuck::cast_slice_mut(&mut aligned)[..raw.len()];
        bytes.copy_from_slice(&raw);
        let m = QMatrix::new("w", ty, cols, rows, bytes).unwrap();
        let (mut prompt, mut decode) = (Activations::default(), Activations::default());
        prompt.quantize_split(m.act_type(), &x, cols, n_tok);
        decode.quantize_split(m.act_type(), &x, cols, 0);
        let (mut got, mut want) = (vec![0f32; n_tok * rows], vec![0f32; n_tok * rows]);
        let mut scratch = Vec::new();
        m.matmul(&prompt, &mut got, &mut scratch);
        m.matmul(&decode, &mut want, &mut scratch);
        let mut wrow = vec![0f32; cols];
        for t in 0..n_tok {
            for r in 0..rows {
                m.dequantize_row(r, &mut wrow);
                let mag = magnitude(&wrow, &x[t * cols..(t + 1) * cols]);
                close(
                    got[t * rows + r],
                    want[t * rows + r],
                    mag,
                    &format!("{ty} prompt row {r} token {t}"),
                );
            }
        }
    }
}
