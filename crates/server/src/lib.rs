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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, StatusCode};
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            models_dir: hearth_store::default_root(),
            parallel: 4,
            n_ctx: 4096,
            max_queue: 64,
            api_key: None,
            body_limit: 2 << 20,
            header_timeout: Duration::from_secs(10),
            cors_origins: Vec::new(),
        }
    }
}

pub struct Inner {
    pub config: ServerConfig,
    pub registry: Registry,
    pub metrics: Metrics,
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
            },
        );
        Self(Arc::new(Inner {
            config,
            registry,
            metrics: Metrics::new(),
        }))
    }
}

/// Checks `Authorization: Bearer KEY` (or Ollama-style `x-api-key`) when a key is set.
async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(key) = state.config.api_key.as_deref() else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| req.headers().get("x-api-key").and_then(|v| v.to_str().ok()));
    // Compare without an early exit on the first differing byte.
    let ok = given.is_some_and(|g| {
        g.len() == key.len()
            && g.bytes()
                .zip(key.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        next.run(req).await
    } else {
        let api = Api::for_path(req.uri().path());
        ApiError::new(api, Kind::Unauthorized, "missing or wrong API key").into_response()
    }
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

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
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
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .route_layer(middleware::from_fn_with_state(state.clone(), count))
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

/// Serves `app` on `listener` until `shutdown` resolves, then lets open requests finish
/// (streams end cleanly) for up to `grace`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()>,
    grace: Duration,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let header_timeout = state.config.header_timeout;
    let router = app(state);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer): (_, SocketAddr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(router.clone());
                let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!("shutdown grace of {grace:?} over: closing the connections left");
        }
    }
    Ok(())
}
