//! Text → position lookups over packed strings (a vocabulary, a merge list).

use hashbrown::HashTable;
use hearth_gguf::Strings;
use std::hash::{BuildHasher, RandomState};

/// Packed strings and an index from text to position. The index holds 4 bytes per entry
/// where a `HashMap<String, u32>` holds a 32-byte key plus an allocation: Gemma 3's
/// 262,144 tokens take ~5 MiB here instead of ~25.
#[derive(Debug, Clone)]
pub struct StrTable {
    texts: Strings,
    index: HashTable<u32>,
    hasher: RandomState,
}

/// Which position a text listed more than once keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeats {
    First,
    Last,
}

impl StrTable {
    /// The table of `texts` (at most `u32::MAX` of them; the caller checks).
    pub fn new(texts: Strings, repeats: Repeats) -> Self {
        let hasher = RandomState::new();
        let mut index = HashTable::with_capacity(texts.len());
        let text_of = |j: u32| texts.get(j as usize).unwrap_or_default();
        for (i, t) in texts.iter().enumerate() {
            let h = hasher.hash_one(t);
            match index.find_mut(h, |&j| text_of(j) == t) {
                Some(j) if repeats == Repeats::Last => *j = i as u32,
                Some(_) => {}
                None => {
                    index.insert_unique(h, i as u32, |&j| hasher.hash_one(text_of(j)));
                }
            }
        }
        StrTable {
            texts,
            index,
            hasher,
        }
    }

    /// The position of `text`.
    pub fn get(&self, text: &str) -> Option<u32> {
        let h = self.hasher.hash_one(text);
        self.index
            .find(h, |&j| self.texts.get(j as usize) == Some(text))
            .copied()
    }

    /// The text at position `i`.
    pub fn text(&self, i: u32) -> Option<&str> {
        self.texts.get(i as usize)
    }

    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        self.texts.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_each_text_and_picks_first_or_last_repeat() {
        let s: Strings = ["a", "b", "a", "", "ß"].into_iter().collect();
        let last = StrTable::new(s.clone(), Repeats::Last);
        let first = StrTable::new(s, Repeats::First);
        assert_eq!(last.get("a"), Some(2));
        assert_eq!(first.get("a"), Some(0));
        assert_eq!(first.get("b"), Some(1));
        assert_eq!(first.get(""), Some(3));
        assert_eq!(first.get("ß"), Some(4));
        assert_eq!(first.get("c"), None);
        assert_eq!(first.text(4), Some("ß"));
        assert_eq!(first.text(5), None);
        assert_eq!(first.len(), 5);
    }
}
