//! The server end to end on 127.0.0.1 (port 0) with the real SmolLM2: both APIs' shapes,
//! streaming, errors, queue limits, cancellation, prefix reuse, batching and slowloris.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use hearth_server::{AppState, ServerConfig};
use serde_json::{json, Value};

const MODEL: &str = "smollm2";

struct Server {
    base: String,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

async fn start(tweak: impl FnOnce(&mut ServerConfig)) -> Server {
    let mut config = ServerConfig {
        n_ctx: 512,
        header_timeout: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    tweak(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let state = AppState::new(config);
    tokio::spawn(async move {
        let shutdown = async {
            let _ = rx.await;
        };
        hearth_server::serve(listener, state, shutdown, Duration::from_secs(5))
            .await
            .unwrap();
    });
    Server {
        base: format!("http://{addr}"),
        addr,
        stop: Some(tx),
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap()
}

async fn post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = client()
        .post(format!("{}{path}", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(s: &Server, path: &str) -> (u16, String) {
    let r = client()
        .get(format!("{}{path}", s.base))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn chat(content: &str, extra: Value) -> Value {
    let mut v = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 12,
    });
    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    v
}

/// The metric's value in the Prometheus text (0 when absent).
async fn metric(s: &Server, name: &str) -> f64 {
    metrics(s, &[name]).await[0]
}

/// Several metrics from one scrape (so they describe the same moment).
async fn metrics(s: &Server, names: &[&str]) -> Vec<f64> {
    let (_, text) = get(s, "/metrics").await;
    names
        .iter()
        .map(|name| {
            text.lines()
                .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_and_completion_shapes() {
    let s = start(|_| {}).await;
    let (status, v) = post(
        &s,
        "/v1/chat/completions",
        chat("Why is the sky blue?", json!({})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.len() > 10, "{text:?}");
    // Greedy is deterministic, and the second run reuses the cached prompt.
    let (_, again) = post(
        &s,
        "/v1/chat/completions",
        chat("Why is the sky blue?", json!({})),
    )
    .await;
    assert_eq!(again["choices"][0]["message"]["content"], text.as_str());
    assert!(
        again["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );

    let (status, v) = post(
        &s,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(
        v["choices"][0]["text"].as_str().unwrap().contains("Paris"),
        "{v}"
    );

    let (status, models) = get(&s, "/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert!(models["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["id"] == MODEL));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_ends_with_done_and_usage() {
    let s = start(|_| {}).await;
    let body = chat(
        "Count: one, two,",
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    let text = client()
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("SSE data line"))
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage["usage"]["completion_tokens"], 12);
    let finish = &chunks[chunks.len() - 2];
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    // The streamed text is the non-streamed text.
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    let (_, whole) = post(
        &s,
        "/v1/chat/completions",
        chat("Count: one, two,", json!({})),
    )
    .await;
    assert_eq!(whole["choices"][0]["message"]["content"], streamed.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_and_seeds() {
    let s = start(|_| {}).await;
    let (_, free) = post(
        &s,
        "/v1/chat/completions",
        chat("List three colors.", json!({"max_tokens": 30})),
    )
    .await;
    let free = free["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    // Stop at a word from the middle of the greedy text: the reply ends just before it.
    let word = free.split_whitespace().nth(3).unwrap().to_string();
    let (_, cut) = post(
        &s,
        "/v1/chat/completions",
        chat(
            "List three colors.",
            json!({"max_tokens": 30, "stop": [word.clone()]}),
        ),
    )
    .await;
    let cut_text = cut["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");
    assert!(
        free.starts_with(cut_text) && !cut_text.contains(&word),
        "{free:?} / {cut_text:?}"
    );

    let sampled = |seed: i64| {
        chat(
            "Tell me a story.",
            json!({"temperature": 1.0, "seed": seed, "max_tokens": 16}),
        )
    };
    let (_, a) = post(&s, "/v1/chat/completions", sampled(7)).await;
    let (_, b) = post(&s, "/v1/chat/completions", sampled(7)).await;
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["choices"][0]["message"]["content"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_generate_chat_tags_show() {
    let s = start(|_| {}).await;
    // Streams NDJSON by default, ending with the counts and durations.
    let text = client()
        .post(format!("{}/api/generate", s.base))
        .json(&json!({"model": MODEL, "prompt": "Hello", "options": {"num_predict": 5, "temperature": 0}}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true);
    for field in [
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ] {
        assert!(last[field].is_u64(), "{field} in {last}");
    }
    assert!(lines[..lines.len() - 1]
        .iter()
        .all(|l| l["done"] == false && l["response"].is_string()));

    // Multi-turn chat: the second turn reuses the first one's cache.
    let mut messages = vec![
        json!({"role": "system", "content": "You are a helpful assistant who answers briefly and politely."}),
        json!({"role": "user", "content": "What is the capital of France?"}),
    ];
    let (status, first) = post(
        &s,
        "/api/chat",
        json!({"model": "smollm2:latest", "messages": messages, "stream": false, "options": {"num_predict": 10, "temperature": 0}}),
    )
    .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["message"]["role"], "assistant");
    let full_prompt = first["prompt_eval_count"].as_u64().unwrap();
    messages.push(first["message"].clone());
    messages.push(json!({"role": "user", "content": "And of Spain?"}));
    let (_, second) = post(
        &s,
        "/api/chat",
        json!({"model": MODEL, "messages": messages, "stream": false, "options": {"num_predict": 10, "temperature": 0}}),
    )
    .await;
    let evaluated = second["prompt_eval_count"].as_u64().unwrap();
    assert!(
        evaluated < full_prompt,
        "second turn evaluated {evaluated} of its prompt, first {full_prompt}"
    );

    let (status, tags) = get(&s, "/api/tags").await;
    assert_eq!(status, 200);
    let tags: Value = serde_json::from_str(&tags).unwrap();
    let entry = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == MODEL)
        .unwrap()
        .clone();
    assert_eq!(entry["details"]["quantization_level"], "Q4_1");
    // Every entry, embedding models included, carries its file's real modification time.
    for m in tags["models"].as_array().unwrap() {
        let when = m["modified_at"].as_str().unwrap();
        assert!(!when.starts_with("1970"), "{m}");
    }
    let minilm = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "minilm")
        .unwrap();
    assert_eq!(minilm["details"]["format"], "safetensors");
    assert_eq!(minilm["details"]["quantization_level"], "F32");
    let (status, show) = post(&s, "/api/show", json!({"model": MODEL})).await;
    assert_eq!(status, 200);
    assert_eq!(show["model_info"]["general.architecture"], "llama");
    let (status, ps) = get(&s, "/api/ps").await;
    assert_eq!(status, 200);
    assert!(ps.contains(MODEL));
    let (status, _) = get(&s, "/api/version").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_in_each_apis_shape() {
    let s = start(|c| c.body_limit = 64 << 10).await;
    let openai = |v: &Value| v["error"]["message"].is_string() && v["error"]["type"].is_string();
    let ollama = |v: &Value| v["error"].is_string();
    let cases: Vec<(&str, Value, u16)> = vec![
        (
            "/v1/chat/completions",
            json!({"model": "missing", "messages": [{"role": "user", "content": "x"}]}),
            404,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "../x", "messages": [{"role": "user", "content": "x"}]}),
            400,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "/etc/passwd", "messages": [{"role": "user", "content": "x"}]}),
            400,
        ),
        (
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": []}),
            400,
        ),
        (
            "/v1/chat/completions",
            chat("x", json!({"temperature": -1})),
            400,
        ),
        ("/v1/chat/completions", chat("x", json!({"top_p": 2})), 400),
        (
            "/v1/chat/completions",
            chat("x", json!({"max_tokens": -5})),
            400,
        ),
        ("/v1/chat/completions", chat("x", json!({"n": 2})), 400),
        (
            "/v1/chat/completions",
            chat("x", json!({"logprobs": true})),
            400,
        ),
        (
            "/v1/chat/completions",
            chat("x", json!({"temperature": "hot"})),
            400,
        ),
        (
            "/v1/chat/completions",
            chat("x", json!({"seed": 1e300})),
            400,
        ),
        (
            "/v1/chat/completions",
            chat(&"word ".repeat(600), json!({})),
            400,
        ),
        (
            "/v1/completions",
            json!({"model": MODEL, "prompt": [1, 2, 999999999]}),
            400,
        ),
        (
            "/api/chat",
            json!({"model": "missing", "messages": [{"role": "user", "content": "x"}]}),
            404,
        ),
        (
            "/api/chat",
            json!({"model": "../../etc/passwd", "messages": [{"role": "user", "content": "x"}]}),
            400,
        ),
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": "x", "options": {"top_k": -3}}),
            400,
        ),
        (
            "/api/generate",
            json!({"model": MODEL, "prompt": "x", "format": "yaml"}),
            400,
        ),
    ];
    for (path, body, want) in cases {
        let (status, v) = post(&s, path, body.clone()).await;
        assert_eq!(status, want, "{path} {body}: {v}");
        let shaped = if path.starts_with("/api/") {
            ollama(&v)
        } else {
            openai(&v)
        };
        assert!(shaped, "{path}: {v}");
    }
    // Not JSON, not UTF-8, too big, unknown route.
    let raw = |path: &str, body: Vec<u8>| {
        let url = format!("{}{path}", s.base);
        async move {
            let r = client()
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (st, v) = raw("/v1/chat/completions", b"{not json".to_vec()).await;
    assert!(st == 400 && openai(&v), "{st} {v}");
    let (st, v) = raw("/api/chat", vec![b'{', 0xff, 0xfe, b'}']).await;
    assert!(st == 400 && ollama(&v), "{st} {v}");
    let (st, v) = raw("/v1/chat/completions", vec![b' '; 100 << 10]).await;
    assert!(st == 413 && openai(&v), "{st} {v}");
    let (st, v) = raw("/api/nothing", b"{}".to_vec()).await;
    assert!(st == 404 && ollama(&v), "{st} {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_required_when_set() {
    let s = start(|c| c.api_key = Some("sekret".into())).await;
    let url = format!("{}/v1/models", s.base);
    assert_eq!(client().get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        client()
            .get(&url)
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        client()
            .get(&url)
            .bearer_auth("sekret")
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = client()
        .get(format!("{}/api/tags", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    assert_eq!(get(&s, "/health").await.0, 200);
}

/// Opens a stream and reads until the first content arrives.
async fn open_stream(s: &Server, max_tokens: u32) -> reqwest::Response {
    let mut r = client()
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&chat(
            "Write a long essay about the sea.",
            json!({"stream": true, "max_tokens": max_tokens}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data:").count() < 2 {
        let chunk = r.chunk().await.unwrap().expect("stream continues");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_answers_503_and_loses_nothing() {
    let s = start(|c| {
        c.parallel = 1;
        c.max_queue = 1;
    })
    .await;
    let busy = open_stream(&s, 400).await; // holds the only slot
                                           // One request may wait; the next is refused at once.
    let waiting = tokio::spawn({
        let base = s.base.clone();
        async move {
            client()
                .post(format!("{base}/v1/chat/completions"))
                .json(&chat("Hi", json!({"max_tokens": 3})))
                .send()
                .await
                .unwrap()
        }
    });
    // The per-model figures autoscalers read: one scrape shows the request waiting, the
    // stream running and its KV cache in use. (The gauges are separate atomics, so a scrape
    // taken just as the stream ends may mix before and after: look again.)
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = get(&s, "/metrics").await;
        let value = |name: &str| -> f64 {
            let key = format!("{name}{{model=\"{MODEL}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(key.as_str()))
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1.0)
        };
        let usage = value("hearth_kv_cache_usage_ratio");
        if value("hearth_num_requests_waiting") == 1.0
            && value("hearth_num_requests_running") == 1.0
            && usage > 0.0
            && usage <= 1.0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no scrape with 1 waiting, 1 running and KV in use: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = client()
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&chat("Hi", json!({"max_tokens": 3})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let r = client()
        .post(format!("{}/api/generate", s.base))
        .json(&json!({"model": MODEL, "prompt": "Hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.json::<Value>().await.unwrap()["error"].is_string());
    // The client holding the slot leaves: the queued request is served, not lost.
    drop(busy);
    let served = waiting.await.unwrap();
    assert_eq!(served.status(), 200);
    let v: Value = served.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_frees_its_slot() {
    let s = start(|_| {}).await;
    let streams = [open_stream(&s, 400).await, open_stream(&s, 400).await];
    assert_eq!(metric(&s, "hearth_active_sequences").await, 2.0);
    let generated_before = metric(&s, "hearth_generated_tokens_total").await;
    drop(streams);
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&s, "hearth_active_sequences").await > 0.0 {
        assert!(
            Instant::now() < deadline,
            "slots still busy after the clients left"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(metric(&s, "hearth_cancelled_requests").await, 2.0);
    assert_eq!(metric(&s, "hearth_completed_requests").await, 0.0);
    // Cancelled requests never finish, so they never count generated tokens.
    assert_eq!(
        metric(&s, "hearth_generated_tokens_total").await,
        generated_before
    );

    // The same for a non-streaming request whose client times out.
    let r = client()
        .post(format!("{}/v1/chat/completions", s.base))
        .timeout(Duration::from_millis(500))
        .json(&chat(
            "Write a long essay about the sea.",
            json!({"max_tokens": 400}),
        ))
        .send()
        .await;
    assert!(r.is_err());
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&s, "hearth_cancelled_requests").await < 3.0 {
        assert!(
            Instant::now() < deadline,
            "the non-streaming request kept generating"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The answers to the chats of `prompts` (16 tokens each), one after another.
async fn chats_one_by_one(s: &Server, prompts: &[&str]) -> Vec<String> {
    let mut alone = Vec::new();
    for p in prompts {
        let (_, v) = post(
            s,
            "/v1/chat/completions",
            chat(p, json!({"max_tokens": 16})),
        )
        .await;
        alone.push(
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    alone
}

/// The chats of `prompts` (16 tokens each) sent at once.
fn concurrent_chats(s: &Server, prompts: &[&str]) -> Vec<tokio::task::JoinHandle<Value>> {
    prompts
        .iter()
        .map(|p| {
            let (base, body) = (s.base.clone(), chat(p, json!({"max_tokens": 16})));
            tokio::spawn(async move {
                let r = client()
                    .post(format!("{base}/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                r.json::<Value>().await.unwrap()
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_batch_and_match_sequential_results() {
    let s = start(|c| c.parallel = 4).await;
    let prompts = [
        "Why is the sky blue?",
        "Name a fruit.",
        "What is 2+2?",
        "Say hello.",
    ];
    let alone = chats_one_by_one(&s, &prompts).await;
    let steps_before = metric(&s, "hearth_generated_tokens_total").await;
    let completed_before = metric(&s, "hearth_completed_requests").await;
    let handles = concurrent_chats(&s, &prompts);
    // A token's numbers depend on what it is (prompt or generated), never on how requests
    // are batched or chunked, so the texts are equal (also where AMX tiles run prompts).
    for (h, want) in handles.into_iter().zip(&alone) {
        let v = h.await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    }
    assert!(metric(&s, "hearth_generated_tokens_total").await > steps_before);
    assert_eq!(
        metric(&s, "hearth_completed_requests").await - completed_before,
        prompts.len() as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_off_and_others_are_served() {
    let s = start(|c| c.header_timeout = Duration::from_secs(1)).await;
    let addr = s.addr;
    let slow = tokio::task::spawn_blocking(move || {
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let t = Instant::now();
        c.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n").unwrap();
        // Dribble a header byte every 300 ms, never finishing.
        let mut closed = false;
        for _ in 0..30 {
            std::thread::sleep(Duration::from_millis(300));
            if c.write_all(b"X").is_err() {
                closed = true;
                break;
            }
            let mut buf = [0u8; 512];
            c.set_nonblocking(true).unwrap();
            match c.read(&mut buf) {
                Ok(_) => {
                    closed = true;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
            c.set_nonblocking(false).unwrap();
        }
        (closed, t.elapsed())
    });
    // Meanwhile a normal client is served.
    assert_eq!(get(&s, "/health").await.0, 200);
    let (closed, after) = slow.await.unwrap();
    assert!(closed, "the slow client was never cut off");
    assert!(
        after < Duration::from_secs(5),
        "cut off only after {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_in_both_apis() {
    let s = start(|_| {}).await;
    let (status, v) = post(
        &s,
        "/v1/embeddings",
        json!({"model": "minilm", "input": ["hello world", "the sea"]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "list");
    let first: Vec<f64> = v["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(first.len(), 384);
    let norm: f64 = first.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "normalized: {norm}");
    assert_eq!(v["data"][1]["index"], 1);
    let second: Vec<f64> = v["data"][1]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() >= 4);

    // base64: little-endian f32 of the same vector.
    let (_, b) = post(
        &s,
        "/v1/embeddings",
        json!({"model": "minilm", "input": "hello world", "encoding_format": "base64"}),
    )
    .await;
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert!(decoded
        .iter()
        .zip(&first)
        .all(|(a, b)| (*a as f64 - b).abs() < 1e-6));

    let (status, o) = post(
        &s,
        "/api/embed",
        json!({"model": "minilm", "input": ["hello world", "the sea"]}),
    )
    .await;
    assert_eq!(status, 200, "{o}");
    assert_eq!(o["embeddings"].as_array().unwrap().len(), 2);
    let o0: Vec<f64> = o["embeddings"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert!(o0.iter().zip(&first).all(|(a, b)| (a - b).abs() < 1e-6));
    let (status, legacy) = post(
        &s,
        "/api/embeddings",
        json!({"model": "minilm", "prompt": "hello world"}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(legacy["embedding"].as_array().unwrap().len(), 384);

    // Too long: truncated by default (and said so), refused with truncate: false.
    let long = "word ".repeat(400);
    let (status, t) = post(
        &s,
        "/v1/embeddings",
        json!({"model": "minilm", "input": long}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(t["usage"]["truncated_inputs"], 1);
    let (status, e) = post(
        &s,
        "/api/embed",
        json!({"model": "minilm", "input": long, "truncate": false}),
    )
    .await;
    assert_eq!(status, 400, "{e}");
    let (status, _) = post(
        &s,
        "/v1/embeddings",
        json!({"model": "minilm", "input": []}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = post(&s, "/v1/embeddings", json!({"model": "nope", "input": "x"})).await;
    assert_eq!(status, 404);
    let (status, _) = post(
        &s,
        "/v1/embeddings",
        json!({"model": "../minilm", "input": "x"}),
    )
    .await;
    assert_eq!(status, 400);

    // Concurrent clients share batches and get their own vectors back.
    let handles: Vec<_> = (0..8)
        .map(|i| {
            let base = s.base.clone();
            tokio::spawn(async move {
                let r = client()
                    .post(format!("{base}/v1/embeddings"))
                    .json(&json!({"model": "minilm", "input": if i % 2 == 0 { "hello world" } else { "the sea" }}))
                    .send()
                    .await
                    .unwrap();
                r.json::<Value>().await.unwrap()
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let v = h.await.unwrap();
        let want = if i % 2 == 0 { &first } else { &second };
        let got: Vec<f64> = v["data"][0]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert!(got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5));
    }
}

/// A model file truncated and rewritten in place while it is served (an interrupted
/// re-download over the same path) must not kill the server with SIGBUS: the file is mapped
/// under a read lease, and the writer is held back until the mapping has become a copy, so
/// the served model keeps its weights.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_file_truncated_while_served_does_not_kill_the_server() {
    let src = ServerConfig::default()
        .models_dir
        .join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let dir = std::env::temp_dir().join(format!("hearth-truncated-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    std::fs::copy(&src, &file).unwrap();
    let s = start(|c| c.models_dir = dir.clone()).await;
    let ask =
        |prompt: &str| json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0});
    let (status, before) = post(&s, "/v1/completions", ask("The capital of France is")).await;
    assert_eq!(status, 200, "{before}");

    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(4096).unwrap();
    (&f).write_all(&[0u8; 4096]).unwrap();
    f.sync_all().unwrap();

    let (status, other) = post(&s, "/v1/completions", ask("Water boils at")).await;
    assert_eq!(status, 200, "{other}");
    let (status, after) = post(&s, "/v1/completions", ask("The capital of France is")).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["choices"][0]["text"], before["choices"][0]["text"]);
    let (status, _) = get(&s, "/health").await;
    assert_eq!(status, 200);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// 200 streaming clients (4 decoding, 196 queued) all leave at once: every slot and queue
/// place is freed, each left request counted as cancelled, and no forward pass runs for
/// anyone after that. The server then answers the next request normally. (A request that
/// reached its end before the clients left — an end-of-text token, or 400 tokens while
/// the others were still being sent — counts as completed instead.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_leaving_mid_stream_free_everything() {
    const CLIENTS: usize = 200;
    let s = start(|c| {
        c.parallel = 4;
        c.max_queue = 256;
    })
    .await;
    // Load the model first so every request below is accepted at once.
    let (status, _) = post(
        &s,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi", "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 200);
    let cancelled_before = metric(&s, "hearth_cancelled_requests").await;
    let completed_before = metric(&s, "hearth_completed_requests").await;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut opening = Vec::new();
    for i in 0..CLIENTS {
        let (http, base) = (http.clone(), s.base.clone());
        opening.push(tokio::spawn(async move {
            http.post(format!("{base}/v1/chat/completions"))
                .json(&chat(
                    &format!("Write a long essay about the sea, part {i}."),
                    json!({"stream": true, "max_tokens": 400}),
                ))
                .send()
                .await
                .unwrap()
        }));
    }
    let mut streams = Vec::new();
    for o in opening {
        let r = o.await.unwrap();
        assert_eq!(r.status(), 200);
        streams.push(r);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&s, "hearth_active_sequences").await < 4.0
        || metric(&s, "hearth_queue_depth").await < (CLIENTS - 4) as f64
    {
        assert!(Instant::now() < deadline, "not every request was accepted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(streams);
    let left = Instant::now();
    let deadline = left + Duration::from_secs(10);
    while metrics(&s, &["hearth_active_sequences", "hearth_queue_depth"])
        .await
        .iter()
        .any(|&n| n > 0.0)
    {
        assert!(
            Instant::now() < deadline,
            "slots or queue still busy 10 s after the clients left"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let freed_after = left.elapsed();
    let cancelled = metric(&s, "hearth_cancelled_requests").await - cancelled_before;
    let completed = metric(&s, "hearth_completed_requests").await - completed_before;
    assert_eq!(
        cancelled + completed,
        CLIENTS as f64,
        "{completed} completed"
    );
    // Only requests that were decoding (4 at a time) can have ended: most were cancelled.
    assert!(cancelled >= (CLIENTS / 2) as f64, "{cancelled} cancelled");
    let steps = metric(&s, "hearth_forward_steps_total").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        metric(&s, "hearth_forward_steps_total").await,
        steps,
        "generation went on for clients that left"
    );
    eprintln!("{CLIENTS} clients left; everything freed after {freed_after:?}");
    let (status, v) = post(
        &s,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // Served in full (greedy: without `temperature` the default sampling could end early).
    assert_eq!(v["usage"]["completion_tokens"], 4, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
}

/// Requests that arrive while their model is loading wait for that one load (and /health
/// answers meanwhile); a model file that fails to load gives every waiting request a 503 in
/// its API's shape, the server stays up, and the load is tried again once the file is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_a_model_load() {
    let dir = std::env::temp_dir().join(format!("hearth-loading-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    // A file that starts like a GGUF and then is garbage.
    let mut junk = b"GGUF\x03\x00\x00\x00".to_vec();
    junk.extend((0..1_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    std::fs::write(&file, &junk).unwrap();
    let s = start(|c| c.models_dir = dir.clone()).await;
    async fn complete(base: String) -> (u16, Value) {
        let ask = json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, "temperature": 0});
        let r = client()
            .post(format!("{base}/v1/completions"))
            .json(&ask)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    }

    let mut broken = Vec::new();
    for _ in 0..3 {
        broken.push(tokio::spawn(complete(s.base.clone())));
    }
    let r = client()
        .post(format!("{}/api/generate", s.base))
        .json(&json!({"model": MODEL, "prompt": "Hi", "stream": false}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("could not be loaded"));
    for b in broken {
        let (status, v) = b.await.unwrap();
        assert_eq!(status, 503, "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("could not be loaded"));
    }
    assert_eq!(get(&s, "/health").await.0, 200);

    // Fixed on disk (by rename, as `hearth pull` does): the next requests load it once.
    let tmp = dir.join("incoming.part");
    std::fs::copy(
        ServerConfig::default()
            .models_dir
            .join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        &tmp,
    )
    .unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let mut waiting = Vec::new();
    for _ in 0..4 {
        waiting.push(tokio::spawn(complete(s.base.clone())));
    }
    // Health does not wait for the load.
    let t = Instant::now();
    assert_eq!(get(&s, "/health").await.0, 200);
    assert!(t.elapsed() < Duration::from_secs(2));
    let mut texts = Vec::new();
    for w in waiting {
        let (status, v) = w.await.unwrap();
        assert_eq!(status, 200, "{v}");
        texts.push(v["choices"][0]["text"].as_str().unwrap().to_string());
    }
    assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
    let (_, ps) = get(&s, "/api/ps").await;
    let ps: Value = serde_json::from_str(&ps).unwrap();
    assert_eq!(ps["models"].as_array().unwrap().len(), 1);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// No CORS headers unless origins are configured; then those origins (and only those) get
/// them, and a browser's preflight is answered even when an API key is required.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_only_for_configured_origins() {
    let origin = "http://localhost:3000";
    let s = start(|_| {}).await;
    let r = client()
        .get(format!("{}/v1/models", s.base))
        .header("origin", origin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("access-control-allow-origin"));

    let s = start(|c| {
        c.cors_origins = vec![origin.to_string()];
        c.api_key = Some("k".into());
    })
    .await;
    let preflight = client()
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/v1/chat/completions", s.base),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(preflight.headers()["access-control-allow-origin"], origin);
    let r = client()
        .get(format!("{}/v1/models", s.base))
        .header("origin", origin)
        .bearer_auth("k")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["access-control-allow-origin"], origin);
    let other = client()
        .get(format!("{}/v1/models", s.base))
        .header("origin", "http://evil.example")
        .bearer_auth("k")
        .send()
        .await
        .unwrap();
    assert!(!other.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_raw_system_and_num_ctx_do_what_they_say() {
    let s = start(|_| {}).await;
    let generate = |body: Value| {
        let s = &s;
        async move {
            let mut body = body;
            body["model"] = json!(MODEL);
            body["stream"] = json!(false);
            post(s, "/api/generate", body).await
        }
    };
    let greedy = |n: u32| json!({"num_predict": n, "temperature": 0});

    // raw: the prompt is fed as is. The chat template applied by hand, raw, gives what the
    // templated prompt gives.
    let (status, templated) =
        generate(json!({"prompt": "Name a colour.", "options": greedy(8)})).await;
    assert_eq!(status, 200, "{templated}");
    // (SmolLM2's template adds its default system turn when there is none.)
    let by_hand = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
        Hugging Face<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n";
    let (status, raw) =
        generate(json!({"prompt": by_hand, "raw": true, "options": greedy(8)})).await;
    assert_eq!(status, 200, "{raw}");
    assert_eq!(raw["response"], templated["response"]);
    // Raw text without the template is a different, shorter prompt.
    let (_, bare) =
        generate(json!({"prompt": "Name a colour.", "raw": true, "options": greedy(8)})).await;
    assert!(
        bare["prompt_eval_count"].as_u64().unwrap() < 8,
        "raw text was templated: {bare}"
    );

    // system: a system turn before the prompt, as /api/chat with the same two messages.
    let system = "Answer in French.";
    let (status, gen) =
        generate(json!({"prompt": "Name a colour.", "system": system, "options": greedy(8)})).await;
    assert_eq!(status, 200, "{gen}");
    let (_, chat) = post(
        &s,
        "/api/chat",
        json!({"model": MODEL, "stream": false, "options": greedy(8), "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "Name a colour."}]}),
    )
    .await;
    assert_eq!(gen["response"], chat["message"]["content"]);
    assert_ne!(
        gen["response"], templated["response"],
        "the system turn was ignored"
    );

    // num_ctx: the context holds prompt + reply; a prompt that does not fit is a 400.
    let prompt_len = templated["prompt_eval_count"].as_u64().unwrap();
    let (status, short) = generate(json!({"prompt": "Name a colour.", "options":
        {"num_predict": 50, "temperature": 0, "num_ctx": prompt_len + 3}}))
    .await;
    assert_eq!(status, 200, "{short}");
    assert_eq!(short["eval_count"], 3, "{short}");
    assert_eq!(short["done_reason"], "length");
    let (status, err) = generate(json!({"prompt": "Name a colour.", "options":
        {"num_ctx": prompt_len - 1}}))
    .await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"].as_str().unwrap().contains("context"), "{err}");
}

/// `/health` is 503 while the folder offers no model; `/ready` waits for the `--preload`
/// models, `/ready?model=` (and `/health?model=`) starts a load and answers 200 once it is
/// in memory; probes need no API key; every response names the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_replica_name() {
    let empty = std::env::temp_dir().join(format!("hearth-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let s = start(|c| c.models_dir = empty.clone()).await;
    let r = client()
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    // Default name: the address as bound.
    assert_eq!(r.headers()["x-hearth-replica"], s.addr.to_string().as_str());
    assert!(r.text().await.unwrap().contains("no models"));
    drop(s);
    let _ = std::fs::remove_dir_all(&empty);

    // Preloaded: /ready turns 200 without any request asking for the model.
    let s = start(|c| {
        c.preload = vec![MODEL.to_string()];
        c.replica_name = Some("replica-a".to_string());
        c.api_key = Some("k".to_string());
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(&s, "/ready").await;
        if status == 200 {
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("loading"), "{body}");
        assert!(Instant::now() < deadline, "preload never finished: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = client()
        .get(format!("{}/health", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-hearth-replica"], "replica-a");
    // Other routes still want the key, and name the replica on their 401 too.
    let r = client()
        .get(format!("{}/v1/models", s.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-hearth-replica"], "replica-a");
    assert_eq!(get(&s, "/ready?model=smollm2:latest").await.0, 200);
    // Without the key a probe reports but never starts a load.
    let (status, body) = get(&s, "/ready?model=gemma3").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not loaded"), "{body}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ps = client()
        .get(format!("{}/api/ps", s.base))
        .bearer_auth("k")
        .send()
        .await
        .unwrap();
    assert_eq!(ps.status(), 200);
    let ps = ps.text().await.unwrap();
    assert!(ps.contains("smollm2") && !ps.contains("gemma3"), "{ps}");
    let (status, body) = get(&s, "/ready?model=no-such-model").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = get(&s, "/ready?model=../etc/passwd").await;
    assert_eq!(status, 400, "{body}");
    drop(s);

    // Not preloaded: the first model check starts the load, a later one sees it loaded.
    let s = start(|_| {}).await;
    assert_eq!(get(&s, "/ready").await.0, 200, "nothing to wait for");
    let (status, body) = get(&s, "/health?model=smollm2").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("loading"), "{body}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while get(&s, "/ready?model=smollm2").await.0 != 200 {
        assert!(Instant::now() < deadline, "the load never finished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Loaded by the probe: the first request does not wait for a load.
    let (status, v) = post(
        &s,
        "/v1/chat/completions",
        chat("Hi", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

/// Constrained output in both APIs: JSON schema and JSON object modes answer JSON that
/// parses and follows the schema; hostile schemas are 400s in each API's shape and the
/// server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_output_in_both_apis() {
    let s = start(|_| {}).await;
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
        },
        "required": ["name", "age", "pets"],
        "additionalProperties": false,
    });
    let check = |v: &Value| {
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {v}"));
        assert_eq!(obj.len(), 3, "{v}");
        assert!(
            obj["name"]
                .as_str()
                .is_some_and(|n| n.chars().count() <= 20),
            "{v}"
        );
        assert!(
            obj["age"].as_i64().is_some_and(|a| (0..=120).contains(&a)),
            "{v}"
        );
        let pets = obj["pets"].as_array().unwrap();
        assert!(pets.len() <= 3, "{v}");
        assert!(pets
            .iter()
            .all(|p| ["cat", "dog", "fish"].contains(&p.as_str().unwrap())));
    };
    let format = json!({"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}});
    for seed in 0..3 {
        let (status, v) = post(
            &s,
            "/v1/chat/completions",
            chat(
                "Describe a person as JSON.",
                json!({"response_format": format, "max_tokens": 200, "seed": seed, "temperature": 1.0}),
            ),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        let content = v["choices"][0]["message"]["content"].as_str().unwrap();
        check(&serde_json::from_str(content).unwrap_or_else(|e| panic!("{e}: {content}")));
    }
    // Any JSON object.
    let (status, v) = post(
        &s,
        "/v1/chat/completions",
        chat(
            "List three colours.",
            json!({"response_format": {"type": "json_object"}, "max_tokens": 200}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        serde_json::from_str::<Value>(content).is_ok_and(|v| v.is_object()),
        "{content}"
    );
    // Ollama: format schema and "json", generate and chat.
    let (status, v) = post(
        &s,
        "/api/chat",
        json!({"model": MODEL, "stream": false, "format": schema,
               "messages": [{"role": "user", "content": "Describe a person as JSON."}],
               "options": {"num_predict": 200, "temperature": 0}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    check(&serde_json::from_str(v["message"]["content"].as_str().unwrap()).unwrap());
    let (status, v) = post(
        &s,
        "/api/generate",
        json!({"model": MODEL, "stream": false, "format": "json", "prompt": "Give a JSON object with the keys name and age of a cat.",
               "options": {"num_predict": 300, "temperature": 0}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["done_reason"], "stop", "{v}");
    assert!(
        serde_json::from_str::<Value>(v["response"].as_str().unwrap()).is_ok(),
        "{v}"
    );
    // Too few tokens to finish the object: "length", as OpenAI's parse() expects.
    let (status, v) = post(
        &s,
        "/v1/chat/completions",
        chat(
            "Describe a person as JSON.",
            json!({"response_format": format, "max_tokens": 3}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");

    // Hostile or broken schemas: 400 in each API's shape, quickly.
    let mut deep = json!({"type": "string"});
    for _ in 0..100 {
        deep = json!({"type": "object", "properties": {"a": deep}, "required": ["a"]});
    }
    let huge = json!({"type": "object", "properties": (0..5000)
        .map(|i| (format!("field_number_{i}"), json!({"type": "string"})))
        .collect::<serde_json::Map<String, Value>>()});
    let hostile = [
        json!({"type": "object", "properties": {"x": {"enum": []}}, "required": ["x"]}),
        json!({"type": "string", "pattern": "(("}),
        json!({"type": "nonsense"}),
        huge,
    ];
    for schema in &hostile {
        let t = Instant::now();
        let format = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}});
        let (status, v) = post(
            &s,
            "/v1/chat/completions",
            chat("Hi", json!({"response_format": format, "max_tokens": 8})),
        )
        .await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["param"], "response_format", "{v}");
        let (status, v) = post(
            &s,
            "/api/chat",
            json!({"model": MODEL, "stream": false, "format": schema,
                   "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .await;
        assert_eq!(status, 400, "{v}");
        assert!(v["error"].is_string(), "{v}");
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    }
    // Legal but heavy: 100 levels deep, a regex that backtracking engines choke on. Each
    // is answered in bounded time (or refused over the bounds), never a crash or a hang.
    for schema in [
        deep,
        json!({"type": "string", "pattern": "^((a|aa)*b{1000}){1000}$"}),
    ] {
        let t = Instant::now();
        let format =
            json!({"type": "json_schema", "json_schema": {"name": "heavy", "schema": schema}});
        let (status, v) = post(
            &s,
            "/v1/chat/completions",
            chat("Hi", json!({"response_format": format, "max_tokens": 16})),
        )
        .await;
        assert!(status == 200 || status == 400, "{status} {v}");
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    }
    for bad in [
        json!({"type": "xml"}),
        json!("json"),
        json!({"type": "json_schema"}),
    ] {
        let (status, v) = post(
            &s,
            "/v1/chat/completions",
            chat("Hi", json!({"response_format": bad})),
        )
        .await;
        assert_eq!(status, 400, "{v}");
    }
    let (status, v) = post(
        &s,
        "/api/generate",
        json!({"model": MODEL, "prompt": "Hi", "format": "yaml"}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    // Still serving.
    let (status, v) = post(
        &s,
        "/v1/chat/completions",
        chat("Hi", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

/// llama.cpp's `grammar` field: GBNF (as llama.cpp's server reads it) or Lark, on chat and
/// text completions; a broken grammar or one combined with response_format is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gbnf_grammars_as_llama_cpp_takes_them() {
    let s = start(|_| {}).await;
    let gbnf = "# a verdict\nroot ::= \"The answer is \" verdict \".\"\nverdict ::= (\"yes\" | \"no\") ([!]{1,3})?\n";
    let lark = "start: \"The answer is \" VERDICT \".\"\nVERDICT: /(yes|no)(!{1,3})?/\n";
    let re = |t: &str| {
        let rest = t
            .strip_prefix("The answer is ")
            .unwrap_or_else(|| panic!("{t:?}"));
        let rest = rest.strip_suffix('.').unwrap_or_else(|| panic!("{t:?}"));
        let word = rest.trim_end_matches('!');
        assert!(word == "yes" || word == "no", "{t:?}");
        assert!(rest.len() - word.len() <= 3, "{t:?}");
    };
    for grammar in [gbnf, lark] {
        for seed in 0..3 {
            let (status, v) = post(
                &s,
                "/v1/chat/completions",
                json!({"model": MODEL, "max_tokens": 30, "seed": seed, "grammar": grammar,
                       "messages": [{"role": "user", "content": "Is the sky blue?"}]}),
            )
            .await;
            assert_eq!(status, 200, "{v}");
            re(v["choices"][0]["message"]["content"].as_str().unwrap());
        }
        let (status, v) = post(
            &s,
            "/v1/completions",
            json!({"model": MODEL, "max_tokens": 30, "prompt": "Q: Is fire hot?\nA:", "grammar": grammar}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        re(v["choices"][0]["text"].as_str().unwrap());
    }
    // Left recursion is legal (the grammar engine is an Earley parser): answered, bounded.
    let (status, v) = post(
        &s,
        "/v1/chat/completions",
        json!({"model": MODEL, "max_tokens": 12, "grammar": "root ::= root \"a\" | \"b\"",
               "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        text.starts_with('b') && text[1..].chars().all(|c| c == 'a'),
        "{text:?}"
    );
    for (grammar, extra) in [
        ("root ::= \"unterminated", json!({})),
        ("answer ::= \"no root rule\"", json!({})),
        ("root ::= undefined-rule", json!({})),
        (gbnf, json!({"response_format": {"type": "json_object"}})),
    ] {
        let mut body = json!({"model": MODEL, "max_tokens": 4, "grammar": grammar,
                              "messages": [{"role": "user", "content": "Hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, v) = post(&s, "/v1/chat/completions", body).await;
        assert_eq!(status, 400, "{grammar}: {v}");
        assert_eq!(v["error"]["param"], "grammar", "{v}");
    }
}

/// Tokens a grammar forces (here two long keys, after `{` and `,`) go in without sampling,
/// several per forward step: far fewer steps than generated tokens, output still valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_tokens_are_fast_forwarded() {
    let s = start(|_| {}).await;
    let keys = [
        "the_first_rather_long_property_name",
        "another_quite_lengthy_property_name",
    ];
    let schema = json!({
        "type": "object",
        "properties": {keys[0]: {"type": "boolean"}, keys[1]: {"type": "boolean"}},
        "required": keys,
    });
    let before = metric(&s, "hearth_forward_steps_total").await;
    let (status, v) = post(
        &s,
        "/v1/chat/completions",
        json!({"model": MODEL, "max_tokens": 100, "temperature": 0,
               "messages": [{"role": "user", "content": "Two booleans, please."}],
               "response_format": {"type": "json_schema", "json_schema": {"name": "b", "schema": schema}}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let steps = metric(&s, "hearth_forward_steps_total").await - before;
    let out: Value =
        serde_json::from_str(v["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    for k in keys {
        assert!(out[k].is_boolean(), "{out}");
    }
    let tokens = v["usage"]["completion_tokens"].as_f64().unwrap();
    // Without fast-forward: one prompt step plus one step per token after the first.
    assert!(
        steps * 2.0 < tokens,
        "{steps} steps for {tokens} tokens: {out}"
    );
}

/// Tool calls on the synthetic Qwen2 model carrying Qwen2.5's chat template (Hermes
/// `<tool_call>` syntax; random weights: only the grammar makes its calls well formed):
/// OpenAI `tools` with `required`, a named function and `parallel_tool_calls: false`,
/// streamed deltas equal to the whole answer, tool results fed back through the template;
/// Ollama's `tool_calls` with object arguments; a model whose template has no tool syntax
/// answers 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_in_both_apis() {
    tool_calls_on("qwen2-tools").await;
}

/// The same on the synthetic Llama 3 model carrying Llama 3.2-Instruct's template (one
/// `{"name": …, "parameters": {…}}` object as the whole answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama3_tool_calls_in_both_apis() {
    tool_calls_on("llama3-tools").await;
}

async fn tool_calls_on(model: &str) {
    let synthetic = std::env::var_os("HEARTH_SYNTHETIC").map_or_else(
        || std::path::PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/hearth/synthetic"),
        std::path::PathBuf::from,
    );
    let file = synthetic.join(format!("{model}.gguf"));
    assert!(
        file.is_file(),
        "{} missing: run scripts/make-synthetic-models",
        file.display()
    );
    let dir = std::env::temp_dir().join(format!("hearth-tools-{model}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(&file, dir.join(format!("{model}.gguf"))).unwrap();
    std::os::unix::fs::symlink(
        ServerConfig::default()
            .models_dir
            .join("SmolLM2-135M-Instruct.Q4_1.gguf"),
        dir.join("smol.gguf"),
    )
    .unwrap();
    let s = start(|c| {
        c.models_dir = dir.clone();
        c.n_ctx = 2048;
    })
    .await;
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["C", "F"]}}, "required": ["city", "unit"]}}},
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                           "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"]}}},
    ]);
    let ask = |extra: Value| {
        let mut v = json!({"model": model, "tools": tools, "max_tokens": 300, "seed": 7,
                           "messages": [{"role": "user", "content": "What is the weather in Oslo?"}]});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        v
    };
    let check_call = |call: &Value| -> (String, Value) {
        assert_eq!(call["type"], "function", "{call}");
        assert!(call["id"].as_str().is_some_and(|i| !i.is_empty()), "{call}");
        let name = call["function"]["name"].as_str().unwrap().to_string();
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        match name.as_str() {
            "get_weather" => {
                assert!(
                    args["city"]
                        .as_str()
                        .is_some_and(|c| c.chars().count() <= 16),
                    "{args}"
                );
                assert!(args["unit"] == "C" || args["unit"] == "F", "{args}");
                assert_eq!(args.as_object().unwrap().len(), 2, "{args}");
            }
            "add" => {
                for k in ["a", "b"] {
                    assert!(
                        args[k].as_i64().is_some_and(|x| (0..=99).contains(&x)),
                        "{args}"
                    );
                }
            }
            other => panic!("unknown tool {other}"),
        }
        (name, args)
    };

    let (status, v) = post(
        &s,
        "/v1/chat/completions",
        ask(json!({"tool_choice": "required"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert!(!calls.is_empty(), "{v}");
    calls.iter().for_each(|c| {
        check_call(c);
    });

    let named = json!({"tool_choice": {"type": "function", "function": {"name": "add"}},
                       "parallel_tool_calls": false});
    let (status, v) = post(&s, "/v1/chat/completions", ask(named.clone())).await;
    assert_eq!(status, 200, "{v}");
    let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{v}");
    let whole = check_call(&calls[0]);
    assert_eq!(whole.0, "add");

    // Streamed: the call arrives as a delta with an index; same call as the whole answer.
    let mut body = ask(named);
    body["stream"] = json!(true);
    let r = client()
        .post(format!("{}/v1/chat/completions", s.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let deltas: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"].get("tool_calls"))
        .collect();
    assert_eq!(deltas.len(), 1, "{text}");
    assert_eq!(deltas[0][0]["index"], 0, "{text}");
    assert_eq!(check_call(&deltas[0][0]), whole);
    assert_eq!(
        chunks
            .iter()
            .rev()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str()),
        Some("tool_calls")
    );

    // The tool's answer goes back through the template.
    let (status, v) = post(
        &s,
        "/v1/chat/completions",
        json!({"model": model, "tools": tools, "max_tokens": 4, "messages": [
            {"role": "user", "content": "What is 2 + 3?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "add", "arguments": "{\"a\": 2, \"b\": 3}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        ]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // `auto` leaves the model free: text or calls, both well formed.
    let (status, v) = post(&s, "/v1/chat/completions", ask(json!({"max_tokens": 16}))).await;
    assert_eq!(status, 200, "{v}");
    let message = &v["choices"][0]["message"];
    assert!(
        message["content"].is_string() || message["tool_calls"].is_array(),
        "{v}"
    );
    // `none`: no tools at all.
    let (status, v) = post(
        &s,
        "/v1/chat/completions",
        ask(json!({"tool_choice": "none", "max_tokens": 8})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v["choices"][0]["message"].get("tool_calls").is_none(),
        "{v}"
    );

    // Ollama: object arguments.
    let (status, v) = post(
        &s,
        "/api/chat",
        json!({"model": model, "stream": false, "tools": tools, "tool_choice": "required",
               "messages": [{"role": "user", "content": "Weather in Oslo?"}],
               "options": {"num_predict": 300, "seed": 7}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let calls = v["message"]["tool_calls"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"));
    assert!(calls[0]["function"]["arguments"].is_object(), "{v}");

    // Errors: a template without tool syntax, a bad choice, tools with response_format.
    let mut smol = ask(json!({}));
    smol["model"] = json!("smol");
    let (status, v) = post(&s, "/v1/chat/completions", smol).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "tools", "{v}");
    let (status, v) = post(
        &s,
        "/api/chat",
        json!({"model": "smol", "stream": false, "tools": tools, "messages": [{"role": "user", "content": "Hi"}]}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    for extra in [
        json!({"tool_choice": {"type": "function", "function": {"name": "nope"}}}),
        json!({"tool_choice": "sometimes"}),
        json!({"tools": "get_weather"}),
        json!({"tools": [{"type": "function", "function": {"description": "no name"}}]}),
        json!({"response_format": {"type": "json_object"}}),
    ] {
        let (status, v) = post(&s, "/v1/chat/completions", ask(extra)).await;
        assert_eq!(status, 400, "{v}");
    }
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--kv-type q8_0`: the server answers through a quantized KV cache, and concurrent
/// requests still get the texts they get alone (each row's attention is its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantized_kv_cache_serves_and_batches_like_alone() {
    let s = start(|c| {
        c.parallel = 2;
        c.kv_type = hearth_models::KvType::Q8_0;
    })
    .await;
    let (status, v) = post(
        &s,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v["choices"][0]["text"].as_str().unwrap().contains("Paris"),
        "{v}"
    );
    let prompts = ["Why is the sky blue?", "Name a fruit."];
    let alone = chats_one_by_one(&s, &prompts).await;
    let handles = concurrent_chats(&s, &prompts);
    for (h, want) in handles.into_iter().zip(&alone) {
        let v = h.await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    }
}

/// A per-model metric's value (`name{model="…"} value`; 0 when absent).
async fn model_metric(s: &Server, name: &str) -> f64 {
    let (_, text) = get(s, "/metrics").await;
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Chats over one long system prompt sent together: the later ones wait for the first to
/// compute the prompt and take its pages, so it is computed and stored once (the pool's
/// pages metric), and the answers are those of the chats run one by one. Then a chat after
/// them takes the prompt from whichever slot holds it.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_system_prompt_is_stored_once_in_the_kv_pool() {
    let config = |c: &mut ServerConfig| {
        c.parallel = 3;
        c.n_ctx = 2048;
    };
    let system: String = (0..110)
        .map(|i| format!("Rule {i}: shelf {} holds {} jars. ", i * 7 % 31, i % 13))
        .collect();
    let ask = |q: &str| {
        json!({"model": MODEL, "temperature": 0, "max_tokens": 8, "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": q}]})
    };
    let questions = ["Which shelf is first?", "How many rules?", "Name a jar."];
    let alone_server = start(config).await;
    let mut alone = Vec::new();
    let mut one = 0.0;
    for q in &questions {
        let (status, v) = post(&alone_server, "/v1/chat/completions", ask(q)).await;
        assert_eq!(status, 200, "{v}");
        alone.push(v["choices"][0]["message"]["content"].clone());
        if one == 0.0 {
            one = model_metric(&alone_server, "hearth_kv_pages_used").await;
        }
    }
    assert!(one > 0.0, "the pool reports its pages");
    // One by one, each request found the prompt in the slot the last one used.
    assert_eq!(
        model_metric(&alone_server, "hearth_kv_prefix_hits_total").await,
        2.0
    );

    let s = start(config).await;
    let handles: Vec<_> = questions
        .iter()
        .enumerate()
        .map(|(k, q)| {
            let (base, body) = (s.base.clone(), ask(q));
            tokio::spawn(async move {
                // Later ones arrive while the first is part-way through the prompt: they
                // wait for the whole prefix and take it once, not a part and then the rest.
                tokio::time::sleep(std::time::Duration::from_millis(40 * k as u64)).await;
                let r = client()
                    .post(format!("{base}/v1/chat/completions"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                r.json::<Value>().await.unwrap()
            })
        })
        .collect();
    let mut cached = Vec::new();
    for (h, want) in handles.into_iter().zip(&alone) {
        let v = h.await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], *want, "{v}");
        cached.push(v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64());
    }
    cached.sort();
    assert!(
        cached[1] > Some(500),
        "two of three took the prompt: {cached:?}"
    );
    assert_eq!(model_metric(&s, "hearth_kv_prefix_shared_total").await, 2.0);
    let all = model_metric(&s, "hearth_kv_pages_used").await;
    assert!(
        all < one * 1.5,
        "three slots over one system prompt hold {all} pages; one held {one}"
    );
    let free = model_metric(&s, "hearth_kv_pages_free").await;
    assert!(
        free > all,
        "{free} pages free of a budget of 3 x 2048 positions"
    );
}

/// With a KV budget for one long reply, a second request waits at the head of the queue
/// until the first ends, then runs; one that could never fit is refused with the numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_budget_makes_requests_wait_not_grow() {
    let s = start(|c| {
        c.parallel = 2;
        c.kv_budget = Some(300);
    })
    .await;
    let (status, v) = post(
        &s,
        "/v1/chat/completions",
        chat("Say hello.", json!({"max_tokens": 400})),
    )
    .await;
    assert_ne!(status, 200, "{v}");
    assert!(v.to_string().contains("KV budget holds 300"), "{v}");
    let long = |p: &str| {
        let (base, body) = (s.base.clone(), chat(p, json!({"max_tokens": 200})));
        tokio::spawn(async move {
            let r = client()
                .post(format!("{base}/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    let first = long("Write a long essay about the sea.");
    let deadline = Instant::now() + Duration::from_secs(30);
    while model_metric(&s, "hearth_num_requests_running").await < 1.0 {
        assert!(Instant::now() < deadline, "the first request never ran");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let second = long("Write a long story about a cat.");
    let mut saw_wait = false;
    while !first.is_finished() {
        let waiting = model_metric(&s, "hearth_num_requests_waiting").await;
        let running = model_metric(&s, "hearth_num_requests_running").await;
        assert!(running <= 1.0, "two requests over a budget for one");
        saw_wait |= waiting == 1.0 && running == 1.0;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(saw_wait, "the second request waited while the first ran");
    for h in [first, second] {
        let (status, v) = h.await.unwrap();
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 200, "{v}");
    }
}
