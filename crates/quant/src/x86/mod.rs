//! x86-64 SIMD kernels. Built for baseline x86-64; each kernel enables its features with
//! `#[target_feature]` and is only reachable through [`kernels`] after runtime detection.

use crate::dispatch::{Isa, Kernels};

/// Kernels for an x86 level the CPU is known to support.
pub fn kernels(isa: Isa) -> Kernels {
    let mut k = Kernels::scalar();
    k.isa = isa;
    k
}
