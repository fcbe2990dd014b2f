//! Weights are views into the mapped GGUF file, checked once at load.

use crate::Result;
use hearth_gguf::{GgmlType, Gguf};
use hearth_quant::QMatrix;

/// A weight matrix: `rows` rows of `cols` values, stored in the file.
#[derive(Debug, Clone)]
pub struct Mat {
    pub name: String,
    /// Position in the file's tensor list, so a forward pass needs no name lookups.
    index: usize,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
}

impl Mat {
    /// Looks up `name`, checks its shape is `[cols, rows]` (ggml order) and that its blocks
    /// are usable.
    pub fn load(g: &Gguf, name: &str, cols: usize, rows: usize) -> Result<Mat> {
        let (info, bytes) = g.tensor_with_shape(name, &[cols as u64, rows as u64])?;
        let m = QMatrix::new(name, info.ty, cols, rows, bytes)?;
        let index = g.tensor_position(name).expect("found above");
        // Rows regrouped for this CPU's decoding kernels where it has them (Q4_0, IQ4_NL,
        // Q4_1, Q5_0, Q4_K, Q5_K, IQ4_XS at AVX2): the regrouped copy replaces the file's
        // bytes in memory (loaded twice, as a tied embedding and output, it is regrouped
        // once).
        if g.can_replace_layout() && g.replaced_layout(index).is_none() {
            if let Some(groups) = m.interleave() {
                g.replace_layout(index, groups);
            }
        }
        Ok(Mat {
            name: name.to_string(),
            index,
            ty: info.ty,
            rows,
            cols,
        })
    }

    /// The matrix's blocks inside `g` (the file it was loaded from).
    pub fn view<'a>(&self, g: &'a Gguf) -> QMatrix<'a> {
        let info = &g.tensors[self.index];
        match g.replaced_layout(self.index) {
            Some(groups) => {
                QMatrix::from_interleaved(&self.name, self.ty, self.cols, self.rows, groups)
            }
            None => QMatrix::new(
                &self.name,
                self.ty,
                self.cols,
                self.rows,
                g.tensor_bytes(info),
            ),
        }
        .expect("checked at load")
    }
}

/// A vector (norm weights) of `len` values, dequantized to f32.
pub fn load_vec(g: &Gguf, name: &str, len: usize) -> Result<Vec<f32>> {
    let (info, bytes) = g.tensor_with_shape(name, &[len as u64])?;
    let m = QMatrix::new(name, info.ty, len, 1, bytes)?;
    let mut out = vec![0.0; len];
    m.dequantize_row(0, &mut out);
    Ok(out)
}
