//! The official `openai` and `ollama` Python packages against `hearth serve` on a free
//! loopback port (tests/clients/test_clients.py). Needs `pip install openai ollama`.

mod common;

use std::process::Command;

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
    let (mut server, addr, _stderr) = common::spawn_server(&["--ctx", "1024", "--parallel", "2"]);
    let base = format!("http://{addr}");
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
