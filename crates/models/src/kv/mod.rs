//! KV cache: keys and values per layer, as f16 (llama.cpp's default) or quantized per
//! 32-value block to Q8_0 or Q4_0 (llama.cpp's `--cache-type-k/-v`, Ollama's
//! `OLLAMA_KV_CACHE_TYPE`), which attention then reads as stored (`hearth_quant::kvquant`).
//!
//! A sliding-window layer keeps only its window plus one batch of positions: when a new
//! batch would not fit, the rows still inside the window move to the front of its buffer
//! (in order, so attention reads the same keys in the same order as over a full cache and
//! the results are bit-identical), and the rows that fell out are dropped.

use half::f16;
use half::slice::HalfBitsSliceExt;
use hearth_quant::blocks::{BlockQ4_0, BlockQ8_0, QK};
use hearth_quant::kvquant::KvBlock;

use crate::MAX_BATCH;

#[cfg(target_os = "linux")]
pub mod pool;
#[cfg(not(target_os = "linux"))]
#[path = "nopool.rs"]
pub mod pool;
pub use pool::{KvPool, PoolRegion};

/// How a KV cache stores keys and values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvType {
    #[default]
    F16,
    Q8_0,
    Q4_0,
}

impl KvType {
    pub const NAMES: &'static str = "f16, q8_0, q4_0";

    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::Q8_0 => "q8_0",
            KvType::Q4_0 => "q4_0",
        }
    }

    /// The type called `name` (as llama.cpp and Ollama spell them, any case).
    pub fn parse(name: &str) -> Option<KvType> {
        match name.trim().to_ascii_lowercase().as_str() {
            "f16" => Some(KvType::F16),
            "q8_0" => Some(KvType::Q8_0),
            "q4_0" => Some(KvType::Q4_0),
            _ => None,
        }
    }

    /// The Walsh–Hadamard sizes (for K and Q, for V) that keys and values are turned by
    /// before a quantized cache stores them, as llama.cpp does (`attn_rot_k/v`, on when the
    /// head size is a multiple of 64): a rotation spreads a few large channels over the whole
    /// block, so one block scale fits all its values better. K (and Q) turn by the largest
    /// power of two dividing the head size, V by 64. `None` for f16 or other head sizes.
    pub fn rotations(self, head_dim: usize) -> Option<(usize, usize)> {
        if self == KvType::F16 || head_dim == 0 || !head_dim.is_multiple_of(64) {
            return None;
        }
        Some((1 << head_dim.trailing_zeros(), 64))
    }

    /// `u16` units one position of `kv_dim` keys (or values) takes.
    fn units(self, kv_dim: usize) -> usize {
        let blocks = kv_dim / QK;
        match self {
            KvType::F16 => kv_dim,
            KvType::Q8_0 => blocks * std::mem::size_of::<BlockQ8_0>() / 2,
            KvType::Q4_0 => blocks * std::mem::size_of::<BlockQ4_0>() / 2,
        }
    }
}

impl std::str::FromStr for KvType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        KvType::parse(s)
            .ok_or_else(|| format!("unknown KV cache type {s:?} (supported: {})", KvType::NAMES))
    }
}

pub struct KvCache {
    pub n_ctx: usize,
    /// Key/value width per position: `n_kv_heads * head_dim`.
    pub kv_dim: usize,
    pub ty: KvType,
    /// `u16` units per position (see [`KvType`]).
    units: usize,
    layers: Vec<LayerKv>,
    /// Positions filled so far.
    pub len: usize,
    /// The pool region holding the full-attention layers' keys and values (a served
    /// model's slot, see [`pool`]); `None`: every layer owns its buffers.
    region: Option<PoolRegion>,
    /// Why the pool region could not be set right; the cache refuses to run until then.
    fault: Option<String>,
}

/// Keys and values are held as `u16`s (f16 bits, or blocks of 2-byte alignment): a buffer
/// of zeros is then allocated zeroed by the system (calloc), so its pages take memory only
/// once positions are written, and a cache sized for the whole context costs what the
/// sequence uses.
struct LayerKv {
    store: Store,
    /// Attention window (keys at least this far behind a query are not seen); `None` for
    /// full attention.
    window: Option<usize>,
    /// Absolute position of the buffer's first row (0 unless rows fell out of the window).
    first: usize,
}

enum Store {
    Owned {
        k: Vec<u16>,
        v: Vec<u16>,
    },
    /// Buffers `k` and `v` of the cache's pool region.
    Pooled {
        k: usize,
        v: usize,
    },
}

/// One layer's keys and values as attention reads them (`[rows, kv_dim]` values, or
/// `[rows, kv_dim / 32]` blocks).
#[derive(Clone, Copy)]
pub enum KvLayer<'a> {
    F16 {
        k: &'a [f16],
        v: &'a [f16],
    },
    Q8_0 {
        k: &'a [BlockQ8_0],
        v: &'a [BlockQ8_0],
    },
    Q4_0 {
        k: &'a [BlockQ4_0],
        v: &'a [BlockQ4_0],
    },
}

impl KvLayer<'_> {
    /// Positions the buffer holds.
    pub fn rows(&self, kv_dim: usize) -> usize {
        match self {
            KvLayer::F16 { k, .. } => k.len() / kv_dim.max(1),
            KvLayer::Q8_0 { k, .. } => k.len() / (kv_dim / QK).max(1),
            KvLayer::Q4_0 { k, .. } => k.len() / (kv_dim / QK).max(1),
        }
    }
}

impl KvCache {
    /// A cache for layers with these attention windows (`None`: full attention), each
    /// holding up to `n_ctx` positions. A quantized `ty` needs `kv_dim` to be a multiple of
    /// 32 (`Model::set_kv_type` checks the heads).
    pub fn new(windows: &[Option<usize>], n_ctx: usize, kv_dim: usize, ty: KvType) -> Self {
        Self::build(windows, n_ctx, kv_dim, ty, None)
    }

    /// A cache whose full-attention layers live in `region` of a pool made with
    /// [`KvCache::pool_row_bytes`] of the same layers, `n_ctx`, `kv_dim` and `ty`.
    pub fn pooled(
        windows: &[Option<usize>],
        n_ctx: usize,
        kv_dim: usize,
        ty: KvType,
        region: PoolRegion,
    ) -> Self {
        Self::build(windows, n_ctx, kv_dim, ty, Some(region))
    }

    /// Bytes per row of each buffer a pool holds for these layers: every full-attention
    /// layer's keys, then values.
    pub fn pool_row_bytes(windows: &[Option<usize>], kv_dim: usize, ty: KvType) -> Vec<usize> {
        let row = ty.units(kv_dim) * 2;
        windows
            .iter()
            .filter(|w| w.is_none())
            .flat_map(|_| [row, row])
            .collect()
    }

    fn build(
        windows: &[Option<usize>],
        n_ctx: usize,
        kv_dim: usize,
        ty: KvType,
        region: Option<PoolRegion>,
    ) -> Self {
        assert!(
            ty == KvType::F16 || kv_dim.is_multiple_of(QK),
            "a {} cache needs whole blocks",
            ty.name()
        );
        let units = ty.units(kv_dim);
        let mut pooled = 0;
        let layers = windows
            .iter()
            .map(|&window| {
                let store = if window.is_none() && region.is_some() {
                    pooled += 2;
                    Store::Pooled {
                        k: pooled - 2,
                        v: pooled - 1,
                    }
                } else {
                    let rows = rows_held(window, n_ctx);
                    Store::Owned {
                        k: vec![0; rows * units],
                        v: vec![0; rows * units],
                    }
                };
                LayerKv {
                    store,
                    window,
                    first: 0,
                }
            })
            .collect();
        KvCache {
            n_ctx,
            kv_dim,
            ty,
            units,
            layers,
            len: 0,
            region,
            fault: None,
        }
    }

    /// Why this cache cannot run (its pool region could not be set right), if so.
    pub fn fault(&self) -> Option<&str> {
        self.fault.as_deref()
    }

    /// The pool slot this cache's region is, if pooled.
    pub fn pool_slot(&self) -> Option<usize> {
        self.region.as_ref().map(|r| r.slot())
    }

    /// Whether [`KvCache::share_prefix`] can take this cache's first `rows` positions: both
    /// pooled, and every sliding-window layer still holds the window position `rows` sees.
    pub fn can_share(&self, rows: usize) -> bool {
        rows > 0
            && rows <= self.len
            && self.region.is_some()
            && self.layers.iter().all(|l| match l.window {
                Some(w) => l.first <= (rows + 1).saturating_sub(w),
                None => true,
            })
    }

    /// Starts over with `donor`'s first `rows` positions: full-attention layers map the
    /// donor's pages (stored once for both), sliding-window layers copy the window. Returns
    /// the positions now held (0 if the donor cannot give them).
    pub fn share_prefix(&mut self, donor: &KvCache, rows: usize) -> usize {
        self.truncate(0);
        let same = (self.n_ctx, self.kv_dim, self.ty, self.layers.len())
            == (donor.n_ctx, donor.kv_dim, donor.ty, donor.layers.len());
        let (Some(region), Some(from)) = (self.region.as_mut(), donor.region.as_ref()) else {
            return 0;
        };
        if !same || !donor.can_share(rows) || self.fault.is_some() {
            return 0;
        }
        if let Err(e) = region.share_from(from, rows) {
            self.fault = Some(format!("sharing KV pages failed: {e}"));
            return 0;
        }
        let units = self.units;
        for (il, l) in self.layers.iter_mut().enumerate() {
            let Some(w) = l.window else { continue };
            let Store::Owned { k, v } = &mut l.store else {
                continue;
            };
            let (dk, dv, dfirst) = match &donor.layers[il].store {
                Store::Owned { k, v } => (k, v, donor.layers[il].first),
                Store::Pooled { .. } => return 0,
            };
            let keep_from = (rows + 1).saturating_sub(w);
            let span = (keep_from - dfirst) * units..(rows - dfirst) * units;
            k[..span.len()].copy_from_slice(&dk[span.clone()]);
            v[..span.len()].copy_from_slice(&dv[span]);
            l.first = keep_from;
        }
        self.len = rows;
        rows
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
        if let Some(region) = self.region.as_mut() {
            // Pages from here on become this cache's own and writable.
            match region.release(self.len) {
                Ok(()) => self.fault = None,
                Err(e) => {
                    self.fault = Some(format!("releasing KV pages failed: {e}"));
                    self.len = 0;
                }
            }
        }
        self.len
    }

    /// Writes the keys and values of `n` new positions starting at `pos` (= `self.len`
    /// before the batch: positions are appended in order).
    pub fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (kv_dim, units, ty) = (self.kv_dim, self.units, self.ty);
        let l = &mut self.layers[layer];
        let n = k.len() / kv_dim.max(1);
        let (lk, lv) = match &mut l.store {
            Store::Owned { k, v } => (k.as_mut_slice(), v.as_mut_slice()),
            Store::Pooled { k, v } => self
                .region
                .as_mut()
                .expect("a pooled layer has a region")
                .buffers_mut(*k, *v),
        };
        if pos + n - l.first > lk.len() / units.max(1) {
            // Keep the rows the batch's first query can still see: from `pos + 1 - window`.
            let w = l.window.unwrap_or(usize::MAX);
            let keep_from = (pos + 1).saturating_sub(w).max(l.first);
            let (from, to) = ((keep_from - l.first) * units, (pos - l.first) * units);
            lk.copy_within(from..to, 0);
            lv.copy_within(from..to, 0);
            l.first = keep_from;
        }
        let at = (pos - l.first) * units;
        let (kd, vd) = (&mut lk[at..at + n * units], &mut lv[at..at + n * units]);
        match ty {
            KvType::F16 => {
                for (dst, src) in [(kd, k), (vd, v)] {
                    let dst: &mut [f16] = dst.reinterpret_cast_mut();
                    for (d, &s) in dst.iter_mut().zip(src) {
                        *d = f16::from_f32(s);
                    }
                }
            }
            KvType::Q8_0 => quantize_rows::<BlockQ8_0>(kd, vd, k, v),
            KvType::Q4_0 => quantize_rows::<BlockQ4_0>(kd, vd, k, v),
        }
    }

    /// Layer `layer`'s keys and values and the absolute position of their first row.
    pub fn layer(&self, layer: usize) -> (KvLayer<'_>, usize) {
        let l = &self.layers[layer];
        let (k, v) = match &l.store {
            Store::Owned { k, v } => (k.as_slice(), v.as_slice()),
            Store::Pooled { k, v } => {
                let r = self.region.as_ref().expect("a pooled layer has a region");
                (r.buffer(*k), r.buffer(*v))
            }
        };
        let view = match self.ty {
            KvType::F16 => KvLayer::F16 {
                k: k.reinterpret_cast(),
                v: v.reinterpret_cast(),
            },
            KvType::Q8_0 => KvLayer::Q8_0 {
                k: bytemuck::cast_slice(k),
                v: bytemuck::cast_slice(v),
            },
            KvType::Q4_0 => KvLayer::Q4_0 {
                k: bytemuck::cast_slice(k),
                v: bytemuck::cast_slice(v),
            },
        };
        (view, l.first)
    }

    /// Bytes the cache may hold (what it takes once every position is written).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| match &l.store {
                Store::Owned { k, v } => (k.len() + v.len()) * 2,
                Store::Pooled { .. } => self.n_ctx * self.units * 4,
            })
            .sum()
    }
}

/// Keys and values of whole positions (`kv_dim` values each, a multiple of 32) into blocks.
fn quantize_rows<B: KvBlock>(kd: &mut [u16], vd: &mut [u16], k: &[f32], v: &[f32]) {
    let kern = hearth_quant::dispatch::kernels();
    B::quantize(kern, k, bytemuck::cast_slice_mut(kd));
    B::quantize(kern, v, bytemuck::cast_slice_mut(vd));
}

/// Bytes of a cache for layers with these windows and `n_ctx` positions (saturating: any
/// `n_ctx` a user types gets a number to refuse, not an overflow).
pub fn cache_bytes(windows: &[Option<usize>], n_ctx: usize, kv_dim: usize, ty: KvType) -> u64 {
    let units = ty.units(kv_dim) as u128;
    let total: u128 = windows
        .iter()
        .map(|&w| 4 * rows_held(w, n_ctx) as u128 * units)
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

    /// The first value of position `row`'s keys, as stored.
    fn first_key(layer: KvLayer, row: usize, kv: usize) -> f32 {
        let mut out = [0f32; QK];
        match layer {
            KvLayer::F16 { k, .. } => return k[row * kv].to_f32(),
            KvLayer::Q8_0 { k, .. } => {
                hearth_quant::reference::dequantize_row_q8_0(&k[row * kv / QK..][..1], &mut out)
            }
            KvLayer::Q4_0 { k, .. } => {
                hearth_quant::reference::dequantize_row_q4_0(&k[row * kv / QK..][..1], &mut out)
            }
        }
        out[0]
    }

    /// A window layer's rows, read back by absolute position, are those written, for every
    /// storage type.
    #[test]
    fn window_layers_keep_their_window_in_order() {
        for (ty, kv, bytes_per_row) in [
            (KvType::F16, 2, 4),
            (KvType::Q8_0, 32, 34),
            (KvType::Q4_0, 32, 18),
        ] {
            window_layers_of(ty, kv, bytes_per_row);
        }
    }

    fn window_layers_of(ty: KvType, kv: usize, bytes_per_row: usize) {
        let w = 5;
        let mut c = KvCache::new(&[None, Some(w)], 2000, kv, ty);
        let cap = w - 1 + MAX_BATCH;
        assert_eq!(c.bytes(), (2000 + cap) * bytes_per_row * 2);
        assert_eq!(
            cache_bytes(&[None, Some(w)], 2000, kv, ty),
            c.bytes() as u64
        );
        // Position p's row: p, -p, then zeros (every type stores ±p within f16 rounding).
        let row =
            |p: usize| (0..kv).map(move |i| [p as f32, -(p as f32)].get(i).copied().unwrap_or(0.0));
        let near = |got: f32, p: usize| (got - p as f32).abs() <= p as f32 * 2e-3;
        let mut pos = 0;
        for n in [1, 255, 256, 3, 256, 100, 1, 1, 256] {
            let k: Vec<f32> = (pos..pos + n).flat_map(row).collect();
            for layer in 0..2 {
                c.store(layer, pos, &k, &k);
            }
            pos += n;
            c.len = pos;
            let (keys, first) = c.layer(1);
            // Every key the last batch's queries see is there, at its place.
            for p in (pos - n + 1).saturating_sub(w)..pos {
                let got = first_key(keys, p - first, kv);
                assert!(near(got, p), "{ty:?} pos {p}: {got}");
            }
            let (keys, first) = c.layer(0);
            assert_eq!(first, 0);
            assert!(near(first_key(keys, pos - 1, kv), pos - 1), "{ty:?}");
        }
        // A prefix whose window is gone cannot be kept; one whose window is there can.
        let (_, first) = c.layer(1);
        assert!(first > 0);
        assert_eq!(c.truncate(first + w - 1), first + w - 1);
        assert_eq!(c.truncate(first + w - 2), 0);
        assert_eq!(c.layer(1).1, 0);
    }

    #[test]
    fn kv_types_parse_as_llama_cpp_and_ollama_spell_them() {
        assert_eq!(KvType::parse("Q8_0"), Some(KvType::Q8_0));
        assert_eq!(KvType::parse(" q4_0 "), Some(KvType::Q4_0));
        assert_eq!(KvType::parse("f16"), Some(KvType::F16));
        let err = "q5_1".parse::<KvType>().unwrap_err();
        assert!(err.contains("q5_1") && err.contains("q8_0"), "{err}");
    }
}
