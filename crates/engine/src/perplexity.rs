//! Perplexity and KL divergence with `llama-perplexity`'s definitions, reading and writing
//! its base-logits file, so a base made by either tool serves the other.
//!
//! The text is tokenized once (BOS when the model adds one, special-token text left as
//! text) and cut into chunks of `n_ctx` tokens; each chunk runs in an empty cache with its
//! first token replaced by BOS (when the model adds one); the tokens of its second half are
//! scored (position `j` predicts token `j + 1`, for `j` in `n_ctx/2 .. n_ctx - 1`).
//! `PPL = exp(mean NLL)`, its uncertainty `PPL · sqrt(var(NLL) / (count - 1))`.
//!
//! Base-logits file (little-endian): `_logits_`, `n_ctx` (u32), `n_vocab` (i32), `n_chunk`
//! (i32), the `n_chunk · n_ctx` tokens (i32), then per chunk and scored position one row of
//! `2·⌈n_vocab/2⌉ + 4` u16: `scale` and `min_log_prob` (two f32), then each token's
//! log-probability as `min_log_prob + scale · q` (q = 0 below `max − 16`).

use std::io::{Read, Write};

use hearth_models::{Model, Scratch};

use crate::EngineError;

#[derive(Debug, Clone)]
pub struct Options {
    /// Tokens per chunk (`-c`).
    pub n_ctx: usize,
    /// At most this many chunks (`--chunks`).
    pub chunks: Option<usize>,
}

/// Accumulated NLL statistics, and with a base file the KL-divergence ones, named as in
/// llama-perplexity.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub count: usize,
    pub sum_nll: f64,
    pub sum_nll2: f64,
    pub sum_nll_base: f64,
    pub sum_nll_base2: f64,
    pub sum_nll_nll_base: f64,
    pub sum_kld: f64,
    pub sum_kld2: f64,
    pub sum_p_diff: f64,
    pub sum_p_diff2: f64,
    pub sum_p_diff4: f64,
    pub n_same_top: usize,
    /// Per scored position (KL-divergence mode).
    pub kld_values: Vec<f32>,
    pub p_diff_values: Vec<f32>,
}

/// `(mean, uncertainty of the mean)` as llama-perplexity computes them.
pub fn mean_and_uncertainty(sum: f64, sum2: f64, count: usize) -> (f64, f64) {
    if count < 1 {
        return (0.0, 0.0);
    }
    let f = sum / count as f64;
    let df = sum2 / count as f64 - f * f;
    let df = if df > 0.0 && count > 10 {
        (df / (count - 1) as f64).sqrt()
    } else {
        0.0
    };
    (f, df)
}

fn covariance(suma: f64, sumb: f64, sumab: f64, count: usize) -> f64 {
    if count < 10 {
        return 0.0;
    }
    let n = count as f64;
    (sumab / n - (suma / n) * (sumb / n)) / (n - 1.0)
}

impl Stats {
    /// `(PPL, uncertainty)` over the positions so far.
    pub fn ppl(&self) -> (f64, f64) {
        let (m, u) = mean_and_uncertainty(self.sum_nll, self.sum_nll2, self.count);
        (m.exp(), m.exp() * u)
    }

    /// llama-perplexity's final `PPL = x +/- y` (its own formula, without the count > 10
    /// rule of the per-chunk figures).
    pub fn final_estimate(&self) -> (f64, Option<f64>) {
        let n = self.count as f64;
        let nll = self.sum_nll / n;
        let var = self.sum_nll2 / n - nll * nll;
        let ppl = nll.exp();
        (ppl, (var > 0.0).then(|| (var / (n - 1.0)).sqrt() * ppl))
    }
}

/// Tokens of `text` as llama-perplexity takes them.
pub fn tokenize(tok: &hearth_tokenizer::Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, true, false)
}

fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

/// The row llama-perplexity stores for one position, and the position's NLL.
fn encode_row(logits: &[f32], tok: usize, row: &mut [u16]) -> f64 {
    let mut max = logits[0];
    let mut min = logits[0];
    for &l in &logits[1..] {
        max = max.max(l);
        min = min.min(l);
    }
    let min = min.max(max - 16.0);
    let sum_exp: f64 = logits.iter().map(|&l| (l - max).exp() as f64).sum();
    let log_sum_exp = sum_exp.ln() as f32;
    let min_log_prob = min - max - log_sum_exp;
    let scale = (max - min) / 65535.0;
    row[..2].copy_from_slice(&u16_pair(scale));
    row[2..4].copy_from_slice(&u16_pair(min_log_prob));
    let q = &mut row[4..4 + logits.len()];
    if scale != 0.0 {
        let inv = 1.0 / scale;
        for (o, &l) in q.iter_mut().zip(logits) {
            // As C converts an int to uint16_t.
            *o = if l > min {
                nearest_int(inv * (l - min)) as u16
            } else {
                0
            };
        }
    } else {
        q.fill(0);
    }
    (max + log_sum_exp - logits[tok]) as f64
}

fn u16_pair(x: f32) -> [u16; 2] {
    let b = x.to_le_bytes();
    [
        u16::from_le_bytes([b[0], b[1]]),
        u16::from_le_bytes([b[2], b[3]]),
    ]
}

fn f32_of(pair: &[u16]) -> f32 {
    let (a, b) = (pair[0].to_le_bytes(), pair[1].to_le_bytes());
    f32::from_le_bytes([a[0], a[1], b[0], b[1]])
}

/// One position against a base row: adds to `st` as llama-perplexity does.
fn compare_row(logits: &[f32], tok: usize, base: &[u16], st: &mut Stats) {
    let (mut max, mut imax) = (logits[0], 0);
    for (i, &l) in logits.iter().enumerate().skip(1) {
        if l > max {
            (max, imax) = (l, i);
        }
    }
    let sum_exp: f64 = logits.iter().map(|&l| (l - max).exp() as f64).sum();
    let log_sum_exp = sum_exp.ln() as f32;
    let (scale, min_log_prob) = (f32_of(&base[..2]), f32_of(&base[2..4]));
    let q = &base[4..4 + logits.len()];
    let nll = max + log_sum_exp - logits[tok];
    st.sum_nll += nll as f64;
    st.sum_nll2 += (nll * nll) as f64;
    let nll_base = -(scale * q[tok] as f32 + min_log_prob);
    st.sum_nll_base += nll_base as f64;
    st.sum_nll_base2 += (nll_base * nll_base) as f64;
    st.sum_nll_nll_base += (nll * nll_base) as f64;
    let lse = max + log_sum_exp;
    let (mut sum, mut imax_base, mut best) = (0f64, 0, 0f32);
    for (i, (&qi, &l)) in q.iter().zip(logits).enumerate() {
        let p_log_base = scale * qi as f32 + min_log_prob;
        if i == 0 || p_log_base > best {
            (best, imax_base) = (p_log_base, i);
        }
        if p_log_base > -16.0 {
            sum += (p_log_base.exp() * (p_log_base - l + lse)) as f64;
        }
    }
    st.sum_kld += sum;
    st.sum_kld2 += sum * sum;
    st.count += 1;
    st.n_same_top += (imax == imax_base) as usize;
    let p_diff = (-nll).exp() - (-nll_base).exp();
    st.sum_p_diff += p_diff as f64;
    let d2 = (p_diff * p_diff) as f64;
    st.sum_p_diff2 += d2;
    st.sum_p_diff4 += d2 * d2;
    st.kld_values.push(sum as f32);
    st.p_diff_values.push(p_diff);
}

/// What a run is compared with, if anything.
pub enum Base<'a> {
    /// Perplexity only.
    None,
    /// Perplexity, and every scored row written to a base-logits file.
    Save(&'a mut dyn Write),
    /// KL divergence against a base-logits file (its tokens are the text).
    Compare(&'a mut dyn Read),
}

/// The header of a base-logits file: (n_ctx, n_vocab, tokens).
pub fn read_base_header(r: &mut dyn Read) -> Result<(usize, usize, Vec<u32>), EngineError> {
    let bad = |why: String| EngineError::Params(format!("base logits file: {why}"));
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|e| bad(e.to_string()))?;
    if &magic != b"_logits_" {
        return Err(bad("does not start with _logits_".into()));
    }
    let mut word = [0u8; 4];
    let mut next = |r: &mut dyn Read| -> Result<u32, EngineError> {
        r.read_exact(&mut word).map_err(|e| bad(e.to_string()))?;
        Ok(u32::from_le_bytes(word))
    };
    let n_ctx = next(r)? as usize;
    let n_vocab = next(r)? as usize;
    let n_chunk = next(r)? as usize;
    if !(2..=1 << 20).contains(&n_ctx) || n_vocab == 0 || n_vocab > 1 << 24 || n_chunk > 1 << 20 {
        return Err(bad(format!(
            "n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk} out of range"
        )));
    }
    let n = n_ctx
        .checked_mul(n_chunk)
        .filter(|&n| n <= 1 << 28)
        .ok_or_else(|| bad("too many tokens".into()))?;
    let mut bytes = vec![0u8; n * 4];
    r.read_exact(&mut bytes)
        .map_err(|e| bad(format!("tokens: {e}")))?;
    let tokens = bytes
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((n_ctx, n_vocab, tokens))
}

/// Runs the chunks of `tokens` (`n_ctx` each). `on_chunk(chunk, stats)` is called after
/// each. With [`Base::Compare`], `tokens` must be the base file's and its header already
/// read ([`read_base_header`]).
pub fn run(
    model: &Model,
    bos: Option<u32>,
    tokens: &[u32],
    opts: &Options,
    mut base: Base,
    mut on_chunk: impl FnMut(usize, &Stats),
) -> Result<Stats, EngineError> {
    let n_ctx = opts.n_ctx;
    let n_vocab = model.config.n_vocab;
    if n_ctx < 2 {
        return Err(EngineError::Params(
            "the context (-c) must be at least 2".into(),
        ));
    }
    if tokens.len() < 2 * n_ctx && !matches!(base, Base::Compare(_)) {
        return Err(EngineError::Params(format!(
            "you need at least {} tokens to evaluate perplexity with a context of {n_ctx}; the text has {}",
            2 * n_ctx,
            tokens.len()
        )));
    }
    if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(EngineError::Params(format!(
            "token {bad} is outside the vocabulary of {n_vocab}"
        )));
    }
    let n_chunk = (tokens.len() / n_ctx).min(opts.chunks.unwrap_or(usize::MAX));
    let first = n_ctx / 2;
    let nv = 2 * n_vocab.div_ceil(2) + 4;
    if let Base::Save(w) = &mut base {
        let mut head = b"_logits_".to_vec();
        for v in [n_ctx as u32, n_vocab as u32, n_chunk as u32] {
            head.extend_from_slice(&v.to_le_bytes());
        }
        for &t in &tokens[..n_chunk * n_ctx] {
            head.extend_from_slice(&t.to_le_bytes());
        }
        w.write_all(&head)
            .map_err(|e| EngineError::Params(format!("writing the logits file: {e}")))?;
    }
    let mut stats = Stats::default();
    let mut cache = model.new_cache(n_ctx);
    let (mut scratch, mut logits) = (Scratch::default(), Vec::new());
    let mut input = Vec::with_capacity(n_ctx);
    let mut rows = vec![0u16; (n_ctx - 1 - first) * nv];
    for chunk in 0..n_chunk {
        let toks = &tokens[chunk * n_ctx..(chunk + 1) * n_ctx];
        input.clear();
        input.extend_from_slice(toks);
        if let Some(b) = bos {
            input[0] = b;
        }
        cache.truncate(0);
        model.forward_all(&input, &mut cache, &mut scratch, first, &mut logits)?;
        let scored = n_ctx - 1 - first;
        let row_logits = |j: usize| &logits[j * n_vocab..(j + 1) * n_vocab];
        match &mut base {
            Base::Compare(r) => {
                let mut bytes = vec![0u8; rows.len() * 2];
                r.read_exact(&mut bytes).map_err(|e| {
                    EngineError::Params(format!("base logits file: chunk {}: {e}", chunk + 1))
                })?;
                for (o, b) in rows.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = u16::from_le_bytes([b[0], b[1]]);
                }
                for j in 0..scored {
                    let next = toks[first + j + 1] as usize;
                    compare_row(row_logits(j), next, &rows[j * nv..(j + 1) * nv], &mut stats);
                }
            }
            _ => {
                for j in 0..scored {
                    let next = toks[first + j + 1] as usize;
                    let nll = encode_row(row_logits(j), next, &mut rows[j * nv..(j + 1) * nv]);
                    stats.sum_nll += nll;
                    stats.sum_nll2 += nll * nll;
                    stats.count += 1;
                }
                if let Base::Save(w) = &mut base {
                    let bytes: Vec<u8> = rows.iter().flat_map(|v| v.to_le_bytes()).collect();
                    w.write_all(&bytes).map_err(|e| {
                        EngineError::Params(format!("writing the logits file: {e}"))
                    })?;
                }
            }
        }
        on_chunk(chunk, &stats);
    }
    Ok(stats)
}

/// The value at `fraction` of sorted `values`, interpolated as llama-perplexity does.
pub fn percentile(values: &[f32], fraction: f32) -> f32 {
    if fraction <= 0.0 {
        return values[0];
    }
    if fraction >= 1.0 {
        return values[values.len() - 1];
    }
    let p = fraction * (values.len() - 1) as f32;
    let ip = p as usize;
    let p = p - ip as f32;
    (1.0 - p) * values[ip] + p * values[(ip + 1).min(values.len() - 1)]
}

/// The figures llama-perplexity prints for one chunk in KL-divergence mode:
/// PPL, ln(PPL(Q)/PPL(base)), KLD, Δp RMS, same top p (each with its uncertainty).
pub fn kld_chunk_line(chunk: usize, st: &Stats) -> String {
    let (log_ppl, log_ppl_u) = mean_and_uncertainty(st.sum_nll, st.sum_nll2, st.count);
    let (log_base, log_base_u) = mean_and_uncertainty(st.sum_nll_base, st.sum_nll_base2, st.count);
    let cov = covariance(st.sum_nll, st.sum_nll_base, st.sum_nll_nll_base, st.count);
    let ratio_u = (log_ppl_u * log_ppl_u + log_base_u * log_base_u - 2.0 * cov).sqrt();
    let (kld, kld_u) = mean_and_uncertainty(st.sum_kld, st.sum_kld2, st.count);
    let (mse, mse_u) = mean_and_uncertainty(st.sum_p_diff2, st.sum_p_diff4, st.count);
    let rms = mse.sqrt();
    let rms_u = 0.5 / rms * mse_u;
    let top = st.n_same_top as f64 / st.count as f64;
    let top_u = (top * (1.0 - top) / (st.count as f64 - 1.0)).sqrt();
    format!(
        "{:4}    {:9.4} ± {:9.4}    {:10.5} ± {:10.5}    {:10.5} ± {:10.5}    {:6.3} ± {:6.3} %    {:6.3} ± {:6.3} %",
        chunk + 1,
        log_ppl.exp(),
        log_ppl.exp() * log_ppl_u,
        log_ppl - log_base,
        ratio_u,
        kld,
        kld_u,
        100.0 * rms,
        100.0 * rms_u,
        100.0 * top,
        100.0 * top_u
    )
}

/// The closing statistics of KL-divergence mode, in llama-perplexity's words.
pub fn kld_summary(st: &Stats) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    if st.count < 100 {
        return o; // llama-perplexity prints no statistics on so few values
    }
    let mut kv = st.kld_values.clone();
    let mut pv = st.p_diff_values.clone();
    kv.sort_by(f32::total_cmp);
    pv.sort_by(f32::total_cmp);
    let median = |v: &[f32]| {
        if v.len().is_multiple_of(2) {
            0.5 * (v[v.len() / 2] + v[v.len() / 2 - 1])
        } else {
            v[v.len() / 2]
        }
    };
    let (log_ppl, log_ppl_u) = mean_and_uncertainty(st.sum_nll, st.sum_nll2, st.count);
    let (log_base, log_base_u) = mean_and_uncertainty(st.sum_nll_base, st.sum_nll_base2, st.count);
    let (ppl, ppl_u) = (log_ppl.exp(), log_ppl.exp() * log_ppl_u);
    let (pb, pb_u) = (log_base.exp(), log_base.exp() * log_base_u);
    let cov = covariance(st.sum_nll, st.sum_nll_base, st.sum_nll_nll_base, st.count);
    let cor = cov / (log_ppl_u * log_base_u);
    let ratio = log_ppl - log_base;
    let ratio_u = (log_ppl_u * log_ppl_u + log_base_u * log_base_u - 2.0 * cov).sqrt();
    let ppl_cov = ppl * pb * cov;
    let _ = writeln!(o, "====== Perplexity statistics ======");
    let _ = writeln!(
        o,
        "Mean PPL(Q)                   : {ppl:10.6} ± {ppl_u:10.6}"
    );
    let _ = writeln!(o, "Mean PPL(base)                : {pb:10.6} ± {pb_u:10.6}");
    let _ = writeln!(o, "Cor(ln(PPL(Q)), ln(PPL(base))): {:6.2}%", 100.0 * cor);
    let _ = writeln!(
        o,
        "Mean ln(PPL(Q)/PPL(base))     : {ratio:10.6} ± {ratio_u:10.6}"
    );
    let _ = writeln!(
        o,
        "Mean PPL(Q)/PPL(base)         : {:10.6} ± {:10.6}",
        ratio.exp(),
        ratio.exp() * ratio_u
    );
    let _ = writeln!(
        o,
        "Mean PPL(Q)-PPL(base)         : {:10.6} ± {:10.6}",
        ppl - pb,
        (ppl_u * ppl_u + pb_u * pb_u - 2.0 * ppl_cov).sqrt()
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "====== KL divergence statistics ======");
    let (kld, kld_u) = mean_and_uncertainty(st.sum_kld, st.sum_kld2, st.count);
    let _ = writeln!(o, "Mean    KLD: {kld:10.6} ± {kld_u:10.6}");
    let _ = writeln!(o, "Maximum KLD: {:10.6}", kv[kv.len() - 1]);
    for (label, f) in [
        ("99.9%", 0.999),
        ("99.0%", 0.99),
        ("95.0%", 0.95),
        ("90.0%", 0.9),
    ] {
        let _ = writeln!(o, "{label}   KLD: {:10.6}", percentile(&kv, f));
    }
    let _ = writeln!(o, "Median  KLD: {:10.6}", median(&kv));
    for (label, f) in [
        ("10.0%", 0.1),
        (" 5.0%", 0.05),
        (" 1.0%", 0.01),
        (" 0.1%", 0.001),
    ] {
        let _ = writeln!(o, "{label}   KLD: {:10.6}", percentile(&kv, f));
    }
    let _ = writeln!(o, "Minimum KLD: {:10.6}", kv[0]);
    let _ = writeln!(o);
    let _ = writeln!(o, "====== Token probability statistics ======");
    let (pd, pd_u) = mean_and_uncertainty(st.sum_p_diff, st.sum_p_diff2, st.count);
    let _ = writeln!(o, "Mean    Δp: {:6.3} ± {:5.3} %", 100.0 * pd, 100.0 * pd_u);
    let _ = writeln!(o, "Maximum Δp: {:6.3}%", 100.0 * pv[pv.len() - 1]);
    for (label, f) in [
        ("99.9%", 0.999),
        ("99.0%", 0.99),
        ("95.0%", 0.95),
        ("90.0%", 0.9),
        ("75.0%", 0.75),
    ] {
        let _ = writeln!(o, "{label}   Δp: {:6.3}%", 100.0 * percentile(&pv, f));
    }
    let _ = writeln!(o, "Median  Δp: {:6.3}%", 100.0 * median(&pv));
    for (label, f) in [
        ("25.0%", 0.25),
        ("10.0%", 0.1),
        (" 5.0%", 0.05),
        (" 1.0%", 0.01),
        (" 0.1%", 0.001),
    ] {
        let _ = writeln!(o, "{label}   Δp: {:6.3}%", 100.0 * percentile(&pv, f));
    }
    let _ = writeln!(o, "Minimum Δp: {:6.3}%", 100.0 * pv[0]);
    let (mse, mse_u) = mean_and_uncertainty(st.sum_p_diff2, st.sum_p_diff4, st.count);
    let _ = writeln!(
        o,
        "RMS Δp    : {:6.3} ± {:5.3} %",
        100.0 * mse.sqrt(),
        100.0 * 0.5 / mse.sqrt() * mse_u
    );
    let top = st.n_same_top as f64 / st.count as f64;
    let _ = writeln!(
        o,
        "Same top p: {:6.3} ± {:5.3} %",
        100.0 * top,
        100.0 * (top * (1.0 - top) / (st.count as f64 - 1.0)).sqrt()
    );
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_round_trips_and_compares_to_itself_with_zero_divergence() {
        let logits: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 113) as f32 / 9.0 - 4.0)
            .collect();
        let nv = 2 * logits.len().div_ceil(2) + 4;
        let mut row = vec![0u16; nv];
        let nll = encode_row(&logits, 5, &mut row);
        let mut st = Stats::default();
        compare_row(&logits, 5, &row, &mut st);
        assert!((st.sum_nll - nll).abs() < 1e-5);
        // The stored log-probabilities are within half a quantization step of the truth.
        assert!((st.sum_nll_base - nll).abs() < 16.0 / 65535.0);
        assert!(st.sum_kld.abs() < 1e-4, "{}", st.sum_kld);
        assert_eq!(st.n_same_top, 1);
        // Another distribution diverges.
        let other: Vec<f32> = logits.iter().rev().cloned().collect();
        let mut st2 = Stats::default();
        compare_row(&other, 5, &row, &mut st2);
        assert!(st2.sum_kld > 0.1);
    }

    #[test]
    fn a_bad_base_file_is_refused() {
        let mut r: &[u8] = b"_logitz_";
        assert!(read_base_header(&mut r).is_err());
        let mut bytes = b"_logits_".to_vec();
        for v in [512u32, 1000, u32::MAX] {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        assert!(read_base_header(&mut &bytes[..]).is_err());
    }
}
