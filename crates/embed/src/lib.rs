//! Sentence embeddings from a Hugging Face sentence-transformers directory:
//! `config.json` (BERT shape), `model.safetensors` (mmap'd; header checked by the
//! `safetensors` crate, every tensor's dtype and shape checked here), `tokenizer.json`
//! (WordPiece via the `tokenizers` crate, truncated to the model's `max_seq_length` as
//! sentence-transformers does), `1_Pooling/config.json` (mean or CLS) and `modules.json`
//! (L2 normalization).

pub mod bert;

use std::path::{Path, PathBuf};

use bert::{Bert, BertConfig};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("{path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    #[error("bad model config: {0}")]
    Config(String),
    #[error("model.safetensors: {0}")]
    Weights(String),
    #[error("tokenizer.json: {0}")]
    Tokenizer(String),
    #[error("{0}")]
    Input(String),
}

pub type Result<T> = std::result::Result<T, EmbedError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EmbedError + '_ {
    move |cause| EmbedError::Io {
        path: path.display().to_string(),
        cause,
    }
}

#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: String,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    intermediate_size: usize,
    max_position_embeddings: usize,
    vocab_size: usize,
    #[serde(default = "default_type_vocab")]
    type_vocab_size: usize,
    #[serde(default = "default_eps")]
    layer_norm_eps: f64,
    #[serde(default = "default_act")]
    hidden_act: String,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

#[derive(Deserialize, Default)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type", default)]
    kind: String,
}

#[derive(Deserialize)]
struct SbertConfig {
    max_seq_length: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
}

#[derive(Debug, Clone)]
pub struct Embedding {
    pub vector: Vec<f32>,
    /// Tokens the model saw (after truncation), including [CLS] and [SEP].
    pub tokens: usize,
    /// The text was longer than the model's maximum and was cut.
    pub truncated: bool,
}

pub struct Embedder {
    pub bert: Bert,
    tokenizer: tokenizers::Tokenizer,
    pub max_tokens: usize,
    pub pooling: Pooling,
    pub normalize: bool,
    pub dir: PathBuf,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| EmbedError::Config(format!("{}: {e}", path.display())))
}

/// Bounds on a hostile config (generous for BERT-style encoders).
fn check_config(c: &HfConfig) -> Result<BertConfig> {
    let bound = |name: &str, v: usize, max: usize| {
        if v == 0 || v > max {
            Err(EmbedError::Config(format!(
                "{name} = {v} (1 to {max} supported)"
            )))
        } else {
            Ok(v)
        }
    };
    if !c.model_type.is_empty() && c.model_type != "bert" {
        return Err(EmbedError::Config(format!(
            "model_type {:?}: only BERT encoders are supported",
            c.model_type
        )));
    }
    if c.hidden_act != "gelu" {
        return Err(EmbedError::Config(format!(
            "hidden_act {:?}: only \"gelu\" is supported",
            c.hidden_act
        )));
    }
    if !(c.layer_norm_eps.is_finite() && c.layer_norm_eps > 0.0 && c.layer_norm_eps < 1.0) {
        return Err(EmbedError::Config(format!(
            "layer_norm_eps {}",
            c.layer_norm_eps
        )));
    }
    Ok(BertConfig {
        hidden: bound("hidden_size", c.hidden_size, 8192)?,
        layers: bound("num_hidden_layers", c.num_hidden_layers, 128)?,
        heads: bound("num_attention_heads", c.num_attention_heads, 256)?,
        intermediate: bound("intermediate_size", c.intermediate_size, 65536)?,
        max_positions: bound("max_position_embeddings", c.max_position_embeddings, 16384)?,
        vocab: bound("vocab_size", c.vocab_size, 1 << 20)?,
        type_vocab: bound("type_vocab_size", c.type_vocab_size, 16)?,
        eps: c.layer_norm_eps as f32,
    })
}

/// A tensor's values as f32 (F32, F16 and BF16 stored little-endian).
fn to_f32(name: &str, view: &safetensors::tensor::TensorView) -> Result<Vec<f32>> {
    use safetensors::Dtype;
    let data = view.data();
    let out = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => {
            return Err(EmbedError::Weights(format!(
                "{name} has dtype {other:?}; F32, F16 or BF16 expected"
            )))
        }
    };
    Ok(out)
}

/// The encoder's weights from the bytes of a `model.safetensors` file (header checked by the
/// `safetensors` crate, every tensor's dtype and shape checked here).
pub fn bert_from_safetensors(config: BertConfig, bytes: &[u8]) -> Result<Bert> {
    let tensors = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| EmbedError::Weights(e.to_string()))?;
    Bert::load(config, |name, shape| {
        // Some exports prefix every name with the model type.
        let view = tensors
            .tensor(name)
            .or_else(|_| tensors.tensor(&format!("bert.{name}")))
            .map_err(|_| EmbedError::Weights(format!("missing tensor {name}")))?;
        if view.shape() != shape {
            return Err(EmbedError::Weights(format!(
                "{name} has shape {:?}, expected {shape:?}",
                view.shape()
            )));
        }
        to_f32(name, &view)
    })
}

impl Embedder {
    /// Opens a sentence-transformers directory.
    pub fn open(dir: &Path) -> Result<Self> {
        let hf: HfConfig = read_json(&dir.join("config.json"))?;
        let config = check_config(&hf)?;
        let weights_path = dir.join("model.safetensors");
        let file = std::fs::File::open(&weights_path).map_err(io_err(&weights_path))?;
        let bytes = hearth_gguf::Bytes::map(&file).map_err(io_err(&weights_path))?;
        let bert = bert_from_safetensors(config.clone(), &bytes)?;

        let pooling = match std::fs::metadata(dir.join("1_Pooling/config.json")) {
            Ok(_) => {
                let p: PoolingConfig = read_json(&dir.join("1_Pooling/config.json"))?;
                match (p.pooling_mode_mean_tokens, p.pooling_mode_cls_token) {
                    (true, false) => Pooling::Mean,
                    (false, true) => Pooling::Cls,
                    _ => {
                        return Err(EmbedError::Config(
                            "1_Pooling: only mean or CLS pooling is supported".into(),
                        ))
                    }
                }
            }
            Err(_) => Pooling::Mean,
        };
        let normalize = match std::fs::metadata(dir.join("modules.json")) {
            Ok(_) => {
                let modules: Vec<Module> = read_json(&dir.join("modules.json"))?;
                modules.iter().any(|m| m.kind.ends_with(".Normalize"))
            }
            Err(_) => false,
        };
        let max_tokens = match std::fs::metadata(dir.join("sentence_bert_config.json")) {
            Ok(_) => read_json::<SbertConfig>(&dir.join("sentence_bert_config.json"))?
                .max_seq_length
                .unwrap_or(config.max_positions),
            Err(_) => config.max_positions,
        }
        .clamp(2, config.max_positions);

        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        // One sequence per text: no padding; truncation to the model's length.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: max_tokens,
                ..Default::default()
            }))
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        if tokenizer.get_vocab_size(true) > config.vocab {
            return Err(EmbedError::Tokenizer(format!(
                "{} tokens, but the model has {} embeddings",
                tokenizer.get_vocab_size(true),
                config.vocab
            )));
        }
        Ok(Self {
            bert,
            tokenizer,
            max_tokens,
            pooling,
            normalize,
            dir: dir.to_path_buf(),
        })
    }

    pub fn dim(&self) -> usize {
        self.bert.config.hidden
    }

    /// Token ids of `text` as the model sees it, and whether it was truncated.
    pub fn tokenize(&self, text: &str) -> Result<(Vec<u32>, bool)> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EmbedError::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), !enc.get_overflowing().is_empty()))
    }

    /// Embeds pre-tokenized sequences in one pass (no padding).
    pub fn embed_tokens(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let hidden = self.bert.encode(&refs)?;
        let h = self.dim();
        let mut out = Vec::with_capacity(seqs.len());
        let mut row = 0;
        for s in seqs {
            let rows = &hidden[row * h..(row + s.len()) * h];
            let mut v = match self.pooling {
                Pooling::Cls => rows[..h].to_vec(),
                Pooling::Mean => {
                    let mut acc = vec![0f64; h];
                    for r in rows.chunks_exact(h) {
                        acc.iter_mut().zip(r).for_each(|(a, &x)| *a += x as f64);
                    }
                    acc.iter().map(|&a| (a / s.len() as f64) as f32).collect()
                }
            };
            if self.normalize {
                let norm = v
                    .iter()
                    .map(|&x| (x as f64) * (x as f64))
                    .sum::<f64>()
                    .sqrt();
                let scale = 1.0 / norm.max(1e-12);
                v.iter_mut().for_each(|x| *x = (*x as f64 * scale) as f32);
            }
            out.push(v);
            row += s.len();
        }
        Ok(out)
    }

    /// Embeds texts, `batch` sequences per forward pass.
    pub fn embed(&self, texts: &[&str], batch: usize) -> Result<Vec<Embedding>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(batch.max(1)) {
            let mut seqs = Vec::with_capacity(chunk.len());
            let mut flags = Vec::with_capacity(chunk.len());
            for t in chunk {
                let (ids, truncated) = self.tokenize(t)?;
                seqs.push(ids);
                flags.push(truncated);
            }
            for ((vector, ids), truncated) in
                self.embed_tokens(&seqs)?.into_iter().zip(&seqs).zip(flags)
            {
                out.push(Embedding {
                    vector,
                    tokens: ids.len(),
                    truncated,
                });
            }
        }
        Ok(out)
    }
}

/// Cosine similarity.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(1e-30)
}

/// The weights' dtype as Ollama reports a quantization (`F32`, `F16`, `BF16`): the dtype
/// holding most parameters in `dir/model.safetensors`, read from the header alone.
pub fn weights_dtype(dir: &Path) -> Result<String> {
    use std::io::Read;
    let path = dir.join("model.safetensors");
    let mut file = std::fs::File::open(&path).map_err(io_err(&path))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io_err(&path))?;
    let len = u64::from_le_bytes(len);
    // The same bound the safetensors crate puts on a header.
    if len > 100_000_000 {
        return Err(EmbedError::Weights(format!("header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).map_err(io_err(&path))?;
    let header: std::collections::BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| EmbedError::Weights(e.to_string()))?;
    let mut by_dtype: std::collections::BTreeMap<String, u64> = Default::default();
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
        let n: u64 = info
            .get("shape")
            .and_then(|s| s.as_array())
            .map_or(0, |dims| {
                dims.iter()
                    .map(|d| d.as_u64().unwrap_or(0))
                    .fold(1u64, u64::saturating_mul)
            });
        let count = by_dtype.entry(dtype.to_string()).or_default();
        *count = count.saturating_add(n);
    }
    by_dtype
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(dtype, _)| dtype)
        .ok_or_else(|| EmbedError::Weights("no tensors".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A safetensors file of just a header (the data is never read).
    fn header_only(dir: &Path, header: &str) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    }

    #[test]
    fn weights_dtype_is_the_dtype_of_most_parameters() {
        let dir = std::env::temp_dir().join(format!("hearth-dtype-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        header_only(
            &dir,
            r#"{"__metadata__":{"format":"pt"},
                "a":{"dtype":"F32","shape":[10],"data_offsets":[0,40]},
                "b":{"dtype":"F16","shape":[4,8],"data_offsets":[40,104]}}"#,
        );
        assert_eq!(weights_dtype(&dir).unwrap(), "F16");
        header_only(
            &dir,
            r#"{"a":{"dtype":"BF16","shape":[3],"data_offsets":[0,6]}}"#,
        );
        assert_eq!(weights_dtype(&dir).unwrap(), "BF16");
        header_only(&dir, "{not json");
        assert!(weights_dtype(&dir).is_err());
        std::fs::write(dir.join("model.safetensors"), u64::MAX.to_le_bytes()).unwrap();
        assert!(
            weights_dtype(&dir).is_err(),
            "an absurd header length is refused"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
