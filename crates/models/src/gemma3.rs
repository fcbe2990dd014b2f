//! Gemma 3: embeddings scaled by √d, RMSNorm around both sub-blocks (pre and post),
//! per-head Q/K RMSNorm, GELU(tanh)-gated feed-forward, and sliding-window attention on
//! five of every six layers with their own RoPE base. Norm weights in GGUF already include
//! Gemma's `1 + w`.

use crate::arch::{Family, Layers};
use crate::blocks::{Attention, AttnParts, Mlp};
use crate::ops::{self, RopeMode};
use crate::weights::load_vec;
use crate::{BatchSeq, Config, Model, Result, Scratch};
use hearth_gguf::Gguf;

pub const FAMILY: Family = Family {
    name: "gemma3",
    load,
};

struct Block {
    attn: Attention,
    post_attn_norm: Vec<f32>,
    mlp: Mlp,
    post_ffn_norm: Vec<f32>,
}

struct Gemma3 {
    blocks: Vec<Block>,
}

fn load(g: &Gguf, c: &mut Config) -> Result<Box<dyn Layers>> {
    let key = |k: &str| format!("gemma3.{k}");
    if g.get_f32(&key("attention.layer_norm_rms_epsilon"))?
        .is_none()
    {
        c.rms_eps = 1e-6;
    }
    c.sliding_window = g
        .get_usize(&key("attention.sliding_window"), 0, 1 << 24)?
        .filter(|&w| w > 0);
    let d = c.n_embd;
    let parts = AttnParts {
        qk_norm: true,
        ..AttnParts::default()
    };
    let mut blocks = Vec::with_capacity(c.n_layer);
    for i in 0..c.n_layer {
        let name = |n: &str| format!("blk.{i}.{n}.weight");
        blocks.push(Block {
            attn: Attention::load(g, c, i, parts)?,
            post_attn_norm: load_vec(g, &name("post_attention_norm"), d)?,
            mlp: Mlp::load(g, c, i)?,
            post_ffn_norm: load_vec(g, &name("post_ffw_norm"), d)?,
        });
    }
    Ok(Box::new(Gemma3 { blocks }))
}

impl Layers for Gemma3 {
    fn run(&self, m: &Model, n: usize, seqs: &mut [BatchSeq], s: &mut Scratch) {
        let c = &m.config;
        let (d, qd) = (c.n_embd, c.q_dim());
        let embd_scale = (d as f32).sqrt();
        s.x[..n * d].iter_mut().for_each(|v| *v *= embd_scale);
        // Q is scaled by 1/√head_dim before attention (query_pre_attn_scalar = head_dim here).
        let q_scale = 1.0 / (c.head_dim as f32).sqrt();
        for (il, b) in self.blocks.iter().enumerate() {
            let swa = c.is_swa_layer(il);
            let shape = crate::attention::AttnShape {
                scale: 1.0,
                ..m.attn_shape(if swa { c.sliding_window } else { None })
            };

            // Attention: x += post_norm(Wo · attn(rope(norm(Wq xn)), rope(norm(Wk xn)), Wv xn)).
            m.attn_projections(&b.attn, n, s);
            m.rope_qk(n, RopeMode::Neox, swa, s);
            s.q[..n * qd].iter_mut().for_each(|v| *v *= q_scale);
            m.attend(il, &b.attn.wo, n, &shape, seqs, s);
            ops::rms_norm_inplace(&mut s.proj[..n * d], &b.post_attn_norm, c.rms_eps);
            ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);

            // Feed-forward: x += post_norm(down(gelu(gate(xn)) * up(xn))).
            m.feed_forward(&b.mlp, n, ops::geglu, s);
            ops::rms_norm_inplace(&mut s.proj[..n * d], &b.post_ffn_norm, c.rms_eps);
            ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);
        }
    }
}
