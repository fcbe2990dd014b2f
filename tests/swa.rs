//! Sliding-window layers keep only their window (plus one batch) in the KV cache. Their
//! logits must be bit-identical to those over a cache that keeps every position: on prompts
//! several windows long, fed whole and in chunks, while decoding past the window, and after
//! a cached prefix is reused or, once its window is gone, computed again.

mod common;

use hearth_engine::sampling::argmax;
use hearth_models::{KvCache, Model, Scratch};
use hearth_tokenizer::Tokenizer;

/// Feeds `prompt` in chunks of `chunk`, then decodes `steps` greedy tokens; the logits after
/// the prompt and after every step.
fn run(
    model: &Model,
    cache: &mut KvCache,
    prompt: &[u32],
    chunk: usize,
    steps: usize,
) -> Vec<Vec<f32>> {
    let (mut s, mut logits) = (Scratch::default(), Vec::new());
    for part in prompt.chunks(chunk) {
        model.forward(part, cache, &mut s, &mut logits).unwrap();
    }
    let mut out = vec![logits.clone()];
    for _ in 0..steps {
        let t = argmax(&logits);
        model.decode(t, cache, &mut s, &mut logits).unwrap();
        out.push(logits.clone());
    }
    out
}

fn check(
    g: std::sync::Arc<hearth_gguf::Gguf>,
    windows_of_prompt: usize,
    chunks: &[usize],
    steps: usize,
) {
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let model = Model::load(g).unwrap();
    let c = &model.config;
    let window = c.sliding_window.expect("a sliding-window model");
    let text: String = (0..4000)
        .map(|i| format!("Item {i} is worth {} coins. ", i * 7 % 101))
        .collect();
    let mut prompt = tok.encode(&text, true, true);
    prompt.truncate(windows_of_prompt * window);
    let n_ctx = prompt.len() + steps + 8;
    let full = || {
        KvCache::new(
            &vec![None; c.n_layer],
            n_ctx,
            c.kv_dim(),
            hearth_models::KvType::F16,
        )
    };
    let windowed = model.new_cache(n_ctx);
    assert!(
        windowed.bytes() < full().bytes(),
        "{} vs {}",
        windowed.bytes(),
        full().bytes()
    );
    let reference = run(&model, &mut full(), &prompt, 256, steps);
    for &chunk in chunks {
        let mut cache = model.new_cache(n_ctx);
        let got = run(&model, &mut cache, &prompt, chunk, steps);
        for (i, (a, b)) in reference.iter().zip(&got).enumerate() {
            assert!(a == b, "chunks of {chunk}: logits differ at step {i}");
        }
        // Reuse: back to a point whose window is still held, then one whose is not.
        let len = cache.len;
        assert_eq!(cache.truncate(len - 3), len - 3);
        assert_eq!(
            cache.truncate(len / 2),
            0,
            "the window of position {} is gone",
            len / 2
        );
    }
    // A prefix kept and extended gives what computing it all gives.
    let mut cache = model.new_cache(n_ctx);
    let head = &prompt[..prompt.len() - 5];
    run(&model, &mut cache, head, 128, 0);
    let kept = cache.truncate(head.len() - 2);
    assert_eq!(kept, head.len() - 2);
    let again = run(&model, &mut cache, &prompt[kept..], 64, steps);
    assert!(again == reference, "a reused prefix changed the logits");
}

/// Gemma3-270M: a 512-token window on five layers of six; a prompt of three windows.
#[test]
fn gemma3_window_layers_keep_only_their_window() {
    check(common::open("gemma3"), 3, &[256, 100], 20);
}

/// The synthetic Gemma 2: an 8-token window on every other layer; a prompt of 80 windows
/// (over two of its 263-row buffers), in chunks smaller and larger than the window; at every
/// kernel level this CPU has (each level's attention kernel reads the moved rows).
#[test]
fn gemma2_window_layers_keep_only_their_window_at_every_level() {
    if !common::kld::in_child_per_level(
        "gemma2_window_layers_keep_only_their_window_at_every_level",
    ) {
        return;
    }
    check(common::open_synthetic("gemma2"), 80, &[3, 8, 50, 256], 40);
}
