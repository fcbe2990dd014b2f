//! The decoder attention kernel (`Kernels::attend_f16`) at every dispatch level this CPU
//! has against the scalar reference, on random queries, keys and values with per-row key
//! ranges (causal and sliding-window shapes) and with or without logit soft-capping. The SIMD levels sum the dot products in
//! another order, so scores differ by float rounding, and the f16 rounding of the softmax
//! weights can then move by one f16 step (2⁻¹¹ relative): each output column must agree
//! within 2e-3 · (the column's largest |v| over the row's keys) + 1e-5 — a few such steps,
//! far below what a wrong key range, row or scale gives.

mod common;

use half::f16;
use hearth_quant::dispatch::Kernels;
use hearth_quant::{reference, AttendF16};
use proptest::prelude::*;

fn levels() -> Vec<Kernels> {
    common::levels("attention_kernel")
}

/// Keys and values of `cache_len` values each and `q_len` query values, from `seed`.
fn f16_case(seed: &[f32], cache_len: usize, q_len: usize) -> (Vec<f16>, Vec<f16>, Vec<f32>) {
    let val = |i: usize| seed[i % seed.len()] * (1.0 + (i as f32 * 0.37).sin());
    let k = (0..cache_len)
        .map(|i| f16::from_f32(val(3 * i + 1)))
        .collect();
    let v = (0..cache_len)
        .map(|i| f16::from_f32(val(5 * i + 2)))
        .collect();
    let q = (0..q_len).map(|i| val(7 * i)).collect();
    (k, v, q)
}

/// A call for `rows` rows over the last of `kv_heads` KV heads; the caller sets the rows'
/// places and keys.
fn last_kv_head<'a>(
    q: &'a [f32],
    k: &'a [f16],
    v: &'a [f16],
    kv_heads: usize,
    head_dim: usize,
    rows: usize,
    softcap: f32,
) -> AttendF16<'a> {
    let kvh = kv_heads - 1;
    AttendF16 {
        q,
        at: [0; 8],
        rows,
        keys: [(0, 0); 8],
        k: &k[kvh * head_dim..],
        v: &v[kvh * head_dim..],
        kv_stride: kv_heads * head_dim,
        head_dim,
        scale: 1.0 / (head_dim as f32).sqrt(),
        softcap,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn attend_f16_matches_reference(
        head_dim in prop::sample::select(vec![16usize, 48, 64, 128, 256, 40, 8, 24, 36]),
        kv_heads in 1usize..3,
        rows in 1usize..9,
        n_pos in 1usize..80,
        window in prop::option::of(1usize..40),
        softcap in prop::sample::select(vec![0.0f32, 0.0, 0.5, 50.0]),
        seed in prop::collection::vec(-3.0f32..3.0, 7..97),
    ) {
        let kv_stride = kv_heads * head_dim;
        let (k, v, q) = f16_case(&seed, n_pos * kv_stride, rows * head_dim * 2);
        let kvh = kv_heads - 1;
        let mut a = last_kv_head(&q, &k, &v, kv_heads, head_dim, rows, softcap);
        for r in 0..rows {
            // Rows two head_dims apart, each at its own position near the end.
            a.at[r] = (r * head_dim * 2).min(q.len() - head_dim);
            let pos = n_pos - 1 - (r * 3) % n_pos;
            let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            a.keys[r] = (first, pos + 1);
        }
        let mut want = vec![0.0; q.len()];
        reference::attend_f16(&a, &mut want, &mut Vec::new());
        for kern in levels() {
            let mut got = vec![0.0; q.len()];
            (kern.attend_f16)(&a, &mut got, &mut Vec::new());
            for r in 0..rows {
                let (first, end) = a.keys[r];
                for d in 0..head_dim {
                    // A softmax weight moving by an f16 step moves the column by that step
                    // times its value: the bound is the column's largest |v| over the keys.
                    let max_abs = (first..end)
                        .map(|j| v[j * kv_stride + kvh * head_dim + d].to_f32().abs())
                        .fold(0.0f32, f32::max);
                    let tol = 2e-3 * max_abs + 1e-5;
                    let (g, w) = (got[a.at[r] + d], want[a.at[r] + d]);
                    prop_assert!((g - w).abs() <= tol, "{:?} row {r} col {d}: {g} vs {w} (tol {tol})", kern.isa);
                }
            }
        }
    }
}

/// One KV head's rows over a random cache, for the quantized-cache test.
struct Case {
    head_dim: usize,
    kv_stride: usize,
    /// The KV head (its values start at `kvh * head_dim` in a position's row).
    kvh: usize,
    q: Vec<f32>,
    at: [usize; 8],
    keys: [(usize, usize); 8],
    rows: usize,
    softcap: f32,
}

impl Case {
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// Row `r` by the definition, in f64, over the dequantized keys `kd` and values `vd`:
    /// the query quantized to Q8_0 (as llama.cpp's flash-attention path does for such
    /// caches), scores, softmax, weighted sum of the values.
    fn definition(&self, r: usize, kd: &[f32], vd: &[f32]) -> Vec<f64> {
        use hearth_quant::blocks::BlockQ8_0;
        let (hd, off) = (self.head_dim, self.kvh * self.head_dim);
        let mut q8 = vec![<BlockQ8_0 as bytemuck::Zeroable>::zeroed(); hd / 32];
        reference::quantize_row_q8_0(&self.q[self.at[r]..][..hd], &mut q8);
        let mut qd = vec![0f32; hd];
        reference::dequantize_row_q8_0(&q8, &mut qd);
        let (first, end) = self.keys[r];
        let cap = self.softcap as f64;
        let mut s: Vec<f64> = (first..end)
            .map(|j| {
                let k = &kd[j * self.kv_stride + off..][..hd];
                let dot: f64 = k.iter().zip(&qd).map(|(a, b)| *a as f64 * *b as f64).sum();
                let x = dot * self.scale() as f64;
                if cap > 0.0 {
                    (x / cap).tanh() * cap
                } else {
                    x
                }
            })
            .collect();
        let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        s.iter_mut().for_each(|x| *x = (*x - max).exp());
        let sum: f64 = s.iter().sum();
        (0..hd)
            .map(|d| {
                (first..end)
                    .zip(&s)
                    .map(|(j, p)| p / sum * vd[j * self.kv_stride + off + d] as f64)
                    .sum()
            })
            .collect()
    }

    /// Keys and values quantized to `B`, then each kernel table's output, with the
    /// dequantized keys and values.
    fn run<B: hearth_quant::kvquant::KvBlock>(
        &self,
        k: &[f32],
        v: &[f32],
        kernels: &[Kernels],
    ) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
        use hearth_quant::kvquant::AttendQuant;
        let nb = self.head_dim / 32;
        let (mut kb, mut vb) = (
            vec![B::zeroed(); k.len() / 32],
            vec![B::zeroed(); v.len() / 32],
        );
        // The scalar table's (de)quantization is the reference's.
        let scalar = Kernels::scalar();
        B::quantize(&scalar, k, &mut kb);
        B::quantize(&scalar, v, &mut vb);
        let (mut kd, mut vd) = (vec![0f32; k.len()], vec![0f32; v.len()]);
        B::dequantize(&scalar, &kb, &mut kd);
        B::dequantize(&scalar, &vb, &mut vd);
        let a = AttendQuant {
            q: &self.q,
            at: self.at,
            rows: self.rows,
            keys: self.keys,
            k: &kb[self.kvh * nb..],
            v: &vb[self.kvh * nb..],
            kv_stride: self.kv_stride / 32,
            head_dim: self.head_dim,
            scale: self.scale(),
            softcap: self.softcap,
        };
        let outs = kernels
            .iter()
            .map(|kern| {
                let mut out = vec![0f32; self.q.len()];
                B::attend(kern)(&a, &mut out, &mut Vec::new());
                out
            })
            .collect();
        (kd, vd, outs)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// `Kernels::attend_q8_0`/`attend_q4_0` of the scalar table and at every level against its
    /// definition: within 1e-4 of the largest |v| the row sees (float rounding of the
    /// scores and sums; a wrong key, block, row or scale moves it by far more).
    #[test]
    fn attend_quant_matches_definition(
        head_dim in prop::sample::select(vec![32usize, 64, 96, 128, 256]),
        kv_heads in 1usize..3,
        rows in 1usize..9,
        n_pos in 1usize..70,
        window in prop::option::of(1usize..30),
        softcap in prop::sample::select(vec![0.0f32, 0.0, 30.0]),
        q4 in any::<bool>(),
        seed in prop::collection::vec(-3.0f32..3.0, 7..97),
    ) {
        let kv_stride = kv_heads * head_dim;
        let val = |i: usize| seed[i % seed.len()] * (1.0 + (i as f32 * 0.37).sin());
        let k: Vec<f32> = (0..n_pos * kv_stride).map(|i| val(3 * i + 1)).collect();
        let v: Vec<f32> = (0..n_pos * kv_stride).map(|i| val(5 * i + 2)).collect();
        let mut case = Case {
            head_dim,
            kv_stride,
            kvh: kv_heads - 1,
            q: (0..rows * head_dim * 2).map(|i| val(7 * i)).collect(),
            at: [0; 8],
            keys: [(0, 0); 8],
            rows,
            softcap,
        };
        for r in 0..rows {
            case.at[r] = (r * head_dim * 2).min(case.q.len() - head_dim);
            let pos = n_pos - 1 - (r * 3) % n_pos;
            let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            case.keys[r] = (first, pos + 1);
        }
        let mut kernels = vec![Kernels::scalar()];
        kernels.extend(levels());
        let (kd, vd, outs) = if q4 {
            case.run::<hearth_quant::blocks::BlockQ4_0>(&k, &v, &kernels)
        } else {
            case.run::<hearth_quant::blocks::BlockQ8_0>(&k, &v, &kernels)
        };
        for r in 0..rows {
            let want = case.definition(r, &kd, &vd);
            let (first, end) = case.keys[r];
            let off = case.kvh * head_dim;
            let max_abs = (first..end)
                .flat_map(|j| vd[j * kv_stride + off..][..head_dim].iter())
                .fold(0.0f32, |m, x| m.max(x.abs()));
            let tol = 1e-4 * max_abs as f64 + 1e-5;
            for (kern, out) in kernels.iter().zip(&outs) {
                for d in 0..head_dim {
                    let g = out[case.at[r] + d] as f64;
                    prop_assert!((g - want[d]).abs() <= tol,
                        "{:?} q4 {q4} row {r} col {d}: {g} vs {} (tol {tol})", kern.isa, want[d]);
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// `Kernels::attend_f16_steps` of the scalar table and every level give the bits of that
    /// table's whole kernel: the scores over the keys in parts (a decoding token's rows share
    /// their keys), the weights on whole rows, the values in 16-column parts. Rows with keys
    /// of their own (prompt shapes) take the keys in one part.
    #[test]
    fn attend_f16_steps_equal_whole_kernel(
        head_dim in prop::sample::select(vec![16usize, 48, 64, 128, 256, 40, 8, 36]),
        kv_heads in 1usize..3,
        rows in 1usize..9,
        n_pos in 1usize..90,
        shared_keys in any::<bool>(),
        window in prop::option::of(1usize..40),
        softcap in prop::sample::select(vec![0.0f32, 0.0, 50.0]),
        key_cuts in prop::collection::vec(0usize..90, 0..4),
        column_cut in 0usize..16,
        seed in prop::collection::vec(-3.0f32..3.0, 7..97),
    ) {
        let kv_stride = kv_heads * head_dim;
        let (k, v, q) = f16_case(&seed, n_pos * kv_stride, rows * head_dim);
        let mut a = last_kv_head(&q, &k, &v, kv_heads, head_dim, rows, softcap);
        for r in 0..rows {
            a.at[r] = r * head_dim;
            let pos = if shared_keys { n_pos - 1 } else { n_pos - 1 - (r * 3) % n_pos };
            let first = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            a.keys[r] = (first, pos + 1);
        }
        let (lo, n) = a.span();
        // Key parts: the cuts inside the span, when the rows share their keys.
        let mut cuts: Vec<usize> = if shared_keys {
            key_cuts.iter().map(|c| lo + c % n).filter(|&c| c > lo).collect()
        } else {
            Vec::new()
        };
        cuts.extend([lo, lo + n]);
        cuts.sort_unstable();
        cuts.dedup();
        // Column parts: two at a multiple of 16 where the head allows it.
        let columns: Vec<(usize, usize)> = if head_dim % 16 == 0 && head_dim > 16 {
            let cut = 16 * (1 + column_cut % (head_dim / 16 - 1));
            vec![(0, cut), (cut, head_dim)]
        } else {
            vec![(0, head_dim)]
        };
        let mut tables = vec![Kernels::scalar()];
        tables.extend(levels());
        for kern in tables {
            let mut want = vec![0.0; q.len()];
            (kern.attend_f16)(&a, &mut want, &mut Vec::new());
            let steps = kern.attend_f16_steps;
            let mut ps = vec![f32::NAN; rows * n];
            let mut queries = vec![f32::NAN; rows * head_dim];
            for part in cuts.windows(2) {
                let mut b = AttendF16 { keys: a.keys, ..a };
                for r in 0..rows {
                    b.keys[r] = (part[0], part[1]);
                }
                if !shared_keys {
                    b.keys = a.keys;
                }
                let m = part[1] - part[0];
                let mut part_scores = vec![f32::NAN; rows * m];
                (steps.scores)(&b, &mut part_scores, &mut queries);
                for r in 0..rows {
                    ps[r * n + part[0] - lo..][..m].copy_from_slice(&part_scores[r * m..][..m]);
                }
            }
            for r in 0..rows {
                (steps.weights)(&a, r, &mut ps[r * n..][..n]);
            }
            let mut got = vec![0.0; q.len()];
            for &(c0, c1) in &columns {
                let w = c1 - c0;
                let mut part = vec![f32::NAN; rows * w];
                (steps.values)(&a, &ps, c0, &mut part);
                for r in 0..rows {
                    got[a.at[r] + c0..a.at[r] + c1].copy_from_slice(&part[r * w..][..w]);
                }
            }
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                prop_assert!(g.to_bits() == w.to_bits(),
                    "{:?} value {i}: steps {g} vs whole {w} (keys {cuts:?}, columns {columns:?})", kern.isa);
            }
        }
    }
}
