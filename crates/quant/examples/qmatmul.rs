//! Throughput of the quantized products at the level in force (`HEARTH_ISA`), in GMAC/s:
//! `cargo run --release -p hearth-quant --example qmatmul [THREADS] [TYPES] [TOKENS]`,
//! e.g. `... qmatmul 1 Q4_0,Q4_K 512` (prompt tokens) or `... 1 Q4_0 1` (decoding).
use hearth_quant::{Activations, GgmlType, QMatrix};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).and_then(|t| t.parse().ok()).unwrap_or(1);
    let types = args
        .get(2)
        .map_or("Q4_0,Q4_1,Q5_0,Q8_0,Q4_K,Q6_K", |s| s.as_str());
    let n_tok: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(512);
    hearth_quant::pool::set_threads(threads);
    println!("level {}", hearth_quant::dispatch::kernels().isa.name());
    for name in types.split(',') {
        let ty = (0..64u32)
            .filter_map(GgmlType::from_id)
            .find(|t| t.name() == name)
            .unwrap_or_else(|| panic!("unknown type {name}"));
        for (cols, rows) in [(1024, 2816), (2816, 1024)] {
            let blocks = cols / ty.block_len() as usize * rows;
            // Bytes 0x20..0x5f: every f16 scale finite and normal.
            let bytes: Vec<u8> = (0..blocks * ty.block_bytes() as usize)
                .map(|i| (i * 7 % 64) as u8 + 0x20)
                .collect();
            let m = QMatrix::new("w", ty, cols, rows, &bytes).expect("matrix");
            let x: Vec<f32> = (0..n_tok * cols)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
                .collect();
            let mut acts = Activations::default();
            acts.quantize_split(m.act_type(), &x, cols, if n_tok > 1 { n_tok } else { 0 });
            let (mut y, mut scratch) = (vec![0f32; n_tok * rows], Vec::new());
            m.matmul(&acts, &mut y, &mut scratch);
            let reps = (200_000_000 / (n_tok * rows * cols)).max(3);
            let t = std::time::Instant::now();
            for _ in 0..reps {
                m.matmul(&acts, &mut y, &mut scratch);
            }
            let s = t.elapsed().as_secs_f64();
            let macs = (reps * n_tok * rows * cols) as f64;
            let gbs = (reps * bytes.len()) as f64 / s / 1e9;
            println!(
                "{name:6} {n_tok} × {cols} → {rows}: {:6.1} GMAC/s, weights {gbs:5.1} GB/s",
                macs / s / 1e9
            );
        }
    }
}
