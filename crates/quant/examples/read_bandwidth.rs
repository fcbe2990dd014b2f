//! Memory read bandwidth: `THREADS` threads each sum their share of a 1 GiB buffer
//! (several passes, the best kept), printed as GB/s. Decoding reads every weight once per
//! token, so `GB/s ÷ bytes read per token` bounds its tokens/s (`bench/compare-llama-cpp`).
//! `cargo run --release -p hearth-quant --example read_bandwidth [THREADS]`.

fn main() {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|t| t.parse().ok())
        .unwrap_or(1);
    let words = (1usize << 30) / 8;
    // Distinct values, so no page is shared or compressible.
    let buf: Vec<u64> = (0..words as u64)
        .map(|i| i.wrapping_mul(0x9E37_79B9))
        .collect();
    let share = words / threads;
    let mut best = f64::MAX;
    let mut check = 0u64;
    for _ in 0..5 {
        let t = std::time::Instant::now();
        let sums: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(share)
                .map(|part| s.spawn(move || sum(part)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        best = best.min(t.elapsed().as_secs_f64());
        check = check.wrapping_add(sums.iter().fold(0, |a, &b| a.wrapping_add(b)));
    }
    let gbs = (words * 8) as f64 / best / 1e9;
    println!("{{\"threads\": {threads}, \"read_gb_s\": {gbs:.2}, \"check\": {check}}}");
}

/// Four streams read in lockstep (a core keeps more loads in flight over several streams
/// than over one, as the decode kernels' quarter tiles do), two independent lanes each, so
/// the adds never wait on each other.
fn sum(x: &[u64]) -> u64 {
    let quarter = x.len() / 4;
    let (a, rest) = x.split_at(quarter);
    let (b, rest) = rest.split_at(quarter);
    let (c, d) = rest.split_at(quarter);
    let mut acc = [0u64; 8];
    for (((a, b), c), d) in a
        .chunks_exact(2)
        .zip(b.chunks_exact(2))
        .zip(c.chunks_exact(2))
        .zip(d.chunks_exact(2))
    {
        for (i, v) in [a, b, c, d].iter().enumerate() {
            acc[2 * i] = acc[2 * i].wrapping_add(v[0]);
            acc[2 * i + 1] = acc[2 * i + 1].wrapping_add(v[1]);
        }
    }
    acc.iter().fold(0, |a, &b| a.wrapping_add(b))
}
