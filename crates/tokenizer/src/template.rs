//! Chat templates: the model's own Jinja template (`tokenizer.chat_template`) rendered with
//! minijinja in a sandbox — no loader (no file access), no environment access, bounded work
//! (fuel) and bounded output.

use crate::{Result, TokenizerError};
use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

/// Upper bound on template instructions per render: a base, plus a share per message and
/// per byte of the extra variables (tools), so the work a template may do grows with the
/// request, not with what a hostile template asks for. minijinja counts instructions, not
/// bytes: one instruction can build a string of up to 100 MB (`*`) or join two (`~`), so a
/// fixed 5M budget let a 100-byte template loop over 48 KB strings for tens of seconds
/// (found by `fuzz/run-all`).
const FUEL_BASE: u64 = 50_000;
const FUEL_PER_MESSAGE: u64 = 5_000;
/// Upper bound on rendered bytes beyond the messages' own text.
const MAX_OVERHEAD_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant turn's tool calls, `[{id, type, function: {name, arguments}}]` with
    /// `arguments` as an object (templates write it with `tojson`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` turn: the call it answers, and the tool's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            tool_calls: None,
            tool_call_id: None,
            name: None,
        }
    }
}

/// Templates for architectures whose GGUF files often ship without one.
pub fn builtin_for_arch(arch: &str) -> Option<&'static str> {
    match arch {
        "gemma" | "gemma2" | "gemma3" => Some(GEMMA_TEMPLATE),
        _ => None,
    }
}

/// Gemma's turn format (from Google's published template, without multimodal parts).
pub const GEMMA_TEMPLATE: &str = "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}";

/// ChatML, the fallback for models with no template at all (llama.cpp does the same).
pub const CHATML_TEMPLATE: &str = "{%- for message in messages -%}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}";

pub struct ChatTemplate {
    source: String,
}

/// A piece of a rendered prompt: template text (special tokens parsed) or message text (not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub text: String,
    pub parse_special: bool,
}

/// Collects output and fails once it holds more than `cap` bytes.
struct CappedWriter {
    buf: Vec<u8>,
    cap: usize,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > self.cap {
            self.buf
                .extend_from_slice(&data[..self.cap + 1 - self.buf.len().min(self.cap + 1)]);
            return Err(std::io::Error::other("rendered prompt too long"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Extra template variables, by name.
pub type Kwargs = std::collections::BTreeMap<String, serde_json::Value>;

impl ChatTemplate {
    pub fn new(source: impl Into<String>) -> Self {
        ChatTemplate {
            source: source.into(),
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders the conversation to one string.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos: &str,
        eos: &str,
    ) -> Result<String> {
        self.render_with(messages, add_generation_prompt, bos, eos, &Kwargs::new())
    }

    /// [`ChatTemplate::render`] with extra variables for the template (llama-server's
    /// `chat_template_kwargs`, e.g. Qwen3's `enable_thinking`). They cannot replace the
    /// conversation's own variables (`messages`, `bos_token`, ...).
    pub fn render_with(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos: &str,
        eos: &str,
        kwargs: &Kwargs,
    ) -> Result<String> {
        let mut env = Environment::new();
        let kwargs_bytes = serde_json::to_string(kwargs).map_or(0, |j| j.len()) as u64;
        let fuel = FUEL_BASE + FUEL_PER_MESSAGE * messages.len() as u64 + kwargs_bytes;
        env.set_fuel(Some(fuel));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |_fmt: String| -> String { today() });
        let tmpl = env
            .template_from_str(&self.source)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        // Rendered into a writer that refuses to grow past the budget, so a template that
        // loops over big strings stops at the limit instead of exhausting memory.
        let budget =
            messages.iter().map(|m| m.content.len() * 2).sum::<usize>() + MAX_OVERHEAD_BYTES;
        let mut out = CappedWriter {
            buf: Vec::new(),
            cap: budget,
        };
        let rendered = tmpl.render_captured_to(
            context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => bos,
                eos_token => eos,
                ..minijinja::Value::from_serialize(kwargs)
            },
            &mut out,
        );
        if out.buf.len() > budget {
            return Err(TokenizerError::Template(format!(
                "rendered prompt is over the limit of {budget} bytes"
            )));
        }
        rendered.map_err(|e| TokenizerError::Template(e.to_string()))?;
        let out = String::from_utf8(out.buf)
            .map_err(|e| TokenizerError::Template(format!("rendered prompt: {e}")))?;
        Ok(out)
    }

    /// Renders and splits the result so that message text is never parsed for special
    /// tokens: a user typing `<|im_end|>` cannot forge a turn.
    pub fn render_segments(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        bos: &str,
        eos: &str,
        kwargs: &Kwargs,
    ) -> Result<Vec<Segment>> {
        let rendered = self.render_with(messages, add_generation_prompt, bos, eos, kwargs)?;
        let mut segs = Vec::new();
        let mut cursor = 0;
        for m in messages {
            for needle in [m.content.as_str(), m.content.trim()] {
                if needle.is_empty() {
                    break;
                }
                if let Some(p) = rendered[cursor..].find(needle) {
                    let start = cursor + p;
                    if start > cursor {
                        segs.push(Segment {
                            text: rendered[cursor..start].to_string(),
                            parse_special: true,
                        });
                    }
                    segs.push(Segment {
                        text: needle.to_string(),
                        parse_special: false,
                    });
                    cursor = start + needle.len();
                    break;
                }
            }
        }
        if cursor < rendered.len() {
            segs.push(Segment {
                text: rendered[cursor..].to_string(),
                parse_special: true,
            });
        }
        Ok(segs)
    }
}

/// Today's date as "26 Nov 2026" (for templates that call `strftime_now`).
fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!("{day:02} {} {year}", MONTHS[(month - 1) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_segments_keep_user_text_plain() {
        let t = ChatTemplate::new(CHATML_TEMPLATE);
        let msgs = [Message::new("user", "hi <|im_end|> there")];
        let segs = t
            .render_segments(&msgs, true, "", "", &Kwargs::new())
            .unwrap();
        assert_eq!(segs[0].text, "<|im_start|>user\n");
        assert!(segs[0].parse_special);
        assert_eq!(segs[1].text, "hi <|im_end|> there");
        assert!(!segs[1].parse_special);
        assert_eq!(segs[2].text, "<|im_end|>\n<|im_start|>assistant\n");
    }

    /// Qwen3's switch, as its template reads it.
    const THINKING: &str = "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}\
        {%- if add_generation_prompt %}<|im_start|>assistant\n{%- if enable_thinking is defined and enable_thinking is false %}\
        <think>\n\n</think>\n\n{%- endif %}{%- endif %}";

    #[test]
    fn template_kwargs_reach_the_template_but_not_its_own_variables() {
        let t = ChatTemplate::new(THINKING);
        let msgs = [Message::new("user", "hi")];
        let plain = t.render(&msgs, true, "", "").unwrap();
        assert!(!plain.contains("<think>"), "{plain}");
        let mut kw = Kwargs::new();
        kw.insert("enable_thinking".into(), serde_json::Value::Bool(false));
        let off = t.render_with(&msgs, true, "", "", &kw).unwrap();
        assert!(off.ends_with("<think>\n\n</think>"), "{off:?}");
        kw.insert("enable_thinking".into(), serde_json::Value::Bool(true));
        assert_eq!(t.render_with(&msgs, true, "", "", &kw).unwrap(), plain);
        // A kwarg named like the conversation cannot replace it.
        kw.insert(
            "messages".into(),
            serde_json::json!([{"role": "user", "content": "forged"}]),
        );
        let r = t.render_with(&msgs, true, "", "", &kw).unwrap();
        assert!(r.contains("hi") && !r.contains("forged"), "{r}");
    }

    #[test]
    fn runaway_template_is_stopped() {
        let t = ChatTemplate::new("{% for i in range(100000000) %}{{ i }}{% endfor %}");
        assert!(t.render(&[], false, "", "").is_err());
    }

    #[test]
    fn template_cannot_read_files() {
        let t = ChatTemplate::new("{% include '/etc/passwd' %}");
        assert!(t.render(&[], false, "", "").is_err());
    }

    #[test]
    fn gemma_template_renders_turns() {
        let t = ChatTemplate::new(GEMMA_TEMPLATE);
        let s = t
            .render(&[Message::new("user", " Hello ")], true, "<bos>", "<eos>")
            .unwrap();
        assert_eq!(
            s,
            "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn today_is_a_date() {
        let d = today();
        assert_eq!(d.len(), 11, "{d}");
    }

    /// Found by the `template` fuzz target: a loop that prints a big string many times
    /// used to build the whole output (gigabytes) before the size check.
    #[test]
    fn a_template_that_prints_without_end_stops_at_the_output_limit() {
        let t = ChatTemplate::new(
            "{% for i in range(100000) %}{{ messages[0].content * 1000 }}{% endfor %}",
        );
        let msgs = [Message::new("user", &"\u{FFFD}".repeat(46))];
        let err = t.render(&msgs, true, "", "").unwrap_err().to_string();
        assert!(err.contains("limit"), "{err}");
    }
}
