//! Model names: short names resolve to files the fetch script caches; anything else is a path.

use std::path::{Path, PathBuf};

/// Short names known to `scripts/fetch-models`.
pub const SHORT_NAMES: &[(&str, &str)] = &[
    ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("gemma3", "gemma-3-270m-q4_k_m.gguf"),
];

/// `$HEARTH_MODELS`, else `~/.cache/hearth/models`.
pub fn models_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HEARTH_MODELS") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("hearth").join("models")
}

pub fn resolve_model(name: &str) -> anyhow::Result<PathBuf> {
    if let Some((_, file)) = SHORT_NAMES.iter().find(|(n, _)| *n == name) {
        let path = models_dir().join(file);
        if !path.is_file() {
            anyhow::bail!(
                "model {name:?} is not downloaded yet ({} is missing): run scripts/fetch-models {name}",
                path.display()
            );
        }
        return Ok(path);
    }
    let path = Path::new(name);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let known: Vec<&str> = SHORT_NAMES.iter().map(|(n, _)| *n).collect();
    anyhow::bail!(
        "no model {name:?}: not a file and not a known name ({})",
        known.join(", ")
    )
}

/// Physical cores (distinct core ids), falling back to logical CPUs.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let mut cores = std::collections::HashSet::new();
    let mut phys = "";
    for line in info.lines() {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim() {
                "physical id" => phys = v.trim(),
                "core id" => {
                    cores.insert((phys.to_string(), v.trim().to_string()));
                }
                _ => {}
            }
        }
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}
