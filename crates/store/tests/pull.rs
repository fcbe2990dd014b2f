//! `hearth pull` against a local stand-in for the Hugging Face hub on 127.0.0.1, serving the
//! real SmolLM2 GGUF the way the hub does: a tree listing with LFS hashes, `resolve/main`
//! redirecting to a CDN URL, Range requests and ETags. Variants cut the connection halfway,
//! publish a wrong hash, or announce an absurd Content-Length.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use hearth_store::{PullOptions, Store, StoreError};

const MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model() -> &'static (Vec<u8>, String) {
    static MODEL: OnceLock<(Vec<u8>, String)> = OnceLock::new();
    MODEL.get_or_init(|| {
        let path = hearth_store::default_root().join(MODEL_FILE);
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/fetch-models)", path.display()));
        let sha = hearth_store::sha256_file(&path).unwrap();
        (bytes, sha)
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Normal,
    /// The first full download stops after half the bytes.
    CutFirst,
    /// The listing publishes a hash the file does not have.
    WrongHash,
    /// The file comes with `Content-Length: 2^60`.
    HugeLength,
    /// `resolve/main` redirects to a CDN on another port of 127.0.0.1.
    CdnAt(u16),
}

/// (path, Range header, Authorization header) of every request.
type Log = Mutex<Vec<(String, Option<String>, Option<String>)>>;

struct Hub {
    addr: String,
    requests: Arc<Log>,
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn serve(mut stream: TcpStream, mode: Mode, requests: &Log, full_gets: &AtomicUsize) {
    let (bytes, sha) = model();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let (mut range, mut auth) = (None, None);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_string());
            } else if k.eq_ignore_ascii_case("authorization") {
                auth = Some(v.trim().to_string());
            }
        }
    }
    requests
        .lock()
        .unwrap()
        .push((path.clone(), range.clone(), auth));
    let len = bytes.len();
    match path.as_str() {
        "/api/models/org/repo/tree/main?recursive=true" => {
            let oid = if mode == Mode::WrongHash {
                "ab".repeat(32)
            } else {
                sha.clone()
            };
            let listing = serde_json::json!([
                {"type": "file", "path": "README.md", "size": 10},
                {"type": "file", "path": "model-Q4_1.gguf", "size": 134,
                 "lfs": {"oid": oid, "size": len, "pointerSize": 134}},
                {"type": "file", "path": "model-Q8_0.gguf", "size": 134,
                 "lfs": {"oid": oid, "size": len, "pointerSize": 134}},
            ]);
            let body = listing.to_string();
            respond(
                &mut stream,
                "200 OK",
                &[("Content-Length", body.len().to_string())],
                body.as_bytes(),
            );
        }
        "/org/repo/resolve/main/model-Q4_1.gguf" => respond(
            &mut stream,
            "302 Found",
            &[
                (
                    "Location",
                    match mode {
                        Mode::CdnAt(port) => format!("http://127.0.0.1:{port}/cdn/blob?sig=x"),
                        _ => "/cdn/blob?sig=x".to_string(),
                    },
                ),
                ("X-Linked-Etag", format!("\"{sha}\"")),
                ("Content-Length", "0".to_string()),
            ],
            b"",
        ),
        "/cdn/blob?sig=x" | "/plain/model.gguf" => {
            let etag = ("ETag", format!("\"{sha}\""));
            if mode == Mode::HugeLength {
                respond(
                    &mut stream,
                    "200 OK",
                    &[("Content-Length", (1u64 << 60).to_string()), etag],
                    &bytes[..1024],
                );
            } else if let Some(start) = range
                .as_deref()
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|s| s.parse::<usize>().ok())
                .filter(|&s| s < len)
            {
                respond(
                    &mut stream,
                    "206 Partial Content",
                    &[
                        ("Content-Length", (len - start).to_string()),
                        ("Content-Range", format!("bytes {start}-{}/{len}", len - 1)),
                        etag,
                    ],
                    &bytes[start..],
                );
            } else {
                let first = full_gets.fetch_add(1, Ordering::SeqCst) == 0;
                let body = if mode == Mode::CutFirst && first {
                    &bytes[..len / 2]
                } else {
                    &bytes[..]
                };
                respond(
                    &mut stream,
                    "200 OK",
                    &[("Content-Length", len.to_string()), etag],
                    body,
                );
            }
        }
        _ => respond(
            &mut stream,
            "404 Not Found",
            &[("Content-Length", "0".to_string())],
            b"",
        ),
    }
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

fn hub(mode: Mode) -> Hub {
    hub_on(TcpListener::bind("127.0.0.1:0").unwrap(), mode)
}

fn hub_on(listener: TcpListener, mode: Mode) -> Hub {
    model();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let full_gets = Arc::new(AtomicUsize::new(0));
    let r = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (r, f) = (r.clone(), full_gets.clone());
            std::thread::spawn(move || serve(stream, mode, &r, &f));
        }
    });
    Hub { addr, requests }
}

fn temp_store() -> (Store, PathBuf) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "hearth-store-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    (Store::new(&dir), dir)
}

fn opts(hub: &Hub) -> PullOptions {
    PullOptions {
        name: None,
        sha256: None,
        hf_endpoint: hub.addr.clone(),
        hf_token: None,
        offline: false,
        progress: false,
        attempts: 3,
    }
}

/// Files under blobs/ and manifests/ (anything a failed pull must not leave behind).
fn cached_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn pulls_from_the_hub_then_lists_resolves_and_removes() {
    let hub = hub(Mode::Normal);
    let (store, dir) = temp_store();
    let m = store.pull("hf.co/org/repo:Q4_1", &opts(&hub)).unwrap();
    let (bytes, sha) = model();
    assert_eq!(m.name, "hf.co/org/repo:Q4_1");
    assert_eq!(m.digest, format!("sha256:{sha}"));
    assert_eq!(m.size, bytes.len() as u64);
    let paths: Vec<String> = hub
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.0.clone())
        .collect();
    assert_eq!(
        paths,
        [
            "/api/models/org/repo/tree/main?recursive=true",
            "/org/repo/resolve/main/model-Q4_1.gguf",
            "/cdn/blob?sig=x"
        ]
    );
    let path = store.resolve("hf.co/org/repo:Q4_1").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), *bytes);
    hearth_gguf::Gguf::open(&path).unwrap();
    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "hf.co/org/repo:Q4_1");

    // A second name for the same bytes shares the blob; removing one keeps it.
    let mut o = opts(&hub);
    o.name = Some("mine".into());
    store.pull("org/repo/model-Q4_1.gguf", &o).unwrap();
    assert_eq!(store.resolve("mine").unwrap(), path);
    store.remove("hf.co/org/repo:Q4_1").unwrap();
    assert!(path.is_file());
    assert!(matches!(
        store.resolve("hf.co/org/repo:Q4_1"),
        Err(StoreError::NotFound(_))
    ));
    let removed = store.remove("mine").unwrap();
    assert!(removed.contains(&path));
    assert!(cached_files(&dir).is_empty(), "{:?}", cached_files(&dir));
    assert!(matches!(store.remove("mine"), Err(StoreError::NotFound(_))));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn ambiguous_or_missing_quant_is_an_error_naming_the_files() {
    let hub = hub(Mode::Normal);
    let (store, dir) = temp_store();
    let e = store
        .pull("hf.co/org/repo", &opts(&hub))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model-Q4_1.gguf") && e.contains("model-Q8_0.gguf"),
        "{e}"
    );
    let e = store
        .pull("hf.co/org/repo:Q2_K", &opts(&hub))
        .unwrap_err()
        .to_string();
    assert!(e.contains("no GGUF for Q2_K"), "{e}");
    assert!(cached_files(&dir).is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn resumes_with_a_range_request_after_the_connection_drops() {
    let hub = hub(Mode::CutFirst);
    let (store, dir) = temp_store();
    let m = store.pull("hf.co/org/repo:Q4_1", &opts(&hub)).unwrap();
    let (bytes, sha) = model();
    assert_eq!(m.digest, format!("sha256:{sha}"));
    let ranges: Vec<Option<String>> = hub
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.0.starts_with("/cdn/"))
        .map(|r| r.1.clone())
        .collect();
    assert_eq!(ranges, [None, Some(format!("bytes={}-", bytes.len() / 2))]);
    assert_eq!(
        std::fs::read(store.resolve(&m.name).unwrap()).unwrap(),
        *bytes
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_wrong_hash_is_rejected_and_nothing_stays_in_the_cache() {
    let hub = hub(Mode::WrongHash);
    let (store, dir) = temp_store();
    let e = store.pull("hf.co/org/repo:Q4_1", &opts(&hub)).unwrap_err();
    assert!(matches!(e, StoreError::HashMismatch { .. }), "{e}");
    assert!(cached_files(&dir).is_empty(), "{:?}", cached_files(&dir));
    assert!(store.list().unwrap().is_empty());
    // A sha256 given by the user is checked the same way.
    let mut o = opts(&hub);
    o.sha256 = Some("cd".repeat(32));
    let e = store
        .pull(&format!("{}/plain/model.gguf", hub.addr), &o)
        .unwrap_err();
    assert!(matches!(e, StoreError::HashMismatch { .. }), "{e}");
    assert!(cached_files(&dir).is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_huge_content_length_is_refused_before_writing() {
    let hub = hub(Mode::HugeLength);
    let (store, dir) = temp_store();
    // The hub published the real size: the announced one contradicts it.
    let e = store.pull("hf.co/org/repo:Q4_1", &opts(&hub)).unwrap_err();
    assert!(matches!(e, StoreError::SizeMismatch { .. }), "{e}");
    // A plain URL has no published size: 2^60 bytes do not fit on this disk.
    let e = store
        .pull(&format!("{}/plain/model.gguf", hub.addr), &opts(&hub))
        .unwrap_err();
    assert!(matches!(e, StoreError::NoSpace { .. }), "{e}");
    assert!(cached_files(&dir).is_empty(), "{:?}", cached_files(&dir));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn plain_urls_are_checked_against_the_etag_hash() {
    let hub = hub(Mode::Normal);
    let (store, dir) = temp_store();
    let m = store
        .pull(&format!("{}/plain/model.gguf", hub.addr), &opts(&hub))
        .unwrap();
    assert_eq!(m.name, "model:latest");
    assert_eq!(m.digest, format!("sha256:{}", model().1));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_names_and_offline_mode_make_no_request() {
    let hub = hub(Mode::Normal);
    let (store, dir) = temp_store();
    for name in ["../../x", "/etc/passwd", "a/../../b", "x:../y", ".."] {
        let mut o = opts(&hub);
        o.name = Some(name.into());
        let e = store.pull("hf.co/org/repo:Q4_1", &o).unwrap_err();
        assert!(matches!(e, StoreError::InvalidName { .. }), "{name}: {e}");
    }
    for source in [
        "hf.co/../x",
        "hf.co/org/..",
        "../../x.gguf",
        "org/../x.gguf",
    ] {
        let e = store.pull(source, &opts(&hub)).unwrap_err();
        assert!(matches!(e, StoreError::BadSource(_)), "{source}: {e}");
    }
    for name in ["../../x", "/etc/passwd", "..", "a/./b"] {
        assert!(
            matches!(store.resolve(name), Err(StoreError::InvalidName { .. })),
            "{name}"
        );
        assert!(
            matches!(store.remove(name), Err(StoreError::InvalidName { .. })),
            "{name}"
        );
    }
    let mut o = opts(&hub);
    o.offline = true;
    let e = store.pull("hf.co/org/repo:Q4_1", &o).unwrap_err();
    assert!(matches!(e, StoreError::Offline(_)), "{e}");
    assert!(hub.requests.lock().unwrap().is_empty());
    assert!(cached_files(&dir).is_empty());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn imports_a_local_file() {
    let (store, dir) = temp_store();
    let src = hearth_store::default_root().join(MODEL_FILE);
    let mut o = PullOptions::from_env();
    o.progress = false;
    o.offline = true; // a local import needs no network
    let m = store.pull(src.to_str().unwrap(), &o).unwrap();
    assert_eq!(m.name, "SmolLM2-135M-Instruct.Q4_1:latest");
    assert_eq!(m.digest, format!("sha256:{}", model().1));
    assert!(store.resolve("SmolLM2-135M-Instruct.Q4_1").is_ok());
    // Not a GGUF: refused, nothing cached.
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"not a model").unwrap();
    assert!(matches!(
        store.pull(junk.to_str().unwrap(), &o),
        Err(StoreError::NotGguf(_))
    ));
    std::fs::remove_dir_all(dir).unwrap();
}

/// Two listeners on 127.0.0.1 whose ports share a prefix: `:P` and `:P<digit>`, so the
/// second's URL starts with the first's (`http://127.0.0.1:800` / `http://127.0.0.1:8001`).
fn prefix_sharing_ports() -> (TcpListener, TcpListener) {
    for p in (1500..6553u32).step_by(97) {
        let Ok(short) = TcpListener::bind(("127.0.0.1", p as u16)) else {
            continue;
        };
        for d in 0..10 {
            if let Ok(long) = TcpListener::bind(("127.0.0.1", (p * 10 + d) as u16)) {
                return (short, long);
            }
        }
    }
    panic!("no free pair of ports with a shared prefix on 127.0.0.1");
}

fn authorizations(hub: &Hub) -> Vec<(String, Option<String>)> {
    let log = hub.requests.lock().unwrap();
    log.iter().map(|r| (r.0.clone(), r.2.clone())).collect()
}

#[test]
fn the_token_goes_to_the_hub_only_never_to_a_look_alike_or_a_redirect_target() {
    let (short, long) = prefix_sharing_ports();
    let other_port = long.local_addr().unwrap().port();
    let other = hub_on(long, Mode::Normal);
    let hub = hub_on(short, Mode::CdnAt(other_port));
    assert!(
        other.addr.starts_with(&hub.addr),
        "{} {}",
        other.addr,
        hub.addr
    );
    let mut o = opts(&hub);
    o.hf_token = Some("hf_secret".into());

    // A plain URL whose text starts with the hub's: the token must not go.
    let (store, dir) = temp_store();
    store
        .pull(&format!("{}/plain/model.gguf", other.addr), &o)
        .unwrap();
    // From the hub, whose resolve redirects to the other server: the hub gets the token on
    // both its requests, the redirect target never.
    store.pull("hf.co/org/repo:Q4_1", &o).unwrap();
    let bearer = Some("Bearer hf_secret".to_string());
    assert_eq!(
        authorizations(&hub),
        [
            (
                "/api/models/org/repo/tree/main?recursive=true".to_string(),
                bearer.clone()
            ),
            ("/org/repo/resolve/main/model-Q4_1.gguf".to_string(), bearer)
        ]
    );
    let seen = authorizations(&other);
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|(_, a)| a.is_none()), "{seen:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn same_origin_compares_scheme_host_and_port_exactly() {
    let hf = "https://huggingface.co";
    let yes = [
        "https://huggingface.co/x.gguf",
        "https://HuggingFace.co/x.gguf",
        "https://huggingface.co:443/a/b",
    ];
    let no = [
        "https://huggingface.co.evil.example/x.gguf",
        "https://evil.example/huggingface.co/x.gguf",
        "http://huggingface.co/x.gguf",
        "https://huggingface.co:8443/x.gguf",
        "https://huggingface.co@evil.example/x.gguf",
        "https://cdn-lfs.huggingface.co/x",
    ];
    for u in yes {
        let url = reqwest::Url::parse(u).unwrap();
        assert!(hearth_store::pull::same_origin(&url, hf), "{u}");
    }
    for u in no {
        let url = reqwest::Url::parse(u).unwrap();
        assert!(!hearth_store::pull::same_origin(&url, hf), "{u}");
    }
    let url = reqwest::Url::parse("http://127.0.0.1:8001/x").unwrap();
    assert!(!hearth_store::pull::same_origin(
        &url,
        "http://127.0.0.1:800"
    ));
}
