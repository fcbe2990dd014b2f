//! The model cache, laid out like Ollama's:
//!
//! ```text
//! $HEARTH_MODELS (default ~/.cache/hearth/models)
//!   blobs/sha256-<hex>               GGUF files, named by their content hash
//!   blobs/partial/<key>.part         downloads in progress (resumed by the next pull)
//!   manifests/<name parts>/<tag>.json {"name", "source", "url", "digest", "size", "pulled_at"}
//!   *.gguf                           files placed by scripts/fetch-models (short names)
//! ```
//!
//! Names are validated ([`name::ModelName`]) before any file operation; blobs are written
//! under a temporary name, hashed, checked as GGUF and renamed into place, so the cache never
//! holds a half-written or unverified model under a name.

pub mod name;
pub mod pull;
pub mod scan;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use name::ModelName;
pub use pull::{PullOptions, Source};
pub use scan::Scan;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid model name {name:?}: {why}")]
    InvalidName { name: String, why: String },
    #[error("no model {0:?} in the cache (hearth list shows what is there; hearth pull fetches)")]
    NotFound(String),
    #[error("{0}")]
    BadSource(String),
    #[error("network access is off (HEARTH_OFFLINE is set); cannot fetch {0}")]
    Offline(String),
    #[error("{url}: HTTP {status}")]
    Http { url: String, status: u16 },
    #[error("{url}: {message}")]
    Network { url: String, message: String },
    #[error("{url}: the server kept failing after {attempts} attempts: {last}")]
    GaveUp {
        url: String,
        attempts: usize,
        last: String,
    },
    #[error("{url}: sha256 is {actual}, expected {expected}; the download was discarded")]
    HashMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{url}: the server announces {announced} bytes but the file is {expected} bytes")]
    SizeMismatch {
        url: String,
        announced: u64,
        expected: u64,
    },
    #[error("{url}: {needed} bytes needed but only {available} are free in {dir}")]
    NoSpace {
        url: String,
        needed: u64,
        available: u64,
        dir: String,
    },
    #[error("{0}")]
    Resolve(String),
    #[error("the downloaded file is not a usable GGUF: {0}")]
    NotGguf(#[from] hearth_gguf::GgufError),
    #[error("{path}: {cause}")]
    Io { path: String, cause: std::io::Error },
}

pub type Result<T> = std::result::Result<T, StoreError>;

pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |cause| StoreError::Io {
        path: path.display().to_string(),
        cause,
    }
}

/// Short names known to `scripts/fetch-models`, and their files in the models directory.
pub const SHORT_NAMES: &[(&str, &str)] = &[
    ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ("gemma3", "gemma-3-270m-q4_k_m.gguf"),
];

/// Short names of sentence-transformers directories fetched by `scripts/fetch-models`.
pub const ENCODER_SHORT_NAMES: &[(&str, &str)] = &[("minilm", "all-MiniLM-L6-v2")];

/// `$HEARTH_MODELS`, else `~/.cache/hearth/models`.
pub fn default_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("HEARTH_MODELS") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("hearth").join("models")
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub name: String,
    /// What the user asked to pull.
    pub source: String,
    /// Where the bytes came from (empty for an imported local file).
    pub url: String,
    /// `sha256:<hex>` of the blob.
    pub digest: String,
    pub size: u64,
    /// Unix seconds.
    pub pulled_at: u64,
}

/// One row of `hearth list`.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    /// Unix seconds of the last change.
    pub modified: u64,
    pub digest: Option<String>,
    /// Other names that resolve to this entry (its file name, its bare stem); see [`scan`].
    pub aliases: Vec<String>,
}

pub struct Store {
    root: PathBuf,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Unix seconds of a file's last change (0 when unknown).
pub fn mtime(meta: &std::fs::Metadata) -> u64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Store {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn open_default() -> Self {
        Self::new(default_root())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs")
    }

    pub(crate) fn partial_dir(&self) -> PathBuf {
        self.blobs_dir().join("partial")
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }

    /// The blob file for a digest `sha256:<hex>`; `None` unless the digest is well formed.
    pub fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:")?;
        let ok = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        ok.then(|| self.blobs_dir().join(format!("sha256-{hex}")))
    }

    fn manifest_path(&self, name: &ModelName) -> PathBuf {
        self.manifests_dir().join(name.manifest_relpath())
    }

    pub fn manifest(&self, name: &ModelName) -> Result<Option<Manifest>> {
        let path = self.manifest_path(name);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                StoreError::Resolve(format!("{}: corrupt manifest: {e}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// The GGUF file behind a name: anything [`Store::list`] prints, or one of its aliases
    /// (see [`scan`]). `name` is validated first, so it is never used as a path.
    pub fn resolve(&self, name: &str) -> Result<PathBuf> {
        self.lookup(name).map(|e| e.path)
    }

    /// The listed entry behind a name, as [`Store::resolve`] finds it.
    pub fn lookup(&self, name: &str) -> Result<Entry> {
        let parsed = ModelName::parse(name)?;
        if let Some(entry) = self.find(name) {
            // A pulled model's path is its blob, which must be there.
            if entry.digest.is_some() && !entry.path.is_file() {
                return Err(StoreError::Resolve(format!(
                    "{} is missing its blob {}; pull it again",
                    entry.name,
                    entry.path.display()
                )));
            }
            return Ok(entry);
        }
        let bare = name.strip_suffix(":latest").unwrap_or(name);
        if let Some((short, file)) = SHORT_NAMES.iter().find(|(n, _)| *n == bare) {
            return Err(StoreError::Resolve(format!(
                "model {short:?} is not downloaded yet ({} is missing): run scripts/fetch-models {short}",
                self.root.join(file).display()
            )));
        }
        // A manifest the scan skipped (say, its name is shadowed): report why it is unusable.
        if let Some(m) = self.manifest(&parsed)? {
            self.blob_of(&m)?;
        }
        Err(StoreError::NotFound(name.to_string()))
    }

    fn blob_of(&self, m: &Manifest) -> Result<PathBuf> {
        let path = self.blob_path(&m.digest).ok_or_else(|| {
            StoreError::Resolve(format!("manifest of {} has a bad digest", m.name))
        })?;
        if !path.is_file() {
            return Err(StoreError::Resolve(format!(
                "{} is missing its blob {}; pull it again",
                m.name,
                path.display()
            )));
        }
        Ok(path)
    }

    /// Every manifest under `manifests/`, depth-bounded, skipping unreadable ones.
    fn manifests(&self) -> Vec<(PathBuf, Manifest)> {
        let mut out = Vec::new();
        let mut stack = vec![(self.manifests_dir(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                let Ok(ft) = e.file_type() else { continue };
                if ft.is_dir() && depth < 8 {
                    stack.push((p, depth + 1));
                } else if ft.is_file() && p.extension().is_some_and(|x| x == "json") {
                    if let Some(m) = std::fs::read(&p)
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Manifest>(&b).ok())
                    {
                        out.push((p, m));
                    }
                }
            }
        }
        out
    }

    /// Every model the folder offers, sorted by name (see [`scan`]; [`Store::scan`] also
    /// says what was skipped and why).
    pub fn list(&self) -> Result<Vec<Entry>> {
        Ok(self.scan().entries)
    }

    /// Removes a pulled model (and its blob when no other name uses it), or a GGUF file in
    /// the folder by any name that resolves to it (a symlink is removed, not its target).
    /// Returns the files deleted.
    pub fn remove(&self, name: &str) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        let parsed = ModelName::parse(name)?;
        if let Some(m) = self.manifest(&parsed)? {
            let mpath = self.manifest_path(&parsed);
            std::fs::remove_file(&mpath).map_err(io_err(&mpath))?;
            removed.push(mpath.clone());
            // Drop now-empty name directories, never above manifests/.
            let top = self.manifests_dir();
            let mut dir = mpath.parent().map(Path::to_path_buf);
            while let Some(d) = dir {
                if d == top || !d.starts_with(&top) || std::fs::remove_dir(&d).is_err() {
                    break;
                }
                dir = d.parent().map(Path::to_path_buf);
            }
            let still_used = self.manifests().iter().any(|(_, o)| o.digest == m.digest);
            if let (false, Some(blob)) = (still_used, self.blob_path(&m.digest)) {
                if blob.is_file() {
                    std::fs::remove_file(&blob).map_err(io_err(&blob))?;
                    removed.push(blob);
                }
            }
            return Ok(removed);
        }
        if let Some(entry) = self.find(name).filter(|e| e.digest.is_none()) {
            // The entry's path is inside the folder as found: a link, not its target.
            std::fs::remove_file(&entry.path).map_err(io_err(&entry.path))?;
            removed.push(entry.path);
            return Ok(removed);
        }
        Err(StoreError::NotFound(name.to_string()))
    }

    /// Records `name` → blob, atomically (write a temporary file, then rename).
    pub(crate) fn write_manifest(&self, name: &ModelName, m: &Manifest) -> Result<()> {
        let path = self.manifest_path(name);
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let tmp = dir.join(format!(".{}.tmp", name.tag));
        let json = serde_json::to_vec_pretty(m).map_err(|e| StoreError::Io {
            path: tmp.display().to_string(),
            cause: std::io::Error::other(e),
        })?;
        std::fs::write(&tmp, json).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(())
    }

    /// Moves a verified file into `blobs/` under its digest and points `name` at it.
    pub(crate) fn commit(
        &self,
        file: &Path,
        sha: &str,
        name: &ModelName,
        source: &str,
        url: &str,
    ) -> Result<Manifest> {
        let digest = format!("sha256:{sha}");
        let blob = self
            .blob_path(&digest)
            .ok_or_else(|| StoreError::Resolve(format!("bad digest {digest}")))?;
        let size = std::fs::metadata(file).map_err(io_err(file))?.len();
        if blob.is_file() {
            std::fs::remove_file(file).map_err(io_err(file))?;
        } else {
            std::fs::rename(file, &blob).map_err(io_err(&blob))?;
        }
        let m = Manifest {
            name: name.to_string(),
            source: source.to_string(),
            url: url.to_string(),
            digest,
            size,
            pulled_at: unix_now(),
        };
        self.write_manifest(name, &m)?;
        Ok(m)
    }

    /// Copies a local GGUF into the cache under `name` (checked as GGUF first).
    pub fn import(&self, file: &Path, name: &ModelName, source: &str) -> Result<Manifest> {
        hearth_gguf::Gguf::open(file)?;
        let partial = self.partial_dir();
        std::fs::create_dir_all(&partial).map_err(io_err(&partial))?;
        let tmp = partial.join(format!("import-{}.part", std::process::id()));
        std::fs::copy(file, &tmp).map_err(io_err(file))?;
        let sha = match sha256_file(&tmp) {
            Ok(sha) => sha,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        self.commit(&tmp, &sha, name, source, "")
    }
}

impl Store {
    /// Embedding models: directories holding `config.json` and `model.safetensors`, by name
    /// (the short name for fetched ones, else the directory name).
    pub fn encoders(&self) -> Vec<(String, PathBuf)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = e.path();
            if !(p.join("config.json").is_file() && p.join("model.safetensors").is_file()) {
                continue;
            }
            let dir = e.file_name().to_string_lossy().into_owned();
            // A folder name that is not a valid model name is listed (and resolved) made valid.
            let name = ENCODER_SHORT_NAMES
                .iter()
                .find(|(_, d)| *d == dir)
                .map_or_else(|| name::sanitize_segment(&dir), |(n, _)| n.to_string());
            out.push((name, p));
        }
        out.sort();
        out
    }

    /// The directory of the embedding model called `name` (validated first).
    pub fn resolve_encoder(&self, name: &str) -> Result<PathBuf> {
        let bare = name.strip_suffix(":latest").unwrap_or(name);
        ModelName::parse(bare)?;
        self.encoders()
            .into_iter()
            .find(|(n, p)| n == bare || p.file_name().is_some_and(|f| f == bare))
            .map(|(_, p)| p)
            .ok_or_else(|| StoreError::NotFound(name.to_string()))
    }
}

/// "3 minutes ago", like `ollama list`.
pub fn ago(unix: u64) -> String {
    let secs = unix_now().saturating_sub(unix);
    let (n, unit) = match secs {
        0..=59 => return "just now".to_string(),
        60..=3599 => (secs / 60, "minute"),
        3600..=86_399 => (secs / 3600, "hour"),
        86_400..=2_591_999 => (secs / 86_400, "day"),
        2_592_000..=31_535_999 => (secs / 2_592_000, "month"),
        _ => (secs / 31_536_000, "year"),
    };
    format!("{n} {unit}{} ago", if n == 1 { "" } else { "s" })
}
