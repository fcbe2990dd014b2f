//! Structured output through the official `openai` and `ollama` Python clients
//! (tests/clients/test_structured.py): JSON schemas of nested objects, arrays, enums,
//! patterns and ranges, OpenAI's `parse()` with a Pydantic model, `json_object`, Ollama's
//! `format`; every output validated with `jsonschema` (100% must validate), on SmolLM2,
//! Gemma3 and the synthetic Qwen2 model (random weights: only the grammar keeps its output
//! valid); and tool calling through both clients (tests/clients/test_tools.py) on the
//! synthetic Qwen2 model carrying Qwen2.5's chat template. Needs
//! `pip install openai ollama jsonschema`.

mod common;

use std::process::Command;

fn run_checks(models_dir: &str, model: &str, requests: &str, free_form: bool) {
    let mut extra = vec![requests.to_string()];
    if free_form {
        extra.push("--free-form".into());
    }
    run_script(models_dir, "test_structured.py", model, &extra);
}

/// Runs tests/clients/SCRIPT against `hearth serve --models DIR` for `model`.
fn run_script(models_dir: &str, script: &str, model: &str, extra: &[String]) {
    let (mut server, addr, _stderr) =
        common::spawn_server(&["--ctx", "2048", "--parallel", "2", "--models", models_dir]);
    let mut args = vec![
        format!("{}/tests/clients/{script}", env!("CARGO_MANIFEST_DIR")),
        format!("http://{addr}"),
        model.to_string(),
    ];
    args.extend_from_slice(extra);
    let out = Command::new("python3")
        .args(&args)
        .output()
        .expect("python3 runs");
    let _ = server.kill();
    let _ = server.wait();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("{report}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{model}: {script} failed:\n{report}");
}

fn have_clients() {
    let have = Command::new("python3")
        .args(["-c", "import openai, ollama, jsonschema, pydantic"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        have,
        "the Python packages are missing: pip install openai ollama jsonschema"
    );
}

#[test]
fn structured_output_through_the_official_clients_on_real_models() {
    have_clients();
    let models = common::models_dir();
    let models = models.to_str().unwrap();
    run_checks(models, "smollm2", "50", true);
    run_checks(models, "gemma3", "15", false);
}

/// A folder holding the synthetic `name`.gguf, and SmolLM2 as `smol` (a template without
/// tool syntax).
fn synthetic_folder(name: &str) -> std::path::PathBuf {
    let synthetic = std::env::var_os("HEARTH_SYNTHETIC").map_or_else(
        || {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/hearth/synthetic")
        },
        std::path::PathBuf::from,
    );
    let file = synthetic.join(format!("{name}.gguf"));
    assert!(
        file.is_file(),
        "{} missing: run scripts/make-synthetic-models",
        file.display()
    );
    let dir = std::env::temp_dir().join(format!("hearth-structured-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(&file, dir.join(format!("{name}.gguf"))).unwrap();
    std::os::unix::fs::symlink(common::model_file("smollm2"), dir.join("smol.gguf")).unwrap();
    dir
}

#[test]
fn structured_output_on_the_synthetic_qwen2_model() {
    have_clients();
    let dir = synthetic_folder("qwen2");
    run_checks(dir.to_str().unwrap(), "qwen2", "20", false);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn tool_calls_through_the_official_clients() {
    tools_through_the_clients("qwen2-tools");
}

#[test]
fn llama3_tool_calls_through_the_official_clients() {
    tools_through_the_clients("llama3-tools");
}

/// `tests/clients/test_tools.py` against the synthetic `model` (with a tool-call syntax in
/// its template) and SmolLM2 (without).
fn tools_through_the_clients(model: &str) {
    have_clients();
    let dir = synthetic_folder(model);
    run_script(
        dir.to_str().unwrap(),
        "test_tools.py",
        model,
        &["smol".to_string()],
    );
    let _ = std::fs::remove_dir_all(&dir);
}
