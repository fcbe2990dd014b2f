//! Hyperparameters read from GGUF metadata, each bounded before use.

use crate::{ModelError, Result};
use hearth_gguf::Gguf;

#[derive(Debug, Clone)]
pub struct Config {
    /// `general.architecture`; its family (see [`crate::arch`]) reads its own settings.
    pub arch: String,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_rot: usize,
    pub n_vocab: usize,
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// Linear RoPE scaling: positions are multiplied by this (`1 / rope.scaling.factor`).
    pub rope_freq_scale: f32,
    /// `rope.scaling.attn_factor`: RoPE's cosines and sines are multiplied by it (Phi-3.5's
    /// long-context scaling), 1 when absent.
    pub rope_attn_factor: f32,
    /// `rope.scaling.original_context_length` (else the training context): contexts longer
    /// than this take the long RoPE factors where a model has two sets.
    pub rope_ctx_orig: usize,
    /// gemma3: RoPE base of the sliding-window layers.
    pub rope_base_swa: f32,
    /// Window length, set by the families that use it (gemma3: every `swa_pattern`-th
    /// layer is global).
    pub sliding_window: Option<usize>,
    pub swa_pattern: usize,
    /// Final logit soft-capping (gemma2): logits become `cap · tanh(logit / cap)`.
    pub final_logit_softcap: Option<f32>,
}

impl Config {
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch_name = g.require_str("general.architecture")?;
        let arch = arch_name.to_string();
        let key = |k: &str| format!("{arch_name}.{k}");
        let n_layer = g.require_usize(&key("block_count"), 1, 1024)?;
        let n_embd = g.require_usize(&key("embedding_length"), 1, 1 << 16)?;
        let n_ff = g.require_usize(&key("feed_forward_length"), 1, 1 << 18)?;
        let n_head = g.require_usize(&key("attention.head_count"), 1, 1024)?;
        let n_kv_head = g
            .get_usize(&key("attention.head_count_kv"), 1, 1024)?
            .unwrap_or(n_head);
        if n_head % n_kv_head != 0 {
            return Err(ModelError::BadConfig(format!(
                "{n_head} attention heads are not a multiple of {n_kv_head} KV heads"
            )));
        }
        let head_dim = match g.get_usize(&key("attention.key_length"), 1, 1 << 12)? {
            Some(d) => d,
            None if n_embd % n_head == 0 => n_embd / n_head,
            None => {
                return Err(ModelError::BadConfig(format!(
                    "{n_embd} is not divisible by {n_head} heads"
                )))
            }
        };
        if let Some(dv) = g.get_usize(&key("attention.value_length"), 1, 1 << 12)? {
            if dv != head_dim {
                return Err(ModelError::BadConfig(format!(
                    "value length {dv} differs from key length {head_dim}"
                )));
            }
        }
        let n_rot = g
            .get_usize(&key("rope.dimension_count"), 2, head_dim)?
            .unwrap_or(head_dim);
        if n_rot % 2 != 0 {
            return Err(ModelError::BadConfig(format!(
                "odd RoPE dimension count {n_rot}"
            )));
        }
        let n_ctx_train = g
            .get_usize(&key("context_length"), 1, 1 << 24)?
            .unwrap_or(2048);
        let rms_eps = g
            .get_f32(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5);
        let rope_base = g.get_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let rope_attn_factor = g.get_f32(&key("rope.scaling.attn_factor"))?.unwrap_or(1.0);
        if !(rope_attn_factor.is_finite() && rope_attn_factor > 0.0) {
            return Err(ModelError::BadConfig(format!(
                "rope attention factor {rope_attn_factor}"
            )));
        }
        let rope_ctx_orig = g
            .get_usize(&key("rope.scaling.original_context_length"), 1, 1 << 24)?
            .unwrap_or(n_ctx_train);
        let rope_base_swa = g.get_f32(&key("rope.freq_base_swa"))?.unwrap_or(10_000.0);
        // Scaling other than linear changes more than the angles: refuse it rather than
        // run it wrong.
        // As llama.cpp: an absent type is linear, and the factor scales positions for linear
        // and for longrope (whose per-frequency factors are tensors).
        let rope_freq_scale = match g.get_str(&key("rope.scaling.type"))? {
            Some("none") => 1.0,
            None | Some("linear") | Some("longrope") | Some("su") => {
                let factor = g.get_f32(&key("rope.scaling.factor"))?.unwrap_or(0.0);
                let factor = if factor == 0.0 { 1.0 } else { factor };
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(ModelError::BadConfig(format!(
                        "rope scaling factor {factor}"
                    )));
                }
                1.0 / factor
            }
            Some(other) => {
                return Err(ModelError::BadConfig(format!(
                    "RoPE scaling {other:?} is not supported (none, linear and longrope are)"
                )))
            }
        };
        let swa_pattern = g
            .get_usize(&key("attention.sliding_window_pattern"), 1, 1024)?
            .unwrap_or(6);
        let n_vocab = match g.get_array("tokenizer.ggml.tokens")? {
            Some(a) => a.len(),
            None => g
                .tensor_info("token_embd.weight")
                .map(|t| t.dims.get(1).copied().unwrap_or(0) as usize)
                .unwrap_or(0),
        };
        if n_vocab == 0 {
            return Err(ModelError::BadConfig("empty vocabulary".into()));
        }
        for (what, v) in [
            ("rms epsilon", rms_eps),
            ("rope base", rope_base),
            ("rope base (swa)", rope_base_swa),
        ] {
            if v.is_nan() || v <= 0.0 {
                return Err(ModelError::BadConfig(format!("{what} is {v}")));
            }
        }
        Ok(Config {
            arch,
            n_layer,
            n_embd,
            n_ff,
            n_head,
            n_kv_head,
            head_dim,
            n_rot,
            n_vocab,
            n_ctx_train,
            rms_eps,
            rope_base,
            rope_freq_scale,
            rope_attn_factor,
            rope_ctx_orig,
            rope_base_swa,
            sliding_window: None,
            final_logit_softcap: None,
            swa_pattern,
        })
    }

    /// Gemma 3 layers use a sliding window except every `swa_pattern`-th.
    pub fn is_swa_layer(&self, il: usize) -> bool {
        self.sliding_window.is_some() && (il % self.swa_pattern < self.swa_pattern - 1)
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}
