//! Tokenizers built from a GGUF file's metadata, producing the same ids as llama.cpp.
//!
//! Two algorithms, as llama.cpp implements them: byte-level BPE (`tokenizer.ggml.model =
//! gpt2`, ranked merges over a pre-tokenizer's words) and SentencePiece-style merging by
//! score with byte fallback (`llama`). The HF `tokenizers` crate is not used here because
//! neither llama.cpp's special-token partitioning nor its SPM score merge map onto it
//! id-for-id; it is used for `tokenizer.json` models (embeddings).

mod error;
mod pretokenize;
mod table;
pub mod template;
mod unicode;

pub use error::{Result, TokenizerError};
pub use pretokenize::PreTokenizer;
use table::{Repeats, StrTable};

use hearth_gguf::Gguf;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

pub type TokenId = u32;

/// Token attribute, from `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Undefined,
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenKind {
    fn from_type(t: i128) -> Self {
        match t {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Undefined,
        }
    }
}

#[derive(Debug)]
enum Algorithm {
    Bpe {
        pre: PreTokenizer,
        /// "left right" → rank (its position in the merge list).
        ranks: StrTable,
        byte_to_char: Box<[char; 256]>,
        char_to_byte: HashMap<char, u8>,
    },
    Spm,
}

/// Texts that end generation, as llama.cpp recognises them.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
];

#[derive(Debug)]
pub struct Tokenizer {
    algo: Algorithm,
    /// Token texts by id, and id by text.
    vocab: StrTable,
    scores: Vec<f32>,
    kinds: Vec<TokenKind>,
    /// Control, user-defined and unknown tokens, longest text first.
    special: Vec<TokenId>,
    pub bos: Option<TokenId>,
    pub eos: Option<TokenId>,
    pub unk: Option<TokenId>,
    pub add_bos: bool,
    pub add_eos: bool,
    pub add_space_prefix: bool,
    eog: Vec<TokenId>,
    /// `<0xXX>` tokens (SentencePiece byte fallback).
    byte_tokens: [Option<TokenId>; 256],
}

impl Tokenizer {
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let model = g.require_str("tokenizer.ggml.model")?;
        let tokens = g
            .get_array("tokenizer.ggml.tokens")?
            .ok_or_else(|| hearth_gguf::GgufError::MissingKey("tokenizer.ggml.tokens".into()))?;
        let n = tokens.len();
        if n == 0 || n > u32::MAX as usize / 2 {
            return Err(TokenizerError::Inconsistent(format!(
                "vocabulary of {n} tokens"
            )));
        }
        let texts = tokens.strings().ok_or_else(|| {
            TokenizerError::Inconsistent(format!(
                "tokenizer.ggml.tokens holds {}, not strings",
                tokens.item_type()
            ))
        })?;
        let scores = match g.get_array("tokenizer.ggml.scores")? {
            None => vec![0.0; n],
            Some(a) if a.len() == n => (0..n).map(|i| a.f64_at(i).unwrap_or(0.0) as f32).collect(),
            Some(a) => {
                return Err(TokenizerError::Inconsistent(format!(
                    "{} scores for {n} tokens",
                    a.len()
                )))
            }
        };
        let kinds: Vec<TokenKind> = match g.get_array("tokenizer.ggml.token_type")? {
            None => vec![TokenKind::Normal; n],
            Some(a) if a.len() == n => (0..n)
                .map(|i| TokenKind::from_type(a.int_at(i).unwrap_or(0)))
                .collect(),
            Some(a) => {
                return Err(TokenizerError::Inconsistent(format!(
                    "{} token types for {n} tokens",
                    a.len()
                )))
            }
        };
        // A text listed twice maps to its last id, as llama.cpp's `token_to_id[text] = id`.
        let vocab = StrTable::new(texts.clone(), Repeats::Last);
        let id_key = |key: &str| -> Result<Option<TokenId>> {
            // Some converters write -1 for "none".
            match g.get_int(key, -1, i64::MAX as i128)? {
                None | Some(-1) => Ok(None),
                Some(v) if (v as usize) < n => Ok(Some(v as TokenId)),
                Some(v) => Err(TokenizerError::IdOutOfRange {
                    id: v.min(u32::MAX as i128) as u32,
                    n_vocab: n,
                }),
            }
        };
        let algo = match model {
            "gpt2" => {
                let pre_name = g.get_str("tokenizer.ggml.pre")?.unwrap_or("default");
                let pre = PreTokenizer::from_name(pre_name)
                    .ok_or_else(|| TokenizerError::UnsupportedPre(pre_name.into()))?;
                let merges = match g.get_array("tokenizer.ggml.merges")? {
                    None => Default::default(),
                    Some(a) if a.is_empty() => Default::default(),
                    Some(a) => a.strings().cloned().ok_or_else(|| {
                        TokenizerError::Inconsistent(format!(
                            "tokenizer.ggml.merges holds {}, not strings",
                            a.item_type()
                        ))
                    })?,
                };
                if merges.len() > u32::MAX as usize {
                    return Err(TokenizerError::Inconsistent(format!(
                        "{} merges",
                        merges.len()
                    )));
                }
                if let Some((i, m)) = merges.iter().enumerate().find(|(_, m)| !m.contains(' ')) {
                    return Err(TokenizerError::Inconsistent(format!(
                        "merge {i} {m:?} has no space"
                    )));
                }
                // The first listing of a pair is its rank.
                let ranks = StrTable::new(merges, Repeats::First);
                let byte_to_char = Box::new(unicode::byte_to_char_table());
                let char_to_byte = byte_to_char
                    .iter()
                    .enumerate()
                    .map(|(b, &c)| (c, b as u8))
                    .collect();
                Algorithm::Bpe {
                    pre,
                    ranks,
                    byte_to_char,
                    char_to_byte,
                }
            }
            "llama" => Algorithm::Spm,
            other => return Err(TokenizerError::UnsupportedModel(other.into())),
        };
        let is_spm = matches!(algo, Algorithm::Spm);
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = vocab.get(&format!("<0x{b:02X}>"));
        }
        let bos = id_key("tokenizer.ggml.bos_token_id")?;
        let eos = id_key("tokenizer.ggml.eos_token_id")?;
        let eot = id_key("tokenizer.ggml.eot_token_id")?;
        let eom = id_key("tokenizer.ggml.eom_token_id")?;
        let unk = id_key("tokenizer.ggml.unknown_token_id")?;
        let add_bos = g
            .get_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(is_spm);
        let add_eos = g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let add_space_prefix = g
            .get_bool("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(is_spm);
        if add_bos && bos.is_none() {
            return Err(TokenizerError::Inconsistent(
                "add_bos_token is set but there is no BOS token".into(),
            ));
        }

        let mut kinds = kinds;
        let mut eog: Vec<TokenId> = [eos, eot, eom].into_iter().flatten().collect();
        for (i, t) in vocab.iter().enumerate() {
            if EOG_TEXTS.contains(&t) {
                // llama.cpp treats these as control tokens whatever the file says.
                kinds[i] = TokenKind::Control;
                eog.push(i as TokenId);
            }
        }
        eog.sort_unstable();
        eog.dedup();

        let mut special: Vec<TokenId> = (0..n as TokenId)
            .filter(|&i| {
                matches!(
                    kinds[i as usize],
                    TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
                ) && vocab.text(i).is_some_and(|t| !t.is_empty())
            })
            .collect();
        let text_len = |id: TokenId| vocab.text(id).map_or(0, str::len);
        special.sort_by(|&a, &b| text_len(b).cmp(&text_len(a)).then(a.cmp(&b)));

        Ok(Tokenizer {
            algo,
            vocab,
            scores,
            kinds,
            special,
            bos,
            eos,
            unk,
            add_bos,
            add_eos,
            add_space_prefix,
            eog,
            byte_tokens,
        })
    }

    pub fn n_vocab(&self) -> usize {
        self.vocab.len()
    }

    pub fn kind(&self, id: TokenId) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    pub fn token_text(&self, id: TokenId) -> Option<&str> {
        self.vocab.text(id)
    }

    pub fn token_id(&self, text: &str) -> Option<TokenId> {
        self.vocab.get(text)
    }

    /// True for tokens that end generation (EOS, EOT and their kin).
    pub fn is_eog(&self, id: TokenId) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    pub fn eog_tokens(&self) -> &[TokenId] {
        &self.eog
    }

    pub fn check_id(&self, id: TokenId) -> Result<()> {
        if (id as usize) < self.n_vocab() {
            Ok(())
        } else {
            Err(TokenizerError::IdOutOfRange {
                id,
                n_vocab: self.n_vocab(),
            })
        }
    }

    /// Tokenizes `text`. `add_special` adds BOS/EOS as the model asks; `parse_special` turns
    /// control-token text (e.g. `<|im_start|>`) into those tokens — never do that for text a
    /// user typed into a chat turn. User-defined tokens are always matched, as in llama.cpp.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Vec<TokenId> {
        let mut out = Vec::new();
        if add_special && self.add_bos {
            out.extend(self.bos);
        }
        let fragments = self.partition(text, parse_special);
        let mut prev_special = true;
        for frag in fragments {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    match &self.algo {
                        Algorithm::Spm => {
                            let mut s = String::with_capacity(t.len() + 3);
                            if self.add_space_prefix && prev_special {
                                s.push(' ');
                            }
                            s.push_str(t);
                            let escaped = s.replace(' ', "\u{2581}");
                            self.spm_encode(&escaped, &mut out);
                        }
                        Algorithm::Bpe { .. } => self.bpe_encode(t, &mut out),
                    }
                    prev_special = false;
                }
            }
        }
        if add_special && self.add_eos {
            out.extend(self.eos);
        }
        out
    }

    /// Splits text around special tokens, longest first.
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut frags = vec![Fragment::Text(text)];
        if text.is_empty() {
            return vec![];
        }
        for &id in &self.special {
            let kind = self.kinds[id as usize];
            if !parse_special && matches!(kind, TokenKind::Control | TokenKind::Unknown) {
                continue;
            }
            let needle = self.vocab.text(id).unwrap_or_default();
            if !frags
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(needle)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                match f {
                    Fragment::Text(t) => {
                        let mut rest = t;
                        while let Some(p) = rest.find(needle) {
                            if p > 0 {
                                next.push(Fragment::Text(&rest[..p]));
                            }
                            next.push(Fragment::Token(id));
                            rest = &rest[p + needle.len()..];
                        }
                        if !rest.is_empty() {
                            next.push(Fragment::Text(rest));
                        }
                    }
                    tok => next.push(tok),
                }
            }
            frags = next;
        }
        frags
    }

    fn byte_token(&self, b: u8) -> Option<TokenId> {
        self.byte_tokens[b as usize].or_else(|| {
            std::str::from_utf8(&[b])
                .ok()
                .and_then(|s| self.token_id(s))
        })
    }

    fn spm_encode(&self, text: &str, out: &mut Vec<TokenId>) {
        // Symbols start as single characters, linked in a list.
        let mut syms = Sym::chars_of(text);
        // Merge the best-scoring adjacent pair whose concatenation is a token, until none is.
        let mut heap = BinaryHeap::new();
        let try_add = |l: isize, r: isize, syms: &[Sym], heap: &mut BinaryHeap<SpmBigram>| {
            if l < 0 || r < 0 {
                return;
            }
            let (l, r) = (l as usize, r as usize);
            let s = &text[syms[l].start..syms[r].start + syms[r].len];
            if let Some(id) = self.vocab.get(s) {
                heap.push(SpmBigram {
                    score: self.scores[id as usize],
                    left: l,
                    right: r,
                    size: s.len(),
                });
            }
        };
        for i in 1..syms.len() {
            try_add(i as isize - 1, i as isize, &syms, &mut heap);
        }
        while let Some(b) = heap.pop() {
            let (l, r) = (b.left, b.right);
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != b.size {
                continue;
            }
            let (prev, next) = Sym::merge(&mut syms, l, r);
            try_add(prev, l as isize, &syms, &mut heap);
            try_add(l as isize, next, &syms, &mut heap);
        }
        // Every merged symbol is a token; a single character that is not falls back to bytes.
        let mut i: isize = if syms.is_empty() { -1 } else { 0 };
        while i >= 0 {
            let s = syms[i as usize];
            let piece = &text[s.start..s.start + s.len];
            match self.vocab.get(piece) {
                Some(id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        out.extend(self.byte_token(b).or(self.unk));
                    }
                }
            }
            i = s.next;
        }
    }

    fn bpe_encode(&self, text: &str, out: &mut Vec<TokenId>) {
        let Algorithm::Bpe {
            pre,
            ranks,
            byte_to_char,
            ..
        } = &self.algo
        else {
            return;
        };
        let cpts: Vec<char> = text.chars().collect();
        let mut key = String::new();
        let mut utf8 = [0u8; 4];
        for range in pre.split(&cpts) {
            // Byte-level encode the word.
            let mut word = String::new();
            for &c in &cpts[range] {
                for &b in c.encode_utf8(&mut utf8).as_bytes() {
                    word.push(byte_to_char[b as usize]);
                }
            }
            if pre.ignores_merges() {
                if let Some(id) = self.vocab.get(word.as_str()) {
                    out.push(id);
                    continue;
                }
            }
            let mut syms = Sym::chars_of(&word);
            let mut heap = BinaryHeap::new();
            let mut add = |l: isize, r: isize, syms: &[Sym], heap: &mut BinaryHeap<BpeBigram>| {
                if l < 0 || r < 0 {
                    return;
                }
                let (l, r) = (l as usize, r as usize);
                key.clear();
                key.push_str(&word[syms[l].start..syms[l].start + syms[l].len]);
                key.push(' ');
                key.push_str(&word[syms[r].start..syms[r].start + syms[r].len]);
                if let Some(rank) = ranks.get(key.as_str()) {
                    heap.push(BpeBigram {
                        rank,
                        left: l,
                        right: r,
                        size: syms[l].len + syms[r].len,
                    });
                }
            };
            for i in 1..syms.len() {
                add(i as isize - 1, i as isize, &syms, &mut heap);
            }
            while let Some(b) = heap.pop() {
                let (l, r) = (b.left, b.right);
                if syms[l].len == 0
                    || syms[r].len == 0
                    || syms[l].len + syms[r].len != b.size
                    || syms[l].next != r as isize
                {
                    continue;
                }
                let (prev, next) = Sym::merge(&mut syms, l, r);
                add(prev, l as isize, &syms, &mut heap);
                add(l as isize, next, &syms, &mut heap);
            }
            for s in syms.iter().filter(|s| s.len > 0) {
                let piece = &word[s.start..s.start + s.len];
                match self.vocab.get(piece) {
                    Some(id) => out.push(id),
                    None => {
                        for ch in piece.chars() {
                            let mut buf = [0u8; 4];
                            if let Some(id) = self.vocab.get(&*ch.encode_utf8(&mut buf)) {
                                out.push(id);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The bytes a token stands for. Control tokens render only when `special` is true.
    pub fn token_to_piece(&self, id: TokenId, special: bool) -> Vec<u8> {
        let Some(text) = self.vocab.text(id) else {
            return Vec::new();
        };
        match self.kinds[id as usize] {
            TokenKind::Control => {
                if special {
                    text.as_bytes().to_vec()
                } else {
                    Vec::new()
                }
            }
            TokenKind::UserDefined => text.as_bytes().to_vec(),
            TokenKind::Unknown => {
                if matches!(self.algo, Algorithm::Spm) {
                    "\u{2585}".as_bytes().to_vec()
                } else {
                    text.as_bytes().to_vec()
                }
            }
            TokenKind::Byte => match self.byte_tokens.iter().position(|&t| t == Some(id)) {
                Some(b) => vec![b as u8],
                None => Vec::new(),
            },
            TokenKind::Normal | TokenKind::Unused | TokenKind::Undefined => match &self.algo {
                Algorithm::Spm => text.replace('\u{2581}', " ").into_bytes(),
                Algorithm::Bpe { char_to_byte, .. } => text
                    .chars()
                    .map(|c| char_to_byte.get(&c).copied().unwrap_or(b'?'))
                    .collect(),
            },
        }
    }

    /// Decodes ids to text (invalid UTF-8 replaced). Control tokens are skipped unless `special`.
    pub fn decode(&self, ids: &[TokenId], special: bool) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.token_to_piece(id, special))
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

enum Fragment<'t> {
    Text(&'t str),
    Token(TokenId),
}

/// A symbol of a word being merged: a byte range, linked to its neighbours.
#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: isize,
    next: isize,
}

impl Sym {
    /// One symbol per character of `text`.
    fn chars_of(text: &str) -> Vec<Sym> {
        let mut syms: Vec<Sym> = text
            .char_indices()
            .enumerate()
            .map(|(i, (start, ch))| Sym {
                start,
                len: ch.len_utf8(),
                prev: i as isize - 1,
                next: i as isize + 1,
            })
            .collect();
        if let Some(last) = syms.last_mut() {
            last.next = -1;
        }
        syms
    }

    /// Merges symbol `r` into its left neighbour `l`; returns `l`'s new neighbours.
    fn merge(syms: &mut [Sym], l: usize, r: usize) -> (isize, isize) {
        syms[l].len += syms[r].len;
        syms[r].len = 0;
        syms[l].next = syms[r].next;
        if syms[r].next >= 0 {
            let nx = syms[r].next as usize;
            syms[nx].prev = l as isize;
        }
        (syms[l].prev, syms[l].next)
    }
}

struct SpmBigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for SpmBigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for SpmBigram {}
impl PartialOrd for SpmBigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for SpmBigram {
    /// Highest score first; on ties, the leftmost.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}

struct BpeBigram {
    rank: u32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for BpeBigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for BpeBigram {}
impl PartialOrd for BpeBigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for BpeBigram {
    /// Lowest rank first; on ties, the leftmost.
    fn cmp(&self, o: &Self) -> Ordering {
        o.rank.cmp(&self.rank).then(o.left.cmp(&self.left))
    }
}

/// Turns a stream of token pieces into text without ever splitting a UTF-8 character:
/// bytes of an incomplete character are held until the rest arrives.
#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a token's bytes and returns the text that is now complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(
                        std::str::from_utf8(&self.pending[..valid]).expect("checked valid prefix"),
                    );
                    match e.error_len() {
                        // Incomplete character at the end: wait for more bytes.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        // Invalid bytes: replace them and go on.
                        Some(n) => {
                            out.push('\u{FFFD}');
                            self.pending.drain(..valid + n);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left at the end (an incomplete character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_decoder_holds_split_characters() {
        let mut d = StreamDecoder::new();
        let snow = "é☃".as_bytes();
        assert_eq!(d.push(&snow[..1]), "");
        assert_eq!(d.push(&snow[1..3]), "é");
        assert_eq!(d.push(&snow[3..]), "☃");
        assert_eq!(d.push(b"\xffa"), "\u{FFFD}a");
        assert_eq!(d.push(&snow[2..3]), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }
}
