//! Encode arbitrary text and decode arbitrary ids with the real tokenizers of both default
//! models (BPE: SmolLM2, SentencePiece: Gemma3), read from the model cache
//! (`HEARTH_MODELS`, default `~/.cache/hearth/models`; run `scripts/fetch-models` first).
#![no_main]
use hearth_gguf::Gguf;
use hearth_tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn load(file: &str) -> Tokenizer {
    let dir = std::env::var("HEARTH_MODELS").unwrap_or_else(|_| {
        format!("{}/.cache/hearth/models", std::env::var("HOME").unwrap_or_default())
    });
    let g = Gguf::open(format!("{dir}/{file}")).expect("model file (run scripts/fetch-models)");
    Tokenizer::from_gguf(&g).expect("tokenizer")
}

fn tokenizers() -> &'static [Tokenizer; 2] {
    static T: OnceLock<[Tokenizer; 2]> = OnceLock::new();
    T.get_or_init(|| {
        [
            load("SmolLM2-135M-Instruct.Q4_1.gguf"),
            load("gemma-3-270m-q4_k_m.gguf"),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let tok = &tokenizers()[(flags & 1) as usize];
    let text = String::from_utf8_lossy(rest);
    let ids = tok.encode(&text, flags & 2 != 0, flags & 4 != 0);
    // Plain printable text without special parsing round-trips exactly. (Not control
    // characters: llama.cpp's tokenizers drop some, e.g. U+0016, and hearth matches it.)
    let printable = text.chars().all(|c| c.is_ascii_graphic() || c == ' ' || c == '\n');
    if flags & 6 == 0 && printable {
        assert_eq!(tok.decode(&ids, false), text, "round trip");
    }
    // Arbitrary ids, in range or not.
    let raw: Vec<u32> = rest
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) % (tok.n_vocab() as u32 + 16))
        .collect();
    let _ = tok.decode(&raw, flags & 8 != 0);
    for &id in &raw {
        let _ = tok.token_to_piece(id, true);
    }
});
