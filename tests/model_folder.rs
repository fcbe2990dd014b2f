//! A models folder laid out as users keep theirs — their own file names, sub-folders,
//! symlinks to another disk, clashing stems — served by `hearth serve --models DIR` and
//! listed by `hearth list`: every name `list` prints (and each alias it gives) resolves in
//! the CLI and in both HTTP APIs, and the APIs list exactly those names. The models are the
//! small complete GGUFs of `scripts/make-fuzz-seeds` (committed under fuzz/corpus/gguf).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

fn seed(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fuzz/corpus/gguf/tiny-{name}.gguf"))
}

/// The folder, and a second one holding a symlink's target ("another disk").
fn layout() -> (PathBuf, PathBuf) {
    let root = std::env::temp_dir().join(format!("hearth-folder-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (dir, elsewhere) = (root.join("models"), root.join("elsewhere"));
    for d in [
        &dir,
        &elsewhere,
        &dir.join("nested/deeper"),
        &dir.join("other"),
    ] {
        std::fs::create_dir_all(d).unwrap();
    }
    let copy = |from: &str, to: &str| {
        std::fs::copy(seed(from), dir.join(to)).unwrap();
    };
    copy("llama", "smollm2.gguf"); // the case: a short name without the fetch layout
    copy("gemma3", "Tiny Gemma (Q8).gguf");
    copy("llama", "other/model.gguf");
    copy("llama", "dup.gguf");
    copy("gemma3", "dup.GGUF");
    std::fs::write(dir.join("notes.txt"), "not a model").unwrap();
    std::fs::copy(seed("gemma3"), elsewhere.join("gemma.gguf")).unwrap();
    std::os::unix::fs::symlink(
        elsewhere.join("gemma.gguf"),
        dir.join("nested/deeper/model.gguf"),
    )
    .unwrap();
    std::os::unix::fs::symlink(elsewhere.join("missing.gguf"), dir.join("broken.gguf")).unwrap();
    (dir, root)
}

fn hearth(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(common::hearth_bin())
        .args(args)
        .env("HEARTH_MODELS", dir)
        .output()
        .expect("hearth runs")
}

/// One HTTP/1.1 request with `Connection: close`; (status, JSON body).
fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, rest) = raw.split_once("\r\n\r\n").expect("a response head");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(rest).unwrap_or(Value::Null))
}

#[test]
fn every_listed_name_resolves_in_the_cli_and_both_apis() {
    let (dir, root) = layout();

    // What `list` prints, and the warning about the dangling link.
    let out = hearth(&dir, &["list", "--json"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("broken.gguf") && stderr.contains("warning"),
        "{stderr}"
    );
    let listed: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let names: BTreeSet<String> = listed
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    let expected: BTreeSet<String> = [
        "smollm2",
        "Tiny-Gemma-Q8-",
        "nested/deeper/model",
        "other/model",
        "dup",      // dup.GGUF: sorts first
        "dup.gguf", // dup.gguf: its stem is taken, so its file name
    ]
    .map(String::from)
    .into();
    assert_eq!(names, expected);
    let aliases: Vec<(String, String)> = listed
        .iter()
        .flat_map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            e["aliases"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |a| (a.as_str().unwrap().to_string(), name.clone()))
        })
        .collect();
    for (alias, name) in [
        ("smollm2.gguf", "smollm2"),
        ("Tiny Gemma (Q8).gguf", "Tiny-Gemma-Q8-"),
        ("dup.GGUF", "dup"),
        ("nested/deeper/model.gguf", "nested/deeper/model"),
    ] {
        // Names are made valid, so the raw file name with spaces is not an alias; its
        // made-valid form is.
        let alias = alias.replace(" (Q8)", "-Q8-").replace(' ', "-");
        assert!(
            aliases.contains(&(alias.clone(), name.to_string())),
            "{alias} → {name} missing from {aliases:?}"
        );
    }
    // `model` / `model.gguf` would be two files: not an alias of either.
    assert!(!aliases
        .iter()
        .any(|(a, _)| a == "model" || a == "model.gguf"));

    // The CLI: every name and alias runs.
    for name in names.iter().chain(aliases.iter().map(|(a, _)| a)) {
        let out = hearth(&dir, &["run", name, "hi", "-n", "2", "--temperature", "0"]);
        assert!(
            out.status.success(),
            "hearth run {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = hearth(&dir, &["run", "model", "hi", "-n", "2"]);
    assert!(!out.status.success(), "an ambiguous bare stem ran");

    // The server lists exactly these names and answers to each, and to each alias, with
    // and without `:latest`, in both APIs.
    let models = dir.to_str().unwrap();
    let (mut server, addr, _stderr) = common::spawn_server(&["--models", models, "--ctx", "64"]);
    let (status, v1) = http(&addr, "GET", "/v1/models", None);
    assert_eq!(status, 200);
    let v1: BTreeSet<String> = v1["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(v1, names);
    let (status, tags) = http(&addr, "GET", "/api/tags", None);
    assert_eq!(status, 200);
    let tags: BTreeSet<String> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(tags, names);
    let listed_as = |asked: &str| -> String {
        aliases
            .iter()
            .find(|(a, _)| a == asked)
            .map_or(asked.to_string(), |(_, n)| n.clone())
    };
    for asked in names.iter().chain(aliases.iter().map(|(a, _)| a)) {
        for asked in [asked.clone(), format!("{asked}:latest")] {
            let body = json!({"model": asked, "messages": [{"role": "user", "content": "hi"}],
                              "max_tokens": 2, "temperature": 0});
            let (status, r) = http(&addr, "POST", "/v1/chat/completions", Some(&body));
            assert_eq!(status, 200, "{asked}: {r}");
            let bare = asked.strip_suffix(":latest").unwrap_or(&asked);
            assert_eq!(r["model"], listed_as(bare), "{asked}");
            let body = json!({"model": asked, "prompt": "hi", "stream": false,
                              "options": {"num_predict": 2, "temperature": 0}});
            let (status, r) = http(&addr, "POST", "/api/generate", Some(&body));
            assert_eq!(status, 200, "{asked}: {r}");
            let (status, r) = http(&addr, "POST", "/api/show", Some(&json!({"model": asked})));
            assert_eq!(status, 200, "{asked}: {r}");
        }
    }
    let body = json!({"model": "model", "messages": [{"role": "user", "content": "hi"}]});
    let (status, r) = http(&addr, "POST", "/v1/chat/completions", Some(&body));
    assert_eq!(status, 404, "{r}");
    assert!(r["error"]["message"].is_string(), "{r}");
    let _ = server.kill();
    let _ = server.wait();

    // `rm` of a linked model removes the link, never the file it points to.
    let out = hearth(&dir, &["rm", "nested/deeper/model"]);
    assert!(out.status.success());
    assert!(!dir.join("nested/deeper/model.gguf").exists());
    assert!(root.join("elsewhere/gemma.gguf").is_file());
    std::fs::remove_dir_all(root).unwrap();
}
