//! Chat templates rendered by hearth (minijinja, sandboxed) against Jinja2 rendering them the
//! way Hugging Face's `apply_chat_template` does (scripts/make-template-goldens): Qwen3's
//! official template with its thinking switch and reasoning stripping, SmolLM2's, and
//! DeepSeek-R1-Distill-Qwen's (the Qwen2 vocabulary's). Byte-exact.

use hearth_tokenizer::template::{ChatTemplate, Kwargs, Message};
use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/templates")
}

#[test]
fn templates_render_as_jinja2_renders_them() {
    let cases = std::fs::read_to_string(golden_dir().join("cases.jsonl")).unwrap();
    let mut checked = 0;
    for line in cases.lines() {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        let name = case["template"].as_str().unwrap();
        let source = std::fs::read_to_string(golden_dir().join(format!("{name}.jinja"))).unwrap();
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let kwargs: Kwargs = serde_json::from_value(case["kwargs"].clone()).unwrap();
        let got = ChatTemplate::new(source).render_with(
            &messages,
            case["add_generation_prompt"].as_bool().unwrap(),
            case["bos"].as_str().unwrap(),
            case["eos"].as_str().unwrap(),
            &kwargs,
        );
        match case["text"].as_str() {
            Some(want) => assert_eq!(got.unwrap(), want, "{name}: {line}"),
            None => assert!(got.is_err(), "{name}: Jinja2 refused {line}"),
        }
        checked += 1;
    }
    assert!(checked >= 24, "{checked} cases");
}
