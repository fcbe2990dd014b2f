//! `hearth perplexity` against `llama-perplexity` (goldens in tests/golden/perplexity.json,
//! from scripts/make-perplexity-goldens, `-fa off`): the same PPL within 1% on the same file,
//! text and chunking, at every kernel level this CPU has; and its base-logits file read back
//! by itself gives no divergence.

mod common;

use common::hearth;

fn text() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/perplexity.txt").to_string()
}

/// "Final estimate: PPL = x +/- y" → x.
fn final_ppl(stdout: &str) -> f64 {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("Final estimate: PPL = "))
        .unwrap_or_else(|| panic!("no final estimate in {stdout}"));
    line["Final estimate: PPL = ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn ppl_equals_llama_perplexity_within_one_percent_at_every_level() {
    for level in hearth_quant::dispatch::available() {
        ppl_at_level(level.name());
    }
}

fn ppl_at_level(level: &str) {
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/golden/perplexity.json"
        ))
        .unwrap(),
    )
    .unwrap();
    for (name, g) in golden["models"].as_object().unwrap() {
        // The real models at the scalar level take minutes (tests/generate_golden.rs runs
        // SmolLM2 there); the synthetic models cover every family's scalar path.
        if level == "scalar" && g["file"].is_null() {
            eprintln!("{level} {name}: skipped (real model at the scalar level)");
            continue;
        }
        let model = match g["file"].as_str() {
            Some(f) if f.starts_with("synthetic/") => {
                let dir = std::env::var("HEARTH_SYNTHETIC").unwrap_or_else(|_| {
                    format!("{}/.cache/hearth/synthetic", std::env::var("HOME").unwrap())
                });
                format!("{dir}/{}", &f["synthetic/".len()..])
            }
            _ => name.clone(),
        };
        let c = g["ctx"].as_u64().unwrap().to_string();
        let out = common::hearth_at_level(
            &["perplexity", &model, "-f", &text(), "-c", &c],
            Some(level),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ppl = final_ppl(&stdout);
        let want = g["ppl"].as_f64().unwrap();
        eprintln!("{level} {name}: hearth PPL {ppl:.4}, llama-perplexity {want:.4}");
        assert!(
            (ppl / want - 1.0).abs() <= 0.01,
            "{level} {name}: PPL {ppl} vs llama-perplexity's {want}"
        );
        assert!(stdout.starts_with("[1]"), "running PPL per chunk: {stdout}");
    }
}

#[test]
fn a_base_file_read_back_by_the_same_model_shows_no_divergence() {
    let base = std::env::temp_dir().join(format!("hearth-ppl-{}.kld", std::process::id()));
    let base = base.to_str().unwrap();
    let out = hearth(&[
        "perplexity",
        "smollm2",
        "-f",
        &text(),
        "-c",
        "128",
        "--chunks",
        "2",
        "--save-all-logits",
        base,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ppl = final_ppl(&String::from_utf8_lossy(&out.stdout));
    let out = hearth(&[
        "perplexity",
        "smollm2",
        "--kl-divergence-base",
        base,
        "--kl-divergence",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let field = |label: &str| -> f64 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label:?} in {stdout}"));
        line.split(':')
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(field("Mean    KLD") < 1e-4, "{stdout}");
    assert_eq!(field("Same top p"), 100.0, "{stdout}");
    let ppl_q = field("Mean PPL(Q)");
    assert!((ppl_q / ppl - 1.0).abs() < 1e-3, "{ppl_q} vs {ppl}");
    let _ = std::fs::remove_file(base);
    // A file that is not a base-logits file is refused with a clear message.
    let out = hearth(&[
        "perplexity",
        "smollm2",
        "--kl-divergence-base",
        &text(),
        "--kl-divergence",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("_logits_"));
}
