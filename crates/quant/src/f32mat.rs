//! F32 matrix products in packed panels for AVX-512 (encoder models on CPUs without AMX):
//! the weights as panels of 32 output rows stored column by column, so one 8-token × 32-row
//! block of results stays in 16 registers while the panel streams past once.
//!
//! An [`F32Panels`] exists only where the kernel runs: [`F32Panels::pack`] returns `None`
//! below the AVX-512 dispatch level.

use crate::dispatch::Isa;

/// 16 f32 on one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line(pub(crate) [f32; 16]);

/// A `[rows, cols]` weight matrix (row = output feature) as panels of 32 rows: panel `p`,
/// column `k` holds rows `32p..32p + 32` of column `k` in two lines (zeros past `rows`).
// The panels run on x86-64 only; elsewhere `pack` never builds one.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct F32Panels {
    rows: usize,
    cols: usize,
    panels: usize,
    data: Vec<Line>,
}

impl F32Panels {
    /// Packs `w` (`rows * cols`, row-major) if the AVX-512 kernels are in force, else `None`.
    pub fn pack(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if !crate::dispatch::kernels().isa.includes(Isa::Avx512) || rows == 0 || cols == 0 {
            return None;
        }
        assert_eq!(w.len(), rows * cols, "weights are not {rows}x{cols}");
        let panels = rows.div_ceil(32);
        let mut data = vec![Line([0.0; 16]); panels * cols * 2];
        for r in 0..rows {
            let (p, i) = (r / 32, r % 32);
            for k in 0..cols {
                data[(p * cols + k) * 2 + i / 16].0[i % 16] = w[r * cols + k];
            }
        }
        Some(Self {
            rows,
            cols,
            panels,
            data,
        })
    }

    /// `y[t][r] = Σ_c x[t][c] · w[r][c] (+ bias[r])` for `n_tok` tokens, on the pool.
    pub fn matmul(&self, x: &[f32], n_tok: usize, bias: Option<&[f32]>, y: &mut [f32]) {
        let (rows, cols) = (self.rows, self.cols);
        assert!(x.len() >= n_tok * cols && y.len() >= n_tok * rows);
        assert!(bias.is_none_or(|b| b.len() == rows));
        let init = crate::padded_bias(bias, self.panels * 32);
        // One task per block of 8 tokens, over every panel (whole output rows, so tasks
        // never share a row of `y`).
        const TOKENS: usize = 8;
        let y_rows = crate::pool::OutRows::new(&mut y[..n_tok * rows], rows);
        crate::pool::run(n_tok.div_ceil(TOKENS), |b| {
            let t0 = b * TOKENS;
            let tokens = (n_tok - t0).min(TOKENS);
            #[cfg(target_arch = "x86_64")]
            {
                let args = crate::x86::avx512::PanelArgs {
                    x: &x[t0 * cols..(t0 + tokens) * cols],
                    cols,
                    panels: &self.data,
                    init: &init,
                    rows,
                };
                y_rows.with(t0, tokens, |out| {
                    // SAFETY: an `F32Panels` exists only at the Avx512 level or above.
                    unsafe { crate::x86::avx512::panel_matmul(&args, out) }
                });
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = (&y_rows, &init, x, cols, t0, tokens);
                unreachable!("F32Panels are only packed on x86-64");
            }
        });
    }
}
