//! Any request body, sent through the real router (`hearth_server::app`, every middleware
//! and handler) with `tower::ServiceExt::oneshot`, against a server whose models folder
//! holds one small complete model (`tiny`, from the `gguf` seeds), so valid requests run
//! the real engine to the end (streams included; the context is 64 tokens). The first byte
//! picks the endpoint. Every answer must be a success or an error in that API's own shape
//! with a 4xx status (503 when the queue is full); never a panic, a hang or a 500.
#![no_main]
use std::sync::OnceLock;

use axum::body::Body;
use axum::http::Request;
use hearth_server::{AppState, ServerConfig};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const ENDPOINTS: [&str; 8] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/api/chat",
    "/api/generate",
    "/api/show",
    "/v1/embeddings",
    "/api/embed",
    "/api/embeddings",
];

struct World {
    runtime: tokio::runtime::Runtime,
    state: AppState,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hearth-fuzz-request-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a temporary models folder");
        std::fs::write(
            dir.join("tiny.gguf"),
            include_bytes!("../corpus/gguf/tiny-llama.gguf"),
        )
        .expect("the tiny model written");
        let state = AppState::new(ServerConfig {
            models_dir: dir,
            n_ctx: 64,
            parallel: 2,
            max_queue: 8,
            ..ServerConfig::default()
        });
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        World { runtime, state }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let path = ENDPOINTS[which as usize % ENDPOINTS.len()];
    let w = world();
    let request = Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_vec()))
        .expect("a request");
    w.runtime.block_on(async {
        let response = hearth_server::app(w.state.clone())
            .oneshot(request)
            .await
            .expect("the router answers");
        let status = response.status();
        // The whole body: a stream runs to its end here.
        let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
            .await
            .expect("the body is read to its end");
        if status.is_success() {
            return;
        }
        assert!(
            status.is_client_error() || status.as_u16() == 503,
            "{path}: {status} {}",
            String::from_utf8_lossy(&bytes)
        );
        let v: serde_json::Value = serde_json::from_slice(&bytes).expect("an error body is JSON");
        if path.starts_with("/v1/") {
            assert!(v["error"]["message"].is_string(), "{path}: {v}");
        } else {
            assert!(v["error"].is_string(), "{path}: {v}");
        }
    });
});
