//! One request's generation state, shared by the CLI's loop ([`crate::Session::generate`])
//! and the server's scheduler: sampler, grammar constraint, end-of-generation detection,
//! streaming UTF-8 decoder, stop strings and counters. Each caller only runs the model and
//! moves tokens; what a token means for the request is decided here, once.

use hearth_tokenizer::{StreamDecoder, TokenId, Tokenizer};

use crate::constraint::Constraint;
use crate::{FinishReason, Sampler, SamplingParams, StopMatcher};

/// Most tokens a grammar may force in after one sampled token (the rest come next step).
const MAX_FORCED: usize = 16;

/// What one sampled token did to the request.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Keep going: run `tokens` through the model next (the sampled token, then any the
    /// grammar forces after it); `text` may be emitted now.
    Continue { tokens: Vec<TokenId>, text: String },
    /// The request is over; `text` is the last of it (anything held back included).
    Finish { reason: FinishReason, text: String },
}

pub struct RequestState {
    sampler: Sampler,
    constraint: Option<Constraint>,
    /// A constraint waiting for its trigger text, and the generated text searched for it.
    pending: Option<(Constraint, String)>,
    decoder: StreamDecoder,
    stops: StopMatcher,
    max_tokens: usize,
    /// Tokens generated (end-of-generation token excluded).
    tokens: Vec<TokenId>,
    /// Logits with the grammar's mask applied (only used under a constraint).
    masked: Vec<f32>,
}

impl RequestState {
    pub fn new(
        params: SamplingParams,
        stop: &[String],
        max_tokens: usize,
        constraint: Option<Constraint>,
    ) -> Self {
        let (constraint, pending) = match constraint {
            Some(c) if c.trigger().is_some() => (None, Some((c, String::new()))),
            c => (c, None),
        };
        Self {
            sampler: Sampler::new(params),
            constraint,
            pending,
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(stop),
            max_tokens,
            tokens: Vec::new(),
            masked: Vec::new(),
        }
    }

    /// Tokens generated so far (end-of-generation token excluded).
    pub fn generated(&self) -> usize {
        self.tokens.len()
    }

    pub fn tokens(&self) -> &[TokenId] {
        &self.tokens
    }

    /// Picks the next token from `logits` (`history`: the sequence so far, for penalties)
    /// and says whether the request goes on.
    pub fn next(&mut self, logits: &[f32], history: &[TokenId], tok: &Tokenizer) -> Next {
        let token = match &mut self.constraint {
            None => self.sampler.sample(logits, history),
            Some(c) => {
                self.masked.clear();
                self.masked.extend_from_slice(logits);
                if !c.mask(&mut self.masked) {
                    // The grammar allows nothing more: it is complete (or failed).
                    if let Some(e) = c.error() {
                        tracing::warn!("grammar stopped: {e}");
                    }
                    return self.finish(FinishReason::Stop, true);
                }
                let token = self.sampler.sample(&self.masked, history);
                if !tok.is_eog(token) && !c.accept(token) {
                    tracing::warn!("grammar refused token {token} it had allowed");
                    return self.finish(FinishReason::Stop, true);
                }
                token
            }
        };
        if tok.is_eog(token) {
            return self.finish(FinishReason::Stop, true);
        }
        let mut emit = String::new();
        if let Some(done) = self.take(token, tok, &mut emit) {
            return done;
        }
        let mut tokens = vec![token];
        // Tokens the grammar forces go in without sampling (fast-forward): a JSON key or a
        // tool's name costs one step instead of one per token.
        let forced = match &mut self.constraint {
            Some(c) => c.forced(MAX_FORCED),
            None => Vec::new(),
        };
        for t in forced {
            tokens.push(t);
            if let Some(done) = self.take(t, tok, &mut emit) {
                return done;
            }
        }
        Next::Continue { tokens, text: emit }
    }

    /// Records one generated token, adding the text it releases to `emit`; the request's end
    /// if this token ends it (a stop string, the grammar complete, `max_tokens`).
    fn take(&mut self, token: TokenId, tok: &Tokenizer, emit: &mut String) -> Option<Next> {
        self.tokens.push(token);
        let text = self.decoder.push(&tok.token_to_piece(token, false));
        self.arm_on_trigger(&text);
        let (released, hit) = self.stops.push(&text);
        emit.push_str(&released);
        if hit {
            // The stop string and what follows it are cut: nothing held back is released.
            return Some(Next::Finish {
                reason: FinishReason::Stop,
                text: std::mem::take(emit),
            });
        }
        let reason = if self
            .constraint
            .as_ref()
            .is_some_and(Constraint::is_finished)
        {
            FinishReason::Stop
        } else if self.tokens.len() >= self.max_tokens {
            FinishReason::Length
        } else {
            return None;
        };
        let Next::Finish { text: rest, .. } = self.finish(reason, true) else {
            unreachable!("finish returns Finish")
        };
        Some(Next::Finish {
            reason,
            text: std::mem::take(emit) + &rest,
        })
    }

    /// Arms a waiting constraint once the generated text ends with its trigger. Text that
    /// runs past the trigger inside one token cannot be aligned with the grammar: the
    /// constraint then stays off (the tag is a single token in the vocabularies that use it).
    fn arm_on_trigger(&mut self, text: &str) {
        let Some((c, seen)) = &mut self.pending else {
            return;
        };
        seen.push_str(text);
        let trigger = c.trigger().unwrap_or_default();
        if seen.ends_with(trigger) {
            if let Some((c, _)) = self.pending.take() {
                self.constraint = Some(c);
            }
        } else if seen.len() > 4 * trigger.len() {
            // Only the tail can still end with the trigger.
            let keep = seen.len() - trigger.len();
            let cut = (keep..seen.len())
                .find(|&i| seen.is_char_boundary(i))
                .unwrap_or(seen.len());
            seen.drain(..cut);
        }
    }

    /// Ends the request for `reason`; `flush` releases text held back for stop strings or
    /// an incomplete UTF-8 character.
    pub fn finish(&mut self, reason: FinishReason, flush: bool) -> Next {
        let text = if flush {
            let (emit, _) = self.stops.push(&self.decoder.finish());
            emit + &self.stops.flush()
        } else {
            String::new()
        };
        Next::Finish { reason, text }
    }
}
