//! Token sampling: penalties, then top-k, top-p, min-p, temperature and a seeded draw —
//! llama.cpp's default order. Temperature ≤ 0 means greedy.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub repeat_last_n: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0xC0FFEE,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks ranges; the message names the bad parameter.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |name: &str, v: f32| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(format!("{name} must be a finite number"))
            }
        };
        finite("temperature", self.temperature)?;
        finite("top_p", self.top_p)?;
        finite("min_p", self.min_p)?;
        finite("repeat_penalty", self.repeat_penalty)?;
        finite("presence_penalty", self.presence_penalty)?;
        finite("frequency_penalty", self.frequency_penalty)?;
        if self.temperature < 0.0 {
            return Err("temperature must be >= 0".into());
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err("top_p must be in [0, 1]".into());
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err("min_p must be in [0, 1]".into());
        }
        if self.repeat_penalty <= 0.0 {
            return Err("repeat_penalty must be > 0".into());
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty)
            || !(-2.0..=2.0).contains(&self.frequency_penalty)
        {
            return Err("presence_penalty and frequency_penalty must be in [-2, 2]".into());
        }
        Ok(())
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Candidate (id, logit) pairs, reused between draws.
    cand: Vec<(u32, f32)>,
    /// Logits with penalties applied (only filled when a penalty is on).
    penalized: Vec<f32>,
    /// Probabilities of the candidates and the recent-token window, reused (no allocation
    /// per token).
    probs: Vec<f32>,
    window: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler {
            rng: ChaCha8Rng::seed_from_u64(params.seed),
            cand: Vec::new(),
            penalized: Vec::new(),
            probs: Vec::new(),
            // Full size up front: the window fills up over the first tokens.
            window: Vec::with_capacity(params.repeat_last_n.min(1 << 16)),
            params,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` given the `history` of tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = self.params.clone();
        let logits =
            if p.repeat_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0 {
                logits
            } else {
                self.penalized.clear();
                self.penalized.extend_from_slice(logits);
                apply_penalties(&p, &mut self.penalized, history, &mut self.window);
                &self.penalized
            };
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        self.cand.clear();
        self.cand
            .extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        // top-k (sorted descending afterwards in every case)
        let k = if p.top_k == 0 {
            self.cand.len()
        } else {
            p.top_k.min(self.cand.len())
        };
        if k < self.cand.len() {
            self.cand
                .select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            self.cand.truncate(k);
        }
        self.cand
            .sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // top-p over the softmax of the survivors
        if p.top_p < 1.0 {
            softmax(&self.cand, &mut self.probs);
            let mut cum = 0.0;
            let mut keep = self.cand.len();
            for (i, pr) in self.probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            self.cand.truncate(keep.max(1));
        }
        // min-p: drop tokens less likely than min_p times the best
        if p.min_p > 0.0 {
            let max = self.cand[0].1;
            let thresh = max + p.min_p.ln();
            let keep = self.cand.iter().take_while(|c| c.1 >= thresh).count();
            self.cand.truncate(keep.max(1));
        }
        // temperature, then draw
        for c in self.cand.iter_mut() {
            c.1 /= p.temperature;
        }
        softmax(&self.cand, &mut self.probs);
        let r: f32 = self.rng.random();
        let mut cum = 0.0;
        for (c, pr) in self.cand.iter().zip(&self.probs) {
            cum += pr;
            if r < cum {
                return c.0;
            }
        }
        self.cand.last().map(|c| c.0).unwrap_or(0)
    }
}

/// Repeat (llama.cpp style), presence and frequency penalties over the last `repeat_last_n` tokens.
/// `window` is scratch space.
fn apply_penalties(p: &SamplingParams, logits: &mut [f32], history: &[u32], window: &mut Vec<u32>) {
    window.clear();
    window.extend_from_slice(&history[history.len().saturating_sub(p.repeat_last_n)..]);
    window.sort_unstable();
    for run in window.chunk_by(|a, b| a == b) {
        let (t, n) = (run[0], run.len());
        let Some(l) = logits.get_mut(t as usize) else {
            continue;
        };
        if *l > 0.0 {
            *l /= p.repeat_penalty;
        } else {
            *l *= p.repeat_penalty;
        }
        *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Probabilities of the candidates' logits, into `out`.
fn softmax(c: &[(u32, f32)], out: &mut Vec<f32>) {
    let max = c.iter().map(|x| x.1).fold(f32::NEG_INFINITY, f32::max);
    out.clear();
    out.extend(c.iter().map(|x| (x.1 - max).exp()));
    let sum: f32 = out.iter().sum();
    out.iter_mut().for_each(|v| *v /= sum);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_max() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, 2.0], &[]), 1);
    }

    #[test]
    fn same_seed_same_draws() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                seed,
                ..params.clone()
            });
            (0..20).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..SamplingParams::default()
        });
        for _ in 0..10 {
            assert_eq!(s.sample(&[0.0, 1.0, 0.5], &[]), 1);
        }
    }

    #[test]
    fn repeat_penalty_changes_the_greedy_pick() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: 2.0,
            ..SamplingParams::default()
        });
        assert_eq!(s.sample(&[1.0, 1.5, 0.0], &[1]), 0);
    }

    #[test]
    fn bad_params_are_named() {
        let p = SamplingParams {
            top_p: f32::NAN,
            ..SamplingParams::default()
        };
        assert!(p.validate().unwrap_err().contains("top_p"));
    }
}
