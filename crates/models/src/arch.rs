//! The architectures hearth runs, by GGUF `general.architecture`. Adding one is a file that
//! defines its blocks and a `FAMILY`, and one line here.

use crate::{gemma2, gemma3, llama, phi3, qwen2, qwen3};
use crate::{BatchSeq, Config, Model, Result, Scratch};
use hearth_gguf::Gguf;

/// An architecture's layers, built from a GGUF file.
pub trait Layers: Send + Sync {
    /// Runs every block on the `n` embeddings in `s.x`: the rows of `seqs`, each at the end
    /// of its own cache.
    fn run(&self, m: &Model, n: usize, seqs: &mut [BatchSeq], s: &mut Scratch);
}

pub struct Family {
    pub name: &'static str,
    /// Reads the architecture's own settings into `config` and loads its blocks.
    pub load: fn(&Gguf, &mut Config) -> Result<Box<dyn Layers>>,
}

pub const FAMILIES: &[Family] = &[
    llama::FAMILY,
    qwen2::FAMILY,
    qwen3::FAMILY,
    phi3::FAMILY,
    gemma2::FAMILY,
    gemma3::FAMILY,
];

pub fn family(name: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == name)
}

/// "llama, qwen2, …" for error messages.
pub fn names() -> String {
    FAMILIES
        .iter()
        .map(|f| f.name)
        .collect::<Vec<_>>()
        .join(", ")
}
