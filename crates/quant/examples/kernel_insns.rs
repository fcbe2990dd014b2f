//! One quantized product, `CALLS` times, at the level in force (`HEARTH_ISA`), on one
//! thread: run under an instruction counter with CALLS = 1 and 2, the difference is what one
//! product costs (bench/aarch64/count-instructions divides it by weight blocks × tokens).
//! `kernel_insns TYPE TOKENS CALLS`, e.g. `kernel_insns Q4_K 1 2` (decoding).
use hearth_quant::{Activations, GgmlType, QMatrix};

/// Weight rows and columns of the product.
pub const ROWS: usize = 64;
pub const COLS: usize = 4096;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map_or("Q4_0", |s| s.as_str());
    let n_tok: usize = args.get(2).and_then(|t| t.parse().ok()).unwrap_or(1);
    let calls: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(1);
    hearth_quant::pool::set_threads(1);
    let ty = (0..64u32)
        .filter_map(GgmlType::from_id)
        .find(|t| t.name() == name)
        .unwrap_or_else(|| panic!("unknown type {name}"));
    let blocks = COLS / ty.block_len() as usize * ROWS;
    // Bytes 0x20..0x5f: every f16 scale finite and normal.
    let bytes: Vec<u8> = (0..blocks * ty.block_bytes() as usize)
        .map(|i| (i * 7 % 64) as u8 + 0x20)
        .collect();
    let m = QMatrix::new("w", ty, COLS, ROWS, &bytes).expect("matrix");
    let x: Vec<f32> = (0..n_tok * COLS)
        .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
        .collect();
    let mut acts = Activations::default();
    // Several tokens are prompt tokens (the prefill kernels), one is a generated token.
    acts.quantize_split(m.act_type(), &x, COLS, if n_tok > 1 { n_tok } else { 0 });
    let (mut y, mut scratch) = (vec![0f32; n_tok * ROWS], Vec::new());
    for _ in 0..calls {
        m.matmul(&acts, &mut y, &mut scratch);
    }
    println!(
        "{} {} blocks/row {} checksum {}",
        hearth_quant::dispatch::kernels().isa.name(),
        name,
        COLS / ty.block_len() as usize,
        y.iter().sum::<f32>()
    );
}
