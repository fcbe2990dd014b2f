//! The official `openai` and `ollama` Python packages against `hearth serve` on a free
//! loopback port (tests/clients/test_clients.py). Needs `pip install openai ollama`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn official_python_clients_work_against_hearth_serve() {
    let have = Command::new("python3")
        .args(["-c", "import openai, ollama"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have,
        "the Python clients are missing: pip install openai ollama"
    );
    let mut server = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["serve", "--port", "0", "--ctx", "1024", "--parallel", "2"])
        .env("HEARTH_MODELS", common::models_dir())
        .stderr(Stdio::piped())
        .spawn()
        .expect("hearth serve starts");
    // "hearth: serving DIR on http://127.0.0.1:PORT (...)"
    let mut stderr = BufReader::new(server.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/test_clients.py"
        ))
        .arg(&base)
        .output()
        .expect("python3 runs");
    let _ = server.kill();
    let _ = server.wait();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "client tests failed:\n{report}");
}
