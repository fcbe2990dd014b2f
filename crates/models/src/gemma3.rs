//! Gemma 3: embeddings scaled by √d, RMSNorm around both sub-blocks (pre and post),
//! per-head Q/K RMSNorm, GELU(tanh)-gated feed-forward, and sliding-window attention on
//! five of every six layers with their own RoPE base. Norm weights in GGUF already include
//! Gemma's `1 + w`.

use crate::attention::AttnShape;
use crate::ops::{self, RopeMode};
use crate::weights::load_vec;
use crate::{BatchSeq, Config, Layer, Model, Result, Scratch};
use hearth_gguf::Gguf;
use std::sync::Arc;

pub fn load(g: Arc<Gguf>, c: Config) -> Result<Model> {
    let (d, hd) = (c.n_embd, c.head_dim);
    let (token_embd, output) = Model::load_embeddings(&g, &c)?;
    let mut layers = Vec::with_capacity(c.n_layer);
    for i in 0..c.n_layer {
        let name = |n: &str| format!("blk.{i}.{n}.weight");
        layers.push(Layer {
            q_norm: Some(load_vec(&g, &name("attn_q_norm"), hd)?),
            k_norm: Some(load_vec(&g, &name("attn_k_norm"), hd)?),
            post_attn_norm: Some(load_vec(&g, &name("post_attention_norm"), d)?),
            post_ffn_norm: Some(load_vec(&g, &name("post_ffw_norm"), d)?),
            ..Model::load_base_layer(&g, &c, i)?
        });
    }
    Ok(Model {
        output_norm: load_vec(&g, "output_norm.weight", d)?,
        gguf: g,
        config: c,
        token_embd,
        output,
        layers,
    })
}

/// Runs all blocks on the `n` embeddings in `s.x`: the rows of `seqs`, each at the end of its
/// own cache.
pub fn layers(m: &Model, n: usize, seqs: &mut [BatchSeq], s: &mut Scratch) {
    let c = &m.config;
    let (d, qd, kvd, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.head_dim);
    let embd_scale = (d as f32).sqrt();
    s.x[..n * d].iter_mut().for_each(|v| *v *= embd_scale);
    // Q is scaled by 1/√head_dim before attention (query_pre_attn_scalar = head_dim here).
    let q_scale = 1.0 / (hd as f32).sqrt();
    for (il, layer) in m.layers.iter().enumerate() {
        let swa = c.is_swa_layer(il);
        let shape = AttnShape {
            n_head: c.n_head,
            n_kv_head: c.n_kv_head,
            head_dim: hd,
            scale: 1.0,
            window: if swa { c.sliding_window } else { None },
        };
        let (q_norm, k_norm) = (
            layer.q_norm.as_deref().unwrap_or(&[]),
            layer.k_norm.as_deref().unwrap_or(&[]),
        );

        // Attention block: x += post_norm(Wo · attn(rope(norm(Wq xn)), rope(norm(Wk xn)), Wv xn)).
        m.attn_projections(layer, n, s);
        ops::rms_norm_inplace(&mut s.q[..n * qd], q_norm, c.rms_eps); // per head
        ops::rms_norm_inplace(&mut s.k[..n * kvd], k_norm, c.rms_eps);
        m.rope_qk(n, RopeMode::Neox, swa, s);
        s.q[..n * qd].iter_mut().for_each(|v| *v *= q_scale);
        m.attend(il, layer, n, &shape, seqs, s);
        if let Some(w) = &layer.post_attn_norm {
            ops::rms_norm_inplace(&mut s.proj[..n * d], w, c.rms_eps);
        }
        ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);

        // Feed-forward block: x += post_norm(down(gelu(gate(xn)) * up(xn))).
        m.feed_forward(layer, n, ops::geglu, s);
        if let Some(w) = &layer.post_ffn_norm {
            ops::rms_norm_inplace(&mut s.proj[..n * d], w, c.rms_eps);
        }
        ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);
    }
}
