//! Qwen2 / Qwen2.5 (and DeepSeek-R1 distills of them): llama's block with biases on the Q, K
//! and V projections and RoPE on halves (NeoX).

use crate::arch::{Family, Layers};
use crate::blocks::{AttnParts, PreNorm};
use crate::ops::RopeMode;
use crate::{Config, Result};
use hearth_gguf::Gguf;

pub const FAMILY: Family = Family {
    name: "qwen2",
    load,
};

fn load(g: &Gguf, c: &mut Config) -> Result<Box<dyn Layers>> {
    let parts = AttnParts {
        qkv_bias: true,
        ..AttnParts::default()
    };
    PreNorm::load(g, c, parts, RopeMode::Neox)
}
