//! Continuous batching: several sequences in one `forward_batch` give the same logits as
//! each run alone (the matrix products see more rows; attention stays per sequence), however
//! a prompt is chunked.
//!
//! Where the CPU has AMX-INT8, the tokens of prompts of at least `i8mat::MIN_TOKENS` tokens
//! run on the tiles and all others on the dot-product kernels, which round differently; the
//! choice goes by what a token is (`Part`), never by the size of its batch. So below a long
//! prompt fed in small chunks beside decoding sequences must give exactly the logits of the
//! same prompt run whole and alone, and so must a short prompt beside long ones.

mod common;

use hearth_engine::sampling::argmax;
use hearth_models::{BatchSeq, Model, Part, Scratch};
use hearth_tokenizer::Tokenizer;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

const STEPS: usize = 4;
/// Prompt tokens per batch for the chunked sequence: below `i8mat::MIN_TOKENS`.
const CHUNK: usize = 5;

fn check(name: &str) {
    check_model(name, common::open(name));
}

fn check_model(name: &str, g: std::sync::Arc<hearth_gguf::Gguf>) {
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let model = Model::load(g).unwrap();
    let vocab = model.config.n_vocab;
    let prompts = [
        "The capital of France is a city on the Seine, and its most famous tower was built for",
        "def fibonacci(n):\n    \"\"\"Returns the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return",
        "Hi! The weather today is",
    ];
    let mut ids: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode(p, true, true)).collect();
    let min = hearth_quant::i8mat::MIN_TOKENS;
    // A vocabulary of short tokens (the synthetic models') makes the prompts long: the
    // chunked one must end by the batch after the others' last, the third stay short.
    ids[1].truncate((STEPS + 2) * CHUNK);
    ids[2].truncate(min - 1);
    assert!(
        ids[0].len() >= min && ids[1].len() >= 2 * CHUNK + min,
        "{name}"
    );
    assert!(ids[2].len() < min, "{name}: the third prompt must be short");

    // Alone: the whole prompt in one call, then greedy steps, logits after each.
    let mut alone = Vec::new();
    for p in &ids {
        let mut cache = model.new_cache(128);
        let (mut s, mut logits) = (Scratch::default(), Vec::new());
        model.forward(p, &mut cache, &mut s, &mut logits).unwrap();
        let mut steps = vec![logits.clone()];
        for _ in 0..STEPS {
            let t = argmax(&logits);
            model.decode(t, &mut cache, &mut s, &mut logits).unwrap();
            steps.push(logits.clone());
        }
        alone.push(steps);
    }

    // Together: sequences 0 and 2 take their whole prompts in the first batch, sequence 1
    // takes `CHUNK` prompt tokens per batch while the others decode.
    let mut caches: Vec<_> = (0..3).map(|_| model.new_cache(128)).collect();
    let (mut s, mut logits) = (Scratch::default(), Vec::new());
    let mut fed = [0usize; 3];
    let mut seen = [0usize; 3];
    let mut next = [0u32; 3];
    let mut worst = 0f32;
    let mut batches = 0;
    while seen.iter().any(|&n| n <= STEPS) {
        let mut seqs = Vec::new();
        let mut who = Vec::new();
        for (i, cache) in caches.iter_mut().enumerate() {
            if seen[i] > STEPS {
                continue;
            }
            let p = &ids[i];
            let (tokens, part) = if fed[i] < p.len() {
                let take = if i == 1 { CHUNK } else { p.len() };
                let to = (fed[i] + take).min(p.len());
                let chunk = &p[fed[i]..to];
                fed[i] = to;
                (chunk, Part::Prompt { len: p.len() })
            } else {
                (std::slice::from_ref(&next[i]), Part::Generated)
            };
            let want_logits = fed[i] == p.len();
            if want_logits {
                who.push(i);
            }
            seqs.push(BatchSeq {
                tokens,
                cache,
                want_logits,
                part,
            });
        }
        model.forward_batch(&mut seqs, &mut s, &mut logits).unwrap();
        batches += 1;
        assert_eq!(logits.len(), who.len() * vocab);
        for (row, &i) in who.iter().enumerate() {
            let got = &logits[row * vocab..(row + 1) * vocab];
            worst = worst.max(max_diff(got, &alone[i][seen[i]]));
            next[i] = argmax(got);
            seen[i] += 1;
        }
    }
    assert!(
        batches > ids[1].len() / CHUNK,
        "{name}: the chunks were batched"
    );
    eprintln!("{name}: batched vs alone in {batches} batches, worst logit difference {worst}");
    assert_eq!(worst, 0.0, "{name}");
}

#[test]
fn smollm2_batch_equals_alone() {
    check("smollm2");
}

#[test]
fn gemma3_batch_equals_alone() {
    check("gemma3");
}

/// Q4_0, IQ4_NL, Q4_1, Q5_0, Q4_K, Q5_K, IQ4_XS and Q3_K rows regrouped eight at a time at load
/// (the `avx2`/`avx512` decoding kernels' layout, IQ4_XS at `avx2` only): batched equals
/// alone on those kernels too, at every level
/// (each in a child process), on the committed llama.cpp quantizations of the synthetic
/// model.
#[test]
fn grouped_rows_batch_equals_alone() {
    if !common::kld::in_child_per_level("grouped_rows_batch_equals_alone") {
        return;
    }
    let level = hearth_quant::dispatch::kernels();
    let kernels = [
        ("Q4_0", level.gemm_q4_0x8.is_some()),
        ("IQ4_NL", level.gemm_iq4_nlx8.is_some()),
        ("Q4_1", level.gemm_q4_1x8.is_some()),
        ("Q5_0", level.gemm_q5_0x8.is_some()),
        ("Q4_K", level.gemm_q4_kx8.is_some()),
        ("Q5_K", level.gemm_q5_kx8.is_some()),
        ("IQ4_XS", level.gemm_iq4_xsx8.is_some()),
        ("Q3_K", level.gemm_q3_kx8.is_some()),
    ];
    for (ty, has_kernel) in kernels {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/golden/quants/models/quant-base.{ty}.gguf"));
        let g = std::sync::Arc::new(hearth_gguf::Gguf::open(&path).expect("model opens"));
        let probe = g.tensor_position("blk.0.ffn_up.weight").unwrap();
        check_model(ty, g.clone());
        let grouped = g.replaced_layout(probe).is_some();
        let expected = has_kernel && g.can_replace_layout();
        eprintln!("{ty} at {}: rows grouped {grouped}", level.isa.name());
        assert_eq!(grouped, expected, "{ty} at {}", level.isa.name());
    }
}
