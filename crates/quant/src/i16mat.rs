//! 16-bit integer matrix products for encoder models on x86 CPUs without a fast bf16 unit
//! (Intel Ice Lake and Cascade Lake servers at the AVX-512 level, and the AVX2 level
//! everywhere): `vpdpwssd` (AVX512-VNNI) does 32 multiply-adds of 16-bit integers per
//! instruction at the rate of a 16-lane f32 FMA, and at AVX2 `vpmaddwd` does 16 per 256-bit
//! instruction with its `vpaddd` on another port, so twice the arithmetic per cycle of the
//! f32 panels either way.
//!
//! Weights and activations are quantized per chunk of [`CHUNK`] values of a row to integers
//! within ±[`QMAX`] (13 bits) with an f32 scale each. 64 products of two such integers sum
//! to at most 64 · 4095² < 2³¹, so a chunk's integer sum is exact in i32; it joins the f32
//! accumulator as `acc += (Σ qx·qw) · (sx·sw)`. Rounding moves a value by at most 1/8190
//! of its chunk's largest magnitude — 1/32 of Q8_0's step, which is why this keeps
//! sentence embeddings within the golden test's 0.9999 cosine bar where int8 does not.
//!
//! The layout is the f32 panels' ([`crate::f32mat`]): 32 output rows per panel, stored
//! column pair by column pair, so a block of 6 tokens × 32 rows of results stays in
//! registers while the panel streams past, and each task takes a run of tokens over one
//! panel at a time.
//!
//! [`I16Panels::matmul_reference`] is the scalar reference; the kernel equals it bit for bit
//! (integer sums are exact and the float operations are the same, in the same order).

use crate::dispatch::Isa;
use crate::f32mat::Line;

/// Values per scale.
pub const CHUNK: usize = 64;
/// Largest quantized magnitude: `CHUNK · QMAX²` fits in an i32.
pub const QMAX: f32 = 4095.0;

/// One column pair of 16 rows: lane `i` holds row `i`'s even column in its low 16 bits and
/// the odd column in its high 16 bits (the operand order of `vpdpwssd`).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Pairs(pub(crate) [i32; 16]);

/// Quantizes `v` (at most [`CHUNK`] values) to `q` (same length) and returns the scale:
/// `v ≈ scale · q`, `|q| ≤ QMAX`, rounded to nearest (ties to even, as `vcvtps2dq`).
pub fn quantize_chunk(v: &[f32], q: &mut [i16]) -> f32 {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let (scale, inv) = chunk_scale(max);
    for (q, v) in q.iter_mut().zip(v) {
        *q = (v * inv).round_ties_even() as i16;
    }
    scale
}

/// `(scale, 1 / scale)` for a chunk whose largest magnitude is `max` (zeros for an all-zero
/// chunk). The kernels compute it with this function, so scales match the reference's.
#[inline]
pub(crate) fn chunk_scale(max: f32) -> (f32, f32) {
    if max > 0.0 {
        (max / QMAX, QMAX / max)
    } else {
        (0.0, 0.0)
    }
}

/// Two 16-bit values as one `vpdpwssd` lane.
fn pair(even: i16, odd: i16) -> i32 {
    (even as u16 as u32 | (odd as u16 as u32) << 16) as i32
}

/// A `[rows, cols]` weight matrix (row = output feature) quantized to 16-bit integers as
/// panels of 32 rows: panel `p`, column pair `j` is two [`Pairs`] (rows `32p..32p + 16`,
/// then the next 16), and panel `p`, chunk `c` has 32 scales (two [`Line`]s). Columns are
/// zero-padded to whole chunks, rows to whole panels.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct I16Panels {
    rows: usize,
    cols: usize,
    chunks: usize,
    panels: usize,
    /// The kernel level packed for: AVX-512 (VNNI) or AVX2.
    isa: Isa,
    data: Vec<Pairs>,
    scales: Vec<Line>,
}

/// Tokens a task takes: whole blocks of the kernel's size that share each panel read.
const RUN: usize = 48;

/// The activations of a run of tokens, quantized: token `t`, chunk `c` has 32 pairs from
/// `(t · chunks + c) · 32` and its scale at `t · chunks + c`.
#[derive(Default)]
pub(crate) struct QuantizedRows {
    pub pairs: Vec<i32>,
    pub scales: Vec<f32>,
}

/// One block of tokens (up to the kernel's 6) against one panel, as the kernel takes it.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct I16Args<'a> {
    /// The block's tokens: `chunks · 32` pairs each.
    pub pairs: &'a [i32],
    /// The block's tokens: `chunks` scales each.
    pub scales: &'a [f32],
    pub chunks: usize,
    /// The panel: `chunks · 32 · 2` pairs, and its `chunks · 2` lines of scales.
    pub panel: &'a [Pairs],
    pub panel_scales: &'a [Line],
    /// The starting value of the panel's 32 rows (the bias, zero past `rows`).
    pub init: &'a [f32],
    /// Rows of this panel that exist (1..=32): results past them are not stored.
    pub valid: usize,
    /// Values per token row of `out`, and where this panel's first row is in it.
    pub out_stride: usize,
    pub out_offset: usize,
}

impl I16Panels {
    /// Packs `w` (`rows * cols`, row-major) if a 16-bit kernel is in force (the dispatch
    /// level is AVX-512 or AVX2), else `None`.
    pub fn pack(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        let isa = crate::dispatch::kernels().isa;
        if !matches!(isa, Isa::Avx512 | Isa::Avx2) {
            return None;
        }
        Self::pack_at(isa, w, rows, cols)
    }

    /// Packs `w` for the kernel of dispatch level `isa` (tests run every level): `None`
    /// below AVX2, when the CPU lacks `isa`, or for an empty matrix. Levels from AVX-512 up
    /// take the VNNI kernel, AVX2 its own; both read the same layout.
    pub fn pack_at(isa: Isa, w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if !isa.includes(Isa::Avx2) || !crate::dispatch::detect().includes(isa) {
            return None;
        }
        let isa = if isa.includes(Isa::Avx512) {
            Isa::Avx512
        } else {
            Isa::Avx2
        };
        if rows == 0 || cols == 0 {
            return None;
        }
        assert_eq!(w.len(), rows * cols, "weights are not {rows}x{cols}");
        let chunks = cols.div_ceil(CHUNK);
        let panels = rows.div_ceil(32);
        let mut data = vec![Pairs([0; 16]); panels * chunks * CHUNK];
        let mut scales = vec![Line([0.0; 16]); panels * chunks * 2];
        let mut q = [0i16; CHUNK];
        for r in 0..rows {
            let (p, i) = (r / 32, r % 32);
            for c in 0..chunks {
                let v = &w[r * cols + c * CHUNK..r * cols + (c * CHUNK + CHUNK).min(cols)];
                q.fill(0);
                scales[(p * chunks + c) * 2 + i / 16].0[i % 16] = quantize_chunk(v, &mut q);
                for j in 0..CHUNK / 2 {
                    let line = (p * chunks * 32 + c * 32 + j) * 2 + i / 16;
                    data[line].0[i % 16] = pair(q[2 * j], q[2 * j + 1]);
                }
            }
        }
        Some(Self {
            rows,
            cols,
            chunks,
            panels,
            isa,
            data,
            scales,
        })
    }

    /// `y[t][r] = Σ_c x[t][c] · w[r][c] (+ bias[r])` for `n_tok` tokens, on the pool.
    pub fn matmul(&self, x: &[f32], n_tok: usize, bias: Option<&[f32]>, y: &mut [f32]) {
        self.matmul_with(x, n_tok, bias, y, false)
    }

    /// As [`matmul`](Self::matmul), all in scalar code: the reference the kernel must equal
    /// bit for bit.
    pub fn matmul_reference(&self, x: &[f32], n_tok: usize, bias: Option<&[f32]>, y: &mut [f32]) {
        self.matmul_with(x, n_tok, bias, y, true)
    }

    fn matmul_with(
        &self,
        x: &[f32],
        n_tok: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
        reference: bool,
    ) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(x.len() >= n_tok * cols && y.len() >= n_tok * rows);
        assert!(bias.is_none_or(|b| b.len() == rows));
        let init = crate::padded_bias(bias, self.panels * 32);
        thread_local! {
            static ROWS: std::cell::RefCell<QuantizedRows> = Default::default();
        }
        // One task per run of tokens, over every panel (whole output rows, so tasks never
        // share a row of `y`); each quantizes its own tokens once for all panels.
        let y_rows = crate::pool::OutRows::new(&mut y[..n_tok * rows], rows);
        crate::pool::run(n_tok.div_ceil(RUN), |b| {
            let t0 = b * RUN;
            let tokens = (n_tok - t0).min(RUN);
            let x = &x[t0 * cols..(t0 + tokens) * cols];
            ROWS.with_borrow_mut(|q| {
                y_rows.with(t0, tokens, |out| {
                    if reference {
                        self.quantize_rows_reference(x, tokens, q);
                        self.run_reference(q, tokens, &init, out);
                    } else {
                        self.run(x, tokens, q, &init, out);
                    }
                })
            });
        });
    }

    /// `x`'s `tokens` rows quantized into `q`, chunk by chunk, zero-padded.
    fn quantize_rows_reference(&self, x: &[f32], tokens: usize, q: &mut QuantizedRows) {
        let (cols, chunks) = (self.cols, self.chunks);
        q.pairs.clear();
        q.scales.clear();
        let mut v = [0i16; CHUNK];
        for t in 0..tokens {
            for c in 0..chunks {
                let part = &x[t * cols + c * CHUNK..t * cols + (c * CHUNK + CHUNK).min(cols)];
                v.fill(0);
                q.scales.push(quantize_chunk(part, &mut v));
                q.pairs
                    .extend((0..CHUNK / 2).map(|j| pair(v[2 * j], v[2 * j + 1])));
            }
        }
    }

    /// The scalar reference of one task: per row, chunk by chunk, the exact integer sum
    /// times `sw · sx` fused into the accumulator.
    fn run_reference(&self, q: &QuantizedRows, tokens: usize, init: &[f32], out: &mut [f32]) {
        let (rows, chunks) = (self.rows, self.chunks);
        let half = |v: i32, hi: bool| if hi { (v >> 16) as i16 } else { v as i16 } as i32;
        for t in 0..tokens {
            for r in 0..rows {
                let (p, i) = (r / 32, r % 32);
                let mut acc = init[r];
                for c in 0..chunks {
                    let mut sum = 0i32;
                    for j in 0..CHUNK / 2 {
                        let a = q.pairs[(t * chunks + c) * 32 + j];
                        let w = self.data[(p * chunks * 32 + c * 32 + j) * 2 + i / 16].0[i % 16];
                        sum += half(a, false) * half(w, false) + half(a, true) * half(w, true);
                    }
                    let sw = self.scales[(p * chunks + c) * 2 + i / 16].0[i % 16];
                    acc = (sum as f32).mul_add(sw * q.scales[t * chunks + c], acc);
                }
                out[t * rows + r] = acc;
            }
        }
    }

    /// The tokens of one task with the kernels of the level packed for.
    #[cfg(target_arch = "x86_64")]
    fn run(&self, x: &[f32], tokens: usize, q: &mut QuantizedRows, init: &[f32], out: &mut [f32]) {
        use crate::x86::{encoder_i16_avx2, encoder_vnni};
        let (rows, cols, chunks) = (self.rows, self.cols, self.chunks);
        let avx512 = self.isa == Isa::Avx512;
        q.pairs.resize(tokens * chunks * 32, 0);
        q.scales.resize(tokens * chunks, 0.0);
        // SAFETY: panels are packed only where the CPU has their level (`pack_at`).
        unsafe {
            if avx512 {
                encoder_vnni::quantize_rows(x, cols, chunks, &mut q.pairs, &mut q.scales)
            } else {
                encoder_i16_avx2::quantize_rows(x, cols, chunks, &mut q.pairs, &mut q.scales)
            }
        };
        let block = if avx512 {
            encoder_vnni::I16_TOKENS
        } else {
            encoder_i16_avx2::I16_TOKENS
        };
        for p in 0..self.panels {
            let panel = &self.data[p * chunks * 64..(p + 1) * chunks * 64];
            let panel_scales = &self.scales[p * chunks * 2..(p + 1) * chunks * 2];
            for t in (0..tokens).step_by(block) {
                let n = (tokens - t).min(block);
                let args = I16Args {
                    pairs: &q.pairs[t * chunks * 32..(t + n) * chunks * 32],
                    scales: &q.scales[t * chunks..(t + n) * chunks],
                    chunks,
                    panel,
                    panel_scales,
                    init: &init[p * 32..p * 32 + 32],
                    valid: (rows - p * 32).min(32),
                    out_stride: rows,
                    out_offset: p * 32,
                };
                let out = &mut out[t * rows..(t + n) * rows];
                // SAFETY: as above.
                unsafe {
                    if avx512 {
                        encoder_vnni::panel_matmul(&args, out)
                    } else {
                        encoder_i16_avx2::panel_matmul(&args, out)
                    }
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn run(&self, _: &[f32], _: usize, _: &mut QuantizedRows, _: &[f32], _: &mut [f32]) {
        unreachable!("I16Panels are only packed on x86-64");
    }
}
