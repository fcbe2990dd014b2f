//! The BERT encoder (Hugging Face `BertModel`): token + position + token-type embeddings,
//! then post-LayerNorm blocks of bidirectional self-attention and a GELU feed-forward.
//!
//! Several sequences run together without padding: their rows are concatenated for the
//! matrix products and attention stays within each sequence, so no work goes to pad tokens.

use hearth_quant::bf16mat::{Bf16Matrix, Bf16Scratch};
use hearth_quant::f32mat::F32Panels;
use hearth_quant::i16mat::I16Panels;
use hearth_quant::pool::OutRows;
use hearth_quant::{Activations, AttendRows, Blocks, GgmlType, QMatrix};

use crate::{EmbedError, Result};

#[derive(Debug, Clone)]
pub struct BertConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub vocab: usize,
    pub type_vocab: usize,
    pub eps: f32,
}

/// `y = x Wᵀ + b` with `W` as `[out, in]` (PyTorch's `Linear`).
pub struct Linear {
    w: Weights,
    b: Vec<f32>,
    rows: usize,
    cols: usize,
}

/// Buffers reused by every product of one `encode`.
#[derive(Default)]
struct Scratch {
    acts: Activations,
    mm: Vec<f32>,
    bf16: Bf16Scratch,
}

/// bf16 products where the CPU runs them fast (AMX tiles; AVX512-BF16 dot products on
/// AMD), else 16-bit integer panels at the AVX-512 (VNNI) and AVX2 levels, else f32
/// panels, else (the scalar level) f32 with the tiles of `QMatrix`.
enum Weights {
    Bf16(Bf16Matrix),
    I16(I16Panels),
    Panels(F32Panels),
    F32(Vec<f32>),
}

impl Linear {
    fn new(w: Vec<f32>, b: Vec<f32>, rows: usize, cols: usize) -> Self {
        let w = if let Some(packed) = Bf16Matrix::pack(&w, rows, cols) {
            Weights::Bf16(packed)
        } else if let Some(panels) = I16Panels::pack(&w, rows, cols) {
            Weights::I16(panels)
        } else if let Some(panels) = F32Panels::pack(&w, rows, cols) {
            Weights::Panels(panels)
        } else {
            Weights::F32(w)
        };
        Self { w, b, rows, cols }
    }

    fn forward(&self, x: &[f32], y: &mut [f32], s: &mut Scratch) {
        let Scratch { acts, mm, bf16 } = s;
        match &self.w {
            Weights::Bf16(w) => w.matmul(x, x.len() / self.cols, Some(&self.b), y, bf16),
            Weights::I16(w) => w.matmul(x, x.len() / self.cols, Some(&self.b), y),
            Weights::Panels(w) => w.matmul(x, x.len() / self.cols, Some(&self.b), y),
            Weights::F32(w) => {
                let m = QMatrix {
                    ty: GgmlType::F32,
                    rows: self.rows,
                    cols: self.cols,
                    blocks: Blocks::F32(w),
                };
                acts.quantize(m.act_type(), x, self.cols);
                m.matmul(acts, y, mm);
                for row in y.chunks_exact_mut(self.rows) {
                    row.iter_mut().zip(&self.b).for_each(|(v, b)| *v += b);
                }
            }
        }
    }
}

pub struct LayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl LayerNorm {
    /// `x = LayerNorm(x + add)` in place, row by row (`dim` values each), rows in parallel.
    fn forward(&self, x: &mut [f32], add: Option<&[f32]>, eps: f32) {
        const ROWS: usize = 64;
        let dim = self.w.len();
        let norm = hearth_quant::dispatch::kernels().add_layer_norm;
        hearth_quant::pool::for_each_chunk(x, ROWS * dim, |i, part| {
            let add = add.map(|a| &a[i * ROWS * dim..][..part.len()]);
            norm(part, add, &self.w, &self.b, eps)
        });
    }
}

pub struct Layer {
    /// Query, key and value projections as one `[3h, h]` product.
    qkv: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    ffn_up: Linear,
    ffn_down: Linear,
    ffn_norm: LayerNorm,
}

pub struct Bert {
    pub config: BertConfig,
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    /// Intermediates kept between `encode` calls (one caller at a time uses them; a
    /// concurrent caller makes its own).
    buffers: std::sync::Mutex<Buffers>,
}

/// The intermediates of one forward pass; they only grow, and every value is written
/// before it is read.
#[derive(Default)]
struct Buffers {
    qkv: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    up: Vec<f32>,
    kt: Vec<f32>,
    scratch: Scratch,
}

/// `v` with at least `len` values, as a slice of exactly `len`.
fn sized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

impl Bert {
    /// Builds the model; `tensor(name, shape)` returns the named tensor as f32, checked
    /// against the shape the config implies.
    pub fn load(
        config: BertConfig,
        mut tensor: impl FnMut(&str, &[usize]) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        let (h, ff) = (config.hidden, config.intermediate);
        if config.heads == 0 || h % config.heads != 0 {
            return Err(EmbedError::Config(format!(
                "hidden size {h} is not a multiple of {} heads",
                config.heads
            )));
        }
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = format!("encoder.layer.{i}");
            let mut qkv_w = Vec::with_capacity(3 * h * h);
            let mut qkv_b = Vec::with_capacity(3 * h);
            for part in ["query", "key", "value"] {
                let name = format!("{p}.attention.self.{part}");
                qkv_w.extend(tensor(&format!("{name}.weight"), &[h, h])?);
                qkv_b.extend(tensor(&format!("{name}.bias"), &[h])?);
            }
            let qkv = Linear::new(qkv_w, qkv_b, 3 * h, h);
            let mut linear = |name: &str, rows: usize, cols: usize| -> Result<Linear> {
                Ok(Linear::new(
                    tensor(&format!("{name}.weight"), &[rows, cols])?,
                    tensor(&format!("{name}.bias"), &[rows])?,
                    rows,
                    cols,
                ))
            };
            let attn_out = linear(&format!("{p}.attention.output.dense"), h, h)?;
            let ffn_up = linear(&format!("{p}.intermediate.dense"), ff, h)?;
            let ffn_down = linear(&format!("{p}.output.dense"), h, ff)?;
            layers.push((p, qkv, attn_out, ffn_up, ffn_down));
        }
        let mut norm = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                w: tensor(&format!("{name}.weight"), &[h])?,
                b: tensor(&format!("{name}.bias"), &[h])?,
            })
        };
        let mut built = Vec::with_capacity(layers.len());
        for (p, qkv, attn_out, ffn_up, ffn_down) in layers {
            built.push(Layer {
                qkv,
                attn_out,
                attn_norm: norm(&format!("{p}.attention.output.LayerNorm"))?,
                ffn_up,
                ffn_down,
                ffn_norm: norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        let embed_norm = norm("embeddings.LayerNorm")?;
        Ok(Self {
            word: tensor("embeddings.word_embeddings.weight", &[config.vocab, h])?,
            position: tensor(
                "embeddings.position_embeddings.weight",
                &[config.max_positions, h],
            )?,
            token_type: tensor(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab, h],
            )?,
            embed_norm,
            layers: built,
            config,
            buffers: Default::default(),
        })
    }

    /// Final hidden states of every token of every sequence, rows concatenated in order:
    /// `[Σ len, hidden]`. Sequences must be non-empty, within `max_positions`, ids in vocab.
    pub fn encode(&self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        let c = &self.config;
        let h = c.hidden;
        for s in seqs {
            if s.is_empty() || s.len() > c.max_positions {
                return Err(EmbedError::Input(format!(
                    "a sequence of {} tokens (1 to {} allowed)",
                    s.len(),
                    c.max_positions
                )));
            }
            if let Some(&id) = s.iter().find(|&&t| t as usize >= c.vocab) {
                return Err(EmbedError::Input(format!(
                    "token id {id} outside the vocabulary"
                )));
            }
        }
        let n: usize = seqs.iter().map(|s| s.len()).sum();
        // Row ranges of each sequence.
        let mut spans = Vec::with_capacity(seqs.len());
        let mut start = 0;
        for s in seqs {
            spans.push((start, s.len()));
            start += s.len();
        }

        // x = LayerNorm(word + position + token type 0)        [n, h]
        let mut x = vec![0f32; n * h];
        for (s, &(row0, len)) in seqs.iter().zip(&spans) {
            for t in 0..len {
                let id = s[t] as usize;
                let row = &mut x[(row0 + t) * h..(row0 + t + 1) * h];
                let (w, p, ty) = (
                    &self.word[id * h..(id + 1) * h],
                    &self.position[t * h..(t + 1) * h],
                    &self.token_type[..h],
                );
                for i in 0..h {
                    row[i] = w[i] + p[i] + ty[i];
                }
            }
        }
        self.embed_norm.forward(&mut x, None, c.eps);

        let mut own = Buffers::default();
        let mut shared = self.buffers.try_lock();
        let b = match shared.as_deref_mut() {
            Ok(b) => b,
            Err(_) => &mut own,
        };
        let qkv = sized(&mut b.qkv, n * 3 * h);
        let attn = sized(&mut b.attn, n * h);
        let proj = sized(&mut b.proj, n * h);
        let up = sized(&mut b.up, n * c.intermediate);
        let (kt, scratch) = (&mut b.kt, &mut b.scratch);
        let kernels = hearth_quant::dispatch::kernels();
        let head_dim = h / c.heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        for layer in &self.layers {
            // Self-attention within each sequence: attn = softmax(q kᵀ / √d) v per head.
            // [q | k | v] = x [Wq | Wk | Wv]ᵀ + b                    [n, 3h]
            layer.qkv.forward(&x, qkv, scratch);
            attention(qkv, kt, &spans, c.heads, head_dim, scale, attn);
            // x = LayerNorm(x + attn Woᵀ)
            layer.attn_out.forward(attn, proj, scratch);
            layer.attn_norm.forward(&mut x, Some(proj), c.eps);
            // x = LayerNorm(x + gelu(x W1ᵀ) W2ᵀ)
            layer.ffn_up.forward(&x, up, scratch);
            hearth_quant::pool::for_each_chunk(up, 16 * 1024, |_, part| (kernels.gelu)(part));
            layer.ffn_down.forward(up, proj, scratch);
            layer.ffn_norm.forward(&mut x, Some(proj), c.eps);
        }
        Ok(x)
    }
}

/// Bidirectional attention for every (sequence, token, head), in parallel over blocks of
/// up to 32 query rows of one sequence. `qkv` holds rows of `[q | k | v]` (`3h` each); `kt`
/// gets each sequence's keys transposed, so a query row's scores are runs of contiguous
/// products per key column.
fn attention(
    qkv: &[f32],
    kt: &mut Vec<f32>,
    spans: &[(usize, usize)],
    heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
) {
    const BLOCK: usize = 32;
    let h = heads * head_dim;
    let n = qkv.len() / (3 * h);
    // Each sequence's keys transposed in place of its rows: `[h, len]` at `row0 * h`.
    let kt = sized(kt, h * n);
    let kt_rows = OutRows::new(kt, h);
    hearth_quant::pool::run(spans.len(), |i| {
        let (row0, len) = spans[i];
        let rows = &qkv[row0 * 3 * h..(row0 + len) * 3 * h];
        kt_rows.with(row0, len, |seq_kt| {
            // 16 keys at a time, so each write is a run of 16 values.
            for j0 in (0..len).step_by(16) {
                let keys = (len - j0).min(16);
                for c in 0..h {
                    let dst = &mut seq_kt[c * len + j0..][..keys];
                    for (jj, d) in dst.iter_mut().enumerate() {
                        *d = rows[(j0 + jj) * 3 * h + h + c];
                    }
                }
            }
        })
    });
    // (first row, rows) of each block; blocks never straddle two sequences.
    let mut blocks = Vec::new();
    for &(row0, len) in spans {
        for b0 in (0..len).step_by(BLOCK) {
            blocks.push((row0, len, b0, (len - b0).min(BLOCK)));
        }
    }
    let kt = &kt[..];
    let attend = hearth_quant::dispatch::kernels().attend_rows;
    let out_rows = OutRows::new(out, h);
    hearth_quant::pool::run(blocks.len(), |b| {
        let (row0, len, b0, rows) = blocks[b];
        let first = row0 + b0;
        let args = AttendRows {
            q: &qkv[first * 3 * h..(first + rows) * 3 * h],
            stride: 3 * h,
            kt: &kt[row0 * h..(row0 + len) * h],
            kt_stride: len,
            v: &qkv[row0 * 3 * h + 2 * h..(row0 + len) * 3 * h],
            len,
            heads,
            head_dim,
            scale,
        };
        out_rows.with(first, rows, |o| attend(&args, o));
    });
}
