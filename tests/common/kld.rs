//! Fidelity as llama.cpp judges its own quants: mean KL divergence KLD(llama.cpp ‖ hearth)
//! and top-1 agreement over logit goldens, against llama.cpp's own flash-attention on/off
//! noise on the same positions. Goldens hold llama.cpp's top logits and the log-sum-exp of
//! all of them, so their probabilities are exact; the rest of the vocabulary counts as one
//! outcome (KLD over a coarser partition, never more than the full one).

use serde_json::Value;

/// llama.cpp's distribution at one position: (id, probability) of its top logits.
pub fn top_probs(step: &Value) -> Vec<(u32, f64)> {
    let lse = step["lse"].as_f64().expect("golden step has lse");
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
pub fn kld(p: &[(u32, f64)], q: impl Fn(u32) -> f64) -> f64 {
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
pub struct Score {
    pub kld: f64,
    pub same_top: usize,
    pub positions: usize,
}

impl Score {
    pub fn mean_kld(&self) -> f64 {
        self.kld / self.positions as f64
    }
    pub fn same_top_pct(&self) -> f64 {
        100.0 * self.same_top as f64 / self.positions as f64
    }
}

/// hearth's and llama.cpp's own (fa on vs off) scores, accumulated position by position.
#[derive(Default)]
pub struct Fidelity {
    pub hearth: Score,
    pub own: Score,
}

impl Fidelity {
    /// One position: llama.cpp's reference step `off`, its flash-attention step `on`, and
    /// hearth's full logits.
    pub fn add(&mut self, off: &Value, on: &Value, logits: &[f32]) {
        let p = top_probs(off);
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + logits
                .iter()
                .map(|&x| (x as f64 - max).exp())
                .sum::<f64>()
                .ln();
        self.hearth.kld += kld(&p, |id| (logits[id as usize] as f64 - lse).exp());
        let argmax = hearth_engine::sampling::argmax(logits);
        self.hearth.same_top += (argmax == p[0].0) as usize;
        self.hearth.positions += 1;
        // llama.cpp against itself: a token outside its other top list counts with that
        // list's smallest probability (an upper bound).
        let q = top_probs(on);
        let floor = q.last().unwrap().1;
        self.own.kld += kld(&p, |id| q.iter().find(|e| e.0 == id).map_or(floor, |e| e.1));
        self.own.same_top += (q[0].0 == p[0].0) as usize;
        self.own.positions += 1;
    }

    /// Runs `tokens` as one prompt and adds the logits of its positions from `from` on,
    /// one per step of `off` / `on`.
    pub fn add_prompt(
        &mut self,
        model: &hearth_models::Model,
        tokens: &[u32],
        from: usize,
        off: &[Value],
        on: &[Value],
    ) {
        assert_eq!(off.len(), tokens.len() - from);
        let v = model.config.n_vocab;
        let mut cache = model.new_cache(tokens.len() + 1);
        let (mut scratch, mut logits) = (hearth_models::Scratch::default(), Vec::new());
        model
            .forward_all(tokens, &mut cache, &mut scratch, from, &mut logits)
            .unwrap();
        for (step, (off, on)) in off.iter().zip(on).enumerate() {
            self.add(off, on, &logits[step * v..(step + 1) * v]);
        }
    }

    /// The targets: mean KLD ≤ max(2 × llama.cpp's own, 0.001); same top token ≥ llama.cpp's
    /// own − 2 points. Prints one table row; returns the failures.
    pub fn judge(&self, name: &str) -> Vec<String> {
        let (h, o) = (&self.hearth, &self.own);
        eprintln!(
            "{name:8} {:9}  {:10.6}  {:23.6}  {:14.1}%  {:17.1}%",
            h.positions,
            h.mean_kld(),
            o.mean_kld(),
            h.same_top_pct(),
            o.same_top_pct()
        );
        let mut failures = Vec::new();
        let bound = (2.0 * o.mean_kld()).max(0.001);
        if h.mean_kld() > bound {
            failures.push(format!("{name}: mean KLD {:.6} > {bound:.6}", h.mean_kld()));
        }
        if h.same_top_pct() < o.same_top_pct() - 2.0 {
            failures.push(format!(
                "{name}: same top {:.1}% < llama.cpp's own {:.1}% - 2",
                h.same_top_pct(),
                o.same_top_pct()
            ));
        }
        failures
    }
}

/// hearth teacher-forced through golden texts (`{"ids", "off", "on"}` lines: llama.cpp's
/// steps after each of the ids but the last), one token per decode step as llama.cpp ran.
pub fn teacher_forced(model: &hearth_models::Model, lines: &[Value]) -> Fidelity {
    let mut fidelity = Fidelity::default();
    for l in lines {
        let ids: Vec<u32> = serde_json::from_value(l["ids"].clone()).unwrap();
        let (off, on) = (l["off"].as_array().unwrap(), l["on"].as_array().unwrap());
        assert_eq!(off.len(), ids.len() - 1);
        let mut cache = model.new_cache(ids.len() + 1);
        let (mut scratch, mut logits) = (hearth_models::Scratch::default(), Vec::new());
        model
            .forward(&ids[..1], &mut cache, &mut scratch, &mut logits)
            .unwrap();
        for (step, (off, on)) in off.iter().zip(on).enumerate() {
            if step > 0 {
                model
                    .decode(ids[step], &mut cache, &mut scratch, &mut logits)
                    .unwrap();
            }
            fidelity.add(off, on, &logits);
        }
    }
    fidelity
}

/// [`teacher_forced`] with each text run as one prompt (every position's logits from
/// [`hearth_models::Model::forward_all`]), so the products take the prompt kernels (the
/// AMX tiles, the panels) rather than the decoding ones.
pub fn prompt_forced(model: &hearth_models::Model, lines: &[Value]) -> Fidelity {
    let mut fidelity = Fidelity::default();
    for l in lines {
        let ids: Vec<u32> = serde_json::from_value(l["ids"].clone()).unwrap();
        let (off, on) = (l["off"].as_array().unwrap(), l["on"].as_array().unwrap());
        fidelity.add_prompt(model, &ids[..ids.len() - 1], 0, off, on);
    }
    fidelity
}

pub const TABLE_HEADER: &str =
    "model    positions  KLD hearth  KLD llama.cpp fa on/off  same top hearth  same top llama.cpp";

/// Runs the calling test once per kernel level this CPU has, each in its own process (the
/// level is chosen once per process, by `HEARTH_ISA`). Returns true in the child, which
/// then does the work; the parent checks every child and prints the levels covered.
pub fn in_child_per_level(test_name: &str) -> bool {
    in_child_at_levels(test_name, true)
}

/// [`in_child_per_level`] over the SIMD levels only (for tests whose scalar run would
/// repeat another test's).
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn in_child_per_simd_level(test_name: &str) -> bool {
    in_child_at_levels(test_name, false)
}

fn in_child_at_levels(test_name: &str, with_scalar: bool) -> bool {
    if std::env::var_os("HEARTH_LEVEL_CHILD").is_some() {
        eprintln!(
            "kernel level {}",
            hearth_quant::dispatch::kernels().isa.name()
        );
        return true;
    }
    // Under emulation (.ci's aarch64 stage) `HEARTH_TEST_LEVELS=neon,dotprod,i8mm` leaves out
    // the scalar level, which is the same Rust code the native run already tested.
    let only = std::env::var("HEARTH_TEST_LEVELS").ok();
    let levels: Vec<_> = hearth_quant::dispatch::available()
        .into_iter()
        .filter(|l| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n == l.name()))
        })
        .filter(|&l| with_scalar || l != hearth_quant::dispatch::Isa::Scalar)
        .collect();
    if levels.is_empty() && !with_scalar {
        eprintln!("{test_name}: this CPU has no SIMD level to test");
        return false;
    }
    assert!(!levels.is_empty(), "no kernel level left to test");
    for level in &levels {
        // Under emulation the child needs the emulator in front (qemu-user cannot start a
        // foreign binary itself): `HEARTH_CHILD_RUNNER="qemu-aarch64 -L … -cpu max"`.
        let runner = std::env::var("HEARTH_CHILD_RUNNER").unwrap_or_default();
        let mut words = runner.split_whitespace().map(String::from);
        let exe = std::env::current_exe()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut cmd = std::process::Command::new(words.next().unwrap_or_else(|| exe.clone()));
        if !runner.trim().is_empty() {
            cmd.args(words).arg(&exe);
        }
        let out = cmd
            .args(["--exact", test_name, "--nocapture", "--test-threads", "1"])
            .env("HEARTH_LEVEL_CHILD", "1")
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
    let line = format!("{test_name} {}", names.join(" "));
    eprintln!("kernel levels tested: {line}");
    // Recorded for .ci/run, which fails a run that tested fewer levels than the CPU has.
    if let Some(path) = std::env::var_os("HEARTH_LEVELS_LOG") {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("HEARTH_LEVELS_LOG is writable");
        writeln!(f, "{line}").expect("HEARTH_LEVELS_LOG is writable");
    }
    false
}

/// Whether the slow real model `name` runs at the current kernel level: at the scalar level
/// only SmolLM2 does (Gemma3 at scalar costs minutes of CI per suite; the scalar reference
/// of every block type it holds is checked by tests/quant_types.rs and the gguf-py goldens,
/// and every SIMD level runs both real models).
pub fn real_model_at_this_level(name: &str) -> bool {
    let scalar = hearth_quant::dispatch::kernels().isa.name() == "scalar";
    let run = !scalar || name == "smollm2";
    if !run {
        eprintln!("{name}: skipped at the scalar level (tests/common/kld.rs)");
    }
    run
}
