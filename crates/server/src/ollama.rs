//! Ollama-compatible endpoints: `/api/generate`, `/api/chat` (NDJSON streams by default),
//! `/api/tags`, `/api/show`, `/api/ps`, `/api/version`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hearth_engine::constraint::{Constraint, GrammarSpec};
use hearth_engine::{Event, FinishReason, Summary};
use hearth_tokenizer::template::Message;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Api, ApiError, Kind};
use crate::generate::{self, body_stream, parse_body, Knobs, Render, Stop};
use crate::registry::Served;
use crate::tools;
use crate::AppState;

const API: Api = Api::Ollama;

/// `options`; unknown ones (num_gpu, mirostat…) are ignored as Ollama ignores what a
/// runner does not use.
#[derive(Deserialize, Default)]
struct Options {
    temperature: Option<f64>,
    top_k: Option<i64>,
    top_p: Option<f64>,
    min_p: Option<f64>,
    repeat_penalty: Option<f64>,
    repeat_last_n: Option<i64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    seed: Option<i64>,
    num_predict: Option<i64>,
    num_ctx: Option<i64>,
    stop: Option<Stop>,
}

impl Options {
    fn knobs(&self) -> Result<Knobs, ApiError> {
        if let Some(n) = self.num_ctx.filter(|&n| n <= 0) {
            return Err(ApiError::bad(
                API,
                format!("num_ctx must be positive, not {n}"),
            ));
        }
        Ok(Knobs {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            // -1 (and -2, "fill the context"): no limit but the context.
            max_tokens: self.num_predict,
            stop: Stop::strings(&self.stop),
            num_ctx: self.num_ctx,
        })
    }
}

#[derive(Deserialize)]
struct GenerateRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    prompt: String,
    system: Option<String>,
    #[serde(default)]
    raw: bool,
    stream: Option<bool>,
    #[serde(default)]
    options: Option<Options>,
    format: Option<Value>,
    images: Option<Vec<Value>>,
    suffix: Option<String>,
    template: Option<String>,
    /// Ollama's thinking switch: the template's `enable_thinking` (Qwen3).
    think: Option<bool>,
}

#[derive(Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: String,
    images: Option<Vec<Value>>,
    /// An assistant turn's calls: `[{function: {name, arguments (an object)}}]`.
    tool_calls: Option<Vec<Value>>,
    /// A `tool` turn: which tool answered.
    tool_name: Option<String>,
}

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    messages: Vec<ChatMessage>,
    stream: Option<bool>,
    #[serde(default)]
    options: Option<Options>,
    format: Option<Value>,
    tools: Option<Value>,
    /// hearth's extension: OpenAI's `tool_choice` (`auto` when absent, as Ollama behaves).
    tool_choice: Option<Value>,
    think: Option<bool>,
}

/// Ollama's `think` as the template variable that templates read (`enable_thinking`).
fn think_kwargs(think: Option<bool>) -> hearth_tokenizer::template::Kwargs {
    think
        .map(|t| [("enable_thinking".to_string(), Value::Bool(t))].into())
        .unwrap_or_default()
}

fn not_supported(what: &str) -> ApiError {
    ApiError::bad(API, format!("{what} is not supported yet"))
}

/// `format`: `"json"` or a JSON schema object (none, null or `""`: free text).
fn check_format(format: &Option<Value>) -> Result<Option<GrammarSpec>, ApiError> {
    match format {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) if s == "json" => Ok(Some(GrammarSpec::JsonObject)),
        Some(schema @ Value::Object(_)) => Ok(Some(GrammarSpec::JsonSchema(schema.clone()))),
        Some(other) => Err(ApiError::bad(
            API,
            format!("format must be \"json\" or a JSON schema object, not {other}"),
        )),
    }
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u64::MAX as u128) as u64
}

fn done_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

/// The closing object's timing and count fields.
fn final_fields(s: &Summary, received: Instant, load: Duration) -> Value {
    json!({
        "done": true,
        "done_reason": done_reason(s.finish),
        "total_duration": nanos(received.elapsed()),
        "load_duration": nanos(load),
        "prompt_eval_count": s.prompt_tokens - s.prompt_cached,
        "prompt_eval_duration": nanos(s.prompt_time),
        "eval_count": s.completion_tokens,
        "eval_duration": nanos(s.generation_time),
    })
}

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Value::Object(b)) = (a.as_object_mut(), b) {
        a.extend(b);
    }
    a
}

struct NdjsonRender {
    chat: bool,
    model: String,
    received: Instant,
    load: Duration,
    /// Set when the chat offers tools: text is split from tool calls as it streams.
    tools: Option<tools::StreamSplit>,
}

/// Ollama's `tool_calls` (`arguments` as an object).
fn ollama_tool_calls(calls: &[tools::Call]) -> Value {
    calls
        .iter()
        .map(|c| json!({"function": {"name": c.name, "arguments": c.arguments}}))
        .collect()
}

impl NdjsonRender {
    fn piece(&self, text: &str) -> Value {
        if self.chat {
            json!({
                "model": self.model,
                "created_at": now_rfc3339(),
                "message": { "role": "assistant", "content": text },
                "done": false,
            })
        } else {
            json!({
                "model": self.model,
                "created_at": now_rfc3339(),
                "response": text,
                "done": false,
            })
        }
    }
}

impl Render for NdjsonRender {
    fn event(&mut self, event: Event) -> (Vec<String>, bool) {
        match event {
            Event::Text(t) => {
                let t = tools::StreamSplit::visible(&mut self.tools, t);
                if t.is_empty() {
                    return (Vec::new(), false);
                }
                (vec![format!("{}\n", self.piece(&t))], false)
            }
            Event::Done(s) => {
                let mut out = Vec::new();
                if let Some((rest, calls)) = self.tools.as_mut().map(|split| split.finish()) {
                    let mut piece = self.piece(&rest);
                    if !calls.is_empty() {
                        piece["message"]["tool_calls"] = ollama_tool_calls(&calls);
                    }
                    if !rest.is_empty() || !calls.is_empty() {
                        out.push(format!("{piece}\n"));
                    }
                }
                let last = merge(self.piece(""), final_fields(&s, self.received, self.load));
                out.push(format!("{last}\n"));
                (out, true)
            }
            Event::Error(e) => (vec![format!("{}\n", json!({ "error": e }))], true),
        }
    }
}

/// The grammar a request's output must follow: its `format`, or its tools' calls.
async fn output_constraint(
    served: &Arc<Served>,
    format: Option<GrammarSpec>,
    tools: Option<&tools::Tools>,
) -> Result<Option<Constraint>, ApiError> {
    if let Some(spec) = format {
        return Ok(Some(
            generate::constrain(API, served, spec, "format").await?,
        ));
    }
    match tools {
        Some(t) => Ok(Some(generate::tool_constraint(API, served, t).await?)),
        None => Ok(None),
    }
}

async fn respond(
    state: &AppState,
    served: Arc<Served>,
    prompt: Vec<u32>,
    knobs: Knobs,
    constraint: Option<Constraint>,
    stream: bool,
    render: NdjsonRender,
) -> Result<Response, ApiError> {
    let mut prepared = generate::prepare(API, &served, prompt, &knobs)?;
    prepared.constraint = constraint;
    let generation = generate::submit(API, state, served.clone(), prepared)?;
    if stream {
        let body = Body::from_stream(body_stream(generation, render));
        return Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response());
    }
    let (text, summary) = generation.collect(API).await?;
    let mut piece = render.piece(&text);
    if let Some(split) = &render.tools {
        let (content, calls) = split.syntax().split(&text);
        if !calls.is_empty() {
            piece = render.piece(&content);
            piece["message"]["tool_calls"] = ollama_tool_calls(&calls);
        }
    }
    let whole = merge(piece, final_fields(&summary, render.received, render.load));
    Ok(Json(whole).into_response())
}

/// Ollama answers a request without a prompt by loading the model.
fn loaded_reply(served: &Served, chat: bool, load: Duration, received: Instant) -> Response {
    let mut v = json!({
        "model": served.name,
        "created_at": now_rfc3339(),
        "done": true,
        "done_reason": "load",
        "total_duration": nanos(received.elapsed()),
        "load_duration": nanos(load),
    });
    if chat {
        v["message"] = json!({ "role": "assistant", "content": "" });
    } else {
        v["response"] = json!("");
    }
    Json(v).into_response()
}

pub async fn generate(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let req: GenerateRequest = parse_body(API, body)?;
    let format = check_format(&req.format)?;
    if req.images.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(not_supported("images"));
    }
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(not_supported("suffix (fill-in-the-middle)"));
    }
    if req.template.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(not_supported("a custom template"));
    }
    let knobs = req.options.unwrap_or_default().knobs()?;
    let served = state.registry.get(API, &req.model).await?;
    let load = received.elapsed();
    if req.prompt.is_empty() {
        return Ok(loaded_reply(&served, false, load, received));
    }
    let prompt = if req.raw {
        served.loaded.text_tokens(&req.prompt)
    } else {
        let mut msgs = Vec::new();
        if let Some(system) = &req.system {
            msgs.push(Message::new("system", system));
        }
        msgs.push(Message::new("user", &req.prompt));
        served
            .loaded
            .chat_tokens_with(&msgs, &think_kwargs(req.think))
            .map_err(|e| ApiError::bad(API, e.to_string()))?
    };
    let stream = req.stream.unwrap_or(true);
    let render = NdjsonRender {
        chat: false,
        model: served.name.clone(),
        received,
        load,
        tools: None,
    };
    let constraint = output_constraint(&served, format, None).await?;
    respond(&state, served, prompt, knobs, constraint, stream, render).await
}

pub async fn chat(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let received = Instant::now();
    let req: ChatRequest = parse_body(API, body)?;
    let format = check_format(&req.format)?;
    let mut tools = tools::Tools::parse(API, &req.tools, &req.tool_choice, None)?;
    let knobs = req.options.unwrap_or_default().knobs()?;
    let served = state.registry.get(API, &req.model).await?;
    let load = received.elapsed();
    if req.messages.is_empty() {
        return Ok(loaded_reply(&served, true, load, received));
    }
    let mut msgs = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        if m.images.as_ref().is_some_and(|i| !i.is_empty()) {
            return Err(not_supported("images"));
        }
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(ApiError::bad(API, format!("unknown role {:?}", m.role)));
        }
        let mut message = Message::new(&m.role, &m.content);
        message.tool_calls = m.tool_calls.clone().map(Value::Array);
        message.name = m.tool_name.clone();
        msgs.push(message);
    }
    let mut kwargs = think_kwargs(req.think);
    if let Some(t) = &mut tools {
        if format.is_some() {
            return Err(ApiError::bad(API, "format and tools cannot be combined"));
        }
        crate::openai::check_tools(API, &served, &None, t)?;
        kwargs.insert("tools".into(), t.raw.clone());
    }
    let prompt = served
        .loaded
        .chat_tokens_with(&msgs, &kwargs)
        .map_err(|e| ApiError::bad(API, e.to_string()))?;
    let stream = req.stream.unwrap_or(true);
    let render = NdjsonRender {
        chat: true,
        model: served.name.clone(),
        received,
        load,
        tools: tools.as_ref().map(|t| tools::StreamSplit::new(t.syntax)),
    };
    let constraint = output_constraint(&served, format, tools.as_ref()).await?;
    respond(&state, served, prompt, knobs, constraint, stream, render).await
}

/// Ollama's `details` of a model file.
fn details(path: &Path) -> Value {
    let Ok(g) = hearth_gguf::Gguf::open(path) else {
        return json!({ "format": "gguf" });
    };
    let arch = g
        .get_str("general.architecture")
        .ok()
        .flatten()
        .unwrap_or("")
        .to_string();
    let params: u64 = g.tensors.iter().map(|t| t.n_elements).sum();
    let size = if params >= 1_000_000_000 {
        format!("{:.1}B", params as f64 / 1e9)
    } else {
        format!("{:.0}M", params as f64 / 1e6)
    };
    let quant = g.file_type().unwrap_or("unknown");
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch],
        "parameter_size": size,
        "quantization_level": quant,
    })
}

fn modified_at(unix: u64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(unix);
    humantime::format_rfc3339_seconds(t).to_string()
}

pub async fn tags(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let entries = state.registry.list();
    let encoders = state.registry.encoders();
    let models = tokio::task::spawn_blocking(move || {
        let encoders = encoders.into_iter().map(|(name, dir)| {
            let weights = std::fs::metadata(dir.join("model.safetensors")).ok();
            let size = weights.as_ref().map_or(0, |m| m.len());
            let modified = weights.as_ref().map_or(0, hearth_store::mtime);
            let dtype = hearth_embed::weights_dtype(&dir).unwrap_or_else(|_| "unknown".into());
            json!({
                "name": name,
                "model": name,
                "modified_at": modified_at(modified),
                "size": size,
                "digest": "",
                "details": { "parent_model": "", "format": "safetensors", "family": "bert",
                             "families": ["bert"], "parameter_size": "", "quantization_level": dtype },
            })
        });
        entries
            .into_iter()
            .map(|e| {
                json!({
                    "name": e.name,
                    "model": e.name,
                    "modified_at": modified_at(e.modified),
                    "size": e.size,
                    "digest": e.digest.as_deref().and_then(|d| d.strip_prefix("sha256:")).unwrap_or(""),
                    "details": details(&e.path),
                })
            })
            .chain(encoders)
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| ApiError::new(API, Kind::Internal, e.to_string()))?;
    Ok(Json(json!({ "models": models })))
}

#[derive(Deserialize)]
struct ShowRequest {
    #[serde(default)]
    model: String,
    #[serde(default)]
    name: String,
}

pub async fn show(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let req: ShowRequest = parse_body(API, body)?;
    let name = if req.model.is_empty() {
        req.name
    } else {
        req.model
    };
    let served = state.registry.get(API, &name).await?;
    let c = &served.loaded.model.config;
    let arch = served.loaded.arch.clone();
    let path = served.path.clone();
    let license = hearth_gguf::Gguf::open(&path)
        .ok()
        .and_then(|g| {
            g.get_str("general.license")
                .ok()
                .flatten()
                .map(str::to_string)
        })
        .unwrap_or_default();
    let params: u64 = served
        .loaded
        .model
        .gguf
        .tensors
        .iter()
        .map(|t| t.n_elements)
        .sum();
    Ok(Json(json!({
        "license": license,
        "modelfile": "",
        "parameters": "",
        "template": served.loaded.template.source(),
        "details": details(&path),
        "model_info": {
            "general.architecture": arch,
            "general.parameter_count": params,
            format!("{arch}.context_length"): served.scheduler.config.n_ctx,
            format!("{arch}.embedding_length"): c.n_embd,
            format!("{arch}.block_count"): c.n_layer,
            format!("{arch}.attention.head_count"): c.n_head,
            format!("{arch}.attention.head_count_kv"): c.n_kv_head,
        },
        "capabilities": ["completion"],
    })))
}

pub async fn ps(State(state): State<AppState>) -> Json<Value> {
    let models: Vec<Value> = state
        .registry
        .running()
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "model": s.name,
                "size": s.size,
                "digest": "",
                "details": details(&s.path),
                "expires_at": "9999-12-31T23:59:59Z",
                "size_vram": 0,
            })
        })
        .collect();
    Json(json!({ "models": models }))
}

pub async fn version() -> Json<Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}
