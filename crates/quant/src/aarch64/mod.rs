//! NEON kernels for aarch64 (planned). Until they land, aarch64 runs the scalar reference
//! kernels, which the compiler auto-vectorises in part.
