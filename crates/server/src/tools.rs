//! Tool calling: the tools a request offers, the grammar that keeps a call well formed, and
//! the calls read back out of the generated text, in the syntax the model's own chat
//! template teaches it. Known syntaxes: Hermes / Qwen2.5 (`<tool_call>\n{"name": …,
//! "arguments": {…}}\n</tool_call>`, after any text, any number) and Llama 3.1–3.3 (the whole
//! answer is one `{"name": …, "parameters": {…}}`); a template with neither gets a 400 for
//! `tools`.

use hearth_engine::constraint::GrammarSpec;
use serde_json::{json, Value};

use crate::error::{Api, ApiError};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
/// Llama 3.1 writes it before a call of its built-in tools; custom calls may carry it too.
const PYTHON_TAG: &str = "<|python_tag|>";
/// Tools one request may offer.
const MAX_TOOLS: usize = 64;

/// How the model must use the tools (OpenAI's `tool_choice`).
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// Free text, or tool calls once the model opens one.
    Auto,
    /// At least one call, from the first token.
    Required,
    /// A call of this tool, from the first token.
    Named(String),
}

/// How a model family writes its tool calls, read from its chat template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Syntax {
    /// Hermes / Qwen2.5: `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>` blocks,
    /// after any text.
    #[default]
    Hermes,
    /// Llama 3.1–3.3: the answer is one JSON object `{"name": …, "parameters": {…}}` (their
    /// templates take one call per turn).
    Llama3Json,
}

impl Syntax {
    /// The syntax `template` teaches, if hearth reads it.
    pub fn of_template(template: &str) -> Option<Syntax> {
        if template.contains(OPEN) {
            Some(Syntax::Hermes)
        } else if template.contains("ipython") && template.contains("\"parameters\": ") {
            Some(Syntax::Llama3Json)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone)]
pub struct Tools {
    /// As the request gave them (`[{type: function, function: {...}}]`), for the template.
    pub raw: Value,
    /// (name, parameters schema) of each.
    pub functions: Vec<(String, Value)>,
    pub choice: Choice,
    pub parallel: bool,
    /// Set from the model's template once the model is known ([`Syntax::of_template`]).
    pub syntax: Syntax,
}

impl Tools {
    /// `tools`, `tool_choice` and `parallel_tool_calls` of a request; `None` when it offers
    /// no tools or says `tool_choice: "none"`.
    pub fn parse(
        api: Api,
        tools: &Option<Value>,
        choice: &Option<Value>,
        parallel: Option<bool>,
    ) -> Result<Option<Tools>, ApiError> {
        let bad = |msg: String| ApiError::param(api, "tools", msg);
        let list = match tools {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(a)) if a.is_empty() => return Ok(None),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(bad("tools must be a list".into())),
        };
        if list.len() > MAX_TOOLS {
            return Err(bad(format!("at most {MAX_TOOLS} tools per request")));
        }
        let mut functions = Vec::with_capacity(list.len());
        for t in list {
            let f = t
                .get("function")
                .filter(|_| t.get("type").is_none_or(|k| k == "function"))
                .ok_or_else(|| {
                    bad("each tool must be {\"type\": \"function\", \"function\": {...}}".into())
                })?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty() && n.len() <= 64)
                .ok_or_else(|| bad("each function needs a name of 1 to 64 characters".into()))?;
            let params = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => {
                    return Err(bad(format!(
                        "{name}: parameters must be a JSON Schema object"
                    )))
                }
            };
            functions.push((name.to_string(), params));
        }
        let choice = match choice {
            None | Some(Value::Null) => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => return Ok(None),
                "auto" => Choice::Auto,
                "required" | "any" => Choice::Required,
                other => {
                    return Err(ApiError::param(
                        api,
                        "tool_choice",
                        format!("tool_choice {other:?}: none, auto, required or a function"),
                    ))
                }
            },
            Some(v) => {
                let name = v
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        ApiError::param(
                            api,
                            "tool_choice",
                            "tool_choice: {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        )
                    })?;
                if !functions.iter().any(|(n, _)| n == name) {
                    return Err(ApiError::param(
                        api,
                        "tool_choice",
                        format!("tool_choice names {name:?}, which is not among the tools"),
                    ));
                }
                Choice::Named(name.to_string())
            }
        };
        Ok(Some(Tools {
            raw: Value::Array(list.clone()),
            functions,
            choice,
            parallel: parallel.unwrap_or(true),
            syntax: Syntax::default(),
        }))
    }

    /// The grammar of the calls, and for `auto` the text that arms it (if the grammar does
    /// not cover free text itself).
    pub fn grammar(&self) -> (GrammarSpec, Option<&'static str>) {
        let args_key = match self.syntax {
            Syntax::Hermes => "arguments",
            Syntax::Llama3Json => "parameters",
        };
        let allowed: Vec<Value> = self
            .functions
            .iter()
            .filter(|(n, _)| match &self.choice {
                Choice::Named(want) => n == want,
                _ => true,
            })
            .map(|(name, params)| {
                // Closed objects, as for response_format schemas.
                let mut params = params.clone();
                hearth_engine::constraint::close_objects(&mut params);
                json!({
                    "type": "object",
                    "properties": {"name": {"const": name}, args_key: params},
                    "required": ["name", args_key],
                    "additionalProperties": false,
                })
            })
            .collect();
        let schema = json!({
            "anyOf": allowed,
            "x-guidance": {"whitespace_pattern": r"\x20|\x0A[\x20\x09]{0,20}"},
        });
        match self.syntax {
            Syntax::Hermes => {
                let more = if self.parallel {
                    " (\"\\n\" call)*"
                } else {
                    ""
                };
                let (start, trigger) = match self.choice {
                    // After the model has written the opening tag itself.
                    Choice::Auto => (format!("start: \"\\n\" body{more}"), Some(OPEN)),
                    _ => (format!("start: call{more}"), None),
                };
                let lark = format!(
                    "{start}\ncall: \"{OPEN}\\n\" body\nbody: args \"\\n{CLOSE}\"\nargs: %json {schema}\n"
                );
                (GrammarSpec::Lark(lark), trigger)
            }
            Syntax::Llama3Json => {
                // One call, the whole answer. With `auto` the answer may instead be text
                // that does not start with `{`: a call can only open the answer.
                let start = match self.choice {
                    Choice::Auto => "start: args | text\ntext: /[^{ \\t\\n][\\s\\S]*/",
                    _ => "start: args",
                };
                (
                    GrammarSpec::Lark(format!("{start}\nargs: %json {schema}\n")),
                    None,
                )
            }
        }
    }
}

/// One call read from the output.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: Value,
}

impl Syntax {
    /// Splits generated text into the answer text and the tool calls in it. A call that does
    /// not parse stays in the text (as llama.cpp leaves it).
    pub fn split(self, text: &str) -> (String, Vec<Call>) {
        match self {
            Syntax::Hermes => split_hermes(text),
            Syntax::Llama3Json => {
                let body = text.trim();
                let body = body.strip_prefix(PYTHON_TAG).unwrap_or(body).trim_start();
                let call = serde_json::from_str::<Value>(body).ok().and_then(|v| {
                    let name = v.get("name")?.as_str()?.to_string();
                    let arguments = v
                        .get("parameters")
                        .or_else(|| v.get("arguments"))
                        .cloned()
                        .unwrap_or_else(|| json!({}));
                    arguments.is_object().then_some(Call { name, arguments })
                });
                match call {
                    Some(call) => (String::new(), vec![call]),
                    None => (text.to_string(), Vec::new()),
                }
            }
        }
    }
}

fn split_hermes(text: &str) -> (String, Vec<Call>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(OPEN) {
        let after = &rest[at + OPEN.len()..];
        let Some(end) = after.find(CLOSE) else { break };
        let parsed: Option<Call> = serde_json::from_str::<Value>(after[..end].trim())
            .ok()
            .and_then(|v| {
                let name = v.get("name")?.as_str()?.to_string();
                let arguments = v.get("arguments").cloned().unwrap_or_else(|| json!({}));
                Some(Call { name, arguments })
            });
        match parsed {
            Some(call) => {
                content.push_str(&rest[..at]);
                calls.push(call);
            }
            None => content.push_str(&rest[..at + OPEN.len() + end + CLOSE.len()]),
        }
        rest = &after[end + CLOSE.len()..];
    }
    content.push_str(rest);
    let content = if calls.is_empty() {
        content
    } else {
        content.trim().to_string()
    };
    (content, calls)
}

/// Streams the answer text of a generation that may call tools: text is passed on until a
/// tool call may be starting (a held-back prefix of the opening tag, or for Llama 3 an answer
/// that opens with `{`), and nothing after a call starts; the calls come out at the end.
pub struct StreamSplit {
    syntax: Syntax,
    all: String,
    sent: usize,
    in_call: bool,
}

impl StreamSplit {
    pub fn new(syntax: Syntax) -> Self {
        Self {
            syntax,
            all: String::new(),
            sent: 0,
            in_call: false,
        }
    }

    pub fn syntax(&self) -> Syntax {
        self.syntax
    }

    /// Adds generated text; returns the text that may be shown now.
    pub fn push(&mut self, text: &str) -> String {
        self.all.push_str(text);
        if self.in_call {
            return String::new();
        }
        let pending = &self.all[self.sent..];
        if self.syntax == Syntax::Llama3Json {
            // A call can only open the answer: decide on its first visible characters.
            if self.sent == 0 {
                let start = self.all.trim_start();
                if start.starts_with('{') || start.starts_with(PYTHON_TAG) {
                    self.in_call = true;
                    return String::new();
                }
                if start.is_empty() || PYTHON_TAG.starts_with(start) {
                    return String::new();
                }
            }
            let out = pending.to_string();
            self.sent = self.all.len();
            return out;
        }
        if let Some(at) = pending.find(OPEN) {
            self.in_call = true;
            let out = pending[..at].to_string();
            self.sent += at;
            return out;
        }
        // Hold back a suffix that could be the start of the tag.
        let mut keep = 0;
        for (i, _) in OPEN.char_indices().skip(1) {
            if pending.ends_with(&OPEN[..i]) {
                keep = i;
            }
        }
        let cut = pending.len() - keep;
        let out = pending[..cut].to_string();
        self.sent += cut;
        out
    }

    /// `text` as a stream may show it: through `split` when the request offers tools.
    pub fn visible(split: &mut Option<StreamSplit>, text: String) -> String {
        match split {
            Some(split) => split.push(&text),
            None => text,
        }
    }

    /// At the end: the text not sent yet that is answer text, and the calls.
    pub fn finish(&mut self) -> (String, Vec<Call>) {
        let (content, calls) = self.syntax.split(&self.all);
        if calls.is_empty() {
            let rest = self.all[self.sent..].to_string();
            self.sent = self.all.len();
            return (rest, calls);
        }
        // What was sent is a prefix of the content (text before the first tag).
        let sent = self.all[..self.sent].trim_start().len().min(content.len());
        (content[sent..].to_string(), calls)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_split_from_text() {
        let (text, calls) = Syntax::Hermes.split(
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"t\", \"arguments\": {}}\n</tool_call>",
        );
        assert_eq!(text, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].name, "get_weather");
        assert_eq!(calls[0].arguments, json!({"city": "Oslo"}));
        let (text, calls) = Syntax::Hermes.split("no calls <tool_call> broken");
        assert_eq!(
            (text.as_str(), calls.len()),
            ("no calls <tool_call> broken", 0)
        );
    }

    #[test]
    fn streaming_holds_back_a_starting_tag() {
        let mut s = StreamSplit::new(Syntax::Hermes);
        assert_eq!(s.push("Hello <tool"), "Hello ");
        assert_eq!(s.push("_call>\n{\"name\": \"f\", \"arguments\": {}}"), "");
        assert_eq!(s.push("\n</tool_call>"), "");
        let (rest, calls) = s.finish();
        assert_eq!((rest.as_str(), calls.len()), ("", 1));
        let mut s = StreamSplit::new(Syntax::Hermes);
        assert_eq!(s.push("a <to"), "a ");
        assert_eq!(s.push("y"), "<toy");
        assert_eq!(s.finish(), (String::new(), vec![]));
    }

    #[test]
    fn llama3_calls_open_the_answer() {
        let call = r#"{"name": "add", "parameters": {"a": 2, "b": 3}}"#;
        let (text, calls) = Syntax::Llama3Json.split(call);
        assert_eq!(text, "");
        assert_eq!(calls[0].name, "add");
        assert_eq!(calls[0].arguments, json!({"a": 2, "b": 3}));
        let tagged = format!("<|python_tag|>{call}");
        assert_eq!(Syntax::Llama3Json.split(&tagged).1.len(), 1);
        // Text, or JSON that is not a call, stays text.
        for text in [
            "It is 5.",
            "{\"a\": 1}",
            "{\"name\": \"f\", \"parameters\": 3}",
        ] {
            assert_eq!(Syntax::Llama3Json.split(text), (text.to_string(), vec![]));
        }
        let mut s = StreamSplit::new(Syntax::Llama3Json);
        assert_eq!(s.push("\n"), "");
        assert_eq!(s.push("{\"name\": \"add\", "), "");
        assert_eq!(s.push("\"parameters\": {}}"), "");
        let (rest, calls) = s.finish();
        assert_eq!((rest.as_str(), calls.len()), ("", 1));
        let mut s = StreamSplit::new(Syntax::Llama3Json);
        assert_eq!(s.push("<|python"), "");
        assert_eq!(s.push("ic"), "<|pythonic");
        assert_eq!(s.push(" {x}"), " {x}");
        assert_eq!(s.finish(), (String::new(), vec![]));
        assert_eq!(
            Syntax::of_template(include_str!(
                "../../../tests/fixtures/llama3.2-instruct.jinja"
            )),
            Some(Syntax::Llama3Json)
        );
        assert_eq!(
            Syntax::of_template(include_str!(
                "../../../tests/fixtures/qwen2.5-instruct.jinja"
            )),
            Some(Syntax::Hermes)
        );
        assert_eq!(Syntax::of_template("{{ messages }}"), None);
    }
}
