//! One decoding token's attention over an f16 cache, every layer in turn, with and without
//! the split by keys and columns (`attention::set_split_attention`; taken only where there
//! are fewer KV heads than threads, as for Gemma3 on 2): microseconds per token.
//! `cargo run --release -p hearth-models --example decode_attention SHAPE KEYS THREADS`,
//! SHAPE `smollm2` (30 layers, 9 heads, 3 KV heads of 64) or `gemma3` (3 full-attention
//! layers, 4 heads, 1 KV head of 256; its 15 window layers see 512 keys).

use half::f16;
use hearth_models::attention::{attention, set_split_attention, AttnScratch, AttnShape};
use hearth_models::kv::KvLayer;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let shape = args.get(1).map_or("smollm2", |s| s.as_str());
    let keys: usize = args.get(2).and_then(|k| k.parse().ok()).unwrap_or(2048);
    let threads: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(2);
    // (layers, heads, KV heads, head_dim, window) of each kind of layer.
    let kinds: Vec<(usize, usize, usize, usize, Option<usize>)> = match shape {
        "gemma3" => vec![(3, 4, 1, 256, None), (15, 4, 1, 256, Some(512))],
        _ => vec![(30, 9, 3, 64, None)],
    };
    hearth_quant::pool::set_threads(threads);
    // Each layer its own cache, so that the caches together outgrow the CPU's caches as a
    // model's do.
    let mut layers = Vec::new();
    for &(count, heads, kv_heads, hd, window) in &kinds {
        for l in 0..count {
            let kv_dim = kv_heads * hd;
            let val = |i: usize| f16::from_f32(((i * 7 + l * 13) % 97) as f32 / 97.0 - 0.5);
            let k: Vec<f16> = (0..keys * kv_dim).map(val).collect();
            let v: Vec<f16> = (0..keys * kv_dim).map(|i| val(i + 5)).collect();
            let q: Vec<f32> = (0..heads * hd)
                .map(|i| (i % 17) as f32 / 17.0 - 0.5)
                .collect();
            let shape = AttnShape {
                n_head: heads,
                n_kv_head: kv_heads,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                window,
                softcap: None,
            };
            layers.push((k, v, q, shape));
        }
    }
    let mut scratch = AttnScratch::default();
    let mut out = vec![0f32; 16 * 256];
    let mut token = |split: bool| {
        set_split_attention(split);
        let t = std::time::Instant::now();
        for (k, v, q, s) in &layers {
            let kv = KvLayer::F16 { k, v };
            attention(q, kv, keys - 1, s, &mut out[..q.len()], &mut scratch);
        }
        t.elapsed().as_secs_f64() * 1e6
    };
    // Interleaved, the best of each kept (the machine is shared).
    let (mut whole, mut split) = (f64::MAX, f64::MAX);
    for _ in 0..40 {
        whole = whole.min(token(false));
        split = split.min(token(true));
    }
    println!(
        "{shape} {keys} keys, {threads} threads: by KV head {whole:.0} µs, split {split:.0} µs per token ({:.2}×)",
        whole / split
    );
}
