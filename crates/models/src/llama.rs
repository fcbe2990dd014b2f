//! The llama architecture (SmolLM2, Llama 2/3, TinyLlama): pre-norm blocks with RMSNorm,
//! RoPE (adjacent pairs), grouped-query attention and a SwiGLU feed-forward.

use crate::attention::{attention, AttnShape};
use crate::ops::{self, RopeMode};
use crate::weights::{load_vec, Mat};
use crate::{Config, KvCache, Layer, Model, Result, Scratch};
use hearth_gguf::Gguf;
use std::sync::Arc;

pub fn load(g: Arc<Gguf>, c: Config) -> Result<Model> {
    let (d, ff) = (c.n_embd, c.n_ff);
    let token_embd = Mat::load(&g, "token_embd.weight", d, c.n_vocab)?;
    let output = if g.tensor_info("output.weight").is_some() {
        Mat::load(&g, "output.weight", d, c.n_vocab)?
    } else {
        token_embd.clone()
    };
    let mut layers = Vec::with_capacity(c.n_layer);
    for i in 0..c.n_layer {
        let name = |n: &str| format!("blk.{i}.{n}.weight");
        layers.push(Layer {
            attn_norm: load_vec(&g, &name("attn_norm"), d)?,
            wq: Mat::load(&g, &name("attn_q"), d, c.q_dim())?,
            wk: Mat::load(&g, &name("attn_k"), d, c.kv_dim())?,
            wv: Mat::load(&g, &name("attn_v"), d, c.kv_dim())?,
            wo: Mat::load(&g, &name("attn_output"), c.q_dim(), d)?,
            ffn_norm: load_vec(&g, &name("ffn_norm"), d)?,
            w_gate: Mat::load(&g, &name("ffn_gate"), d, ff)?,
            w_up: Mat::load(&g, &name("ffn_up"), d, ff)?,
            w_down: Mat::load(&g, &name("ffn_down"), ff, d)?,
            q_norm: None,
            k_norm: None,
            post_attn_norm: None,
            post_ffn_norm: None,
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
