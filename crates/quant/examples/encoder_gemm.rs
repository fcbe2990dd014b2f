//! Throughput of the encoder's products at MiniLM's shapes (tokens × in → out), in GMAC/s:
//! every bf16 kernel the CPU runs (AMX tiles, AVX512-BF16 dot products) and the f32 panels
//! of the dispatch level (`HEARTH_ISA=avx2|avx512` to pick one):
//! `cargo run --release -p hearth-quant --example encoder_gemm [THREADS]`.
use hearth_quant::bf16mat::{Bf16Kernel, Bf16Matrix, Bf16Scratch};
use hearth_quant::f32mat::F32Panels;
use hearth_quant::i16mat::I16Panels;

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    hearth_quant::pool::set_threads(threads);
    println!("level {}", hearth_quant::dispatch::kernels().isa.name());
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
        let mut y = vec![0f32; n_tok * rows];
        let macs = (n_tok * rows * cols) as f64;
        for kernel in [Bf16Kernel::Amx, Bf16Kernel::DotProducts] {
            if let Some(m) = Bf16Matrix::pack_for(kernel, &w, rows, cols) {
                let mut scratch = Bf16Scratch::default();
                let g = gmacs(macs, || m.matmul(&x, n_tok, None, &mut y, &mut scratch));
                println!("{n_tok} × {cols} → {rows}: bf16 {kernel:?} {g:.0} GMAC/s");
            }
        }
        if let Some(m) = F32Panels::pack(&w, rows, cols) {
            let g = gmacs(macs, || m.matmul(&x, n_tok, None, &mut y));
            println!("{n_tok} × {cols} → {rows}: f32 panels {g:.0} GMAC/s");
        }
        if let Some(m) = I16Panels::pack(&w, rows, cols) {
            let g = gmacs(macs, || m.matmul(&x, n_tok, None, &mut y));
            println!("{n_tok} × {cols} → {rows}: i16 panels {g:.0} GMAC/s");
        }
    }
}

/// `macs` over the mean time of `product` (20 runs after one to warm up), in GMAC/s.
fn gmacs(macs: f64, mut product: impl FnMut()) -> f64 {
    product();
    let reps = 20;
    let t = std::time::Instant::now();
    for _ in 0..reps {
        product();
    }
    reps as f64 * macs / t.elapsed().as_secs_f64() / 1e9
}
