//! The `hearth` binary end to end: run (chat template and raw), tokenize, show, errors;
//! and KV-cache prefix reuse across turns.

mod common;

use std::process::Command;

fn hearth(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(args)
        .env("HEARTH_MODELS", common::models_dir())
        .output()
        .expect("hearth runs")
}

#[test]
fn run_answers_through_the_chat_template() {
    for model in ["smollm2", "gemma3"] {
        let out = hearth(&[
            "run",
            model,
            "Why is the sky blue?",
            "--temperature",
            "0",
            "-n",
            "24",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.trim().len() > 20, "{model}: {text:?}");
        assert!(
            !text.contains("<|im_start|>") && !text.contains("<start_of_turn>"),
            "{text:?}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("t/s"), "timing line on stderr: {err}");
    }
}

#[test]
fn raw_greedy_run_is_the_golden_text() {
    let golden = &common::golden_lines("smollm2.generate.jsonl")[0];
    let prompt = golden["prompt"].as_str().unwrap();
    let out = hearth(&[
        "run",
        "smollm2",
        prompt,
        "--raw",
        "--temperature",
        "0",
        "-n",
        "32",
    ]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let text = text.strip_suffix('\n').unwrap_or(&text);
    assert!(
        text == golden["fa_off"].as_str().unwrap() || text == golden["fa_on"].as_str().unwrap(),
        "{text:?}"
    );
}

#[test]
fn same_seed_same_text() {
    let args = [
        "run",
        "smollm2",
        "Tell me a story.",
        "--seed",
        "42",
        "--temperature",
        "1.0",
        "-n",
        "20",
    ];
    let a = hearth(&args);
    let b = hearth(&args);
    assert!(a.status.success());
    assert_eq!(a.stdout, b.stdout);
}

#[test]
fn stop_string_ends_the_text() {
    let out = hearth(&[
        "run",
        "smollm2",
        "The capital of France is",
        "--raw",
        "--temperature",
        "0",
        "-n",
        "32",
        "--stop",
        "United",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, " Paris.\n\nThe \n");
}

#[test]
fn tokenize_json_matches_the_golden_ids() {
    let golden = &common::golden_lines("gemma3.tokenize.jsonl")[10];
    let out = hearth(&[
        "tokenize",
        "gemma3",
        golden["text"].as_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success());
    let ids: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ids, golden["ids"]);
}

#[test]
fn show_describes_the_model() {
    let out = hearth(&["show", "gemma3"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("gemma3") && text.contains("Q4_K") && text.contains("32768"),
        "{text}"
    );
}

#[test]
fn errors_are_clear_and_not_panics() {
    let out = hearth(&["run", "no-such-model", "hi"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no model \"no-such-model\""), "{err}");
    assert!(!err.contains("panicked"));
    let out = hearth(&[
        "run",
        "smollm2",
        &"word ".repeat(200),
        "--raw",
        "--ctx",
        "64",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not fit the context"), "{err}");
    let out = hearth(&["run", "smollm2", "hi", "--top-p", "2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"));
    // A context whose KV cache cannot fit: refused before allocating, not an OOM kill.
    for ctx in ["100000000", "18446744073709551615"] {
        let out = hearth(&["run", "smollm2", "hi", "--ctx", ctx]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("MiB of memory"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn next_turn_reuses_the_cached_prefix() {
    let g = common::open("smollm2");
    let tok = hearth_tokenizer::Tokenizer::from_gguf(&g).unwrap();
    let model = hearth_models::Model::load(g).unwrap();
    let mut s = hearth_engine::Session::new(&model, &tok, 256);
    let turn1 = tok.encode(
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
        false,
        true,
    );
    assert_eq!(s.prefill(&turn1).unwrap(), turn1.len());
    let logits_turn1 = s.logits().to_vec();
    let mut turn2 = turn1.clone();
    turn2.extend(tok.encode(
        "Hi!<|im_end|>\n<|im_start|>user\nMore<|im_end|>\n",
        false,
        true,
    ));
    assert_eq!(
        s.prefill(&turn2).unwrap(),
        turn2.len() - turn1.len(),
        "only the new turn is computed"
    );
    // Re-running a cached prompt recomputes just its last token, with the same logits.
    assert_eq!(s.prefill(&turn1).unwrap(), 1);
    assert_eq!(s.logits(), &logits_turn1[..]);
}

#[test]
fn pull_list_run_rm_in_a_fresh_cache() {
    let cache = std::env::temp_dir().join(format!("hearth-cli-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    std::fs::create_dir_all(&cache).unwrap();
    let in_cache = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(args)
            .env("HEARTH_MODELS", &cache)
            .env("HEARTH_OFFLINE", "1")
            .output()
            .expect("hearth runs")
    };
    let file = common::model_file("smollm2");
    let out = in_cache(&["pull", file.to_str().unwrap(), "--name", "local/smol:q4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8(in_cache(&["list"]).stdout).unwrap();
    assert!(
        listed.contains("local/smol:q4") && listed.contains("Q4_1"),
        "{listed}"
    );
    let out = in_cache(&[
        "run",
        "local/smol:q4",
        "Hi",
        "-n",
        "4",
        "--temperature",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Offline: no network, a clear refusal.
    let out = in_cache(&["pull", "hf.co/org/repo:Q4_K_M"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("HEARTH_OFFLINE"));
    // Names are never paths.
    for bad in ["../../x", "/etc/passwd"] {
        let out = in_cache(&["rm", bad]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("invalid model name"));
    }
    assert!(in_cache(&["rm", "local/smol:q4"]).status.success());
    let listed = String::from_utf8(in_cache(&["list", "--json"]).stdout).unwrap();
    assert_eq!(listed.trim(), "[]");
    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn show_prints_metadata_and_template() {
    let out = hearth(&["show", "smollm2", "--metadata"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("general.license = \"apache-2.0\""), "{text}");
    assert!(
        text.contains("tokenizer.ggml.tokens = [49152 × string]"),
        "{text}"
    );
    let out = hearth(&["show", "smollm2", "--template"]);
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains("<|im_start|>"));
    let out = hearth(&["show", "gemma3", "--template"]);
    assert!(String::from_utf8(out.stdout)
        .unwrap()
        .contains("<start_of_turn>"));
}
