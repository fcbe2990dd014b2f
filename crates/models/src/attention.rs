//! Causal self-attention over the KV cache (grouped-query, optional sliding window).
//! Numerics follow llama.cpp's non-flash path: Q rounded to f16 and dotted with f16 keys,
//! softmax in f32, weights rounded to f16 and multiplied with f16 values.

use crate::ops::softmax;
use half::f16;
use std::cell::RefCell;

pub struct AttnShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Multiplies Q·K before softmax.
    pub scale: f32,
    /// Keys at least this far behind the query are masked (sliding-window layers).
    pub window: Option<usize>,
}

thread_local! {
    static SCRATCH: RefCell<(Vec<f32>, Vec<f16>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `q`: `[n_tok, n_head*head_dim]` for positions `pos0..pos0+n_tok`, whose keys and values
/// are already in `k_cache`/`v_cache` (`[pos, n_kv_head*head_dim]`). Writes `out` like `q`.
pub fn attention(
    q: &[f32],
    k_cache: &[f16],
    v_cache: &[f16],
    pos0: usize,
    s: &AttnShape,
    out: &mut [f32],
) {
    let hd = s.head_dim;
    let kv_dim = s.n_kv_head * hd;
    let group = s.n_head / s.n_kv_head;
    let k = hearth_quant::dispatch::kernels();
    let (dot_f16, axpy_f16) = (k.dot_f16, k.axpy_f16);
    hearth_quant::pool::for_each_chunk(out, hd, |idx, out_h| {
        let (t, h) = (idx / s.n_head, idx % s.n_head);
        let pos = pos0 + t;
        let kvh = h / group;
        let first = match s.window {
            Some(w) if pos + 1 > w => pos + 1 - w,
            _ => 0,
        };
        SCRATCH.with(|cell| {
            let (scores, q16) = &mut *cell.borrow_mut();
            q16.clear();
            q16.extend(
                q[idx * hd..(idx + 1) * hd]
                    .iter()
                    .map(|&x| f16::from_f32(x)),
            );
            scores.clear();
            // The whole cache's length once, so decoding never grows this buffer.
            scores.reserve(k_cache.len() / kv_dim);
            for j in first..=pos {
                let k = &k_cache[j * kv_dim + kvh * hd..][..hd];
                scores.push(dot_f16(k, q16) * s.scale);
            }
            softmax(scores);
            out_h.fill(0.0);
            for (j, &w) in (first..=pos).zip(scores.iter()) {
                let w = f16::from_f32(w).to_f32();
                let v = &v_cache[j * kv_dim + kvh * hd..][..hd];
                axpy_f16(out_h, w, v);
            }
        });
    });
}
