//! F32 matrix products in packed panels (encoder models on CPUs without AMX): the weights
//! as panels of 32 output rows (AVX-512) or 16 (AVX2) stored column by column, so one block
//! of tokens × a panel's rows of results stays in registers while the panel streams past.
//!
//! Each task takes a run of tokens and walks the panels one at a time, every block of the
//! run's tokens over a panel before the next panel: a panel (one line per 16 rows and
//! column) is read from memory once per run and from L1/L2 for the run's other blocks.
//!
//! An [`F32Panels`] exists only where a kernel runs: [`F32Panels::pack`] returns `None`
//! below the AVX2 dispatch level (and on other architectures).

use crate::dispatch::Isa;

/// 16 f32 on one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [f32; 16]);

/// A `[rows, cols]` weight matrix (row = output feature) as panels of `width` rows: panel
/// `p`, column `k` holds rows `width·p..width·(p + 1)` of column `k` in `width / 16` lines
/// (zeros past `rows`).
// The panels run on x86-64 only; elsewhere `pack` never builds one.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct F32Panels {
    rows: usize,
    cols: usize,
    width: usize,
    panels: usize,
    data: Vec<Line>,
}

/// One block of tokens against panels of an `F32Panels`, as the kernels take it.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) struct PanelArgs<'a> {
    /// The block's token rows, `cols` values each.
    pub x: &'a [f32],
    pub cols: usize,
    /// Every panel: `width / 16 * cols` lines each.
    pub panels: &'a [Line],
    /// The starting value of every row (the bias, zero-padded to whole panels).
    pub init: &'a [f32],
    pub rows: usize,
}

/// Tokens a task takes: whole blocks of the kernel's size that share each panel read.
const RUN: usize = 48;

impl F32Panels {
    /// Packs `w` (`rows * cols`, row-major) if a panel kernel is in force, else `None`.
    pub fn pack(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        Self::pack_at(crate::dispatch::kernels().isa, w, rows, cols)
    }

    /// As [`pack`](Self::pack), for the panel kernel of dispatch level `isa` (tests compare
    /// every level); `None` also when the CPU lacks `isa`.
    pub fn pack_at(isa: Isa, w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if !crate::dispatch::detect().includes(isa) {
            return None;
        }
        let width = if isa.includes(Isa::Avx512) {
            32
        } else if isa.includes(Isa::Avx2) {
            16
        } else {
            return None;
        };
        if rows == 0 || cols == 0 {
            return None;
        }
        assert_eq!(w.len(), rows * cols, "weights are not {rows}x{cols}");
        let panels = rows.div_ceil(width);
        let lines = width / 16;
        let mut data = vec![Line([0.0; 16]); panels * cols * lines];
        for r in 0..rows {
            let (p, i) = (r / width, r % width);
            for k in 0..cols {
                data[(p * cols + k) * lines + i / 16].0[i % 16] = w[r * cols + k];
            }
        }
        Some(Self {
            rows,
            cols,
            width,
            panels,
            data,
        })
    }

    /// `y[t][r] = Σ_c x[t][c] · w[r][c] (+ bias[r])` for `n_tok` tokens, on the pool.
    pub fn matmul(&self, x: &[f32], n_tok: usize, bias: Option<&[f32]>, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(x.len() >= n_tok * cols && y.len() >= n_tok * rows);
        assert!(bias.is_none_or(|b| b.len() == rows));
        let init = crate::padded_bias(bias, self.panels * self.width);
        // One task per run of tokens, over every panel (whole output rows, so tasks never
        // share a row of `y`).
        let y_rows = crate::pool::OutRows::new(&mut y[..n_tok * rows], rows);
        crate::pool::run(n_tok.div_ceil(RUN), |b| {
            let t0 = b * RUN;
            let tokens = (n_tok - t0).min(RUN);
            y_rows.with(t0, tokens, |out| {
                self.run(&x[t0 * cols..(t0 + tokens) * cols], tokens, &init, out)
            });
        });
    }

    /// The tokens of one task.
    #[cfg(target_arch = "x86_64")]
    fn run(&self, x: &[f32], tokens: usize, init: &[f32], out: &mut [f32]) {
        use crate::x86::{avx512, encoder_avx2};
        let (rows, cols) = (self.rows, self.cols);
        let block = if self.width == 32 {
            avx512::PANEL_TOKENS
        } else {
            encoder_avx2::PANEL_TOKENS
        };
        for p in 0..self.panels {
            for t in (0..tokens).step_by(block) {
                let n = (tokens - t).min(block);
                let args = PanelArgs {
                    x: &x[t * cols..(t + n) * cols],
                    cols,
                    panels: &self.data,
                    init,
                    rows,
                };
                let out = &mut out[t * rows..(t + n) * rows];
                if self.width == 32 {
                    // SAFETY: 32-row panels are packed only at the Avx512 level or above.
                    unsafe { avx512::panel_matmul(&args, p..p + 1, out) }
                } else {
                    // SAFETY: 16-row panels are packed only at the Avx2 level or above.
                    unsafe { encoder_avx2::panel_matmul(&args, p..p + 1, out) }
                }
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn run(&self, _: &[f32], _: usize, _: &[f32], _: &mut [f32]) {
        unreachable!("F32Panels are only packed on x86-64");
    }
}
