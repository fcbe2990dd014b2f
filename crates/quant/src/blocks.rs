//! Quantized block layouts, bit-for-bit those of ggml. `#[repr(C)]`, with size asserts.

use bytemuck::{Pod, Zeroable};
use half::f16;

pub const QK: usize = 32;
pub const QK_K: usize = 256;
pub const K_SCALE_SIZE: usize = 12;

/// 32 weights: `w = d * (q - 8)`, q in 0..16.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

/// 32 weights: `w = d * q + m`, q in 0..16.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; QK / 2],
}

/// 32 weights: `w = d * (q - 16)`, q in 0..32; the fifth bits live in `qh`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5_0 {
    pub d: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 32 weights: `w = d * q + m`, q in 0..32.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5_1 {
    pub d: f16,
    pub m: f16,
    pub qh: [u8; 4],
    pub qs: [u8; QK / 2],
}

/// 32 values: `x = d * q`, q in -127..=127. Also the activation type for Q4_0/Q5_0/Q8_0.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; QK],
}

/// Activation block for Q4_1/Q5_1: like Q8_0 plus `s = d * sum(q)`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_1 {
    pub d: f16,
    pub s: f16,
    pub qs: [i8; QK],
}

/// 256 weights in 8 sub-blocks of 32, each with a 6-bit scale and min.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qs: [u8; QK_K / 2],
}

/// Like Q4_K with a fifth bit per weight.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ5K {
    pub d: f16,
    pub dmin: f16,
    pub scales: [u8; K_SCALE_SIZE],
    pub qh: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 2],
}

/// 256 weights, 6 bits each, 16 sub-blocks of 16 with 8-bit scales.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ6K {
    pub ql: [u8; QK_K / 2],
    pub qh: [u8; QK_K / 4],
    pub scales: [i8; QK_K / 16],
    pub d: f16,
}

/// 256 weights, 2 bits each, in 16 sub-blocks of 16 with a 4-bit scale and 4-bit min:
/// `w = d · scale · q − dmin · min`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ2K {
    pub scales: [u8; QK_K / 16],
    pub qs: [u8; QK_K / 4],
    pub d: f16,
    pub dmin: f16,
}

/// 256 weights, 3 bits each (2 in `qs`, the third in `hmask`), in 16 sub-blocks of 16 with
/// 6-bit signed scales: `w = d · (scale − 32) · (q − 4)`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ3K {
    pub hmask: [u8; QK_K / 8],
    pub qs: [u8; QK_K / 4],
    pub scales: [u8; K_SCALE_SIZE],
    pub d: f16,
}

/// 32 weights as 4-bit indices into the non-linear table [`KVALUES_IQ4NL`]: `w = d · kv[q]`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockIQ4NL {
    pub d: f16,
    pub qs: [u8; QK / 2],
}

/// 256 weights as IQ4_NL indices in 8 sub-blocks of 32, each with a 6-bit scale (low 4
/// bits in `scales_l`, high 2 in `scales_h`): `w = d · (scale − 32) · kv[q]`.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockIQ4XS {
    pub d: f16,
    pub scales_h: u16,
    pub scales_l: [u8; QK_K / 64],
    pub qs: [u8; QK_K / 2],
}

/// Eight rows' blocks of one 4-bit type whose blocks are an f16 `d` and a 16-byte `qs`
/// (Q4_0, IQ4_NL), side by side: the eight scales, then each row's `qs`. A matrix in this
/// layout holds its rows in groups of eight, a group's blocks in column order, so decoding
/// reads four rows' nibbles with one 64-byte load and eight scales with one 16-byte load
/// (the idea of ggml-cpu's repacked `block_q4_0x8`; see `QMatrix::interleave`).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct Nibbles8 {
    pub d: [f16; 8],
    pub qs: [[u8; QK / 2]; 8],
}

/// A block type whose rows `QMatrix::interleave` groups eight at a time, and its group.
pub trait Groupable: Pod + Sync {
    type Group: Pod + Send + Sync;
    /// Values per block.
    const LEN: usize;
    /// Puts this block in row `r` (< 8) of `g`.
    fn put(&self, g: &mut Self::Group, r: usize);
    /// Row `r`'s block of `g`.
    fn take(g: &Self::Group, r: usize) -> Self;
}

/// `Groupable` for a 32-value block type whose group holds each of its fields as an array
/// of the eight rows' values (row `r` at index `r`).
macro_rules! groupable_by_fields {
    ($block:ty, $group:ty, $($field:ident),+) => {
        impl Groupable for $block {
            type Group = $group;
            const LEN: usize = QK;
            fn put(&self, g: &mut $group, r: usize) {
                $(g.$field[r] = self.$field;)+
            }
            fn take(g: &$group, r: usize) -> Self {
                Self {
                    $($field: g.$field[r],)+
                }
            }
        }
    };
}
groupable_by_fields!(BlockQ4_0, Nibbles8, d, qs);
groupable_by_fields!(BlockIQ4NL, Nibbles8, d, qs);

/// Eight Q4_1 rows' blocks side by side, as [`Nibbles8`] with each row's min: the same
/// bytes as the eight blocks (160), reordered.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct NibblesMin8 {
    pub d: [f16; 8],
    pub m: [f16; 8],
    pub qs: [[u8; QK / 2]; 8],
}

/// Eight Q5_0 rows' blocks side by side, as [`Nibbles8`] with each row's fifth bits (`qh`,
/// bit `j` of value `j`): the same bytes as the eight blocks (176), reordered.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct NibblesQh8 {
    pub d: [f16; 8],
    pub qh: [[u8; 4]; 8],
    pub qs: [[u8; QK / 2]; 8],
}

groupable_by_fields!(BlockQ4_1, NibblesMin8, d, m, qs);
groupable_by_fields!(BlockQ5_0, NibblesQh8, d, qh, qs);

/// Eight Q4_K rows' super-blocks side by side, with the six-bit scales and mins unpacked
/// to bytes: decoding reads four rows' 16-byte runs of nibbles with one 64-byte load (two
/// with 32 bytes at AVX2) and every row's scales for a sub-block with one 8-byte load, with
/// no bit-unpacking per row (ggml-cpu's repacked `block_q4_Kx8` keeps the packed scales).
/// 1184 bytes against the eight blocks' 1152.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct Q4K8 {
    pub d: [f16; 8],
    pub dmin: [f16; 8],
    /// `scales[j][r]`: row `r`'s scale of sub-block `j`.
    pub scales: [[u8; 8]; 8],
    /// `mins[r][j]`: row `r`'s min of sub-block `j`.
    pub mins: [[u8; 8]; 8],
    /// `qs[c][r]`: row `r`'s `qs[16c .. 16c + 16]` (low nibbles: values of sub-block
    /// `2·(c/2)`, high: of the next one).
    pub qs: [[[u8; 16]; 8]; 8],
}

/// Q4_K's 12 bytes of scales and mins as eight six-bit scales and eight mins
/// (`reference::scale_min_k4` for every sub-block).
pub fn unpack_scales_mins(q: &[u8; K_SCALE_SIZE]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        (sc[j], mn[j]) = (q[j] & 63, q[j + 4] & 63);
        sc[j + 4] = (q[j + 8] & 0xF) | ((q[j] >> 6) << 4);
        mn[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

/// The inverse of [`unpack_scales_mins`] (every bit of the 12 bytes holds one of the 16
/// six-bit values, so packing gives back the file's bytes).
pub fn pack_scales_mins(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; K_SCALE_SIZE] {
    let mut q = [0u8; K_SCALE_SIZE];
    for j in 0..4 {
        q[j] = (sc[j] & 63) | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = (mn[j] & 63) | ((mn[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4);
    }
    q
}

impl Groupable for BlockQ4K {
    type Group = Q4K8;
    const LEN: usize = QK_K;
    fn put(&self, g: &mut Q4K8, r: usize) {
        (g.d[r], g.dmin[r]) = (self.d, self.dmin);
        let (sc, mn) = unpack_scales_mins(&self.scales);
        for (column, s) in g.scales.iter_mut().zip(sc) {
            column[r] = s;
        }
        g.mins[r] = mn;
        for (c, run) in self.qs.chunks_exact(16).enumerate() {
            g.qs[c][r].copy_from_slice(run);
        }
    }
    fn take(g: &Q4K8, r: usize) -> Self {
        let sc = std::array::from_fn(|j| g.scales[j][r]);
        let mut qs = [0u8; QK_K / 2];
        for (c, run) in qs.chunks_exact_mut(16).enumerate() {
            run.copy_from_slice(&g.qs[c][r]);
        }
        Self {
            d: g.d[r],
            dmin: g.dmin[r],
            scales: pack_scales_mins(&sc, &g.mins[r]),
            qs,
        }
    }
}

/// Eight Q5_K rows' super-blocks side by side: their scales, mins and low four bits as
/// [`Q4K8`] holds Q4_K's, and each row's fifth bits (the file's `qh`) in two 16-byte halves,
/// so a 64-byte load brings four rows' fifth bits for the runs of the same half. 1440 bytes
/// against the eight blocks' 1408.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct Q5K8 {
    pub low: Q4K8,
    /// `qh[h][r]`: row `r`'s `qh[16h .. 16h + 16]`. Bit `2j` of byte `i` is the fifth bit of
    /// value `64j + 16h + i` (a low nibble of run `2j + h`), bit `2j + 1` of value
    /// `64j + 32 + 16h + i` (a high nibble of the same run).
    pub qh: [[[u8; 16]; 8]; 2],
}

/// A group of eight rows' super-blocks of four-bit values with six-bit scales and mins, as
/// the grouped kernels read it: Q4_K ([`Q4K8`]) or Q5_K ([`Q5K8`], whose values also carry
/// a fifth bit).
pub trait KGroup: Copy {
    /// The largest value (15, or 31 with the fifth bit).
    const MAX_VALUE: u32;
    /// The scales, mins and low four bits.
    fn low(&self) -> &Q4K8;
    /// The fifth bits (Q5_K), else `None`.
    #[inline(always)]
    fn qh(&self) -> Option<&[[[u8; 16]; 8]; 2]> {
        None
    }
}

impl KGroup for Q4K8 {
    const MAX_VALUE: u32 = 15;
    #[inline(always)]
    fn low(&self) -> &Q4K8 {
        self
    }
}

impl KGroup for Q5K8 {
    const MAX_VALUE: u32 = 31;
    #[inline(always)]
    fn low(&self) -> &Q4K8 {
        &self.low
    }
    #[inline(always)]
    fn qh(&self) -> Option<&[[[u8; 16]; 8]; 2]> {
        Some(&self.qh)
    }
}

impl Groupable for BlockQ5K {
    type Group = Q5K8;
    const LEN: usize = QK_K;
    fn put(&self, g: &mut Q5K8, r: usize) {
        let low = BlockQ4K {
            d: self.d,
            dmin: self.dmin,
            scales: self.scales,
            qs: self.qs,
        };
        low.put(&mut g.low, r);
        for (h, half) in self.qh.chunks_exact(16).enumerate() {
            g.qh[h][r].copy_from_slice(half);
        }
    }
    fn take(g: &Q5K8, r: usize) -> Self {
        let low = BlockQ4K::take(&g.low, r);
        let mut qh = [0u8; QK_K / 8];
        for (h, half) in qh.chunks_exact_mut(16).enumerate() {
            half.copy_from_slice(&g.qh[h][r]);
        }
        Self {
            d: low.d,
            dmin: low.dmin,
            scales: low.scales,
            qh,
            qs: low.qs,
        }
    }
}

/// Eight IQ4_XS rows' super-blocks side by side, with the six-bit scales unpacked to signed
/// bytes (minus 32): decoding reads two rows' 16-byte runs with one 32-byte load (AVX2)
/// and every row's scale of a sub-block with one 8-byte load. 1104 bytes against the eight
/// blocks' 1088.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct IQ4XS8 {
    pub d: [f16; 8],
    /// `scales[j][r]`: row `r`'s scale of sub-block `j`, minus 32.
    pub scales: [[i8; 8]; 8],
    /// `qs[j][r]`: row `r`'s `qs[16j .. 16j + 16]` (sub-block `j`: low nibbles are its
    /// values 0..16, high nibbles 16..32).
    pub qs: [[[u8; 16]; 8]; 8],
}

impl Groupable for BlockIQ4XS {
    type Group = IQ4XS8;
    const LEN: usize = QK_K;
    fn put(&self, g: &mut IQ4XS8, r: usize) {
        g.d[r] = self.d;
        for (j, s) in crate::reference::iq4xs_scales(self).into_iter().enumerate() {
            g.scales[j][r] = s;
        }
        for (j, run) in self.qs.chunks_exact(16).enumerate() {
            g.qs[j][r].copy_from_slice(run);
        }
    }
    fn take(g: &IQ4XS8, r: usize) -> Self {
        // Each scale plus 32 is six bits: the low four in `scales_l` (two per byte), the
        // high two in `scales_h` (two bits per sub-block), as the file packs them.
        let (mut scales_l, mut scales_h) = ([0u8; QK_K / 64], 0u16);
        for j in 0..8 {
            let ls = (g.scales[j][r] as i32 + 32) as u8 & 63;
            scales_l[j / 2] |= (ls & 0xF) << (4 * (j % 2));
            scales_h |= ((ls >> 4) as u16) << (2 * j);
        }
        let mut qs = [0u8; QK_K / 2];
        for (j, run) in qs.chunks_exact_mut(16).enumerate() {
            run.copy_from_slice(&g.qs[j][r]);
        }
        Self {
            d: g.d[r],
            scales_h,
            scales_l,
            qs,
        }
    }
}

/// Eight Q3_K rows' super-blocks side by side: the same 880 bytes as the eight blocks,
/// reordered so that one 64-byte load brings four rows' 16-byte runs of 2-bit values (or of
/// high bits), two rows' with 32 bytes at AVX2, and one more load four rows' packed scales
/// (one row per 128-bit lane after a dword permute), unpacked once for all four.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct Q3K8 {
    pub d: [f16; 8],
    /// `scales[r]`: row `r`'s twelve bytes of packed six-bit scales, as in the file.
    pub scales: [[u8; K_SCALE_SIZE]; 8],
    /// `hmask[e][r]`: row `r`'s `hmask[16e .. 16e + 16]`. Bit `4h + j` of byte `i` is the
    /// high bit of value `128h + 32j + 16e + i` (sub-block `8h + 2j + e`).
    pub hmask: [[[u8; 16]; 8]; 2],
    /// `qs[c][r]`: row `r`'s `qs[16c .. 16c + 16]`. Bits `2j, 2j + 1` of byte `i` are the
    /// low bits of value `128h + 32j + 16e + i`, `c = 2h + e`.
    pub qs: [[[u8; 16]; 8]; 4],
}

impl Groupable for BlockQ3K {
    type Group = Q3K8;
    const LEN: usize = QK_K;
    fn put(&self, g: &mut Q3K8, r: usize) {
        (g.d[r], g.scales[r]) = (self.d, self.scales);
        for (e, run) in self.hmask.chunks_exact(16).enumerate() {
            g.hmask[e][r].copy_from_slice(run);
        }
        for (c, run) in self.qs.chunks_exact(16).enumerate() {
            g.qs[c][r].copy_from_slice(run);
        }
    }
    fn take(g: &Q3K8, r: usize) -> Self {
        let mut b = Self {
            hmask: [0; QK_K / 8],
            qs: [0; QK_K / 4],
            scales: g.scales[r],
            d: g.d[r],
        };
        for (e, run) in b.hmask.chunks_exact_mut(16).enumerate() {
            run.copy_from_slice(&g.hmask[e][r]);
        }
        for (c, run) in b.qs.chunks_exact_mut(16).enumerate() {
            run.copy_from_slice(&g.qs[c][r]);
        }
        b
    }
}

/// Eight Q2_K rows' super-blocks side by side: the same 672 bytes as the eight blocks,
/// reordered as [`Q3K8`]'s 2-bit values are, so that one 64-byte load brings four rows'
/// 16-byte runs (two rows' with 32 bytes at AVX2), and one more four rows' scale bytes (one
/// row per 128-bit lane, as the file has them).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct Q2K8 {
    pub d: [f16; 8],
    pub dmin: [f16; 8],
    /// `scales[r]`: row `r`'s 16 bytes, as in the file (sub-block `g`'s scale in the low
    /// nibble of byte `g`, its min in the high nibble).
    pub scales: [[u8; QK_K / 16]; 8],
    /// `qs[c][r]`: row `r`'s `qs[16c .. 16c + 16]`. Bits `2j, 2j + 1` of byte `i` are value
    /// `128h + 32j + 16e + i` (sub-block `8h + 2j + e`), `c = 2h + e`.
    pub qs: [[[u8; 16]; 8]; 4],
}

impl Groupable for BlockQ2K {
    type Group = Q2K8;
    const LEN: usize = QK_K;
    fn put(&self, g: &mut Q2K8, r: usize) {
        (g.d[r], g.dmin[r], g.scales[r]) = (self.d, self.dmin, self.scales);
        for (c, run) in self.qs.chunks_exact(16).enumerate() {
            g.qs[c][r].copy_from_slice(run);
        }
    }
    fn take(g: &Q2K8, r: usize) -> Self {
        let mut b = Self {
            scales: g.scales[r],
            qs: [0; QK_K / 4],
            d: g.d[r],
            dmin: g.dmin[r],
        };
        for (c, run) in b.qs.chunks_exact_mut(16).enumerate() {
            run.copy_from_slice(&g.qs[c][r]);
        }
        b
    }
}

/// IQ4_NL's and IQ4_XS's 16 values (ggml's `kvalues_iq4nl`).
pub const KVALUES_IQ4NL: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Activation block for the K-quants: 256 int8 with an f32 scale and sums of each 16.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8K {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);
const _: () = assert!(std::mem::size_of::<BlockQ8_1>() == 36);
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);
const _: () = assert!(std::mem::size_of::<BlockQ8K>() == 292);
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);
const _: () = assert!(std::mem::size_of::<BlockIQ4NL>() == 18);
const _: () = assert!(std::mem::size_of::<BlockIQ4XS>() == 136);
const _: () = assert!(std::mem::size_of::<Nibbles8>() == 8 * 18);
const _: () = assert!(std::mem::size_of::<NibblesMin8>() == 8 * 20);
const _: () = assert!(std::mem::size_of::<NibblesQh8>() == 8 * 22);
const _: () = assert!(std::mem::size_of::<Q4K8>() == 1184);
const _: () = assert!(std::mem::size_of::<Q5K8>() == 1440);
const _: () = assert!(std::mem::size_of::<IQ4XS8>() == 1104);
const _: () = assert!(std::mem::size_of::<Q3K8>() == 8 * 110);
const _: () = assert!(std::mem::size_of::<Q2K8>() == 8 * 84);
