//! A decoding token's attention split by keys and columns (`attention::attend_split`, taken
//! over an f16 cache when there are fewer KV heads than threads and the token sees 1024 keys
//! or more), or by parts of a KV head's query rows (over a Q8_0/Q4_0 cache from 512 keys),
//! gives the bits of the path by KV head: the logits of decode steps at 1030–1035 positions
//! with the split on and off, on the same threads.

mod common;

use hearth_engine::sampling::argmax;
use hearth_models::attention::set_split_attention;
use hearth_models::kv::KvType;
use hearth_models::{Model, Scratch};

/// Logits of `steps` greedy decode steps after a 1030-token prompt, on `threads` threads,
/// with the split on or off.
fn decode_logits(model: &Model, threads: usize, split: bool, steps: usize) -> Vec<Vec<f32>> {
    let n_vocab = model.config.n_vocab as u32;
    let prompt: Vec<u32> = (0..1030u32)
        .map(|i| 5 + i * 7919 % (n_vocab - 10))
        .collect();
    let mut cache = model.new_cache(prompt.len() + steps + 1);
    let (mut s, mut logits) = (Scratch::default(), Vec::new());
    hearth_quant::pool::set_threads(threads);
    set_split_attention(split);
    model
        .forward(&prompt, &mut cache, &mut s, &mut logits)
        .expect("prefill");
    let mut out = Vec::new();
    for _ in 0..steps {
        let t = argmax(&logits[..model.config.n_vocab]);
        model
            .decode(t, &mut cache, &mut s, &mut logits)
            .expect("decode");
        out.push(logits[..model.config.n_vocab].to_vec());
    }
    set_split_attention(true);
    out
}

fn check(what: &str, model: &Model, threads: usize) {
    let by_head = decode_logits(model, threads, false, 5);
    let split = decode_logits(model, threads, true, 5);
    for (step, (a, b)) in by_head.iter().zip(&split).enumerate() {
        let differ = a
            .iter()
            .zip(b)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
        assert_eq!(
            differ, 0,
            "{what}, {threads} threads: step {step}: {differ} logits differ"
        );
    }
}

/// The committed synthetic model (2 KV heads, so split on 3 threads), at every level.
#[test]
fn split_attention_equals_by_head_at_every_level() {
    if !common::kld::in_child_per_level("split_attention_equals_by_head_at_every_level") {
        return;
    }
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/quants/models/quant-base.Q4_0.gguf");
    let g = std::sync::Arc::new(hearth_gguf::Gguf::open(&path).expect("model opens"));
    let mut model = Model::load(g).expect("model");
    check("quant-base Q4_0", &model, 3);
    for ty in [KvType::Q8_0, KvType::Q4_0] {
        model.set_kv_type(ty).expect("cache type");
        check(&format!("quant-base Q4_0, {} cache", ty.name()), &model, 3);
    }
}

/// Gemma3 (1 KV head; windows of 512 keys, so only its full-attention layers split by keys)
/// on two threads, with an f16 and a Q8_0 cache; SmolLM2 (3 KV heads) on four.
#[test]
fn split_attention_equals_by_head_on_real_models() {
    let mut gemma3 = Model::load(common::open("gemma3")).expect("model");
    check("gemma3", &gemma3, 2);
    gemma3.set_kv_type(KvType::Q8_0).expect("cache type");
    check("gemma3, q8_0 cache", &gemma3, 2);
    check(
        "smollm2",
        &Model::load(common::open("smollm2")).expect("model"),
        4,
    );
    hearth_quant::pool::set_threads(2);
}
