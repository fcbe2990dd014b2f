//! KV cache: f16 keys and values per layer, as llama.cpp stores them by default.
//!
//! A sliding-window layer keeps only its window plus one batch of positions: when a new
//! batch would not fit, the rows still inside the window move to the front of its buffer
//! (in order, so attention reads the same keys in the same order as over a full cache and
//! the results are bit-identical), and the rows that fell out are dropped.

use half::f16;
use half::slice::HalfBitsSliceExt;

use crate::MAX_BATCH;

pub struct KvCache {
    pub n_ctx: usize,
    /// Key/value width per position: `n_kv_heads * head_dim`.
    pub kv_dim: usize,
    layers: Vec<LayerKv>,
    /// Positions filled so far.
    pub len: usize,
}

/// Keys and values are held as f16 bits in `u16`s: a buffer of zeros is then allocated
/// zeroed by the system (calloc), so its pages take memory only once positions are written,
/// and a cache sized for the whole context costs what the sequence uses.
struct LayerKv {
    k: Vec<u16>,
    v: Vec<u16>,
    /// Attention window (keys at least this far behind a query are not seen); `None` for
    /// full attention.
    window: Option<usize>,
    /// Absolute position of the buffer's first row (0 unless rows fell out of the window).
    first: usize,
}

impl LayerKv {
    /// Rows the buffer holds.
    fn capacity(&self, kv_dim: usize) -> usize {
        self.k.len() / kv_dim.max(1)
    }
}

impl KvCache {
    /// A cache for layers with these attention windows (`None`: full attention), each
    /// holding up to `n_ctx` positions.
    pub fn new(windows: &[Option<usize>], n_ctx: usize, kv_dim: usize) -> Self {
        let layers = windows
            .iter()
            .map(|&window| {
                let rows = rows_held(window, n_ctx);
                LayerKv {
                    k: vec![0; rows * kv_dim],
                    v: vec![0; rows * kv_dim],
                    window,
                    first: 0,
                }
            })
            .collect();
        KvCache {
            n_ctx,
            kv_dim,
            layers,
            len: 0,
        }
    }

    /// Forgets everything after `len` positions (the rest of the cache is reused) and
    /// returns how many positions stay: `len`, or 0 when a sliding-window layer has already
    /// dropped keys that position `len` would attend to (the prefix must then be computed
    /// again).
    pub fn truncate(&mut self, len: usize) -> usize {
        let len = self.len.min(len);
        let keeps = self.layers.iter().all(|l| match l.window {
            Some(w) if l.first > 0 => l.first <= (len + 1).saturating_sub(w),
            _ => true,
        });
        self.len = if keeps { len } else { 0 };
        if self.len == 0 {
            self.layers.iter_mut().for_each(|l| l.first = 0);
        }
        self.len
    }

    /// Writes the keys and values of `n` new positions starting at `pos` (= `self.len`
    /// before the batch: positions are appended in order).
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let kv_dim = self.kv_dim;
        let l = &mut self.layers[layer];
        let n = k.len() / kv_dim.max(1);
        if pos + n - l.first > l.capacity(kv_dim) {
            // Keep the rows the batch's first query can still see: from `pos + 1 - window`.
            let w = l.window.unwrap_or(usize::MAX);
            let keep_from = (pos + 1).saturating_sub(w).max(l.first);
            let (from, to) = ((keep_from - l.first) * kv_dim, (pos - l.first) * kv_dim);
            l.k.copy_within(from..to, 0);
            l.v.copy_within(from..to, 0);
            l.first = keep_from;
        }
        let at = (pos - l.first) * kv_dim;
        let keys: &mut [f16] = l.k[at..at + k.len()].reinterpret_cast_mut();
        for (dst, &src) in keys.iter_mut().zip(k) {
            *dst = f16::from_f32(src);
        }
        let values: &mut [f16] = l.v[at..at + v.len()].reinterpret_cast_mut();
        for (dst, &src) in values.iter_mut().zip(v) {
            *dst = f16::from_f32(src);
        }
    }

    /// Layer `layer`'s keys and values (`[rows, kv_dim]`) and the absolute position of
    /// their first row.
    pub fn layer(&self, layer: usize) -> (&[f16], &[f16], usize) {
        let l = &self.layers[layer];
        (l.k.reinterpret_cast(), l.v.reinterpret_cast(), l.first)
    }

    /// Bytes the cache may hold (what it takes once every position is written).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.k.len() + l.v.len()) * 2)
            .sum()
    }
}

/// Bytes of a cache for layers with these windows and `n_ctx` positions (saturating: any
/// `n_ctx` a user types gets a number to refuse, not an overflow).
pub fn cache_bytes(windows: &[Option<usize>], n_ctx: usize, kv_dim: usize) -> u64 {
    let total: u128 = windows
        .iter()
        .map(|&w| 4 * rows_held(w, n_ctx) as u128 * kv_dim as u128)
        .sum();
    total.min(u64::MAX as u128) as u64
}

/// Rows a layer's buffer holds: the whole context, or for a window layer its window behind
/// the first query of a batch plus the batch (`window - 1 + MAX_BATCH`), if less.
fn rows_held(window: Option<usize>, n_ctx: usize) -> usize {
    match window {
        Some(w) => n_ctx.min(w.saturating_sub(1).saturating_add(MAX_BATCH)),
        None => n_ctx,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window layer's rows, read back by absolute position, are those written.
    #[test]
    fn window_layers_keep_their_window_in_order() {
        let (w, kv) = (5, 2);
        let mut c = KvCache::new(&[None, Some(w)], 2000, kv);
        let cap = w - 1 + MAX_BATCH;
        assert_eq!(c.bytes(), (2000 + cap) * kv * 2 * 2);
        let row = |p: usize| [p as f32, -(p as f32)];
        let mut pos = 0;
        for n in [1, 255, 256, 3, 256, 100, 1, 1, 256] {
            let k: Vec<f32> = (pos..pos + n).flat_map(row).collect();
            for layer in 0..2 {
                c.store(layer, pos, &k, &k);
            }
            pos += n;
            c.len = pos;
            let (keys, _, first) = c.layer(1);
            // Every key the last batch's queries see is there, at its place.
            for p in (pos - n + 1).saturating_sub(w)..pos {
                assert_eq!(keys[(p - first) * kv].to_f32(), p as f32, "pos {p}");
            }
            let (keys, _, first) = c.layer(0);
            assert_eq!(
                (first, keys[(pos - 1) * kv].to_f32()),
                (0, (pos - 1) as f32)
            );
        }
        // A prefix whose window is gone cannot be kept; one whose window is there can.
        let (_, _, first) = c.layer(1);
        assert!(first > 0);
        assert_eq!(c.truncate(first + w - 1), first + w - 1);
        assert_eq!(c.truncate(first + w - 2), 0);
        assert_eq!(c.layer(1).2, 0);
    }
}
