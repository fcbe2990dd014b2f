//! hearth's scalar dequantization (the definition every SIMD kernel is tested against)
//! equals llama.cpp's gguf-py `gguf.quants.dequantize`, bit for bit, on random, edge and
//! real blocks of every weight type (goldens from scripts/make-quant-goldens).

use bytemuck::Zeroable;
use hearth_quant::{GgmlType, QMatrix, SUPPORTED_TYPES};
use std::path::PathBuf;

fn golden(ty: GgmlType) -> (usize, Vec<u8>, Vec<f32>) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/golden/quants")
        .join(format!("{}.bin", ty.name()));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    let raw_len = n * ty.block_bytes() as usize;
    let raw = bytes[4..4 + raw_len].to_vec();
    let values: Vec<f32> = bytes[4 + raw_len..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(values.len(), n * ty.block_len() as usize, "{}", ty.name());
    (n, raw, values)
}

#[test]
fn every_type_dequantizes_as_gguf_py_does() {
    let mut checked = Vec::new();
    for &ty in SUPPORTED_TYPES {
        if ty == GgmlType::F32 {
            continue;
        }
        let (n, raw, want) = golden(ty);
        // One row of all the blocks, from an 8-aligned copy (the blocks hold f16/f32 fields).
        let mut aligned = vec![0u64; raw.len().div_ceil(8)];
        let buf: &mut [u8] = &mut bytemuck::cast_slice_mut(&mut aligned)[..raw.len()];
        buf.copy_from_slice(&raw);
        let cols = n * ty.block_len() as usize;
        let m = QMatrix::new("golden", ty, cols, 1, buf).unwrap();
        let mut got = vec![0f32; cols];
        m.dequantize_row(0, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{} value {i} (block {}): hearth {g} vs gguf-py {w}",
                ty.name(),
                i / ty.block_len() as usize
            );
        }
        checked.push(format!("{} ({n} blocks)", ty.name()));
    }
    eprintln!("dequantization equals gguf-py: {}", checked.join(", "));
}

#[test]
fn types_hearth_lacks_are_refused_by_name_with_the_supported_list() {
    let ty = GgmlType::IQ2_XXS;
    let bytes = vec![0u8; ty.block_bytes() as usize];
    let err = QMatrix::new("blk.0.ffn_up.weight", ty, 256, 1, &bytes)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("IQ2_XXS"), "{err}");
    assert!(err.contains("blk.0.ffn_up.weight"), "{err}");
    assert!(err.contains("Q4_K") && err.contains("IQ4_XS"), "{err}");
}

/// The KV cache's quantizers (`--kv-type q8_0|q4_0`) make the bytes gguf-py's `quantize`
/// makes (bit-exact with llama.cpp's reference), Q8_0 at every kernel level.
#[test]
fn kv_cache_quantizers_match_gguf_py() {
    use hearth_quant::blocks::{BlockQ4_0, BlockQ8_0};
    use hearth_quant::dispatch::{available, Kernels};
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/quants/kv-quantize.bin");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    let (x, rest) = bytes[4..].split_at(n * 32 * 4);
    let (want_q8, want_q4) = rest.split_at(n * 34);
    assert_eq!(want_q4.len(), n * 18);
    let x: Vec<f32> = x
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let mut q4 = vec![BlockQ4_0::zeroed(); n];
    hearth_quant::reference::quantize_row_q4_0(&x, &mut q4);
    assert_eq!(bytemuck::cast_slice::<_, u8>(&q4), want_q4, "q4_0");
    for isa in available() {
        let mut q8 = vec![BlockQ8_0::zeroed(); n];
        (Kernels::for_isa(isa).quantize_q8_0)(&x, &mut q8);
        assert_eq!(
            bytemuck::cast_slice::<_, u8>(&q8),
            want_q8,
            "q8_0 at {}",
            isa.name()
        );
    }
}
