//! The llama architecture (SmolLM2, Llama 2/3.x, TinyLlama): pre-norm blocks with RMSNorm,
//! RoPE on adjacent pairs (Llama 3.1+: scaled per frequency by `rope_freqs.weight`),
//! grouped-query attention and a SwiGLU feed-forward.

use crate::arch::{Family, Layers};
use crate::blocks::{pre_norm_block, Attention, AttnParts, Mlp};
use crate::ops::RopeMode;
use crate::{BatchSeq, Config, Model, Result, Scratch};
use hearth_gguf::Gguf;

pub const FAMILY: Family = Family {
    name: "llama",
    load,
};

struct Llama {
    blocks: Vec<(Attention, Mlp)>,
}

fn load(g: &Gguf, c: &mut Config) -> Result<Box<dyn Layers>> {
    let blocks = (0..c.n_layer)
        .map(|i| {
            Ok((
                Attention::load(g, c, i, AttnParts::default())?,
                Mlp::load(g, c, i)?,
            ))
        })
        .collect::<Result<_>>()?;
    Ok(Box::new(Llama { blocks }))
}

impl Layers for Llama {
    fn run(&self, m: &Model, n: usize, seqs: &mut [BatchSeq], s: &mut Scratch) {
        let shape = m.attn_shape(None);
        for (il, (attn, mlp)) in self.blocks.iter().enumerate() {
            pre_norm_block(m, il, attn, mlp, RopeMode::Normal, &shape, n, seqs, s);
        }
    }
}
