//! The blocks architectures are made of: attention (projections with optional biases and
//! per-head Q/K norms, RoPE, attention over the cache, output projection) and the gated
//! feed-forward. Each architecture file wires them in its own order.

use crate::arch::Layers;
use crate::attention::AttnShape;
use crate::ops::{self, RopeMode};
use crate::weights::{load_vec, Mat};
use crate::{attention, BatchSeq, Config, Model, Result, Scratch};
use hearth_gguf::Gguf;
use hearth_quant::Activations;

/// Which optional parts an architecture's attention has.
#[derive(Debug, Clone, Copy, Default)]
pub struct AttnParts {
    /// qwen2: biases on the Q, K and V projections.
    pub qkv_bias: bool,
    /// qwen3, gemma3: per-head RMSNorm of Q and K before RoPE.
    pub qk_norm: bool,
}

/// One block's attention weights.
pub struct Attention {
    pub norm: Vec<f32>,
    pub wq: Mat,
    pub wk: Mat,
    pub wv: Mat,
    pub wo: Mat,
    pub bias: Option<[Vec<f32>; 3]>,
    pub qk_norm: Option<[Vec<f32>; 2]>,
}

impl Attention {
    pub fn load(g: &Gguf, c: &Config, i: usize, parts: AttnParts) -> Result<Self> {
        let d = c.n_embd;
        let name = |n: &str| format!("blk.{i}.{n}");
        let bias = if parts.qkv_bias {
            Some([
                load_vec(g, &name("attn_q.bias"), c.q_dim())?,
                load_vec(g, &name("attn_k.bias"), c.kv_dim())?,
                load_vec(g, &name("attn_v.bias"), c.kv_dim())?,
            ])
        } else {
            None
        };
        let qk_norm = if parts.qk_norm {
            Some([
                load_vec(g, &name("attn_q_norm.weight"), c.head_dim)?,
                load_vec(g, &name("attn_k_norm.weight"), c.head_dim)?,
            ])
        } else {
            None
        };
        Ok(Self {
            norm: load_vec(g, &name("attn_norm.weight"), d)?,
            wq: Mat::load(g, &name("attn_q.weight"), d, c.q_dim())?,
            wk: Mat::load(g, &name("attn_k.weight"), d, c.kv_dim())?,
            wv: Mat::load(g, &name("attn_v.weight"), d, c.kv_dim())?,
            wo: Mat::load(g, &name("attn_output.weight"), c.q_dim(), d)?,
            bias,
            qk_norm,
        })
    }
}

/// One block's gated feed-forward: `down(act(gate(xn)) * up(xn))`.
pub struct Mlp {
    pub norm: Vec<f32>,
    pub gate: Mat,
    pub up: Mat,
    pub down: Mat,
}

impl Mlp {
    pub fn load(g: &Gguf, c: &Config, i: usize) -> Result<Self> {
        let (d, ff) = (c.n_embd, c.n_ff);
        let name = |n: &str| format!("blk.{i}.{n}.weight");
        Ok(Self {
            norm: load_vec(g, &name("ffn_norm"), d)?,
            gate: Mat::load(g, &name("ffn_gate"), d, ff)?,
            up: Mat::load(g, &name("ffn_up"), d, ff)?,
            down: Mat::load(g, &name("ffn_down"), ff, d)?,
        })
    }
}

/// The layers of a plain pre-norm architecture (llama, qwen2, qwen3): what differs between
/// them is the attention's optional parts and how RoPE pairs dimensions.
pub struct PreNorm {
    blocks: Vec<(Attention, Mlp)>,
    mode: RopeMode,
}

impl PreNorm {
    pub fn load(g: &Gguf, c: &Config, parts: AttnParts, mode: RopeMode) -> Result<Box<dyn Layers>> {
        let blocks = (0..c.n_layer)
            .map(|i| Ok((Attention::load(g, c, i, parts)?, Mlp::load(g, c, i)?)))
            .collect::<Result<_>>()?;
        Ok(Box::new(PreNorm { blocks, mode }))
    }
}

impl Layers for PreNorm {
    fn run(&self, m: &Model, n: usize, seqs: &mut [BatchSeq], s: &mut Scratch) {
        let shape = m.attn_shape(None);
        for (il, (attn, mlp)) in self.blocks.iter().enumerate() {
            pre_norm_block(m, il, attn, mlp, self.mode, &shape, n, seqs, s);
        }
    }
}

/// Gemma's block: RMSNorm before and after each sub-block (the post-norm on its output),
/// a GELU(tanh)-gated feed-forward, Q multiplied by `q_scale` after RoPE (NeoX).
pub struct Sandwich {
    attn: Attention,
    post_attn_norm: Vec<f32>,
    mlp: Mlp,
    post_ffn_norm: Vec<f32>,
}

impl Sandwich {
    pub fn load(g: &Gguf, c: &Config, i: usize, parts: AttnParts) -> Result<Self> {
        let name = |n: &str| format!("blk.{i}.{n}.weight");
        Ok(Sandwich {
            attn: Attention::load(g, c, i, parts)?,
            post_attn_norm: load_vec(g, &name("post_attention_norm"), c.n_embd)?,
            mlp: Mlp::load(g, c, i)?,
            post_ffn_norm: load_vec(g, &name("post_ffw_norm"), c.n_embd)?,
        })
    }

    /// `x += post_norm(Wo · attn(rope(Q) · q_scale, rope(K), V))`, then
    /// `x += post_norm(down(gelu(gate(xn)) * up(xn)))`; `swa_rope` picks the sliding-window
    /// layers' RoPE table.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        m: &Model,
        il: usize,
        shape: &AttnShape,
        swa_rope: bool,
        q_scale: f32,
        n: usize,
        seqs: &mut [BatchSeq],
        s: &mut Scratch,
    ) {
        let c = &m.config;
        let (d, qd) = (c.n_embd, c.q_dim());
        m.attn_projections(&self.attn, n, s);
        m.rope_qk(n, RopeMode::Neox, swa_rope, s);
        s.q[..n * qd].iter_mut().for_each(|v| *v *= q_scale);
        m.attend(il, &self.attn.wo, n, shape, seqs, s);
        ops::rms_norm_inplace(&mut s.proj[..n * d], &self.post_attn_norm, c.rms_eps);
        ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);
        m.feed_forward(&self.mlp, n, ops::geglu, s);
        ops::rms_norm_inplace(&mut s.proj[..n * d], &self.post_ffn_norm, c.rms_eps);
        ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);
    }
}

/// The plain pre-norm block (llama, qwen2, qwen3):
/// `x += Wo · attn(rope(Q), rope(K), V)` over `xn = norm(x)`, then `x += mlp(norm(x))`.
#[allow(clippy::too_many_arguments)]
fn pre_norm_block(
    m: &Model,
    il: usize,
    attn: &Attention,
    mlp: &Mlp,
    mode: RopeMode,
    shape: &AttnShape,
    n: usize,
    seqs: &mut [BatchSeq],
    s: &mut Scratch,
) {
    let d = m.config.n_embd;
    m.attn_projections(attn, n, s);
    m.rope_qk(n, mode, false, s);
    m.attend(il, &attn.wo, n, shape, seqs, s);
    ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);
    m.feed_forward(mlp, n, ops::swiglu, s);
    ops::add_inplace(&mut s.x[..n * d], &s.proj[..n * d]);
}

impl Model {
    /// The attention shape of a model whose scores are scaled by `1/√head_dim`.
    pub(crate) fn attn_shape(&self, window: Option<usize>) -> AttnShape {
        let c = &self.config;
        AttnShape {
            n_head: c.n_head,
            n_kv_head: c.n_kv_head,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f32).sqrt(),
            window,
            softcap: None,
        }
    }

    /// `out = W · x` for the `n` rows of `x`, the first `tile_rows` on the AMX-INT8 tiles.
    pub(crate) fn matmul(
        &self,
        w: &Mat,
        x: &[f32],
        out: &mut [f32],
        acts: &mut Activations,
        mm: &mut Vec<f32>,
        tile_rows: usize,
    ) {
        let m = w.view(&self.gguf);
        acts.quantize_split(m.act_type(), x, m.cols, tile_rows);
        m.matmul(acts, out, mm);
    }

    /// Several products of one input: `x` is quantized once per activation format, not
    /// once per matrix.
    pub(crate) fn matmul_shared<const N: usize>(
        &self,
        x: &[f32],
        outs: [(&Mat, &mut [f32]); N],
        acts: &mut Activations,
        mm: &mut Vec<f32>,
        tile_rows: usize,
    ) {
        let mut views = outs.map(|(w, out)| (w.view(&self.gguf), out));
        let first = views.first().map(|(m, _)| (m.act_type(), m.cols));
        if let Some((ty, cols)) =
            first.filter(|(ty, _)| views.iter().all(|(m, _)| m.act_type() == *ty))
        {
            acts.quantize_split(ty, x, cols, tile_rows);
            hearth_quant::matmul_many(&mut views, acts, mm);
            return;
        }
        let mut current = None;
        for (m, out) in views {
            if current != Some(m.act_type()) {
                acts.quantize_split(m.act_type(), x, m.cols, tile_rows);
                current = Some(m.act_type());
            }
            m.matmul(acts, out, mm);
        }
    }

    /// `xn = rms_norm(x) * attn.norm`, then Q, K, V of `xn` (`n` tokens), plus their biases
    /// and per-head norms where the architecture has them.
    pub(crate) fn attn_projections(&self, a: &Attention, n: usize, s: &mut Scratch) {
        let c = &self.config;
        let (d, qd, kvd) = (c.n_embd, c.q_dim(), c.kv_dim());
        ops::rms_norm(&s.x[..n * d], &a.norm, c.rms_eps, &mut s.xn[..n * d]); // [n, d]
        self.matmul_shared(
            &s.xn[..n * d],
            [
                (&a.wq, &mut s.q[..n * qd]),  // [n, n_head*hd]
                (&a.wk, &mut s.k[..n * kvd]), // [n, n_kv*hd]
                (&a.wv, &mut s.v[..n * kvd]), // [n, n_kv*hd]
            ],
            &mut s.acts,
            &mut s.mm,
            s.tile_rows,
        );
        if let Some([bq, bk, bv]) = &a.bias {
            ops::add_rows(&mut s.q[..n * qd], bq);
            ops::add_rows(&mut s.k[..n * kvd], bk);
            ops::add_rows(&mut s.v[..n * kvd], bv);
        }
        if let Some([qn, kn]) = &a.qk_norm {
            ops::rms_norm_inplace(&mut s.q[..n * qd], qn, c.rms_eps); // per head
            ops::rms_norm_inplace(&mut s.k[..n * kvd], kn, c.rms_eps);
        }
    }

    /// RoPE on Q and K of the `n` tokens, with the chunk's table (`swa`: the sliding-window one).
    pub(crate) fn rope_qk(&self, n: usize, mode: RopeMode, swa: bool, s: &mut Scratch) {
        let c = &self.config;
        let (qd, kvd) = (c.q_dim(), c.kv_dim());
        let table = if swa { &s.rope_swa } else { &s.rope };
        for (t, cs) in table.chunks_exact(c.n_rot).take(n).enumerate() {
            ops::rope(
                &mut s.q[t * qd..(t + 1) * qd],
                c.head_dim,
                c.n_rot,
                mode,
                cs,
            );
            ops::rope(
                &mut s.k[t * kvd..(t + 1) * kvd],
                c.head_dim,
                c.n_rot,
                mode,
                cs,
            );
        }
    }

    /// Stores K and V of layer `il` in each sequence's cache and runs attention there;
    /// `proj = wo · attn` for the whole batch.
    pub(crate) fn attend(
        &self,
        il: usize,
        wo: &Mat,
        n: usize,
        shape: &AttnShape,
        seqs: &mut [BatchSeq],
        s: &mut Scratch,
    ) {
        let c = &self.config;
        let (d, qd, kvd) = (c.n_embd, c.q_dim(), c.kv_dim());
        for (q, &(row0, len, pos0)) in seqs.iter_mut().zip(&s.segs) {
            let rows = row0..row0 + len;
            // A quantized cache holds keys and values rotated (see `KvType::rotations`): Q
            // turns with K so their dot products stay, the output turns back with V.
            let rotations = q.cache.ty.rotations(c.head_dim);
            if let Some((nk, nv)) = rotations {
                ops::hadamard(&mut s.q[rows.start * qd..rows.end * qd], nk);
                ops::hadamard(&mut s.k[rows.start * kvd..rows.end * kvd], nk);
                ops::hadamard(&mut s.v[rows.start * kvd..rows.end * kvd], nv);
            }
            q.cache.store(
                il,
                pos0,
                &s.k[rows.start * kvd..rows.end * kvd],
                &s.v[rows.start * kvd..rows.end * kvd],
            );
            // Positions relative to the layer buffer's first row (a sliding-window layer
            // has dropped the rows before it).
            let (kv, first) = q.cache.layer(il);
            attention::attention(
                &s.q[rows.start * qd..rows.end * qd],
                kv,
                pos0 - first,
                shape,
                &mut s.attn[rows.start * qd..rows.end * qd],
                &mut s.attn_scratch,
            ); // [len, qd]
            if let Some((_, nv)) = rotations {
                ops::hadamard(&mut s.attn[rows.start * qd..rows.end * qd], nv);
            }
        }
        self.matmul(
            wo,
            &s.attn[..n * qd],
            &mut s.proj[..n * d],
            &mut s.acts,
            &mut s.mm,
            s.tile_rows,
        ); // [n, d]
    }

    /// `proj = down(act(gate(xn)) * up(xn))` with `xn = rms_norm(x) * mlp.norm`;
    /// `act` combines gate and up in place (SwiGLU, GeGLU).
    pub(crate) fn feed_forward(
        &self,
        mlp: &Mlp,
        n: usize,
        act: fn(&mut [f32], &[f32]),
        s: &mut Scratch,
    ) {
        let c = &self.config;
        let (d, ff) = (c.n_embd, c.n_ff);
        ops::rms_norm(&s.x[..n * d], &mlp.norm, c.rms_eps, &mut s.xn[..n * d]); // [n, d]
        self.matmul_shared(
            &s.xn[..n * d],
            [
                (&mlp.gate, &mut s.gate[..n * ff]),
                (&mlp.up, &mut s.up[..n * ff]),
            ], // [n, ff]
            &mut s.acts,
            &mut s.mm,
            s.tile_rows,
        );
        ops::gated_in_parallel(act, &mut s.gate[..n * ff], &s.up[..n * ff]);
        self.matmul(
            &mlp.down,
            &s.gate[..n * ff],
            &mut s.proj[..n * d],
            &mut s.acts,
            &mut s.mm,
            s.tile_rows,
        ); // [n, d]
    }
}
