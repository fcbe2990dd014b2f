//! The generation loop: prompt prefill with KV-cache prefix reuse, sampling, streaming
//! UTF-8-safe text, stop strings, end-of-generation tokens and cancellation.

pub mod constraint;
pub mod gbnf;
pub mod loaded;
pub mod perplexity;
pub mod request;
pub mod sampling;
pub mod scheduler;

pub use loaded::LoadedModel;
pub use request::{Next, RequestState};
pub use sampling::{Sampler, SamplingParams};
pub use scheduler::{Event, Job, Scheduler, SchedulerConfig, Summary};

use hearth_models::{KvCache, Model, ModelError, Scratch};
use hearth_tokenizer::{TokenId, Tokenizer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("invalid sampling parameters: {0}")]
    Params(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("prompt of {prompt} tokens does not fit the context of {n_ctx} tokens")]
    PromptTooLong { prompt: usize, n_ctx: usize },
    #[error(transparent)]
    Gguf(#[from] hearth_gguf::GgufError),
    #[error(transparent)]
    Tokenizer(#[from] hearth_tokenizer::TokenizerError),
    /// A schema or grammar that cannot be used (invalid, too large, unsatisfiable).
    #[error("{0}")]
    Grammar(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` reached, or the context is full.
    Length,
    Cancelled,
}

#[derive(Debug, Clone)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Prompt tokens actually computed (the rest came from the cache).
    pub prompt_evaluated: usize,
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    pub generation_time: Duration,
    pub finish: FinishReason,
    /// Generated ids, EOG token excluded.
    pub tokens: Vec<TokenId>,
}

impl GenerationStats {
    pub fn prompt_tps(&self) -> f64 {
        self.prompt_evaluated as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }
    pub fn generation_tps(&self) -> f64 {
        // The first generated token comes from the prompt pass; the rest are decode steps.
        self.generated_tokens.saturating_sub(1) as f64
            / self.generation_time.as_secs_f64().max(1e-9)
    }
}

pub struct GenerateRequest<'a> {
    pub prompt: &'a [TokenId],
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: &'a [String],
    /// Output must match this grammar.
    pub constraint: Option<constraint::Constraint>,
}

/// One sequence: its KV cache and the tokens in it, kept across calls so a new prompt that
/// extends the previous one (a chat's next turn) only computes the new part.
pub struct Session<'m> {
    pub model: &'m Model,
    pub tokenizer: &'m Tokenizer,
    cache: KvCache,
    cached: Vec<TokenId>,
    scratch: Scratch,
    logits: Vec<f32>,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model, tokenizer: &'m Tokenizer, n_ctx: usize) -> Self {
        Session {
            model,
            tokenizer,
            cache: model.new_cache(n_ctx),
            cached: Vec::new(),
            scratch: Scratch::default(),
            logits: Vec::new(),
        }
    }

    pub fn n_ctx(&self) -> usize {
        self.cache.n_ctx
    }

    /// Tokens currently held in the KV cache.
    pub fn cached_tokens(&self) -> &[TokenId] {
        &self.cached
    }

    /// Computes `prompt` (reusing the cached common prefix) and leaves its last logits ready.
    /// Returns how many tokens were computed.
    pub fn prefill(&mut self, prompt: &[TokenId]) -> Result<usize, EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt.len() > self.cache.n_ctx {
            return Err(EngineError::PromptTooLong {
                prompt: prompt.len(),
                n_ctx: self.cache.n_ctx,
            });
        }
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        // At least one token must run to produce logits.
        let keep = self.cache.truncate(common.min(prompt.len() - 1));
        self.cached.truncate(keep);
        let todo = &prompt[keep..];
        self.model
            .forward(todo, &mut self.cache, &mut self.scratch, &mut self.logits)?;
        self.cached.extend_from_slice(todo);
        Ok(todo.len())
    }

    /// Logits after the last computed token.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Runs one token and updates the logits.
    pub fn step(&mut self, token: TokenId) -> Result<(), EngineError> {
        self.run(&[token])
    }

    /// Runs generated tokens (one sampled, then any a grammar forced) and updates the logits.
    fn run(&mut self, tokens: &[TokenId]) -> Result<(), EngineError> {
        self.model
            .decode_run(tokens, &mut self.cache, &mut self.scratch, &mut self.logits)?;
        self.cached.extend_from_slice(tokens);
        Ok(())
    }

    /// Generates a reply to `req.prompt`, streaming text through `on_text`. Stops at an
    /// end-of-generation token, a stop string (not emitted), the end of the grammar,
    /// `max_tokens`, a full context, or when `cancel` is set.
    pub fn generate(
        &mut self,
        req: GenerateRequest,
        cancel: &AtomicBool,
        mut on_text: impl FnMut(&str),
    ) -> Result<GenerationStats, EngineError> {
        req.params.validate().map_err(EngineError::Params)?;
        let t0 = Instant::now();
        let evaluated = self.prefill(req.prompt)?;
        let prompt_time = t0.elapsed();
        let t1 = Instant::now();
        let mut state = RequestState::new(req.params, req.stop, req.max_tokens, req.constraint);
        let finish = loop {
            if cancel.load(Ordering::Relaxed) {
                let Next::Finish { text, .. } = state.finish(FinishReason::Cancelled, true) else {
                    unreachable!("finish returns Finish")
                };
                on_text(&text);
                break FinishReason::Cancelled;
            }
            if req.max_tokens == 0 {
                break FinishReason::Length;
            }
            match state.next(&self.logits, &self.cached, self.tokenizer) {
                Next::Finish { reason, text } => {
                    on_text(&text);
                    break reason;
                }
                Next::Continue { tokens, text } => {
                    on_text(&text);
                    if self.cache.len + tokens.len() > self.cache.n_ctx {
                        // Context full: the tokens have no room to run.
                        let Next::Finish { text, .. } = state.finish(FinishReason::Length, true)
                        else {
                            unreachable!("finish returns Finish")
                        };
                        on_text(&text);
                        break FinishReason::Length;
                    }
                    self.run(&tokens)?;
                }
            }
        };
        Ok(GenerationStats {
            prompt_tokens: req.prompt.len(),
            prompt_evaluated: evaluated,
            prompt_time,
            generated_tokens: state.generated(),
            generation_time: t1.elapsed(),
            finish,
            tokens: state.tokens().to_vec(),
        })
    }
}

/// Holds back text that could be the start of a stop string, and cuts at the first match.
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.to_vec(),
            held: String::new(),
        }
    }

    /// Adds text; returns what may be emitted now and whether a stop string was hit.
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        let stops = self.stops.iter().filter(|s| !s.is_empty());
        if let Some(at) = stops
            .clone()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in stops {
            for (i, _) in s.char_indices().skip(1) {
                if self.held.ends_with(&s[..i]) {
                    keep = keep.max(i);
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let (e, hit) = m.push(p);
            out.push_str(&e);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_pieces() {
        assert_eq!(
            run(&["END"], &["hello E", "N", "D more"]),
            ("hello ".into(), true)
        );
    }

    #[test]
    fn near_miss_is_released() {
        assert_eq!(run(&["END"], &["hello E", "ND"]), ("hello ".into(), true));
        assert_eq!(run(&["END"], &["hello E", "x"]), ("hello Ex".into(), false));
    }

    #[test]
    fn no_stops_passes_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn earliest_stop_wins() {
        assert_eq!(run(&["b", "a"], &["xab"]), ("x".into(), true));
    }
}
