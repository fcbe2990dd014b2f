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

/// The render budget grows with the conversation: Qwen3's template (the golden cases' most
/// involved) renders 2,000 messages with tool calls in the history, and a loop a short
/// conversation does not pay for stops with an error.
#[test]
fn render_budget_follows_the_conversation() {
    let source = std::fs::read_to_string(golden_dir().join("qwen3.jinja")).unwrap();
    let t = ChatTemplate::new(source);
    let mut messages = vec![Message::new("system", "You are terse.")];
    for i in 0..1000 {
        messages.push(Message::new("user", &format!("question {i}")));
        let mut answer = Message::new(
            "assistant",
            &format!("<think>\nhm {i}\n</think>\n\nanswer {i}"),
        );
        answer.tool_calls = Some(serde_json::json!([{
            "id": format!("c{i}"), "type": "function",
            "function": {"name": "lookup", "arguments": {"q": i}}
        }]));
        messages.push(answer);
    }
    let tools = serde_json::json!([{"type": "function", "function": {
        "name": "lookup", "description": "Looks a thing up.",
        "parameters": {"type": "object", "properties": {"q": {"type": "integer"}}}}}]);
    let kwargs: Kwargs = [("tools".to_string(), tools)].into_iter().collect();
    let out = t
        .render_with(&messages, true, "", "<|im_end|>", &kwargs)
        .expect("a long conversation renders");
    assert!(out.contains("answer 999") && out.contains("lookup"));

    // 20,000 turns of a loop are ~100,000 instructions: more than one message's budget
    // (55,000), whatever the strings the loop builds.
    let looping = ChatTemplate::new(
        "{% for i in range(20000) %}{% set x = messages[0].content * 1000 %}{% endfor %}",
    );
    let err = looping.render(&messages[..1], true, "", "").unwrap_err();
    assert!(err.to_string().contains("fuel"), "{err}");
}
