#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Gguf(#[from] hearth_gguf::GgufError),
    #[error(transparent)]
    Quant(#[from] hearth_quant::QuantError),
    #[error("architecture {0:?} is not supported (supported: {1})")]
    UnsupportedArch(String, String),
    #[error("model configuration is invalid: {0}")]
    BadConfig(String),
    #[error("context is full: {needed} tokens needed but the context holds {n_ctx} (raise --ctx)")]
    ContextFull { needed: usize, n_ctx: usize },
    #[error("token id {id} is outside the vocabulary of {n_vocab}")]
    TokenOutOfRange { id: u32, n_vocab: usize },
    #[error("the model needs about {need_mib} MiB of memory but only {have_mib} MiB is available")]
    OutOfMemory { need_mib: u64, have_mib: u64 },
    #[error("KV pool: {0}")]
    KvPool(String),
}

pub type Result<T> = std::result::Result<T, ModelError>;
