//! Prints hearth's logits along a token sequence in the format of scripts/peer/logits.c, so
//! the two can be diffed: `logits MODEL N_PROMPT TOPK < ids`.
use std::io::Read;

use hearth_engine::Session;
use hearth_models::Model;
use hearth_tokenizer::Tokenizer;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(args.len() == 4, "usage: logits MODEL N_PROMPT TOPK < ids");
    let n_prompt: usize = args[2].parse()?;
    let topk: usize = args[3].parse()?;
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let ids: Vec<u32> = input
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let gguf = std::sync::Arc::new(hearth_gguf::Gguf::open(&args[1])?);
    let tok = Tokenizer::from_gguf(&gguf)?;
    let model = Model::load(gguf)?;
    let mut s = Session::new(&model, &tok, 512);
    s.prefill(&ids[..n_prompt])?;
    for pos in n_prompt - 1..ids.len() {
        if pos >= n_prompt {
            s.step(ids[pos])?;
        }
        let logits = s.logits();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        print!("{pos}");
        for &i in &order[..topk] {
            print!(" {i}:{:.6}", logits[i]);
        }
        println!();
    }
    Ok(())
}
