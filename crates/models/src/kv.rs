//! KV cache: f16 keys and values per layer, as llama.cpp stores them by default.

use half::f16;

pub struct KvCache {
    pub n_ctx: usize,
    /// Key/value width per position: `n_kv_heads * head_dim`.
    pub kv_dim: usize,
    pub k: Vec<Vec<f16>>,
    pub v: Vec<Vec<f16>>,
    /// Positions filled so far.
    pub len: usize,
}

impl KvCache {
    pub fn new(n_layers: usize, n_ctx: usize, kv_dim: usize) -> Self {
        KvCache {
            n_ctx,
            kv_dim,
            k: (0..n_layers)
                .map(|_| vec![f16::ZERO; n_ctx * kv_dim])
                .collect(),
            v: (0..n_layers)
                .map(|_| vec![f16::ZERO; n_ctx * kv_dim])
                .collect(),
            len: 0,
        }
    }

    /// Forgets everything after `len` positions (the rest of the cache is reused).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Writes the keys and values of `n` new positions starting at `pos`.
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let at = pos * self.kv_dim;
        for (dst, &src) in self.k[layer][at..at + k.len()].iter_mut().zip(k) {
            *dst = f16::from_f32(src);
        }
        for (dst, &src) in self.v[layer][at..at + v.len()].iter_mut().zip(v) {
            *dst = f16::from_f32(src);
        }
    }

    pub fn bytes(&self) -> usize {
        self.k.len() * 2 * self.n_ctx * self.kv_dim * 2
    }
}
