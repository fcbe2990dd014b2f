//! Scalar reference kernels: the definition every SIMD kernel is tested against.
//! Integer arithmetic and rounding follow ggml exactly (activations are quantized the way
//! ggml's x86 build does it), so results match llama.cpp up to float summation order.

use crate::blocks::*;
use half::{bf16, f16};

// ---------------------------------------------------------------- activation quantization

/// Largest |x| of a slice.
fn amax(xs: &[f32]) -> f32 {
    xs.iter().fold(0.0f32, |m, &x| m.max(x.abs()))
}

pub fn quantize_row_q8_0(x: &[f32], y: &mut [BlockQ8_0]) {
    assert_eq!(x.len(), y.len() * QK);
    for (xs, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let amax = amax(xs);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        b.d = f16::from_f32(d);
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round_ties_even() as i8;
        }
    }
}

/// Q4_0 as llama.cpp's `quantize_row_q4_0_ref` makes it (the KV cache's `q4_0` type):
/// `d = max / -8` where `max` is the value of largest magnitude, `q = min(15, x/d + 8.5)`.
pub fn quantize_row_q4_0(x: &[f32], y: &mut [BlockQ4_0]) {
    for (xs, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let (mut amax, mut max) = (0.0f32, 0.0f32);
        for &v in xs {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        b.d = f16::from_f32(d);
        for j in 0..QK / 2 {
            let lo = ((xs[j] * id + 8.5) as i8).min(15) as u8;
            let hi = ((xs[j + QK / 2] * id + 8.5) as i8).min(15) as u8;
            b.qs[j] = lo | (hi << 4);
        }
    }
}

pub fn quantize_row_q8_1(x: &[f32], y: &mut [BlockQ8_1]) {
    assert_eq!(x.len(), y.len() * QK);
    for (xs, b) in x.chunks_exact(QK).zip(y.iter_mut()) {
        let amax = amax(xs);
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        b.d = f16::from_f32(d);
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round_ties_even() as i8;
            sum += *q as i32;
        }
        b.s = f16::from_f32(d * sum as f32);
    }
}

/// The value of largest magnitude and that magnitude (the first such value on ties; NaN
/// never wins): Q8_K's scale comes from its sign.
pub(crate) fn largest_magnitude(xs: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in xs {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

pub fn quantize_row_q8_k(x: &[f32], y: &mut [BlockQ8K]) {
    assert_eq!(x.len(), y.len() * QK_K);
    for (xs, b) in x.chunks_exact(QK_K).zip(y.iter_mut()) {
        let (max, amax) = largest_magnitude(xs);
        if amax == 0.0 {
            b.d = 0.0;
            b.qs = [0; QK_K];
            b.bsums = [0; QK_K / 16];
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = ((iscale * v).round_ties_even() as i32).min(127) as i8;
        }
        for (j, s) in b.bsums.iter_mut().enumerate() {
            *s = b.qs[j * 16..j * 16 + 16].iter().map(|&q| q as i16).sum();
        }
        b.d = 1.0 / iscale;
    }
}

pub fn quantize_row_f16(x: &[f32], y: &mut [f16]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = f16::from_f32(v);
    }
}

pub fn quantize_row_bf16(x: &[f32], y: &mut [bf16]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = bf16::from_f32(v);
    }
}

// ---------------------------------------------------------------- dequantization

pub fn dequantize_row_q4_0(x: &[BlockQ4_0], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for j in 0..QK / 2 {
            ys[j] = ((b.qs[j] & 0xF) as i32 - 8) as f32 * d;
            ys[j + QK / 2] = ((b.qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

pub fn dequantize_row_q4_1(x: &[BlockQ4_1], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        for j in 0..QK / 2 {
            ys[j] = (b.qs[j] & 0xF) as f32 * d + m;
            ys[j + QK / 2] = (b.qs[j] >> 4) as f32 * d + m;
        }
    }
}

/// The 5-bit values of a Q5 block, low nibbles then high nibbles (0..32).
pub(crate) fn q5_values(qs: &[u8; 16], qh: [u8; 4]) -> [u8; 32] {
    let qh = u32::from_le_bytes(qh);
    let mut v = [0u8; 32];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        v[j] = (qs[j] & 0xF) | h0;
        v[j + 16] = (qs[j] >> 4) | h1;
    }
    v
}

pub fn dequantize_row_q5_0(x: &[BlockQ5_0], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (o, q) in ys.iter_mut().zip(q5_values(&b.qs, b.qh)) {
            *o = (q as i32 - 16) as f32 * d;
        }
    }
}

pub fn dequantize_row_q5_1(x: &[BlockQ5_1], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let (d, m) = (b.d.to_f32(), b.m.to_f32());
        for (o, q) in ys.iter_mut().zip(q5_values(&b.qs, b.qh)) {
            *o = q as f32 * d + m;
        }
    }
}

pub fn dequantize_row_q8_0(x: &[BlockQ8_0], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (o, &q) in ys.iter_mut().zip(&b.qs) {
            *o = q as f32 * d;
        }
    }
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K/Q5_K block: 6 bits each, packed in 12 bytes.
#[inline]
pub fn scale_min_k4(j: usize, q: &[u8; K_SCALE_SIZE]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

pub fn dequantize_row_q4_k(x: &[BlockQ4K], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
        for (chunk, (q, out)) in
            b.qs.chunks_exact(32)
                .zip(ys.chunks_exact_mut(64))
                .enumerate()
        {
            let (sc1, m1) = scale_min_k4(2 * chunk, &b.scales);
            let (sc2, m2) = scale_min_k4(2 * chunk + 1, &b.scales);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            for l in 0..32 {
                out[l] = d1 * (q[l] & 0xF) as f32 - m1;
                out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
            }
        }
    }
}

pub fn dequantize_row_q5_k(x: &[BlockQ5K], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
        for (chunk, (q, out)) in
            b.qs.chunks_exact(32)
                .zip(ys.chunks_exact_mut(64))
                .enumerate()
        {
            let (sc1, m1) = scale_min_k4(2 * chunk, &b.scales);
            let (sc2, m2) = scale_min_k4(2 * chunk + 1, &b.scales);
            let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
            let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
            for l in 0..32 {
                let h1 = if b.qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if b.qh[l] & u2 != 0 { 16 } else { 0 };
                out[l] = d1 * ((q[l] & 0xF) + h1) as f32 - m1;
                out[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - m2;
            }
        }
    }
}

/// The signed 6-bit values (-32..32) of a Q6_K block in element order.
pub(crate) fn q6k_values(b: &BlockQ6K) -> [i8; QK_K] {
    let mut a = [0i8; QK_K];
    for half in 0..2 {
        let (ql, qh) = (&b.ql[64 * half..], &b.qh[32 * half..]);
        let a = &mut a[128 * half..];
        for l in 0..32 {
            a[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
            a[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            a[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            a[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    a
}

pub fn dequantize_row_q6_k(x: &[BlockQ6K], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        let a = q6k_values(b);
        for (i, o) in ys.iter_mut().enumerate() {
            *o = d * b.scales[i / 16] as f32 * a[i] as f32;
        }
    }
}

/// The 2-bit values (0..=3) of a Q2_K block in element order: each 128-value half takes
/// 32 bytes of `qs`, whose 4 bit pairs hold 4 runs of 32 values.
pub(crate) fn q2k_values(b: &BlockQ2K) -> [u8; QK_K] {
    let mut a = [0u8; QK_K];
    for half in 0..2 {
        let q = &b.qs[32 * half..][..32];
        for j in 0..4 {
            for l in 0..32 {
                a[128 * half + 32 * j + l] = (q[l] >> (2 * j)) & 3;
            }
        }
    }
    a
}

pub fn dequantize_row_q2_k(x: &[BlockQ2K], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let (d, dmin) = (b.d.to_f32(), b.dmin.to_f32());
        let a = q2k_values(b);
        for (sub, (out, q)) in ys.chunks_exact_mut(16).zip(a.chunks_exact(16)).enumerate() {
            let sc = b.scales[sub];
            let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
            for (o, &q) in out.iter_mut().zip(q) {
                *o = dl * q as f32 - ml;
            }
        }
    }
}

/// The signed 3-bit values (-4..=3) of a Q3_K block in element order: the low 2 bits as in
/// Q2_K, minus 4 where the value's `hmask` bit is clear.
pub(crate) fn q3k_values(b: &BlockQ3K) -> [i8; QK_K] {
    let mut a = [0i8; QK_K];
    for half in 0..2 {
        let q = &b.qs[32 * half..][..32];
        for j in 0..4 {
            let m = 1u8 << (4 * half + j);
            for l in 0..32 {
                let low = ((q[l] >> (2 * j)) & 3) as i8;
                a[128 * half + 32 * j + l] = low - if b.hmask[l] & m != 0 { 0 } else { 4 };
            }
        }
    }
    a
}

/// Q3_K's 16 sub-block scales (6 bits, stored +32), unpacked from its 12 bytes.
pub(crate) fn q3k_scales(b: &BlockQ3K) -> [i8; 16] {
    q3k_unpack_scales(&b.scales)
}

/// Q3_K's twelve bytes of packed six-bit scales as sixteen signed scales.
pub(crate) fn q3k_unpack_scales(s: &[u8; K_SCALE_SIZE]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = (low | (high << 4)) as i8 - 32;
    }
    out
}

pub fn dequantize_row_q3_k(x: &[BlockQ3K], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        let (a, scales) = (q3k_values(b), q3k_scales(b));
        for (sub, (out, q)) in ys.chunks_exact_mut(16).zip(a.chunks_exact(16)).enumerate() {
            let dl = d * scales[sub] as f32;
            for (o, &q) in out.iter_mut().zip(q) {
                *o = dl * q as f32;
            }
        }
    }
}

pub fn dequantize_row_iq4_nl(x: &[BlockIQ4NL], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK)) {
        let d = b.d.to_f32();
        for (l, &q) in b.qs.iter().enumerate() {
            ys[l] = d * KVALUES_IQ4NL[(q & 0xF) as usize] as f32;
            ys[l + 16] = d * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
        }
    }
}

/// IQ4_XS's 8 sub-block scales (6 bits, stored +32).
pub(crate) fn iq4xs_scales(b: &BlockIQ4XS) -> [i8; 8] {
    let mut out = [0i8; 8];
    for (ib, o) in out.iter_mut().enumerate() {
        let low = (b.scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF;
        let high = ((b.scales_h >> (2 * ib)) & 3) as u8;
        *o = (low | (high << 4)) as i8 - 32;
    }
    out
}

pub fn dequantize_row_iq4_xs(x: &[BlockIQ4XS], y: &mut [f32]) {
    for (b, ys) in x.iter().zip(y.chunks_exact_mut(QK_K)) {
        let d = b.d.to_f32();
        let scales = iq4xs_scales(b);
        for (ib, (out, qs)) in ys
            .chunks_exact_mut(32)
            .zip(b.qs.chunks_exact(16))
            .enumerate()
        {
            let dl = d * scales[ib] as f32;
            for (l, &q) in qs.iter().enumerate() {
                out[l] = dl * KVALUES_IQ4NL[(q & 0xF) as usize] as f32;
                out[l + 16] = dl * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
            }
        }
    }
}

pub fn dequantize_row_f16(x: &[f16], y: &mut [f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o = v.to_f32();
    }
}

pub fn dequantize_row_bf16(x: &[bf16], y: &mut [f32]) {
    for (o, v) in y.iter_mut().zip(x) {
        *o = v.to_f32();
    }
}

// ---------------------------------------------------------------- dot products

pub fn vec_dot_q4_0_q8_0(x: &[BlockQ4_0], y: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            sumi += ((a.qs[j] & 0xF) as i32 - 8) * b.qs[j] as i32;
            sumi += ((a.qs[j] >> 4) as i32 - 8) * b.qs[j + QK / 2] as i32;
        }
        sumf += a.d.to_f32() * b.d.to_f32() * sumi as f32;
    }
    sumf
}

pub fn vec_dot_q4_1_q8_1(x: &[BlockQ4_1], y: &[BlockQ8_1]) -> f32 {
    let mut sumf = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            sumi += (a.qs[j] & 0xF) as i32 * b.qs[j] as i32;
            sumi += (a.qs[j] >> 4) as i32 * b.qs[j + QK / 2] as i32;
        }
        sumf += a.d.to_f32() * b.d.to_f32() * sumi as f32 + a.m.to_f32() * b.s.to_f32();
    }
    sumf
}

pub fn vec_dot_q5_0_q8_0(x: &[BlockQ5_0], y: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let v = q5_values(&a.qs, a.qh);
        let sumi: i32 = v
            .iter()
            .zip(&b.qs)
            .map(|(&q, &p)| (q as i32 - 16) * p as i32)
            .sum();
        sumf += a.d.to_f32() * b.d.to_f32() * sumi as f32;
    }
    sumf
}

pub fn vec_dot_q5_1_q8_1(x: &[BlockQ5_1], y: &[BlockQ8_1]) -> f32 {
    let mut sumf = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let v = q5_values(&a.qs, a.qh);
        let sumi: i32 = v
            .iter()
            .zip(&b.qs)
            .map(|(&q, &p)| q as i32 * p as i32)
            .sum();
        sumf += a.d.to_f32() * b.d.to_f32() * sumi as f32 + a.m.to_f32() * b.s.to_f32();
    }
    sumf
}

pub fn vec_dot_q8_0_q8_0(x: &[BlockQ8_0], y: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let sumi: i32 =
            a.qs.iter()
                .zip(&b.qs)
                .map(|(&p, &q)| p as i32 * q as i32)
                .sum();
        sumf += a.d.to_f32() * b.d.to_f32() * sumi as f32;
    }
    sumf
}

pub fn vec_dot_q4_k_q8_k(x: &[BlockQ4K], y: &[BlockQ8K]) -> f32 {
    let mut sumf = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let mut sumi = 0i32; // weights' scaled quants times activations
        let mut summ = 0i32; // mins times activation sums
        for chunk in 0..4 {
            let q = &a.qs[32 * chunk..32 * chunk + 32];
            for sub in 0..2 {
                let (sc, m) = scale_min_k4(2 * chunk + sub, &a.scales);
                let acts = &b.qs[64 * chunk + 32 * sub..][..32];
                let dot: i32 = q
                    .iter()
                    .zip(acts)
                    .map(|(&w, &p)| (if sub == 0 { w & 0xF } else { w >> 4 }) as i32 * p as i32)
                    .sum();
                sumi += sc as i32 * dot;
                let bs = (2 * chunk + sub) * 2;
                summ += m as i32 * (b.bsums[bs] as i32 + b.bsums[bs + 1] as i32);
            }
        }
        sumf += a.d.to_f32() * b.d * sumi as f32 - a.dmin.to_f32() * b.d * summ as f32;
    }
    sumf
}

pub fn vec_dot_q5_k_q8_k(x: &[BlockQ5K], y: &[BlockQ8K]) -> f32 {
    let mut sumf = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let mut sumi = 0i32;
        let mut summ = 0i32;
        for chunk in 0..4 {
            let q = &a.qs[32 * chunk..32 * chunk + 32];
            for sub in 0..2 {
                let (sc, m) = scale_min_k4(2 * chunk + sub, &a.scales);
                let hbit = 1u8 << (2 * chunk + sub);
                let acts = &b.qs[64 * chunk + 32 * sub..][..32];
                let mut dot = 0i32;
                for l in 0..32 {
                    let lo = if sub == 0 { q[l] & 0xF } else { q[l] >> 4 };
                    let w = lo + if a.qh[l] & hbit != 0 { 16 } else { 0 };
                    dot += w as i32 * acts[l] as i32;
                }
                sumi += sc as i32 * dot;
                let bs = (2 * chunk + sub) * 2;
                summ += m as i32 * (b.bsums[bs] as i32 + b.bsums[bs + 1] as i32);
            }
        }
        sumf += a.d.to_f32() * b.d * sumi as f32 - a.dmin.to_f32() * b.d * summ as f32;
    }
    sumf
}

pub fn vec_dot_q6_k_q8_k(x: &[BlockQ6K], y: &[BlockQ8K]) -> f32 {
    let mut sumf = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let v = q6k_values(a);
        let mut sumi = 0i32;
        for (sub, (w, p)) in v.chunks_exact(16).zip(b.qs.chunks_exact(16)).enumerate() {
            let dot: i32 = w.iter().zip(p).map(|(&w, &p)| w as i32 * p as i32).sum();
            sumi += a.scales[sub] as i32 * dot;
        }
        sumf += a.d.to_f32() * b.d * sumi as f32;
    }
    sumf
}

pub fn vec_dot_q2_k_q8_k(x: &[BlockQ2K], y: &[BlockQ8K]) -> f32 {
    let mut sumf = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let v = q2k_values(a);
        let (mut sumi, mut summ) = (0i32, 0i32);
        for (sub, (w, p)) in v.chunks_exact(16).zip(b.qs.chunks_exact(16)).enumerate() {
            let dot: i32 = w.iter().zip(p).map(|(&w, &p)| w as i32 * p as i32).sum();
            sumi += (a.scales[sub] & 0xF) as i32 * dot;
            summ += (a.scales[sub] >> 4) as i32 * b.bsums[sub] as i32;
        }
        sumf += a.d.to_f32() * b.d * sumi as f32 - a.dmin.to_f32() * b.d * summ as f32;
    }
    sumf
}

pub fn vec_dot_q3_k_q8_k(x: &[BlockQ3K], y: &[BlockQ8K]) -> f32 {
    let mut sumf = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let (v, scales) = (q3k_values(a), q3k_scales(a));
        let mut sumi = 0i32;
        for (sub, (w, p)) in v.chunks_exact(16).zip(b.qs.chunks_exact(16)).enumerate() {
            let dot: i32 = w.iter().zip(p).map(|(&w, &p)| w as i32 * p as i32).sum();
            sumi += scales[sub] as i32 * dot;
        }
        sumf += a.d.to_f32() * b.d * sumi as f32;
    }
    sumf
}

/// `Σ kv[w] · p` over the 32 values of an IQ4_NL-coded run (16 bytes of nibbles).
#[inline]
fn iq4_dot32(qs: &[u8], p: &[i8]) -> i32 {
    let mut sum = 0i32;
    for (l, &q) in qs[..16].iter().enumerate() {
        sum += KVALUES_IQ4NL[(q & 0xF) as usize] as i32 * p[l] as i32;
        sum += KVALUES_IQ4NL[(q >> 4) as usize] as i32 * p[l + 16] as i32;
    }
    sum
}

pub fn vec_dot_iq4_nl_q8_0(x: &[BlockIQ4NL], y: &[BlockQ8_0]) -> f32 {
    let mut sumf = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        sumf += a.d.to_f32() * b.d.to_f32() * iq4_dot32(&a.qs, &b.qs) as f32;
    }
    sumf
}

pub fn vec_dot_iq4_xs_q8_k(x: &[BlockIQ4XS], y: &[BlockQ8K]) -> f32 {
    let mut sumf = 0.0f32;
    for (a, b) in x.iter().zip(y) {
        let scales = iq4xs_scales(a);
        let mut sumi = 0i32;
        for (ib, &sc) in scales.iter().enumerate() {
            sumi += sc as i32 * iq4_dot32(&a.qs[16 * ib..], &b.qs[32 * ib..]);
        }
        sumf += a.d.to_f32() * b.d * sumi as f32;
    }
    sumf
}

pub fn vec_dot_f16(x: &[f16], y: &[f16]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.len() / 8 * 8;
    for (xs, ys) in x[..chunks].chunks_exact(8).zip(y[..chunks].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += xs[l].to_f32() * ys[l].to_f32();
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (a, b) in x[chunks..].iter().zip(&y[chunks..]) {
        sum += a.to_f32() * b.to_f32();
    }
    sum
}

pub fn vec_dot_bf16(x: &[bf16], y: &[bf16]) -> f32 {
    x.iter().zip(y).map(|(a, b)| a.to_f32() * b.to_f32()).sum()
}

/// The reference of `dispatch::FloatTiles::tile` for blocks of `tokens` tokens: `out[r *
/// stride + t] = Σ_k w[r][k] · xt[k * tokens + t]` (k in order) for the rows of `w` (`cols`
/// each) and the first `valid` tokens.
pub fn float_tile(
    w: &[f32],
    xt: &[f32],
    cols: usize,
    tokens: usize,
    out: &mut [f32],
    stride: usize,
    valid: usize,
) {
    for (r, row) in w.chunks_exact(cols).enumerate() {
        for t in 0..valid {
            out[r * stride + t] = row
                .iter()
                .enumerate()
                .fold(0.0, |s, (k, &wk)| wk.mul_add(xt[k * tokens + t], s));
        }
    }
}

/// The reference of `dispatch::FloatDots::tile`: `out[r * stride + t] = w[r] · a[t]`
/// (summed as [`vec_dot_f16`] does) for the rows of `w` and of `a`, `cols` each.
pub fn float_dots(w: &[f16], a: &[f16], cols: usize, out: &mut [f32], stride: usize) {
    for (r, row) in w.chunks_exact(cols).enumerate() {
        for (t, tok) in a.chunks_exact(cols).enumerate() {
            out[r * stride + t] = vec_dot_f16(row, tok);
        }
    }
}

/// A 4 × 3 tile of an F32 product: `out[r * 3 + t] = w[r] · a[t]` for the 4 rows of `w` and
/// the 3 rows of `a` (each `cols` long), summed as [`vec_dot_f32`] does.
pub fn tile_f32_4x3(w: &[f32], a: &[f32], cols: usize, out: &mut [f32; 12]) {
    for r in 0..4 {
        for t in 0..3 {
            out[r * 3 + t] =
                vec_dot_f32(&w[r * cols..(r + 1) * cols], &a[t * cols..(t + 1) * cols]);
        }
    }
}

pub fn vec_dot_f32(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.len() / 8 * 8;
    for (xs, ys) in x[..chunks].chunks_exact(8).zip(y[..chunks].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += xs[l] * ys[l];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (a, b) in x[chunks..].iter().zip(&y[chunks..]) {
        sum += a * b;
    }
    sum
}

/// `out[r * n_tok + t] = dot(row r, token t)` for the `out.len() / n_tok` rows of `w`
/// (`per_row` units each) and the `n_tok` rows of `a`.
pub fn gemm_by_dot<W, A>(
    w: &[W],
    a: &[A],
    per_row: usize,
    n_tok: usize,
    dot: impl Fn(&[W], &[A]) -> f32,
    out: &mut [f32],
) {
    for (wr, o) in w.chunks_exact(per_row).zip(out.chunks_exact_mut(n_tok)) {
        for (t, v) in o.iter_mut().enumerate() {
            *v = dot(wr, &a[t * per_row..(t + 1) * per_row]);
        }
    }
}

/// Decoder attention (see [`crate::AttendF16`]) one row at a time with the given f16 dot
/// product, softmax and `out += w · v`; `scratch` holds the scores. The three
/// `attend_f16_*_by_rows` steps below, in turn.
pub fn attend_f16_by_rows(
    a: &crate::AttendF16,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
    dot: fn(&[f16], &[f16]) -> f32,
    axpy: fn(&mut [f32], f32, &[f16]),
    softmax: fn(&mut [f32]),
) {
    let (_, n) = a.span();
    let need = a.rows * n;
    if scratch.len() < need {
        // The whole cache's length once, so decoding never grows this buffer.
        let whole = 8 * (a.k.len() / a.kv_stride.max(1) + 1);
        scratch.resize(need.max(whole), 0.0);
    }
    let ps = &mut scratch[..need];
    attend_f16_scores_by_rows(a, ps, dot);
    for r in 0..a.rows {
        attend_f16_weights_by_rows(a, r, &mut ps[r * n..][..n], softmax);
    }
    values_by_rows(a, ps, 0, a.head_dim, out, |r| a.at[r], axpy);
}

/// [`crate::AttendF16Steps::scores`] a row at a time with the given f16 dot product: the
/// query in f16, 256 values at a time; past 256, a key's dot product with the query is the
/// sum of its pieces' dot products.
pub fn attend_f16_scores_by_rows(
    a: &crate::AttendF16,
    ps: &mut [f32],
    dot: fn(&[f16], &[f16]) -> f32,
) {
    let hd = a.head_dim;
    let (lo, n) = a.span();
    let mut q16 = [f16::ZERO; 256];
    for r in 0..a.rows {
        let (first, end) = a.keys[r];
        let q = &a.q[a.at[r]..][..hd];
        let row = &mut ps[r * n..][..n];
        row.fill(f32::NEG_INFINITY);
        let scores = &mut row[first - lo..end - lo];
        scores.fill(0.0);
        for c0 in (0..hd).step_by(256) {
            let n = (hd - c0).min(256);
            for (h, &x) in q16.iter_mut().zip(&q[c0..c0 + n]) {
                *h = f16::from_f32(x);
            }
            for (s, j) in scores.iter_mut().zip(first..end) {
                *s += dot(&a.k[j * a.kv_stride + c0..][..n], &q16[..n]);
            }
        }
        scores.iter_mut().for_each(|s| *s *= a.scale);
        if a.softcap > 0.0 {
            scores
                .iter_mut()
                .for_each(|s| *s = crate::soft_cap(*s, a.softcap));
        }
    }
}

/// [`crate::AttendF16Steps::weights`] with the given softmax, over the keys row `r` sees.
pub fn attend_f16_weights_by_rows(
    a: &crate::AttendF16,
    r: usize,
    row: &mut [f32],
    softmax: fn(&mut [f32]),
) {
    let (lo, _) = a.span();
    let (first, end) = a.keys[r];
    let p = &mut row[first - lo..end - lo];
    softmax(p);
    for w in p.iter_mut() {
        *w = f16::from_f32(*w).to_f32();
    }
}

/// [`crate::AttendF16Steps::values`] with the given `out += w · v`.
pub fn attend_f16_values_by_rows(
    a: &crate::AttendF16,
    ps: &[f32],
    c0: usize,
    out: &mut [f32],
    axpy: fn(&mut [f32], f32, &[f16]),
) {
    let w = out.len() / a.rows.max(1);
    check_value_columns(a, c0, w);
    values_by_rows(a, ps, c0, w, out, |r| r * w, axpy);
}

/// Checks the column part `c0..c0 + w` of a [`crate::AttendF16Steps::values`] call.
pub(crate) fn check_value_columns(a: &crate::AttendF16, c0: usize, w: usize) {
    let whole = c0 == 0 && w == a.head_dim;
    assert!(
        whole || (c0.is_multiple_of(16) && w.is_multiple_of(16) && c0 + w <= a.head_dim),
        "value columns {c0}..{} of {}",
        c0 + w,
        a.head_dim
    );
}

/// Columns `c0..c0 + w` of each row `r`, summed over its keys in order, into
/// `out[at(r)..][..w]`.
fn values_by_rows(
    a: &crate::AttendF16,
    ps: &[f32],
    c0: usize,
    w: usize,
    out: &mut [f32],
    at: impl Fn(usize) -> usize,
    axpy: fn(&mut [f32], f32, &[f16]),
) {
    let (lo, n) = a.span();
    for r in 0..a.rows {
        let (first, end) = a.keys[r];
        let o = &mut out[at(r)..][..w];
        o.fill(0.0);
        for j in first..end {
            axpy(o, ps[r * n + j - lo], &a.v[j * a.kv_stride + c0..][..w]);
        }
    }
}

/// The definition of [`crate::AttendF16`].
pub fn attend_f16(a: &crate::AttendF16, out: &mut [f32], scratch: &mut Vec<f32>) {
    attend_f16_by_rows(a, out, scratch, vec_dot_f16, axpy_f16, softmax)
}

/// [`crate::AttendF16Steps`] of [`attend_f16`].
pub const ATTEND_F16_STEPS: crate::AttendF16Steps = crate::AttendF16Steps {
    scores: |a, ps, _| attend_f16_scores_by_rows(a, ps, vec_dot_f16),
    weights: |a, r, row| attend_f16_weights_by_rows(a, r, row, softmax),
    values: |a, ps, c0, out| attend_f16_values_by_rows(a, ps, c0, out, axpy_f16),
};

/// `x = softmax(x)`: exponentials in f32 after subtracting the maximum, summed in f64.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `gate = SiLU(gate) · up = gate / (1 + e^-gate) · up` in place (SwiGLU's gated
/// activation).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `out += w · v` with `v` in f16.
pub fn axpy_f16(out: &mut [f32], w: f32, v: &[f16]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += w * x.to_f32();
    }
}

/// `out += w · v`.
pub fn axpy_f32(out: &mut [f32], w: f32, v: &[f32]) {
    for (o, x) in out.iter_mut().zip(v) {
        *o += w * x;
    }
}

/// The exact (erf) GELU, in place: `x = 0.5·x·(1 + erf(x/√2))` (BERT's `"gelu"`).
pub fn gelu_erf(x: &mut [f32]) {
    for v in x {
        *v = 0.5 * *v * (1.0 + libm::erff(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// Attention for the query rows of `a`, one row and head at a time (see [`crate::AttendRows`]).
pub fn attend_rows(a: &crate::AttendRows, out: &mut [f32]) {
    let h = a.heads * a.head_dim;
    let m = out.len() / h;
    let st = a.stride;
    let mut scores = vec![0f32; a.len];
    for i in 0..m {
        for head in 0..a.heads {
            let c0 = head * a.head_dim;
            let q = &a.q[i * st + c0..][..a.head_dim];
            for (j, s) in scores.iter_mut().enumerate() {
                let dot: f32 = (0..a.head_dim)
                    .map(|d| q[d] * a.kt[(c0 + d) * a.kt_stride + j])
                    .sum();
                *s = dot * a.scale;
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[i * h + c0..][..a.head_dim];
            o.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                for (d, o) in o.iter_mut().enumerate() {
                    *o += p * a.v[j * st + c0 + d];
                }
            }
            o.iter_mut().for_each(|o| *o /= sum);
        }
    }
}

/// Row-wise `x = LayerNorm(x + add) · w + b` (`add` optional), rows of `w.len()` values;
/// mean and variance in f64.
pub fn add_layer_norm(x: &mut [f32], add: Option<&[f32]>, w: &[f32], b: &[f32], eps: f32) {
    let dim = w.len();
    for (i, row) in x.chunks_exact_mut(dim).enumerate() {
        if let Some(add) = add {
            row.iter_mut()
                .zip(&add[i * dim..][..dim])
                .for_each(|(v, a)| *v += a);
        }
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        for ((v, w), b) in row.iter_mut().zip(w).zip(b) {
            *v = ((*v as f64 - mean) * inv) as f32 * w + b;
        }
    }
}
