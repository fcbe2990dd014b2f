#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] hearth_gguf::GgufError),
    #[error("tokenizer model {0:?} is not supported (supported: gpt2, llama)")]
    UnsupportedModel(String),
    #[error("pre-tokenizer {0:?} is not supported yet")]
    UnsupportedPre(String),
    #[error("tokenizer metadata is inconsistent: {0}")]
    Inconsistent(String),
    #[error("token id {id} is outside the vocabulary of {n_vocab} tokens")]
    IdOutOfRange { id: u32, n_vocab: usize },
    #[error("chat template error: {0}")]
    Template(String),
}

pub type Result<T> = std::result::Result<T, TokenizerError>;
