//! The dispatch levels a kernel test compares against the scalar reference, and a record of
//! them: printed on stderr (`--nocapture`) and, when `HEARTH_LEVELS_LOG` names a file,
//! appended there as `<suite> <level>...` so `.ci/run` can fail a run that tested fewer
//! levels than the CPU has (a test that silently compares nothing must not pass as tested).

#![allow(dead_code)]

use hearth_quant::dispatch::{available, detect, Isa, Kernels};
use std::io::Write;
use std::sync::Mutex;

/// Writes `suite` and `levels` once per process and suite.
pub fn record(suite: &str, levels: &[Isa]) {
    static DONE: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.iter().any(|s| s == suite) {
        return;
    }
    done.push(suite.to_string());
    let names: Vec<&str> = levels.iter().map(|l| l.name()).collect();
    let line = format!("{suite} {}", names.join(" "));
    eprintln!(
        "kernel levels tested: {line} (CPU best: {})",
        detect().name()
    );
    if let Some(path) = std::env::var_os("HEARTH_LEVELS_LOG") {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("HEARTH_LEVELS_LOG is writable");
        writeln!(f, "{line}").expect("HEARTH_LEVELS_LOG is writable");
    }
}

/// The kernel tables of every SIMD level this CPU runs (all but the scalar reference they
/// are compared with), recorded under `suite`.
pub fn levels(suite: &str) -> Vec<Kernels> {
    let simd: Vec<Isa> = available()
        .into_iter()
        .filter(|&l| l != Isa::Scalar)
        .collect();
    record(suite, &simd);
    simd.into_iter().map(Kernels::for_isa).collect()
}
