//! A model ready to serve: weights, tokenizer and chat template from one GGUF file.

use std::path::Path;
use std::sync::Arc;

use hearth_gguf::Gguf;
use hearth_models::Model;
use hearth_tokenizer::template::{
    builtin_for_arch, ChatTemplate, Kwargs, Message, CHATML_TEMPLATE,
};
use hearth_tokenizer::{TokenId, Tokenizer};

use crate::EngineError;

pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub arch: String,
}

impl LoadedModel {
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        Self::from_gguf(Arc::new(Gguf::open(path)?))
    }

    pub fn from_gguf(g: Arc<Gguf>) -> Result<Self, EngineError> {
        let tokenizer = Tokenizer::from_gguf(&g)?;
        let arch = g.require_str("general.architecture")?.to_string();
        // The model's own template, else a built-in one for its architecture, else ChatML.
        let template = match g.get_str("tokenizer.chat_template")? {
            Some(t) => ChatTemplate::new(t),
            None => ChatTemplate::new(builtin_for_arch(&arch).unwrap_or(CHATML_TEMPLATE)),
        };
        let model = Model::load(g)?;
        Ok(Self {
            model,
            tokenizer,
            template,
            arch,
        })
    }

    /// The conversation through the chat template, ready for generation: message text is
    /// never parsed for special tokens, BOS added once when the model wants it.
    pub fn chat_tokens(&self, messages: &[Message]) -> Result<Vec<TokenId>, EngineError> {
        self.chat_tokens_with(messages, &Kwargs::new())
    }

    /// [`LoadedModel::chat_tokens`] with extra template variables (`enable_thinking`, ...).
    pub fn chat_tokens_with(
        &self,
        messages: &[Message],
        kwargs: &Kwargs,
    ) -> Result<Vec<TokenId>, EngineError> {
        let tok = &self.tokenizer;
        let bos = tok.bos.and_then(|b| tok.token_text(b)).unwrap_or("");
        let eos = tok.eos.and_then(|e| tok.token_text(e)).unwrap_or("");
        let segs = self
            .template
            .render_segments(messages, true, bos, eos, kwargs)?;
        let mut ids = Vec::new();
        for s in &segs {
            ids.extend(tok.encode(&s.text, false, s.parse_special));
        }
        if let Some(bos) = tok.bos.filter(|_| tok.add_bos) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    /// A raw prompt as llama.cpp's completion endpoint reads it: BOS as the model asks,
    /// special-token text parsed (the caller writes the whole prompt, template and all).
    pub fn text_tokens(&self, text: &str) -> Vec<TokenId> {
        self.tokenizer.encode(text, true, true)
    }
}
