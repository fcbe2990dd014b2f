//! OpenAI-compatible endpoints: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.

use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hearth_engine::constraint::GrammarSpec;
use hearth_engine::{Event, FinishReason, Summary};
use hearth_tokenizer::template::Message;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Api, ApiError};
use crate::generate::{self, body_stream, parse_body, Knobs, Render, Stop};
use crate::tools;
use crate::AppState;

const API: Api = Api::OpenAi;
const FINGERPRINT: &str = concat!("hearth-", env!("CARGO_PKG_VERSION"));

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    /// An assistant turn's calls: `[{id, type, function: {name, arguments (a JSON string)}}]`.
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
    /// A `tool` turn: the call it answers.
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields of both completion requests; unknown fields are ignored.
#[derive(Deserialize, Default)]
struct Common {
    #[serde(default)]
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    repeat_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<i64>,
    logprobs: Option<Value>,
    response_format: Option<Value>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    echo: Option<bool>,
    /// llama.cpp's server extension: the output follows this grammar (GBNF, or Lark).
    grammar: Option<String>,
}

impl Common {
    /// Refuses what hearth does not do yet, rather than silently ignoring it.
    fn check(&self) -> Result<Knobs, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::param(API, "n", "only n=1 is supported"));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !matches!(v, Value::Null | Value::Bool(false)))
        {
            return Err(ApiError::param(
                API,
                "logprobs",
                "logprobs are not supported yet",
            ));
        }
        if self.echo == Some(true) {
            return Err(ApiError::param(API, "echo", "echo is not supported"));
        }
        let max_tokens = self.max_completion_tokens.or(self.max_tokens);
        if let Some(n) = max_tokens.filter(|&n| n < 0) {
            return Err(ApiError::param(
                API,
                "max_tokens",
                format!("max_tokens must be ≥ 0, not {n}"),
            ));
        }
        Ok(Knobs {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: None,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            seed: self.seed,
            max_tokens,
            stop: Stop::strings(&self.stop),
            num_ctx: None,
        })
    }
}

#[derive(Deserialize)]
struct ChatRequest {
    messages: Vec<InMessage>,
    /// Extra chat-template variables, as llama-server and vLLM take them
    /// (`{"enable_thinking": false}` for Qwen3).
    #[serde(default)]
    chat_template_kwargs: Option<hearth_tokenizer::template::Kwargs>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
}

fn new_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{:x}{n:06x}", generate::unix_now())
}

fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled => "length",
    }
}

fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": s.prompt_cached },
    })
}

fn messages(api_messages: &[InMessage]) -> Result<Vec<Message>, ApiError> {
    if api_messages.is_empty() {
        return Err(ApiError::param(
            API,
            "messages",
            "messages must not be empty",
        ));
    }
    api_messages
        .iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "developer" => "system",
                r @ ("system" | "user" | "assistant" | "tool") => r,
                other => {
                    return Err(ApiError::param(
                        API,
                        "messages",
                        format!("unknown role {other:?}"),
                    ))
                }
            };
            let content = match &m.content {
                None => String::new(),
                Some(Content::Text(t)) => t.clone(),
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ApiError::param(
                                    API,
                                    "messages",
                                    format!("content parts of type {kind:?} are not supported"),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            let mut message = Message::new(role, &content);
            if let Some(calls) = &m.tool_calls {
                message.tool_calls = Some(template_tool_calls(calls)?);
            }
            message.tool_call_id = m.tool_call_id.clone();
            message.name = m.name.clone();
            Ok(message)
        })
        .collect()
}

/// An assistant turn's calls as templates read them: `arguments` parsed from its JSON
/// string into an object (templates write it back with `tojson`).
fn template_tool_calls(calls: &[Value]) -> Result<Value, ApiError> {
    let mut out = Vec::with_capacity(calls.len());
    for call in calls {
        let mut call = call.clone();
        if let Some(args) = call.pointer_mut("/function/arguments") {
            if let Value::String(text) = args {
                *args = serde_json::from_str(text).map_err(|e| {
                    ApiError::param(
                        API,
                        "messages",
                        format!("tool_calls arguments are not JSON: {e}"),
                    )
                })?;
            }
        }
        out.push(call);
    }
    Ok(Value::Array(out))
}

/// OpenAI's `tool_calls` for calls read from the output (`arguments` as a JSON string).
fn openai_tool_calls(calls: &[tools::Call], with_index: bool) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({
                "id": new_id("call"),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments.to_string()},
            });
            if with_index {
                v["index"] = json!(i);
            }
            v
        })
        .collect()
}

fn sse_data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

/// `chat.completion.chunk` / `text_completion` streams.
struct SseRender {
    chat: bool,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    /// Set when the request offers tools: text is split from tool calls as it streams.
    tools: Option<tools::StreamSplit>,
}

impl SseRender {
    fn chunk(&self, choice: Value) -> Value {
        json!({
            "id": self.id,
            "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [choice],
        })
    }

    fn choice(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        if self.chat {
            let delta = match text {
                Some(t) => json!({ "content": t }),
                None => json!({}),
            };
            json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
        } else {
            json!({ "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish })
        }
    }
}

impl Render for SseRender {
    fn start(&mut self) -> Vec<String> {
        if !self.chat {
            return Vec::new();
        }
        let first = json!({
            "index": 0,
            "delta": { "role": "assistant", "content": "" },
            "logprobs": null,
            "finish_reason": null,
        });
        vec![sse_data(&self.chunk(first))]
    }

    fn event(&mut self, event: Event) -> (Vec<String>, bool) {
        match event {
            Event::Text(t) => {
                let t = tools::StreamSplit::visible(&mut self.tools, t);
                if t.is_empty() {
                    return (Vec::new(), false);
                }
                (
                    vec![sse_data(&self.chunk(self.choice(Some(&t), None)))],
                    false,
                )
            }
            Event::Done(s) => {
                let mut out = Vec::new();
                let mut finish = finish_reason(s.finish);
                if let Some((rest, calls)) = self.tools.as_mut().map(|split| split.finish()) {
                    if !rest.is_empty() {
                        out.push(sse_data(&self.chunk(self.choice(Some(&rest), None))));
                    }
                    if !calls.is_empty() {
                        finish = "tool_calls";
                        for call in openai_tool_calls(&calls, true) {
                            let delta = json!({ "index": 0, "delta": { "tool_calls": [call] },
                                                "logprobs": null, "finish_reason": null });
                            out.push(sse_data(&self.chunk(delta)));
                        }
                    }
                }
                out.push(sse_data(&self.chunk(self.choice(None, Some(finish)))));
                if self.include_usage {
                    let mut u = self.chunk(json!(null));
                    u["choices"] = json!([]);
                    u["usage"] = usage(&s);
                    out.push(sse_data(&u));
                }
                out.push("data: [DONE]\n\n".to_string());
                (out, true)
            }
            Event::Error(e) => (
                vec![
                    sse_data(&ApiError::bad(API, e).body()),
                    "data: [DONE]\n\n".to_string(),
                ],
                true,
            ),
        }
    }
}

fn sse_response(generation: generate::Generation, render: SseRender) -> Response {
    let body = Body::from_stream(body_stream(generation, render));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub async fn chat_completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: ChatRequest = parse_body(API, body)?;
    let knobs = req.common.check()?;
    let msgs = messages(&req.messages)?;
    let kwargs = req.chat_template_kwargs.unwrap_or_default();
    if kwargs.len() > 32 {
        return Err(ApiError::param(
            API,
            "chat_template_kwargs",
            "at most 32 template variables",
        ));
    }
    let mut tools = tools::Tools::parse(
        API,
        &req.common.tools,
        &req.common.tool_choice,
        req.common.parallel_tool_calls,
    )?;
    let served = state.registry.get(API, &req.common.model).await?;
    let mut kwargs = kwargs;
    if let Some(t) = &mut tools {
        check_tools(API, &served, &req.common.response_format, t)?;
        kwargs.insert("tools".into(), t.raw.clone());
    }
    let prompt = served
        .loaded
        .chat_tokens_with(&msgs, &kwargs)
        .map_err(|e| ApiError::param(API, "messages", e.to_string()))?;
    reply(&state, served, prompt, &knobs, &req.common, true, tools).await
}

/// Tools need a template that teaches the model a call syntax hearth reads (which `tools`
/// then follow), and do not combine with `response_format`.
pub fn check_tools(
    api: Api,
    served: &crate::registry::Served,
    response_format: &Option<Value>,
    tools: &mut tools::Tools,
) -> Result<(), ApiError> {
    let Some(syntax) = tools::Syntax::of_template(served.loaded.template.source()) else {
        return Err(ApiError::param(
            api,
            "tools",
            format!(
                "{}'s chat template has no tool-call syntax hearth knows (Hermes/Qwen <tool_call>, Llama 3.x JSON), so it cannot call tools",
                served.name
            ),
        ));
    };
    tools.syntax = syntax;
    if response_format
        .as_ref()
        .is_some_and(|f| f.get("type").and_then(Value::as_str).unwrap_or("text") != "text")
    {
        return Err(ApiError::param(
            api,
            "response_format",
            "response_format and tools cannot be combined",
        ));
    }
    Ok(())
}

/// `response_format`: `text` (or none), `json_object`, or `json_schema` with its schema.
fn response_format(format: &Option<Value>) -> Result<Option<GrammarSpec>, ApiError> {
    let bad = |msg: &str| ApiError::param(API, "response_format", msg.to_string());
    let Some(format) = format.as_ref().filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    let Some(kind) = format.get("type").and_then(Value::as_str) else {
        return Err(bad(
            "response_format needs a type: text, json_object or json_schema",
        ));
    };
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(GrammarSpec::JsonObject)),
        "json_schema" => {
            let Some(spec) = format.get("json_schema").filter(|v| v.is_object()) else {
                return Err(bad(
                    "response_format json_schema needs a json_schema object with a schema",
                ));
            };
            match spec.get("schema") {
                Some(schema @ (Value::Object(_) | Value::Bool(true))) => {
                    Ok(Some(GrammarSpec::JsonSchema(schema.clone())))
                }
                // OpenAI accepts a json_schema without a schema: any JSON object.
                None | Some(Value::Null) => Ok(Some(GrammarSpec::JsonObject)),
                Some(_) => Err(bad("json_schema.schema must be a JSON Schema object")),
            }
        }
        other => Err(bad(&format!(
            "unknown response_format type {other:?}: text, json_object or json_schema"
        ))),
    }
}

/// Runs the generation and answers with a stream or one object, chat or text completion.
async fn reply(
    state: &AppState,
    served: std::sync::Arc<crate::registry::Served>,
    prompt: Vec<u32>,
    knobs: &Knobs,
    common: &Common,
    chat: bool,
    tools: Option<tools::Tools>,
) -> Result<Response, ApiError> {
    let mut prepared = generate::prepare(API, &served, prompt, knobs)?;
    let format = response_format(&common.response_format)?;
    let grammar = common.grammar.as_ref().filter(|g| !g.is_empty());
    // Refused before anything is compiled.
    if grammar.is_some() && (format.is_some() || tools.is_some()) {
        return Err(ApiError::param(
            API,
            "grammar",
            "grammar cannot be combined with response_format or tools",
        ));
    }
    if let Some(spec) = format {
        prepared.constraint =
            Some(generate::constrain(API, &served, spec, "response_format").await?);
    }
    if let Some(grammar) = grammar {
        let spec = GrammarSpec::grammar(grammar.clone());
        prepared.constraint = Some(generate::constrain(API, &served, spec, "grammar").await?);
    }
    if let Some(t) = &tools {
        prepared.constraint = Some(generate::tool_constraint(API, &served, t).await?);
    }
    let generation = generate::submit(API, state, served.clone(), prepared)?;
    let id = new_id(if chat { "chatcmpl" } else { "cmpl" });
    let created = generate::unix_now();
    if common.stream {
        let render = SseRender {
            chat,
            id,
            model: served.name.clone(),
            created,
            include_usage: common
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            tools: tools.as_ref().map(|t| tools::StreamSplit::new(t.syntax)),
        };
        return Ok(sse_response(generation, render));
    }
    let (text, summary) = generation.collect(API).await?;
    let mut finish = finish_reason(summary.finish);
    let (object, choice) = if chat {
        let mut message = json!({ "role": "assistant", "content": text });
        if let Some(t) = &tools {
            let (content, calls) = t.syntax.split(&text);
            if !calls.is_empty() {
                message = json!({
                    "role": "assistant",
                    "content": if content.is_empty() { Value::Null } else { json!(content) },
                    "tool_calls": openai_tool_calls(&calls, false),
                });
                finish = "tool_calls";
            }
        }
        let choice =
            json!({ "index": 0, "message": message, "logprobs": null, "finish_reason": finish });
        ("chat.completion", choice)
    } else {
        let choice = json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish });
        ("text_completion", choice)
    };
    Ok(Json(json!({
        "id": id,
        "object": object,
        "created": created,
        "model": served.name,
        "system_fingerprint": FINGERPRINT,
        "choices": [choice],
        "usage": usage(&summary),
    }))
    .into_response())
}

pub async fn completions(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse_body(API, body)?;
    let knobs = req.common.check()?;
    if generate::asks_for_tools(&req.common.tools) {
        return Err(ApiError::param(
            API,
            "tools",
            "tools are for /v1/chat/completions",
        ));
    }
    let served = state.registry.get(API, &req.common.model).await?;
    let prompt = match req.prompt {
        Prompt::Text(t) => served.loaded.text_tokens(&t),
        Prompt::Texts(v) if v.len() == 1 => served.loaded.text_tokens(&v[0]),
        Prompt::Texts(_) => {
            return Err(ApiError::param(
                API,
                "prompt",
                "exactly one prompt per request is supported",
            ))
        }
        Prompt::Tokens(ids) => {
            let n_vocab = served.loaded.model.config.n_vocab;
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= n_vocab) {
                return Err(ApiError::param(
                    API,
                    "prompt",
                    format!("token id {bad} is outside the vocabulary of {n_vocab}"),
                ));
            }
            ids
        }
    };
    reply(&state, served, prompt, &knobs, &req.common, false, None).await
}

pub async fn models(State(state): State<AppState>) -> Json<Value> {
    let mut data: Vec<Value> = state
        .registry
        .list()
        .into_iter()
        .map(|e| {
            json!({
                "id": e.name,
                "object": "model",
                "created": e.modified,
                "owned_by": "local",
            })
        })
        .collect();
    data.extend(state.registry.encoders().into_iter().map(
        |(name, _)| json!({ "id": name, "object": "model", "created": 0, "owned_by": "local" }),
    ));
    Json(json!({ "object": "list", "data": data }))
}
