//! A `model.safetensors` from arbitrary bytes against a tiny BERT config (so that valid
//! headers are reachable): header, offsets, dtypes, shapes, conversion to f32.
#![no_main]
use hearth_embed::bert::BertConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let config = BertConfig {
        hidden: 4,
        layers: 1,
        heads: 2,
        intermediate: 8,
        max_positions: 8,
        vocab: 16,
        type_vocab: 2,
        eps: 1e-12,
    };
    let _ = hearth_embed::bert_from_safetensors(config, data);
});
