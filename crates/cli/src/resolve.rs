//! Model arguments: a cached name (short names from the fetch script, pulled models) or a
//! path to a .gguf file.

use std::path::{Path, PathBuf};

use hearth_store::Store;

pub fn resolve_model(name: &str) -> anyhow::Result<PathBuf> {
    let store = Store::open_default();
    let looks_like_path = name.starts_with('.')
        || name.starts_with('/')
        || name.to_ascii_lowercase().ends_with(".gguf");
    let path = Path::new(name);
    if hearth_store::SHORT_NAMES.iter().all(|(n, _)| *n != name) && path.is_file() {
        return Ok(path.to_path_buf());
    }
    match store.resolve(name) {
        Ok(p) => Ok(p),
        Err(_) if looks_like_path => anyhow::bail!("no such model file: {name}"),
        Err(e) => Err(e.into()),
    }
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
