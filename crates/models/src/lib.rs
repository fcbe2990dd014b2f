//! Transformer models over quantized GGUF weights: one file per architecture, shared ops.
//!
//! [`Model::forward`] appends tokens to a [`KvCache`] and returns the logits of the last one.
//! Prompts are processed in chunks of at most [`MAX_BATCH`] tokens, each chunk as one batch
//! of matrix products; [`Model::decode`] is the same code with one generated token (which
//! may take other kernels, see [`Part`]). [`Model::forward_batch`]
//! runs several sequences, each with its own cache, through the same matrix products
//! (continuous batching): only attention is per sequence.

pub mod arch;
pub mod attention;
mod blocks;
pub mod config;
mod error;
mod gemma2;
mod gemma3;
pub mod kv;
mod llama;
pub mod ops;
mod phi3;
mod qwen2;
mod qwen3;
pub mod weights;

pub use config::Config;
pub use error::{ModelError, Result};
pub use kv::{KvCache, KvPool, KvType};

use hearth_gguf::Gguf;
use hearth_quant::Activations;
use std::sync::Arc;
use weights::Mat;

/// Largest number of tokens processed in one forward batch.
pub const MAX_BATCH: usize = 256;

pub struct Model {
    pub gguf: Arc<Gguf>,
    pub config: Config,
    pub token_embd: Mat,
    pub output_norm: Vec<f32>,
    /// The output projection (the token embedding when tied).
    pub output: Mat,
    /// Per-frequency RoPE divisors (`rope_freqs.weight`, Llama 3.1+; Phi-3's
    /// `rope_factors_short.weight`), `n_rot / 2` of them.
    pub rope_factors: Option<Vec<f32>>,
    /// Phi-3's `rope_factors_long.weight`: used instead when a cache holds more than
    /// `config.rope_ctx_orig` positions.
    pub rope_factors_long: Option<Vec<f32>>,
    /// The architecture's blocks (see [`arch`]).
    pub layers: Box<dyn arch::Layers>,
    /// How new KV caches store keys and values ([`Model::set_kv_type`]).
    kv_type: KvType,
}

/// Reusable buffers for one sequence's forward passes.
#[derive(Default)]
pub struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    attn_scratch: attention::AttnScratch,
    proj: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// RoPE cos/sin per position of the chunk (`n * n_rot`), and for sliding-window layers.
    rope: Vec<f32>,
    rope_swa: Vec<f32>,
    acts: Activations,
    mm: Vec<f32>,
    /// Outputs of fused products (phi3's QKV and gate+up) before they are split.
    fused: Vec<f32>,
    /// Rows of the batch per sequence: (first row, rows, position of the first row).
    segs: Vec<(usize, usize, usize)>,
    /// The batch's first rows, from sequences whose products run on the AMX-INT8 tiles.
    tile_rows: usize,
}

/// One sequence of a [`Model::forward_batch`] call.
pub struct BatchSeq<'a> {
    /// Tokens to append (a prompt chunk, or the one token being decoded).
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Whether this sequence's last token needs logits.
    pub want_logits: bool,
    /// What the tokens are, which picks their kernels.
    pub part: Part,
}

/// What a [`BatchSeq`]'s tokens are. On CPUs with AMX-INT8, the tokens of prompts of at
/// least [`hearth_quant::i8mat::MIN_TOKENS`] tokens run their products on the tiles, and
/// every other token on the dot-product kernels, which round differently. Choosing by what
/// a token is, not by how many tokens share a batch, gives a prompt the same numbers
/// however it is chunked and batched with other requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// A chunk of a prompt of `len` tokens in all (counting those already in the cache).
    Prompt { len: usize },
    /// A token the model generated, fed back to decode the next one.
    Generated,
}

impl Part {
    /// Whether these tokens' products run on the prompt kernels: the AMX-INT8 tiles where
    /// the CPU has them, else the kernels that reuse each weight row for many tokens (see
    /// `hearth_quant::Activations::quantize_split`).
    pub fn on_tiles(self) -> bool {
        matches!(self, Part::Prompt { len } if len >= hearth_quant::i8mat::MIN_TOKENS)
    }
}

impl Scratch {
    fn prepare(&mut self, c: &Config, n: usize) {
        let sz = |v: &mut Vec<f32>, len: usize| v.resize(len, 0.0);
        sz(&mut self.x, n * c.n_embd);
        sz(&mut self.xn, n * c.n_embd);
        sz(&mut self.q, n * c.q_dim());
        sz(&mut self.k, n * c.kv_dim());
        sz(&mut self.v, n * c.kv_dim());
        sz(&mut self.attn, n * c.q_dim());
        sz(&mut self.proj, n * c.n_embd);
        sz(&mut self.gate, n * c.n_ff);
        sz(&mut self.up, n * c.n_ff);
    }

    /// Fills the RoPE tables for every row's position, once for all layers.
    fn fill_rope(&mut self, c: &Config, factors: Option<&[f32]>) {
        let rope = ops::Rope {
            n_dims: c.n_rot,
            base: c.rope_base,
            freq_scale: c.rope_freq_scale,
            factors,
            mscale: c.rope_attn_factor,
        };
        fill_rope_table(&mut self.rope, &self.segs, &rope);
        if c.sliding_window.is_some() {
            let swa = ops::Rope {
                base: c.rope_base_swa,
                ..rope
            };
            fill_rope_table(&mut self.rope_swa, &self.segs, &swa);
        }
    }
}

fn fill_rope_table(table: &mut Vec<f32>, segs: &[(usize, usize, usize)], rope: &ops::Rope) {
    let n: usize = segs.iter().map(|s| s.1).sum();
    let n_rot = rope.n_dims;
    table.resize(n * n_rot, 0.0);
    for &(row0, len, pos0) in segs {
        for t in 0..len {
            let row = &mut table[(row0 + t) * n_rot..(row0 + t + 1) * n_rot];
            rope.cache(pos0 + t, row);
        }
    }
}

impl Model {
    /// Builds the model from a validated GGUF file, checking every tensor's shape.
    pub fn load(gguf: Arc<Gguf>) -> Result<Self> {
        let arch_name = gguf.require_str("general.architecture")?;
        let family = arch::family(arch_name)
            .ok_or_else(|| ModelError::UnsupportedArch(arch_name.to_string(), arch::names()))?;
        let mut config = Config::from_gguf(&gguf)?;
        let layers = (family.load)(&gguf, &mut config)?;
        let c = &config;
        let token_embd = Mat::load(&gguf, "token_embd.weight", c.n_embd, c.n_vocab)?;
        let output = if gguf.tensor_info("output.weight").is_some() {
            Mat::load(&gguf, "output.weight", c.n_embd, c.n_vocab)?
        } else {
            token_embd.clone()
        };
        let factors = |name: &str| -> Result<Option<Vec<f32>>> {
            if gguf.tensor_info(name).is_none() {
                return Ok(None);
            }
            let f = weights::load_vec(&gguf, name, c.n_rot / 2)?;
            if let Some(bad) = f.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                return Err(ModelError::BadConfig(format!("{name} holds {bad}")));
            }
            Ok(Some(f))
        };
        let rope_factors = match factors("rope_freqs.weight")? {
            Some(f) => Some(f),
            None => factors("rope_factors_short.weight")?,
        };
        let rope_factors_long = factors("rope_factors_long.weight")?;
        Ok(Model {
            output_norm: weights::load_vec(&gguf, "output_norm.weight", c.n_embd)?,
            token_embd,
            output,
            rope_factors,
            rope_factors_long,
            layers,
            config,
            gguf,
            kv_type: KvType::F16,
        })
    }

    pub fn new_cache(&self, n_ctx: usize) -> KvCache {
        KvCache::new(
            &self.kv_windows(),
            n_ctx,
            self.config.kv_dim(),
            self.kv_type,
        )
    }

    /// A KV pool of `n_slots` sequences of up to `n_ctx` positions (see [`kv::pool`]).
    pub fn new_pool(&self, n_slots: usize, n_ctx: usize) -> Result<std::sync::Arc<KvPool>> {
        let rows = KvCache::pool_row_bytes(&self.kv_windows(), self.config.kv_dim(), self.kv_type);
        KvPool::new(n_slots, &rows, n_ctx).map_err(|e| ModelError::KvPool(e.to_string()))
    }

    /// A cache (of the pool's `n_ctx` positions) whose full-attention layers live in slot
    /// `slot` of `pool`.
    pub fn new_pooled_cache(&self, pool: &std::sync::Arc<KvPool>, slot: usize) -> Result<KvCache> {
        let region = pool
            .attach(slot)
            .map_err(|e| ModelError::KvPool(e.to_string()))?;
        Ok(KvCache::pooled(
            &self.kv_windows(),
            pool.n_ctx(),
            self.config.kv_dim(),
            self.kv_type,
            region,
        ))
    }

    /// Makes new KV caches store keys and values as `ty`. A quantized type needs heads of a
    /// multiple of 32 values (its blocks), at most `kvquant::MAX_HEAD_DIM`; llama.cpp
    /// refuses such models too.
    pub fn set_kv_type(&mut self, ty: KvType) -> Result<()> {
        let hd = self.config.head_dim;
        let max = hearth_quant::kvquant::MAX_HEAD_DIM;
        if ty != KvType::F16 && (!hd.is_multiple_of(hearth_quant::blocks::QK) || hd > max) {
            return Err(ModelError::BadConfig(format!(
                "a {} KV cache needs attention heads of a multiple of 32 values up to {max}; \
                 this model's have {hd} (use --kv-type f16)",
                ty.name()
            )));
        }
        self.kv_type = ty;
        Ok(())
    }

    pub fn kv_type(&self) -> KvType {
        self.kv_type
    }

    /// Each layer's attention window (`None`: full attention), as its KV cache keeps it.
    fn kv_windows(&self) -> Vec<Option<usize>> {
        let c = &self.config;
        (0..c.n_layer)
            .map(|il| c.sliding_window.filter(|_| c.is_swa_layer(il)))
            .collect()
    }

    /// Runs prompt `tokens` at the end of `cache` and writes the last token's logits. The
    /// prompt is what the cache holds followed by `tokens` (see [`Part::Prompt`]).
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        scratch: &mut Scratch,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        self.check_seq(tokens, cache)?;
        let part = Part::Prompt {
            len: cache.len + tokens.len(),
        };
        let n_chunks = tokens.len().div_ceil(MAX_BATCH);
        for (i, chunk) in tokens.chunks(MAX_BATCH).enumerate() {
            let mut seq = [BatchSeq {
                tokens: chunk,
                cache: &mut *cache,
                want_logits: i + 1 == n_chunks,
                part,
            }];
            self.run_batch(&mut seq, scratch, logits);
        }
        Ok(())
    }

    /// Runs prompt `tokens` at the end of `cache` and writes the logits of every token from
    /// index `from` on (`[tokens.len() - from, n_vocab]`), as `llama-perplexity` needs them.
    pub fn forward_all(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        scratch: &mut Scratch,
        from: usize,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        self.check_seq(tokens, cache)?;
        let part = Part::Prompt {
            len: cache.len + tokens.len(),
        };
        let v = self.config.n_vocab;
        logits.clear();
        let mut rows = Vec::new();
        let mut done = 0;
        for chunk in tokens.chunks(MAX_BATCH) {
            let mut seq = [BatchSeq {
                tokens: chunk,
                cache: &mut *cache,
                want_logits: false,
                part,
            }];
            self.run_layers(&mut seq, scratch);
            let first = from.saturating_sub(done).min(chunk.len());
            if first < chunk.len() {
                self.logits_of_rows(first..chunk.len(), scratch, &mut rows);
                logits.extend_from_slice(&rows[..(chunk.len() - first) * v]);
            }
            done += chunk.len();
        }
        Ok(())
    }

    /// Runs one generated `token` at the end of `cache` and writes its logits.
    pub fn decode(
        &self,
        token: u32,
        cache: &mut KvCache,
        scratch: &mut Scratch,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        self.decode_run(&[token], cache, scratch, logits)
    }

    /// Runs generated `tokens` (a sampled token and those a grammar forced after it, at most
    /// [`MAX_BATCH`]) at the end of `cache` and writes the last one's logits.
    pub fn decode_run(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        scratch: &mut Scratch,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let mut seq = [BatchSeq {
            tokens,
            cache,
            want_logits: true,
            part: Part::Generated,
        }];
        self.forward_batch(&mut seq, scratch, logits)
    }

    /// Appends each sequence's tokens to its own cache in one pass over the weights, and
    /// writes the logits of the last token of every sequence that wants them, in order, as
    /// rows of `logits` (`[n_wanting, n_vocab]`). At most [`MAX_BATCH`] tokens in all.
    pub fn forward_batch(
        &self,
        seqs: &mut [BatchSeq],
        scratch: &mut Scratch,
        logits: &mut Vec<f32>,
    ) -> Result<()> {
        let n: usize = seqs.iter().map(|q| q.tokens.len()).sum();
        if n > MAX_BATCH {
            return Err(ModelError::BadConfig(format!(
                "a batch holds at most {MAX_BATCH} tokens, not {n}"
            )));
        }
        for q in seqs.iter() {
            self.check_seq(q.tokens, q.cache)?;
        }
        self.run_batch(seqs, scratch, logits);
        Ok(())
    }

    fn check_seq(&self, tokens: &[u32], cache: &KvCache) -> Result<()> {
        if tokens.is_empty() {
            return Err(ModelError::BadConfig(
                "forward called with no tokens".into(),
            ));
        }
        if let Some(fault) = cache.fault() {
            return Err(ModelError::KvPool(fault.to_string()));
        }
        let needed = cache.len + tokens.len();
        if needed > cache.n_ctx {
            return Err(ModelError::ContextFull {
                needed,
                n_ctx: cache.n_ctx,
            });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= self.config.n_vocab) {
            return Err(ModelError::TokenOutOfRange {
                id,
                n_vocab: self.config.n_vocab,
            });
        }
        Ok(())
    }

    /// One batch of checked sequences, at most [`MAX_BATCH`] tokens.
    fn run_batch(&self, seqs: &mut [BatchSeq], s: &mut Scratch, logits: &mut Vec<f32>) {
        self.run_layers(seqs, s);
        self.logits(seqs, s, logits);
    }

    /// Every block on one batch (at most [`MAX_BATCH`] tokens); the final hidden states stay
    /// in `s.x`, each sequence's rows at its offset in `s.segs`.
    fn run_layers(&self, seqs: &mut [BatchSeq], s: &mut Scratch) {
        // Rows of sequences on the tiles first, so that every product splits in two.
        s.segs.clear();
        let on_tiles = |q: &BatchSeq| q.part.on_tiles();
        let n: usize = seqs.iter().map(|q| q.tokens.len()).sum();
        s.tile_rows = seqs
            .iter()
            .filter(|q| on_tiles(q))
            .map(|q| q.tokens.len())
            .sum();
        let (mut tile_row, mut other_row) = (0, s.tile_rows);
        for q in seqs.iter() {
            let next = if on_tiles(q) {
                &mut tile_row
            } else {
                &mut other_row
            };
            s.segs.push((*next, q.tokens.len(), q.cache.len));
            *next += q.tokens.len();
        }
        s.prepare(&self.config, n);
        let long = seqs
            .first()
            .is_some_and(|q| q.cache.n_ctx > self.config.rope_ctx_orig);
        let factors = match (&self.rope_factors_long, long) {
            (Some(f), true) => Some(f.as_slice()),
            _ => self.rope_factors.as_deref(),
        };
        s.fill_rope(&self.config, factors);
        let d = self.config.n_embd;
        for (q, &(row0, len, _)) in seqs.iter().zip(&s.segs) {
            self.embed(q.tokens, &mut s.x[row0 * d..(row0 + len) * d]);
        }
        self.layers.run(self, n, seqs, s);
        for q in seqs.iter_mut() {
            q.cache.len += q.tokens.len();
        }
    }

    /// Final norm and output projection of batch rows `rows` (`[rows.len(), n_vocab]`).
    fn logits_of_rows(&self, rows: std::ops::Range<usize>, s: &mut Scratch, logits: &mut Vec<f32>) {
        let d = self.config.n_embd;
        let m = rows.len();
        ops::rms_norm(
            &s.x[rows.start * d..rows.end * d],
            &self.output_norm,
            self.config.rms_eps,
            &mut s.xn[..m * d],
        );
        self.output_projection(m, s, logits);
    }

    /// `logits = output · xn` for the first `m` rows of `s.xn` (already normed), then the
    /// final soft-cap where the architecture has one. Never on the tiles: how many rows want
    /// logits varies from batch to batch.
    fn output_projection(&self, m: usize, s: &mut Scratch, logits: &mut Vec<f32>) {
        let d = self.config.n_embd;
        let out = self.output.view(&self.gguf);
        s.acts.quantize_split(out.act_type(), &s.xn[..m * d], d, 0);
        logits.resize(m * self.config.n_vocab, 0.0);
        out.matmul(&s.acts, logits, &mut s.mm);
        if let Some(cap) = self.config.final_logit_softcap {
            logits
                .iter_mut()
                .for_each(|l| *l = hearth_quant::soft_cap(*l, cap));
        }
    }

    /// Token embeddings (rows of `token_embd`, dequantized).
    fn embed(&self, tokens: &[u32], x: &mut [f32]) {
        let e = self.token_embd.view(&self.gguf);
        let d = self.config.n_embd;
        for (t, row) in tokens.iter().zip(x.chunks_exact_mut(d)) {
            e.dequantize_row(*t as usize, row);
        }
    }

    /// Final norm and output projection of the last token of each sequence that wants it.
    fn logits(&self, seqs: &[BatchSeq], s: &mut Scratch, logits: &mut Vec<f32>) {
        let d = self.config.n_embd;
        let mut m = 0;
        for (q, &(row0, len, _)) in seqs.iter().zip(&s.segs) {
            if q.want_logits {
                let last = row0 + len - 1;
                let (x, xn) = (
                    &s.x[last * d..(last + 1) * d],
                    &mut s.xn[m * d..(m + 1) * d],
                );
                ops::rms_norm(x, &self.output_norm, self.config.rms_eps, xn);
                m += 1;
            }
        }
        if m > 0 {
            self.output_projection(m, s, logits);
        }
    }

    /// Bytes of one KV cache of `n_ctx` positions (keys and values of the model's KV type;
    /// sliding-window layers hold their window and one batch).
    pub fn kv_cache_bytes(&self, n_ctx: usize) -> u64 {
        kv::cache_bytes(
            &self.kv_windows(),
            n_ctx,
            self.config.kv_dim(),
            self.kv_type,
        )
    }

    /// Working buffers of one forward pass of up to [`MAX_BATCH`] tokens, roughly.
    fn scratch_bytes(&self) -> u64 {
        let c = &self.config;
        let per_token = 6 * c.n_embd + 3 * c.q_dim() + 2 * c.kv_dim() + 3 * c.n_ff;
        (4 * (MAX_BATCH * per_token + c.n_vocab)) as u64
    }

    /// Refuses, before anything is allocated, to run `n_caches` sequences of `n_ctx` tokens
    /// when their KV caches and working buffers would not fit in the memory available now,
    /// or when they and the weights exceed the machine's memory. (Linux: /proc/meminfo;
    /// elsewhere no check.)
    pub fn check_memory(&self, n_ctx: usize, n_caches: usize) -> Result<()> {
        self.check_memory_with(self.kv_cache_bytes(n_ctx).saturating_mul(n_caches as u64))
    }

    /// As [`Model::check_memory`] for `n_caches` sequences of `n_ctx` tokens over a KV pool
    /// whose full-attention layers hold `budget` tokens in all (sliding-window layers keep
    /// their window per sequence, outside the pool).
    pub fn check_memory_pooled(&self, n_ctx: usize, n_caches: usize, budget: usize) -> Result<()> {
        let windows = self.kv_windows();
        let (kv_dim, ty) = (self.config.kv_dim(), self.kv_type);
        let windowed: Vec<_> = windows.iter().copied().filter(Option::is_some).collect();
        let full = vec![None; windows.len() - windowed.len()];
        let budget = budget.min(n_ctx.saturating_mul(n_caches));
        let kv = kv::cache_bytes(&windowed, n_ctx, kv_dim, ty)
            .saturating_mul(n_caches as u64)
            .saturating_add(kv::cache_bytes(&full, budget, kv_dim, ty));
        self.check_memory_with(kv)
    }

    fn check_memory_with(&self, kv_bytes: u64) -> Result<()> {
        let Some((total, available)) = system_memory() else {
            return Ok(());
        };
        let buffers = kv_bytes.saturating_add(self.scratch_bytes());
        let with_weights = buffers.saturating_add(self.gguf.file_size());
        let mib = |b: u64| b.div_ceil(1 << 20);
        if buffers > available {
            return Err(ModelError::OutOfMemory {
                need_mib: mib(buffers),
                have_mib: mib(available),
            });
        }
        if with_weights > total {
            return Err(ModelError::OutOfMemory {
                need_mib: mib(with_weights),
                have_mib: mib(total),
            });
        }
        Ok(())
    }

    /// Bytes of weights read per generated token (for bandwidth estimates).
    pub fn weight_bytes(&self) -> u64 {
        self.gguf.tensors.iter().map(|t| t.n_bytes).sum()
    }
}

/// (MemTotal, MemAvailable) in bytes.
fn system_memory() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}
