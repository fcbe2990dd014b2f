//! `hearth perplexity`: llama-perplexity's measurements and output (see
//! `hearth_engine::perplexity` for the definitions and the base-logits file).

use std::io::{BufReader, BufWriter, Write};

use anyhow::{bail, Context, Result};
use hearth_engine::perplexity::{self, Base, Options};
use hearth_engine::LoadedModel;

use crate::PerplexityArgs;

pub fn perplexity(a: PerplexityArgs) -> Result<()> {
    let threads = a
        .threads
        .unwrap_or_else(crate::resolve::physical_cores)
        .max(1);
    hearth_quant::pool::set_threads(threads);
    if a.kl_divergence && a.logits_file.is_none() {
        bail!("--kl-divergence needs --kl-divergence-base FILE (the base model's logits)");
    }
    let path = crate::resolve::resolve_model(&a.model)?;
    let mut loaded =
        LoadedModel::open(&path).with_context(|| format!("loading {}", path.display()))?;
    loaded
        .model
        .set_kv_type(crate::resolve::kv_type(a.kv_type)?)?;
    let tok = &loaded.tokenizer;
    let bos = tok.bos.filter(|_| tok.add_bos);
    let opts = Options {
        n_ctx: a.ctx,
        chunks: a.chunks,
    };
    let model = &loaded.model;
    eprintln!(
        "hearth perplexity: {} ({} threads, kernels {})",
        path.display(),
        threads,
        hearth_quant::dispatch::kernels().isa.name()
    );

    if a.kl_divergence {
        let file = a.logits_file.as_ref().expect("checked above");
        let mut r = BufReader::new(
            std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?,
        );
        let (n_ctx, n_vocab, tokens) = perplexity::read_base_header(&mut r)?;
        if n_vocab != model.config.n_vocab {
            bail!(
                "{}: inconsistent vocabulary ({n_vocab} vs {})",
                file.display(),
                model.config.n_vocab
            );
        }
        let opts = Options { n_ctx, ..opts };
        println!(
            "chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p"
        );
        let stats = perplexity::run(
            model,
            bos,
            &tokens,
            &opts,
            Base::Compare(&mut r),
            |c, st| {
                println!("{}", perplexity::kld_chunk_line(c, st));
            },
        )?;
        println!();
        print!("{}", perplexity::kld_summary(&stats));
        return Ok(());
    }

    let Some(text_file) = &a.file else {
        bail!("give the text to evaluate with -f FILE");
    };
    let text = std::fs::read_to_string(text_file)
        .with_context(|| format!("reading {}", text_file.display()))?;
    let tokens = perplexity::tokenize(tok, &text);
    let mut out = match &a.logits_file {
        Some(f) => Some(BufWriter::new(
            std::fs::File::create(f).with_context(|| format!("creating {}", f.display()))?,
        )),
        None => None,
    };
    let base = match out.as_mut() {
        Some(w) => Base::Save(w),
        None => Base::None,
    };
    let stdout = std::io::stdout();
    let stats = perplexity::run(model, bos, &tokens, &opts, base, |c, st| {
        let mut o = stdout.lock();
        let _ = write!(o, "[{}]{:.4},", c + 1, st.ppl().0);
        let _ = o.flush();
    })?;
    if let Some(mut w) = out {
        w.flush().context("writing the logits file")?;
    }
    println!();
    match stats.final_estimate() {
        (ppl, Some(u)) => println!("Final estimate: PPL = {ppl:.4} +/- {u:.5}"),
        (ppl, None) => println!("Final estimate: PPL = {ppl:.4}"),
    }
    Ok(())
}
