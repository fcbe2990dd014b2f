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
        if let Some(token) = self.candidates(logits, history) {
            return token;
        }
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

    /// The distribution the next draw is taken from: (token, probability) of every token
    /// left after the penalties, top-k, top-p, min-p and temperature, most likely first.
    /// Greedy sampling (temperature ≤ 0) gives the one token it picks, with probability 1.
    pub fn distribution(&mut self, logits: &[f32], history: &[u32]) -> Vec<(u32, f32)> {
        match self.candidates(logits, history) {
            Some(token) => vec![(token, 1.0)],
            None => self
                .cand
                .iter()
                .zip(&self.probs)
                .map(|(c, &p)| (c.0, p))
                .collect(),
        }
    }

    /// Filters `logits` into `cand` / `probs` (the draw's distribution), or returns the
    /// greedy pick.
    fn candidates(&mut self, logits: &[f32], history: &[u32]) -> Option<u32> {
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
            return Some(argmax(logits));
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
        None
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

    /// Softmax of `logits` over `ids` (f64), the hand computation the tests compare with.
    fn expected(ids: &[u32], logits: &[f64]) -> Vec<(u32, f32)> {
        let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        ids.iter()
            .zip(&e)
            .map(|(&i, &x)| (i, (x / sum) as f32))
            .collect()
    }

    fn assert_same(got: &[(u32, f32)], want: &[(u32, f32)]) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!(
                g.0 == w.0 && (g.1 - w.1).abs() < 1e-6,
                "{got:?} vs {want:?}"
            );
        }
    }

    /// Everything off: temperature 1, no top-k/top-p/min-p, no penalties.
    fn plain() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplingParams::default()
        }
    }

    const LOGITS: [f32; 5] = [2.0, 1.0, 0.5, 0.0, -1.0];

    fn dist(p: SamplingParams, history: &[u32]) -> Vec<(u32, f32)> {
        Sampler::new(p).distribution(&LOGITS, history)
    }

    #[test]
    fn top_k_one_equals_greedy_on_any_logits() {
        for seed in 0..50u64 {
            let logits: Vec<f32> = (0..64)
                .map(|i| ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 37.0)
                .collect();
            let greedy = Sampler::new(SamplingParams::greedy()).sample(&logits, &[]);
            let mut k1 = Sampler::new(SamplingParams {
                top_k: 1,
                temperature: 3.0,
                seed,
                ..plain()
            });
            assert_eq!(k1.sample(&logits, &[]), greedy);
            assert_eq!(k1.distribution(&logits, &[]), vec![(greedy, 1.0)]);
        }
    }

    #[test]
    fn top_k_keeps_the_k_largest() {
        let got = dist(
            SamplingParams {
                top_k: 3,
                ..plain()
            },
            &[],
        );
        assert_same(&got, &expected(&[0, 1, 2], &[2.0, 1.0, 0.5]));
    }

    #[test]
    fn top_p_keeps_the_smallest_set_reaching_p() {
        // softmax(LOGITS) = 0.563, 0.207, 0.126, 0.076, 0.028: 0.563 + 0.207 ≥ 0.7.
        let got = dist(
            SamplingParams {
                top_p: 0.7,
                ..plain()
            },
            &[],
        );
        assert_same(&got, &expected(&[0, 1], &[2.0, 1.0]));
        // 0.770 < 0.8 ≤ 0.896: three tokens.
        let got = dist(
            SamplingParams {
                top_p: 0.8,
                ..plain()
            },
            &[],
        );
        assert_same(&got, &expected(&[0, 1, 2], &[2.0, 1.0, 0.5]));
    }

    #[test]
    fn min_p_drops_tokens_below_min_p_times_the_best() {
        // p / p_max = e^(l - 2): 1, 0.368, 0.223, 0.135, 0.050.
        let got = dist(
            SamplingParams {
                min_p: 0.2,
                ..plain()
            },
            &[],
        );
        assert_same(&got, &expected(&[0, 1, 2], &[2.0, 1.0, 0.5]));
        let got = dist(
            SamplingParams {
                min_p: 0.1,
                ..plain()
            },
            &[],
        );
        assert_same(&got, &expected(&[0, 1, 2, 3], &[2.0, 1.0, 0.5, 0.0]));
    }

    #[test]
    fn temperature_divides_the_logits() {
        let got = dist(
            SamplingParams {
                temperature: 0.5,
                ..plain()
            },
            &[],
        );
        assert_same(
            &got,
            &expected(&[0, 1, 2, 3, 4], &[4.0, 2.0, 1.0, 0.0, -2.0]),
        );
    }

    #[test]
    fn repeat_penalty_divides_positive_and_multiplies_negative_logits() {
        // Tokens 0 (2.0 → 1.0) and 4 (-1.0 → -2.0) were seen; token 3 (0.0) stays 0.
        let got = dist(
            SamplingParams {
                repeat_penalty: 2.0,
                ..plain()
            },
            &[0, 4, 3, 0],
        );
        assert_same(
            &got,
            &expected(&[0, 1, 2, 3, 4], &[1.0, 1.0, 0.5, 0.0, -2.0]),
        );
    }

    #[test]
    fn presence_and_frequency_penalties_subtract_per_token_and_per_occurrence() {
        // Token 1 seen twice: 1.0 - (2 · 0.25 + 0.5) = 0.0; token 4 once: -1.0 - 0.75.
        let p = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..plain()
        };
        let got = dist(p, &[1, 4, 1]);
        assert_same(
            &got,
            &expected(&[0, 2, 1, 3, 4], &[2.0, 0.5, 0.0, 0.0, -1.75]),
        );
    }

    #[test]
    fn repeat_last_n_limits_the_penalty_window() {
        // Only the last token (1) is in the window: token 0 keeps its logit.
        let p = SamplingParams {
            repeat_penalty: 4.0,
            repeat_last_n: 1,
            ..plain()
        };
        let got = dist(p, &[0, 1]);
        assert_same(
            &got,
            &expected(&[0, 2, 1, 3, 4], &[2.0, 0.5, 0.25, 0.0, -1.0]),
        );
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
