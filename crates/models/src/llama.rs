//! The llama architecture (SmolLM2, Llama 2/3, TinyLlama): pre-norm blocks with RMSNorm,
//! RoPE (adjacent pairs), grouped-query attention and a SwiGLU feed-forward.

use crate::attention::AttnShape;
use crate::ops::{self, RopeMode};
use crate::weights::load_vec;
use crate::{BatchSeq, Config, Layer, Model, Result, Scratch};
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

/// Runs all blocks on the `n` embeddings in `s.x`: the rows of `seqs`, each at the end of its
/// own cache.
pub fn layers(m: &Model, n: usize, seqs: &mut [BatchSeq], s: &mut Scratch) {
    let c = &m.config;
    let d = c.n_embd;
    let shape = AttnShape {
        n_head: c.n_head,
        n_kv_head: c.n_kv_head,
        head_dim: c.head_dim,
        scale: 1.0 / (c.head_dim as f32).sqrt(),
        window: None,
    };
    for (il, layer) in m.layers.iter().enumerate() {
        // Attention block: x += Wo · attn(rope(Wq xn), rope(Wk xn), Wv xn).
        m.attn_projections(layer, n, s);
        m.rope_qk(n, RopeMode::Normal, false, s);
        m.attend(il, layer, n, &shape, seqs, s);
        ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);

        // Feed-forward block: x += down(silu(gate(xn)) * up(xn)).
        m.feed_forward(layer, n, ops::swiglu, s);
        ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);
    }
}
