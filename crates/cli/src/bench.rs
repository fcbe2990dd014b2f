//! `hearth bench`: prompt processing and generation speed with llama-bench's definitions, so
//! one script can read both tools' JSON.
//!
//! - `pp N`: N tokens appended to an empty cache as batches (logits of the last only);
//!   t/s = N / time.
//! - `tg N`: N single-token decode steps from an empty cache, each producing logits;
//!   t/s = N / time.
//!
//! Each test runs once to warm up, then `reps` times; t/s is the mean ± sample standard
//! deviation of the per-repetition rates (as llama-bench reports `avg_ts`/`stddev_ts`).

use crate::resolve::{physical_cores, resolve_model};
use crate::BenchArgs;
use anyhow::{bail, Context, Result};
use hearth_gguf::Gguf;
use hearth_models::{Model, Scratch};
use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

struct Record {
    threads: usize,
    n_prompt: usize,
    n_gen: usize,
    /// Tokens already in the cache when the test starts.
    n_depth: usize,
    samples_ns: Vec<u64>,
}

impl Record {
    fn tokens(&self) -> usize {
        self.n_prompt + self.n_gen
    }
    fn rates(&self) -> Vec<f64> {
        let n = self.tokens() as f64;
        self.samples_ns
            .iter()
            .map(|&ns| n * 1e9 / ns as f64)
            .collect()
    }
    fn test_name(&self) -> String {
        let test = if self.n_gen == 0 {
            format!("pp{}", self.n_prompt)
        } else {
            format!("tg{}", self.n_gen)
        };
        match self.n_depth {
            0 => test,
            d => format!("{test} @ d{d}"),
        }
    }
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Deterministic pseudo-random token ids (llama-bench also feeds random tokens).
fn tokens(n: usize, n_vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n_vocab as u64) as u32
        })
        .collect()
}

/// A cache of `depth + n` positions holding `depth` tokens (llama-bench's `-d`), untimed.
fn filled_cache(
    m: &Model,
    depth: usize,
    n: usize,
    s: &mut Scratch,
    logits: &mut Vec<f32>,
) -> Result<hearth_models::KvCache> {
    let mut cache = m.new_cache(depth + n);
    if depth > 0 {
        m.forward(&tokens(depth, m.config.n_vocab, 11), &mut cache, s, logits)?;
    }
    Ok(cache)
}

fn time_prompt(
    m: &Model,
    depth: usize,
    n: usize,
    s: &mut Scratch,
    logits: &mut Vec<f32>,
) -> Result<u64> {
    let toks = tokens(n, m.config.n_vocab, n as u64);
    let mut cache = filled_cache(m, depth, n, s, logits)?;
    let t = Instant::now();
    m.forward(&toks, &mut cache, s, logits)?;
    Ok(t.elapsed().as_nanos() as u64)
}

fn time_gen(
    m: &Model,
    depth: usize,
    n: usize,
    s: &mut Scratch,
    logits: &mut Vec<f32>,
) -> Result<u64> {
    let toks = tokens(n, m.config.n_vocab, 7);
    let mut cache = filled_cache(m, depth, n, s, logits)?;
    let t = Instant::now();
    for tok in toks {
        m.decode(tok, &mut cache, s, logits)?;
    }
    Ok(t.elapsed().as_nanos() as u64)
}

fn parse_list(s: &str, what: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|p| {
            p.trim()
                .parse::<usize>()
                .with_context(|| format!("{what}: {p:?} is not a number"))
        })
        .collect()
}

pub fn bench(a: BenchArgs) -> Result<()> {
    let prompts = parse_list(&a.n_prompt, "-p")?;
    let gens = parse_list(&a.n_gen, "-n")?;
    let depths = parse_list(&a.n_depth, "-d")?;
    let threads = match &a.threads {
        Some(t) => parse_list(t, "-t")?,
        None => vec![physical_cores()],
    };
    if a.reps == 0 || threads.contains(&0) {
        bail!("-r and -t must be at least 1");
    }
    let path = resolve_model(&a.model)?;
    let gguf = Arc::new(Gguf::open(&path).with_context(|| format!("loading {}", path.display()))?);
    let mut model = Model::load(gguf)?;
    model.set_kv_type(crate::resolve::kv_type(a.kv_type)?)?;
    let ctx_limit = model.config.n_ctx_train.max(1);
    if let Some(&too_long) = prompts.iter().chain(&gens).find(|&&n| n > ctx_limit) {
        bail!("{too_long} tokens exceed the model's context of {ctx_limit}");
    }
    let deepest = depths.iter().copied().max().unwrap_or(0);
    let longest = deepest + prompts.iter().chain(&gens).copied().max().unwrap_or(0);
    if longest > ctx_limit {
        bail!("{longest} tokens (depth and test) exceed the model's context of {ctx_limit}");
    }
    model.check_memory(longest, 1)?;
    let isa = hearth_quant::dispatch::kernels().isa.name();
    let size = std::fs::metadata(&path)?.len();
    let params: u64 = model.gguf.tensors.iter().map(|t| t.n_elements).sum();
    let model_type = format!(
        "{} {:.0}M {}",
        model.config.arch,
        params as f64 / 1e6,
        crate::commands::file_type_label(&model.gguf)
    );
    let file_name = path
        .file_name()
        .map_or(String::new(), |f| f.to_string_lossy().into_owned());

    let mut scratch = Scratch::default();
    let mut logits = Vec::new();
    let mut records = Vec::new();
    let mut out = std::io::stdout();
    if !a.json {
        writeln!(
            out,
            "| model | size | params | isa | threads | test | t/s |\n| --- | ---: | ---: | --- | ---: | ---: | ---: |"
        )?;
    }
    let tests = prompts
        .iter()
        .filter(|&&p| p > 0)
        .map(|&p| (p, 0))
        .chain(gens.iter().filter(|&&n| n > 0).map(|&n| (0, n)));
    let tests: Vec<(usize, usize, usize)> = tests
        .flat_map(|(p, n)| depths.iter().map(move |&d| (p, n, d)))
        .collect();
    for &t in &threads {
        hearth_quant::pool::set_threads(t);
        for &(n_prompt, n_gen, n_depth) in &tests {
            let run = |s: &mut Scratch, l: &mut Vec<f32>| {
                if n_gen == 0 {
                    time_prompt(&model, n_depth, n_prompt, s, l)
                } else {
                    time_gen(&model, n_depth, n_gen, s, l)
                }
            };
            run(&mut scratch, &mut logits)?; // warm-up
            let samples_ns = (0..a.reps)
                .map(|_| run(&mut scratch, &mut logits))
                .collect::<Result<Vec<_>>>()?;
            let r = Record {
                threads: t,
                n_prompt,
                n_gen,
                n_depth,
                samples_ns,
            };
            if !a.json {
                let (m, sd) = mean_std(&r.rates());
                writeln!(
                    out,
                    "| {model_type} | {:.2} MiB | {:.2} M | {isa} | {t} | {} | {m:.2} ± {sd:.2} |",
                    size as f64 / (1 << 20) as f64,
                    params as f64 / 1e6,
                    r.test_name()
                )?;
            }
            records.push(r);
        }
    }
    if a.json {
        let json: Vec<serde_json::Value> = records
            .iter()
            .map(|r| {
                let rates = r.rates();
                let (avg_ts, stddev_ts) = mean_std(&rates);
                let ns: Vec<f64> = r.samples_ns.iter().map(|&n| n as f64).collect();
                let (avg_ns, stddev_ns) = mean_std(&ns);
                let mut record = serde_json::json!({
                    "backends": "CPU",
                    "isa": isa,
                    "model_filename": file_name,
                    "model_type": model_type,
                    "model_size": size,
                    "model_n_params": params,
                    "n_batch": hearth_models::MAX_BATCH,
                    "n_ubatch": hearth_models::MAX_BATCH,
                    "n_threads": r.threads,
                    "n_prompt": r.n_prompt,
                    "n_gen": r.n_gen,
                    "n_depth": r.n_depth,
                    "type_k": model.kv_type().name(),
                    "type_v": model.kv_type().name(),
                    "avg_ns": avg_ns as u64,
                    "stddev_ns": stddev_ns as u64,
                    "avg_ts": avg_ts,
                    "stddev_ts": stddev_ts,
                    "samples_ns": r.samples_ns,
                    "samples_ts": rates,
                });
                // The commit this binary was built from; left out when unknown.
                if let Some(commit) = option_env!("HEARTH_BUILD_COMMIT") {
                    record["build_commit"] = commit.into();
                }
                record
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&json)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_sample_stddev() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((s - 1.0).abs() < 1e-12);
        assert_eq!(mean_std(&[5.0]).1, 0.0);
    }

    #[test]
    fn random_tokens_stay_in_vocabulary() {
        let t = tokens(1000, 17, 3);
        assert!(t.iter().all(|&x| x < 17));
        assert_eq!(t, tokens(1000, 17, 3));
    }
}
