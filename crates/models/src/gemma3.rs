//! Gemma 3: embeddings scaled by √d, RMSNorm around both sub-blocks (pre and post),
//! per-head Q/K RMSNorm, GELU(tanh)-gated feed-forward, and sliding-window attention on
//! five of every six layers with their own RoPE base. Norm weights in GGUF already include
//! Gemma's `1 + w`.

use crate::arch::{Family, Layers};
use crate::blocks::{AttnParts, Sandwich};
use crate::{BatchSeq, Config, Model, Result, Scratch};
use hearth_gguf::Gguf;

pub const FAMILY: Family = Family {
    name: "gemma3",
    load,
};

struct Gemma3 {
    blocks: Vec<Sandwich>,
}

fn load(g: &Gguf, c: &mut Config) -> Result<Box<dyn Layers>> {
    let key = |k: &str| format!("gemma3.{k}");
    if g.get_f32(&key("attention.layer_norm_rms_epsilon"))?
        .is_none()
    {
        c.rms_eps = 1e-6;
    }
    c.sliding_window = g
        .get_usize(&key("attention.sliding_window"), 0, 1 << 24)?
        .filter(|&w| w > 0);
    let parts = AttnParts {
        qk_norm: true,
        ..AttnParts::default()
    };
    let blocks = (0..c.n_layer)
        .map(|i| Sandwich::load(g, c, i, parts))
        .collect::<Result<_>>()?;
    Ok(Box::new(Gemma3 { blocks }))
}

impl Layers for Gemma3 {
    fn run(&self, m: &Model, n: usize, seqs: &mut [BatchSeq], s: &mut Scratch) {
        let c = &m.config;
        let d = c.n_embd;
        let embd_scale = (d as f32).sqrt();
        s.x[..n * d].iter_mut().for_each(|v| *v *= embd_scale);
        // Q is scaled by 1/√head_dim before attention (query_pre_attn_scalar = head_dim here).
        let q_scale = 1.0 / (c.head_dim as f32).sqrt();
        for (il, b) in self.blocks.iter().enumerate() {
            let swa = c.is_swa_layer(il);
            let shape = crate::attention::AttnShape {
                scale: 1.0,
                ..m.attn_shape(if swa { c.sliding_window } else { None })
            };
            b.run(m, il, &shape, swa, q_scale, n, seqs, s);
        }
    }
}
