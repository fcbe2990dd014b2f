//! The encoder kernels (bf16 products on AMX tiles and with AVX512-BF16 dot products, AVX-512 and AVX2 f32 panels, GELU, attention, LayerNorm) against their scalar
//! references on random inputs, at every dispatch level this CPU has. Tolerances:
//! - bf16 products: both operands are rounded to bf16 in kernel and reference alike, so
//!   only the f32 summation order differs: 1e-5 of Σ|xᵢ·wᵢ| plus 1e-6. The f32 panels
//!   against an f64 sum, the same tolerance.
//! - 16-bit integer panels: the kernel equals its scalar reference bit for bit (exact
//!   integer sums, the same float operations in the same order); the reference against an
//!   f64 sum within the quantization bound: per chunk of 64, each value moves by at most
//!   half a step d = max/8190, so Σ|x|·dw + Σ|w|·dx + n·dx·dw, plus 1e-5 of Σ|xᵢ·wᵢ| for
//!   the f32 sums.
//! - GELU: the kernel's erf is a polynomial with |error| ≤ 1.5e-7 and its exp ≈ 1.5 ulp:
//!   1e-6 · max(1, |x|).
//! - attention and LayerNorm: float order and exp approximation: 1e-5 relative to the
//!   values' scale, plus 1e-6.

mod common;

use hearth_quant::bf16mat::{reference_matmul, Bf16Kernel, Bf16Matrix, Bf16Scratch};
use hearth_quant::dispatch::{Isa, Kernels};
use hearth_quant::f32mat::F32Panels;
use hearth_quant::i16mat::{I16Panels, CHUNK, QMAX};
use hearth_quant::reference as r;
use hearth_quant::AttendRows;
use proptest::prelude::*;

fn levels() -> Vec<Kernels> {
    common::levels("encoder_kernels")
}

fn values(n: usize, seed: &[f32]) -> Vec<f32> {
    (0..n)
        .map(|i| seed[i % seed.len()] * (1.0 + (i as f32 * 0.37).sin()) + (i % 7) as f32 * 0.01)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn bf16_products_match_reference(
        rows in 1usize..80,
        cols in 1usize..100,
        n_tok in 1usize..70,
        seed in prop::collection::vec(-3.0f32..3.0, 1..40),
        with_bias in any::<bool>(),
    ) {
        let w = values(rows * cols, &seed);
        let x = values(n_tok * cols, &seed[seed.len() / 2..]);
        let bias: Vec<f32> = (0..rows).map(|i| i as f32 * 0.25 - 3.0).collect();
        let mut want = vec![0f32; n_tok * rows];
        reference_matmul(&w, rows, cols, &x, n_tok, &mut want);
        // Every bf16 kernel this CPU can run, whether or not its level picks it.
        for kernel in [Bf16Kernel::Amx, Bf16Kernel::DotProducts] {
            let Some(m) = Bf16Matrix::pack_for(kernel, &w, rows, cols) else {
                prop_assert!(!kernel.runs_here());
                continue;
            };
            let mut got = vec![f32::NAN; n_tok * rows];
            let mut scratch = Bf16Scratch::default();
            m.matmul(&x, n_tok, with_bias.then_some(&bias[..]), &mut got, &mut scratch);
            for t in 0..n_tok {
                for rr in 0..rows {
                    let mag: f64 = (0..cols).map(|c| (x[t * cols + c] as f64 * w[rr * cols + c] as f64).abs()).sum();
                    let want = want[t * rows + rr] + if with_bias { bias[rr] } else { 0.0 };
                    let got = got[t * rows + rr];
                    prop_assert!(((got - want) as f64).abs() <= 1e-5 * mag + 1e-6 + 1e-6 * want.abs() as f64,
                        "{kernel:?} token {t} row {rr}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn f32_panels_match_reference(
        rows in 1usize..80,
        cols in 1usize..100,
        n_tok in 1usize..120,
        seed in prop::collection::vec(-3.0f32..3.0, 1..40),
        with_bias in any::<bool>(),
    ) {
        let w = values(rows * cols, &seed);
        let x = values(n_tok * cols, &seed[seed.len() / 2..]);
        let bias: Vec<f32> = (0..rows).map(|i| i as f32 * 0.25 - 3.0).collect();
        let mut packed = 0;
        for k in levels() {
            // Only the levels with a panel kernel (AVX2 and up) pack.
            let Some(m) = F32Panels::pack_at(k.isa, &w, rows, cols) else {
                prop_assert!(!k.isa.includes(Isa::Avx2));
                continue;
            };
            packed += 1;
            let mut got = vec![f32::NAN; n_tok * rows];
            m.matmul(&x, n_tok, with_bias.then_some(&bias[..]), &mut got);
            for t in 0..n_tok {
                for rr in 0..rows {
                    let terms = (0..cols).map(|c| x[t * cols + c] as f64 * w[rr * cols + c] as f64);
                    let mag: f64 = terms.clone().map(f64::abs).sum();
                    let want = terms.sum::<f64>() + if with_bias { bias[rr] as f64 } else { 0.0 };
                    let got = got[t * rows + rr] as f64;
                    prop_assert!((got - want).abs() <= 1e-5 * mag + 1e-6 + 1e-6 * want.abs(),
                        "{:?} token {t} row {rr}: {got} vs {want}", k.isa);
                }
            }
        }
        prop_assert!(packed > 0 || !hearth_quant::dispatch::detect().includes(Isa::Avx2));
    }

    #[test]
    fn i16_panels_match_reference(
        rows in 1usize..80,
        cols in 1usize..200,
        n_tok in 1usize..120,
        seed in prop::collection::vec(-3.0f32..3.0, 1..40),
        with_bias in any::<bool>(),
    ) {
        let w = values(rows * cols, &seed);
        let x = values(n_tok * cols, &seed[seed.len() / 2..]);
        let bias: Vec<f32> = (0..rows).map(|i| i as f32 * 0.25 - 3.0).collect();
        let bias = with_bias.then_some(&bias[..]);
        let mut packed = 0;
        for k in levels() {
            let Some(m) = I16Panels::pack_at(k.isa, &w, rows, cols) else {
                prop_assert!(!k.isa.includes(Isa::Avx2));
                continue;
            };
            packed += 1;
            let mut got = vec![f32::NAN; n_tok * rows];
            let mut want = vec![f32::NAN; n_tok * rows];
            m.matmul(&x, n_tok, bias, &mut got);
            m.matmul_reference(&x, n_tok, bias, &mut want);
            for t in 0..n_tok {
                for rr in 0..rows {
                    let (g, r) = (got[t * rows + rr], want[t * rows + rr]);
                    prop_assert!(g.to_bits() == r.to_bits(), "{:?} token {t} row {rr}: kernel {g}, reference {r}", k.isa);
                    // The reference against exact arithmetic, chunk by chunk.
                    let (mut exact, mut mag, mut bound) = (0f64, 0f64, 0f64);
                    for c0 in (0..cols).step_by(CHUNK) {
                        let xs = &x[t * cols + c0..t * cols + (c0 + CHUNK).min(cols)];
                        let ws = &w[rr * cols + c0..rr * cols + (c0 + CHUNK).min(cols)];
                        let step = |v: &[f32]| v.iter().fold(0f64, |m, a| m.max(a.abs() as f64)) / (2.0 * QMAX as f64);
                        let (dx, dw) = (step(xs), step(ws));
                        for (a, b) in xs.iter().zip(ws) {
                            let (a, b) = (*a as f64, *b as f64);
                            exact += a * b;
                            mag += (a * b).abs();
                            bound += a.abs() * dw + b.abs() * dx + dx * dw;
                        }
                    }
                    let exact = exact + bias.map_or(0.0, |b| b[rr] as f64);
                    prop_assert!((r as f64 - exact).abs() <= bound * 1.0001 + 1e-5 * mag + 1e-6 + 1e-6 * exact.abs(),
                        "reference token {t} row {rr}: {r} vs {exact} (bound {bound})");
                }
            }
        }
        prop_assert!(packed > 0 || !hearth_quant::dispatch::detect().includes(Isa::Avx2));
    }

    #[test]
    fn gelu_matches_reference(x in prop::collection::vec(-12.0f32..12.0, 1..200)) {
        let mut want = x.clone();
        r::gelu_erf(&mut want);
        for k in levels() {
            let mut got = x.clone();
            (k.gelu)(&mut got);
            for ((g, w), v) in got.iter().zip(&want).zip(&x) {
                prop_assert!((g - w).abs() <= 1e-6 * v.abs().max(1.0), "{:?} gelu({v}) = {g}, reference {w}", k.isa);
            }
        }
    }

    #[test]
    fn attention_matches_reference(
        len in 1usize..70,
        m in 1usize..10,
        heads in 1usize..4,
        wide in any::<bool>(),
        seed in prop::collection::vec(-2.0f32..2.0, 1..30),
    ) {
        let head_dim = if wide { 64 } else { 32 };
        let h = heads * head_dim;
        let stride = 3 * h;
        let m = m.min(len);
        let qkv = values(len * stride, &seed);
        let mut kt = vec![0f32; h * len];
        for j in 0..len {
            for c in 0..h {
                kt[c * len + j] = qkv[j * stride + h + c];
            }
        }
        let args = AttendRows {
            q: &qkv[..],
            stride,
            kt: &kt,
            kt_stride: len,
            v: &qkv[2 * h..],
            len,
            heads,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
        };
        let mut want = vec![0f32; m * h];
        r::attend_rows(&args, &mut want);
        for k in levels() {
            let mut got = vec![f32::NAN; m * h];
            (k.attend_rows)(&args, &mut got);
            for (g, w) in got.iter().zip(&want) {
                prop_assert!((g - w).abs() <= 1e-5 * 4.0 + 1e-6, "{:?}: {g} vs {w}", k.isa);
            }
        }
    }

    #[test]
    fn layer_norm_matches_reference(
        rows in 1usize..6,
        dim16 in 1usize..30,
        seed in prop::collection::vec(-5.0f32..5.0, 1..40),
        with_add in any::<bool>(),
    ) {
        let dim = dim16 * 16;
        let x = values(rows * dim, &seed);
        let add = values(rows * dim, &seed[seed.len() / 2..]);
        let w = values(dim, &[0.5, 1.5, -1.0]);
        let b = values(dim, &[0.1, -0.2]);
        let add = with_add.then_some(&add[..]);
        let mut want = x.clone();
        r::add_layer_norm(&mut want, add, &w, &b, 1e-12);
        for k in levels() {
            let mut got = x.clone();
            (k.add_layer_norm)(&mut got, add, &w, &b, 1e-12);
            for (g, wv) in got.iter().zip(&want) {
                prop_assert!((g - wv).abs() <= 1e-5 * wv.abs().max(1.0) * 4.0, "{:?}: {g} vs {wv}", k.isa);
            }
        }
    }
}
