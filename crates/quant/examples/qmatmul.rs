//! Throughput of the quantized products at the level in force (`HEARTH_ISA`), in GMAC/s:
//! `cargo run --release -p hearth-quant --example qmatmul [THREADS] [TYPES] [TOKENS]`,
//! e.g. `... qmatmul 1 Q4_0,Q4_K 512` (prompt tokens) or `... 1 Q4_0 1` (decoding);
//! `[SHAPES] [COPIES]` (e.g. `576x1536,1536x576 64`: cols×rows, each matrix held in 64
//! copies visited in turn, so decoding reads them from memory as a model's layers are).
use hearth_quant::{Activations, GgmlType, QMatrix};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).and_then(|t| t.parse().ok()).unwrap_or(1);
    let types = args
        .get(2)
        .map_or("Q4_0,Q4_1,Q5_0,Q8_0,Q4_K,Q6_K", |s| s.as_str());
    let n_tok: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(512);
    let shapes: Vec<(usize, usize)> = args.get(4).map_or(vec![(1024, 2816), (2816, 1024)], |s| {
        s.split(',')
            .map(|cr| {
                let (c, r) = cr.split_once('x').expect("shape as COLSxROWS");
                (c.parse().expect("cols"), r.parse().expect("rows"))
            })
            .collect()
    });
    let copies: usize = args.get(5).and_then(|t| t.parse().ok()).unwrap_or(1).max(1);
    hearth_quant::pool::set_threads(threads);
    println!("level {}", hearth_quant::dispatch::kernels().isa.name());
    for name in types.split(',') {
        let ty = (0..64u32)
            .filter_map(GgmlType::from_id)
            .find(|t| t.name() == name)
            .unwrap_or_else(|| panic!("unknown type {name}"));
        for &(cols, rows) in &shapes {
            let blocks = cols / ty.block_len() as usize * rows;
            // Bytes 0x20..0x5f: every f16 scale finite and normal.
            let bytes: Vec<u8> = (0..blocks * ty.block_bytes() as usize)
                .map(|i| (i * 7 % 64) as u8 + 0x20)
                .collect();
            let all: Vec<Vec<u8>> = (0..copies).map(|_| bytes.clone()).collect();
            let file: Vec<QMatrix> = all
                .iter()
                .map(|b| QMatrix::new("w", ty, cols, rows, b).expect("matrix"))
                .collect();
            // As a model loads them: grouped where the level decodes the type so
            // (`HEARTH_FILE_LAYOUT=1` keeps the file's layout, to compare).
            let keep = std::env::var_os("HEARTH_FILE_LAYOUT").is_some();
            let grouped: Vec<_> = file
                .iter()
                .filter_map(|m| m.interleave().filter(|_| !keep))
                .collect();
            let ms: Vec<QMatrix> = if grouped.len() == copies {
                grouped
                    .iter()
                    .map(|g| QMatrix::from_interleaved("w", ty, cols, rows, g).expect("groups"))
                    .collect()
            } else {
                file
            };
            let m = &ms[0];
            let x: Vec<f32> = (0..n_tok * cols)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
                .collect();
            let mut acts = Activations::default();
            acts.quantize_split(m.act_type(), &x, cols, if n_tok > 1 { n_tok } else { 0 });
            let (mut y, mut scratch) = (vec![0f32; n_tok * rows], Vec::new());
            m.matmul(&acts, &mut y, &mut scratch);
            // At least half a second: small decoding products take microseconds each.
            let t = std::time::Instant::now();
            let mut reps = 0;
            while reps < 3 || t.elapsed().as_secs_f64() < 0.5 {
                ms[reps % copies].matmul(&acts, &mut y, &mut scratch);
                reps += 1;
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
