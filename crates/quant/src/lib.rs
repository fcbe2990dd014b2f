//! Quantized weights and the kernels that multiply them with activations.
//!
//! Layout: [`blocks`] (ggml block types), [`reference`] (scalar kernels, the definition),
//! `x86` (SIMD kernels), [`dispatch`] (pick the best kernel for this CPU once).
//! A matrix-vector product quantizes the activations once to the weight type's partner
//! format (Q8_0, Q8_1 or Q8_K, as ggml does) and then runs integer dot products per row.

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
pub mod bf16mat;
pub mod blocks;
pub mod dispatch;
pub mod f32mat;
pub mod i16mat;
pub mod i8mat;
pub mod kvquant;
pub mod pool;
pub mod reference;
#[cfg(target_arch = "x86_64")]
pub mod x86;

use blocks::*;
pub use dispatch::{Isa, Kernels};
use half::{bf16, f16};
pub use hearth_gguf::GgmlType;

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error(
        "tensor {name:?} has type {ty}, which hearth cannot compute with yet; supported types: \
         {} (convert the model with llama-quantize to one of them, or download another quant)",
        SUPPORTED_TYPES.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
    )]
    Unsupported { name: String, ty: GgmlType },
    #[error("tensor {name:?}: {len} bytes do not hold {rows}x{cols} {ty} values")]
    BadLength {
        name: String,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        len: usize,
    },
    #[error("tensor {name:?}: data is not aligned for {ty} blocks")]
    Misaligned { name: String, ty: GgmlType },
}

/// The weight types [`QMatrix`] computes with.
pub const SUPPORTED_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
];

/// 8-bit activation blocks with each block's scale `d` and `s = d · Σq` as f32 (the tiled
/// kernels read these instead of converting f16 scales per weight row).
pub struct ActBlocks<'a, A> {
    pub blocks: &'a [A],
    pub d: &'a [f32],
    pub s: &'a [f32],
}

/// Bidirectional attention (encoders) for a block of query rows of one sequence, every head.
/// Row `i` of the output (`[m, heads * head_dim]`), head `hd`: `Σ_j softmax_j(scale ·
/// q_i·k_j) v_j` over that head's `head_dim` columns, `j < len`.
pub struct AttendRows<'a> {
    /// Query rows: row `i` at `q[i * stride..][..heads * head_dim]`, `i < m`.
    pub q: &'a [f32],
    /// Distance between consecutive rows of `q` and of `v` (≥ `heads * head_dim`).
    pub stride: usize,
    /// The sequence's keys transposed: column `c` of key `j` at `kt[c * kt_stride + j]`.
    pub kt: &'a [f32],
    pub kt_stride: usize,
    /// The sequence's value rows, `len` rows `stride` apart.
    pub v: &'a [f32],
    pub len: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Causal attention (decoders) of up to 8 query rows of one KV head against the f16 KV
/// cache, with llama.cpp's non-flash numerics: the query rounded to f16 and dotted with the
/// keys in f32, `scale` applied, softmax in f32 (sum in f64), the weights rounded to f16 and
/// multiplied with the values in f32.
pub struct AttendF16<'a> {
    /// Query rows: row `r` at `q[at[r]..][..head_dim]`; its output goes to the same place
    /// of `out`.
    pub q: &'a [f32],
    pub at: [usize; 8],
    pub rows: usize,
    /// Row `r` sees the keys `keys[r].0..keys[r].1` (non-empty).
    pub keys: [(usize, usize); 8],
    /// Key and value of position `j`: `k[j * kv_stride..][..head_dim]`, likewise `v`.
    pub k: &'a [f16],
    pub v: &'a [f16],
    pub kv_stride: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// Attention logit soft-capping (gemma2): scores become `cap · tanh(score / cap)`
    /// after `scale`, before the softmax. 0 turns it off.
    pub softcap: f32,
}

impl AttendF16<'_> {
    /// The span of the rows' keys, `lo..lo + n` (the union of `keys[..rows]`).
    pub fn span(&self) -> (usize, usize) {
        let (mut lo, mut hi) = (usize::MAX, 0);
        for &(first, end) in &self.keys[..self.rows] {
            (lo, hi) = (lo.min(first), hi.max(end));
        }
        (lo, hi.saturating_sub(lo))
    }
}

/// [`AttendF16`] in three steps, so that one decoding token's attention can be split over
/// threads by keys and by columns (a model with fewer KV heads than threads has nothing
/// else to split): `scores` over any part of the keys, `weights` on each whole row,
/// `values` for any part of the output columns. Together they give the bits of the whole
/// kernel at the same level (`Kernels::attend_f16`).
#[derive(Clone, Copy)]
pub struct AttendF16Steps {
    /// Scores of the rows over their span `lo..lo + n` ([`AttendF16::span`]) into
    /// `ps[r * n + j]`, −∞ where row `r` does not see key `lo + j`; the last argument is
    /// scratch space for the rows' queries (`rows × head_dim` values).
    pub scores: fn(&AttendF16, &mut [f32], &mut [f32]),
    /// Row `r`'s scores over the whole span become its weights (softmax, rounded to f16).
    pub weights: fn(&AttendF16, usize, &mut [f32]),
    /// Output columns `c0..c0 + w` of every row from the weights `ps` (as `weights` left
    /// them), into `out[r * w + c - c0]`, `w = out.len() / rows`. `c0` and `w` are
    /// multiples of 16, or the whole row (`c0 = 0`, `w = head_dim`).
    pub values: fn(&AttendF16, &[f32], usize, &mut [f32]),
}

/// An attention score from its dot product: `dot · scale`, soft-capped when `softcap > 0`
/// (the order every decoder attention kernel uses).
#[inline]
pub fn scaled_score(dot: f32, scale: f32, softcap: f32) -> f32 {
    let s = dot * scale;
    if softcap > 0.0 {
        soft_cap(s, softcap)
    } else {
        s
    }
}

/// `cap · tanh(x / cap)` as ggml computes it (a scale by `1/cap`, tanh, a scale by `cap`).
#[inline]
pub fn soft_cap(x: f32, cap: f32) -> f32 {
    (x * (1.0 / cap)).tanh() * cap
}

/// The starting values of a product's output rows: `bias` (if any) followed by zeros up to
/// `len` (the padded row count of a packed weight matrix).
pub(crate) fn padded_bias(bias: Option<&[f32]>, len: usize) -> Vec<f32> {
    let mut init = vec![0f32; len];
    if let Some(bias) = bias {
        init[..bias.len()].copy_from_slice(bias);
    }
    init
}

/// Typed view of a weight matrix's blocks.
#[derive(Clone, Copy)]
pub enum Blocks<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    Q4_0(&'a [BlockQ4_0]),
    Q4_1(&'a [BlockQ4_1]),
    Q5_0(&'a [BlockQ5_0]),
    Q5_1(&'a [BlockQ5_1]),
    Q8_0(&'a [BlockQ8_0]),
    Q4K(&'a [BlockQ4K]),
    Q5K(&'a [BlockQ5K]),
    Q6K(&'a [BlockQ6K]),
    Q2K(&'a [BlockQ2K]),
    Q3K(&'a [BlockQ3K]),
    IQ4NL(&'a [BlockIQ4NL]),
    IQ4XS(&'a [BlockIQ4XS]),
    /// Q4_0 rows in groups of eight (see [`QMatrix::interleave`]).
    Q4_0x8(&'a [Nibbles8]),
    /// IQ4_NL rows in groups of eight.
    IQ4NLx8(&'a [Nibbles8]),
    /// Q4_1 rows in groups of eight.
    Q4_1x8(&'a [NibblesMin8]),
    /// Q5_0 rows in groups of eight.
    Q5_0x8(&'a [NibblesQh8]),
    /// Q4_K rows in groups of eight.
    Q4Kx8(&'a [Q4K8]),
    /// Q5_K rows in groups of eight.
    Q5Kx8(&'a [Q5K8]),
    /// IQ4_XS rows in groups of eight.
    IQ4XSx8(&'a [IQ4XS8]),
    /// Q3_K rows in groups of eight.
    Q3Kx8(&'a [Q3K8]),
    /// Q2_K rows in groups of eight.
    Q2Kx8(&'a [Q2K8]),
}

impl<'a> Blocks<'a> {
    /// Rows `r0..r0 + n` of a matrix of `rows` rows: a row is `len / rows` elements, and a
    /// group of eight rows (the `…x8` variants) is `8 · len / rows`, so `r0` and `r0 + n` must
    /// be multiples of 8 there.
    fn rows(self, rows: usize, r0: usize, n: usize) -> Blocks<'a> {
        assert!(r0 + n <= rows, "rows out of range");
        macro_rules! cut {
            ($($plain:ident),* ; $($grouped:ident),*) => {
                match self {
                    $(Blocks::$plain(x) => {
                        let per = x.len() / rows;
                        Blocks::$plain(&x[r0 * per..(r0 + n) * per])
                    })*
                    $(Blocks::$grouped(x) => {
                        assert!(r0 % 8 == 0 && n % 8 == 0, "grouped rows cut inside a group");
                        let per = x.len() / (rows / 8);
                        Blocks::$grouped(&x[r0 / 8 * per..(r0 + n) / 8 * per])
                    })*
                }
            };
        }
        cut!(F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4K, Q5K, Q6K, Q2K, Q3K, IQ4NL, IQ4XS;
             Q4_0x8, IQ4NLx8, Q4_1x8, Q5_0x8, Q4Kx8, Q5Kx8, IQ4XSx8, Q3Kx8, Q2Kx8)
    }
}

/// A row-major matrix of `rows` rows of `cols` weights, borrowed from the model file.
#[derive(Clone, Copy)]
pub struct QMatrix<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub blocks: Blocks<'a>,
}

fn cast<'a, T: bytemuck::Pod>(
    name: &str,
    ty: GgmlType,
    bytes: &'a [u8],
) -> Result<&'a [T], QuantError> {
    bytemuck::try_cast_slice(bytes).map_err(|_| QuantError::Misaligned {
        name: name.to_string(),
        ty,
    })
}

impl<'a> QMatrix<'a> {
    /// Wraps `bytes` holding `rows` rows of `cols` values of type `ty`.
    pub fn new(
        name: &str,
        ty: GgmlType,
        cols: usize,
        rows: usize,
        bytes: &'a [u8],
    ) -> Result<Self, QuantError> {
        let bl = ty.block_len() as usize;
        let expected = (cols / bl)
            .checked_mul(rows)
            .and_then(|n| n.checked_mul(ty.block_bytes() as usize));
        if !cols.is_multiple_of(bl) || expected != Some(bytes.len()) {
            return Err(QuantError::BadLength {
                name: name.into(),
                ty,
                rows,
                cols,
                len: bytes.len(),
            });
        }
        let blocks = match ty {
            GgmlType::F32 => Blocks::F32(cast(name, ty, bytes)?),
            GgmlType::F16 => Blocks::F16(cast(name, ty, bytes)?),
            GgmlType::BF16 => Blocks::BF16(cast(name, ty, bytes)?),
            GgmlType::Q4_0 => Blocks::Q4_0(cast(name, ty, bytes)?),
            GgmlType::Q4_1 => Blocks::Q4_1(cast(name, ty, bytes)?),
            GgmlType::Q5_0 => Blocks::Q5_0(cast(name, ty, bytes)?),
            GgmlType::Q5_1 => Blocks::Q5_1(cast(name, ty, bytes)?),
            GgmlType::Q8_0 => Blocks::Q8_0(cast(name, ty, bytes)?),
            GgmlType::Q4_K => Blocks::Q4K(cast(name, ty, bytes)?),
            GgmlType::Q5_K => Blocks::Q5K(cast(name, ty, bytes)?),
            GgmlType::Q6_K => Blocks::Q6K(cast(name, ty, bytes)?),
            GgmlType::Q2_K => Blocks::Q2K(cast(name, ty, bytes)?),
            GgmlType::Q3_K => Blocks::Q3K(cast(name, ty, bytes)?),
            GgmlType::IQ4_NL => Blocks::IQ4NL(cast(name, ty, bytes)?),
            GgmlType::IQ4_XS => Blocks::IQ4XS(cast(name, ty, bytes)?),
            _ => {
                return Err(QuantError::Unsupported {
                    name: name.into(),
                    ty,
                })
            }
        };
        Ok(QMatrix {
            ty,
            rows,
            cols,
            blocks,
        })
    }

    /// This matrix's blocks in the layout the level's decoding kernels read fastest, where
    /// the level has one for the type (Q4_0, IQ4_NL, Q4_1, Q5_0, Q4_K, Q5_K, IQ4_XS, Q3_K and
    /// Q2_K at `avx2`/`avx512`/`amx`: eight rows side by side, [`Nibbles8`], [`NibblesMin8`],
    /// [`NibblesQh8`], [`Q4K8`], [`Q5K8`], [`IQ4XS8`], [`Q3K8`] and [`Q2K8`]) and the
    /// rows come in whole groups of eight; `None` otherwise. The file's bytes reordered
    /// (Q4_K's, Q5_K's and IQ4_XS's scales also unpacked to bytes), as 16-bit words (every
    /// group is 2-byte aligned); [`QMatrix::from_interleaved`] reads them.
    pub fn interleave(&self) -> Option<Vec<u16>> {
        let k = dispatch::kernels();
        if !self.rows.is_multiple_of(8) {
            return None;
        }
        let nb = self.cols / QK;
        match self.blocks {
            Blocks::Q4_0(w) if k.gemm_q4_0x8.is_some() => {
                Some(bytemuck::cast_vec(interleave8(w, nb)))
            }
            Blocks::IQ4NL(w) if k.gemm_iq4_nlx8.is_some() => {
                Some(bytemuck::cast_vec(interleave8(w, nb)))
            }
            Blocks::Q4_1(w) if k.gemm_q4_1x8.is_some() => {
                Some(bytemuck::cast_vec(interleave8(w, nb)))
            }
            Blocks::Q5_0(w) if k.gemm_q5_0x8.is_some() => {
                Some(bytemuck::cast_vec(interleave8(w, nb)))
            }
            Blocks::Q4K(w) if k.gemm_q4_kx8.is_some() => {
                Some(bytemuck::cast_vec(interleave8(w, self.cols / QK_K)))
            }
            Blocks::Q5K(w) if k.gemm_q5_kx8.is_some() => {
                Some(bytemuck::cast_vec(interleave8(w, self.cols / QK_K)))
            }
            Blocks::IQ4XS(w) if k.gemm_iq4_xsx8.is_some() => {
                Some(bytemuck::cast_vec(interleave8(w, self.cols / QK_K)))
            }
            Blocks::Q3K(w) if k.gemm_q3_kx8.is_some() => {
                Some(bytemuck::cast_vec(interleave8(w, self.cols / QK_K)))
            }
            Blocks::Q2K(w) if k.gemm_q2_kx8.is_some() => {
                Some(bytemuck::cast_vec(interleave8(w, self.cols / QK_K)))
            }
            _ => None,
        }
    }

    /// A `ty` (Q4_0, IQ4_NL, Q4_1, Q5_0, Q4_K, Q5_K, IQ4_XS, Q3_K or Q2_K) matrix from its
    /// blocks as [`QMatrix::interleave`] made them.
    pub fn from_interleaved(
        name: &str,
        ty: GgmlType,
        cols: usize,
        rows: usize,
        words: &'a [u16],
    ) -> Result<Self, QuantError> {
        let fits = |block_len: usize, group: usize| {
            cols.is_multiple_of(block_len)
                && rows.is_multiple_of(8)
                && std::mem::size_of_val(words) == rows / 8 * (cols / block_len) * group
        };
        let blocks = match ty {
            GgmlType::Q4_0 if fits(QK, size_of::<Nibbles8>()) => {
                Blocks::Q4_0x8(bytemuck::cast_slice(words))
            }
            GgmlType::IQ4_NL if fits(QK, size_of::<Nibbles8>()) => {
                Blocks::IQ4NLx8(bytemuck::cast_slice(words))
            }
            GgmlType::Q4_1 if fits(QK, size_of::<NibblesMin8>()) => {
                Blocks::Q4_1x8(bytemuck::cast_slice(words))
            }
            GgmlType::Q5_0 if fits(QK, size_of::<NibblesQh8>()) => {
                Blocks::Q5_0x8(bytemuck::cast_slice(words))
            }
            GgmlType::Q4_K if fits(QK_K, size_of::<Q4K8>()) => {
                Blocks::Q4Kx8(bytemuck::cast_slice(words))
            }
            GgmlType::Q5_K if fits(QK_K, size_of::<Q5K8>()) => {
                Blocks::Q5Kx8(bytemuck::cast_slice(words))
            }
            GgmlType::IQ4_XS if fits(QK_K, size_of::<IQ4XS8>()) => {
                Blocks::IQ4XSx8(bytemuck::cast_slice(words))
            }
            GgmlType::Q3_K if fits(QK_K, size_of::<Q3K8>()) => {
                Blocks::Q3Kx8(bytemuck::cast_slice(words))
            }
            GgmlType::Q2_K if fits(QK_K, size_of::<Q2K8>()) => {
                Blocks::Q2Kx8(bytemuck::cast_slice(words))
            }
            GgmlType::Q4_0
            | GgmlType::IQ4_NL
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q4_K
            | GgmlType::Q5_K
            | GgmlType::IQ4_XS
            | GgmlType::Q3_K
            | GgmlType::Q2_K => {
                return Err(QuantError::BadLength {
                    name: name.into(),
                    ty,
                    rows,
                    cols,
                    len: std::mem::size_of_val(words),
                })
            }
            _ => {
                return Err(QuantError::Unsupported {
                    name: name.into(),
                    ty,
                })
            }
        };
        Ok(QMatrix {
            ty,
            rows,
            cols,
            blocks,
        })
    }

    /// The activation format this weight type multiplies with.
    pub fn act_type(&self) -> ActType {
        match self.blocks {
            Blocks::F32(_) => ActType::F32,
            Blocks::F16(_) => ActType::F16,
            Blocks::BF16(_) => ActType::BF16,
            Blocks::Q4_0(_)
            | Blocks::Q5_0(_)
            | Blocks::Q8_0(_)
            | Blocks::IQ4NL(_)
            | Blocks::Q4_0x8(_)
            | Blocks::IQ4NLx8(_)
            | Blocks::Q5_0x8(_) => ActType::Q8_0,
            Blocks::Q4_1(_) | Blocks::Q5_1(_) | Blocks::Q4_1x8(_) => ActType::Q8_1,
            Blocks::Q4K(_)
            | Blocks::Q5K(_)
            | Blocks::Q6K(_)
            | Blocks::Q2K(_)
            | Blocks::Q3K(_)
            | Blocks::IQ4XS(_)
            | Blocks::Q4Kx8(_)
            | Blocks::Q5Kx8(_)
            | Blocks::IQ4XSx8(_)
            | Blocks::Q3Kx8(_)
            | Blocks::Q2Kx8(_) => ActType::Q8K,
        }
    }

    /// Dequantizes row `r` into `out` (`cols` floats).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let n = self.cols / self.ty.block_len() as usize;
        let rng = r * n..(r + 1) * n;
        let out = &mut out[..self.cols];
        match self.blocks {
            Blocks::F32(x) => out.copy_from_slice(&x[rng]),
            Blocks::F16(x) => reference::dequantize_row_f16(&x[rng], out),
            Blocks::BF16(x) => reference::dequantize_row_bf16(&x[rng], out),
            Blocks::Q4_0(x) => reference::dequantize_row_q4_0(&x[rng], out),
            Blocks::Q4_1(x) => reference::dequantize_row_q4_1(&x[rng], out),
            Blocks::Q5_0(x) => reference::dequantize_row_q5_0(&x[rng], out),
            Blocks::Q5_1(x) => reference::dequantize_row_q5_1(&x[rng], out),
            Blocks::Q8_0(x) => reference::dequantize_row_q8_0(&x[rng], out),
            Blocks::Q4K(x) => reference::dequantize_row_q4_k(&x[rng], out),
            Blocks::Q5K(x) => reference::dequantize_row_q5_k(&x[rng], out),
            Blocks::Q6K(x) => reference::dequantize_row_q6_k(&x[rng], out),
            Blocks::Q2K(x) => reference::dequantize_row_q2_k(&x[rng], out),
            Blocks::Q3K(x) => reference::dequantize_row_q3_k(&x[rng], out),
            Blocks::IQ4NL(x) => reference::dequantize_row_iq4_nl(&x[rng], out),
            Blocks::IQ4XS(x) => reference::dequantize_row_iq4_xs(&x[rng], out),
            Blocks::Q4_0x8(x) => {
                grouped_row::<BlockQ4_0>(x, n, r, out, reference::dequantize_row_q4_0)
            }
            Blocks::IQ4NLx8(x) => {
                grouped_row::<BlockIQ4NL>(x, n, r, out, reference::dequantize_row_iq4_nl)
            }
            Blocks::Q4_1x8(x) => {
                grouped_row::<BlockQ4_1>(x, n, r, out, reference::dequantize_row_q4_1)
            }
            Blocks::Q5_0x8(x) => {
                grouped_row::<BlockQ5_0>(x, n, r, out, reference::dequantize_row_q5_0)
            }
            Blocks::Q4Kx8(x) => {
                grouped_row::<BlockQ4K>(x, n, r, out, reference::dequantize_row_q4_k)
            }
            Blocks::Q5Kx8(x) => {
                grouped_row::<BlockQ5K>(x, n, r, out, reference::dequantize_row_q5_k)
            }
            Blocks::IQ4XSx8(x) => {
                grouped_row::<BlockIQ4XS>(x, n, r, out, reference::dequantize_row_iq4_xs)
            }
            Blocks::Q3Kx8(x) => {
                grouped_row::<BlockQ3K>(x, n, r, out, reference::dequantize_row_q3_k)
            }
            Blocks::Q2Kx8(x) => {
                grouped_row::<BlockQ2K>(x, n, r, out, reference::dequantize_row_q2_k)
            }
        }
    }

    /// Rows `r0..r0 + n` as a matrix of their own (on grouped rows, whole groups).
    pub fn row_range(&self, r0: usize, n: usize) -> QMatrix<'a> {
        QMatrix {
            rows: n,
            blocks: self.blocks.rows(self.rows, r0, n),
            ..*self
        }
    }

    /// `out[t][r] = dot(row r, activation t)` for every token `t` in `acts` and row `r`.
    /// `out` has `acts.n_tokens() * self.rows` floats; `scratch` is reused between calls.
    pub fn matmul(&self, acts: &Activations, out: &mut [f32], scratch: &mut Vec<f32>) {
        assert_eq!(
            acts.cols, self.cols,
            "activation width must match the matrix"
        );
        assert_eq!(
            acts.ty,
            Some(self.act_type()),
            "activations quantized for another type"
        );
        let n_tok = acts.n_tokens;
        let out = &mut out[..n_tok * self.rows];
        let mut t0 = acts.staged.n_tok();
        if t0 > 0 && !self.tiles_i8(acts, &mut out[..t0 * self.rows]) {
            t0 = 0;
        }
        let p = acts.prefill_tokens;
        if t0 == 0 && p > 0 && self.prefill(acts, p, &mut out[..p * self.rows], scratch) {
            t0 = p;
        }
        if t0 < n_tok {
            self.products(acts, t0, &mut out[t0 * self.rows..], scratch);
        }
    }

    /// The product of tokens `t0..` of `acts` on the dot-product kernels (`out` holds their
    /// results only).
    fn products(&self, acts: &Activations, t0: usize, out: &mut [f32], scratch: &mut Vec<f32>) {
        let k = dispatch::kernels();
        let n_tok = acts.n_tokens - t0;
        let cols = self.cols;
        match self.blocks {
            Blocks::F32(w) if n_tok >= 3 => {
                rows_f32_tiled(w, &acts.f32[t0 * cols..], cols, n_tok, k, out, scratch)
            }
            Blocks::F32(w) => rows_dot(
                w,
                &acts.f32[t0 * cols..],
                cols,
                n_tok,
                k.dot_f32,
                out,
                scratch,
            ),
            Blocks::F16(w) => rows_dot(
                w,
                &acts.f16[t0 * cols..],
                cols,
                n_tok,
                k.dot_f16,
                out,
                scratch,
            ),
            Blocks::BF16(w) => rows_dot(
                w,
                &acts.bf16[t0 * cols..],
                cols,
                n_tok,
                k.dot_bf16,
                out,
                scratch,
            ),
            Blocks::Q4_0(w) => {
                rows_tiled(w, acts.q8_0_blocks(t0), n_tok, k.gemm_q4_0, out, scratch)
            }
            Blocks::Q4_1(w) => {
                rows_tiled(w, acts.q8_1_blocks(t0), n_tok, k.gemm_q4_1, out, scratch)
            }
            Blocks::Q5_0(w) => {
                rows_tiled(w, acts.q8_0_blocks(t0), n_tok, k.gemm_q5_0, out, scratch)
            }
            Blocks::Q5_1(w) => {
                rows_tiled(w, acts.q8_1_blocks(t0), n_tok, k.gemm_q5_1, out, scratch)
            }
            Blocks::IQ4NL(w) => {
                rows_tiled(w, acts.q8_0_blocks(t0), n_tok, k.gemm_iq4_nl, out, scratch)
            }
            Blocks::Q8_0(w) => {
                rows_tiled(w, acts.q8_0_blocks(t0), n_tok, k.gemm_q8_0, out, scratch)
            }
            Blocks::Q4K(w) => rows_tiled(w, acts.q8k_blocks(t0), n_tok, k.gemm_q4_k, out, scratch),
            Blocks::Q5K(w) => rows_tiled(w, acts.q8k_blocks(t0), n_tok, k.gemm_q5_k, out, scratch),
            Blocks::Q6K(w) => rows_tiled(w, acts.q8k_blocks(t0), n_tok, k.gemm_q6_k, out, scratch),
            Blocks::Q2K(w) => rows_tiled(w, acts.q8k_blocks(t0), n_tok, k.gemm_q2_k, out, scratch),
            Blocks::Q3K(w) => rows_tiled(w, acts.q8k_blocks(t0), n_tok, k.gemm_q3_k, out, scratch),
            Blocks::IQ4XS(w) => {
                rows_tiled(w, acts.q8k_blocks(t0), n_tok, k.gemm_iq4_xs, out, scratch)
            }
            Blocks::Q4_0x8(w) => {
                let a = acts.q8_0_blocks(t0);
                grouped_products(w, a, n_tok, k.gemm_q4_0x8, k.gemm_q4_0, out, scratch)
            }
            Blocks::IQ4NLx8(w) => {
                let a = acts.q8_0_blocks(t0);
                grouped_products(w, a, n_tok, k.gemm_iq4_nlx8, k.gemm_iq4_nl, out, scratch)
            }
            Blocks::Q4_1x8(w) => {
                let a = acts.q8_1_blocks(t0);
                grouped_products(w, a, n_tok, k.gemm_q4_1x8, k.gemm_q4_1, out, scratch)
            }
            Blocks::Q5_0x8(w) => {
                let a = acts.q8_0_blocks(t0);
                grouped_products(w, a, n_tok, k.gemm_q5_0x8, k.gemm_q5_0, out, scratch)
            }
            Blocks::Q4Kx8(w) => {
                let a = acts.q8k_blocks(t0);
                grouped_products(w, a, n_tok, k.gemm_q4_kx8, k.gemm_q4_k, out, scratch)
            }
            Blocks::Q5Kx8(w) => {
                let a = acts.q8k_blocks(t0);
                grouped_products(w, a, n_tok, k.gemm_q5_kx8, k.gemm_q5_k, out, scratch)
            }
            Blocks::IQ4XSx8(w) => {
                let a = acts.q8k_blocks(t0);
                grouped_products(w, a, n_tok, k.gemm_iq4_xsx8, k.gemm_iq4_xs, out, scratch)
            }
            Blocks::Q3Kx8(w) => {
                let a = acts.q8k_blocks(t0);
                grouped_products(w, a, n_tok, k.gemm_q3_kx8, k.gemm_q3_k, out, scratch)
            }
            Blocks::Q2Kx8(w) => {
                let a = acts.q8k_blocks(t0);
                grouped_products(w, a, n_tok, k.gemm_q2_kx8, k.gemm_q2_k, out, scratch)
            }
        }
    }
}

impl QMatrix<'_> {
    /// The product of the first `p` tokens (prompt tokens: see
    /// [`Activations::quantize_split`]) on this level's prefill kernels, which reuse each
    /// weight row for many tokens; false where the type has none (its tokens then take the
    /// dot-product kernels).
    fn prefill(
        &self,
        acts: &Activations,
        p: usize,
        out: &mut [f32],
        scratch: &mut Vec<f32>,
    ) -> bool {
        let k = dispatch::kernels();
        let cols = self.cols;
        match self.blocks {
            Blocks::Q4_0(w) => match k.prefill_q4_0 {
                Some(g) => rows_panels(w, acts.q8_0_first(p), p, g, out),
                None => return false,
            },
            Blocks::Q4_1(w) => match k.prefill_q4_1 {
                Some(g) => rows_panels(w, acts.q8_1_first(p), p, g, out),
                None => return false,
            },
            Blocks::Q5_0(w) => match k.prefill_q5_0 {
                Some(g) => rows_panels(w, acts.q8_0_first(p), p, g, out),
                None => return false,
            },
            Blocks::Q5_1(w) => match k.prefill_q5_1 {
                Some(g) => rows_panels(w, acts.q8_1_first(p), p, g, out),
                None => return false,
            },
            Blocks::Q8_0(w) => match k.prefill_q8_0 {
                Some(g) => rows_panels(w, acts.q8_0_first(p), p, g, out),
                None => return false,
            },
            Blocks::IQ4NL(w) => match k.prefill_iq4_nl {
                Some(g) => rows_panels(w, acts.q8_0_first(p), p, g, out),
                None => return false,
            },
            Blocks::Q4K(w) => match k.prefill_q4_k {
                Some(g) => rows_panels(w, acts.q8k_first(p), p, g, out),
                None => return false,
            },
            Blocks::Q6K(w) => match k.prefill_q6_k {
                Some(g) => rows_panels(w, acts.q8k_first(p), p, g, out),
                None => return false,
            },
            Blocks::Q5K(w) => match k.prefill_q5_k {
                Some(g) => rows_panels(w, acts.q8k_first(p), p, g, out),
                None => return false,
            },
            Blocks::Q2K(w) => match k.prefill_q2_k {
                Some(g) => rows_panels(w, acts.q8k_first(p), p, g, out),
                None => return false,
            },
            Blocks::Q3K(w) => match k.prefill_q3_k {
                Some(g) => rows_panels(w, acts.q8k_first(p), p, g, out),
                None => return false,
            },
            Blocks::IQ4XS(w) => match k.prefill_iq4_xs {
                Some(g) => rows_panels(w, acts.q8k_first(p), p, g, out),
                None => return false,
            },
            Blocks::Q4_0x8(w) => {
                return group_prompt::<BlockQ4_0, _>(
                    w,
                    acts.q8_0_first(p),
                    p,
                    k.prefill_q4_0x8,
                    k.prefill_q4_0,
                    out,
                )
            }
            Blocks::IQ4NLx8(w) => {
                return group_prompt::<BlockIQ4NL, _>(
                    w,
                    acts.q8_0_first(p),
                    p,
                    k.prefill_iq4_nlx8,
                    k.prefill_iq4_nl,
                    out,
                )
            }
            Blocks::Q5_0x8(w) => {
                return group_prompt::<BlockQ5_0, _>(
                    w,
                    acts.q8_0_first(p),
                    p,
                    k.prefill_q5_0x8,
                    k.prefill_q5_0,
                    out,
                )
            }
            Blocks::Q4_1x8(w) => {
                return group_prompt::<BlockQ4_1, _>(
                    w,
                    acts.q8_1_first(p),
                    p,
                    k.prefill_q4_1x8,
                    k.prefill_q4_1,
                    out,
                )
            }
            Blocks::Q4Kx8(w) => {
                return group_prompt::<BlockQ4K, _>(
                    w,
                    acts.q8k_first(p),
                    p,
                    k.prefill_q4_kx8,
                    k.prefill_q4_k,
                    out,
                )
            }
            Blocks::Q5Kx8(w) => {
                return group_prompt::<BlockQ5K, _>(
                    w,
                    acts.q8k_first(p),
                    p,
                    k.prefill_q5_kx8,
                    k.prefill_q5_k,
                    out,
                )
            }
            Blocks::IQ4XSx8(w) => {
                return group_prompt::<BlockIQ4XS, _>(
                    w,
                    acts.q8k_first(p),
                    p,
                    k.prefill_iq4_xsx8,
                    k.prefill_iq4_xs,
                    out,
                )
            }
            Blocks::Q3Kx8(w) => {
                return group_prompt::<BlockQ3K, _>(
                    w,
                    acts.q8k_first(p),
                    p,
                    k.prefill_q3_kx8,
                    k.prefill_q3_k,
                    out,
                )
            }
            Blocks::Q2Kx8(w) => {
                return group_prompt::<BlockQ2K, _>(
                    w,
                    acts.q8k_first(p),
                    p,
                    k.prefill_q2_kx8,
                    k.prefill_q2_k,
                    out,
                )
            }
            Blocks::F16(w) if p >= 3 => {
                let a = &acts.f16[..p * cols];
                match k.float_tiles {
                    Some(ft) => match ft.f16_dots {
                        Some(dots) => rows_float_dots(w, a, cols, dots, out),
                        None => rows_float_tiles(w, a, cols, ft, ft.widen_f16, out, scratch),
                    },
                    None => {
                        let widen = reference::dequantize_row_f16;
                        rows_widened_tiled(w, a, cols, k, out, scratch, widen)
                    }
                }
            }
            Blocks::BF16(w) if p >= 3 => {
                let a = &acts.bf16[..p * cols];
                match k.float_tiles {
                    Some(ft) => rows_float_tiles(w, a, cols, ft, ft.widen_bf16, out, scratch),
                    None => {
                        let widen = reference::dequantize_row_bf16;
                        rows_widened_tiled(w, a, cols, k, out, scratch, widen)
                    }
                }
            }
            _ => return false,
        }
        true
    }

    /// The product on AMX-INT8 tiles from staged activations; false for float weights.
    fn tiles_i8(&self, acts: &Activations, out: &mut [f32]) -> bool {
        let (a, rows) = (&acts.staged, self.rows);
        match self.blocks {
            Blocks::Q4_0(w) => i8mat::matmul(w, rows, a, out),
            Blocks::Q4_1(w) => i8mat::matmul(w, rows, a, out),
            Blocks::Q5_0(w) => i8mat::matmul(w, rows, a, out),
            Blocks::Q5_1(w) => i8mat::matmul(w, rows, a, out),
            Blocks::Q8_0(w) => i8mat::matmul(w, rows, a, out),
            Blocks::Q4K(w) => i8mat::matmul(w, rows, a, out),
            Blocks::Q5K(w) => i8mat::matmul(w, rows, a, out),
            Blocks::Q2K(w) => i8mat::matmul(w, rows, a, out),
            Blocks::Q3K(w) => i8mat::matmul(w, rows, a, out),
            Blocks::IQ4NL(w) => i8mat::matmul(w, rows, a, out),
            Blocks::IQ4XS(w) => i8mat::matmul(w, rows, a, out),
            Blocks::Q4_0x8(w) => i8mat::matmul_grouped::<BlockQ4_0>(w, rows, a, out),
            Blocks::IQ4NLx8(w) => i8mat::matmul_grouped::<BlockIQ4NL>(w, rows, a, out),
            Blocks::Q4_1x8(w) => i8mat::matmul_grouped::<BlockQ4_1>(w, rows, a, out),
            Blocks::Q5_0x8(w) => i8mat::matmul_grouped::<BlockQ5_0>(w, rows, a, out),
            Blocks::Q4Kx8(w) => i8mat::matmul_grouped::<BlockQ4K>(w, rows, a, out),
            Blocks::Q5Kx8(w) => i8mat::matmul_grouped::<BlockQ5K>(w, rows, a, out),
            Blocks::IQ4XSx8(w) => i8mat::matmul_grouped::<BlockIQ4XS>(w, rows, a, out),
            Blocks::Q3Kx8(w) => i8mat::matmul_grouped::<BlockQ3K>(w, rows, a, out),
            Blocks::Q2Kx8(w) => i8mat::matmul_grouped::<BlockQ2K>(w, rows, a, out),
            // Q6_K's 16-value groups cannot fold their scales into the bytes (`q·scale`
            // overflows), so its tiles scale every 16×16 result per group and trail the
            // AVX-512 panels at every prompt length (Xeon family 6 model 207, `qmatmul 1
            // Q6_K N 2048x5632`, GMAC/s tiles / panels: 16 tokens 80 / 118, 64 tokens 139 /
            // 185, 256 tokens 170 / 212): Q6_K prompts take the panels (a type's choice, so
            // a token's numbers still never depend on its batch).
            Blocks::Q6K(_) => return false,
            // Float weights take their own tiles.
            Blocks::F32(_) | Blocks::F16(_) | Blocks::BF16(_) => return false,
        }
        true
    }
}

/// Several products of the same activations (Q, K and V of one input; gate and up) into
/// their own results. Decoding one token, they run as one pool job whose tasks are ranges
/// of rows of all the matrices: a small model's token is hundreds of products of a few
/// microseconds each, and each job costs a hand-over to the workers and a wait for the
/// last of them. Every row goes through the same kernel as in [`QMatrix::matmul`], so the
/// results are the same bits. Otherwise (prompts, one thread, AMX tiles), one after another.
pub fn matmul_many(mats: &mut [(QMatrix, &mut [f32])], acts: &Activations, scratch: &mut Vec<f32>) {
    // At most `MAX_TASKS` tasks, kept on the stack: decoding allocates nothing per token.
    const MAX_TASKS: usize = 32;
    let one_job = (2..=MAX_TASKS / 2).contains(&mats.len())
        && pool::threads() > 1
        && acts.n_tokens == 1
        && acts.staged.n_tok() == 0
        && acts.prefill_tokens == 0;
    if !one_job {
        for (m, out) in mats.iter_mut() {
            m.matmul(acts, out, scratch);
        }
        return;
    }
    for (m, out) in mats.iter() {
        assert_eq!(acts.cols, m.cols, "activation width must match the matrix");
        assert_eq!(
            acts.ty,
            Some(m.act_type()),
            "activations quantized for another type"
        );
        assert!(out.len() >= m.rows, "result smaller than the matrix's rows");
    }
    let total: usize = mats.iter().map(|(m, _)| m.rows).sum();
    // Whole groups of eight rows (16: a panel) per task, about two tasks per thread
    // overall; each matrix's last task may be short, so at most `total / chunk + len`.
    let chunk = (total / (pool::threads() * 2))
        .max(total.div_ceil(MAX_TASKS - mats.len()))
        .max(16)
        .next_multiple_of(16);
    type Task<'m, 'o> = (Option<QMatrix<'m>>, std::sync::Mutex<Option<&'o mut [f32]>>);
    let mut tasks: [Task; MAX_TASKS] = std::array::from_fn(|_| (None, std::sync::Mutex::new(None)));
    let mut n_tasks = 0;
    for (m, out) in mats.iter_mut() {
        let mut rest: &mut [f32] = &mut out[..m.rows];
        let mut r0 = 0;
        while r0 < m.rows {
            let n = chunk.min(m.rows - r0);
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(n);
            tasks[n_tasks] = (Some(m.row_range(r0, n)), std::sync::Mutex::new(Some(part)));
            n_tasks += 1;
            rest = tail;
            r0 += n;
        }
    }
    // Inside a task the product's own pool calls run inline (nested jobs do).
    pool::run(n_tasks, |i| {
        let (Some(m), out) = &tasks[i] else {
            unreachable!("tasks 0..n_tasks are filled")
        };
        let out = out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .expect("each task runs once");
        m.matmul(acts, out, &mut Vec::new());
    });
}

/// Rows per parallel work item: two items per thread. Each item is a pool task (a shared
/// counter bumped across cores) and a new weight stream for the prefetcher, and decoding
/// is thousands of products a second: measured on 2 threads (Zen 5, avx512 and avx2), 8
/// items per thread (at most 256 rows each) left ~20% of the time in the pool, and 2 with
/// no cap decoded SmolLM2 1.2–1.4× and Gemma3 1.1–1.3× faster, prompts as fast or faster.
/// Two rather than one: a thread the OS holds up leaves a quarter of the rows to the other,
/// not half.
fn rows_per_task(rows: usize) -> usize {
    let threads = pool::threads();
    (rows / (threads * 2)).max(8).next_multiple_of(4)
}

/// Dot every weight row (`per_row` units of `W`) with every activation row (`per_row` units of `A`).
fn rows_dot<W: Sync, A: Sync>(
    w: &[W],
    a: &[A],
    per_row: usize,
    n_tok: usize,
    dot: fn(&[W], &[A]) -> f32,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    rows_gemm(w, per_row, n_tok, out, scratch, |w, o| {
        reference::gemm_by_dot(w, a, per_row, n_tok, dot, o)
    });
}

/// A product through a [`dispatch::Gemm`] kernel (whole rows × all tokens per task).
fn rows_tiled<W: Sync, A: Sync>(
    w: &[W],
    a: ActBlocks<A>,
    n_tok: usize,
    gemm: dispatch::Gemm<W, A>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let nb = a.blocks.len() / n_tok;
    rows_gemm(w, nb, n_tok, out, scratch, |w, o| gemm(w, &a, nb, n_tok, o));
}

/// [`rows_tiled`] for kernels that work on panels of 16 rows: each task gets whole panels.
fn rows_panels<W: Sync, A: Sync>(
    w: &[W],
    a: ActBlocks<A>,
    n_tok: usize,
    prefill: dispatch::Prefill<W, A>,
    out: &mut [f32],
) {
    let nb = a.blocks.len() / n_tok;
    by_panel_tasks(w.len() / nb, n_tok, out, |r0, n, o| {
        prefill(&w[r0 * nb..(r0 + n) * nb], &a, nb, o)
    });
}

/// A prompt product over grouped rows: on the level's panels that read the groups in place
/// (`in_place`), else on its panels for the file's layout with each task's groups put back
/// (`plain`); false where the level has neither.
fn group_prompt<B: Groupable, A: Sync>(
    w: &[B::Group],
    a: ActBlocks<A>,
    p: usize,
    in_place: Option<dispatch::Prefill<B::Group, A>>,
    plain: Option<dispatch::Prefill<B, A>>,
    out: &mut [f32],
) -> bool {
    match (in_place, plain) {
        (Some(g), _) => grouped_panels(w, a, p, g, out),
        (None, Some(g)) => groups_panels::<B, _>(w, a, p, g, out),
        (None, None) => return false,
    }
    true
}

/// [`rows_panels`] for a kernel that reads grouped rows in place: each task takes whole
/// groups (panels of 16 rows start at multiples of 16).
fn grouped_panels<G: Sync, A: Sync>(
    w: &[G],
    a: ActBlocks<A>,
    n_tok: usize,
    prefill: dispatch::Prefill<G, A>,
    out: &mut [f32],
) {
    let nb = a.blocks.len() / n_tok;
    by_panel_tasks(w.len() / nb * 8, n_tok, out, |r0, n, o| {
        prefill(&w[r0 / 8 * nb..(r0 + n) / 8 * nb], &a, nb, o)
    });
}

/// The tasks of a prompt product over `rows` rows: whole panels of 16 rows each (the last
/// may be shorter), `task(r0, n, columns)` writing rows `r0 .. r0 + n` straight into their
/// columns of the token-major result `out`.
fn by_panel_tasks(
    rows: usize,
    n_tok: usize,
    out: &mut [f32],
    task: impl Fn(usize, usize, &mut pool::Columns) + Sync,
) {
    let chunk = rows_per_task(rows).next_multiple_of(16);
    let columns = pool::OutColumns::new(out, n_tok, rows);
    pool::run(rows.div_ceil(chunk), |c| {
        let r0 = c * chunk;
        let n = (rows - r0).min(chunk);
        columns.with(r0, n, |o| task(r0, n, o));
    });
}

/// `w` (`nb` blocks per row) in groups of eight rows: group `g`'s block `b` holds block `b`
/// of rows `8g .. 8g + 8`.
pub fn interleave8<B: Groupable>(w: &[B], nb: usize) -> Vec<B::Group> {
    let groups = w.len() / nb / 8;
    let mut out: Vec<B::Group> = bytemuck::zeroed_vec(groups * nb);
    hearth_gguf::advise_huge_pages(bytemuck::cast_slice_mut(&mut out));
    // On the pool, in tasks of whole groups: regrouping is most of a model's load time.
    let per_task = groups.div_ceil(4 * pool::threads()).max(1);
    pool::for_each_chunk(&mut out, per_task * nb, |task, part| {
        for (i, group) in part.chunks_exact_mut(nb).enumerate() {
            let g = task * per_task + i;
            for r in 0..8 {
                let row = &w[(8 * g + r) * nb..(8 * g + r + 1) * nb];
                for (blk, n) in row.iter().zip(group.iter_mut()) {
                    blk.put(n, r);
                }
            }
        }
    });
    out
}

/// The rows of groups `w` (`nb` blocks per row) back in the file's layout.
pub fn ungroup<B: Groupable>(w: &[B::Group], nb: usize) -> Vec<B> {
    let mut out = vec![B::zeroed(); w.len() * 8];
    ungroup_into(w, nb, &mut out);
    out
}

/// [`ungroup`] into `out` (`8 · w.len()` blocks).
fn ungroup_into<B: Groupable>(w: &[B::Group], nb: usize, out: &mut [B]) {
    for (g, rows) in w.chunks_exact(nb).zip(out.chunks_exact_mut(8 * nb)) {
        for (r, row) in rows.chunks_exact_mut(nb).enumerate() {
            for (n, o) in g.iter().zip(row) {
                *o = B::take(n, r);
            }
        }
    }
}

/// Row `r` of grouped blocks `w` (`nb` per row) dequantized block by block into `out`.
fn grouped_row<B: Groupable>(
    w: &[B::Group],
    nb: usize,
    r: usize,
    out: &mut [f32],
    dequantize: fn(&[B], &mut [f32]),
) {
    let group = &w[r / 8 * nb..(r / 8 + 1) * nb];
    for (n, o) in group.iter().zip(out.chunks_exact_mut(B::LEN)) {
        dequantize(&[B::take(n, r % 8)], o);
    }
}

/// The product of grouped rows: on the level's kernel for them, else (a level without one:
/// only reached when a matrix grouped at another level is used here) each task's rows back
/// in the file's layout on the level's kernel for that.
fn grouped_products<B: Groupable, A: Sync>(
    w: &[B::Group],
    a: ActBlocks<A>,
    n_tok: usize,
    grouped: Option<dispatch::Gemm<B::Group, A>>,
    file: dispatch::Gemm<B, A>,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    match grouped {
        Some(g) => groups_tiled(
            w,
            a,
            n_tok,
            |w, a, nb, o| g(w, a, nb, n_tok, o),
            out,
            scratch,
        ),
        None => groups_tiled(
            w,
            a,
            n_tok,
            |w, a, nb, o| file(&ungroup::<B>(w, nb), a, nb, n_tok, o),
            out,
            scratch,
        ),
    }
}

/// A product over grouped rows in parallel blocks of whole groups: `gemm(groups, acts, nb,
/// results)` fills its rows' results row-major (`n_tok` per row).
fn groups_tiled<G: Sync, A: Sync>(
    w: &[G],
    a: ActBlocks<A>,
    n_tok: usize,
    gemm: impl Fn(&[G], &ActBlocks<A>, usize, &mut [f32]) + Sync,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let nb = a.blocks.len() / n_tok;
    let rows = w.len() / nb * 8;
    let chunk = rows_per_task(rows).next_multiple_of(8);
    by_row_tasks(rows, n_tok, chunk, out, scratch, |r0, o| {
        let n = o.len() / n_tok;
        gemm(&w[r0 / 8 * nb..(r0 + n) / 8 * nb], &a, nb, o)
    });
}

/// [`rows_panels`] over grouped rows: each task puts its groups back in the file's layout
/// (once per product, shared by all its tokens) for the prompt kernels.
fn groups_panels<B: Groupable, A: Sync>(
    w: &[B::Group],
    a: ActBlocks<A>,
    n_tok: usize,
    prefill: dispatch::Prefill<B, A>,
    out: &mut [f32],
) {
    thread_local! {
        /// Each worker's rows in the file's layout, kept between products (a fresh buffer
        /// of this size would be new pages, faulted in, on every call). 16-bit words: every
        /// block type is 2-byte aligned.
        static UNGROUPED: std::cell::RefCell<Vec<u16>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let nb = a.blocks.len() / n_tok;
    by_panel_tasks(w.len() / nb * 8, n_tok, out, |r0, n, o| {
        let groups = &w[r0 / 8 * nb..(r0 + n) / 8 * nb];
        UNGROUPED.with_borrow_mut(|buf| {
            let words = groups.len() * 8 * size_of::<B>() / 2;
            let unpacked: &mut [B] = bytemuck::cast_slice_mut(grown(buf, words));
            ungroup_into(groups, nb, unpacked);
            prefill(unpacked, &a, nb, o);
        });
    });
}

/// The product in parallel blocks of rows: `gemm(rows of w, results)` fills the results of
/// its rows row-major (`n_tok` per row); `out` gets them token-major.
fn rows_gemm<W: Sync>(
    w: &[W],
    per_row: usize,
    n_tok: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
    gemm: impl Fn(&[W], &mut [f32]) + Sync,
) {
    let chunk = rows_per_task(w.len() / per_row);
    rows_gemm_by(w, per_row, n_tok, chunk, out, scratch, gemm)
}

/// [`rows_gemm`] with `chunk` rows per task.
fn rows_gemm_by<W: Sync>(
    w: &[W],
    per_row: usize,
    n_tok: usize,
    chunk: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
    gemm: impl Fn(&[W], &mut [f32]) + Sync,
) {
    by_row_tasks(w.len() / per_row, n_tok, chunk, out, scratch, |r0, o| {
        let n_rows = o.len() / n_tok;
        gemm(&w[r0 * per_row..(r0 + n_rows) * per_row], o)
    });
}

/// The tasks of a product over `rows` rows, `chunk` rows each: `block(r0, results)` fills
/// the results of rows `r0 ..` row-major (`n_tok` per row); `out` gets them token-major.
fn by_row_tasks(
    rows: usize,
    n_tok: usize,
    chunk: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
    block: impl Fn(usize, &mut [f32]) + Sync,
) {
    if n_tok == 1 {
        // One token: row-major is token-major.
        pool::for_each_chunk(out, chunk, |c, o| block(c * chunk, o));
        return;
    }
    by_row_blocks(rows, n_tok, chunk, out, scratch, block);
}

/// F32 product for several tokens in 4-row × 3-token tiles (embedding models, prefill of F32
/// weights); leftover rows and tokens go through the plain dot product.
fn rows_f32_tiled(
    w: &[f32],
    a: &[f32],
    cols: usize,
    n_tok: usize,
    k: &Kernels,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let rows = w.len() / cols;
    let chunk = rows_per_task(rows).next_multiple_of(4);
    by_row_blocks(rows, n_tok, chunk, out, scratch, |r0, o| {
        let n_rows = o.len() / n_tok;
        f32_tiles(&w[r0 * cols..(r0 + n_rows) * cols], a, cols, n_tok, k, o)
    });
}

/// Rows `w` (row-major, `cols` each) × `n_tok` tokens `a` into `o` (row-major, `n_tok` per
/// row): 4-row × 3-token tiles, leftovers by dot products.
fn f32_tiles(w: &[f32], a: &[f32], cols: usize, n_tok: usize, k: &Kernels, o: &mut [f32]) {
    let n_rows = o.len() / n_tok;
    let mut tile = [0f32; 12];
    let full_rows = n_rows / 4 * 4;
    let full_toks = n_tok / 3 * 3;
    for r in (0..full_rows).step_by(4) {
        let wr = &w[r * cols..(r + 4) * cols];
        for t in (0..full_toks).step_by(3) {
            (k.tile_f32_4x3)(wr, &a[t * cols..(t + 3) * cols], cols, &mut tile);
            for i in 0..4 {
                for j in 0..3 {
                    o[(r + i) * n_tok + t + j] = tile[i * 3 + j];
                }
            }
        }
        for t in full_toks..n_tok {
            for i in 0..4 {
                let wi = &wr[i * cols..(i + 1) * cols];
                o[(r + i) * n_tok + t] = (k.dot_f32)(wi, &a[t * cols..(t + 1) * cols]);
            }
        }
    }
    for r in full_rows..n_rows {
        let wr = &w[r * cols..(r + 1) * cols];
        for t in 0..n_tok {
            o[r * n_tok + t] = (k.dot_f32)(wr, &a[t * cols..(t + 1) * cols]);
        }
    }
}

/// A 16-bit float product for several tokens: the activations (rounded to the weights'
/// format) are widened to f32 once, each task widens its weight rows once, and the F32
/// tiles (`tile_f32_4x3`) run over them — exact widenings, so the products the dot
/// kernels see.
fn rows_widened_tiled<W: Sync>(
    w: &[W],
    a: &[W],
    cols: usize,
    k: &Kernels,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
    widen: fn(&[W], &mut [f32]),
) {
    let (rows, n_tok) = (w.len() / cols, a.len() / cols);
    let mut af = vec![0f32; a.len()];
    widen(a, &mut af);
    let chunk = rows_per_task(rows).next_multiple_of(4);
    by_row_blocks(rows, n_tok, chunk, out, scratch, |r0, o| {
        let n_rows = o.len() / n_tok;
        let mut wf = vec![0f32; n_rows * cols];
        widen(&w[r0 * cols..(r0 + n_rows) * cols], &mut wf);
        f32_tiles(&wf, &af, cols, n_tok, k, o);
    });
}

/// A 16-bit float product of prompt tokens on the level's [`dispatch::FloatTiles`]: the
/// tokens widened and transposed once per product in blocks of `ft.tokens`; each task
/// widens its rows once, then for every block of tokens (kept in L2 meanwhile) runs its
/// rows over it a few at a time.
fn rows_float_tiles<W: Sync>(
    w: &[W],
    a: &[W],
    cols: usize,
    ft: dispatch::FloatTiles,
    widen: fn(&[W], &mut [f32]),
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) {
    let (rows, n_tok, tb) = (w.len() / cols, a.len() / cols, ft.tokens);
    let blocks = n_tok.div_ceil(tb);
    // Block b, column k, token i at xt[(b * cols + k) * tb + i] (zeros past n_tok).
    let mut xt = vec![0f32; blocks * cols * tb];
    pool::for_each_chunk(&mut xt, cols * tb, |b, block| {
        let tokens = (n_tok - b * tb).min(tb);
        let mut row = vec![0f32; cols];
        for i in 0..tokens {
            widen(&a[(b * tb + i) * cols..][..cols], &mut row);
            for (k, v) in row.iter().enumerate() {
                block[k * tb + i] = *v;
            }
        }
    });
    let chunk = rows_per_task(rows).next_multiple_of(ft.rows);
    by_row_blocks(rows, n_tok, chunk, out, scratch, |r0, o| {
        let n_rows = o.len() / n_tok;
        // One tile's rows widened at a time, used by every block of tokens while they are
        // in L1: widening a task's rows at once wrote and read back twice the weights'
        // bytes through memory (F16 pp16 at half of llama.cpp's rate).
        let mut wf = vec![0f32; ft.rows * cols];
        for r in (0..n_rows).step_by(ft.rows) {
            let nr = (n_rows - r).min(ft.rows);
            let wf = &mut wf[..nr * cols];
            widen(&w[(r0 + r) * cols..(r0 + r + nr) * cols], wf);
            for b in 0..blocks {
                let (t0, valid) = (b * tb, (n_tok - b * tb).min(tb));
                let block = &xt[b * cols * tb..(b + 1) * cols * tb];
                let o = &mut o[r * n_tok + t0..];
                (ft.tile)(wf, block, cols, o, n_tok, valid);
            }
        }
    });
}

/// An F16 product of prompt tokens on dot-product tiles (`dispatch::FloatDots`), rows and
/// tokens read in place and results written straight into the token-major `out`: each
/// task runs its rows, a tile's worth at a time, past a block of tokens, then the next
/// block.
fn rows_float_dots(w: &[f16], a: &[f16], cols: usize, dots: dispatch::FloatDots, out: &mut [f32]) {
    let (tile_rows, tile_tokens) = (dots.rows, dots.tokens);
    let (rows, n_tok) = (w.len() / cols, a.len() / cols);
    // Tokens in blocks that stay in L2 (256 KiB of 16-bit values) while the task's rows
    // stream past them, each a whole number of tiles; the last block in tiles of
    // `tile_tokens` and then of one fewer where those add up (3s and 2s do for any
    // length), so no tile is left with a token alone: its few FMAs would each wait on
    // their own loads.
    let block = (128 * 1024 / cols / tile_tokens).max(1) * tile_tokens;
    let tiles = |t0: usize, n: usize| {
        let count = n.div_ceil(tile_tokens);
        let full = n
            .checked_sub((tile_tokens - 1) * count)
            .filter(|_| n >= tile_tokens)
            .unwrap_or(count);
        (0..count).map(move |i| {
            let (t, nt) = if i < full {
                (i * tile_tokens, tile_tokens)
            } else {
                let short = tile_tokens - 1;
                (full * tile_tokens + (i - full) * short, short)
            };
            (t0 + t, nt.min(n - t))
        })
    };
    by_panel_tasks(rows, n_tok, out, |r0, n_rows, o| {
        let mut sums = vec![0f32; tile_rows * tile_tokens];
        for t0 in (0..n_tok).step_by(block) {
            let nb = (n_tok - t0).min(block);
            for r in (0..n_rows).step_by(tile_rows) {
                let nr = (n_rows - r).min(tile_rows);
                let wr = &w[(r0 + r) * cols..(r0 + r + nr) * cols];
                for (t, nt) in tiles(t0, nb) {
                    (dots.tile)(wr, &a[t * cols..(t + nt) * cols], cols, &mut sums, nt);
                    for j in 0..nt {
                        let token = &mut o.token(t + j)[r..r + nr];
                        for (i, v) in token.iter_mut().enumerate() {
                            *v = sums[i * nt + j];
                        }
                    }
                }
            }
        }
    });
}

/// The multi-token product skeleton: `block(first_row, results)` fills the results of
/// `chunk` weight rows (row-major, `n_tok` per row) in parallel tasks; `out` gets them
/// token-major.
fn by_row_blocks(
    rows: usize,
    n_tok: usize,
    chunk: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
    block: impl Fn(usize, &mut [f32]) + Sync,
) {
    // Grown only; each task zeroes its own part (in parallel, just before it is used:
    // kernels add into their results).
    if scratch.len() < rows * n_tok {
        scratch.resize(rows * n_tok, 0.0);
    }
    pool::for_each_chunk(&mut scratch[..rows * n_tok], chunk * n_tok, |c, o| {
        o.fill(0.0);
        block(c * chunk, o)
    });
    transpose_into(scratch, rows, n_tok, out);
}

/// `out[t][r] = scratch[r][t]`, in parallel over blocks of tokens: 16 (each row's 16
/// values are one read), fewer when that would leave a thread without a block (a prompt of
/// 16 tokens would otherwise transpose every product on one thread).
fn transpose_into(scratch: &[f32], rows: usize, n_tok: usize, out: &mut [f32]) {
    const TOKENS: usize = 16;
    /// Rows per run: a run's values of one token are one contiguous write.
    const RUN: usize = 8;
    let out = &mut out[..rows * n_tok];
    if n_tok == 1 {
        out.copy_from_slice(&scratch[..rows]);
        return;
    }
    let per_task = TOKENS.min(n_tok.div_ceil(pool::threads())).max(1);
    pool::for_each_chunk(out, rows * per_task, |b, part| {
        let t0 = b * per_task;
        let tokens = part.len() / rows;
        for (run, src) in scratch[..rows * n_tok].chunks(RUN * n_tok).enumerate() {
            let r0 = run * RUN;
            let n = src.len() / n_tok;
            for t in 0..tokens {
                let dst = &mut part[t * rows + r0..][..n];
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = src[i * n_tok + t0 + t];
                }
            }
        }
    });
}

/// The formats activations are quantized to before a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q8_1,
    Q8K,
}

/// Quantized activations for `n_tokens` rows of `cols` values. Buffers are reused.
#[derive(Default)]
pub struct Activations {
    pub ty: Option<ActType>,
    pub cols: usize,
    pub n_tokens: usize,
    f32: Vec<f32>,
    f16: Vec<f16>,
    bf16: Vec<bf16>,
    q8_0: Vec<BlockQ8_0>,
    q8_1: Vec<BlockQ8_1>,
    q8k: Vec<BlockQ8K>,
    /// How many of `q8_0`, `q8_1` or `q8k` (whichever `ty` names) hold this product's
    /// blocks: those buffers are only grown, as shrinking and growing them again would
    /// zero them anew for every product wider than the last (a serial memset).
    n_blocks: usize,
    /// Per Q8_0/Q8_1 block: the scale and `d · Σq`, as f32.
    d: Vec<f32>,
    s: Vec<f32>,
    /// The quantized values again, laid out for the AMX-INT8 tiles (batches of at least
    /// [`i8mat::MIN_TOKENS`] tokens where the tiles run; else empty).
    staged: i8mat::Staged,
    /// The first tokens are prompt tokens (see [`Activations::quantize_split`]).
    prefill_tokens: usize,
}

impl Activations {
    /// Quantizes `x` (`n_tokens` rows of `cols`) to `ty`; products of at least
    /// [`i8mat::MIN_TOKENS`] tokens run on the AMX-INT8 tiles where the CPU has them.
    pub fn quantize(&mut self, ty: ActType, x: &[f32], cols: usize) {
        let n_tokens = x.len() / cols;
        let tile_tokens = if n_tokens >= i8mat::MIN_TOKENS {
            n_tokens
        } else {
            0
        };
        self.quantize_split(ty, x, cols, tile_tokens);
    }

    /// Quantizes `x` (`n_tokens` rows of `cols`) to `ty`, and marks its first `tile_tokens`
    /// tokens as prompt tokens: [`QMatrix::matmul`] runs those on the prompt kernels (the
    /// AMX-INT8 tiles where the CPU has them, staged here; else, for the types that have
    /// one, a kernel that reuses each weight row for many tokens) and the others on the
    /// dot-product kernels. The two round
    /// differently, but a token's result depends only on which of them it took, never on
    /// the other tokens of the product, so callers that pick by what a token is (rather
    /// than by how many share the product) get the same numbers however tokens are batched.
    pub fn quantize_split(&mut self, ty: ActType, x: &[f32], cols: usize, tile_tokens: usize) {
        let n_tokens = x.len() / cols;
        let tile_tokens = tile_tokens.min(n_tokens);
        self.prefill_tokens = tile_tokens;
        self.ty = Some(ty);
        self.cols = cols;
        self.n_tokens = n_tokens;
        let k = dispatch::kernels();
        match ty {
            ActType::F32 => {
                self.f32.clear();
                self.f32.extend_from_slice(x);
            }
            ActType::F16 => {
                self.f16.resize(x.len(), f16::ZERO);
                reference::quantize_row_f16(x, &mut self.f16);
            }
            ActType::BF16 => {
                self.bf16.resize(x.len(), bf16::ZERO);
                reference::quantize_row_bf16(x, &mut self.bf16);
            }
            ActType::Q8_0 => {
                self.n_blocks = x.len() / QK;
                let q8_0 = grown(&mut self.q8_0, self.n_blocks);
                (k.quantize_q8_0)(x, q8_0);
                self.d.clear();
                self.s.clear();
                for b in q8_0.iter() {
                    let d = b.d.to_f32();
                    let sum: i32 = b.qs.iter().map(|&q| q as i32).sum();
                    self.d.push(d);
                    self.s.push(d * sum as f32);
                }
            }
            ActType::Q8_1 => {
                self.n_blocks = x.len() / QK;
                let q8_1 = grown(&mut self.q8_1, self.n_blocks);
                (k.quantize_q8_1)(x, q8_1);
                self.d.clear();
                self.s.clear();
                for b in q8_1.iter() {
                    self.d.push(b.d.to_f32());
                    self.s.push(b.s.to_f32());
                }
            }
            ActType::Q8K => {
                self.n_blocks = x.len() / QK_K;
                (k.quantize_q8_k)(x, grown(&mut self.q8k, self.n_blocks));
            }
        }
        self.staged.clear();
        if tile_tokens > 0 && i8mat::Staged::available() {
            let n = tile_tokens;
            match ty {
                ActType::Q8_0 => {
                    let q = &self.q8_0[..self.n_blocks];
                    self.staged
                        .stage_32(n, |i| &q[i].qs, &self.d, &self.s, cols)
                }
                ActType::Q8_1 => {
                    let q = &self.q8_1[..self.n_blocks];
                    self.staged
                        .stage_32(n, |i| &q[i].qs, &self.d, &self.s, cols)
                }
                ActType::Q8K => self.staged.stage_q8k(n, &self.q8k[..self.n_blocks], cols),
                ActType::F32 | ActType::F16 | ActType::BF16 => {}
            }
        }
    }

    /// Tokens staged for the AMX-INT8 tiles by the last [`Activations::quantize`] (0: none).
    pub fn staged_tokens(&self) -> usize {
        self.staged.n_tok()
    }
}

impl Activations {
    /// The Q8_0 blocks of tokens `t0..`.
    fn q8_0_blocks(&self, t0: usize) -> ActBlocks<'_, BlockQ8_0> {
        let b0 = t0 * self.cols / QK;
        ActBlocks {
            blocks: &self.q8_0[b0..self.n_blocks],
            d: &self.d[b0..],
            s: &self.s[b0..],
        }
    }

    /// The Q8_K blocks of tokens `t0..` (no `d`/`s`: each block holds its scale and sums).
    fn q8k_blocks(&self, t0: usize) -> ActBlocks<'_, BlockQ8K> {
        ActBlocks {
            blocks: &self.q8k[t0 * self.cols / QK_K..self.n_blocks],
            d: &[],
            s: &[],
        }
    }

    /// The Q8_K blocks of tokens `..p`.
    fn q8k_first(&self, p: usize) -> ActBlocks<'_, BlockQ8K> {
        ActBlocks {
            blocks: &self.q8k[..p * self.cols / QK_K],
            d: &[],
            s: &[],
        }
    }

    /// The Q8_0 blocks of tokens `..p`.
    fn q8_0_first(&self, p: usize) -> ActBlocks<'_, BlockQ8_0> {
        let n = p * self.cols / QK;
        ActBlocks {
            blocks: &self.q8_0[..n],
            d: &self.d[..n],
            s: &self.s[..n],
        }
    }

    /// The Q8_1 blocks of tokens `..p`.
    fn q8_1_first(&self, p: usize) -> ActBlocks<'_, BlockQ8_1> {
        let n = p * self.cols / QK;
        ActBlocks {
            blocks: &self.q8_1[..n],
            d: &self.d[..n],
            s: &self.s[..n],
        }
    }

    /// The Q8_1 blocks of tokens `t0..`.
    fn q8_1_blocks(&self, t0: usize) -> ActBlocks<'_, BlockQ8_1> {
        let b0 = t0 * self.cols / QK;
        ActBlocks {
            blocks: &self.q8_1[b0..self.n_blocks],
            d: &self.d[b0..],
            s: &self.s[b0..],
        }
    }
}

use bytemuck::Zeroable;

/// The first `n` of `v`, grown (zeroed) to at least `n` first; never shrunk.
fn grown<T: Zeroable + Clone>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    if v.len() < n {
        v.resize(n, T::zeroed());
    }
    &mut v[..n]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q, K and V (or gate and up) as one pool job give the bits they give one by one:
    /// plain Q4_0 rows (a count not a multiple of the task size), grouped Q4_0 rows and
    /// Q8_0 rows on the same activations, one token on 2 threads (one job) and 1 thread,
    /// and 3 tokens (one after another).
    #[test]
    fn matmul_many_equals_products_one_by_one() {
        let cols = 256;
        let nb = cols / QK;
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let q4 = |rows: usize, next: &mut dyn FnMut() -> u64| -> Vec<BlockQ4_0> {
            (0..rows * nb)
                .map(|_| BlockQ4_0 {
                    d: f16::from_f32((next() % 1000) as f32 / 1e5 + 1e-4),
                    qs: std::array::from_fn(|_| next() as u8),
                })
                .collect()
        };
        let plain = q4(200, &mut next);
        let grouped_file = q4(264, &mut next);
        let grouped = interleave8(&grouped_file, nb);
        let q8: Vec<BlockQ8_0> = (0..72 * nb)
            .map(|_| BlockQ8_0 {
                d: f16::from_f32((next() % 1000) as f32 / 1e5 + 1e-4),
                qs: std::array::from_fn(|_| next() as i8),
            })
            .collect();
        let q4_0 =
            QMatrix::new("a", GgmlType::Q4_0, cols, 200, bytemuck::cast_slice(&plain)).unwrap();
        let q4_0x8 = QMatrix::from_interleaved(
            "b",
            GgmlType::Q4_0,
            cols,
            264,
            bytemuck::cast_slice(&grouped),
        )
        .unwrap();
        let q8_0 = QMatrix::new("c", GgmlType::Q8_0, cols, 72, bytemuck::cast_slice(&q8)).unwrap();
        for (threads, n_tok) in [(2, 1), (1, 1), (2, 3)] {
            pool::set_threads(threads);
            let x: Vec<f32> = (0..n_tok * cols)
                .map(|_| (next() % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            for pair in [[q4_0, q4_0x8], [q4_0x8, q8_0]] {
                let ty = pair[0].act_type();
                assert_eq!(pair[1].act_type(), ty, "one activation type per call");
                let mut acts = Activations::default();
                acts.quantize(ty, &x, cols);
                let mut scratch = Vec::new();
                let alone: Vec<Vec<f32>> = pair
                    .iter()
                    .map(|m| {
                        let mut o = vec![f32::NAN; n_tok * m.rows];
                        m.matmul(&acts, &mut o, &mut scratch);
                        o
                    })
                    .collect();
                let (mut a, mut b) = (
                    vec![f32::NAN; n_tok * pair[0].rows],
                    vec![f32::NAN; n_tok * pair[1].rows],
                );
                matmul_many(
                    &mut [(pair[0], &mut a), (pair[1], &mut b)],
                    &acts,
                    &mut scratch,
                );
                for (got, want) in [(&a, &alone[0]), (&b, &alone[1])] {
                    assert!(
                        got.iter()
                            .zip(want)
                            .all(|(g, w)| g.to_bits() == w.to_bits()),
                        "{threads} threads, {n_tok} tokens"
                    );
                }
            }
        }
    }

    /// Every shape of the multi-token products' last step, on 1 and 2 threads: runs of 8
    /// rows with a partial last run, blocks of tokens narrower than 16 and a single token.
    #[test]
    fn transpose_into_matches_the_definition() {
        for threads in [1, 2] {
            pool::set_threads(threads);
            for rows in [1, 7, 8, 13, 100] {
                for n_tok in [1, 2, 3, 15, 16, 17, 40] {
                    let scratch: Vec<f32> = (0..rows * n_tok).map(|i| i as f32).collect();
                    let mut out = vec![-1.0; rows * n_tok + 3];
                    transpose_into(&scratch, rows, n_tok, &mut out);
                    for t in 0..n_tok {
                        for r in 0..rows {
                            assert_eq!(out[t * rows + r], scratch[r * n_tok + t], "{rows}×{n_tok}");
                        }
                    }
                    assert_eq!(&out[rows * n_tok..], &[-1.0; 3], "past the end untouched");
                }
            }
        }
    }
}
