//! The shared KV pool (`hearth serve`'s caches): a pooled cache computes the same logits,
//! bit for bit, as one that owns its buffers; a sequence that takes another's prompt prefix
//! from the pool computes what computing that prefix itself gives, and the prefix is stored
//! once — while the donor goes on writing, or starts over on another prompt.
#![cfg(target_os = "linux")]

mod common;

use std::sync::Arc;

use hearth_engine::sampling::argmax;
use hearth_models::{KvCache, KvType, Model, Scratch};
use hearth_tokenizer::Tokenizer;

/// Feeds `tokens` in chunks of `chunk`, then decodes `steps` greedy tokens; the logits after
/// the tokens and after every step.
fn run(
    model: &Model,
    cache: &mut KvCache,
    tokens: &[u32],
    chunk: usize,
    steps: usize,
) -> Vec<Vec<f32>> {
    let (mut s, mut logits) = (Scratch::default(), Vec::new());
    for part in tokens.chunks(chunk) {
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

fn prompts(tok: &Tokenizer) -> (Vec<u32>, Vec<u32>, usize) {
    let system: String = (0..120)
        .map(|i| format!("Rule {i}: shelf {} holds {} jars. ", i * 7 % 31, i % 13))
        .collect();
    let a = tok.encode(
        &format!("{system}Question: which shelf holds most?"),
        true,
        true,
    );
    let b = tok.encode(
        &format!("{system}Question: how many rules are there?"),
        true,
        true,
    );
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(common > 600, "a long shared prefix ({common})");
    (a, b, common)
}

fn check(name: &str, ty: KvType) {
    let g = common::open(name);
    let tok = Tokenizer::from_gguf(&g).unwrap();
    let mut model = Model::load(g).unwrap();
    model.set_kv_type(ty).unwrap();
    let (a, b, common) = prompts(&tok);
    let n_ctx = 2048;
    let steps = 6;
    let reference_a = run(&model, &mut model.new_cache(n_ctx), &a, 256, steps);
    let reference_b = run(&model, &mut model.new_cache(n_ctx), &b, 256, steps);

    let pool = model.new_pool(3, n_ctx).unwrap();
    let mut donor = model.new_pooled_cache(&pool, 0).unwrap();
    assert!(
        run(&model, &mut donor, &a, 100, steps) == reference_a,
        "{name} {ty:?}: a pooled cache changed the logits"
    );
    let alone = pool.pages_used();
    assert_eq!(
        alone,
        pool.pages_for(a.len() + steps),
        "{name}: pages of one sequence"
    );

    // The taker shares all but the last common token, then computes the rest itself.
    let mut taker = model.new_pooled_cache(&pool, 1).unwrap();
    let shared = common - 1;
    assert_eq!(taker.share_prefix(&donor, shared), shared, "{name}: share");
    let after_share = pool.pages_used();
    let per_page_boundary = pool.pages_for(1);
    assert!(
        after_share <= alone + per_page_boundary,
        "{name}: the shared prefix is stored once ({alone} pages alone, {after_share} shared)"
    );
    let got = run(&model, &mut taker, &b[shared..], 64, steps);
    assert!(
        got == reference_b,
        "{name} {ty:?}: a shared prefix changed the logits"
    );
    assert!(
        pool.pages_used() < alone + pool.pages_for(b.len() + steps) / 2,
        "{name}: two sequences over one prefix take little more than one"
    );

    // The donor starts over on another prompt: the taker keeps its prefix, and a third
    // sequence can take it from the taker.
    let other = tok.encode(
        "A different prompt about the weather in spring.",
        true,
        true,
    );
    assert_eq!(donor.truncate(0), 0);
    run(&model, &mut donor, &other, 64, 2);
    let mut third = model.new_pooled_cache(&pool, 2).unwrap();
    assert_eq!(third.share_prefix(&taker, shared), shared);
    let again = run(&model, &mut third, &b[shared..], 32, steps);
    assert!(
        again == reference_b,
        "{name} {ty:?}: the prefix changed when its donor moved on"
    );
    drop((donor, taker, third));
    assert_eq!(pool.pages_used(), 0, "{name}: pages go back when caches go");
    let _ = Arc::strong_count(&pool);
}

#[test]
fn smollm2_shares_prompt_prefixes_through_the_pool() {
    check("smollm2", KvType::F16);
    check("smollm2", KvType::Q8_0);
}

/// Gemma3's sliding-window layers are not pooled: a taker copies the window.
#[test]
fn gemma3_shares_prompt_prefixes_through_the_pool() {
    check("gemma3", KvType::F16);
}
