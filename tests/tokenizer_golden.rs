//! Tokenizer ids equal llama.cpp's (`llama-tokenize --ids`, see scripts/make-goldens) on
//! every golden string, for both models.

mod common;

use hearth_tokenizer::Tokenizer;

fn check(model: &str) {
    let g = common::open(model);
    let tok = Tokenizer::from_gguf(&g).expect("tokenizer builds");
    let cases = common::golden_lines(&format!("{model}.tokenize.jsonl"));
    assert!(cases.len() >= 200, "need at least 200 golden strings");
    let mut failures = Vec::new();
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, true, true);
        if got != want {
            failures.push(format!("{text:?}\n   want {want:?}\n    got {got:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} differ:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_tokenizer_matches_llama_cpp() {
    check("smollm2");
}

#[test]
fn gemma3_tokenizer_matches_llama_cpp() {
    check("gemma3");
}

#[test]
fn decode_round_trips_plain_text() {
    for model in ["smollm2", "gemma3"] {
        let g = common::open(model);
        let tok = Tokenizer::from_gguf(&g).unwrap();
        for text in [
            "Hello world",
            "日本語 😀 café",
            "  spaces\n\ttabs",
            "<|im_start|> as text",
        ] {
            let ids = tok.encode(text, false, false);
            assert_eq!(tok.decode(&ids, true), text, "{model}");
        }
    }
}
