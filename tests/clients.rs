//! The official `openai` and `ollama` Python packages against `hearth serve` on a free
//! loopback port (tests/clients/test_clients.py), over a folder laid out as a user's own:
//! `smollm2.gguf` (a plain file) and `my-smol.gguf` (a symlink to a model kept elsewhere),
//! both used by file stem, plus the embedding model. Needs `pip install openai ollama`.

mod common;

use std::path::Path;
use std::process::Command;

/// `link` as a hard link to `target` (a plain file, as a copy would be), else a copy.
fn plain_file(target: &Path, link: &Path) {
    if std::fs::hard_link(target, link).is_err() {
        std::fs::copy(target, link).unwrap();
    }
}

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
    let dir = std::env::temp_dir().join(format!("hearth-clients-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    plain_file(&common::model_file("smollm2"), &dir.join("smollm2.gguf"));
    std::os::unix::fs::symlink(common::model_file("smollm2"), dir.join("my-smol.gguf")).unwrap();
    std::os::unix::fs::symlink(common::minilm_dir(), dir.join("all-MiniLM-L6-v2")).unwrap();

    let models = dir.to_str().unwrap();
    let (mut server, addr, _stderr) =
        common::spawn_server(&["--ctx", "1024", "--parallel", "2", "--models", models]);
    let base = format!("http://{addr}");
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/test_clients.py"
        ))
        .args([base.as_str(), "smollm2", "my-smol"])
        .output()
        .expect("python3 runs");
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "client tests failed:\n{report}");
}
