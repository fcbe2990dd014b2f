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

/// The KV cache type: `--kv-type` (or `HEARTH_KV_TYPE`, which clap reads into it), else
/// Ollama's `OLLAMA_KV_CACHE_TYPE` as Ollama users set it, else f16.
pub fn kv_type(arg: Option<hearth_models::KvType>) -> anyhow::Result<hearth_models::KvType> {
    if let Some(t) = arg {
        return Ok(t);
    }
    match std::env::var("OLLAMA_KV_CACHE_TYPE") {
        Ok(v) if !v.trim().is_empty() => hearth_models::KvType::parse(&v).ok_or_else(|| {
            anyhow::anyhow!(
                "OLLAMA_KV_CACHE_TYPE={v:?} is not a KV cache type (supported: {})",
                hearth_models::KvType::NAMES
            )
        }),
        _ => Ok(hearth_models::KvType::F16),
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
