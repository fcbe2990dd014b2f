//! A table of corrupted GGUF files, each made from the real SmolLM2 file, and the specific
//! error each must give. None may panic, hang or read out of bounds.

mod common;

use hearth_gguf::{Gguf, GgufError};
use hearth_models::{Model, ModelError};
use std::sync::Arc;

/// Byte positions of the header's fields, found by walking the real file.
struct Layout {
    n_tensors: usize,
    n_kv: usize,
    /// Per metadata entry: (key, key length field, type field, value start).
    kvs: Vec<(String, usize, usize, usize)>,
    /// Per tensor: (name, name length field, n_dims field, type field, offset field).
    tensors: Vec<(String, usize, usize, usize, usize)>,
}

fn u32_at(b: &[u8], p: usize) -> u32 {
    u32::from_le_bytes(b[p..p + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], p: usize) -> u64 {
    u64::from_le_bytes(b[p..p + 8].try_into().unwrap())
}
fn put_u32(b: &mut [u8], p: usize, v: u32) {
    b[p..p + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], p: usize, v: u64) {
    b[p..p + 8].copy_from_slice(&v.to_le_bytes());
}

fn skip_value(b: &[u8], mut p: usize, ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => p + 1,
        2 | 3 => p + 2,
        4..=6 => p + 4,
        10..=12 => p + 8,
        8 => p + 8 + u64_at(b, p) as usize,
        9 => {
            let et = u32_at(b, p);
            let n = u64_at(b, p + 4);
            p += 12;
            for _ in 0..n {
                p = skip_value(b, p, et);
            }
            p
        }
        _ => panic!("real file has unknown type"),
    }
}

fn layout(b: &[u8]) -> Layout {
    let n_tensors = u64_at(b, 8) as usize;
    let n_kv = u64_at(b, 16) as usize;
    let mut p = 24;
    let mut kvs = Vec::new();
    for _ in 0..n_kv {
        let len = u64_at(b, p) as usize;
        let key = String::from_utf8(b[p + 8..p + 8 + len].to_vec()).unwrap();
        let ty_pos = p + 8 + len;
        let ty = u32_at(b, ty_pos);
        kvs.push((key, p, ty_pos, ty_pos + 4));
        p = skip_value(b, ty_pos + 4, ty);
    }
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let len = u64_at(b, p) as usize;
        let name = String::from_utf8(b[p + 8..p + 8 + len].to_vec()).unwrap();
        let nd_pos = p + 8 + len;
        let nd = u32_at(b, nd_pos) as usize;
        let ty_pos = nd_pos + 4 + 8 * nd;
        tensors.push((name, p, nd_pos, ty_pos, ty_pos + 4));
        p = ty_pos + 12;
    }
    Layout {
        n_tensors,
        n_kv,
        kvs,
        tensors,
    }
}

fn kv<'a>(l: &'a Layout, key: &str) -> &'a (String, usize, usize, usize) {
    l.kvs
        .iter()
        .find(|k| k.0 == key)
        .unwrap_or_else(|| panic!("no key {key}"))
}
fn tensor<'a>(l: &'a Layout, name: &str) -> &'a (String, usize, usize, usize, usize) {
    l.tensors
        .iter()
        .find(|t| t.0 == name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
}
fn rename(b: &mut [u8], len_pos: usize, new: &str) {
    assert_eq!(u64_at(b, len_pos) as usize, new.len());
    b[len_pos + 8..len_pos + 8 + new.len()].copy_from_slice(new.as_bytes());
}

type Mutation = Box<dyn Fn(&mut Vec<u8>, &Layout)>;

/// What a case expects: an error from the parser, or from building the model.
enum Expect {
    Parse(fn(&GgufError) -> bool),
    Load(fn(&ModelError) -> bool),
}

#[test]
fn corrupted_files_give_specific_errors() {
    let original = std::fs::read(common::model_file("smollm2")).unwrap();
    let l = layout(&original);
    assert_eq!(l.n_kv, l.kvs.len());
    assert_eq!(l.n_tensors, l.tensors.len());
    // Two tensors whose names have equal length, for the duplicate-name case.
    let (dup_a, dup_b) = {
        let mut pair = None;
        'outer: for (i, a) in l.tensors.iter().enumerate() {
            for b in &l.tensors[i + 1..] {
                if a.0.len() == b.0.len() {
                    pair = Some((a.0.clone(), b.0.clone()));
                    break 'outer;
                }
            }
        }
        pair.unwrap()
    };
    let first = l.tensors[0].clone();
    let second = l.tensors[1].clone();

    use Expect::*;
    let cases: Vec<(&str, Mutation, Expect)> = vec![
        (
            "empty file",
            Box::new(|b, _| b.clear()),
            Parse(|e| matches!(e, GgufError::Truncated { .. })),
        ),
        (
            "3 bytes",
            Box::new(|b, _| b.truncate(3)),
            Parse(|e| matches!(e, GgufError::Truncated { .. })),
        ),
        (
            "bad magic",
            Box::new(|b, _| b[0] = b'X'),
            Parse(|e| matches!(e, GgufError::BadMagic { .. })),
        ),
        (
            "version 1",
            Box::new(|b, _| put_u32(b, 4, 1)),
            Parse(|e| matches!(e, GgufError::UnsupportedVersion(1))),
        ),
        (
            "version 4",
            Box::new(|b, _| put_u32(b, 4, 4)),
            Parse(|e| matches!(e, GgufError::UnsupportedVersion(4))),
        ),
        (
            "big-endian version",
            Box::new(|b, _| put_u32(b, 4, 3u32.swap_bytes())),
            Parse(|e| matches!(e, GgufError::UnsupportedVersion(_))),
        ),
        (
            "truncated header",
            Box::new(|b, _| b.truncate(20)),
            Parse(|e| matches!(e, GgufError::Truncated { .. })),
        ),
        (
            "truncated metadata",
            Box::new(|b, _| b.truncate(4000)),
            Parse(|e| matches!(e, GgufError::Truncated { .. } | GgufError::TooMany { .. })),
        ),
        (
            "huge kv count",
            Box::new(|b, _| put_u64(b, 16, u64::MAX)),
            Parse(|e| matches!(e, GgufError::TooMany { .. })),
        ),
        (
            "huge tensor count",
            Box::new(|b, _| put_u64(b, 8, 1 << 60)),
            Parse(|e| matches!(e, GgufError::TooMany { .. })),
        ),
        (
            "huge key length",
            Box::new(|b, l| put_u64(b, l.kvs[0].1, u64::MAX - 3)),
            Parse(|e| matches!(e, GgufError::Truncated { .. })),
        ),
        (
            "invalid UTF-8 key",
            Box::new(|b, l| b[l.kvs[0].1 + 8] = 0xFF),
            Parse(|e| matches!(e, GgufError::InvalidUtf8 { .. })),
        ),
        (
            "unknown value type",
            Box::new(|b, l| put_u32(b, l.kvs[0].2, 99)),
            Parse(|e| matches!(e, GgufError::UnknownValueType { type_id: 99, .. })),
        ),
        (
            "huge array length",
            Box::new(|b, l| put_u64(b, kv(l, "tokenizer.ggml.tokens").3 + 4, u64::MAX / 2)),
            Parse(|e| matches!(e, GgufError::TooMany { .. })),
        ),
        (
            "unknown array element type",
            Box::new(|b, l| put_u32(b, kv(l, "tokenizer.ggml.tokens").3, 42)),
            Parse(|e| matches!(e, GgufError::UnknownValueType { type_id: 42, .. })),
        ),
        (
            "huge string in array",
            Box::new(|b, l| put_u64(b, kv(l, "tokenizer.ggml.tokens").3 + 12, 1 << 40)),
            Parse(|e| matches!(e, GgufError::Truncated { .. })),
        ),
        (
            "bool byte 2",
            Box::new(|b, l| b[kv(l, "tokenizer.ggml.add_bos_token").3] = 2),
            Parse(|e| matches!(e, GgufError::BadValue { .. })),
        ),
        (
            "duplicate key",
            Box::new(|b, l| rename(b, kv(l, "general.type").1, "general.name")),
            Parse(|e| matches!(e, GgufError::DuplicateKey(k) if k == "general.name")),
        ),
        (
            "bad alignment",
            Box::new(|b, l| rename(b, kv(l, "llama.block_count").1, "general.alignment")),
            Parse(|e| matches!(e, GgufError::BadAlignment(30))),
        ),
        (
            "duplicate tensor",
            Box::new(move |b, l| rename(b, tensor(l, &dup_b).1, &dup_a)),
            Parse(|e| matches!(e, GgufError::DuplicateTensor(_))),
        ),
        (
            "zero dims",
            Box::new(|b, l| put_u32(b, l.tensors[0].2, 0)),
            Parse(|e| matches!(e, GgufError::TooManyDims { n_dims: 0, .. })),
        ),
        (
            "five dims",
            Box::new(|b, l| put_u32(b, l.tensors[0].2, 5)),
            Parse(|e| matches!(e, GgufError::TooManyDims { n_dims: 5, .. })),
        ),
        (
            "zero dimension",
            Box::new(|b, l| put_u64(b, l.tensors[0].2 + 4, 0)),
            Parse(|e| matches!(e, GgufError::ZeroDim { .. })),
        ),
        (
            "overflowing dims",
            Box::new(|b, l| {
                put_u64(b, l.tensors[0].2 + 4, 1 << 40);
                put_u64(b, l.tensors[0].2 + 12, 1 << 40)
            }),
            Parse(|e| matches!(e, GgufError::DimOverflow { .. })),
        ),
        (
            "unknown tensor type",
            Box::new(|b, l| put_u32(b, l.tensors[0].3, 77)),
            Parse(|e| matches!(e, GgufError::UnknownTensorType { type_id: 77, .. })),
        ),
        (
            // A real ggml type hearth cannot compute with: refused when the model loads,
            // by the type's name, with the supported types listed.
            "a tensor type hearth lacks (IQ2_XXS)",
            Box::new(|b, l| {
                let t = tensor(l, "blk.0.ffn_down.weight");
                put_u32(b, t.3, 16)
            }),
            Load(|e| {
                let msg = e.to_string();
                msg.contains("IQ2_XXS")
                    && msg.contains("blk.0.ffn_down.weight")
                    && msg.contains("Q4_K, Q5_K")
            }),
        ),
        (
            "row not block aligned",
            Box::new(|b, l| put_u64(b, tensor(l, "blk.0.attn_q.weight").2 + 4, 577)),
            Parse(|e| matches!(e, GgufError::RowNotBlockAligned { .. })),
        ),
        (
            "misaligned offset",
            Box::new(|b, l| {
                let p = l.tensors[1].4;
                let v = u64_at(b, p);
                put_u64(b, p, v + 1);
            }),
            Parse(|e| matches!(e, GgufError::MisalignedOffset { .. })),
        ),
        (
            "offset out of range",
            Box::new(|b, l| put_u64(b, l.tensors[0].4, !31)),
            Parse(|e| matches!(e, GgufError::TensorOutOfBounds { .. })),
        ),
        (
            "truncated tensor data",
            Box::new(|b, _| {
                let n = b.len();
                b.truncate(n - 1000)
            }),
            Parse(|e| matches!(e, GgufError::TensorOutOfBounds { .. })),
        ),
        (
            "data section past end",
            Box::new(|b, l| {
                let n = l.tensors.last().unwrap().4 + 8;
                b.truncate(n)
            }),
            Parse(|e| {
                matches!(
                    e,
                    GgufError::Truncated { .. } | GgufError::TensorOutOfBounds { .. }
                )
            }),
        ),
        (
            "overlapping tensors",
            Box::new(move |b, _| {
                let off = u64_at(b, first.4);
                put_u64(b, second.4, off);
            }),
            Parse(|e| matches!(e, GgufError::OverlappingTensors { .. })),
        ),
        (
            "missing architecture",
            Box::new(|b, l| rename(b, kv(l, "general.architecture").1, "general.architecturX")),
            Load(
                |e| matches!(e, ModelError::Gguf(GgufError::MissingKey(k)) if k == "general.architecture"),
            ),
        ),
        (
            "unsupported architecture",
            Box::new(|b, l| {
                let p = kv(l, "general.architecture").3;
                b[p + 8..p + 13].copy_from_slice(b"llamb")
            }),
            Load(|e| matches!(e, ModelError::UnsupportedArch(a, _) if a == "llamb")),
        ),
        (
            "missing tensor",
            Box::new(|b, l| rename(b, tensor(l, "output_norm.weight").1, "output_norm.weighX")),
            Load(
                |e| matches!(e, ModelError::Gguf(GgufError::MissingTensor(t)) if t == "output_norm.weight"),
            ),
        ),
        (
            "wrong tensor shape",
            Box::new(|b, l| put_u64(b, tensor(l, "blk.0.attn_norm.weight").2 + 4, 288)),
            Load(|e| matches!(e, ModelError::Gguf(GgufError::ShapeMismatch { .. }))),
        ),
        (
            "head count not dividing",
            Box::new(|b, l| put_u32(b, kv(l, "llama.attention.head_count_kv").3, 4)),
            Load(|e| matches!(e, ModelError::BadConfig(_))),
        ),
        (
            "zero layers",
            Box::new(|b, l| put_u32(b, kv(l, "llama.block_count").3, 0)),
            Load(|e| matches!(e, ModelError::Gguf(GgufError::BadValue { .. }))),
        ),
    ];
    assert!(cases.len() >= 25);
    for (name, mutate, expect) in &cases {
        let mut bytes = original.clone();
        mutate(&mut bytes, &l);
        let parsed = std::panic::catch_unwind(|| Gguf::from_vec(bytes))
            .unwrap_or_else(|_| panic!("{name}: parser panicked"));
        match (expect, parsed) {
            (Parse(ok), Err(e)) => assert!(ok(&e), "{name}: unexpected error {e}"),
            (Parse(_), Ok(_)) => panic!("{name}: corrupted file was accepted"),
            (Load(ok), Ok(g)) => match Model::load(Arc::new(g)) {
                Err(e) => assert!(ok(&e), "{name}: unexpected error {e}"),
                Ok(_) => panic!("{name}: model with bad metadata loaded"),
            },
            (Load(_), Err(e)) => panic!("{name}: expected a load error, got a parse error {e}"),
        }
    }
}

#[test]
fn the_real_files_parse() {
    for m in ["smollm2", "gemma3"] {
        let g = common::open(m);
        assert!(g.tensors.len() > 100);
        Model::load(g).unwrap();
    }
}
