//! The llama architecture (SmolLM2, Llama 2/3, TinyLlama): pre-norm blocks with RMSNorm,
//! RoPE (adjacent pairs), grouped-query attention and a SwiGLU feed-forward.

use crate::attention::{attention, AttnShape};
use crate::ops::{self, RopeMode};
use crate::weights::load_vec;
use crate::{Config, KvCache, Layer, Model, Result, Scratch};
use hearth_gguf::Gguf;
use std::sync::Arc;

pub fn load(g: Arc<Gguf>, c: Config) -> Result<Model> {
    let (token_embd, output) = Model::load_embeddings(&g, &c)?;
    let layers = (0..c.n_layer)
        .map(|i| Model::load_base_layer(&g, &c, i))
        .collect::<Result<Vec<Layer>>>()?;
    Ok(Model {
        output_norm: load_vec(&g, "output_norm.weight", c.n_embd)?,
        gguf: g,
        config: c,
        token_embd,
        output,
        layers,
    })
}

/// Runs all blocks on the `n` embeddings in `s.x` (positions `cache.len..`).
pub fn layers(m: &Model, n: usize, cache: &mut KvCache, s: &mut Scratch) {
    let c = &m.config;
    let (d, qd, kvd, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
    let pos0 = cache.len;
    let shape = AttnShape {
        n_head: c.n_head,
        n_kv_head: c.n_kv_head,
        head_dim: c.head_dim,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        window: None,
    };
    for (il, layer) in m.layers.iter().enumerate() {
        // Attention block.
        ops::rms_norm(
            &s.x[..n * d],
            &layer.attn_norm,
            c.rms_eps,
            &mut s.xn[..n * d],
        ); // [n, d]
        m.matmul(
            &layer.wq,
            &s.xn[..n * d],
            &mut s.q[..n * qd],
            &mut s.acts,
            &mut s.mm,
        ); // [n, qd]
        m.matmul(
            &layer.wk,
            &s.xn[..n * d],
            &mut s.k[..n * kvd],
            &mut s.acts,
            &mut s.mm,
        ); // [n, kvd]
        m.matmul(
            &layer.wv,
            &s.xn[..n * d],
            &mut s.v[..n * kvd],
            &mut s.acts,
            &mut s.mm,
        ); // [n, kvd]
        for t in 0..n {
            ops::rope_cache(pos0 + t, c.n_rot, c.rope_base, &mut s.rope);
            ops::rope(
                &mut s.q[t * qd..(t + 1) * qd],
                c.head_dim,
                c.n_rot,
                RopeMode::Normal,
                &s.rope,
            );
            ops::rope(
                &mut s.k[t * kvd..(t + 1) * kvd],
                c.head_dim,
                c.n_rot,
                RopeMode::Normal,
                &s.rope,
            );
        }
        cache.store(il, pos0, &s.k[..n * kvd], &s.v[..n * kvd]);
        attention(
            &s.q[..n * qd],
            &cache.k[il],
            &cache.v[il],
            pos0,
            &shape,
            &mut s.attn[..n * qd],
        ); // [n, qd]
        m.matmul(
            &layer.wo,
            &s.attn[..n * qd],
            &mut s.proj[..n * d],
            &mut s.acts,
            &mut s.mm,
        ); // [n, d]
        ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);

        // Feed-forward block: down(silu(gate(x)) * up(x)).
        ops::rms_norm(
            &s.x[..n * d],
            &layer.ffn_norm,
            c.rms_eps,
            &mut s.xn[..n * d],
        );
        m.matmul(
            &layer.w_gate,
            &s.xn[..n * d],
            &mut s.gate[..n * ff],
            &mut s.acts,
            &mut s.mm,
        ); // [n, ff]
        m.matmul(
            &layer.w_up,
            &s.xn[..n * d],
            &mut s.up[..n * ff],
            &mut s.acts,
            &mut s.mm,
        ); // [n, ff]
        ops::swiglu(&mut s.gate[..n * ff], &s.up[..n * ff]);
        m.matmul(
            &layer.w_down,
            &s.gate[..n * ff],
            &mut s.proj[..n * d],
            &mut s.acts,
            &mut s.mm,
        ); // [n, d]
        ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);
    }
}
