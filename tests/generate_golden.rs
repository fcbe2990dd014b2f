//! The real models (SmolLM2 Q4_1, Gemma3 Q4_K_M) against llama.cpp, judged as llama.cpp
//! judges its own quants (goldens from scripts/make-goldens):
//!
//! - `NAME.logits.jsonl`: llama.cpp's top-40 logits and log-sum-exp at every step of its
//!   own greedy path (`--temp 0`, 32 tokens, 12 prompts, scripts/peer/logits.c), flash
//!   attention off (the reference) and, teacher-forced on the same tokens, on. hearth walks
//!   the same tokens; its mean KL divergence from llama.cpp and its top-1 agreement must be
//!   within llama.cpp's own flash-attention on/off noise (tests/common/kld.rs), at every
//!   kernel level the CPU has; and again with each prompt and its path run as one prompt
//!   (the prompt kernels), at every SIMD level.
//! - `NAME.generate.jsonl`: llama-completion's greedy texts. They only check that the logits
//!   goldens walked the path llama-completion prints; greedy texts are not the criterion
//!   (llama.cpp's two attention modes give different texts on half the prompts).

mod common;

use common::kld;
use hearth_engine::Session;
use hearth_models::Model;
use hearth_tokenizer::{StreamDecoder, Tokenizer};
use serde_json::Value;

fn ids_of(value: &Value) -> Vec<u32> {
    serde_json::from_value(value.clone()).unwrap()
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> String {
    let mut dec = StreamDecoder::new();
    let mut text = String::new();
    for &id in ids.iter().filter(|&&id| !tok.is_eog(id)) {
        text.push_str(&dec.push(&tok.token_to_piece(id, false)));
    }
    text + &dec.finish()
}

/// hearth teacher-forced along llama.cpp's greedy path of every prompt: one decode step per
/// token, or (`as_prompt`) the prompt and the path run as one prompt, so the products take
/// the prompt kernels (panels, tiles) instead of the decoding ones.
fn fidelity(model_name: &str, as_prompt: bool) -> kld::Fidelity {
    let g = common::open(model_name);
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let model = Model::load(g).unwrap();
    let cases = common::golden_lines(&format!("{model_name}.logits.jsonl"));
    let texts = common::golden_lines(&format!("{model_name}.generate.jsonl"));
    assert!(cases.len() >= 10);
    assert_eq!(cases.len(), texts.len());
    // Under emulation (.ci's aarch64 stage, ~50× slower) `HEARTH_GOLDEN_PROMPTS=N` walks the
    // first N prompts only.
    let prompts = std::env::var("HEARTH_GOLDEN_PROMPTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases.len());
    let mut fidelity = kld::Fidelity::default();
    for (case, text) in cases.iter().zip(&texts).take(prompts) {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(text["prompt"].as_str(), Some(prompt));
        let ids = ids_of(&case["ids"]);
        assert_eq!(tok.encode(prompt, true, true), ids, "{prompt:?}");
        let (off, on) = (
            case["off"].as_array().unwrap(),
            case["on"].as_array().unwrap(),
        );
        assert_eq!(off.len(), on.len());
        let path: Vec<u32> = off
            .iter()
            .map(|s| s["token"].as_u64().unwrap() as u32)
            .collect();
        assert_eq!(decode(&tok, &path), text["fa_off"].as_str().unwrap());
        if as_prompt {
            // llama.cpp's path ends at its first end-of-generation token, which is never fed.
            let fed = &path[..path.len() - 1];
            assert!(!fed.iter().any(|&t| tok.is_eog(t)), "{prompt:?}");
            let all: Vec<u32> = ids.iter().chain(fed).copied().collect();
            fidelity.add_prompt(&model, &all, ids.len() - 1, off, on);
            continue;
        }
        let mut session = Session::new(&model, &tok, 512);
        session.prefill(&ids).unwrap();
        for ((off, on), &token) in off.iter().zip(on).zip(&path) {
            fidelity.add(off, on, session.logits());
            if !tok.is_eog(token) {
                session.step(token).unwrap();
            }
        }
    }
    fidelity
}

#[test]
fn real_models_match_llama_cpp_by_kl_divergence_at_every_level() {
    if !kld::in_child_per_level("real_models_match_llama_cpp_by_kl_divergence_at_every_level") {
        return;
    }
    real_models_match(false);
}

/// The same goldens with each prompt and its path run as one prompt: the prompt kernels on
/// the real models' weights within llama.cpp's noise too.
#[test]
fn real_models_match_llama_cpp_as_a_prompt_at_every_simd_level() {
    // Not at the scalar level: its prompt products are its decoding dot products, token by
    // token (`dispatch::Kernels::scalar`), which the decoding test above judges there.
    if !kld::in_child_per_simd_level("real_models_match_llama_cpp_as_a_prompt_at_every_simd_level")
    {
        return;
    }
    real_models_match(true);
}

fn real_models_match(as_prompt: bool) {
    eprintln!("{}", kld::TABLE_HEADER);
    let mut failures = Vec::new();
    for name in ["smollm2", "gemma3"] {
        // Under emulation (qemu, .ci/run's aarch64 stage) only the models it names run.
        if std::env::var("HEARTH_GOLDEN_MODELS")
            .is_ok_and(|only| !only.split(',').any(|m| m == name))
        {
            eprintln!("{name}: skipped (HEARTH_GOLDEN_MODELS)");
            continue;
        }
        if !kld::real_model_at_this_level(name) {
            continue;
        }
        failures.extend(fidelity(name, as_prompt).judge(name));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}
