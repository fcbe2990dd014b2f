//! AMX-BF16 tile products (Sapphire Rapids and later): `C[16×16 f32] += A[16×32 bf16] ·
//! B[32×16 bf16]` per `tdpbf16ps`. Stable Rust has no AMX intrinsics, so the few tile
//! instructions are written as inline assembly; everything else is plain Rust.
//!
//! Linux hands out the 8 KiB tile state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`),
//! once per process; [`enable`] asks and says whether it was granted.

use std::arch::asm;
use std::arch::x86_64::__cpuid_count;

/// Bytes in one tile row (16 f32 or 32 bf16).
const ROW_BYTES: usize = 64;

/// A tile configuration (the 64-byte operand of `ldtilecfg`).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<TileConfig>() == 64);

/// Palette 1 with the first tiles' shapes given as (bytes per row, rows), the rest unused.
const fn config(shapes: &[(u16, u8)]) -> TileConfig {
    let mut colsb = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut i = 0;
    while i < shapes.len() {
        (colsb[i], rows[i]) = shapes[i];
        i += 1;
    }
    TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb,
        rows,
    }
}

/// The bf16 products' configuration: every tile 16 rows × 64 bytes.
static CONFIG: TileConfig = config(&[(ROW_BYTES as u16, 16); 8]);

/// Whether the CPU has AMX-TILE, AMX-BF16 and AMX-INT8 and the kernel lets this process use them.
/// Asks the kernel on the first call (process-wide); later calls return the same answer.
pub fn enable() -> bool {
    static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRANTED.get_or_init(|| {
        let leaf7 = __cpuid_count(7, 0);
        let amx_bf16 = leaf7.edx & (1 << 22) != 0;
        let amx_tile = leaf7.edx & (1 << 24) != 0;
        let amx_int8 = leaf7.edx & (1 << 25) != 0;
        if !(amx_bf16 && amx_tile && amx_int8) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only changes this process's permission
        // to use the tile state; it reads and writes no memory of ours.
        let r = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        r == 0
    })
}

/// One block of 32 activation rows × 32 weight rows: `c[i][j] = Σ_k a[i][k] · w[j][k]` over
/// `k_blocks` blocks of 32 columns, plus `init[j]`.
///
/// `init`: 32 values that start every row of the block (the bias, or zeros). `a0`, `a1`:
/// activation rows 0..16 and 16..32, `b0`, `b1`: weight rows 0..16 and 16..32, each
/// `k_blocks` packed tiles of 512 bf16 (1 KiB, 64-byte rows; weights in pair order,
/// see `Bf16Matrix`). The four 16×16 results are stored to `c` (row stride `c_stride` f32).
///
/// # Safety
/// [`enable`] returned true and [`configure`] ran on this thread; `a0`, `a1`, `b0`, `b1` hold
/// `k_blocks * 512` values each, `init` 32 values, `c` holds 32 rows of `c_stride ≥ 32`
/// values.
#[allow(clippy::too_many_arguments)]
pub unsafe fn block_32x32(
    init: *const f32,
    a0: *const u16,
    a1: *const u16,
    b0: *const u16,
    b1: *const u16,
    k_blocks: usize,
    c: *mut f32,
    c_stride: usize,
) {
    let c_bytes = c_stride * 4;
    // SAFETY (all blocks): tile registers are only touched by this module and the
    // configuration in force (set by `configure`) gives every tile 16 rows × 64 bytes; each
    // load/store reads/writes 16 rows of 64 bytes at the given stride, inside the buffers
    // the caller vouched for.
    unsafe {
        // Row stride 0: all 16 rows of a result tile load the same 16 values of `init`.
        asm!(
            "tileloadd tmm0, [{i0} + {zero}*1]",
            "tileloadd tmm1, [{i1} + {zero}*1]",
            "tileloadd tmm2, [{i0} + {zero}*1]",
            "tileloadd tmm3, [{i1} + {zero}*1]",
            i0 = in(reg) init,
            i1 = in(reg) init.add(16),
            zero = in(reg) 0usize,
            options(nostack, readonly),
        );
        for kb in 0..k_blocks {
            asm!(
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b0} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {s}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0.add(kb * 512),
                a1 = in(reg) a1.add(kb * 512),
                b0 = in(reg) b0.add(kb * 512),
                b1 = in(reg) b1.add(kb * 512),
                s = in(reg) ROW_BYTES,
                options(nostack, readonly),
            );
        }
        asm!(
            "tilestored [{c00} + {sc}*1], tmm0",
            "tilestored [{c01} + {sc}*1], tmm1",
            "tilestored [{c10} + {sc}*1], tmm2",
            "tilestored [{c11} + {sc}*1], tmm3",
            c00 = in(reg) c,
            c01 = in(reg) c.add(16),
            c10 = in(reg) c.add(16 * c_stride),
            c11 = in(reg) c.add(16 * c_stride + 16),
            sc = in(reg) c_bytes,
            options(nostack),
        );
    }
}

/// Tile configuration for the int8 products, palette 1: tmm0 (A) 16 rows × 32 bytes (16
/// tokens × 32 signed activation bytes), tmm1 (B) 8 rows × 64 bytes (32 weight bytes of 16
/// rows, in groups of four), tmm2 (C) 16 × 16 i32; tmm3..tmm5 the same again.
static CONFIG_I8: TileConfig = {
    const A: (u16, u8) = (32, 16);
    const B: (u16, u8) = (64, 8);
    const C: (u16, u8) = (64, 16);
    config(&[A, B, C, A, B, C])
};

/// 16 tokens × 16 weight rows int8 products summed over `windows` consecutive 32-column
/// windows: `c[m][n] = Σ_w Σ_k a[m][32w + k] · b_w[k/4][4n + k%4]`; where `b_min` is
/// given, `c_min` likewise from the same activations and `b_min`'s tiles.
///
/// `a`: 16 rows of `32 · windows` signed bytes, `a_stride` bytes apart; `b` (and `b_min`):
/// `windows` tiles of 512 signed bytes one after another, as [`dot_i8_pair`] reads one;
/// `c` (and `c_min`): 256 i32.
///
/// # Safety
/// [`enable`] returned true and [`configure_i8`] ran on this thread; the pointers hold
/// what is described above.
pub unsafe fn dot_i8_run(
    a: *const i8,
    a_stride: usize,
    b: *const i8,
    b_min: Option<*const i8>,
    windows: usize,
    c: *mut i32,
    c_min: *mut i32,
) {
    // SAFETY: as the caller vouches; every load reads inside the described memory, and
    // the stores write 16 rows of 64 bytes to `c` (and `c_min`).
    unsafe {
        asm!("tilezero tmm2", "tilezero tmm5", options(nostack, nomem));
        for w in 0..windows {
            asm!(
                "tileloadd tmm0, [{a} + {sa}*1]",
                "tileloadd tmm1, [{b} + {sb}*1]",
                "tdpbssd tmm2, tmm0, tmm1",
                a = in(reg) a.add(32 * w),
                sa = in(reg) a_stride,
                b = in(reg) b.add(512 * w),
                sb = in(reg) ROW_BYTES,
                options(nostack, readonly),
            );
            if let Some(m) = b_min {
                asm!(
                    "tileloadd tmm4, [{b} + {sb}*1]",
                    "tdpbssd tmm5, tmm0, tmm4",
                    b = in(reg) m.add(512 * w),
                    sb = in(reg) ROW_BYTES,
                    options(nostack, readonly),
                );
            }
        }
        asm!(
            "tilestored [{c} + {sb}*1], tmm2",
            c = in(reg) c,
            sb = in(reg) ROW_BYTES,
            options(nostack),
        );
        if b_min.is_some() {
            asm!(
                "tilestored [{c} + {sb}*1], tmm5",
                c = in(reg) c_min,
                sb = in(reg) ROW_BYTES,
                options(nostack),
            );
        }
    }
}

/// Two 16 tokens × 16 weight rows int8 products over a 32-column window each:
/// `c0[m][n] = Σ_k a0[m][k] · b0[k/4][4n + k%4]`, likewise `c1` from `a1`, `b1`.
///
/// `a0`, `a1`: 16 rows of 32 signed bytes, `a_stride` bytes apart; `b0`, `b1`: 512 signed
/// bytes each (8 rows of 64, the layout `tdpbssd` reads B in); `c0`, `c1`: 256 i32 each.
///
/// # Safety
/// [`enable`] returned true and [`configure_i8`] ran on this thread; the pointers hold
/// what is described above.
pub unsafe fn dot_i8_pair(
    a0: *const i8,
    a1: *const i8,
    a_stride: usize,
    b0: *const i8,
    b1: *const i8,
    c0: *mut i32,
    c1: *mut i32,
) {
    // SAFETY: the int8 configuration is in force (A 16 × 32 bytes, B 8 × 64, C 16 × 64);
    // each load reads and each store writes exactly the bytes the caller vouched for.
    unsafe {
        asm!(
            "tileloadd tmm0, [{a0} + {sa}*1]",
            "tileloadd tmm1, [{b0} + {sb}*1]",
            "tilezero tmm2",
            "tdpbssd tmm2, tmm0, tmm1",
            "tileloadd tmm3, [{a1} + {sa}*1]",
            "tileloadd tmm4, [{b1} + {sb}*1]",
            "tilezero tmm5",
            "tdpbssd tmm5, tmm3, tmm4",
            "tilestored [{c0} + {sb}*1], tmm2",
            "tilestored [{c1} + {sb}*1], tmm5",
            a0 = in(reg) a0,
            a1 = in(reg) a1,
            sa = in(reg) a_stride,
            b0 = in(reg) b0,
            b1 = in(reg) b1,
            sb = in(reg) ROW_BYTES,
            c0 = in(reg) c0,
            c1 = in(reg) c1,
            options(nostack),
        );
    }
}

/// Loads the int8 tile configuration on this thread.
///
/// # Safety
/// [`enable`] returned true.
pub unsafe fn configure_i8() {
    // SAFETY: as for `configure`, with the int8 shapes (valid for palette 1).
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) &CONFIG_I8 as *const TileConfig, options(nostack, readonly))
    };
}

/// Loads the tile configuration on this thread.
///
/// # Safety
/// [`enable`] returned true.
pub unsafe fn configure() {
    // SAFETY: the configuration is valid for palette 1 (8 tiles of 16 × 64 bytes), and the
    // caller has the kernel's permission to use tile state.
    unsafe {
        asm!("ldtilecfg [{0}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly))
    };
}

/// Releases this thread's tile state (so context switches stop saving it).
///
/// # Safety
/// [`enable`] returned true.
pub unsafe fn release() {
    // SAFETY: `tilerelease` only resets the tile state of this thread.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}
