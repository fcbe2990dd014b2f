//! Phi-3 / Phi-3.5 / Phi-4-mini: llama's pre-norm block with Q, K and V from one fused
//! `attn_qkv` product (or separate ones), gate and up from one fused `ffn_up` product (gate
//! first), RoPE on halves over the first `rope.dimension_count` dimensions of each head
//! (partial rotary, Phi-4-mini), the short/long RoPE factor sets and `attn_factor` of
//! long-context checkpoints, and Q scaled before attention. Sliding-window metadata is
//! read and not applied, as llama.cpp does (its converters do not fill it in correctly).

use crate::arch::{Family, Layers};
use crate::ops::{self, RopeMode};
use crate::weights::{load_vec, Mat};
use crate::{BatchSeq, Config, Model, Result, Scratch};
use hearth_gguf::Gguf;

pub const FAMILY: Family = Family { name: "phi3", load };

enum Qkv {
    Fused(Mat),
    Split([Mat; 3]),
}

struct Block {
    attn_norm: Vec<f32>,
    qkv: Qkv,
    wo: Mat,
    ffn_norm: Vec<f32>,
    /// `[2·n_ff, d]`: gate rows, then up rows.
    gate_up: Mat,
    down: Mat,
}

struct Phi3 {
    blocks: Vec<Block>,
}

fn load(g: &Gguf, c: &mut Config) -> Result<Box<dyn Layers>> {
    let (d, ff, qd, kvd) = (c.n_embd, c.n_ff, c.q_dim(), c.kv_dim());
    let mut blocks = Vec::with_capacity(c.n_layer);
    for i in 0..c.n_layer {
        let name = |n: &str| format!("blk.{i}.{n}.weight");
        let qkv = if g.tensor_info(&name("attn_qkv")).is_some() {
            Qkv::Fused(Mat::load(g, &name("attn_qkv"), d, qd + 2 * kvd)?)
        } else {
            Qkv::Split([
                Mat::load(g, &name("attn_q"), d, qd)?,
                Mat::load(g, &name("attn_k"), d, kvd)?,
                Mat::load(g, &name("attn_v"), d, kvd)?,
            ])
        };
        blocks.push(Block {
            attn_norm: load_vec(g, &name("attn_norm"), d)?,
            qkv,
            wo: Mat::load(g, &name("attn_output"), qd, d)?,
            ffn_norm: load_vec(g, &name("ffn_norm"), d)?,
            gate_up: Mat::load(g, &name("ffn_up"), d, 2 * ff)?,
            down: Mat::load(g, &name("ffn_down"), ff, d)?,
        });
    }
    Ok(Box::new(Phi3 { blocks }))
}

/// Rows of `fused` (`[n, widths.sum()]`) split column-wise into `outs`.
fn split_rows(fused: &[f32], n: usize, outs: &mut [(&mut [f32], usize)]) {
    let width: usize = outs.iter().map(|o| o.1).sum();
    for t in 0..n {
        let mut col = t * width;
        for (out, w) in outs.iter_mut() {
            out[t * *w..(t + 1) * *w].copy_from_slice(&fused[col..col + *w]);
            col += *w;
        }
    }
}

impl Layers for Phi3 {
    fn run(&self, m: &Model, n: usize, seqs: &mut [BatchSeq], s: &mut Scratch) {
        let c = &m.config;
        let (d, qd, kvd, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
        let shape = crate::attention::AttnShape {
            scale: 1.0,
            ..m.attn_shape(None)
        };
        let q_scale = 1.0 / (c.head_dim as f32).sqrt();
        for (il, b) in self.blocks.iter().enumerate() {
            // Attention: x += Wo · attn(rope(Q) / √hd, rope(K), V), Q K V from norm(x).
            ops::rms_norm(&s.x[..n * d], &b.attn_norm, c.rms_eps, &mut s.xn[..n * d]);
            match &b.qkv {
                Qkv::Fused(w) => {
                    s.fused.resize(n * (qd + 2 * kvd), 0.0);
                    m.matmul(
                        w,
                        &s.xn[..n * d],
                        &mut s.fused,
                        &mut s.acts,
                        &mut s.mm,
                        s.tile_rows,
                    );
                    split_rows(
                        &s.fused,
                        n,
                        &mut [(&mut s.q, qd), (&mut s.k, kvd), (&mut s.v, kvd)],
                    );
                }
                Qkv::Split([wq, wk, wv]) => m.matmul_shared(
                    &s.xn[..n * d],
                    [
                        (wq, &mut s.q[..n * qd]),
                        (wk, &mut s.k[..n * kvd]),
                        (wv, &mut s.v[..n * kvd]),
                    ],
                    &mut s.acts,
                    &mut s.mm,
                    s.tile_rows,
                ),
            }
            m.rope_qk(n, RopeMode::Neox, false, s);
            s.q[..n * qd].iter_mut().for_each(|v| *v *= q_scale);
            m.attend(il, &b.wo, n, &shape, seqs, s);
            ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);

            // Feed-forward: x += down(silu(gate) * up), gate and up from one product.
            ops::rms_norm(&s.x[..n * d], &b.ffn_norm, c.rms_eps, &mut s.xn[..n * d]);
            s.fused.resize(n * 2 * ff, 0.0);
            m.matmul(
                &b.gate_up,
                &s.xn[..n * d],
                &mut s.fused,
                &mut s.acts,
                &mut s.mm,
                s.tile_rows,
            );
            split_rows(&s.fused, n, &mut [(&mut s.gate, ff), (&mut s.up, ff)]);
            ops::swiglu(&mut s.gate[..n * ff], &s.up[..n * ff]);
            m.matmul(
                &b.down,
                &s.gate[..n * ff],
                &mut s.proj[..n * d],
                &mut s.acts,
                &mut s.mm,
                s.tile_rows,
            );
            ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);
        }
    }
}
