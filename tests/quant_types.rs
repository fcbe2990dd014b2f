//! Every weight type hearth computes with, on the bytes llama.cpp's own `llama-quantize`
//! writes (scripts/make-quant-models: a 2-layer synthetic llama quantized into each type,
//! committed with llama.cpp's logits): mean KL divergence from llama.cpp and top-1
//! agreement within llama.cpp's own flash-attention on/off noise (tests/common/kld.rs), at
//! every kernel level the CPU has.

mod common;

use common::kld;
use hearth_models::Model;
use std::path::PathBuf;
use std::sync::Arc;

const TYPES: &[&str] = &[
    "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ4_NL", "IQ4_XS", "Q3_K_M", "Q4_K_M", "Q5_K_M",
];

fn model_path(ty: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/quants/models")
        .join(format!("quant-base.{ty}.gguf"))
}

#[test]
fn every_type_matches_llama_cpp_by_kl_divergence_at_every_level() {
    if !kld::in_child_per_level("every_type_matches_llama_cpp_by_kl_divergence_at_every_level") {
        return;
    }
    every_type_within_noise(kld::teacher_forced);
}

/// The same texts as prompts: the prompt kernels of every type (AMX tiles where the CPU
/// has them, else the panels) within llama.cpp's noise too.
#[test]
fn every_type_matches_llama_cpp_as_a_prompt_at_every_level() {
    if !kld::in_child_per_level("every_type_matches_llama_cpp_as_a_prompt_at_every_level") {
        return;
    }
    every_type_within_noise(kld::prompt_forced);
}

/// Each type's logits, as `run` computes them over the golden texts, within llama.cpp's own
/// noise (`kld::Fidelity::judge`).
fn every_type_within_noise(run: fn(&Model, &[serde_json::Value]) -> kld::Fidelity) {
    eprintln!("{}", kld::TABLE_HEADER);
    let mut failures = Vec::new();
    for ty in TYPES {
        let g = Arc::new(hearth_gguf::Gguf::open(model_path(ty)).expect("model opens"));
        let model = Model::load(g).expect("model loads");
        let lines = common::golden_lines(&format!("quants/models/quant-base.{ty}.logits.jsonl"));
        failures.extend(run(&model, &lines).judge(ty));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// `hearth show` names the file's mix (`general.file_type`) and counts its tensor types.
#[test]
fn show_names_the_quantization_mix() {
    for (ty, mix, has) in [
        ("Q4_K_M", "Q4_K_M", "Q4_K"),
        ("Q3_K_M", "Q3_K_M", "Q3_K"),
        ("IQ4_XS", "IQ4_XS", "IQ4_XS"),
        ("Q3_K", "Q3_K_S", "Q3_K"),
    ] {
        let path = model_path(ty);
        let out = common::hearth(&["show", path.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with("quantization"))
            .unwrap_or_else(|| panic!("no quantization line: {text}"));
        assert!(line.contains(mix) && line.contains(has), "{ty}: {line}");
    }
}
