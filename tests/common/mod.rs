//! Shared helpers for end-to-end tests: locating the fetched models and the goldens.
#![allow(dead_code)]

pub mod kld;

use std::path::PathBuf;
use std::sync::Arc;

pub fn models_dir() -> PathBuf {
    match std::env::var_os("HEARTH_MODELS") {
        Some(d) => PathBuf::from(d),
        None => {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/hearth/models")
        }
    }
}

pub fn model_file(name: &str) -> PathBuf {
    let file = match name {
        "smollm2" => "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma3" => "gemma-3-270m-q4_k_m.gguf",
        other => panic!("unknown test model {other}"),
    };
    let p = models_dir().join(file);
    assert!(
        p.is_file(),
        "{} missing: run scripts/fetch-models first",
        p.display()
    );
    p
}

/// The sentence-transformers directory of `scripts/fetch-models minilm`.
pub fn minilm_dir() -> PathBuf {
    let p = models_dir().join("all-MiniLM-L6-v2");
    assert!(
        p.join("model.safetensors").is_file(),
        "{} missing: run scripts/fetch-models minilm",
        p.display()
    );
    p
}

pub fn open(name: &str) -> Arc<hearth_gguf::Gguf> {
    Arc::new(hearth_gguf::Gguf::open(model_file(name)).expect("model opens"))
}

/// `name`.gguf of `scripts/make-synthetic-models` (`$HEARTH_SYNTHETIC` or
/// ~/.cache/hearth/synthetic).
pub fn synthetic_file(name: &str) -> PathBuf {
    let dir = std::env::var_os("HEARTH_SYNTHETIC").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/hearth/synthetic"),
        PathBuf::from,
    );
    let p = dir.join(format!("{name}.gguf"));
    assert!(
        p.is_file(),
        "{} missing: run scripts/make-synthetic-models",
        p.display()
    );
    p
}

pub fn open_synthetic(name: &str) -> Arc<hearth_gguf::Gguf> {
    Arc::new(hearth_gguf::Gguf::open(synthetic_file(name)).expect("model opens"))
}

pub fn golden_lines(file: &str) -> Vec<serde_json::Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(file);
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("golden line is JSON"))
        .collect()
}

/// The `hearth` binary cargo built for these tests.
#[cfg(feature = "cli")]
pub fn hearth_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hearth")
}

/// Built without the `cli` feature (as .ci's aarch64 stage builds the model tests, none of
/// which runs the binary) there is no `hearth` binary.
#[cfg(not(feature = "cli"))]
pub fn hearth_bin() -> &'static str {
    panic!("no hearth binary: build the tests with the default `cli` feature")
}

/// `hearth serve --port 0 ARGS` on the fetched models; returns the process, its
/// `127.0.0.1:PORT` (from the first stderr line) and the rest of its stderr.
pub fn spawn_server(
    args: &[&str],
) -> (
    std::process::Child,
    String,
    std::io::BufReader<std::process::ChildStderr>,
) {
    use std::io::BufRead;
    let mut server = std::process::Command::new(hearth_bin())
        .args(["serve", "--port", "0"])
        .args(args)
        .env("HEARTH_MODELS", models_dir())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("hearth serve starts");
    // "hearth: serving DIR on http://127.0.0.1:PORT (...)"
    let mut stderr = std::io::BufReader::new(server.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (server, addr, stderr)
}

/// The `hearth` binary with `args`, on the fetched models.
pub fn hearth(args: &[&str]) -> std::process::Output {
    hearth_at_level(args, None)
}

/// [`hearth`] with `HEARTH_ISA` set to `level` when given.
pub fn hearth_at_level(args: &[&str], level: Option<&str>) -> std::process::Output {
    let mut cmd = std::process::Command::new(hearth_bin());
    cmd.args(args).env("HEARTH_MODELS", models_dir());
    if let Some(level) = level {
        cmd.env("HEARTH_ISA", level);
    }
    cmd.output().expect("hearth runs")
}
