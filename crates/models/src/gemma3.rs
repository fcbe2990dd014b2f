//! Gemma 3: embeddings scaled by √d, RMSNorm around both sub-blocks (pre and post),
//! per-head Q/K RMSNorm, GELU(tanh)-gated feed-forward, and sliding-window attention on
//! five of every six layers with their own RoPE base. Norm weights in GGUF already include
//! Gemma's `1 + w`.

use crate::attention::{attention, AttnShape};
use crate::ops::{self, RopeMode};
use crate::weights::load_vec;
use crate::{Config, KvCache, Layer, Model, Result, Scratch};
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

/// Runs all blocks on the `n` embeddings in `s.x` (positions `cache.len..`).
pub fn layers(m: &Model, n: usize, cache: &mut KvCache, s: &mut Scratch) {
    let c = &m.config;
    let (d, qd, kvd, ff, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff, c.head_dim);
    let pos0 = cache.len;
    let embd_scale = (d as f32).sqrt();
    s.x[..n * d].iter_mut().for_each(|v| *v *= embd_scale);
    // Q is scaled by 1/√head_dim before attention (query_pre_attn_scalar = head_dim here).
    let q_scale = 1.0 / (hd as f32).sqrt();
    for (il, layer) in m.layers.iter().enumerate() {
        let swa = c.is_swa_layer(il);
        let rope_base = if swa { c.rope_base_swa } else { c.rope_base };
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
        ); // [n, n_head*hd]
        m.matmul(
            &layer.wk,
            &s.xn[..n * d],
            &mut s.k[..n * kvd],
            &mut s.acts,
            &mut s.mm,
        ); // [n, n_kv*hd]
        m.matmul(
            &layer.wv,
            &s.xn[..n * d],
            &mut s.v[..n * kvd],
            &mut s.acts,
            &mut s.mm,
        ); // [n, n_kv*hd]
        ops::rms_norm_inplace(&mut s.q[..n * qd], q_norm, c.rms_eps); // per head
        ops::rms_norm_inplace(&mut s.k[..n * kvd], k_norm, c.rms_eps);
        for t in 0..n {
            ops::rope_cache(pos0 + t, c.n_rot, rope_base, &mut s.rope);
            ops::rope(
                &mut s.q[t * qd..(t + 1) * qd],
                hd,
                c.n_rot,
                RopeMode::Neox,
                &s.rope,
            );
            ops::rope(
                &mut s.k[t * kvd..(t + 1) * kvd],
                hd,
                c.n_rot,
                RopeMode::Neox,
                &s.rope,
            );
        }
        s.q[..n * qd].iter_mut().for_each(|v| *v *= q_scale);
        cache.store(il, pos0, &s.k[..n * kvd], &s.v[..n * kvd]);
        attention(
            &s.q[..n * qd],
            &cache.k[il],
            &cache.v[il],
            pos0,
            &shape,
            &mut s.attn[..n * qd],
        );
        m.matmul(
            &layer.wo,
            &s.attn[..n * qd],
            &mut s.proj[..n * d],
            &mut s.acts,
            &mut s.mm,
        ); // [n, d]
        if let Some(w) = &layer.post_attn_norm {
            ops::rms_norm_inplace(&mut s.proj[..n * d], w, c.rms_eps);
        }
        ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]); // residual

        // Feed-forward block: down(gelu(gate(x)) * up(x)), normed after.
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
        ops::geglu(&mut s.gate[..n * ff], &s.up[..n * ff]);
        m.matmul(
            &layer.w_down,
            &s.gate[..n * ff],
            &mut s.proj[..n * d],
            &mut s.acts,
            &mut s.mm,
        ); // [n, d]
        if let Some(w) = &layer.post_ffn_norm {
            ops::rms_norm_inplace(&mut s.proj[..n * d], w, c.rms_eps);
        }
        ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);
    }
}
