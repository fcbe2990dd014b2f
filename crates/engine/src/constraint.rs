//! Constrained decoding: at every step a mask of the tokens a JSON schema, a regular
//! expression or a Lark grammar allows next (llguidance, the engine llama.cpp, vLLM and
//! mistral.rs use), computed over this model's own tokenizer. Tokens outside the mask get
//! `-inf` logits before sampling, so the output always parses.

use std::sync::Arc;

use hearth_tokenizer::{TokenId, TokenKind};
use llguidance::api::{ParserLimits, TopLevelGrammar};
use llguidance::toktrie::{InferenceCapabilities, TokEnv, TokRxInfo, TokTrie, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use crate::{EngineError, LoadedModel};

/// Largest schema or grammar text one request may send.
pub const MAX_GRAMMAR_BYTES: usize = 64 * 1024;

/// JSON whitespace between two JSON tokens, as llama.cpp's schema grammars allow it: one
/// space, or one newline and an indent of up to 20 spaces or tabs. A model can pretty-print
/// but never loop on whitespace.
const JSON_WHITESPACE: &str = r"\x20|\x0A[\x20\x09]{0,20}";

/// Longest run of digits a JSON output may hold where the grammar leaves another way on:
/// llama.cpp's schema grammars bound a number's integral and fractional parts to 16 digits
/// each, while llguidance's allow any number of them, and a small model sampling at a
/// temperature can write `14.0102010301…` until `max_tokens`.
pub const MAX_JSON_DIGITS: usize = 16;

/// What the output must match.
#[derive(Debug, Clone)]
pub enum GrammarSpec {
    /// Any JSON object (OpenAI `json_object`, Ollama `format: "json"`).
    JsonObject,
    /// JSON valid under this JSON Schema.
    JsonSchema(Value),
    /// Text matching a regular expression (whole output).
    Regex(String),
    /// A Lark grammar as llguidance reads it (`start: ...`, regex terminals, `%json`).
    Lark(String),
    /// A grammar in llama.cpp's GBNF (`root ::= ...`), translated to Lark.
    Gbnf(String),
}

impl GrammarSpec {
    /// A grammar's text, as llama.cpp's GBNF (`root ::= ...`) or llguidance's Lark
    /// (`start: ...`), told apart by whether it defines rules with `::=`.
    pub fn grammar(text: String) -> GrammarSpec {
        if crate::gbnf::looks_like_gbnf(&text) {
            GrammarSpec::Gbnf(text)
        } else {
            GrammarSpec::Lark(text)
        }
    }

    /// The text that identifies this grammar in the compiled-grammar cache.
    fn key(&self) -> String {
        match self {
            GrammarSpec::JsonObject => "object".into(),
            GrammarSpec::JsonSchema(v) => format!("schema {v}"),
            GrammarSpec::Regex(s) => format!("regex {s}"),
            GrammarSpec::Lark(s) => format!("lark {s}"),
            GrammarSpec::Gbnf(s) => format!("gbnf {s}"),
        }
    }

    /// JSON outputs, whose numbers llama.cpp's grammars bound (see [`MAX_JSON_DIGITS`]).
    fn is_json(&self) -> bool {
        matches!(self, GrammarSpec::JsonObject | GrammarSpec::JsonSchema(_))
    }

    fn size(&self) -> usize {
        match self {
            GrammarSpec::JsonObject => 0,
            GrammarSpec::JsonSchema(v) => v.to_string().len(),
            GrammarSpec::Regex(s) | GrammarSpec::Lark(s) | GrammarSpec::Gbnf(s) => s.len(),
        }
    }

    fn to_grammar(&self) -> Result<TopLevelGrammar, String> {
        let json_options = json!({
            "whitespace_pattern": JSON_WHITESPACE,
            "item_separator": ",",
            "key_separator": ":",
        });
        Ok(match self {
            GrammarSpec::JsonObject => TopLevelGrammar::from_json_schema(
                json!({"type": "object", "x-guidance": json_options}),
            ),
            GrammarSpec::JsonSchema(schema) => {
                let mut schema = match schema {
                    Value::Bool(true) => json!({}),
                    Value::Object(_) => schema.clone(),
                    _ => return Err("a JSON schema must be an object".into()),
                };
                close_objects(&mut schema);
                schema["x-guidance"] = json_options;
                TopLevelGrammar::from_json_schema(schema)
            }
            GrammarSpec::Regex(rx) => TopLevelGrammar::from_regex(rx),
            GrammarSpec::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
            GrammarSpec::Gbnf(gbnf) => TopLevelGrammar::from_lark(crate::gbnf::to_lark(gbnf)?),
        })
    }
}

/// Objects without `additionalProperties` get `false`, as llama.cpp's (and so Ollama's)
/// schema conversion does: a model is not invited to invent keys after the ones asked for
/// (small models otherwise ramble on until `max_tokens`). `additionalProperties: true` or a
/// schema for them is kept.
pub fn close_objects(schema: &mut Value) {
    let Value::Object(map) = schema else {
        return;
    };
    let is_object = map.get("type").is_some_and(|t| {
        t == "object"
            || t.as_array()
                .is_some_and(|a| a.iter().any(|t| t == "object"))
    }) || map.contains_key("properties");
    if is_object && !map.contains_key("additionalProperties") {
        map.insert("additionalProperties".into(), Value::Bool(false));
    }
    // `uniqueItems: false` says nothing (Pydantic writes it for lists), but the grammar
    // engine refuses the key; `true` it cannot enforce, and stays refused.
    if map.get("uniqueItems") == Some(&Value::Bool(false)) {
        map.remove("uniqueItems");
    }
    for (key, value) in map.iter_mut() {
        match key.as_str() {
            // Maps of name → schema.
            "properties" | "$defs" | "definitions" | "patternProperties" => {
                if let Value::Object(m) = value {
                    m.values_mut().for_each(close_objects);
                }
            }
            // Lists of schemas.
            "anyOf" | "oneOf" | "allOf" | "prefixItems" => {
                if let Value::Array(a) = value {
                    a.iter_mut().for_each(close_objects);
                }
            }
            // One schema (or a list of them, for old-style `items`).
            "items" | "additionalProperties" | "not" | "if" | "then" | "else" | "contains" => {
                match value {
                    Value::Array(a) => a.iter_mut().for_each(close_objects),
                    v => close_objects(v),
                }
            }
            _ => {}
        }
    }
}

/// The per-model part, built once (it indexes every token's bytes: a second or more on a
/// 262k vocabulary) and shared by every request's [`Constraint`].
pub struct Grammars {
    factory: ParserFactory,
    eog: Arc<[TokenId]>,
    /// Recently compiled grammars, newest last: programs send the same schema with every
    /// request, and compiling it again would cost each request's first token milliseconds.
    compiled: std::sync::Mutex<Vec<(String, Matcher)>>,
    /// Every token's leading and trailing ASCII digits (for [`MAX_JSON_DIGITS`]).
    digits: DigitTable,
}

/// Every token's [`Digits`], and the most leading digits any token has (so that a step
/// after which no token could pass the cap skips the vocabulary).
#[derive(Clone)]
struct DigitTable {
    tokens: Arc<[Digits]>,
    longest: usize,
}

impl DigitTable {
    fn new<W: AsRef<[u8]>>(words: &[W]) -> Self {
        let tokens: Arc<[Digits]> = words.iter().map(|w| Digits::of(w.as_ref())).collect();
        let longest = tokens.iter().map(|d| d.leading as usize).max().unwrap_or(0);
        DigitTable { tokens, longest }
    }
}

/// A token's leading and trailing ASCII digits, and whether it is digits only.
#[derive(Clone, Copy)]
struct Digits {
    leading: u8,
    trailing: u8,
    all: bool,
}

impl Digits {
    fn of(bytes: &[u8]) -> Self {
        let count = |it: &mut dyn Iterator<Item = &u8>| {
            it.take_while(|b| b.is_ascii_digit()).count().min(255) as u8
        };
        let leading = count(&mut bytes.iter());
        Digits {
            leading,
            trailing: count(&mut bytes.iter().rev()),
            all: !bytes.is_empty() && leading as usize == bytes.len(),
        }
    }

    /// The digit run after this token, following a run of `run`.
    fn after(self, run: usize) -> usize {
        if self.all {
            run + self.leading as usize
        } else {
            self.trailing as usize
        }
    }
}

/// Compiled grammars kept per model.
const COMPILED_CACHE: usize = 16;

impl Grammars {
    /// Over `model`'s tokenizer and output size (which may exceed the tokenizer's: padding
    /// rows are never allowed).
    pub fn new(model: Arc<LoadedModel>) -> Result<Self, EngineError> {
        let n_vocab = model.model.config.n_vocab;
        let tokenizer = &model.tokenizer;
        let words: Vec<Vec<u8>> = (0..n_vocab)
            .map(|id| {
                let id = id as TokenId;
                match tokenizer.kind(id) {
                    // Special tokens are kept out of the grammar's text: llguidance knows
                    // them by this marker.
                    Some(TokenKind::Control) => {
                        let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                        w.extend_from_slice(tokenizer.token_text(id).unwrap_or("").as_bytes());
                        w
                    }
                    Some(_) => tokenizer.token_to_piece(id, false),
                    None => Vec::new(),
                }
            })
            .collect();
        let digits = DigitTable::new(&words);
        let eog: Arc<[TokenId]> = tokenizer.eog_tokens().into();
        let eos = tokenizer
            .eos
            .or_else(|| eog.first().copied())
            .ok_or_else(|| EngineError::Grammar("the model has no end-of-text token".into()))?;
        let info = TokRxInfo {
            vocab_size: n_vocab as u32,
            tok_eos: eos,
            tok_bos: tokenizer.bos,
            tok_pad: None,
            tok_unk: tokenizer.unk,
            tok_end_of_turn: None,
        };
        let trie = TokTrie::from(&info, &words);
        let env: TokEnv = Arc::new(ModelTokEnv {
            trie,
            model: model.clone(),
        });
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities {
                ff_tokens: true,
                ..Default::default()
            },
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| EngineError::Grammar(e.to_string()))?;
        factory.quiet();
        *factory.limits_mut() = ParserLimits {
            // Bounds a hostile schema or regex: building it stops with an error, it does
            // not run away (defaults are sized for a server; these are a quarter).
            initial_lexer_fuel: 250_000,
            max_grammar_size: 100_000,
            max_lexer_states: 50_000,
            verbose_errors: false,
            ..ParserLimits::default()
        };
        Ok(Self {
            factory,
            eog,
            compiled: std::sync::Mutex::new(Vec::new()),
            digits,
        })
    }

    /// A matcher for one request, or why the grammar is refused (too large, invalid,
    /// unsatisfiable, over the complexity bounds).
    pub fn compile(&self, spec: &GrammarSpec) -> Result<Constraint, EngineError> {
        if spec.size() > MAX_GRAMMAR_BYTES {
            return Err(EngineError::Grammar(format!(
                "the schema or grammar has {} bytes; at most {MAX_GRAMMAR_BYTES} are accepted",
                spec.size()
            )));
        }
        let key = spec.key();
        let cached = {
            let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
            compiled.iter().position(|(k, _)| *k == key).map(|at| {
                let hit = compiled.remove(at);
                let matcher = hit.1.deep_clone();
                compiled.push(hit);
                matcher
            })
        };
        let matcher = match cached {
            Some(m) => m,
            None => {
                let m = self.compile_new(spec)?;
                let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
                if compiled.len() >= COMPILED_CACHE {
                    compiled.remove(0);
                }
                compiled.push((key, m.deep_clone()));
                m
            }
        };
        Ok(Constraint {
            matcher: Box::new(matcher),
            eog: self.eog.clone(),
            eos: self.factory.tok_env().tok_trie().eos_token(),
            trigger: None,
            digits: spec.is_json().then(|| self.digits.clone()),
            digit_run: 0,
        })
    }

    /// Builds `spec`'s matcher and checks that something satisfies it.
    fn compile_new(&self, spec: &GrammarSpec) -> Result<Matcher, EngineError> {
        let grammar = spec.to_grammar().map_err(EngineError::Grammar)?;
        let parser = llguidance::panic_utils::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.factory.create_parser(grammar)
        }))
        .map_err(|e| EngineError::Grammar(first_line(&e.to_string())))?;
        let mut matcher = Matcher::new(Ok(parser));
        // An unsatisfiable grammar (an empty enum, say) allows nothing from the start.
        let first = matcher
            .compute_mask()
            .map_err(|e| EngineError::Grammar(first_line(&e.to_string())))?;
        if first.is_zero() {
            return Err(EngineError::Grammar(
                "no output can satisfy this schema or grammar".into(),
            ));
        }
        Ok(matcher)
    }
}

/// The model's own tokenizer for text the grammar forces, so forced tokens are the ones the
/// model would see for that text (llguidance appends them without sampling).
struct ModelTokEnv {
    trie: TokTrie,
    model: Arc<LoadedModel>,
}

impl TokenizerEnv for ModelTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Only a tokenization that spells exactly these bytes will do (a tokenizer that adds
        // a space prefix, say, does not); else the longest-match one, which always does.
        if let Ok(text) = std::str::from_utf8(s) {
            let ids = self.model.tokenizer.encode(text, false, false);
            if self.trie.decode_raw(&ids) == s {
                return ids;
            }
        }
        self.trie.greedy_tokenize(s)
    }
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("invalid grammar").to_string()
}

/// After a run of `run` digits, masks the tokens that would make it longer than
/// [`MAX_JSON_DIGITS`] — unless nothing else is left (a pattern that asks for more digits
/// still gets them).
fn cap_digit_runs(digits: &DigitTable, run: usize, logits: &mut [f32]) {
    // The common case (no digits just written): no token is long enough to matter, and the
    // two passes over the vocabulary below are skipped.
    if run + digits.longest <= MAX_JSON_DIGITS {
        return;
    }
    let too_long = |i: usize| {
        digits
            .tokens
            .get(i)
            .is_some_and(|d| d.leading > 0 && run + d.leading as usize > MAX_JSON_DIGITS)
    };
    let other = logits
        .iter()
        .enumerate()
        .any(|(i, &l)| l > f32::NEG_INFINITY && !too_long(i));
    if other {
        for (i, l) in logits.iter_mut().enumerate() {
            if too_long(i) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// One request's grammar state.
pub struct Constraint {
    /// Boxed: the matcher is large and requests move through queues.
    matcher: Box<Matcher>,
    eog: Arc<[TokenId]>,
    eos: TokenId,
    trigger: Option<String>,
    /// For JSON outputs: every token's digits, to cap runs at [`MAX_JSON_DIGITS`].
    digits: Option<DigitTable>,
    /// ASCII digits at the end of the output so far.
    digit_run: usize,
}

impl Constraint {
    /// Applies only once the generated text ends with `trigger` (a tool call's opening tag
    /// with `tool_choice: auto`: the model may answer in free text or call a tool; the
    /// grammar then covers what follows the tag).
    pub fn after(mut self, trigger: impl Into<String>) -> Self {
        self.trigger = Some(trigger.into());
        self
    }

    /// The text that arms this constraint, if it waits for one.
    pub fn trigger(&self) -> Option<&str> {
        self.trigger.as_deref()
    }

    /// Sets the logits of tokens the grammar does not allow now to `-inf`. Where the grammar
    /// may end, every end-of-generation token is allowed. False when nothing is allowed.
    pub fn mask(&mut self, logits: &mut [f32]) -> bool {
        let Ok(allowed) = self.matcher.compute_mask() else {
            return false;
        };
        let may_end = allowed.is_allowed(self.eos);
        let n = allowed.len();
        let mut any = false;
        for (i, l) in logits.iter_mut().enumerate() {
            let ok = (i < n && allowed.is_allowed(i as TokenId))
                || (may_end && self.eog.contains(&(i as TokenId)));
            if ok {
                any |= *l > f32::NEG_INFINITY;
            } else {
                *l = f32::NEG_INFINITY;
            }
        }
        if any {
            self.cap_digits(logits);
        }
        any
    }

    fn cap_digits(&self, logits: &mut [f32]) {
        if let Some(digits) = &self.digits {
            cap_digit_runs(digits, self.digit_run, logits);
        }
    }

    fn count_digits(&mut self, token: TokenId) {
        if let Some(d) = self
            .digits
            .as_ref()
            .and_then(|d| d.tokens.get(token as usize))
        {
            self.digit_run = d.after(self.digit_run);
        }
    }

    /// Advances past `token` (one the mask allowed). False if the grammar refused it.
    pub fn accept(&mut self, token: TokenId) -> bool {
        self.count_digits(token);
        self.matcher.consume_token(token).is_ok()
    }

    /// Tokens the grammar forces next (at most `max`), taken as accepted: they are appended
    /// without sampling (fast-forward).
    pub fn forced(&mut self, max: usize) -> Vec<TokenId> {
        let mut tokens = self.matcher.compute_ff_tokens();
        tokens.truncate(max);
        if tokens.is_empty() || self.matcher.consume_tokens(&tokens).is_err() {
            return Vec::new();
        }
        for &t in &tokens {
            self.count_digits(t);
        }
        tokens
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_finished(&self) -> bool {
        self.matcher.is_stopped()
    }

    pub fn error(&self) -> Option<String> {
        self.matcher.get_error()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digit_runs_are_counted_across_tokens() {
        let d = |s: &str| Digits::of(s.as_bytes());
        assert_eq!(d("123").after(5), 8);
        assert_eq!(d("4.").after(10), 0);
        assert_eq!(d(".25").after(10), 2);
        assert_eq!(d("x").after(3), 0);
        assert_eq!(d("").after(3), 0);
        let (t, l) = (d("7,"), d("12"));
        assert_eq!((t.leading, t.trailing, t.all), (1, 0, false));
        assert_eq!((l.leading, l.trailing, l.all), (2, 2, true));
    }

    #[test]
    fn digit_runs_past_the_cap_are_masked_while_another_token_is_allowed() {
        let vocab = DigitTable::new(&["1", "23", ",", "}"]);
        // 15 digits so far: one more digit is fine, two are not.
        let mut logits = vec![0.5, 0.9, 0.1, 0.2];
        cap_digit_runs(&vocab, 15, &mut logits);
        assert_eq!(logits, [0.5, f32::NEG_INFINITY, 0.1, 0.2]);
        let mut logits = vec![0.5, 0.9, 0.1, 0.2];
        cap_digit_runs(&vocab, MAX_JSON_DIGITS, &mut logits);
        assert_eq!(logits[..2], [f32::NEG_INFINITY; 2]);
        // Only digits allowed (a pattern wants them): they stay.
        let ninf = f32::NEG_INFINITY;
        let mut logits = vec![0.5, 0.9, ninf, ninf];
        cap_digit_runs(&vocab, 40, &mut logits);
        assert_eq!(logits, [0.5, 0.9, ninf, ninf]);
    }

    #[test]
    fn objects_without_additional_properties_are_closed() {
        let mut schema = json!({
            "type": "object",
            "properties": {
                "a": {"type": "object", "properties": {"b": {"type": "string"}}},
                "open": {"type": "object", "additionalProperties": true},
                "list": {"type": "array", "items": {"properties": {"c": {}}}},
            },
            "$defs": {"D": {"type": ["object", "null"]}},
            "anyOf": [{"type": "object"}, {"type": "string"}],
        });
        close_objects(&mut schema);
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(schema["properties"]["a"]["additionalProperties"], false);
        assert_eq!(schema["properties"]["open"]["additionalProperties"], true);
        assert_eq!(
            schema["properties"]["list"]["items"]["additionalProperties"],
            false
        );
        assert_eq!(schema["$defs"]["D"]["additionalProperties"], false);
        assert_eq!(schema["anyOf"][0]["additionalProperties"], false);
        assert!(schema["anyOf"][1].get("additionalProperties").is_none());
        assert!(schema["properties"]["list"]
            .get("additionalProperties")
            .is_none());
        let mut schema = json!({"type": "array", "uniqueItems": false,
                                "items": {"type": "array", "uniqueItems": true}});
        close_objects(&mut schema);
        assert!(schema.get("uniqueItems").is_none());
        assert_eq!(schema["items"]["uniqueItems"], true);
    }
}
