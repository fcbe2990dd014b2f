//! The architectures without a small real model offline (qwen2, qwen3, Llama 3.x) checked
//! against llama.cpp on the synthetic models of `scripts/make-synthetic-models` (random
//! weights, the real Qwen2 tokenizer), with goldens from `scripts/make-family-goldens`:
//!
//! - tokenization under the `deepseek-r1-qwen` (qwen2) and `llama-bpe` (Llama 3)
//!   pre-tokenizers: id-exact on the tricky-string corpus;
//! - logits at every position of three texts, teacher-forced: mean KL divergence
//!   KLD(llama.cpp ‖ hearth) and top-1 agreement against llama.cpp's own flash-attention
//!   on/off noise on the same positions (tests/common/kld.rs), at every kernel level; and
//!   the same texts each run as one prompt, at every SIMD level.

mod common;

use common::kld;

use std::sync::Arc;

use hearth_models::Model;

/// The synthetic models with llama.cpp logits goldens.
const FAMILIES: [&str; 5] = ["qwen2", "qwen3", "llama3", "gemma2", "phi3"];

fn open(name: &str) -> Arc<hearth_gguf::Gguf> {
    common::open_synthetic(name)
}

#[test]
fn qwen2_and_llama3_pre_tokenizers_match_llama_cpp() {
    for (pre, model) in [("deepseek-r1-qwen", "qwen2"), ("llama-bpe", "llama3")] {
        let g = open(model);
        assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), Some(pre));
        let tok = hearth_tokenizer::Tokenizer::from_gguf(&g).unwrap();
        let lines = common::golden_lines(&format!("families/{pre}.tokenize.jsonl"));
        assert!(lines.len() > 200);
        for l in &lines {
            let text = l["text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(l["ids"].clone()).unwrap();
            assert_eq!(tok.encode(text, true, true), want, "{pre}: {text:?}");
        }
    }
}

/// Every kernel level this CPU has, each in its own process.
#[test]
fn synthetic_models_match_llama_cpp_by_kl_divergence_at_every_level() {
    if !kld::in_child_per_level("synthetic_models_match_llama_cpp_by_kl_divergence_at_every_level")
    {
        return;
    }
    every_family_within_noise(kld::teacher_forced);
}

/// The same texts as prompts: each family's prompt path (batched attention, the prompt
/// kernels) within llama.cpp's noise too. At the SIMD levels only: the forward pass is the
/// same Rust code at every level, and the scalar level's products are the reference the
/// kernel tests compare every level with.
#[test]
fn synthetic_models_match_llama_cpp_as_a_prompt_at_every_simd_level() {
    if !kld::in_child_per_simd_level(
        "synthetic_models_match_llama_cpp_as_a_prompt_at_every_simd_level",
    ) {
        return;
    }
    every_family_within_noise(kld::prompt_forced);
}

/// Each family's logits, as `run` computes them over the golden texts, within llama.cpp's
/// own noise (`kld::Fidelity::judge`).
fn every_family_within_noise(run: fn(&Model, &[serde_json::Value]) -> kld::Fidelity) {
    let mut failures = Vec::new();
    eprintln!("{}", kld::TABLE_HEADER);
    for name in FAMILIES {
        let model = Model::load(open(name)).expect("model loads");
        let lines = common::golden_lines(&format!("families/{name}.logits.jsonl"));
        failures.extend(run(&model, &lines).judge(name));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Qwen3's thinking switch reaches its template (`chat_template_kwargs` in the OpenAI API,
/// `think` in Ollama's): off adds the empty think block after the assistant's turn opens.
#[test]
fn qwen3_template_renders_the_thinking_switch() {
    use hearth_tokenizer::template::{Kwargs, Message};
    let loaded = hearth_engine::LoadedModel::from_gguf(open("qwen3")).unwrap();
    let msgs = [Message::new("user", "Hello")];
    let tok = &loaded.tokenizer;
    let text = |ids: &[u32]| -> String {
        ids.iter()
            .flat_map(|&i| tok.token_to_piece(i, true))
            .map(char::from)
            .collect::<String>()
    };
    let default = loaded.chat_tokens(&msgs).unwrap();
    let mut kw = Kwargs::new();
    kw.insert("enable_thinking".into(), serde_json::Value::Bool(false));
    let off = loaded.chat_tokens_with(&msgs, &kw).unwrap();
    assert!(!text(&default).contains("<think>"));
    assert!(
        text(&off).ends_with("assistant\n<think>\n\n</think>\n\n"),
        "{:?}",
        text(&off)
    );
    assert_eq!(&off[..default.len()], &default[..]);
}
