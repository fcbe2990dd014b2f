//! Qwen3 (dense): no projection biases; Q and K get a per-head RMSNorm before RoPE (NeoX).

use crate::arch::{Family, Layers};
use crate::blocks::{pre_norm_block, Attention, AttnParts, Mlp};
use crate::ops::RopeMode;
use crate::{BatchSeq, Config, Model, Result, Scratch};
use hearth_gguf::Gguf;

pub const FAMILY: Family = Family {
    name: "qwen3",
    load,
};

struct Qwen3 {
    blocks: Vec<(Attention, Mlp)>,
}

fn load(g: &Gguf, c: &mut Config) -> Result<Box<dyn Layers>> {
    let parts = AttnParts {
        qk_norm: true,
        ..AttnParts::default()
    };
    let blocks = (0..c.n_layer)
        .map(|i| Ok((Attention::load(g, c, i, parts)?, Mlp::load(g, c, i)?)))
        .collect::<Result<_>>()?;
    Ok(Box::new(Qwen3 { blocks }))
}

impl Layers for Qwen3 {
    fn run(&self, m: &Model, n: usize, seqs: &mut [BatchSeq], s: &mut Scratch) {
        let shape = m.attn_shape(None);
        for (il, (attn, mlp)) in self.blocks.iter().enumerate() {
            pre_norm_block(m, il, attn, mlp, RopeMode::Neox, &shape, n, seqs, s);
        }
    }
}
