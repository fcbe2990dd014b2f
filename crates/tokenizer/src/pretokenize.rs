//! Pre-tokenizers: split text into words before BPE, exactly as llama.cpp's hand-written
//! splitters do (they stand in for the regexes named by `tokenizer.ggml.pre`).

use crate::unicode::{flags, Flags};
use std::ops::Range;

/// A pre-tokenizer known by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's regex: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// Every `\p{N}` isolated first, then GPT-2's regex (starcoder, smollm, refact, ...).
    DigitsThenGpt2,
    /// Llama 3's regex: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
    /// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+` (llama-bpe, falcon3, ...).
    /// Whole words found in the vocabulary skip the merges, as llama.cpp does for this type.
    Llama3,
    /// Qwen2's regex: Llama 3's with `\p{N}` (one digit per word) instead of `\p{N}{1,3}`
    /// (qwen2, deepseek-r1-qwen).
    Qwen2,
}

impl PreTokenizer {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "default" | "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es"
            | "jina-v2-de" | "mpt" | "olmo" => Self::Gpt2,
            "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone"
            | "minerva-7b" => Self::DigitsThenGpt2,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => Self::Llama3,
            "qwen2" | "deepseek-r1-qwen" => Self::Qwen2,
            _ => return None,
        })
    }

    /// Whether a word that is itself a token is taken whole, without BPE merges (llama.cpp's
    /// `ignore_merges`, set for Llama 3's tokenizer).
    pub fn ignores_merges(self) -> bool {
        self == Self::Llama3
    }

    /// Splits `text` into word ranges (in chars of `cpts`).
    pub fn split(self, cpts: &[char]) -> Vec<Range<usize>> {
        let whole = std::slice::from_ref(&(0..cpts.len())).to_vec();
        match self {
            Self::Gpt2 => split_gpt2(cpts, &whole),
            Self::DigitsThenGpt2 => split_gpt2(cpts, &isolate_numbers(cpts, &whole)),
            Self::Llama3 => split_llama3(cpts, 3),
            Self::Qwen2 => split_llama3(cpts, 1),
        }
    }
}

/// `\p{N}` as a regex split that keeps both matches and the text between them.
fn isolate_numbers(cpts: &[char], ranges: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let mut start = r.start;
        for i in r.clone() {
            if flags(cpts[i]).number {
                if i > start {
                    out.push(start..i);
                }
                out.push(i..i + 1);
                start = i + 1;
            }
        }
        if start < r.end {
            out.push(start..r.end);
        }
    }
    out
}

/// The length of the English contraction `'s|'t|'re|'ve|'m|'ll|'d` starting at `pos` (ASCII
/// case ignored for Llama 3), or 0; `get` is `None` past the text being split.
fn contraction_len(get: impl Fn(usize) -> Option<char>, pos: usize, ignore_case: bool) -> usize {
    if get(pos) != Some('\'') {
        return 0;
    }
    let at = |i: usize| {
        get(pos + i).map(|c| {
            if ignore_case {
                c.to_ascii_lowercase()
            } else {
                c
            }
        })
    };
    match (at(1), at(2)) {
        (Some('s' | 't' | 'm' | 'd'), _) => 2,
        (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => 3,
        _ => 0,
    }
}

/// Where the last alternatives of both splitters end a piece at `pos`, which starts a run of
/// `n_ws` whitespace characters (`more`: text follows the run): `\s+(?!\S)` leaves the run's
/// last space to the next piece, `\s+` takes the run, and with no run (no alternative
/// matched) one character is a piece.
fn whitespace_end(pos: usize, n_ws: usize, more: bool) -> usize {
    if n_ws > 1 && more {
        pos + n_ws - 1
    } else if n_ws > 0 {
        pos + n_ws
    } else {
        pos + 1
    }
}

fn split_gpt2(cpts: &[char], ranges: &[Range<usize>]) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(ranges.len() * 2);
    for r in ranges {
        let (ini, end) = (r.start, r.end);
        let get = |pos: usize| -> Option<char> { (ini <= pos && pos < end).then(|| cpts[pos]) };
        let fl = |pos: usize| -> Flags { get(pos).map(flags).unwrap_or_default() };
        let mut prev_end = ini;
        let mut add = |to: usize, out: &mut Vec<Range<usize>>| -> usize {
            let len = to - prev_end;
            if len > 0 {
                out.push(prev_end..to);
            }
            prev_end = to;
            len
        };
        let mut pos = ini;
        while pos < end {
            let c = cpts[pos];
            let f = fl(pos);
            // 's|'t|'re|'ve|'m|'ll|'d
            let n = contraction_len(get, pos, false);
            if n > 0 {
                pos += add(pos + n, &mut out);
                continue;
            }
            let mut f2 = if c == ' ' { fl(pos + 1) } else { f };
            // <space>?\p{L}+
            if f2.letter {
                pos += (c == ' ') as usize;
                while f2.letter {
                    pos += 1;
                    f2 = fl(pos);
                }
                add(pos, &mut out);
                continue;
            }
            // <space>?\p{N}+
            if f2.number {
                pos += (c == ' ') as usize;
                while f2.number {
                    pos += 1;
                    f2 = fl(pos);
                }
                add(pos, &mut out);
                continue;
            }
            // <space>?[^\s\p{L}\p{N}]+
            if !(f2.whitespace || f2.letter || f2.number) && f2.defined {
                pos += (c == ' ') as usize;
                while !(f2.whitespace || f2.letter || f2.number) && f2.defined {
                    pos += 1;
                    f2 = fl(pos);
                }
                add(pos, &mut out);
                continue;
            }
            let mut n_ws = 0;
            while fl(pos + n_ws).whitespace {
                n_ws += 1;
            }
            pos = whitespace_end(pos, n_ws, get(pos + n_ws).is_some());
            add(pos, &mut out);
        }
    }
    out
}

/// Llama 3's regex (see [`PreTokenizer::Llama3`]) with runs of at most `max_digits` digits,
/// alternative by alternative as llama.cpp's hand-written splitter takes them.
fn split_llama3(cpts: &[char], max_digits: usize) -> Vec<Range<usize>> {
    let end = cpts.len();
    let get = |pos: usize| -> Option<char> { cpts.get(pos).copied() };
    let fl = |pos: usize| -> Flags { get(pos).map(flags).unwrap_or_default() };
    let is_rn = |c: Option<char>| matches!(c, Some('\r' | '\n'));
    let mut out = Vec::new();
    let mut prev_end = 0;
    let mut add = |to: usize, out: &mut Vec<Range<usize>>| -> usize {
        let len = to - prev_end;
        if len > 0 {
            out.push(prev_end..to);
        }
        prev_end = to;
        len
    };
    let mut pos = 0;
    while pos < end {
        let c = cpts[pos];
        let f = fl(pos);
        // (?i:'s|'t|'re|'ve|'m|'ll|'d)
        let n = contraction_len(get, pos, true);
        if n > 0 {
            pos += add(pos + n, &mut out);
            continue;
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(c == '\r' || c == '\n' || f.number) && (f.letter || fl(pos + 1).letter) {
            pos += 1;
            while fl(pos).letter {
                pos += 1;
            }
            add(pos, &mut out);
            continue;
        }
        // \p{N}{1,max_digits}
        if f.number {
            let mut ini = pos;
            while fl(pos).number {
                pos += 1;
                if pos - ini >= max_digits {
                    add(pos, &mut out);
                    ini = pos;
                }
            }
            add(pos, &mut out);
            continue;
        }
        // <space>?[^\s\p{L}\p{N}]+[\r\n]*
        let mut f2 = if c == ' ' { fl(pos + 1) } else { f };
        if !(f2.whitespace || f2.letter || f2.number) && f.defined {
            pos += (c == ' ') as usize;
            while !(f2.whitespace || f2.letter || f2.number) && f2.defined {
                pos += 1;
                f2 = fl(pos);
            }
            while is_rn(get(pos)) {
                pos += 1;
            }
            add(pos, &mut out);
            continue;
        }
        let mut n_ws = 0;
        let mut last_rn_end = 0;
        while fl(pos + n_ws).whitespace {
            if is_rn(get(pos + n_ws)) {
                last_rn_end = pos + n_ws + 1;
            }
            n_ws += 1;
        }
        // \s*[\r\n]+
        if last_rn_end > 0 {
            pos = last_rn_end;
            add(pos, &mut out);
            continue;
        }
        pos = whitespace_end(pos, n_ws, get(pos + n_ws).is_some());
        add(pos, &mut out);
    }
    out
}
