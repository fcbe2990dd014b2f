//! `hearth pull`: Hugging Face references, plain URLs and local files into the cache.
//!
//! Downloads go to `blobs/partial/<key>.part` and resume from there with an HTTP Range
//! request (within one pull after a dropped connection, or on the next pull). The finished
//! file is hashed, checked against the hub's published LFS sha256 when there is one, opened
//! as GGUF, and only then renamed into `blobs/` and named by a manifest. A failed check
//! deletes the download: nothing unverified stays in the cache.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, ETAG, RANGE};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::name::{sanitize_segment, ModelName, DEFAULT_TAG};
use crate::{hex, io_err, sha256_file, Manifest, Result, Store, StoreError};

pub const DEFAULT_HF_ENDPOINT: &str = "https://huggingface.co";

#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Name to store the model under (default: derived from the source).
    pub name: Option<String>,
    /// Expected sha256 (hex), for sources that do not publish one.
    pub sha256: Option<String>,
    /// `HF_ENDPOINT`, default <https://huggingface.co>.
    pub hf_endpoint: String,
    /// `HF_TOKEN`, sent only to the Hugging Face endpoint.
    pub hf_token: Option<String>,
    /// `HEARTH_OFFLINE=1`: no network at all.
    pub offline: bool,
    /// Draw a progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// Tries per download, resuming each time.
    pub attempts: usize,
}

impl PullOptions {
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            name: None,
            sha256: None,
            hf_endpoint: var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_HF_ENDPOINT.to_string()),
            hf_token: var("HF_TOKEN"),
            offline: var("HEARTH_OFFLINE").is_some_and(|v| v != "0"),
            progress: true,
            attempts: 5,
        }
    }
}

/// Most redirects one request may take (the hub's resolve → CDN is one).
const MAX_REDIRECTS: usize = 10;

/// Whether `url` is the Hugging Face endpoint's own origin: same scheme, host and port,
/// compared parsed and exactly (`huggingface.co.evil.example` and `:8001` vs `:800` are not).
pub fn same_origin(url: &reqwest::Url, endpoint: &str) -> bool {
    reqwest::Url::parse(endpoint).is_ok_and(|e| {
        url.scheme() == e.scheme()
            && url.host_str() == e.host_str()
            && url.port_or_known_default() == e.port_or_known_default()
    })
}

/// GET `url` (from byte `from` on), following redirects one hop at a time so that
/// `HF_TOKEN` is attached to exactly the hops whose origin is the hub's.
fn send_get(
    client: &reqwest::blocking::Client,
    opts: &PullOptions,
    url: &str,
    from: Option<u64>,
) -> std::result::Result<reqwest::blocking::Response, String> {
    let mut url = reqwest::Url::parse(url).map_err(|e| format!("bad URL {url:?}: {e}"))?;
    for _ in 0..=MAX_REDIRECTS {
        let mut req = client.get(url.clone());
        if let Some(from) = from {
            req = req.header(RANGE, format!("bytes={from}-"));
        }
        if let Some(token) = &opts.hf_token {
            if same_origin(&url, &opts.hf_endpoint) {
                req = req.header(AUTHORIZATION, format!("Bearer {token}"));
            }
        }
        let resp = req.send().map_err(|e| e.to_string())?;
        if !resp.status().is_redirection() {
            return Ok(resp);
        }
        let Some(location) = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Ok(resp); // a 3xx without a place to go: the caller reports its status
        };
        url = url
            .join(location)
            .map_err(|e| format!("{url}: bad redirect to {location:?}: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("redirect to a non-HTTP URL {url}"));
        }
    }
    Err(format!("{url}: more than {MAX_REDIRECTS} redirects"))
}

/// What `hearth pull` was asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A GGUF on this machine, copied into the cache.
    Local(PathBuf),
    /// `hf.co/ORG/REPO[:QUANT]`: the repo's GGUF for QUANT (default Q4_K_M or the only one).
    HfRepo {
        org: String,
        repo: String,
        quant: Option<String>,
    },
    /// `[hf.co/]ORG/REPO/PATH/FILE.gguf`.
    HfFile {
        org: String,
        repo: String,
        file: String,
    },
    /// `http(s)://…`.
    Url(String),
}

fn segment_ok(s: &str) -> bool {
    ModelName::parse(s).is_ok_and(|n| n.segments.len() == 1 && n.tag == DEFAULT_TAG)
}

impl Source {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| StoreError::BadSource(format!("cannot pull {s:?}: {why}"));
        if s.starts_with("https://") || s.starts_with("http://") {
            return Ok(Self::Url(s.to_string()));
        }
        if Path::new(s).is_file() {
            return Ok(Self::Local(PathBuf::from(s)));
        }
        let (rest, explicit_hf) = match s
            .strip_prefix("hf.co/")
            .or_else(|| s.strip_prefix("huggingface.co/"))
        {
            Some(rest) => (rest, true),
            None => (s, false),
        };
        let (path, quant) = match rest.rsplit_once(':') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        if !parts.iter().all(|p| segment_ok(p)) {
            return Err(bad(
                "not a file, an http(s) URL, or a Hugging Face reference with plain ORG/REPO names",
            ));
        }
        if let Some(q) = quant {
            if !segment_ok(q) || parts.len() != 2 {
                return Err(bad("a :QUANT tag goes after hf.co/ORG/REPO"));
            }
        }
        match parts.as_slice() {
            [org, repo] if explicit_hf => Ok(Self::HfRepo {
                org: org.to_string(),
                repo: repo.to_string(),
                quant: quant.map(str::to_string),
            }),
            [org, repo, file @ ..]
                if !file.is_empty()
                    && file.last().is_some_and(|f| f.to_ascii_lowercase().ends_with(".gguf")) =>
            {
                Ok(Self::HfFile {
                    org: org.to_string(),
                    repo: repo.to_string(),
                    file: file.join("/"),
                })
            }
            _ => Err(bad(
                "expected a local .gguf file, https://…, hf.co/ORG/REPO[:QUANT] or ORG/REPO/FILE.gguf",
            )),
        }
    }

    /// The name the model is stored under unless the user picks one.
    pub fn default_name(&self) -> String {
        let stem = |file: &str| {
            let last = file.rsplit('/').next().unwrap_or(file);
            let last = last.split(['?', '#']).next().unwrap_or(last);
            let stem = last
                .strip_suffix(".gguf")
                .or_else(|| last.strip_suffix(".GGUF"))
                .unwrap_or(last);
            sanitize_segment(stem)
        };
        match self {
            Self::Local(p) => stem(&p.file_name().unwrap_or_default().to_string_lossy()),
            Self::HfRepo { org, repo, quant } => format!(
                "hf.co/{org}/{repo}:{}",
                quant.as_deref().unwrap_or(DEFAULT_TAG)
            ),
            Self::HfFile { org, repo, file } => format!("hf.co/{org}/{repo}:{}", stem(file)),
            Self::Url(url) => stem(url),
        }
    }
}

/// One file of the hub's tree listing (`/api/models/ORG/REPO/tree/main`).
#[derive(Debug, Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    oid: String,
    size: u64,
}

/// A file to download and what the hub says it should be.
struct Remote {
    url: String,
    sha256: Option<String>,
    size: Option<u64>,
}

/// Does the file name carry QUANT as a whole word (`Q4_K` must not pick `Q4_K_M`)?
fn names_quant(path: &str, quant: &str) -> bool {
    let file = path.rsplit('/').next().unwrap_or(path).to_ascii_uppercase();
    let quant = quant.to_ascii_uppercase();
    let bytes = file.as_bytes();
    let mut from = 0;
    while let Some(i) = file[from..].find(&quant) {
        let start = from + i;
        let end = start + quant.len();
        let before_ok = start == 0 || !bytes[start - 1].is_ascii_alphanumeric();
        let after_ok =
            end == bytes.len() || !(bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_');
        if before_ok && after_ok {
            return true;
        }
        from = start + 1;
    }
    false
}

fn is_split(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.contains("-of-") && lower.contains("-0000")
}

fn choose_file<'a>(
    entries: &'a [TreeEntry],
    repo: &str,
    quant: Option<&str>,
) -> Result<&'a TreeEntry> {
    let ggufs: Vec<&TreeEntry> = entries
        .iter()
        .filter(|e| {
            let lower = e.path.to_ascii_lowercase();
            e.kind == "file" && lower.ends_with(".gguf") && !lower.contains("mmproj")
        })
        .collect();
    if ggufs.is_empty() {
        return Err(StoreError::Resolve(format!("{repo} has no GGUF files")));
    }
    let list = |v: &[&TreeEntry]| {
        v.iter()
            .map(|e| e.path.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let matches: Vec<&TreeEntry> = match quant {
        Some(q) => ggufs
            .iter()
            .copied()
            .filter(|e| names_quant(&e.path, q))
            .collect(),
        None if ggufs.len() == 1 => ggufs.clone(),
        None => ggufs
            .iter()
            .copied()
            .filter(|e| names_quant(&e.path, "Q4_K_M"))
            .collect(),
    };
    match matches.as_slice() {
        [one] if is_split(&one.path) => Err(StoreError::Resolve(format!(
            "{} is split into parts, which hearth cannot load yet",
            one.path
        ))),
        [one] => Ok(one),
        [] => Err(StoreError::Resolve(match quant {
            Some(q) => format!("{repo} has no GGUF for {q}; it has: {}", list(&ggufs)),
            None => format!(
                "{repo} has several GGUFs; pick one with :QUANT: {}",
                list(&ggufs)
            ),
        })),
        many => Err(StoreError::Resolve(format!(
            "{repo}: several files match; name one as ORG/REPO/FILE.gguf: {}",
            list(many)
        ))),
    }
}

enum Attempt {
    /// Worth another try (connection dropped, 5xx): the partial file is kept.
    Retry(String),
    /// Will not get better: the partial file is deleted.
    Fatal(StoreError),
}

impl Store {
    /// Pulls `source` into the cache and names it; returns the manifest.
    pub fn pull(&self, source: &str, opts: &PullOptions) -> Result<Manifest> {
        let src = Source::parse(source)?;
        let name_str = opts.name.clone().unwrap_or_else(|| src.default_name());
        let name = ModelName::parse(&name_str)?;
        if let Source::Local(path) = &src {
            return self.import(path, &name, source);
        }
        if opts.offline {
            return Err(StoreError::Offline(source.to_string()));
        }
        let client = reqwest::blocking::Client::builder()
            .user_agent(concat!("hearth/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            // Per read, not for the whole body: big files take as long as they take.
            .timeout(Duration::from_secs(60))
            // Redirects are followed by `send_get`, which decides per hop whether the token goes.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| StoreError::Network {
                url: source.to_string(),
                message: e.to_string(),
            })?;
        let endpoint = opts.hf_endpoint.trim_end_matches('/');
        let remote = match &src {
            Source::HfRepo { org, repo, quant } => {
                let tree = self.tree(&client, opts, org, repo)?;
                let entry = choose_file(&tree, &format!("{org}/{repo}"), quant.as_deref())?;
                Remote {
                    url: format!("{endpoint}/{org}/{repo}/resolve/main/{}", entry.path),
                    sha256: entry.lfs.as_ref().map(|l| l.oid.to_ascii_lowercase()),
                    size: entry.lfs.as_ref().map(|l| l.size).or(entry.size),
                }
            }
            Source::HfFile { org, repo, file } => {
                // The listing gives the LFS hash; without it the download is still checked
                // against the ETag the hub sends with the file.
                let entry = self.tree(&client, opts, org, repo).ok().and_then(|tree| {
                    tree.into_iter()
                        .find(|e| e.kind == "file" && e.path == *file)
                });
                Remote {
                    url: format!("{endpoint}/{org}/{repo}/resolve/main/{file}"),
                    sha256: entry
                        .as_ref()
                        .and_then(|e| e.lfs.as_ref())
                        .map(|l| l.oid.to_ascii_lowercase()),
                    size: entry.and_then(|e| e.lfs.map(|l| l.size).or(e.size)),
                }
            }
            Source::Url(url) => Remote {
                url: url.clone(),
                sha256: None,
                size: None,
            },
            Source::Local(_) => unreachable!("handled above"),
        };
        let expected = match (&opts.sha256, remote.sha256.clone()) {
            (Some(user), _) => Some(user.to_ascii_lowercase()),
            (None, hub) => hub,
        };
        if let Some(sha) = &expected {
            if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(StoreError::BadSource(format!("{sha:?} is not a sha256")));
            }
        }
        self.download(&client, opts, &remote, expected, &name, source)
    }

    fn tree(
        &self,
        client: &reqwest::blocking::Client,
        opts: &PullOptions,
        org: &str,
        repo: &str,
    ) -> Result<Vec<TreeEntry>> {
        let url = format!(
            "{}/api/models/{org}/{repo}/tree/main?recursive=true",
            opts.hf_endpoint.trim_end_matches('/')
        );
        let net = |message: String| StoreError::Network {
            url: url.clone(),
            message,
        };
        let resp = send_get(client, opts, &url, None).map_err(net)?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(StoreError::Http { url, status });
        }
        // A listing is small; refuse anything absurd rather than buffer it.
        if resp.content_length().is_some_and(|n| n > 64 << 20) {
            return Err(StoreError::Network {
                url,
                message: "file listing larger than 64 MiB".into(),
            });
        }
        let mut body = Vec::new();
        resp.take(64 << 20)
            .read_to_end(&mut body)
            .map_err(|e| StoreError::Network {
                url: url.clone(),
                message: e.to_string(),
            })?;
        serde_json::from_slice(&body).map_err(|e| StoreError::Network {
            url,
            message: format!("unexpected file listing: {e}"),
        })
    }

    fn download(
        &self,
        client: &reqwest::blocking::Client,
        opts: &PullOptions,
        remote: &Remote,
        expected: Option<String>,
        name: &ModelName,
        source: &str,
    ) -> Result<Manifest> {
        let dir = self.partial_dir();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // Same source, same partial file: a later pull resumes it.
        let key = expected
            .clone()
            .unwrap_or_else(|| hex(&Sha256::digest(remote.url.as_bytes())));
        let part = dir.join(format!("{key}.part"));
        let bar = if opts.progress {
            let bar = ProgressBar::new(remote.size.unwrap_or(0));
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_message(format!("pulling {name}"));
            bar
        } else {
            ProgressBar::hidden()
        };
        let mut etag_sha = None;
        let mut last = String::from("no attempt made");
        let mut done = false;
        for attempt in 0..opts.attempts.max(1) {
            if attempt > 0 {
                bar.println(format!("{last}; resuming"));
                std::thread::sleep(Duration::from_millis(200 << attempt.min(5)));
            }
            match self.fetch_once(client, opts, remote, &part, &bar, &mut etag_sha) {
                Ok(()) => {
                    done = true;
                    break;
                }
                Err(Attempt::Retry(why)) => last = why,
                Err(Attempt::Fatal(e)) => {
                    bar.abandon();
                    let _ = std::fs::remove_file(&part);
                    return Err(e);
                }
            }
        }
        bar.finish_and_clear();
        if !done {
            return Err(StoreError::GaveUp {
                url: remote.url.clone(),
                attempts: opts.attempts.max(1),
                last,
            });
        }
        let discard = |e: StoreError| {
            let _ = std::fs::remove_file(&part);
            e
        };
        let sha = sha256_file(&part).map_err(discard)?;
        if let Some(want) = expected.or(etag_sha) {
            if want != sha {
                return Err(discard(StoreError::HashMismatch {
                    url: remote.url.clone(),
                    expected: want,
                    actual: sha,
                }));
            }
        }
        hearth_gguf::Gguf::open(&part)
            .map_err(StoreError::from)
            .map_err(discard)?;
        self.commit(&part, &sha, name, source, &remote.url)
    }

    /// One GET (resuming from what `part` holds) streamed to the end of `part`.
    fn fetch_once(
        &self,
        client: &reqwest::blocking::Client,
        opts: &PullOptions,
        remote: &Remote,
        part: &Path,
        bar: &ProgressBar,
        etag_sha: &mut Option<String>,
    ) -> std::result::Result<(), Attempt> {
        let url = &remote.url;
        let fatal_io = |e: std::io::Error| Attempt::Fatal(io_err(part)(e));
        let mut have = std::fs::metadata(part).map_or(0, |m| m.len());
        if remote.size.is_some_and(|s| have > s) {
            have = 0;
        }
        let mut resp =
            send_get(client, opts, url, (have > 0).then_some(have)).map_err(Attempt::Retry)?;
        let status = resp.status().as_u16();
        let header = |name| {
            resp.headers()
                .get(name)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
                .map(str::to_string)
        };
        // The hub's ETag for an LFS file is its sha256.
        let etag = header(ETAG).map(|e| {
            e.trim_start_matches("W/")
                .trim_matches('"')
                .to_ascii_lowercase()
        });
        if let Some(e) = etag.filter(|e| e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            *etag_sha = Some(e);
        }
        let total = match status {
            206 => {
                let range = header(CONTENT_RANGE).unwrap_or_default();
                let parsed = range
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split_once('/'))
                    .and_then(|(span, total)| {
                        let start: u64 = span.split_once('-')?.0.parse().ok()?;
                        Some((start, total.parse::<u64>().ok()))
                    });
                match parsed {
                    Some((start, total)) if start == have => total,
                    _ => {
                        // Not the range we asked for: start over from byte 0.
                        std::fs::remove_file(part).map_err(fatal_io)?;
                        return Err(Attempt::Retry(format!("unusable Content-Range {range:?}")));
                    }
                }
            }
            200 => {
                if have > 0 {
                    // The server ignored Range: the body is the whole file.
                    std::fs::remove_file(part).map_err(fatal_io)?;
                    have = 0;
                }
                header(CONTENT_LENGTH).and_then(|v| v.parse().ok())
            }
            416 if remote.size == Some(have) => return Ok(()),
            416 => {
                std::fs::remove_file(part).map_err(fatal_io)?;
                return Err(Attempt::Retry(
                    "range not satisfiable; starting over".into(),
                ));
            }
            429 | 500..=599 => return Err(Attempt::Retry(format!("HTTP {status}"))),
            _ => {
                return Err(Attempt::Fatal(StoreError::Http {
                    url: url.clone(),
                    status,
                }))
            }
        };
        if let (Some(want), Some(announced)) = (remote.size, total) {
            if want != announced {
                return Err(Attempt::Fatal(StoreError::SizeMismatch {
                    url: url.clone(),
                    announced,
                    expected: want,
                }));
            }
        }
        let limit = total.or(remote.size);
        if let Some(limit) = limit {
            let dir = part.parent().unwrap_or(Path::new("."));
            let available = fs4::available_space(dir).map_err(fatal_io)?;
            let needed = limit.saturating_sub(have);
            if needed > available {
                return Err(Attempt::Fatal(StoreError::NoSpace {
                    url: url.clone(),
                    needed,
                    available,
                    dir: dir.display().to_string(),
                }));
            }
            bar.set_length(limit);
        }
        bar.set_position(have);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .map_err(fatal_io)?;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match resp.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    file.flush().map_err(fatal_io)?;
                    return Err(Attempt::Retry(format!(
                        "connection lost at byte {have}: {e}"
                    )));
                }
            };
            if limit.is_some_and(|l| have + n as u64 > l) {
                return Err(Attempt::Fatal(StoreError::SizeMismatch {
                    url: url.clone(),
                    announced: have + n as u64,
                    expected: limit.unwrap_or(0),
                }));
            }
            file.write_all(&buf[..n]).map_err(fatal_io)?;
            have += n as u64;
            bar.set_position(have);
        }
        file.flush().map_err(fatal_io)?;
        match limit {
            Some(l) if have < l => Err(Attempt::Retry(format!(
                "connection closed at byte {have} of {l}"
            ))),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            Source::parse("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M").unwrap(),
            Source::HfRepo {
                org: "bartowski".into(),
                repo: "SmolLM2-135M-Instruct-GGUF".into(),
                quant: Some("Q4_K_M".into())
            }
        );
        assert_eq!(
            Source::parse("org/repo/sub/file.gguf").unwrap(),
            Source::HfFile {
                org: "org".into(),
                repo: "repo".into(),
                file: "sub/file.gguf".into()
            }
        );
        assert!(matches!(
            Source::parse("https://example.com/x.gguf").unwrap(),
            Source::Url(_)
        ));
        for bad in [
            "hf.co/../x",
            "hf.co/org/..:Q4",
            "org/repo",
            "../../x.gguf",
            "hf.co/org/repo/x.gguf:Q4",
            "",
            "nothing",
        ] {
            assert!(Source::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn default_names_are_valid() {
        for s in [
            "hf.co/org/repo:Q4_K_M",
            "hf.co/org/repo",
            "org/repo/dir/Model-Q4.gguf",
            "https://example.com/a/b/My%20Model.Q8_0.gguf?download=1",
        ] {
            let name = Source::parse(s).unwrap().default_name();
            assert!(ModelName::parse(&name).is_ok(), "{s} → {name}");
        }
    }

    #[test]
    fn quant_matches_whole_words() {
        assert!(names_quant("SmolLM2-135M-Instruct-Q4_K_M.gguf", "q4_k_m"));
        assert!(!names_quant("SmolLM2-135M-Instruct-Q4_K_M.gguf", "Q4_K"));
        assert!(names_quant("x.Q4_K.gguf", "Q4_K"));
        assert!(!names_quant("x-IQ4_K.gguf", "Q4_K"));
    }
}
