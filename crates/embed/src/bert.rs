//! The BERT encoder (Hugging Face `BertModel`): token + position + token-type embeddings,
//! then post-LayerNorm blocks of bidirectional self-attention and a GELU feed-forward.
//!
//! Several sequences run together without padding: their rows are concatenated for the
//! matrix products and attention stays within each sequence, so no work goes to pad tokens.

use hearth_quant::{Activations, Blocks, GgmlType, QMatrix};

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
    w: Vec<f32>,
    b: Vec<f32>,
    rows: usize,
    cols: usize,
}

impl Linear {
    fn forward(&self, x: &[f32], y: &mut [f32], acts: &mut Activations, mm: &mut Vec<f32>) {
        let m = QMatrix {
            ty: GgmlType::F32,
            rows: self.rows,
            cols: self.cols,
            blocks: Blocks::F32(&self.w),
        };
        acts.quantize(m.act_type(), x, self.cols);
        m.matmul(acts, y, mm);
        for row in y.chunks_exact_mut(self.rows) {
            for (v, b) in row.iter_mut().zip(&self.b) {
                *v += b;
            }
        }
    }
}

pub struct LayerNorm {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl LayerNorm {
    /// In place, row by row (`dim` values each).
    fn forward(&self, x: &mut [f32], eps: f32) {
        let dim = self.w.len();
        for row in x.chunks_exact_mut(dim) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
            let var = row
                .iter()
                .map(|&v| (v as f64 - mean) * (v as f64 - mean))
                .sum::<f64>()
                / dim as f64;
            let inv = 1.0 / (var + eps as f64).sqrt();
            for ((v, w), b) in row.iter_mut().zip(&self.w).zip(&self.b) {
                *v = ((*v as f64 - mean) * inv) as f32 * w + b;
            }
        }
    }
}

pub struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
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
}

/// The exact (erf) GELU of BERT's `hidden_act: "gelu"`.
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * std::f32::consts::FRAC_1_SQRT_2))
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
        let mut linear = |name: &str, rows: usize, cols: usize| -> Result<Linear> {
            Ok(Linear {
                w: tensor(&format!("{name}.weight"), &[rows, cols])?,
                b: tensor(&format!("{name}.bias"), &[rows])?,
                rows,
                cols,
            })
        };
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = format!("encoder.layer.{i}");
            let query = linear(&format!("{p}.attention.self.query"), h, h)?;
            let key = linear(&format!("{p}.attention.self.key"), h, h)?;
            let value = linear(&format!("{p}.attention.self.value"), h, h)?;
            let attn_out = linear(&format!("{p}.attention.output.dense"), h, h)?;
            let ffn_up = linear(&format!("{p}.intermediate.dense"), ff, h)?;
            let ffn_down = linear(&format!("{p}.output.dense"), h, ff)?;
            layers.push((p, query, key, value, attn_out, ffn_up, ffn_down));
        }
        let mut norm = |name: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                w: tensor(&format!("{name}.weight"), &[h])?,
                b: tensor(&format!("{name}.bias"), &[h])?,
            })
        };
        let mut built = Vec::with_capacity(layers.len());
        for (p, query, key, value, attn_out, ffn_up, ffn_down) in layers {
            built.push(Layer {
                query,
                key,
                value,
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
        self.embed_norm.forward(&mut x, c.eps);

        let (mut q, mut k, mut v, mut attn, mut proj) = (
            vec![0f32; n * h],
            vec![0f32; n * h],
            vec![0f32; n * h],
            vec![0f32; n * h],
            vec![0f32; n * h],
        );
        let mut up = vec![0f32; n * c.intermediate];
        let (mut acts, mut mm) = (Activations::default(), Vec::new());
        let head_dim = h / c.heads;
        let scale = 1.0 / (head_dim as f32).sqrt();
        for layer in &self.layers {
            // Self-attention within each sequence: attn = softmax(q kᵀ / √d) v per head.
            layer.query.forward(&x, &mut q, &mut acts, &mut mm);
            layer.key.forward(&x, &mut k, &mut acts, &mut mm);
            layer.value.forward(&x, &mut v, &mut acts, &mut mm);
            attention(&q, &k, &v, &spans, c.heads, head_dim, scale, &mut attn);
            // x = LayerNorm(x + attn Woᵀ)
            layer.attn_out.forward(&attn, &mut proj, &mut acts, &mut mm);
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
            layer.attn_norm.forward(&mut x, c.eps);
            // x = LayerNorm(x + gelu(x W1ᵀ) W2ᵀ)
            layer.ffn_up.forward(&x, &mut up, &mut acts, &mut mm);
            hearth_quant::pool::for_each_chunk(&mut up, 4096, |_, part| {
                part.iter_mut().for_each(|u| *u = gelu(*u))
            });
            layer.ffn_down.forward(&up, &mut proj, &mut acts, &mut mm);
            x.iter_mut().zip(&proj).for_each(|(a, b)| *a += b);
            layer.ffn_norm.forward(&mut x, c.eps);
        }
        Ok(x)
    }
}

/// Bidirectional attention for every (sequence, token, head), in parallel over rows.
#[allow(clippy::too_many_arguments)]
fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    spans: &[(usize, usize)],
    heads: usize,
    head_dim: usize,
    scale: f32,
    out: &mut [f32],
) {
    let h = heads * head_dim;
    // Which sequence each row belongs to.
    let mut seq_of = Vec::with_capacity(out.len() / h);
    for &(row0, len) in spans {
        seq_of.extend(std::iter::repeat_n((row0, len), len));
    }
    let dot = hearth_quant::dispatch::kernels().dot_f32;
    hearth_quant::pool::for_each_chunk(out, h, |row, out_row| {
        let (row0, len) = seq_of[row];
        let mut scores = vec![0f32; len];
        for hd in 0..heads {
            let qh = &q[row * h + hd * head_dim..][..head_dim];
            for (j, s) in scores.iter_mut().enumerate() {
                let kh = &k[(row0 + j) * h + hd * head_dim..][..head_dim];
                *s = dot(qh, kh) * scale;
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let inv = 1.0 / sum;
            let o = &mut out_row[hd * head_dim..(hd + 1) * head_dim];
            o.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let (p, vh) = (p * inv, &v[(row0 + j) * h + hd * head_dim..][..head_dim]);
                for (a, b) in o.iter_mut().zip(vh) {
                    *a += p * b;
                }
            }
        }
    });
}
