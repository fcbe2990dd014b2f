//! A GGUF file from arbitrary bytes: parse and validate, read every tensor's bytes, then
//! build the model and the tokenizer from it and, when both build, run two tokens through
//! the model. Errors are fine; panics, hangs, huge allocations and out-of-bounds reads are
//! not. The seeds include small complete models (`scripts/make-fuzz-seeds`), so mutations
//! reach model construction and the forward pass, not only the header parser.
#![no_main]
use hearth_gguf::Gguf;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::from_vec(data.to_vec()) else {
        return;
    };
    let mut sum = 0u64;
    for t in &g.tensors {
        sum = g.tensor_bytes(t).iter().fold(sum, |s, &b| s.wrapping_add(b as u64));
    }
    std::hint::black_box(sum);
    let tokenizer = hearth_tokenizer::Tokenizer::from_gguf(&g);
    let Ok(model) = hearth_models::Model::load(Arc::new(g)) else {
        return;
    };
    let Ok(tokenizer) = tokenizer else {
        return;
    };
    let ids = tokenizer.encode("hi", true, true);
    let ids: Vec<u32> = ids
        .into_iter()
        .filter(|&t| (t as usize) < model.config.n_vocab)
        .take(2)
        .collect();
    if ids.is_empty() || model.check_memory(8, 1).is_err() {
        return;
    }
    let mut cache = model.new_cache(8);
    let (mut scratch, mut logits) = (hearth_models::Scratch::default(), Vec::new());
    let _ = model.forward(&ids, &mut cache, &mut scratch, &mut logits);
});
