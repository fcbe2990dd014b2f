//! Runtime CPU dispatch: detect features once, pick one kernel per quant type.
//! Levels belong to an architecture family (`x86/`, `aarch64/`), each with its own kernel
//! table over the scalar one; `HEARTH_ISA` names one of the levels this CPU has
//! (`scalar|avx2|avx512|amx` on x86-64, `scalar|neon|dotprod|i8mm` on aarch64).

use crate::blocks::*;
use crate::reference as r;
use crate::ActBlocks;
use half::f16;
use std::sync::OnceLock;

/// A kernel level. Within a family each level includes the ones below it; levels of
/// different families are never compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
    /// AVX-512 plus AMX-BF16 tiles (granted by the kernel): encoder products in bf16.
    Amx,
    /// ARMv8.0 Advanced SIMD (every aarch64 CPU).
    Neon,
    /// NEON plus the dot-product extension (`sdot`/`udot`).
    Dotprod,
    /// Dot-product plus the int8 matrix multiply (`smmla`).
    I8mm,
}

/// Every level, lowest first within each family.
const ALL: [Isa; 7] = [
    Isa::Scalar,
    Isa::Avx2,
    Isa::Avx512,
    Isa::Amx,
    Isa::Neon,
    Isa::Dotprod,
    Isa::I8mm,
];

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
            Isa::Neon => "neon",
            Isa::Dotprod => "dotprod",
            Isa::I8mm => "i8mm",
        }
    }

    /// The level called `name`, on any architecture.
    pub fn parse(name: &str) -> Option<Isa> {
        ALL.into_iter().find(|l| l.name() == name)
    }

    /// Position within its family (scalar 0).
    fn rank(self) -> u8 {
        match self {
            Isa::Scalar => 0,
            Isa::Avx2 | Isa::Neon => 1,
            Isa::Avx512 | Isa::Dotprod => 2,
            Isa::Amx | Isa::I8mm => 3,
        }
    }

    fn x86(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512 | Isa::Amx)
    }

    /// True when this level includes `other`: the same family at or above it (every level
    /// includes `Scalar`).
    pub fn includes(self, other: Isa) -> bool {
        other == Isa::Scalar || (self.x86() == other.x86() && self.rank() >= other.rank())
    }
}

/// The levels this CPU runs, lowest (scalar) first.
pub fn available() -> Vec<Isa> {
    let best = detect();
    ALL.into_iter().filter(|&l| best.includes(l)).collect()
}

/// The best level this CPU supports.
pub fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        let avx512 = avx2
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni");
        if avx512 && std::arch::is_x86_feature_detected!("avx512bf16") && crate::x86::amx::enable()
        {
            return Isa::Amx;
        }
        if avx512 {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        // NEON is part of every aarch64 Linux target.
        let dotprod = std::arch::is_aarch64_feature_detected!("dotprod");
        if dotprod && std::arch::is_aarch64_feature_detected!("i8mm") {
            return Isa::I8mm;
        }
        if dotprod {
            return Isa::Dotprod;
        }
        return Isa::Neon;
    }
    #[allow(unreachable_code)]
    Isa::Scalar
}

/// One function per operation, chosen for this CPU.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub isa: Isa,
    pub quantize_q8_0: fn(&[f32], &mut [BlockQ8_0]),
    pub quantize_q8_1: fn(&[f32], &mut [BlockQ8_1]),
    pub quantize_q8_k: fn(&[f32], &mut [BlockQ8K]),
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    /// 4 weight rows × 3 activation rows of an F32 product (see `reference::tile_f32_4x3`).
    pub tile_f32_4x3: fn(&[f32], &[f32], usize, &mut [f32; 12]),
    pub dot_f16: fn(&[f16], &[f16]) -> f32,
    pub dot_bf16: fn(&[half::bf16], &[half::bf16]) -> f32,
    /// `out += w · v` (attention's weighted sum of f16 values).
    pub axpy_f16: fn(&mut [f32], f32, &[f16]),
    /// `out += w · v` (attention's weighted sum of values dequantized from a Q8_0/Q4_0 cache).
    pub axpy_f32: fn(&mut [f32], f32, &[f32]),
    /// A row of blocks to f32 (the values of a quantized KV cache, one position at a time).
    pub dequantize_q8_0: fn(&[BlockQ8_0], &mut [f32]),
    pub dequantize_q4_0: fn(&[BlockQ4_0], &mut [f32]),
    pub dot_q4_0: fn(&[BlockQ4_0], &[BlockQ8_0]) -> f32,
    pub dot_q4_1: fn(&[BlockQ4_1], &[BlockQ8_1]) -> f32,
    pub dot_q5_0: fn(&[BlockQ5_0], &[BlockQ8_0]) -> f32,
    pub dot_q5_1: fn(&[BlockQ5_1], &[BlockQ8_1]) -> f32,
    pub dot_iq4_nl: fn(&[BlockIQ4NL], &[BlockQ8_0]) -> f32,
    pub dot_q8_0: fn(&[BlockQ8_0], &[BlockQ8_0]) -> f32,
    pub dot_q4_k: fn(&[BlockQ4K], &[BlockQ8K]) -> f32,
    pub dot_q5_k: fn(&[BlockQ5K], &[BlockQ8K]) -> f32,
    pub dot_q6_k: fn(&[BlockQ6K], &[BlockQ8K]) -> f32,
    pub dot_q2_k: fn(&[BlockQ2K], &[BlockQ8K]) -> f32,
    pub dot_q3_k: fn(&[BlockQ3K], &[BlockQ8K]) -> f32,
    pub dot_iq4_xs: fn(&[BlockIQ4XS], &[BlockQ8K]) -> f32,
    /// Rows × tokens products (`out[row * n_tok + t]`, see `reference::gemm_by_dot`).
    pub gemm_q4_0: Gemm<BlockQ4_0, BlockQ8_0>,
    pub gemm_q4_1: Gemm<BlockQ4_1, BlockQ8_1>,
    pub gemm_q5_0: Gemm<BlockQ5_0, BlockQ8_0>,
    pub gemm_q5_1: Gemm<BlockQ5_1, BlockQ8_1>,
    pub gemm_iq4_nl: Gemm<BlockIQ4NL, BlockQ8_0>,
    pub gemm_q8_0: Gemm<BlockQ8_0, BlockQ8_0>,
    /// K-quant products (the activations' `d`/`s` are unused: Q8_K carries its own).
    pub gemm_q4_k: Gemm<BlockQ4K, BlockQ8K>,
    pub gemm_q5_k: Gemm<BlockQ5K, BlockQ8K>,
    pub gemm_q6_k: Gemm<BlockQ6K, BlockQ8K>,
    pub gemm_q2_k: Gemm<BlockQ2K, BlockQ8K>,
    pub gemm_q3_k: Gemm<BlockQ3K, BlockQ8K>,
    pub gemm_iq4_xs: Gemm<BlockIQ4XS, BlockQ8K>,
    /// Q4_0 and IQ4_NL rows grouped eight at a time ([`Nibbles8`]), where the level decodes
    /// them faster so: a matrix is grouped at load only when these are set (see
    /// `QMatrix::interleave`); otherwise its rows stay as the file has them.
    pub gemm_q4_0x8: Option<Gemm<Nibbles8, BlockQ8_0>>,
    pub gemm_iq4_nlx8: Option<Gemm<Nibbles8, BlockQ8_0>>,
    /// Q4_1 rows grouped eight at a time ([`NibblesMin8`]).
    pub gemm_q4_1x8: Option<Gemm<NibblesMin8, BlockQ8_1>>,
    /// Q5_0 rows grouped eight at a time ([`NibblesQh8`]).
    pub gemm_q5_0x8: Option<Gemm<NibblesQh8, BlockQ8_0>>,
    /// Q4_K rows grouped eight at a time ([`Q4K8`]).
    pub gemm_q4_kx8: Option<Gemm<Q4K8, BlockQ8K>>,
    /// Products of prompt tokens where a level has a kernel for them that differs from
    /// `gemm_*` (see `Activations::quantize_split`).
    pub prefill_q4_0: Option<Prefill<BlockQ4_0, BlockQ8_0>>,
    pub prefill_q4_1: Option<Prefill<BlockQ4_1, BlockQ8_1>>,
    pub prefill_q5_0: Option<Prefill<BlockQ5_0, BlockQ8_0>>,
    pub prefill_q5_1: Option<Prefill<BlockQ5_1, BlockQ8_1>>,
    pub prefill_q8_0: Option<Prefill<BlockQ8_0, BlockQ8_0>>,
    pub prefill_iq4_nl: Option<Prefill<BlockIQ4NL, BlockQ8_0>>,
    pub prefill_q4_k: Option<Prefill<BlockQ4K, BlockQ8K>>,
    /// Prompt tokens on Q4_K rows grouped at load (`gemm_q4_kx8`), read in place; where a
    /// level lacks it, the groups go back to the file's layout for `prefill_q4_k`.
    pub prefill_q4_kx8: Option<Prefill<Q4K8, BlockQ8K>>,
    /// Q5_K rows grouped eight at a time ([`Q5K8`]).
    pub gemm_q5_kx8: Option<Gemm<Q5K8, BlockQ8K>>,
    /// Prompt tokens on Q5_K rows grouped at load (`gemm_q5_kx8`), read in place.
    pub prefill_q5_kx8: Option<Prefill<Q5K8, BlockQ8K>>,
    /// IQ4_XS rows grouped eight at a time ([`IQ4XS8`]).
    pub gemm_iq4_xsx8: Option<Gemm<IQ4XS8, BlockQ8K>>,
    /// Prompt tokens on IQ4_XS rows grouped at load (`gemm_iq4_xsx8`), read in place.
    pub prefill_iq4_xsx8: Option<Prefill<IQ4XS8, BlockQ8K>>,
    /// Q3_K rows grouped eight at a time ([`Q3K8`]).
    pub gemm_q3_kx8: Option<Gemm<Q3K8, BlockQ8K>>,
    /// Prompt tokens on Q3_K rows grouped at load (`gemm_q3_kx8`), read in place.
    pub prefill_q3_kx8: Option<Prefill<Q3K8, BlockQ8K>>,
    /// Q2_K rows grouped eight at a time ([`Q2K8`]).
    pub gemm_q2_kx8: Option<Gemm<Q2K8, BlockQ8K>>,
    /// Prompt tokens on Q2_K rows grouped at load (`gemm_q2_kx8`), read in place.
    pub prefill_q2_kx8: Option<Prefill<Q2K8, BlockQ8K>>,
    /// The same for Q4_0, IQ4_NL and Q4_1 rows grouped at load.
    pub prefill_q4_0x8: Option<Prefill<Nibbles8, BlockQ8_0>>,
    pub prefill_iq4_nlx8: Option<Prefill<Nibbles8, BlockQ8_0>>,
    pub prefill_q4_1x8: Option<Prefill<NibblesMin8, BlockQ8_1>>,
    pub prefill_q5_0x8: Option<Prefill<NibblesQh8, BlockQ8_0>>,
    pub prefill_q6_k: Option<Prefill<BlockQ6K, BlockQ8K>>,
    pub prefill_q5_k: Option<Prefill<BlockQ5K, BlockQ8K>>,
    pub prefill_q2_k: Option<Prefill<BlockQ2K, BlockQ8K>>,
    pub prefill_q3_k: Option<Prefill<BlockQ3K, BlockQ8K>>,
    pub prefill_iq4_xs: Option<Prefill<BlockIQ4XS, BlockQ8K>>,
    /// Decoder attention over the f16 KV cache (see [`crate::AttendF16`]); the last argument
    /// is scratch space.
    pub attend_f16: fn(&crate::AttendF16, &mut [f32], &mut Vec<f32>),
    /// `attend_f16` in steps (same bits), to split one token's attention over threads.
    pub attend_f16_steps: crate::AttendF16Steps,
    /// Decoder attention over a Q8_0/Q4_0 KV cache (see [`crate::kvquant`]).
    pub attend_q8_0: fn(&crate::kvquant::AttendQuant<BlockQ8_0>, &mut [f32], &mut Vec<f32>),
    pub attend_q4_0: fn(&crate::kvquant::AttendQuant<BlockQ4_0>, &mut [f32], &mut Vec<f32>),
    /// Exact-form GELU in place (encoders).
    pub gelu: fn(&mut [f32]),
    /// `x = softmax(x)` (see `reference::softmax`).
    pub softmax: fn(&mut [f32]),
    /// `gate = SiLU(gate) · up` (see `reference::swiglu`).
    pub swiglu: fn(&mut [f32], &[f32]),
    /// Encoder attention over a block of query rows (see [`crate::AttendRows`]).
    pub attend_rows: fn(&crate::AttendRows, &mut [f32]),
    /// Row-wise `x = LayerNorm(x + add) · w + b` (see `reference::add_layer_norm`).
    pub add_layer_norm: AddLayerNorm,
    /// Prompt tokens of F16/BF16 products, where the level has them.
    pub float_tiles: Option<FloatTiles>,
}

/// `tile(w, xt, cols, out, stride, valid)` of [`FloatTiles`].
pub type FloatTile = fn(&[f32], &[f32], usize, &mut [f32], usize, usize);

/// Prompt products of 16-bit float weights (`QMatrix` prefill): weight rows widened to f32
/// a few at a time against blocks of `tokens` tokens whose activations are transposed
/// (column `k` of the block at `xt[k * tokens..][..tokens]`).
#[derive(Clone, Copy)]
pub struct FloatTiles {
    /// Tokens per transposed block.
    pub tokens: usize,
    /// Weight rows per call, at most.
    pub rows: usize,
    /// `tile(w, xt, cols, out, stride, valid)`: `out[r * stride + t] = Σ_k w[r][k] ·
    /// xt[k * tokens + t]` for the rows of `w` and the block's first `valid` tokens (see
    /// `reference::float_tile`).
    pub tile: FloatTile,
    /// Exact widenings to f32.
    pub widen_f16: fn(&[f16], &mut [f32]),
    pub widen_bf16: fn(&[half::bf16], &mut [f32]),
    /// F16 products on dot-product tiles instead, where the level runs them faster.
    pub f16_dots: Option<FloatDots>,
}

/// Prompt products of F16 weights as tiles of dot products over rows read in place:
/// `tile(w, a, cols, out, stride)` sets `out[r * stride + t] = w[r] · a[t]` for the (at
/// most `rows`) rows of `w` and (at most `tokens`) rows of `a`, `cols` each, summed in
/// any order (see `reference::float_dots`).
#[derive(Clone, Copy)]
pub struct FloatDots {
    pub rows: usize,
    pub tokens: usize,
    pub tile: fn(&[f16], &[f16], usize, &mut [f32], usize),
}

/// `add_layer_norm(x, add, weight, bias, eps)`.
pub type AddLayerNorm = fn(&mut [f32], Option<&[f32]>, &[f32], &[f32], f32);

/// `gemm(weight rows, activations, blocks per row, tokens, out)`.
pub type Gemm<W, A> = fn(&[W], &ActBlocks<A>, usize, usize, &mut [f32]);
/// The rows of `w` (`nb` blocks each) against every token of `a`, written straight into
/// the token-major result: `out.token(t)[r]` (see [`crate::pool::OutColumns`]).
pub type Prefill<W, A> = fn(&[W], &ActBlocks<A>, usize, &mut crate::pool::Columns);

/// A [`Gemm`] made of one dot product per (row, token).
macro_rules! gemm_from_dot {
    ($name:ident, $w:ty, $a:ty, $dot:expr) => {
        fn $name(w: &[$w], a: &$crate::ActBlocks<$a>, nb: usize, n_tok: usize, out: &mut [f32]) {
            $crate::reference::gemm_by_dot(w, a.blocks, nb, n_tok, $dot, out)
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use gemm_from_dot;

gemm_from_dot!(gemm_q4_0, BlockQ4_0, BlockQ8_0, r::vec_dot_q4_0_q8_0);
gemm_from_dot!(gemm_q4_1, BlockQ4_1, BlockQ8_1, r::vec_dot_q4_1_q8_1);
gemm_from_dot!(gemm_q5_0, BlockQ5_0, BlockQ8_0, r::vec_dot_q5_0_q8_0);
gemm_from_dot!(gemm_q8_0, BlockQ8_0, BlockQ8_0, r::vec_dot_q8_0_q8_0);
gemm_from_dot!(gemm_q4_k, BlockQ4K, BlockQ8K, r::vec_dot_q4_k_q8_k);
gemm_from_dot!(gemm_q6_k, BlockQ6K, BlockQ8K, r::vec_dot_q6_k_q8_k);
gemm_from_dot!(gemm_q5_1, BlockQ5_1, BlockQ8_1, r::vec_dot_q5_1_q8_1);
gemm_from_dot!(gemm_q5_k, BlockQ5K, BlockQ8K, r::vec_dot_q5_k_q8_k);
gemm_from_dot!(gemm_q2_k, BlockQ2K, BlockQ8K, r::vec_dot_q2_k_q8_k);
gemm_from_dot!(gemm_q3_k, BlockQ3K, BlockQ8K, r::vec_dot_q3_k_q8_k);
gemm_from_dot!(gemm_iq4_nl, BlockIQ4NL, BlockQ8_0, r::vec_dot_iq4_nl_q8_0);
gemm_from_dot!(gemm_iq4_xs, BlockIQ4XS, BlockQ8K, r::vec_dot_iq4_xs_q8_k);

impl Kernels {
    pub fn scalar() -> Self {
        Kernels {
            isa: Isa::Scalar,
            quantize_q8_0: r::quantize_row_q8_0,
            quantize_q8_1: r::quantize_row_q8_1,
            quantize_q8_k: r::quantize_row_q8_k,
            dot_f32: r::vec_dot_f32,
            tile_f32_4x3: r::tile_f32_4x3,
            dot_f16: r::vec_dot_f16,
            dot_bf16: r::vec_dot_bf16,
            axpy_f16: r::axpy_f16,
            axpy_f32: r::axpy_f32,
            dequantize_q8_0: r::dequantize_row_q8_0,
            dequantize_q4_0: r::dequantize_row_q4_0,
            dot_q4_0: r::vec_dot_q4_0_q8_0,
            dot_q4_1: r::vec_dot_q4_1_q8_1,
            dot_q5_0: r::vec_dot_q5_0_q8_0,
            dot_q5_1: r::vec_dot_q5_1_q8_1,
            dot_iq4_nl: r::vec_dot_iq4_nl_q8_0,
            dot_q8_0: r::vec_dot_q8_0_q8_0,
            dot_q4_k: r::vec_dot_q4_k_q8_k,
            dot_q5_k: r::vec_dot_q5_k_q8_k,
            dot_q6_k: r::vec_dot_q6_k_q8_k,
            dot_q2_k: r::vec_dot_q2_k_q8_k,
            dot_q3_k: r::vec_dot_q3_k_q8_k,
            dot_iq4_xs: r::vec_dot_iq4_xs_q8_k,
            gemm_q4_0,
            gemm_q4_1,
            gemm_q5_0,
            gemm_q5_1,
            gemm_iq4_nl,
            gemm_q8_0,
            gemm_q4_k,
            gemm_q5_k,
            gemm_q6_k,
            gemm_q2_k,
            gemm_q3_k,
            gemm_iq4_xs,
            gemm_q4_0x8: None,
            gemm_q4_1x8: None,
            gemm_q5_0x8: None,
            gemm_iq4_nlx8: None,
            gemm_q4_kx8: None,
            prefill_q4_kx8: None,
            gemm_q5_kx8: None,
            prefill_q5_kx8: None,
            gemm_iq4_xsx8: None,
            prefill_iq4_xsx8: None,
            gemm_q3_kx8: None,
            prefill_q3_kx8: None,
            gemm_q2_kx8: None,
            prefill_q2_kx8: None,
            prefill_q4_0x8: None,
            prefill_iq4_nlx8: None,
            prefill_q4_1x8: None,
            prefill_q5_0x8: None,
            prefill_q4_0: None,
            prefill_q4_1: None,
            prefill_q5_0: None,
            prefill_q5_1: None,
            prefill_q8_0: None,
            prefill_iq4_nl: None,
            prefill_q4_k: None,
            prefill_q6_k: None,
            prefill_q5_k: None,
            prefill_q2_k: None,
            prefill_q3_k: None,
            prefill_iq4_xs: None,
            attend_f16: r::attend_f16,
            attend_f16_steps: r::ATTEND_F16_STEPS,
            attend_q8_0: crate::kvquant::attend_q8_0,
            attend_q4_0: crate::kvquant::attend_q4_0,
            gelu: r::gelu_erf,
            softmax: r::softmax,
            swiglu: r::swiglu,
            attend_rows: r::attend_rows,
            add_layer_norm: r::add_layer_norm,
            float_tiles: None,
        }
    }

    /// Kernels for `isa`; a level this CPU lacks gives the best one it has.
    pub fn for_isa(isa: Isa) -> Self {
        let isa = if detect().includes(isa) {
            isa
        } else {
            detect()
        };
        #[cfg(target_arch = "x86_64")]
        if isa != Isa::Scalar {
            // SAFETY: `detect()` includes `isa` (checked above), so the CPU supports it.
            return unsafe { crate::x86::kernels(isa) };
        }
        #[cfg(target_arch = "aarch64")]
        if isa != Isa::Scalar {
            // SAFETY: `detect()` includes `isa` (checked above), so the CPU supports it.
            return unsafe { crate::aarch64::kernels(isa) };
        }
        Self::scalar()
    }
}

/// The level `HEARTH_ISA` asks for, if set: an error names the levels this CPU has when it
/// asks for another one (or for no level at all).
pub fn requested_isa() -> Result<Option<Isa>, String> {
    let Some(want) = std::env::var_os("HEARTH_ISA") else {
        return Ok(None);
    };
    let want = want.to_string_lossy();
    let names: Vec<&str> = available().iter().map(|l| l.name()).collect();
    match Isa::parse(&want) {
        Some(l) if detect().includes(l) => Ok(Some(l)),
        Some(_) => Err(format!(
            "HEARTH_ISA={want}: this CPU ({}) does not have that kernel level; it has: {}",
            std::env::consts::ARCH,
            names.join(", ")
        )),
        None => Err(format!(
            "HEARTH_ISA={want} is not a kernel level; this CPU ({}) has: {}",
            std::env::consts::ARCH,
            names.join(", ")
        )),
    }
}

/// The level in force: `HEARTH_ISA` if it names a level this CPU has, else the best
/// detected (front ends refuse a bad `HEARTH_ISA` first, with [`requested_isa`]).
pub fn selected_isa() -> Isa {
    requested_isa().ok().flatten().unwrap_or_else(detect)
}

static KERNELS: OnceLock<Kernels> = OnceLock::new();

/// The process-wide kernels, chosen on first use.
pub fn kernels() -> &'static Kernels {
    KERNELS.get_or_init(|| Kernels::for_isa(selected_isa()))
}
