//! An arbitrary chat template (before the first NUL byte) rendered with arbitrary message
//! text (after it): bounded time (fuel), bounded output, no file or environment access.
#![no_main]
use hearth_tokenizer::template::{ChatTemplate, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let source = String::from_utf8_lossy(&data[..split]);
    let content = String::from_utf8_lossy(data.get(split + 1..).unwrap_or_default());
    let messages = [
        Message::new("system", &content),
        Message::new("user", &content),
        Message::new("assistant", "ok"),
        Message::new("user", &content),
    ];
    let t = ChatTemplate::new(source.into_owned());
    let _ = t.render(&messages, true, "<s>", "</s>");
});
