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
}

impl PreTokenizer {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "default" | "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es"
            | "jina-v2-de" | "mpt" | "olmo" => Self::Gpt2,
            "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone"
            | "minerva-7b" => Self::DigitsThenGpt2,
            _ => return None,
        })
    }

    /// Splits `text` into word ranges (in chars of `cpts`).
    pub fn split(self, cpts: &[char]) -> Vec<Range<usize>> {
        let whole = std::slice::from_ref(&(0..cpts.len())).to_vec();
        match self {
            Self::Gpt2 => split_gpt2(cpts, &whole),
            Self::DigitsThenGpt2 => split_gpt2(cpts, &isolate_numbers(cpts, &whole)),
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
            if c == '\'' && pos + 1 < end {
                let n = get(pos + 1);
                if matches!(n, Some('s' | 't' | 'm' | 'd')) {
                    pos += add(pos + 2, &mut out);
                    continue;
                }
                if pos + 2 < end {
                    let nn = get(pos + 2);
                    if matches!(
                        (n, nn),
                        (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l'))
                    ) {
                        pos += add(pos + 3, &mut out);
                        continue;
                    }
                }
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
            // \s+(?!\S)
            if n_ws > 1 && get(pos + n_ws).is_some() {
                pos += n_ws - 1;
                add(pos, &mut out);
                continue;
            }
            // \s+
            if n_ws > 0 {
                pos += n_ws;
                add(pos, &mut out);
                continue;
            }
            // no match
            pos += 1;
            add(pos, &mut out);
        }
    }
    out
}
