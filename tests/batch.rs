//! Continuous batching: several sequences in one `forward_batch` give the same logits as
//! each run alone (the matrix products see more rows; attention stays per sequence).
//!
//! A token's result does not depend on its place in a batch, but it does depend on which
//! kernels the batch takes: batches of at least `i8mat::MIN_TOKENS` tokens run on AMX-INT8
//! tiles where the CPU has them, smaller ones on the dot-product kernels, and the two round
//! differently (the 8-bit activations of later layers then differ by a step here and
//! there). So every prompt chunk below is long enough for the tiles, alone and batched, and
//! each "alone" run splits its prompt where the batched run does.

mod common;

use hearth_engine::sampling::argmax;
use hearth_models::{BatchSeq, Model, Scratch};
use hearth_tokenizer::Tokenizer;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check(name: &str) {
    let g = common::open(name);
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let model = Model::load(g).unwrap();
    let vocab = model.config.n_vocab;
    let prompts = [
        "The capital of France is a city on the Seine, and its most famous tower was built for",
        "def fibonacci(n):\n    \"\"\"Returns the n-th Fibonacci number.\"\"\"\n    if n < 2:\n        return",
        "Hi! Could you tell me, in a few short words, what the weather is usually like in",
    ];
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode(p, true, true)).collect();
    for p in &ids {
        assert!(
            p.len() > hearth_quant::i8mat::MIN_TOKENS,
            "{name}: prompt too short"
        );
    }

    // Alone: prompt, then 4 greedy steps, logits after each. The middle prompt goes in as
    // the batched run feeds it: all but its last token, then the last one.
    let mut alone = Vec::new();
    for (i, p) in ids.iter().enumerate() {
        let mut cache = model.new_cache(128);
        let (mut s, mut logits) = (Scratch::default(), Vec::new());
        if i == 1 {
            let (head, last) = p.split_at(p.len() - 1);
            model
                .forward(head, &mut cache, &mut s, &mut logits)
                .unwrap();
            model
                .forward(last, &mut cache, &mut s, &mut logits)
                .unwrap();
        } else {
            model.forward(p, &mut cache, &mut s, &mut logits).unwrap();
        }
        let mut steps = vec![logits.clone()];
        for _ in 0..4 {
            let t = argmax(&logits);
            model
                .forward(&[t], &mut cache, &mut s, &mut logits)
                .unwrap();
            steps.push(logits.clone());
        }
        alone.push(steps);
    }

    // Together: the three prompts in one batch, then decode steps in one batch; the middle
    // sequence skips its logits on the first pass to check the row bookkeeping.
    let mut caches: Vec<_> = (0..3).map(|_| model.new_cache(128)).collect();
    let (mut s, mut logits) = (Scratch::default(), Vec::new());
    let [c0, c1, c2] = &mut caches[..] else {
        unreachable!()
    };
    let mut seqs = [
        BatchSeq {
            tokens: &ids[0],
            cache: c0,
            want_logits: true,
        },
        BatchSeq {
            tokens: &ids[1][..ids[1].len() - 1],
            cache: c1,
            want_logits: false,
        },
        BatchSeq {
            tokens: &ids[2],
            cache: c2,
            want_logits: true,
        },
    ];
    model.forward_batch(&mut seqs, &mut s, &mut logits).unwrap();
    assert_eq!(logits.len(), 2 * vocab);
    let mut worst = max_diff(&logits[..vocab], &alone[0][0]);
    worst = worst.max(max_diff(&logits[vocab..], &alone[2][0]));
    let mut last: Vec<Vec<f32>> = vec![
        logits[..vocab].to_vec(),
        Vec::new(),
        logits[vocab..].to_vec(),
    ];
    // The middle sequence finishes its prompt while the others decode.
    let mut next = [argmax(&last[0]), *ids[1].last().unwrap(), argmax(&last[2])];
    let mut step_of = [1, 0, 1];
    for _ in 0..4 {
        let [c0, c1, c2] = &mut caches[..] else {
            unreachable!()
        };
        let mut seqs = [
            BatchSeq {
                tokens: &next[0..1],
                cache: c0,
                want_logits: true,
            },
            BatchSeq {
                tokens: &next[1..2],
                cache: c1,
                want_logits: true,
            },
            BatchSeq {
                tokens: &next[2..3],
                cache: c2,
                want_logits: true,
            },
        ];
        model.forward_batch(&mut seqs, &mut s, &mut logits).unwrap();
        for i in 0..3 {
            last[i] = logits[i * vocab..(i + 1) * vocab].to_vec();
            worst = worst.max(max_diff(&last[i], &alone[i][step_of[i]]));
            next[i] = argmax(&last[i]);
            step_of[i] += 1;
        }
    }
    eprintln!("{name}: batched vs alone, worst logit difference {worst}");
    assert!(worst < 1e-3, "{name}: {worst}");
}

#[test]
fn smollm2_batch_equals_alone() {
    check("smollm2");
}

#[test]
fn gemma3_batch_equals_alone() {
    check("gemma3");
}
