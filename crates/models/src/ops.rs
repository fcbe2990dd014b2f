//! Element-wise and normalisation ops, with ggml's numerics (f64 sums where ggml uses
//! `ggml_float`, f16 round trips where ggml stores f16) so greedy output matches llama.cpp.

use half::f16;
use std::sync::OnceLock;

/// `1 / sqrt(mean(x²) + eps)` of one row, the sum in f64 as ggml does.
fn rms_scale(row: &[f32], eps: f32) -> f32 {
    let sum: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
    let mean = (sum / row.len() as f64) as f32;
    1.0 / (mean + eps).sqrt()
}

/// `out = x / sqrt(mean(x²) + eps) * w`, row by row (`w.len()` columns).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    let len = x.len().min(out.len()) / d * d;
    match rows_per_task(len, d) {
        None => rms_norm_rows(x, w, eps, out),
        Some(rows) => hearth_quant::pool::for_each_chunk(&mut out[..len], rows * d, |i, o| {
            rms_norm_rows(&x[i * rows * d..][..o.len()], w, eps, o)
        }),
    }
}

fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let scale = rms_scale(xr, eps);
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    }
}

/// In-place [`rms_norm`].
pub fn rms_norm_inplace(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    let len = x.len() / d * d;
    match rows_per_task(len, d) {
        None => rms_norm_inplace_rows(x, w, eps),
        Some(rows) => hearth_quant::pool::for_each_chunk(&mut x[..len], rows * d, |_, x| {
            rms_norm_inplace_rows(x, w, eps)
        }),
    }
}

fn rms_norm_inplace_rows(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for xr in x.chunks_exact_mut(d) {
        let scale = rms_scale(xr, eps);
        for (v, &g) in xr.iter_mut().zip(w) {
            *v = *v * scale * g;
        }
    }
}

/// Below this many values a row-wise op runs on the calling thread alone.
const PARALLEL_MIN: usize = 32 * 1024;

/// Rows per pool task for a row-wise op over `len` values in rows of `d` (None: too
/// little work to share). Rows are independent, so the split never changes a result; the
/// other threads would otherwise wait while one thread does it (a prompt's rows).
fn rows_per_task(len: usize, d: usize) -> Option<usize> {
    let threads = sharing_threads(len).filter(|_| d > 0)?;
    Some((len / d).div_ceil(4 * threads).max(1))
}

/// The pool's threads, if `len` values of elementwise or row-wise work are worth sharing.
fn sharing_threads(len: usize) -> Option<usize> {
    let threads = hearth_quant::pool::threads();
    (threads >= 2 && len >= PARALLEL_MIN).then_some(threads)
}

/// How RoPE pairs dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeMode {
    /// Adjacent pairs (2i, 2i+1): llama GGUFs (their Q/K rows are permuted at conversion).
    Normal,
    /// Halves (i, i + n/2): GPT-NeoX style, used by gemma and qwen.
    Neox,
}

/// A RoPE table's settings: rotated dimensions, frequency base, linear position scale, and
/// per-frequency divisors (`rope_freqs.weight`).
#[derive(Debug, Clone, Copy)]
pub struct Rope<'a> {
    pub n_dims: usize,
    pub base: f32,
    pub freq_scale: f32,
    pub factors: Option<&'a [f32]>,
    /// Multiplies the cosines and sines (`rope.scaling.attn_factor`).
    pub mscale: f32,
}

impl Rope<'_> {
    /// Cosines and sines for one position, as ggml computes them (theta multiplied up in
    /// f32, then scaled, then divided by the frequency's factor).
    pub fn cache(&self, pos: usize, cache: &mut [f32]) {
        let theta_scale = self.base.powf(-2.0 / self.n_dims as f32);
        let mut theta = pos as f32;
        for i in 0..self.n_dims / 2 {
            let factor = self.factors.map_or(1.0, |f| f[i]);
            let t = self.freq_scale * (theta / factor);
            cache[2 * i] = t.cos() * self.mscale;
            cache[2 * i + 1] = t.sin() * self.mscale;
            theta *= theta_scale;
        }
    }
}

/// [`Rope::cache`] without scaling or factors.
pub fn rope_cache(pos: usize, n_dims: usize, freq_base: f32, cache: &mut [f32]) {
    Rope {
        n_dims,
        base: freq_base,
        freq_scale: 1.0,
        factors: None,
        mscale: 1.0,
    }
    .cache(pos, cache)
}

/// Rotates each head of `x` (`n_heads` heads of `head_dim`) by the angles in `cache`.
pub fn rope(x: &mut [f32], head_dim: usize, n_dims: usize, mode: RopeMode, cache: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..n_dims / 2 {
            let (c, s) = (cache[2 * i], cache[2 * i + 1]);
            let (a, b) = match mode {
                RopeMode::Normal => (2 * i, 2 * i + 1),
                RopeMode::Neox => (i, i + n_dims / 2),
            };
            let (x0, x1) = (head[a], head[b]);
            head[a] = x0 * c - x1 * s;
            head[b] = x0 * s + x1 * c;
        }
    }
}

/// SiLU(gate) * up, in place into `gate`.
/// The orthonormal Walsh–Hadamard transform (Sylvester order, scaled by `1/√n`) of each
/// `n` consecutive values of `x` (`n` a power of two). Its own inverse.
pub fn hadamard(x: &mut [f32], n: usize) {
    let scale = 1.0 / (n as f32).sqrt();
    for chunk in x.chunks_exact_mut(n) {
        let mut h = 1;
        while h < n {
            for i in (0..n).step_by(2 * h) {
                for j in i..i + h {
                    let (a, b) = (chunk[j], chunk[j + h]);
                    chunk[j] = a + b;
                    chunk[j + h] = a - b;
                }
            }
            h *= 2;
        }
        chunk.iter_mut().for_each(|v| *v *= scale);
    }
}

/// `gate = SiLU(gate) · up` with the level's kernel (vector `exp`, see
/// `hearth_quant::reference::swiglu`).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    (hearth_quant::dispatch::kernels().swiglu)(gate, up)
}

fn gelu_exact(x: f32) -> f32 {
    const GELU_COEF_A: f32 = 0.044715;
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + GELU_COEF_A * x * x)).tanh())
}

/// GELU (tanh form) looked up by the f16 value of the input, as ggml does on CPU.
fn gelu_table() -> &'static [f16] {
    static TABLE: OnceLock<Vec<f16>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| f16::from_f32(gelu_exact(f16::from_bits(bits).to_f32())))
            .collect()
    })
}

/// GELU(gate) * up, in place into `gate`.
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    use half::slice::HalfFloatSliceExt;
    const RUN: usize = 64;
    let table = gelu_table();
    // The f16 conversions a run at a time (vector instructions, the CPU checked once per
    // run rather than per value).
    let (mut halves, mut looked_up) = ([f16::ZERO; RUN], [0f32; RUN]);
    for (gate, up) in gate.chunks_mut(RUN).zip(up.chunks(RUN)) {
        let n = gate.len();
        halves[..n].convert_from_f32_slice(gate);
        for h in &mut halves[..n] {
            *h = table[h.to_bits() as usize];
        }
        halves[..n].convert_to_f32_slice(&mut looked_up[..n]);
        for ((g, &u), &gelu) in gate.iter_mut().zip(up).zip(&looked_up) {
            let x = *g;
            *g = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x * u
            } else {
                gelu * u
            };
        }
    }
}

/// `act(gate, up)` (an elementwise gated activation: `geglu`, `swiglu`) split over the
/// thread pool when there is enough of it (a prompt's rows), so the other threads do not
/// wait while one applies it; elementwise, so the result does not depend on the split.
pub fn gated_in_parallel(act: fn(&mut [f32], &[f32]), gate: &mut [f32], up: &[f32]) {
    let Some(threads) = sharing_threads(gate.len()) else {
        return act(gate, up);
    };
    let chunk = gate.len().div_ceil(4 * threads).max(PARALLEL_MIN / 2);
    hearth_quant::pool::for_each_chunk(gate, chunk, |i, g| {
        act(g, &up[i * chunk..i * chunk + g.len()])
    });
}

/// Softmax in place (the attention kernels' definition: f32 exponentials, f64 sum).
pub use hearth_quant::reference::softmax;

/// `x[r] += b` for every row `r` of `x` (`b.len()` columns): a bias.
pub fn add_rows(x: &mut [f32], b: &[f32]) {
    for row in x.chunks_exact_mut(b.len()) {
        add_inplace(row, b);
    }
}

pub fn add_inplace(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {

    /// The transform is Sylvester's Hadamard matrix over √n (ggml's `ggml_gen_hadamard`):
    /// H[i][j] = (-1)^popcount(i & j) / √n, and applying it twice gives the input back.
    #[test]
    fn hadamard_is_sylvesters_matrix_and_its_own_inverse() {
        let n = 8;
        let x: Vec<f32> = (0..2 * n).map(|i| (i as f32 * 0.7).sin() * 3.0).collect();
        let mut y = x.clone();
        hadamard(&mut y, n);
        for c in 0..2 {
            for i in 0..n {
                let want: f32 = (0..n)
                    .map(|j| {
                        let sign = if (i & j).count_ones() % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        };
                        sign * x[c * n + j]
                    })
                    .sum::<f32>()
                    / (n as f32).sqrt();
                assert!(
                    (y[c * n + i] - want).abs() < 1e-5,
                    "{i}: {} vs {want}",
                    y[c * n + i]
                );
            }
        }
        hadamard(&mut y, n);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }

    use super::*;

    #[test]
    fn rms_norm_of_constant_row_is_weight() {
        let mut out = [0.0; 4];
        rms_norm(&[2.0; 4], &[1.0, 2.0, 3.0, 4.0], 0.0, &mut out);
        assert_eq!(out, [1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn softmax_sums_to_one() {
        let mut x = [1.0, 2.0, 3.0, f32::NEG_INFINITY];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[3], 0.0);
    }

    #[test]
    fn rope_at_position_zero_is_identity() {
        let mut cache = [0.0; 8];
        rope_cache(0, 8, 10000.0, &mut cache);
        let mut x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        rope(&mut x, 8, 8, RopeMode::Neox, &cache);
        assert_eq!(x, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
    }

    #[test]
    fn gelu_table_matches_formula() {
        let mut g = [0.5f32, -1.0, 3.0, -20.0, 20.0];
        geglu(&mut g, &[1.0; 5]);
        assert!((g[0] - gelu_exact(0.5)).abs() < 1e-3);
        assert!((g[2] - gelu_exact(3.0)).abs() < 1e-2);
        assert_eq!(g[3], 0.0);
        assert_eq!(g[4], 20.0);
    }

    /// Split over threads, the norms equal the row-by-row loop bit for bit.
    #[test]
    fn rms_norms_split_over_threads_equal_one_thread() {
        hearth_quant::pool::set_threads(2);
        let d = 640;
        let x: Vec<f32> = (0..100 * d)
            .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
            .collect();
        let w: Vec<f32> = (0..d).map(|i| 0.5 + (i % 13) as f32 * 0.1).collect();
        let (mut want, mut got) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        rms_norm_rows(&x, &w, 1e-6, &mut want);
        assert!(rows_per_task(x.len(), d).is_some());
        rms_norm(&x, &w, 1e-6, &mut got);
        assert_eq!(got, want);
        let mut inplace = x.clone();
        rms_norm_inplace(&mut inplace, &w, 1e-6);
        assert_eq!(inplace, want);
    }

    /// The run-at-a-time conversions (and the split over threads) give, bit for bit, the
    /// per-value lookup ggml does: `table[f16(x)] · up`.
    #[test]
    fn geglu_equals_the_per_value_lookup() {
        let n = 3 * 64 + 17; // whole runs and a partial one
        let gate: Vec<f32> = (0..n)
            .map(|i| (i as f32 - 100.0) * 0.1037 + 1e-6 * i as f32)
            .collect();
        let up: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let table = gelu_table();
        let want: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(&x, &u)| match x {
                x if x <= -10.0 => 0.0,
                x if x >= 10.0 => x * u,
                x => table[f16::from_f32(x).to_bits() as usize].to_f32() * u,
            })
            .collect();
        let mut got = gate.clone();
        geglu(&mut got, &up);
        assert_eq!(got, want);
        hearth_quant::pool::set_threads(2);
        let mut big: Vec<f32> = gate.iter().cycle().take(200 * n).copied().collect();
        let big_up: Vec<f32> = up.iter().cycle().take(200 * n).copied().collect();
        gated_in_parallel(geglu, &mut big, &big_up);
        let big_want: Vec<f32> = want.iter().cycle().take(200 * n).copied().collect();
        assert_eq!(big, big_want);
    }
}
