//! Embedding endpoints: OpenAI `POST /v1/embeddings`, Ollama `POST /api/embed` and the
//! legacy `POST /api/embeddings`. A batcher thread per model gathers the texts of every
//! request waiting at that moment into one unpadded forward pass.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::Json;
use base64::Engine;
use hearth_embed::Embedder;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::error::{Api, ApiError, Kind};
use crate::generate::parse_body;
use crate::registry::ServedEncoder;
use crate::AppState;

/// Most texts in one request (OpenAI's limit).
const MAX_INPUTS: usize = 2048;
/// Most sequences in one forward pass.
const MAX_BATCH: usize = 64;

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, String>>;

pub struct Batcher {
    tx: SyncSender<(Vec<Vec<u32>>, Reply)>,
}

impl Batcher {
    pub fn start(embedder: Arc<Embedder>) -> Self {
        let (tx, rx) = sync_channel(256);
        std::thread::Builder::new()
            .name("hearth-embed".into())
            .spawn(move || run(embedder, rx))
            .expect("spawn the embedding thread");
        Self { tx }
    }
}

fn run(embedder: Arc<Embedder>, rx: Receiver<(Vec<Vec<u32>>, Reply)>) {
    while let Ok(first) = rx.recv() {
        // Everything already waiting joins this pass.
        let mut jobs = vec![first];
        let mut n = jobs[0].0.len();
        while n < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => {
                    n += job.0.len();
                    jobs.push(job);
                }
                Err(_) => break,
            }
        }
        let mut all: Vec<Vec<u32>> = Vec::with_capacity(n);
        for (seqs, reply) in &jobs {
            if !reply.is_closed() {
                all.extend(seqs.iter().cloned());
            }
        }
        let mut vectors = Vec::with_capacity(all.len());
        let mut failure = None;
        for chunk in all.chunks(MAX_BATCH) {
            match embedder.embed_tokens(chunk) {
                Ok(v) => vectors.extend(v),
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        let mut vectors = vectors.into_iter();
        for (seqs, reply) in jobs {
            if reply.is_closed() {
                continue; // the client left; its texts were skipped
            }
            let answer = match &failure {
                Some(e) => Err(e.clone()),
                None => Ok(vectors.by_ref().take(seqs.len()).collect()),
            };
            let _ = reply.send(answer);
        }
    }
}

/// Tokenized inputs of one request.
struct Inputs {
    seqs: Vec<Vec<u32>>,
    tokens: usize,
    truncated: usize,
}

fn tokenize(
    api: Api,
    model: &Embedder,
    texts: &[String],
    allow_truncation: bool,
) -> Result<Inputs, ApiError> {
    if texts.is_empty() {
        return Err(ApiError::param(api, "input", "input must not be empty"));
    }
    if texts.len() > MAX_INPUTS {
        return Err(ApiError::param(
            api,
            "input",
            format!("at most {MAX_INPUTS} inputs per request"),
        ));
    }
    let mut inputs = Inputs {
        seqs: Vec::with_capacity(texts.len()),
        tokens: 0,
        truncated: 0,
    };
    for t in texts {
        let (ids, truncated) = model
            .tokenize(t)
            .map_err(|e| ApiError::param(api, "input", e.to_string()))?;
        if truncated && !allow_truncation {
            return Err(ApiError::param(
                api,
                "input",
                format!(
                    "an input is longer than the model's {} tokens and truncate is false",
                    model.max_tokens
                ),
            ));
        }
        inputs.tokens += ids.len();
        inputs.truncated += usize::from(truncated);
        inputs.seqs.push(ids);
    }
    Ok(inputs)
}

async fn run_batch(
    api: Api,
    served: &ServedEncoder,
    seqs: Vec<Vec<u32>>,
) -> Result<Vec<Vec<f32>>, ApiError> {
    let (tx, rx) = oneshot::channel();
    served
        .batcher
        .tx
        .try_send((seqs, tx))
        .map_err(|e| match e {
            TrySendError::Full(_) => ApiError::new(
                api,
                Kind::Busy,
                "the embedding queue is full; retry shortly",
            ),
            TrySendError::Disconnected(_) => {
                ApiError::new(api, Kind::Unavailable, "the embedding worker has stopped")
            }
        })?;
    rx.await
        .map_err(|_| {
            ApiError::new(
                api,
                Kind::Internal,
                "the embedding worker dropped the request",
            )
        })?
        .map_err(|e| ApiError::bad(api, e))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OpenAiInput {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
struct OpenAiRequest {
    #[serde(default)]
    model: String,
    input: OpenAiInput,
    #[serde(default)]
    encoding_format: Option<String>,
    dimensions: Option<i64>,
}

pub async fn openai(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let api = Api::OpenAi;
    let req: OpenAiRequest = parse_body(api, body)?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::param(
                api,
                "encoding_format",
                format!("{other:?}: float or base64"),
            ))
        }
    };
    let served = state.registry.encoder(api, &req.model).await?;
    let model = &served.embedder;
    if let Some(d) = req.dimensions.filter(|&d| d != model.dim() as i64) {
        return Err(ApiError::param(
            api,
            "dimensions",
            format!("this model gives {} dimensions, not {d}", model.dim()),
        ));
    }
    let inputs = match req.input {
        OpenAiInput::One(t) => tokenize(api, model, &[t], true)?,
        OpenAiInput::Many(v) => tokenize(api, model, &v, true)?,
        OpenAiInput::Tokens(ids) => token_inputs(api, model, vec![ids])?,
        OpenAiInput::TokenLists(lists) => token_inputs(api, model, lists)?,
    };
    let tokens = inputs.tokens;
    let truncated = inputs.truncated;
    let vectors = run_batch(api, &served, inputs.seqs).await?;
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({ "object": "embedding", "index": i, "embedding": embedding })
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": served.name,
        // `truncated_inputs`: how many inputs were cut to the model's maximum length.
        "usage": { "prompt_tokens": tokens, "total_tokens": tokens, "truncated_inputs": truncated },
    })))
}

/// Pre-tokenized OpenAI input, checked against the vocabulary and cut like text would be.
fn token_inputs(api: Api, model: &Embedder, lists: Vec<Vec<u32>>) -> Result<Inputs, ApiError> {
    if lists.is_empty() || lists.iter().any(Vec::is_empty) {
        return Err(ApiError::param(
            api,
            "input",
            "token inputs must not be empty",
        ));
    }
    if lists.len() > MAX_INPUTS {
        return Err(ApiError::param(
            api,
            "input",
            format!("at most {MAX_INPUTS} inputs per request"),
        ));
    }
    let vocab = model.bert.config.vocab;
    let mut inputs = Inputs {
        seqs: Vec::new(),
        tokens: 0,
        truncated: 0,
    };
    for mut ids in lists {
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(ApiError::param(
                api,
                "input",
                format!("token id {bad} is outside the vocabulary of {vocab}"),
            ));
        }
        if ids.len() > model.max_tokens {
            ids.truncate(model.max_tokens);
            inputs.truncated += 1;
        }
        inputs.tokens += ids.len();
        inputs.seqs.push(ids);
    }
    Ok(inputs)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OllamaInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct OllamaEmbed {
    #[serde(default)]
    model: String,
    input: OllamaInput,
    truncate: Option<bool>,
}

pub async fn ollama_embed(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let api = Api::Ollama;
    let received = Instant::now();
    let req: OllamaEmbed = parse_body(api, body)?;
    let served = state.registry.encoder(api, &req.model).await?;
    let load = received.elapsed();
    let texts = match req.input {
        OllamaInput::One(t) => vec![t],
        OllamaInput::Many(v) => v,
    };
    let inputs = tokenize(api, &served.embedder, &texts, req.truncate.unwrap_or(true))?;
    let tokens = inputs.tokens;
    let vectors = run_batch(api, &served, inputs.seqs).await?;
    Ok(Json(json!({
        "model": served.name,
        "embeddings": vectors,
        "total_duration": nanos(received.elapsed()),
        "load_duration": nanos(load),
        "prompt_eval_count": tokens,
    })))
}

#[derive(Deserialize)]
struct OllamaLegacy {
    #[serde(default)]
    model: String,
    #[serde(default)]
    prompt: String,
}

pub async fn ollama_embeddings(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let api = Api::Ollama;
    let req: OllamaLegacy = parse_body(api, body)?;
    let served = state.registry.encoder(api, &req.model).await?;
    let inputs = tokenize(api, &served.embedder, &[req.prompt], true)?;
    let mut vectors = run_batch(api, &served, inputs.seqs).await?;
    Ok(Json(
        json!({ "embedding": vectors.pop().unwrap_or_default() }),
    ))
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}
