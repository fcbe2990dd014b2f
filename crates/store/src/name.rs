//! Model names, validated before they touch the file system.
//!
//! A name is `SEGMENT(/SEGMENT)*[:TAG]`, e.g. `hf.co/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_K_M`
//! or `smollm2`. Every segment and the tag start with an ASCII letter or digit and hold only
//! letters, digits, `.`, `_` and `-`, so `..`, `.`, absolute paths, backslashes, NULs and
//! anything a shell or file system treats specially are impossible by construction.

use std::fmt;
use std::path::PathBuf;

use crate::StoreError;

pub const MAX_NAME_LEN: usize = 200;
const MAX_SEGMENTS: usize = 6;
const MAX_SEGMENT_LEN: usize = 100;
pub const DEFAULT_TAG: &str = "latest";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelName {
    pub segments: Vec<String>,
    pub tag: String,
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_SEGMENT_LEN
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl ModelName {
    pub fn parse(name: &str) -> Result<Self, StoreError> {
        let invalid = |why: &str| StoreError::InvalidName {
            name: name.chars().take(MAX_NAME_LEN).collect(),
            why: why.to_string(),
        };
        if name.is_empty() || name.len() > MAX_NAME_LEN {
            return Err(invalid("must be 1 to 200 bytes"));
        }
        let (path, tag) = match name.rsplit_once(':') {
            Some((path, tag)) => (path, tag),
            None => (name, DEFAULT_TAG),
        };
        if !valid_segment(tag) {
            return Err(invalid(
                "the tag after ':' must be letters, digits, '.', '_' or '-'",
            ));
        }
        let segments: Vec<String> = path.split('/').map(str::to_string).collect();
        if segments.len() > MAX_SEGMENTS {
            return Err(invalid("too many '/' parts"));
        }
        if !segments.iter().all(|s| valid_segment(s)) {
            return Err(invalid(
                "each '/' part must start with a letter or digit and hold only letters, digits, '.', '_' or '-'",
            ));
        }
        Ok(Self {
            segments,
            tag: tag.to_string(),
        })
    }

    /// Where this name's manifest lives, relative to the store's `manifests/` directory.
    pub fn manifest_relpath(&self) -> PathBuf {
        let mut p: PathBuf = self.segments.iter().collect();
        p.push(format!("{}.json", self.tag));
        p
    }
}

impl fmt::Display for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.segments.join("/"), self.tag)
    }
}

/// Turns an arbitrary file stem into a valid name segment (`my model (1)` → `my-model-1`).
pub fn sanitize_segment(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out.trim_start_matches(|c: char| !c.is_ascii_alphanumeric());
    let mut seg: String = trimmed.chars().take(MAX_SEGMENT_LEN).collect();
    if seg.is_empty() {
        seg = "model".to_string();
    }
    seg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ollama_style_names() {
        let n = ModelName::parse("hf.co/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_K_M").unwrap();
        assert_eq!(
            n.segments,
            ["hf.co", "HuggingFaceTB", "SmolLM2-135M-Instruct-GGUF"]
        );
        assert_eq!(n.tag, "Q4_K_M");
        assert_eq!(ModelName::parse("smollm2").unwrap().tag, "latest");
        assert_eq!(
            ModelName::parse("a/b:c").unwrap().manifest_relpath(),
            PathBuf::from("a/b/c.json")
        );
    }

    #[test]
    fn rejects_paths_and_odd_characters() {
        for bad in [
            "",
            "../../x",
            "..",
            ".",
            "a/../b",
            "/etc/passwd",
            "a//b",
            "a/",
            "C:\\x",
            "a\\b",
            "a b",
            "a\0b",
            ".hidden",
            "a:",
            "a:../x",
            "a:b/c",
            "-rf",
            "ü",
            "a/b/c/d/e/f/g",
            &"x".repeat(201),
        ] {
            assert!(ModelName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sanitizes_file_stems() {
        assert_eq!(sanitize_segment("my model (1)"), "my-model-1-");
        assert_eq!(sanitize_segment("..x"), "x");
        assert_eq!(sanitize_segment("///"), "model");
        assert!(valid_segment(&sanitize_segment("SmolLM2-135M.Q4_1")));
    }
}
