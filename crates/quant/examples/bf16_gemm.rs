//! Throughput of the AMX bf16 products at MiniLM's shapes (tokens × in → out), in GMAC/s:
//! `cargo run --release -p hearth-quant --example bf16_gemm [THREADS]`.
use hearth_quant::bf16mat::{Bf16Matrix, Bf16Scratch};

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    hearth_quant::pool::set_threads(threads);
    for (n_tok, cols, rows) in [
        (4096, 384, 1152),
        (4096, 384, 384),
        (4096, 384, 1536),
        (4096, 1536, 384),
    ] {
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01)
            .collect();
        let x: Vec<f32> = (0..n_tok * cols)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
            .collect();
        let Some(m) = Bf16Matrix::pack(&w, rows, cols) else {
            eprintln!("no AMX tiles on this CPU");
            return;
        };
        let mut y = vec![0f32; n_tok * rows];
        let mut scratch = Bf16Scratch::default();
        m.matmul(&x, n_tok, None, &mut y, &mut scratch);
        let reps = 20;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            m.matmul(&x, n_tok, None, &mut y, &mut scratch);
        }
        let s = t.elapsed().as_secs_f64();
        let macs = (reps * n_tok * rows * cols) as f64;
        println!("{n_tok} × {cols} → {rows}: {:.0} GMAC/s", macs / s / 1e9);
    }
}
