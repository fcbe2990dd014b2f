//! The architectures without a small real model offline (qwen2, qwen3, Llama 3.x) checked
//! against llama.cpp on the synthetic models of `scripts/make-synthetic-models` (random
//! weights, the real Qwen2 tokenizer), with goldens from `scripts/make-family-goldens`:
//!
//! - tokenization under the `deepseek-r1-qwen` (qwen2) and `llama-bpe` (Llama 3)
//!   pre-tokenizers: id-exact on the tricky-string corpus;
//! - logits at every position of three texts, teacher-forced: mean KL divergence
//!   KLD(llama.cpp ‖ hearth) and top-1 agreement, judged as llama.cpp judges its own
//!   quants, against llama.cpp's own flash-attention on/off noise on the same positions:
//!   KLD ≤ max(2 × llama.cpp's own, 0.001), same top token ≥ llama.cpp's own − 2 points.
//!
//! The goldens keep llama.cpp's 40 largest logits and the log-sum-exp of all of them, so
//! their probabilities are exact; the rest of the vocabulary counts as one outcome (KLD over
//! a coarser partition, never more than the full one).

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use hearth_models::{Model, Scratch};
use serde_json::Value;

fn synthetic(name: &str) -> PathBuf {
    let dir = std::env::var_os("HEARTH_SYNTHETIC").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/hearth/synthetic"),
        PathBuf::from,
    );
    let p = dir.join(format!("{name}.gguf"));
    assert!(
        p.is_file(),
        "{} missing: run scripts/make-synthetic-models",
        p.display()
    );
    p
}

fn open(name: &str) -> Arc<hearth_gguf::Gguf> {
    Arc::new(hearth_gguf::Gguf::open(synthetic(name)).expect("model opens"))
}

#[test]
fn qwen2_and_llama3_pre_tokenizers_match_llama_cpp() {
    for (pre, model) in [("deepseek-r1-qwen", "qwen2"), ("llama-bpe", "llama3")] {
        let g = open(model);
        assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), Some(pre));
        let tok = hearth_tokenizer::Tokenizer::from_gguf(&g).unwrap();
        let lines = common::golden_lines(&format!("families/{pre}.tokenize.jsonl"));
        assert!(lines.len() > 200);
        for l in &lines {
            let text = l["text"].as_str().unwrap();
            let want: Vec<u32> = serde_json::from_value(l["ids"].clone()).unwrap();
            assert_eq!(tok.encode(text, true, true), want, "{pre}: {text:?}");
        }
    }
}

/// llama.cpp's distribution at one position: (id, probability) of its top logits.
fn top_probs(step: &Value) -> Vec<(u32, f64)> {
    let lse = step["lse"].as_f64().unwrap();
    step["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let id = p[0].as_u64().unwrap() as u32;
            (id, (p[1].as_f64().unwrap() - lse).exp())
        })
        .collect()
}

/// KLD(P ‖ Q) over P's top tokens plus the rest as one outcome; `q(id)` is Q's probability.
fn kld(p: &[(u32, f64)], q: impl Fn(u32) -> f64) -> f64 {
    let (mut sum, mut p_top, mut q_top) = (0.0, 0.0, 0.0);
    for &(id, pi) in p {
        let qi = q(id).max(1e-30);
        sum += pi * (pi / qi).ln();
        p_top += pi;
        q_top += qi;
    }
    let (p_rest, q_rest) = ((1.0 - p_top).max(0.0), (1.0 - q_top).max(1e-30));
    if p_rest > 1e-12 {
        sum += p_rest * (p_rest / q_rest).ln();
    }
    sum.max(0.0)
}

#[derive(Default)]
struct Score {
    kld: f64,
    same_top: usize,
    positions: usize,
}

impl Score {
    fn mean_kld(&self) -> f64 {
        self.kld / self.positions as f64
    }
    fn same_top_pct(&self) -> f64 {
        100.0 * self.same_top as f64 / self.positions as f64
    }
}

/// Every kernel level this CPU has, each in its own process (the level is chosen once per
/// process, by `HEARTH_ISA`).
#[test]
fn synthetic_models_match_llama_cpp_by_kl_divergence_at_every_level() {
    if std::env::var_os("HEARTH_FAMILIES_CHILD").is_some() {
        return kld_at_this_level();
    }
    use hearth_quant::dispatch::{detect, Isa};
    let levels: Vec<Isa> = [Isa::Scalar, Isa::Avx2, Isa::Avx512, Isa::Amx]
        .into_iter()
        .filter(|&l| l <= detect())
        .collect();
    for level in &levels {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "synthetic_models_match_llama_cpp_by_kl_divergence_at_every_level",
                "--nocapture",
            ])
            .env("HEARTH_FAMILIES_CHILD", "1")
            .env("HEARTH_ISA", level.name())
            .output()
            .unwrap();
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success(),
            "at level {}:\n{}",
            level.name(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let names: Vec<&str> = levels.iter().map(|l| l.name()).collect();
    eprintln!("kernel levels tested: {}", names.join(" "));
}

fn kld_at_this_level() {
    let mut failures = Vec::new();
    eprintln!(
        "kernel level {}",
        hearth_quant::dispatch::kernels().isa.name()
    );
    eprintln!("model   positions  KLD hearth  KLD llama.cpp fa on/off  same top hearth  same top llama.cpp");
    for name in ["qwen2", "qwen3", "llama3", "gemma2", "phi3"] {
        let model = Model::load(open(name)).expect("model loads");
        let (mut hearth, mut own) = (Score::default(), Score::default());
        for l in common::golden_lines(&format!("families/{name}.logits.jsonl")) {
            let ids: Vec<u32> = serde_json::from_value(l["ids"].clone()).unwrap();
            let (off, on) = (l["off"].as_array().unwrap(), l["on"].as_array().unwrap());
            let mut cache = model.new_cache(ids.len() + 1);
            let (mut scratch, mut logits) = (Scratch::default(), Vec::new());
            model
                .forward(&ids[..1], &mut cache, &mut scratch, &mut logits)
                .unwrap();
            for (step, (off, on)) in off.iter().zip(on).enumerate() {
                if step > 0 {
                    model
                        .decode(ids[step], &mut cache, &mut scratch, &mut logits)
                        .unwrap();
                }
                let p = top_probs(off);
                // hearth's full distribution.
                let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = max
                    + logits
                        .iter()
                        .map(|&x| (x as f64 - max).exp())
                        .sum::<f64>()
                        .ln();
                hearth.kld += kld(&p, |id| (logits[id as usize] as f64 - lse).exp());
                let argmax = hearth_engine::sampling::argmax(&logits);
                hearth.same_top += (argmax == p[0].0) as usize;
                hearth.positions += 1;
                // llama.cpp against itself: a token outside its other top list counts with
                // that list's smallest probability (an upper bound).
                let q = top_probs(on);
                let floor = q.last().unwrap().1;
                own.kld += kld(&p, |id| q.iter().find(|e| e.0 == id).map_or(floor, |e| e.1));
                own.same_top += (q[0].0 == p[0].0) as usize;
                own.positions += 1;
            }
        }
        eprintln!(
            "{name:7} {:9}  {:10.6}  {:23.6}  {:14.1}%  {:17.1}%",
            hearth.positions,
            hearth.mean_kld(),
            own.mean_kld(),
            hearth.same_top_pct(),
            own.same_top_pct()
        );
        let bound = (2.0 * own.mean_kld()).max(0.001);
        if hearth.mean_kld() > bound {
            failures.push(format!(
                "{name}: mean KLD {:.6} > {bound:.6}",
                hearth.mean_kld()
            ));
        }
        if hearth.same_top_pct() < own.same_top_pct() - 2.0 {
            failures.push(format!(
                "{name}: same top {:.1}% < llama.cpp's own {:.1}% - 2",
                hearth.same_top_pct(),
                own.same_top_pct()
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Qwen3's thinking switch reaches its template (`chat_template_kwargs` in the OpenAI API,
/// `think` in Ollama's): off adds the empty think block after the assistant's turn opens.
#[test]
fn qwen3_template_renders_the_thinking_switch() {
    use hearth_tokenizer::template::{Kwargs, Message};
    let loaded = hearth_engine::LoadedModel::from_gguf(open("qwen3")).unwrap();
    let msgs = [Message::new("user", "Hello")];
    let tok = &loaded.tokenizer;
    let text = |ids: &[u32]| -> String {
        ids.iter()
            .flat_map(|&i| tok.token_to_piece(i, true))
            .map(char::from)
            .collect::<String>()
    };
    let default = loaded.chat_tokens(&msgs).unwrap();
    let mut kw = Kwargs::new();
    kw.insert("enable_thinking".into(), serde_json::Value::Bool(false));
    let off = loaded.chat_tokens_with(&msgs, &kw).unwrap();
    assert!(!text(&default).contains("<think>"));
    assert!(
        text(&off).ends_with("assistant\n<think>\n\n</think>\n\n"),
        "{:?}",
        text(&off)
    );
    assert_eq!(&off[..default.len()], &default[..]);
}
