//! Qwen2 / Qwen2.5 (and DeepSeek-R1 distills of them): llama's block with biases on the Q, K
//! and V projections and RoPE on halves (NeoX).

use crate::arch::{Family, Layers};
use crate::blocks::{pre_norm_block, Attention, AttnParts, Mlp};
use crate::ops::RopeMode;
use crate::{BatchSeq, Config, Model, Result, Scratch};
use hearth_gguf::Gguf;

pub const FAMILY: Family = Family {
    name: "qwen2",
    load,
};

struct Qwen2 {
    blocks: Vec<(Attention, Mlp)>,
}

fn load(g: &Gguf, c: &mut Config) -> Result<Box<dyn Layers>> {
    let parts = AttnParts {
        qkv_bias: true,
        ..AttnParts::default()
    };
    let blocks = (0..c.n_layer)
        .map(|i| Ok((Attention::load(g, c, i, parts)?, Mlp::load(g, c, i)?)))
        .collect::<Result<_>>()?;
    Ok(Box::new(Qwen2 { blocks }))
}

impl Layers for Qwen2 {
    fn run(&self, m: &Model, n: usize, seqs: &mut [BatchSeq], s: &mut Scratch) {
        let shape = m.attn_shape(None);
        for (il, (attn, mlp)) in self.blocks.iter().enumerate() {
            pre_norm_block(m, il, attn, mlp, RopeMode::Neox, &shape, n, seqs, s);
        }
    }
}
