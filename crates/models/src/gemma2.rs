//! Gemma 2: Gemma's embedding scale (√d) and pre/post RMSNorm around both sub-blocks, no
//! Q/K norms, attention logits soft-capped (`50 · tanh(s / 50)`), sliding-window attention
//! on every other layer (the even ones) with one RoPE base for all, a GELU(tanh)-gated
//! feed-forward, and soft-capped final logits (`30 · tanh(l / 30)`). Norm weights in GGUF
//! already include Gemma's `1 + w`; the output projection is the token embedding.

use crate::arch::{Family, Layers};
use crate::attention::AttnShape;
use crate::blocks::{AttnParts, Sandwich};
use crate::{BatchSeq, Config, Model, ModelError, Result, Scratch};
use hearth_gguf::Gguf;

pub const FAMILY: Family = Family {
    name: "gemma2",
    load,
};

struct Gemma2 {
    blocks: Vec<Sandwich>,
    attn_softcap: f32,
    /// Q is multiplied by this before attention (1/√head_dim; 27B: 1/√(d/n_head)).
    q_scale: f32,
}

fn positive(what: &str, v: f32) -> Result<f32> {
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(ModelError::BadConfig(format!("{what} is {v}")))
    }
}

fn load(g: &Gguf, c: &mut Config) -> Result<Box<dyn Layers>> {
    let key = |k: &str| format!("gemma2.{k}");
    if g.get_f32(&key("attention.layer_norm_rms_epsilon"))?
        .is_none()
    {
        c.rms_eps = 1e-6;
    }
    c.sliding_window = Some(
        g.get_usize(&key("attention.sliding_window"), 1, 1 << 24)?
            .unwrap_or(4096),
    );
    if g.get_usize(&key("attention.sliding_window_pattern"), 1, 1024)?
        .is_none()
    {
        c.swa_pattern = 2;
    }
    let attn_softcap = positive(
        "attention logit soft-capping",
        g.get_f32(&key("attn_logit_softcapping"))?.unwrap_or(50.0),
    )?;
    c.final_logit_softcap = Some(positive(
        "final logit soft-capping",
        g.get_f32(&key("final_logit_softcapping"))?.unwrap_or(30.0),
    )?);
    // As llama.cpp: the 27B model (46 layers) scales Q by 1/√(d / n_head).
    let q_scale = if c.n_layer == 46 {
        1.0 / ((c.n_embd / c.n_head) as f32).sqrt()
    } else {
        1.0 / (c.head_dim as f32).sqrt()
    };
    let blocks = (0..c.n_layer)
        .map(|i| Sandwich::load(g, c, i, AttnParts::default()))
        .collect::<Result<_>>()?;
    Ok(Box::new(Gemma2 {
        blocks,
        attn_softcap,
        q_scale,
    }))
}

impl Layers for Gemma2 {
    fn run(&self, m: &Model, n: usize, seqs: &mut [BatchSeq], s: &mut Scratch) {
        let c = &m.config;
        let d = c.n_embd;
        let embd_scale = (d as f32).sqrt();
        s.x[..n * d].iter_mut().for_each(|v| *v *= embd_scale);
        for (il, b) in self.blocks.iter().enumerate() {
            let swa = c.is_swa_layer(il);
            let shape = AttnShape {
                scale: 1.0,
                softcap: Some(self.attn_softcap),
                ..m.attn_shape(if swa { c.sliding_window } else { None })
            };
            // One RoPE base for all layers: the sliding-window ones use the same table.
            b.run(m, il, &shape, false, self.q_scale, n, seqs, s);
        }
    }
}
