//! The models the server offers: everything in the model cache, loaded on first use, each
//! with its own continuous-batching scheduler.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_engine::scheduler::SchedulerConfig;
use hearth_engine::{LoadedModel, Scheduler};
use hearth_store::{Entry, ModelName, Store, StoreError};
use tokio::sync::OnceCell;

use crate::error::{Api, ApiError, Kind};

pub struct Served {
    pub name: String,
    pub path: PathBuf,
    pub loaded: Arc<LoadedModel>,
    pub scheduler: Scheduler,
    pub load_time: Duration,
    pub size: u64,
    /// The model's grammar index for constrained output, built on first use.
    pub grammars: OnceCell<Arc<hearth_engine::constraint::Grammars>>,
}

pub struct Registry {
    store: Store,
    scheduler: SchedulerConfig,
    loaded: Cells<Served>,
    encoders: Cells<ServedEncoder>,
}

/// An embedding model and the thread that batches requests for it.
pub struct ServedEncoder {
    pub name: String,
    pub embedder: Arc<hearth_embed::Embedder>,
    pub batcher: crate::embed::Batcher,
    pub load_time: Duration,
}

impl Registry {
    pub fn new(models_dir: PathBuf, scheduler: SchedulerConfig) -> Self {
        Self {
            store: Store::new(models_dir),
            scheduler,
            loaded: Mutex::new(HashMap::new()),
            encoders: Mutex::new(HashMap::new()),
        }
    }

    /// Embedding models in the cache: (name, directory).
    pub fn encoders(&self) -> Vec<(String, PathBuf)> {
        self.store.encoders()
    }

    /// The embedding model called `name`, loaded on first use.
    pub async fn encoder(&self, api: Api, name: &str) -> Result<Arc<ServedEncoder>, ApiError> {
        if name.is_empty() {
            return Err(ApiError::param(api, "model", "model is required"));
        }
        let dir = self.store.resolve_encoder(name).map_err(|e| match e {
            StoreError::InvalidName { .. } => ApiError::param(api, "model", e.to_string()),
            _ => ApiError::new(
                api,
                Kind::NotFound,
                format!("embedding model {name:?} not found"),
            ),
        })?;
        let key = name.strip_suffix(":latest").unwrap_or(name).to_string();
        load_once(&self.encoders, api, key.clone(), move || {
            let t = Instant::now();
            let embedder = Arc::new(hearth_embed::Embedder::open(&dir).map_err(|e| e.to_string())?);
            Ok(ServedEncoder {
                name: key,
                batcher: crate::embed::Batcher::start(embedder.clone()),
                embedder,
                load_time: t.elapsed(),
            })
        })
        .await
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler
    }

    /// Cached GGUF models.
    pub fn list(&self) -> Vec<Entry> {
        self.store.list().unwrap_or_default()
    }

    /// Models loaded so far.
    pub fn running(&self) -> Vec<Arc<Served>> {
        let map = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        map.values().filter_map(|c| c.get().cloned()).collect()
    }

    /// The cache entry of the model called `name`: a name that is not a valid model name is
    /// refused before any file access.
    fn resolve(&self, api: Api, name: &str) -> Result<Entry, ApiError> {
        if name.is_empty() {
            return Err(ApiError::param(api, "model", "model is required"));
        }
        ModelName::parse(name).map_err(|e| ApiError::param(api, "model", e.to_string()))?;
        self.store.lookup(name).map_err(|e| match e {
            StoreError::InvalidName { .. } => ApiError::param(api, "model", e.to_string()),
            _ => ApiError::new(
                api,
                Kind::NotFound,
                format!("model {name:?} not found; pull it first (hearth pull)"),
            ),
        })
    }

    /// Whether `name` is a model this server offers (400 or 404 if not).
    pub fn check_name(&self, api: Api, name: &str) -> Result<(), ApiError> {
        self.resolve(api, name).map(|_| ())
    }

    /// Whether the model called `name` (any of its aliases) is in memory.
    pub fn is_loaded(&self, name: &str) -> bool {
        let Ok(entry) = self.resolve(Api::OpenAi, name) else {
            return false;
        };
        let map = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&entry.name).is_some_and(|c| c.get().is_some())
    }

    /// The model called `name`, loading it on first use (concurrent first requests wait for
    /// one load).
    pub async fn get(&self, api: Api, name: &str) -> Result<Arc<Served>, ApiError> {
        // Every alias of a model (file name, `:latest`, …) shares one loaded copy, under the
        // name the model is listed as.
        let entry = self.resolve(api, name)?;
        let path = entry.path;
        let config = self.scheduler.clone();
        let key = entry.name;
        load_once(&self.loaded, api, key.clone(), move || {
            let t = Instant::now();
            let mut loaded = LoadedModel::open(&path).map_err(|e| e.to_string())?;
            // A model whose heads a quantized cache cannot hold is served with f16, as
            // Ollama falls back, so one such model does not make the others unusable.
            if let Err(e) = loaded.model.set_kv_type(config.kv_type) {
                tracing::warn!(model = %key, "{e}; using an f16 KV cache");
            }
            let loaded = Arc::new(loaded);
            loaded
                .model
                .check_memory_pooled(config.n_ctx, config.parallel.max(1), config.budget())
                .map_err(|e| e.to_string())?;
            let scheduler = Scheduler::start(loaded.clone(), config);
            let size = std::fs::metadata(&path).map_or(0, |m| m.len());
            tracing::info!(model = %key, "loaded in {:?}", t.elapsed());
            Ok(Served {
                name: key,
                path,
                loaded,
                scheduler,
                load_time: t.elapsed(),
                size,
                grammars: OnceCell::new(),
            })
        })
        .await
    }
}

type Cells<T> = Mutex<HashMap<String, Arc<OnceCell<Arc<T>>>>>;

/// The value under `key`, built by `load` on a blocking thread the first time; concurrent
/// first requests wait for that one load, and a failed load is tried again next time.
async fn load_once<T: Send + Sync + 'static>(
    cells: &Cells<T>,
    api: Api,
    key: String,
    load: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<Arc<T>, ApiError> {
    let cell = {
        let mut map = cells.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(key.clone()).or_default().clone()
    };
    let value = cell
        .get_or_try_init(|| async {
            tokio::task::spawn_blocking(load)
                .await
                .map_err(|e| ApiError::new(api, Kind::Internal, e.to_string()))?
                .map(Arc::new)
                .map_err(|e| {
                    ApiError::new(
                        api,
                        Kind::Unavailable,
                        format!("model {key:?} could not be loaded: {e}"),
                    )
                })
        })
        .await?;
    Ok(value.clone())
}
