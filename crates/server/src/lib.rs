//! `hearth serve`: OpenAI- and Ollama-compatible HTTP API over the continuous-batching
//! scheduler. [`app`] builds the router (what tests drive); [`serve`] runs it with header
//! read and idle timeouts, an optional API key and graceful shutdown.

mod embed;
pub mod error;
mod generate;
pub mod metrics;
mod ollama;
mod openai;
pub mod registry;
mod tools;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use hearth_engine::SchedulerConfig;
use serde_json::json;

use error::{Api, ApiError, Kind};
use metrics::Metrics;
use registry::Registry;

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub models_dir: PathBuf,
    /// Sequences decoded together per model.
    pub parallel: usize,
    /// Context length of every sequence.
    pub n_ctx: usize,
    /// How KV caches store keys and values (`--kv-type`).
    pub kv_type: hearth_models::KvType,
    /// KV positions the running sequences of a model may reach together (`--kv-budget`;
    /// `None`: `parallel × n_ctx`).
    pub kv_budget: Option<usize>,
    /// Requests waiting per model before 503.
    pub max_queue: usize,
    /// Required as `Authorization: Bearer KEY` when set (not for `/health`).
    pub api_key: Option<String>,
    /// Largest request body.
    pub body_limit: usize,
    /// Time allowed for a request's headers to arrive (also the keep-alive idle limit).
    pub header_timeout: Duration,
    /// Browser origins allowed to call the API (`*` for any); none: no CORS headers at all.
    pub cors_origins: Vec<String>,
    /// Sent as `X-Hearth-Replica` on every response (default: the address as bound).
    pub replica_name: Option<String>,
    /// Models loaded at start-up; `/ready` answers 200 once all of them are loaded.
    pub preload: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            models_dir: hearth_store::default_root(),
            parallel: 4,
            n_ctx: 4096,
            kv_type: hearth_models::KvType::F16,
            kv_budget: None,
            max_queue: 64,
            api_key: None,
            body_limit: 2 << 20,
            header_timeout: Duration::from_secs(10),
            cors_origins: Vec::new(),
            replica_name: None,
            preload: Vec::new(),
        }
    }
}

pub struct Inner {
    pub config: ServerConfig,
    pub registry: Registry,
    pub metrics: Metrics,
    /// Set on SIGTERM: `/health` answers 503 and new work is turned away with `Retry-After`.
    draining: AtomicBool,
    /// `X-Hearth-Replica`, fixed when the listener is bound.
    replica: OnceLock<HeaderValue>,
    /// Requests being handled (probes and metrics aside); streams count until their
    /// handler returns, their sequences through the schedulers' figures.
    requests_in_flight: AtomicUsize,
    /// Background loads started by `/ready?model=` (name → last failure, if any).
    probes: Mutex<HashMap<String, Option<String>>>,
}

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn new(config: ServerConfig) -> Self {
        let registry = Registry::new(
            config.models_dir.clone(),
            SchedulerConfig {
                parallel: config.parallel.max(1),
                n_ctx: config.n_ctx.max(2),
                max_queue: config.max_queue,
                kv_type: config.kv_type,
                kv_budget: config.kv_budget,
            },
        );
        let replica = OnceLock::new();
        if let Some(name) = &config.replica_name {
            if let Ok(v) = HeaderValue::from_str(name) {
                let _ = replica.set(v);
            }
        }
        Self(Arc::new(Inner {
            config,
            registry,
            metrics: Metrics::new(),
            draining: AtomicBool::new(false),
            replica,
            requests_in_flight: AtomicUsize::new(0),
            probes: Mutex::new(HashMap::new()),
        }))
    }

    /// Starts turning work away: `/health` 503, new requests 503 with `Retry-After`.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Sequences queued or decoding in every loaded model.
    fn generations_in_flight(&self) -> usize {
        self.registry
            .running()
            .iter()
            .map(|s| {
                let st = &s.scheduler.stats;
                st.queued.load(Ordering::Relaxed) + st.active.load(Ordering::Relaxed)
            })
            .sum()
    }

    /// Loads the `--preload` models in the background (their failures are logged and shown
    /// by `/ready`).
    pub fn start_preloads(&self) {
        for name in self.config.preload.clone() {
            self.start_probe_load(name);
        }
    }

    /// Whether a background load of `name` is under way.
    fn is_loading(&self, name: &str) -> bool {
        let probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
        probes.get(name).is_some_and(|failure| failure.is_none())
    }

    /// Starts loading `name` on a background task unless that is already under way.
    fn start_probe_load(&self, name: String) {
        {
            let mut probes = self.probes.lock().unwrap_or_else(|e| e.into_inner());
            if probes.get(&name).is_some_and(|failure| failure.is_none()) {
                return; // loading now
            }
            probes.insert(name.clone(), None);
        }
        let state = self.clone();
        tokio::spawn(async move {
            let outcome = state.registry.get(Api::OpenAi, &name).await;
            let mut probes = state.probes.lock().unwrap_or_else(|e| e.into_inner());
            match outcome {
                Ok(_) => {
                    probes.remove(&name);
                }
                Err(e) => {
                    tracing::warn!(model = %name, "load failed: {}", e.message);
                    probes.insert(name, Some(e.message));
                }
            }
        });
    }
}

/// Checks `Authorization: Bearer KEY` (or Ollama-style `x-api-key`) when a key is set.
async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if is_probe(req.uri().path()) || has_key(&state, req.headers()) {
        next.run(req).await
    } else {
        let api = Api::for_path(req.uri().path());
        ApiError::new(api, Kind::Unauthorized, "missing or wrong API key").into_response()
    }
}

/// Whether the request carries the API key (always, when none is set).
fn has_key(state: &AppState, headers: &axum::http::HeaderMap) -> bool {
    let Some(key) = state.config.api_key.as_deref() else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    // Compare without an early exit on the first differing byte.
    given.is_some_and(|g| {
        g.len() == key.len()
            && g.bytes()
                .zip(key.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

/// Health and readiness checks: answered without an API key and while draining.
fn is_probe(path: &str) -> bool {
    path == "/health" || path == "/ready"
}

/// While draining, new work gets 503 + `Retry-After` (so a proxy retries it on another
/// replica) and `Connection: close`; probes and metrics still answer.
async fn drain_gate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if is_probe(path) || path == "/metrics" {
        return next.run(req).await;
    }
    if !state.is_draining() {
        state.requests_in_flight.fetch_add(1, Ordering::SeqCst);
        // Counted down even when the client goes away and this future is dropped.
        let in_flight = InFlight(state.clone());
        let resp = next.run(req).await;
        return outlive_body(resp, in_flight);
    }
    let mut resp = ApiError::new(
        Api::for_path(path),
        Kind::Unavailable,
        "this server is shutting down; retry on another replica",
    )
    .into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::RETRY_AFTER,
        HeaderValue::from(error::RETRY_AFTER_SECS),
    );
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// One request in flight, counted down when dropped.
struct InFlight(AppState);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.requests_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A streamed answer (SSE, NDJSON) stays in flight until its body has been sent (or the
/// client left): the scheduler may have finished generating long before the client read it
/// all, and a drain must not close the listener under it. Other answers are complete here.
fn outlive_body(resp: Response, in_flight: InFlight) -> Response {
    use futures_util::StreamExt;
    let streamed = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t.starts_with("text/event-stream") || t.starts_with("application/x-ndjson")
        });
    if !streamed {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _held = &in_flight;
        chunk
    });
    Response::from_parts(parts, axum::body::Body::from_stream(body))
}

/// Names this replica on every response (`X-Hearth-Replica`), so a client behind a load
/// balancer can tell where it was served.
async fn replica_header(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    if let Some(name) = state.replica.get() {
        resp.headers_mut().insert("x-hearth-replica", name.clone());
    }
    resp
}

/// Counts requests by route and status.
async fn count(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", |p| p.as_str())
        .to_string();
    let resp = next.run(req).await;
    state
        .metrics
        .requests
        .with_label_values(&[endpoint.as_str(), resp.status().as_str()])
        .inc();
    resp
}

#[derive(serde::Deserialize)]
struct ProbeQuery {
    model: Option<String>,
}

/// 200 when this server can take work; 503 while draining and while its folder offers no
/// model at all. With `?model=NAME`, the same as `/ready?model=NAME`.
async fn health(
    State(state): State<AppState>,
    Query(q): Query<ProbeQuery>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(answer) = probe_common(&state, q, &headers).await {
        return answer;
    }
    let registry = state.clone();
    let offered = tokio::task::spawn_blocking(move || {
        !registry.registry.list().is_empty() || !registry.registry.encoders().is_empty()
    })
    .await
    .unwrap_or(false);
    if !offered {
        return probe_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "no models", "error": "the models folder offers no model"}),
        );
    }
    probe_answer(StatusCode::OK, json!({"status": "ok"}))
}

/// Readiness: without a model, 200 once every `--preload` model is loaded (and not
/// draining); with `?model=NAME`, 200 once that model is loaded — the first such check
/// starts loading it, later ones answer 503 `loading` until it is in memory. With an API
/// key set, only a check carrying the key starts a load (probes without it only report), so
/// an anonymous client cannot make the server load every model it offers.
async fn ready(
    State(state): State<AppState>,
    Query(q): Query<ProbeQuery>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Some(answer) = probe_common(&state, q, &headers).await {
        return answer;
    }
    let mut waiting = Vec::new();
    for name in &state.config.preload {
        if !state.registry.is_loaded(name) {
            waiting.push(name.clone());
        }
    }
    if waiting.is_empty() {
        probe_answer(StatusCode::OK, json!({"status": "ok"}))
    } else {
        let failures = failures_of(&state, &waiting);
        probe_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "loading", "models": waiting, "errors": failures}),
        )
    }
}

/// What `/health` and `/ready` answer alike: a model's readiness when one is named, 503
/// while draining; `None` otherwise.
async fn probe_common(
    state: &AppState,
    q: ProbeQuery,
    headers: &axum::http::HeaderMap,
) -> Option<Response> {
    if let Some(model) = q.model {
        let may_load = has_key(state, headers);
        return Some(model_readiness(state, model, may_load).await);
    }
    if state.is_draining() {
        return Some(probe_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "draining"}),
        ));
    }
    None
}

async fn model_readiness(state: &AppState, model: String, may_load: bool) -> Response {
    if state.is_draining() {
        return probe_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "draining"}),
        );
    }
    if let Err(e) = state.registry.check_name(Api::OpenAi, &model) {
        return e.into_response();
    }
    if state.registry.is_loaded(&model) {
        return probe_answer(StatusCode::OK, json!({"status": "ok", "model": model}));
    }
    let failures = failures_of(state, std::slice::from_ref(&model));
    let loading = state.is_loading(&model);
    if !may_load && !loading {
        return probe_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "not loaded", "model": model, "errors": failures}),
        );
    }
    // A failed load is tried again by the next check (the file may have been fixed).
    state.start_probe_load(model.clone());
    probe_answer(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({"status": "loading", "model": model, "errors": failures}),
    )
}

/// The last load failure of each of `names` that has one.
fn failures_of(state: &AppState, names: &[String]) -> serde_json::Value {
    let probes = state.probes.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = serde_json::Map::new();
    for n in names {
        if let Some(Some(e)) = probes.get(n) {
            out.insert(n.clone(), json!(e));
        }
    }
    serde_json::Value::Object(out)
}

fn probe_answer(status: StatusCode, body: serde_json::Value) -> Response {
    let mut resp = (status, Json(body)).into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            HeaderValue::from(error::RETRY_AFTER_SECS),
        );
    }
    resp
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let text = state.metrics.render(&state.registry.running());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn not_found(req: Request) -> ApiError {
    let path = req.uri().path().to_string();
    ApiError::new(
        Api::for_path(&path),
        Kind::NotFound,
        format!("no route {path}"),
    )
}

async fn method_not_allowed(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
        let mut e =
            ApiError::bad(Api::for_path(&path), format!("wrong method for {path}")).into_response();
        *e.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        return e;
    }
    resp
}

/// The whole HTTP API.
pub fn app(state: AppState) -> Router {
    let cors = cors_layer(&state.config.cors_origins);
    let router = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/embeddings", post(embed::openai))
        .route("/api/embed", post(embed::ollama_embed))
        .route("/api/embeddings", post(embed::ollama_embeddings))
        .route("/api/generate", post(ollama::generate))
        .route("/api/chat", post(ollama::chat))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.config.body_limit))
        .layer(middleware::from_fn(method_not_allowed))
        .layer(middleware::from_fn_with_state(state.clone(), drain_gate))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .route_layer(middleware::from_fn_with_state(state.clone(), count))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            replica_header,
        ))
        .with_state(state);
    // Outermost: a browser's preflight is answered before the API key check.
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// CORS for the configured origins (invalid ones skipped), or none.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{header, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok()),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]),
    )
}

/// Serves `app` on `listener` until `shutdown` resolves, then drains: `/health` answers 503
/// and new requests 503 + `Retry-After` (a load balancer takes the replica out and retries
/// elsewhere) while the generations in flight finish, for up to `grace` in all; then the
/// listener closes and the connections left end.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    if state.replica.get().is_none() {
        if let Ok(v) = HeaderValue::from_str(&listener.local_addr()?.to_string()) {
            let _ = state.replica.set(v);
        }
    }
    state.start_preloads();
    let header_timeout = state.config.header_timeout;
    let router = app(state.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let serve_connection = |accepted: std::io::Result<(tokio::net::TcpStream, SocketAddr)>| {
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!("accept failed: {e}");
                return false;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            let _ = conn.await;
        });
        true
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if !serve_connection(accepted) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            _ = &mut shutdown => break,
        }
    }
    state.start_draining();
    let deadline = Instant::now() + grace;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if !serve_connection(accepted) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            _ = tick.tick() => {
                let busy = state.requests_in_flight.load(Ordering::SeqCst)
                    + state.generations_in_flight();
                if busy == 0 || Instant::now() >= deadline {
                    break;
                }
            }
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep_until(deadline.into()) => {
            tracing::warn!("shutdown grace of {grace:?} over: closing the connections left");
        }
    }
    Ok(())
}
