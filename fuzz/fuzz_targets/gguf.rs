//! A GGUF file from arbitrary bytes: parse and validate, read every tensor's bytes, then
//! build the model and the tokenizer from it. Errors are fine; panics, hangs, huge
//! allocations and out-of-bounds reads are not.
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
    let _ = hearth_tokenizer::Tokenizer::from_gguf(&g);
    let _ = hearth_models::Model::load(Arc::new(g));
});
