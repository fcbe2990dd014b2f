//! What both APIs share: request bodies parsed in the API's error shape, sampling knobs
//! checked and turned into [`SamplingParams`], jobs handed to a model's scheduler, and the
//! event stream watched for metrics.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use hearth_engine::constraint::{Constraint, GrammarSpec, Grammars};
use hearth_engine::scheduler::{EventSink, SubmitError};
use hearth_engine::{Event, Job, SamplingParams};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::{Api, ApiError, Kind};
use crate::registry::Served;
use crate::AppState;

/// The request body as `T`, or a 400/413 in the API's own shape.
pub fn parse_body<T: DeserializeOwned>(
    api: Api,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(api, Kind::TooLarge, "request body too large")
        } else {
            ApiError::bad(api, rejection.body_text())
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad(api, format!("invalid JSON body: {e}")))
}

/// `stop`: one string or a list, in both APIs.
#[derive(serde::Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn strings(stop: &Option<Stop>) -> Vec<String> {
        match stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
    }
}

/// Sampling and length settings as both APIs name them; `None` = the server default.
#[derive(Debug, Default, Clone)]
pub struct Knobs {
    pub temperature: Option<f64>,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    pub repeat_penalty: Option<f64>,
    pub repeat_last_n: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub seed: Option<i64>,
    /// Negative: no limit but the context.
    pub max_tokens: Option<i64>,
    pub stop: Vec<String>,
    /// Ollama's per-request context length (at most the server's).
    pub num_ctx: Option<i64>,
}

/// llama-server's defaults (what local users of llama.cpp expect), checked ranges.
pub fn sampling(api: Api, k: &Knobs) -> Result<SamplingParams, ApiError> {
    let d = SamplingParams::default();
    let range = |name: &str, v: Option<f64>, lo: f64, hi: f64, default: f32| match v {
        None => Ok(default),
        Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(x as f32),
        Some(x) => Err(ApiError::param(
            api,
            name,
            format!("{name} must be between {lo} and {hi}, not {x}"),
        )),
    };
    let seed = match k.seed {
        Some(s) => s as u64,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |t| t.as_nanos() as u64),
    };
    let top_k = match k.top_k {
        None => d.top_k,
        Some(v) if v >= 0 => v.min(1 << 20) as usize,
        Some(v) => {
            return Err(ApiError::param(
                api,
                "top_k",
                format!("top_k must be ≥ 0, not {v}"),
            ))
        }
    };
    let repeat_last_n = match k.repeat_last_n {
        None => d.repeat_last_n,
        Some(-1) => usize::MAX, // Ollama: the whole context
        Some(v) if v >= 0 => v as usize,
        Some(v) => {
            return Err(ApiError::param(
                api,
                "repeat_last_n",
                format!("repeat_last_n must be ≥ -1, not {v}"),
            ))
        }
    };
    let p = SamplingParams {
        temperature: range("temperature", k.temperature, 0.0, 100.0, d.temperature)?,
        top_k,
        top_p: range("top_p", k.top_p, 0.0, 1.0, d.top_p)?,
        min_p: range("min_p", k.min_p, 0.0, 1.0, d.min_p)?,
        repeat_penalty: range(
            "repeat_penalty",
            k.repeat_penalty,
            0.0,
            10.0,
            d.repeat_penalty,
        )?,
        repeat_last_n,
        presence_penalty: range("presence_penalty", k.presence_penalty, -2.0, 2.0, 0.0)?,
        frequency_penalty: range("frequency_penalty", k.frequency_penalty, -2.0, 2.0, 0.0)?,
        seed,
    };
    p.validate().map_err(|e| ApiError::bad(api, e))?;
    Ok(p)
}

/// A prepared generation, ready to submit.
pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub constraint: Option<Constraint>,
}

/// The grammar of `tools`' calls; with `tool_choice: auto` armed by the opening tag.
pub async fn tool_constraint(
    api: Api,
    served: &Arc<Served>,
    tools: &crate::tools::Tools,
) -> Result<Constraint, ApiError> {
    let (spec, trigger) = tools.grammar();
    let c = constrain(api, served, spec, "tools").await?;
    Ok(match trigger {
        Some(tag) => c.after(tag),
        None => c,
    })
}

/// The grammar `spec` compiled for `served`'s tokenizer (the model's grammar index is built
/// on first use, once), off the async threads; a bad schema or grammar is a 400 on `param`.
pub async fn constrain(
    api: Api,
    served: &Arc<Served>,
    spec: GrammarSpec,
    param: &str,
) -> Result<Constraint, ApiError> {
    let grammars = served
        .grammars
        .get_or_try_init(|| async {
            let s = served.clone();
            tokio::task::spawn_blocking(move || Grammars::new(s.loaded.clone()).map(Arc::new))
                .await
                .map_err(|e| ApiError::new(api, Kind::Internal, e.to_string()))?
                .map_err(|e| ApiError::new(api, Kind::Internal, e.to_string()))
        })
        .await?
        .clone();
    tokio::task::spawn_blocking(move || grammars.compile(&spec))
        .await
        .map_err(|e| ApiError::new(api, Kind::Internal, e.to_string()))?
        .map_err(|e| ApiError::param(api, param, format!("{param}: {e}")))
}

/// Checks the prompt against the context and works out the token budget.
pub fn prepare(
    api: Api,
    served: &Served,
    prompt: Vec<u32>,
    knobs: &Knobs,
) -> Result<Request, ApiError> {
    let server_ctx = served.scheduler.config.n_ctx;
    let n_ctx = match knobs.num_ctx {
        Some(n) if n > 0 => (n as usize).min(server_ctx),
        _ => server_ctx,
    };
    if prompt.is_empty() {
        return Err(ApiError::bad(api, "the prompt is empty"));
    }
    if prompt.len() >= n_ctx {
        return Err(ApiError::bad(
            api,
            format!(
                "the prompt is {} tokens long; the context holds {n_ctx} tokens including the reply",
                prompt.len()
            ),
        ));
    }
    let room = n_ctx - prompt.len();
    let max_tokens = match knobs.max_tokens {
        Some(n) if n >= 0 => (n as usize).min(room),
        _ => room,
    };
    if knobs.stop.len() > 16 || knobs.stop.iter().any(|s| s.len() > 1024) {
        return Err(ApiError::param(
            api,
            "stop",
            "at most 16 stop strings of up to 1024 bytes",
        ));
    }
    Ok(Request {
        params: sampling(api, knobs)?,
        prompt,
        max_tokens,
        stop: knobs.stop.clone(),
        constraint: None,
    })
}

struct ChannelSink(UnboundedSender<Event>);

impl EventSink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.0.send(event).is_ok()
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// The events of one generation, observed for the metrics as they are read.
pub struct Generation {
    rx: UnboundedReceiver<Event>,
    state: AppState,
    started: Instant,
    last_text: Option<Instant>,
}

impl Generation {
    pub async fn next(&mut self) -> Option<Event> {
        let event = self.rx.recv().await?;
        let now = Instant::now();
        let m = &self.state.metrics;
        match &event {
            Event::Text(_) => {
                match self.last_text {
                    None => m
                        .time_to_first_token
                        .observe((now - self.started).as_secs_f64()),
                    Some(t) => m.inter_token.observe((now - t).as_secs_f64()),
                }
                self.last_text = Some(now);
            }
            Event::Done(s) => {
                m.prompt_tokens.inc_by(s.prompt_tokens as u64);
                m.prompt_tokens_cached.inc_by(s.prompt_cached as u64);
                m.generated_tokens.inc_by(s.completion_tokens as u64);
            }
            Event::Error(_) => {}
        }
        Some(event)
    }
}

/// Queues the request on the model's scheduler (503 + Retry-After when the queue is full).
pub fn submit(
    api: Api,
    state: &AppState,
    served: Arc<Served>,
    req: Request,
) -> Result<Generation, ApiError> {
    let (tx, rx) = unbounded_channel();
    let job = Job {
        prompt: req.prompt,
        params: req.params,
        max_tokens: req.max_tokens,
        stop: req.stop,
        constraint: req.constraint,
        sink: Box::new(ChannelSink(tx)),
    };
    match served.scheduler.submit(job) {
        Ok(()) => Ok(Generation {
            rx,
            state: state.clone(),
            started: Instant::now(),
            last_text: None,
        }),
        Err(SubmitError::QueueFull(_)) => Err(ApiError::new(
            api,
            Kind::Busy,
            "the server is busy: too many requests are waiting; retry shortly",
        )),
        Err(SubmitError::Stopped(_)) => Err(ApiError::new(
            api,
            Kind::Unavailable,
            "the model's worker has stopped",
        )),
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Generation {
    /// Reads the whole generation (non-streaming responses).
    pub async fn collect(mut self, api: Api) -> Result<(String, hearth_engine::Summary), ApiError> {
        let mut text = String::new();
        while let Some(event) = self.next().await {
            match event {
                Event::Text(t) => text.push_str(&t),
                Event::Done(summary) => return Ok((text, summary)),
                Event::Error(e) => return Err(ApiError::bad(api, e)),
            }
        }
        Err(ApiError::new(
            api,
            Kind::Internal,
            "generation ended without a result",
        ))
    }
}

/// Turns a generation's events into pieces of a streamed body (SSE events, NDJSON lines).
pub trait Render: Send + 'static {
    /// Pieces sent before any event.
    fn start(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// Pieces for one event, and whether the body ends after them.
    fn event(&mut self, event: Event) -> (Vec<String>, bool);
}

struct BodyState<R> {
    generation: Generation,
    render: R,
    pending: std::collections::VecDeque<String>,
    started: bool,
    finished: bool,
}

/// The body pieces, read lazily: a client that leaves drops the stream and with it the
/// event receiver, which ends its generation at the next step.
pub fn body_stream<R: Render>(
    generation: Generation,
    render: R,
) -> impl futures_util::Stream<Item = Result<String, std::convert::Infallible>> + Send {
    let state = BodyState {
        generation,
        render,
        pending: Default::default(),
        started: false,
        finished: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(piece) = st.pending.pop_front() {
                return Some((Ok(piece), st));
            }
            if st.finished {
                return None;
            }
            if !st.started {
                st.started = true;
                let first = st.render.start();
                st.pending.extend(first);
                continue;
            }
            match st.generation.next().await {
                Some(event) => {
                    let (pieces, done) = st.render.event(event);
                    st.pending.extend(pieces);
                    st.finished = done;
                }
                None => st.finished = true,
            }
        }
    })
}

/// A `tools` field that asks for something (clients send `[]` or `null` for none).
pub fn asks_for_tools(tools: &Option<serde_json::Value>) -> bool {
    match tools {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Array(a)) => !a.is_empty(),
        Some(_) => true,
    }
}
