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
        let val = |i: usize| seed[i % seed.len()] * (1.0 + (i as f32 * 0.37).sin());
        let k: Vec<f16> = (0..n_pos * kv_stride).map(|i| f16::from_f32(val(3 * i + 1))).collect();
        let v: Vec<f16> = (0..n_pos * kv_stride).map(|i| f16::from_f32(val(5 * i + 2))).collect();
        let q: Vec<f32> = (0..rows * head_dim * 2).map(|i| val(7 * i)).collect();
        let kvh = kv_heads - 1;
        let mut a = AttendF16 {
            q: &q,
            at: [0; 8],
            rows,
            keys: [(0, 0); 8],
            k: &k[kvh * head_dim..],
            v: &v[kvh * head_dim..],
            kv_stride,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            softcap,
        };
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
