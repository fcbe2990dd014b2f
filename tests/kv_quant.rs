//! The quantized KV cache (`--kv-type q8_0|q4_0`) on the real models against llama.cpp's own
//! KV quantization (scripts/make-kv-goldens): teacher-forced over two texts, hearth with a
//! Q8_0/Q4_0 cache must stay within 2× the mean KL divergence that llama.cpp's `-ctk/-ctv`
//! of the same type adds to its f16-cache logits, and within 2 points of its top-1
//! agreement — at every kernel level the CPU has. The cache itself must take the bytes the
//! type promises.

mod common;

use common::kld;
use hearth_models::{KvType, Model};

#[test]
fn quantized_kv_cache_matches_llama_cpp_by_kl_divergence_at_every_level() {
    if !kld::in_child_per_level(
        "quantized_kv_cache_matches_llama_cpp_by_kl_divergence_at_every_level",
    ) {
        return;
    }
    eprintln!("{}", kld::TABLE_HEADER.replace("fa on/off", "KV quant"));
    let mut failures = Vec::new();
    for name in ["smollm2", "gemma3"] {
        if !kld::real_model_at_this_level(name) {
            continue;
        }
        let mut model = Model::load(common::open(name)).expect("model loads");
        for ty in [KvType::Q8_0, KvType::Q4_0] {
            model.set_kv_type(ty).unwrap();
            let lines = common::golden_lines(&format!("kv/{name}.{}.logits.jsonl", ty.name()));
            let fidelity = kld::teacher_forced(&model, &lines);
            failures.extend(fidelity.judge(&format!("{name} {}", ty.name())));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Q8_0 keeps 34 bytes per 32 values, Q4_0 18: 0.53× and 0.28× of f16's 64.
#[test]
fn quantized_caches_take_their_share_of_f16() {
    let mut model = Model::load(common::open("smollm2")).unwrap();
    let f16 = model.kv_cache_bytes(4096);
    assert_eq!(model.new_cache(4096).bytes() as u64, f16);
    for (ty, per_32) in [(KvType::Q8_0, 34), (KvType::Q4_0, 18)] {
        model.set_kv_type(ty).unwrap();
        assert_eq!(model.kv_cache_bytes(4096), f16 * per_32 / 64, "{ty:?}");
        assert_eq!(
            model.new_cache(4096).bytes() as u64,
            f16 * per_32 / 64,
            "{ty:?}"
        );
    }
}
