//! Decoder attention over a quantized KV cache: keys and values held as Q8_0 or Q4_0 blocks
//! per position, as llama.cpp's `--cache-type-k/-v q8_0|q4_0` hold them. The numerics follow
//! llama.cpp's CPU flash-attention path for such caches (the one it requires for a quantized
//! V): the query is quantized to Q8_0 and dotted with each key by the block type's own dot
//! kernel, the softmax is in f32, and each value row is dequantized to f32 and added with
//! its weight — the cache is read as it is stored, never copied out whole.

use bytemuck::Zeroable;

use crate::blocks::{BlockQ4_0, BlockQ8_0, QK};
use crate::dispatch::Kernels;

/// Most values per head a quantized cache takes (the query's Q8_0 blocks live on the stack).
pub const MAX_HEAD_DIM: usize = 512;

/// A block type a KV cache can hold, with the kernels that read and write it.
pub trait KvBlock: bytemuck::Pod + Send + Sync {
    /// Σ key · query over a head's blocks.
    fn dot(kern: &Kernels, key: &[Self], q: &[BlockQ8_0]) -> f32;
    fn dequantize(kern: &Kernels, x: &[Self], y: &mut [f32]);
    fn quantize(kern: &Kernels, x: &[f32], y: &mut [Self]);
    /// The table's attention kernel for a cache of this type.
    fn attend(kern: &Kernels) -> fn(&AttendQuant<Self>, &mut [f32], &mut Vec<f32>);
}

impl KvBlock for BlockQ8_0 {
    fn dot(kern: &Kernels, key: &[Self], q: &[BlockQ8_0]) -> f32 {
        (kern.dot_q8_0)(key, q)
    }
    fn dequantize(kern: &Kernels, x: &[Self], y: &mut [f32]) {
        (kern.dequantize_q8_0)(x, y)
    }
    fn quantize(kern: &Kernels, x: &[f32], y: &mut [Self]) {
        (kern.quantize_q8_0)(x, y)
    }
    fn attend(kern: &Kernels) -> fn(&AttendQuant<Self>, &mut [f32], &mut Vec<f32>) {
        kern.attend_q8_0
    }
}

impl KvBlock for BlockQ4_0 {
    fn dot(kern: &Kernels, key: &[Self], q: &[BlockQ8_0]) -> f32 {
        (kern.dot_q4_0)(key, q)
    }
    fn dequantize(kern: &Kernels, x: &[Self], y: &mut [f32]) {
        (kern.dequantize_q4_0)(x, y)
    }
    // Once per new position and layer: the reference is fast enough and is llama.cpp's.
    fn quantize(_: &Kernels, x: &[f32], y: &mut [Self]) {
        crate::reference::quantize_row_q4_0(x, y)
    }
    fn attend(kern: &Kernels) -> fn(&AttendQuant<Self>, &mut [f32], &mut Vec<f32>) {
        kern.attend_q4_0
    }
}

/// Up to 8 query rows of one KV head over a quantized cache (as [`crate::AttendF16`]).
pub struct AttendQuant<'a, B> {
    /// Query rows: row `r` at `q[at[r]..][..head_dim]`; its output goes to the same place
    /// of `out`.
    pub q: &'a [f32],
    pub at: [usize; 8],
    pub rows: usize,
    /// Row `r` sees the keys `keys[r].0..keys[r].1` (non-empty).
    pub keys: [(usize, usize); 8],
    /// Key and value of position `j`: `k[j * kv_stride..][..head_dim / 32]` blocks, likewise
    /// `v`.
    pub k: &'a [B],
    pub v: &'a [B],
    /// Blocks per position.
    pub kv_stride: usize,
    /// A multiple of 32, at most [`MAX_HEAD_DIM`].
    pub head_dim: usize,
    pub scale: f32,
    /// Attention logit soft-capping: scores become `cap · tanh(score / cap)` after `scale`.
    /// 0 turns it off.
    pub softcap: f32,
}

impl<B> AttendQuant<'_, B> {
    /// Checks the shapes every kernel relies on and returns the keys' span `lo..lo + n`.
    ///
    /// # Panics
    /// If `head_dim` is not a multiple of 32 up to [`MAX_HEAD_DIM`], `rows` not 1..=8, or a
    /// row's keys, query or output lie outside its slice.
    pub(crate) fn checked_span(&self, out_len: usize) -> (usize, usize) {
        let hd = self.head_dim;
        assert!(hd.is_multiple_of(QK) && hd <= MAX_HEAD_DIM && (1..=8).contains(&self.rows));
        let nb = hd / QK;
        let (mut lo, mut hi) = (usize::MAX, 0);
        for r in 0..self.rows {
            let (first, end) = self.keys[r];
            assert!(first < end && self.at[r] + hd <= self.q.len().min(out_len));
            assert!((end - 1) * self.kv_stride + nb <= self.k.len().min(self.v.len()));
            (lo, hi) = (lo.min(first), hi.max(end));
        }
        (lo, hi - lo)
    }
}

/// The scalar table, made once (the reference kernels run on every call of the scalar
/// level's attention).
fn scalar_table() -> &'static Kernels {
    static TABLE: std::sync::OnceLock<Kernels> = std::sync::OnceLock::new();
    TABLE.get_or_init(Kernels::scalar)
}

/// The definition of `Kernels::attend_q8_0` (the scalar table's).
pub fn attend_q8_0(a: &AttendQuant<BlockQ8_0>, out: &mut [f32], scratch: &mut Vec<f32>) {
    attend_by_rows(scalar_table(), a, out, scratch)
}

/// The definition of `Kernels::attend_q4_0` (the scalar table's).
pub fn attend_q4_0(a: &AttendQuant<BlockQ4_0>, out: &mut [f32], scratch: &mut Vec<f32>) {
    attend_by_rows(scalar_table(), a, out, scratch)
}

/// Attention for the rows of `a`, one row at a time, with the kernels `kern`. `scratch` is
/// grown to `rows × keys + head_dim` floats if it is shorter.
///
/// # Panics
/// If `head_dim` is not a multiple of 32 up to [`MAX_HEAD_DIM`], or a row's keys, query or
/// output lie outside its slice (callers check shapes when the cache is made).
pub fn attend_by_rows<B: KvBlock>(
    kern: &Kernels,
    a: &AttendQuant<B>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (hd, nb) = (a.head_dim, a.head_dim / QK);
    let (lo, n) = a.checked_span(out.len());
    let need = a.rows * n + hd;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    let (ps, vrow) = scratch[..need].split_at_mut(a.rows * n);
    // Scores: row r's keys at ps[r * n + (j - lo)], then its softmax weights.
    let mut q8 = [BlockQ8_0::zeroed(); MAX_HEAD_DIM / QK];
    for r in 0..a.rows {
        (kern.quantize_q8_0)(&a.q[a.at[r]..][..hd], &mut q8[..nb]);
        let (first, end) = a.keys[r];
        let p = &mut ps[r * n + first - lo..r * n + end - lo];
        for (s, j) in p.iter_mut().zip(first..end) {
            let dot = B::dot(kern, &a.k[j * a.kv_stride..][..nb], &q8[..nb]);
            *s = crate::scaled_score(dot, a.scale, a.softcap);
        }
        (kern.softmax)(p);
        out[a.at[r]..][..hd].fill(0.0);
    }
    // out_r = Σ_j p[r][j] · v_j: each value row dequantized once for every row that sees it.
    for j in lo..lo + n {
        B::dequantize(kern, &a.v[j * a.kv_stride..][..nb], vrow);
        for r in 0..a.rows {
            let (first, end) = a.keys[r];
            if (first..end).contains(&j) {
                (kern.axpy_f32)(&mut out[a.at[r]..][..hd], ps[r * n + j - lo], vrow);
            }
        }
    }
}
