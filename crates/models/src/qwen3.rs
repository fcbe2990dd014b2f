//! Qwen3 (dense): no projection biases; Q and K get a per-head RMSNorm before RoPE (NeoX).

use crate::arch::{Family, Layers};
use crate::blocks::{AttnParts, PreNorm};
use crate::ops::RopeMode;
use crate::{Config, Result};
use hearth_gguf::Gguf;

pub const FAMILY: Family = Family {
    name: "qwen3",
    load,
};

fn load(g: &Gguf, c: &mut Config) -> Result<Box<dyn Layers>> {
    let parts = AttnParts {
        qk_norm: true,
        ..AttnParts::default()
    };
    PreNorm::load(g, c, parts, RopeMode::Neox)
}
