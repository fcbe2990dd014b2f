//! F32 matrix products computed in bf16 with f32 accumulation (encoder models: BERT's
//! `Linear` layers over a whole batch of tokens), by one of two kernels ([`Bf16Kernel`]):
//! AMX tiles (`tdpbf16ps`) at the Amx level, or AVX512-BF16 dot products (`vdpbf16ps`) at
//! the Avx512 level on CPUs that issue them as fast as an f32 FMA (AMD Zen 4/5: two
//! multiply-adds per lane instead of one). Both read the same packed layout.
//!
//! A [`Bf16Matrix`] exists only where a kernel runs: [`Bf16Matrix::pack`] returns `None`
//! otherwise, and callers keep their f32 path then. Weights are rounded to bf16 once at
//! packing; activations are rounded per product. [`reference_matmul`] is the scalar
//! definition the kernels are tested against.

use crate::dispatch::Isa;

/// The instructions a [`Bf16Matrix`] is multiplied with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles: 32 tokens × 32 rows per block (dispatch level Amx).
    Amx,
    /// AVX512-BF16 `vdpbf16ps`: 8 tokens × 32 rows in 16 registers (dispatch level Avx512,
    /// where [`Bf16Kernel::in_force`] picks it only if the CPU issues them at the f32 FMA
    /// rate; elsewhere the f32 panels are faster).
    DotProducts,
}

impl Bf16Kernel {
    /// The kernel the dispatch level in force uses for f32 products, if any.
    pub fn in_force() -> Option<Self> {
        match crate::dispatch::kernels().isa {
            Isa::Amx => Some(Self::Amx),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 if crate::x86::fast_bf16_dot_products() => Some(Self::DotProducts),
            _ => None,
        }
    }

    /// Whether this CPU can run the kernel (tests run it wherever it can).
    pub fn runs_here(self) -> bool {
        let best = crate::dispatch::detect();
        match self {
            Self::Amx => best == Isa::Amx,
            #[cfg(target_arch = "x86_64")]
            Self::DotProducts => {
                best.includes(Isa::Avx512) && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Self::DotProducts => false,
        }
    }
}

/// A `[rows, cols]` weight matrix (row = output feature, as PyTorch's `Linear`) packed for
/// `tdpbf16ps`: groups of 16 rows × blocks of 32 columns, each one 512-value tile laid out
/// `[pair of columns kk][row n][column within pair p]` (the "VNNI" order AMX reads B in).
// The tiles run on x86-64 only; elsewhere `pack` never builds one.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub struct Bf16Matrix {
    kernel: Bf16Kernel,
    rows: usize,
    cols: usize,
    /// Groups of 16 rows, padded to an even count (the kernel takes 32 rows at a time).
    groups: usize,
    /// Blocks of 32 columns (the last one zero-padded).
    k_blocks: usize,
    data: Vec<Tile>,
}

const TILE: usize = 512;

/// One tile's values (16 rows × 32 bf16), on its own cache lines: a tile load then reads
/// 16 whole lines instead of 32 halves.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Tile([u16; TILE]);
const _: () = assert!(std::mem::size_of::<Tile>() == 2 * TILE);

/// The activations of a product in bf16 tiles, kept between products so they are
/// allocated once.
#[derive(Default)]
pub struct Bf16Scratch(Vec<Tile>);

/// `f32 → bf16`, rounding to nearest even.
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

fn from_bf16(x: u16) -> f32 {
    f32::from_bits((x as u32) << 16)
}

impl Bf16Matrix {
    /// Packs `w` (`rows * cols` values, row-major) if a bf16 kernel is in force
    /// ([`Bf16Kernel::in_force`]), else `None`.
    pub fn pack(w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        Self::pack_for(Bf16Kernel::in_force()?, w, rows, cols)
    }

    /// Packs `w` for `kernel`; `None` if this CPU cannot run it (or the matrix is empty).
    pub fn pack_for(kernel: Bf16Kernel, w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if !kernel.runs_here() || rows == 0 || cols == 0 {
            return None;
        }
        assert_eq!(w.len(), rows * cols, "weights are not {rows}x{cols}");
        let groups = rows.div_ceil(32) * 2;
        let k_blocks = cols.div_ceil(32);
        let mut data = vec![Tile([0; TILE]); groups * k_blocks];
        for g in 0..groups {
            for kb in 0..k_blocks {
                let tile = &mut data[g * k_blocks + kb].0;
                for n in 0..16 {
                    let row = g * 16 + n;
                    if row >= rows {
                        break;
                    }
                    for k in kb * 32..(kb * 32 + 32).min(cols) {
                        let (kk, p) = ((k % 32) / 2, k % 2);
                        tile[kk * 32 + n * 2 + p] = to_bf16(w[row * cols + k]);
                    }
                }
            }
        }
        Some(Self {
            kernel,
            rows,
            cols,
            groups,
            k_blocks,
            data,
        })
    }

    /// `y[t][r] = Σ_c x[t][c] · w[r][c]` for `n_tok` tokens (`x`: `[n_tok, cols]`, `y`:
    /// `[n_tok, rows]`), plus `bias[r]` if given, spread over the thread pool. `scratch`
    /// holds the activations in bf16 between calls (reused, so no allocation per product
    /// once it has grown).
    pub fn matmul(
        &self,
        x: &[f32],
        n_tok: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
        scratch: &mut Bf16Scratch,
    ) {
        assert!(x.len() >= n_tok * self.cols && y.len() >= n_tok * self.rows);
        assert!(bias.is_none_or(|b| b.len() == self.rows));
        if n_tok == 0 {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        match self.kernel {
            Bf16Kernel::Amx => self.matmul_amx(x, n_tok, bias, y, scratch),
            Bf16Kernel::DotProducts => self.matmul_dot(x, n_tok, bias, y, scratch),
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "a Bf16Matrix is only packed where its kernel runs ({} {bias:?})",
            scratch.0.len()
        );
    }

    /// Tasks per run of tokens when there are `token_tasks` runs: short batches split the
    /// weight pairs (32 rows) too, so every thread has about two tasks.
    #[cfg(target_arch = "x86_64")]
    fn pair_splits(&self, token_tasks: usize) -> usize {
        (2 * crate::pool::threads())
            .div_ceil(token_tasks)
            .clamp(1, self.groups / 2)
    }

    /// The weight pairs of split `split` of `splits`.
    #[cfg(target_arch = "x86_64")]
    fn pair_range(&self, splits: usize, split: usize) -> std::ops::Range<usize> {
        let (n_pairs, per_split) = (self.groups / 2, (self.groups / 2).div_ceil(splits));
        split * per_split..((split + 1) * per_split).min(n_pairs)
    }

    /// The activations as tiles too: groups of 16 tokens × blocks of 32 columns, 512 values
    /// each (padding as zeros), `2 * n_tok.div_ceil(32)` groups of `k_blocks` tiles.
    #[cfg(target_arch = "x86_64")]
    fn activation_tiles<'s>(
        &self,
        x: &[f32],
        n_tok: usize,
        scratch: &'s mut Bf16Scratch,
    ) -> &'s [Tile] {
        let (cols, k_blocks) = (self.cols, self.k_blocks);
        let groups = 2 * n_tok.div_ceil(32);
        let scratch = &mut scratch.0;
        // Every value is written below (padding as zeros), so the buffer is only grown.
        scratch.resize(scratch.len().max(groups * k_blocks), Tile([0; TILE]));
        let scratch = &mut scratch[..groups * k_blocks];
        crate::pool::for_each_chunk(scratch, k_blocks, |g, tiles| {
            for i in 0..16 {
                let t = g * 16 + i;
                if t >= n_tok {
                    tiles
                        .iter_mut()
                        .for_each(|tile| tile.0[i * 32..][..32].fill(0));
                    continue;
                }
                let src = &x[t * cols..][..cols];
                for (kb, tile) in tiles.iter_mut().enumerate() {
                    let dst = &mut tile.0[i * 32..][..32];
                    let chunk = &src[(kb * 32).min(cols)..(kb * 32 + 32).min(cols)];
                    // SAFETY: both kernels need AVX-512F/BW/VL/BF16, which `runs_here`
                    // checked when this matrix was packed.
                    unsafe { crate::x86::avx512::to_bf16(chunk, dst) };
                    dst[chunk.len()..].fill(0);
                }
            }
        });
        scratch
    }

    /// The `vdpbf16ps` product: one task per run of 48 tokens (3 activation groups) × a
    /// range of weight pairs; each weight pair (2 × K/32 KiB) is read from memory once per
    /// run and from cache for the run's other blocks of 8 tokens.
    #[cfg(target_arch = "x86_64")]
    fn matmul_dot(
        &self,
        x: &[f32],
        n_tok: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
        scratch: &mut Bf16Scratch,
    ) {
        use crate::x86::avx512::{bf16_dot_block, BF16_DOT_TOKENS};
        const RUN_GROUPS: usize = 3;
        let (rows, k_blocks) = (self.rows, self.k_blocks);
        let a_tiles = self.activation_tiles(x, n_tok, scratch);
        let group_len = k_blocks * TILE;
        let runs = n_tok.div_ceil(16 * RUN_GROUPS);
        let (n_pairs, splits) = (self.groups / 2, self.pair_splits(runs));
        let init = &crate::padded_bias(bias, n_pairs * 32)[..];
        let out = crate::pool::SendPtr(y.as_mut_ptr());
        crate::pool::run(runs * splits, |task| {
            let (run, split) = (task / splits, task % splits);
            let out = &out;
            let t_end = ((run + 1) * 16 * RUN_GROUPS).min(n_tok);
            for np in self.pair_range(splits, split) {
                let r0 = np * 32;
                let valid = (rows - r0).min(32);
                for t0 in (run * 16 * RUN_GROUPS..t_end).step_by(BF16_DOT_TOKENS) {
                    let tokens = (t_end - t0).min(BF16_DOT_TOKENS);
                    // SAFETY: the matrix was packed for this kernel, so the CPU has
                    // AVX-512F/BW/VL/BF16 (`runs_here`). Token block `t0` (a multiple of 8)
                    // lies in group `t0 / 16`, which has `k_blocks` tiles in `a_tiles`;
                    // weight pair `np` has 2 groups of `k_blocks` aligned tiles in `data`;
                    // `init` has 32 values from `r0`; `y` holds `n_tok * rows` values, and
                    // the block stores `tokens` rows (`t0 + tokens ≤ n_tok`) of `valid`
                    // values from column `r0` (`r0 + valid ≤ rows`). Tasks write disjoint
                    // blocks of `y`.
                    unsafe {
                        let (g, i) = (t0 / 16, t0 % 16);
                        let a = (a_tiles.as_ptr() as *const u16).add(g * group_len + i * 32);
                        let b0 = (self.data.as_ptr() as *const u16).add(2 * np * group_len);
                        bf16_dot_block(
                            a,
                            b0,
                            b0.add(group_len),
                            k_blocks,
                            init.as_ptr().add(r0),
                            out.0.add(t0 * rows + r0),
                            rows,
                            tokens,
                            valid,
                        );
                    }
                }
            }
        });
    }

    #[cfg(target_arch = "x86_64")]
    fn matmul_amx(
        &self,
        x: &[f32],
        n_tok: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
        scratch: &mut Bf16Scratch,
    ) {
        use crate::x86::amx;
        let (rows, k_blocks) = (self.rows, self.k_blocks);
        let group_len = k_blocks * TILE;
        let m_pairs = n_tok.div_ceil(32);
        let a_tiles = self.activation_tiles(x, n_tok, scratch);
        // Tasks: one token pair (32 tokens) × a range of weight pairs. The token pair's tiles
        // (2 × K/32 KiB) stay in L1 while the weight tiles stream past from L2; measured
        // here, this beats reusing each weight pair over several token pairs (whose tiles
        // then no longer fit L1 together) by up to 2× at MiniLM's shapes.
        let (n_pairs, splits) = (self.groups / 2, self.pair_splits(m_pairs));
        let init = &crate::padded_bias(bias, n_pairs * 32)[..];
        let out = crate::pool::SendPtr(y.as_mut_ptr());
        crate::pool::run(m_pairs * splits, |task| {
            let (mp, split) = (task / splits, task % splits);
            let out = &out;
            let mut c = [0f32; 32 * 32];
            // SAFETY: a `Bf16Matrix` exists only when `amx::enable()` granted the tiles
            // (dispatch level Amx), and `configure` runs on this thread before any tile
            // instruction. Each token pair has 2 groups of `k_blocks` tiles in `a_tiles`,
            // each weight pair 2 groups of `k_blocks` tiles in `data`, `init` 32 values per
            // weight pair; `c` is 32 × 32, and a direct store into `y` happens only when all
            // 32 rows and 32 columns of the block exist (`m0 + 32 ≤ n_tok`, `r0 + 32 ≤ rows`,
            // `y` holds `n_tok * rows`). Tasks write disjoint blocks of `y`.
            unsafe {
                amx::configure();
                let m0 = mp * 32;
                let m_valid = (n_tok - m0).min(32);
                let a0 = (a_tiles.as_ptr() as *const u16).add(2 * mp * group_len);
                let a1 = a0.add(group_len);
                for np in self.pair_range(splits, split) {
                    let r0 = np * 32;
                    let b0 = (self.data.as_ptr() as *const u16).add(2 * np * group_len);
                    let b1 = b0.add(group_len);
                    let r_valid = (rows - r0).min(32);
                    // Whole blocks go straight into `y`; edge blocks through `c`.
                    let whole = m_valid == 32 && r_valid == 32;
                    let (dst, stride) = if whole {
                        (out.0.add(m0 * rows + r0), rows)
                    } else {
                        (c.as_mut_ptr(), 32)
                    };
                    let init = init.as_ptr().add(r0);
                    amx::block_32x32(init, a0, a1, b0, b1, k_blocks, dst, stride);
                    if !whole {
                        for i in 0..m_valid {
                            let row = out.0.add((m0 + i) * rows + r0);
                            std::ptr::copy_nonoverlapping(c.as_ptr().add(i * 32), row, r_valid);
                        }
                    }
                }
                amx::release();
            }
        });
    }
}

/// The definition: both operands rounded to bf16, products summed in f32.
pub fn reference_matmul(
    w: &[f32],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tok: usize,
    y: &mut [f32],
) {
    for t in 0..n_tok {
        for r in 0..rows {
            let mut s = 0f32;
            for c in 0..cols {
                s += from_bf16(to_bf16(x[t * cols + c])) * from_bf16(to_bf16(w[r * cols + c]));
            }
            y[t * rows + r] = s;
        }
    }
}
