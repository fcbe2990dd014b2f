//! llama.cpp's grammar format (GBNF: `root ::= "yes" | "no"`) translated into the Lark
//! dialect llguidance reads, so grammars written for llama.cpp (its `--grammar-file`, the
//! server's `grammar` field) work unchanged. Parsed as llama.cpp parses it: a rule ends at
//! a newline unless inside parentheses or after `|`; `#` starts a comment.

use std::collections::HashMap;
use std::fmt::Write;

/// The Lark text of GBNF `src`, whose `root` rule becomes Lark's `start`.
pub fn to_lark(src: &str) -> Result<String, String> {
    let mut p = Parser {
        chars: src.chars().collect(),
        pos: 0,
        names: HashMap::new(),
    };
    let mut rules = String::new();
    p.space(true);
    while p.pos < p.chars.len() {
        let name = p.name()?;
        let lark_name = p.lark_name(&name)?;
        p.space(false);
        if !p.eat_str("::=") {
            return Err(p.error(&format!("expected ::= after the rule name {name:?}")));
        }
        p.space(true);
        let body = p.alternates(false)?;
        p.space(false);
        if p.pos < p.chars.len() && !p.eat('\n') && !p.eat_str("\r\n") {
            return Err(p.error("expected the end of the line after a rule"));
        }
        let _ = writeln!(rules, "{lark_name}: {body}");
        p.space(true);
    }
    if !p.names.contains_key("root") {
        return Err("a GBNF grammar needs a rule named root".into());
    }
    Ok(format!("start: {}\n{rules}", p.names["root"]))
}

/// Whether `src` looks like GBNF rather than Lark (it defines a rule with `::=`).
pub fn looks_like_gbnf(src: &str) -> bool {
    src.lines().any(|line| {
        let line = line.trim_start();
        !line.starts_with('#')
            && line.split_once("::=").is_some_and(|(name, _)| {
                let name = name.trim();
                !name.is_empty() && name.chars().all(is_word_char)
            })
    })
}

fn is_word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

struct Parser {
    chars: Vec<char>,
    pos: usize,
    /// GBNF rule name → Lark rule name.
    names: HashMap<String, String>,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn eat_str(&mut self, s: &str) -> bool {
        let n = s.chars().count();
        if self.chars.len() >= self.pos + n
            && s.chars()
                .eq(self.chars[self.pos..self.pos + n].iter().copied())
        {
            self.pos += n;
            true
        } else {
            false
        }
    }

    fn error(&self, msg: &str) -> String {
        let line = self.chars[..self.pos.min(self.chars.len())]
            .iter()
            .filter(|&&c| c == '\n')
            .count()
            + 1;
        format!("GBNF line {line}: {msg}")
    }

    /// Skips spaces, tabs and comments, and newlines too when `newlines`.
    fn space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                ' ' | '\t' => self.pos += 1,
                '#' => {
                    while self.peek().is_some_and(|c| c != '\n') {
                        self.pos += 1;
                    }
                }
                '\r' | '\n' if newlines => self.pos += 1,
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Result<String, String> {
        let start = self.pos;
        while self.peek().is_some_and(is_word_char) {
            self.pos += 1;
        }
        if self.pos == start {
            return Err(self.error("expected a rule name"));
        }
        Ok(self.chars[start..self.pos].iter().collect())
    }

    /// Lark rule names are lowercase: `Foo-Bar` → `g_foo-bar`, kept apart from Lark's own
    /// names by the prefix; two GBNF names that differ only in case are refused.
    fn lark_name(&mut self, name: &str) -> Result<String, String> {
        let lark = format!("g_{}", name.to_ascii_lowercase().replace('_', "__"));
        if let Some((other, _)) = self
            .names
            .iter()
            .find(|(n, l)| **l == lark && n.as_str() != name)
        {
            return Err(self.error(&format!(
                "rule names {other:?} and {name:?} differ only in case"
            )));
        }
        self.names.insert(name.to_string(), lark.clone());
        Ok(lark)
    }

    fn alternates(&mut self, nested: bool) -> Result<String, String> {
        let mut out = self.sequence(nested)?;
        while self.eat('|') {
            self.space(true);
            out.push_str(" | ");
            out.push_str(&self.sequence(nested)?);
        }
        Ok(out)
    }

    fn sequence(&mut self, nested: bool) -> Result<String, String> {
        let mut items: Vec<String> = Vec::new();
        loop {
            let item = match self.peek() {
                Some('"') => {
                    self.pos += 1;
                    let mut s = String::new();
                    loop {
                        match self.peek() {
                            None | Some('\n') => return Err(self.error("unterminated string")),
                            Some('"') => {
                                self.pos += 1;
                                break;
                            }
                            _ => s.push(self.char_in_literal()?),
                        }
                    }
                    if s.is_empty() {
                        // Lark has no empty string literal: an empty group matches nothing.
                        "\"\"?".to_string()
                    } else {
                        // Lark reads JSON string syntax, with DEL escaped too.
                        serde_json::to_string(&s)
                            .map_err(|e| e.to_string())?
                            .replace('\u{7f}', "\\u007f")
                    }
                }
                Some('[') => {
                    self.pos += 1;
                    let mut class = String::from("/[");
                    if self.eat('^') {
                        class.push('^');
                    }
                    let mut members = 0;
                    loop {
                        match self.peek() {
                            None | Some('\n') => {
                                return Err(self.error("unterminated character class"))
                            }
                            Some(']') => {
                                self.pos += 1;
                                break;
                            }
                            Some('-')
                                if members > 0 && self.chars.get(self.pos + 1) != Some(&']') =>
                            {
                                self.pos += 1;
                                class.push('-');
                            }
                            _ => {
                                let c = self.char_in_literal()?;
                                push_class_char(&mut class, c);
                                members += 1;
                            }
                        }
                    }
                    if members == 0 {
                        return Err(self.error("empty character class"));
                    }
                    class.push_str("]/");
                    class
                }
                Some('.') => {
                    self.pos += 1;
                    "/(?s:.)/".to_string()
                }
                Some('(') => {
                    self.pos += 1;
                    self.space(true);
                    let inner = self.alternates(true)?;
                    self.space(true);
                    if !self.eat(')') {
                        return Err(self.error("expected )"));
                    }
                    format!("({inner})")
                }
                Some(c) if is_word_char(c) => {
                    let name = self.name()?;
                    let known = self.names.get(&name).cloned();
                    match known {
                        Some(l) => l,
                        None => self.lark_name(&name)?,
                    }
                }
                _ => break,
            };
            let mut item = item;
            // Repetition.
            match self.peek() {
                Some(op @ ('*' | '+' | '?')) => {
                    self.pos += 1;
                    item.push(op);
                }
                Some('{') => {
                    let start = self.pos;
                    while self.peek().is_some_and(|c| c != '}' && c != '\n') {
                        self.pos += 1;
                    }
                    if !self.eat('}') {
                        return Err(self.error("unterminated {m,n} repetition"));
                    }
                    let spec: String = self.chars[start + 1..self.pos - 1]
                        .iter()
                        .filter(|c| !c.is_whitespace())
                        .collect();
                    let valid = spec.split(',').count() <= 2
                        && !spec.is_empty()
                        && spec.chars().all(|c| c.is_ascii_digit() || c == ',')
                        && !spec.starts_with(',');
                    if !valid {
                        return Err(self.error(&format!("bad repetition {{{spec}}}")));
                    }
                    if spec == "0" || spec == "0,0" {
                        // Zero times: nothing.
                        item = "\"\"?".to_string();
                    } else {
                        let _ = write!(item, "{{{spec}}}");
                    }
                }
                _ => {}
            }
            items.push(item);
            self.space(nested);
        }
        if items.is_empty() {
            // An empty alternative matches the empty string.
            return Ok("\"\"?".to_string());
        }
        Ok(items.join(" "))
    }

    /// One character of a string or character class, escapes decoded.
    fn char_in_literal(&mut self) -> Result<char, String> {
        let Some(c) = self.peek() else {
            return Err(self.error("unexpected end"));
        };
        self.pos += 1;
        if c != '\\' {
            return Ok(c);
        }
        let Some(e) = self.peek() else {
            return Err(self.error("unexpected end after \\"));
        };
        self.pos += 1;
        let hex = |p: &mut Parser, n: usize| -> Result<char, String> {
            let digits: String = p.chars.iter().skip(p.pos).take(n).collect();
            p.pos += n;
            u32::from_str_radix(&digits, 16)
                .ok()
                .filter(|_| digits.len() == n)
                .and_then(char::from_u32)
                .ok_or_else(|| p.error(&format!("bad escape \\{e}{digits}")))
        };
        Ok(match e {
            'n' => '\n',
            't' => '\t',
            'r' => '\r',
            'x' => hex(self, 2)?,
            'u' => hex(self, 4)?,
            'U' => hex(self, 8)?,
            '"' | '[' | ']' | '\\' | '-' | '^' | '/' => e,
            other => return Err(self.error(&format!("unknown escape \\{other}"))),
        })
    }
}

/// `c` inside a regex character class, escaped where the regex syntax needs it.
fn push_class_char(class: &mut String, c: char) {
    match c {
        '\\' | ']' | '[' | '^' | '-' | '/' | '&' | '~' => {
            class.push('\\');
            class.push(c);
        }
        c if c.is_control() => {
            let _ = write!(class, "\\x{{{:X}}}", c as u32);
        }
        c => class.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_llama_cpp_grammars() {
        let lark = to_lark(
            "# yes or no\nroot ::= answer ws\nanswer ::= \"yes\" | \"no\" |\n  \"maybe\"\nws ::= [ \\t\\n]* # spaces\n",
        )
        .unwrap();
        assert_eq!(
            lark,
            "start: g_root\ng_root: g_answer g_ws\ng_answer: \"yes\" | \"no\" | \"maybe\"\ng_ws: /[ \\x{9}\\x{A}]/*\n"
        );
        let lark = to_lark(
            "root ::= (\n  item\n  (\",\" item){0,3}\n)\nitem ::= [^\"\\\\] \"\\u00e9\" . [a-z0-9-]+",
        )
        .unwrap();
        assert!(
            lark.contains("g_root: (g_item (\",\" g_item){0,3})"),
            "{lark}"
        );
        assert!(
            lark.contains("g_item: /[^\"\\\\]/ \"é\" /(?s:.)/ /[a-z0-9\\-]/+"),
            "{lark}"
        );
    }

    #[test]
    fn bad_grammars_are_refused_with_their_line() {
        for (src, want) in [
            ("answer ::= \"yes\"", "root"),
            ("root ::= \"yes", "line 1: unterminated string"),
            ("root ::= x\nx ::= [a-", "line 2"),
            ("root ::= \"a\" )", "end of the line"),
            ("root ::= \"\\q\"", "unknown escape"),
            ("root ::= a{x}", "bad repetition"),
            (
                "root ::= Ab\nAb ::= \"x\"\nab ::= \"y\"",
                "differ only in case",
            ),
        ] {
            let err = to_lark(src).unwrap_err();
            assert!(err.contains(want), "{src}: {err}");
        }
    }

    #[test]
    fn gbnf_is_told_from_lark() {
        assert!(looks_like_gbnf("root ::= \"a\""));
        assert!(looks_like_gbnf("# c\nmy-rule   ::= x"));
        assert!(!looks_like_gbnf("start: \"a\" | /b+/"));
        assert!(!looks_like_gbnf("start: \"::=\""));
    }
}
