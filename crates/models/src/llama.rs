//! The llama architecture (SmolLM2, Llama 2/3.x, TinyLlama): pre-norm blocks with RMSNorm,
//! RoPE on adjacent pairs (Llama 3.1+: scaled per frequency by `rope_freqs.weight`, which
//! the model loads for every architecture), grouped-query attention and a SwiGLU
//! feed-forward.

use crate::arch::{Family, Layers};
use crate::blocks::{AttnParts, PreNorm};
use crate::ops::RopeMode;
use crate::{Config, Result};
use hearth_gguf::Gguf;

pub const FAMILY: Family = Family {
    name: "llama",
    load,
};

fn load(g: &Gguf, c: &mut Config) -> Result<Box<dyn Layers>> {
    PreNorm::load(g, c, AttnParts::default(), RopeMode::Normal)
}
