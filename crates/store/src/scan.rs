//! What a models folder offers, and under which names.
//!
//! One scan produces every entry `hearth list`, `/v1/models` and `/api/tags` show, and name
//! lookups go through the same scan, so a name that is listed is a name that resolves.
//!
//! Naming, in this order (earlier claims win, so names do not depend on file-system order):
//! 1. files of `scripts/fetch-models` at the top level: their short name (`smollm2`);
//! 2. pulled models: the name in their manifest (`hf.co/org/repo:Q4_K_M`);
//! 3. every other `*.gguf` under the folder (sub-folders up to [`MAX_DEPTH`] deep, symlinks
//!    followed), sorted by path: its path without the extension (`smollm2`,
//!    `qwen/qwen2.5-0.5b`), each part made a valid name part (`My Model (1)` → `My-Model-1-`).
//!    If that name is taken, its path with the extension (`smollm2.GGUF`), then `-2`, `-3`, …
//!
//! Besides its listed name, an entry also answers to its file path (`smollm2.gguf`), and
//! to its bare file stem and file name when no other entry claims them (a file in a
//! sub-folder); `NAME` and `NAME:latest` are the same name.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::name::{sanitize_segment, ModelName};
use crate::{mtime, Entry, Store, SHORT_NAMES};

/// How deep below the models folder GGUF files are looked for.
pub const MAX_DEPTH: usize = 4;
/// Directory entries looked at before a scan stops (a hostile or huge folder stays cheap).
pub const MAX_VISITED: usize = 20_000;

/// The result of one scan: entries sorted by name, and what was skipped and why.
#[derive(Debug, Default)]
pub struct Scan {
    pub entries: Vec<Entry>,
    pub warnings: Vec<String>,
}

/// The comparable form of a name: `x` and `x:latest` are one name. `None` for a string that
/// is not a valid model name.
pub(crate) fn name_key(name: &str) -> Option<String> {
    ModelName::parse(name).ok().map(|n| n.to_string())
}

struct LocalFile {
    /// Path relative to the models folder, as found (a link keeps its own name).
    rel: PathBuf,
    path: PathBuf,
    size: u64,
    modified: u64,
}

/// Every `*.gguf` under `root`, depth-bounded, following symlinks to regular files; links
/// that lead nowhere usable are reported in `warnings`, never dropped silently.
fn local_files(root: &Path, warnings: &mut Vec<String>) -> Vec<LocalFile> {
    let mut out = Vec::new();
    let mut visited = 0usize;
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            if depth > 0 {
                warnings.push(format!(
                    "skipping {}: cannot read the folder",
                    dir.display()
                ));
            }
            continue;
        };
        for e in rd.flatten() {
            visited += 1;
            if visited > MAX_VISITED {
                warnings.push(format!(
                    "stopped looking for models after {MAX_VISITED} files in {}",
                    root.display()
                ));
                return out;
            }
            let path = e.path();
            let file_name = e.file_name();
            let file_name = file_name.to_string_lossy();
            if file_name.starts_with('.') {
                continue;
            }
            if depth == 0 && (file_name == "blobs" || file_name == "manifests") {
                continue;
            }
            let Ok(ft) = e.file_type() else { continue };
            let is_link = ft.is_symlink();
            let is_gguf = Path::new(&*file_name)
                .extension()
                .is_some_and(|x| x.eq_ignore_ascii_case("gguf"));
            // `metadata` follows links: a link is judged by what it points at.
            let md = match std::fs::metadata(&path) {
                Ok(md) => md,
                Err(err) => {
                    if is_link && is_gguf {
                        warnings.push(format!(
                            "skipping {}: a symlink to a file that cannot be opened ({err})",
                            path.display()
                        ));
                    }
                    continue;
                }
            };
            if md.is_dir() {
                if depth < MAX_DEPTH {
                    stack.push((path, depth + 1));
                }
                continue;
            }
            if !is_gguf {
                continue;
            }
            if !md.is_file() {
                warnings.push(format!("skipping {}: not a regular file", path.display()));
                continue;
            }
            let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            out.push(LocalFile {
                rel,
                path,
                size: md.len(),
                modified: mtime(&md),
            });
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    out
}

/// `rel` as a name: each folder part and the file stem (or whole file name) made valid.
fn name_from_path(rel: &Path, keep_extension: bool) -> String {
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let mut segments: Vec<String> = Vec::with_capacity(parts.len());
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let text = if last && !keep_extension {
            Path::new(part)
                .file_stem()
                .map_or(part.clone(), |s| s.to_string_lossy().into_owned())
        } else {
            part.clone()
        };
        segments.push(sanitize_segment(&text));
    }
    segments.join("/")
}

impl Store {
    /// Every model in the folder with the names it answers to. See the module docs.
    pub fn scan(&self) -> Scan {
        let mut warnings = Vec::new();
        let mut entries: Vec<Entry> = Vec::new();
        let mut taken: HashSet<String> = HashSet::new();
        let files = local_files(&self.root, &mut warnings);
        let mut claimed_paths: HashSet<PathBuf> = HashSet::new();

        // 1. fetch-script files under their short names.
        for (short, file) in SHORT_NAMES {
            if let Some(f) = files.iter().find(|f| f.rel == Path::new(file)) {
                taken.insert(name_key(short).unwrap_or_default());
                claimed_paths.insert(f.rel.clone());
                entries.push(Entry {
                    name: short.to_string(),
                    path: f.path.clone(),
                    size: f.size,
                    modified: f.modified,
                    digest: None,
                    aliases: Vec::new(),
                });
            }
        }
        // 2. pulled models.
        let mut manifests = self.manifests();
        manifests.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        for (mpath, m) in manifests {
            let (Some(key), Some(blob)) = (name_key(&m.name), self.blob_path(&m.digest)) else {
                warnings.push(format!("skipping {}: bad name or digest", mpath.display()));
                continue;
            };
            if !taken.insert(key) {
                warnings.push(format!(
                    "skipping {}: the name {} is already used",
                    mpath.display(),
                    m.name
                ));
                continue;
            }
            let modified = std::fs::metadata(&mpath).map_or(m.pulled_at, |md| mtime(&md));
            entries.push(Entry {
                name: m.name.clone(),
                path: blob,
                size: m.size,
                modified,
                digest: Some(m.digest.clone()),
                aliases: Vec::new(),
            });
        }
        // 3. every other GGUF file: a name from its path, made unique.
        let first_local = entries.len();
        for f in files.iter().filter(|f| !claimed_paths.contains(&f.rel)) {
            if f.rel.iter().count() > 6 {
                continue; // deeper than a name can be (MAX_DEPTH keeps us well below)
            }
            let stem_name = name_from_path(&f.rel, false);
            let file_name = name_from_path(&f.rel, true);
            let mut chosen = None;
            for candidate in [stem_name.clone(), file_name.clone()] {
                if let Some(key) = name_key(&candidate) {
                    if !taken.contains(&key) {
                        chosen = Some((candidate, key));
                        break;
                    }
                }
            }
            if chosen.is_none() {
                chosen = (2..1000).find_map(|n| {
                    let candidate = format!("{stem_name}-{n}");
                    let key = name_key(&candidate)?;
                    (!taken.contains(&key)).then_some((candidate, key))
                });
            }
            let Some((name, key)) = chosen else {
                warnings.push(format!(
                    "skipping {}: no usable name for it",
                    f.path.display()
                ));
                continue;
            };
            taken.insert(key);
            entries.push(Entry {
                name,
                path: f.path.clone(),
                size: f.size,
                modified: f.modified,
                digest: None,
                aliases: Vec::new(),
            });
        }

        // Aliases: file paths always (when free); bare stems and file names of files in
        // sub-folders, and fetch-script file names, only when exactly one entry claims them.
        let mut claims: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            let Ok(rel) = e.path.strip_prefix(&self.root) else {
                continue; // a blob: known by its manifest name only
            };
            if i < first_local && e.digest.is_some() {
                continue;
            }
            let bare = Path::new(rel.file_name().unwrap_or_default());
            let mut candidates = vec![
                name_from_path(rel, true),
                name_from_path(rel, false),
                name_from_path(bare, true),
                name_from_path(bare, false),
            ];
            candidates.sort();
            candidates.dedup();
            for c in candidates {
                if let Some(key) = name_key(&c) {
                    if !taken.contains(&key) {
                        claims.entry(c).or_default().push(i);
                    }
                }
            }
        }
        let mut claims: Vec<(String, Vec<usize>)> = claims.into_iter().collect();
        claims.sort();
        for (alias, owners) in claims {
            if let [only] = owners[..] {
                entries[only].aliases.push(alias);
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Scan { entries, warnings }
    }

    /// The entry a name (or one of its aliases, with or without `:latest`) refers to.
    pub(crate) fn find(&self, name: &str) -> Option<Entry> {
        let key = name_key(name)?;
        self.scan().entries.into_iter().find(|e| {
            name_key(&e.name).as_deref() == Some(key.as_str())
                || e.aliases
                    .iter()
                    .any(|a| name_key(a).as_deref() == Some(key.as_str()))
        })
    }
}
