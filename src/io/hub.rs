//! Downloading weights into the standard caches, verified before they enter them.
//!
//! Hugging Face Hub files go through `hf-hub` into the Hub cache (`$HF_HUB_CACHE`, else
//! `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, the layout Python's `huggingface_hub`
//! shares). torchvision's files are fetched over plain HTTPS into PyTorch's cache
//! (`$TORCH_HOME/hub/checkpoints`, else `~/.cache/torch/hub/checkpoints`), where
//! `torch.hub` finds them too.
//!
//! Every download lands in a temporary file or staging folder inside the cache, is checked
//! against its sha256 (the full hash or the prefix torchvision puts in its file names, and
//! for Hub LFS files the hash the Hub reports), and only then is renamed into place: an
//! interrupted or corrupt download never poisons the cache. `HF_HUB_OFFLINE=1` turns every
//! fetch into a cache lookup.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use sha2::{Digest, Sha256};

use crate::io::atomic::{unique_suffix, write_atomic, TempGuard};
use crate::{Error, Result};

/// torchvision's model URL root.
pub const TORCHVISION_URL_ROOT: &str = "https://download.pytorch.org/models/";

/// The Hugging Face Hub.
pub const HF_DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where a weights file can be downloaded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A file under torchvision's model URL root.
    Torchvision {
        /// File name, e.g. `retinanet_resnet50_fpn_coco-eeacb38b.pth`.
        file: &'static str,
    },
    /// A file in a Hugging Face Hub model repository.
    HuggingFace {
        /// `owner/name`.
        repo: &'static str,
        /// Branch, tag or commit.
        revision: &'static str,
        /// Path of the file in the repository.
        file: &'static str,
    },
}

impl Source {
    /// The URL the file is downloaded from under `opts`.
    pub fn url(&self, opts: &HubOptions) -> String {
        match *self {
            Source::Torchvision { file } => torchvision_url(opts, file),
            Source::HuggingFace {
                repo,
                revision,
                file,
            } => hf_url(opts, repo, revision, file),
        }
    }
}

fn torchvision_url(opts: &HubOptions, file: &str) -> String {
    format!("{}/{file}", opts.torchvision_url.trim_end_matches('/'))
}

/// The download URL of a Hub file under `opts`.
pub fn hf_url(opts: &HubOptions, repo: &str, revision: &str, file: &str) -> String {
    format!(
        "{}/{repo}/resolve/{revision}/{file}",
        opts.hf_endpoint.trim_end_matches('/')
    )
}

/// Where and how to download; [`HubOptions::from_env`] reads the usual variables.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Hugging Face Hub cache folder.
    pub hf_cache: PathBuf,
    /// Hub endpoint (`HF_ENDPOINT`).
    pub hf_endpoint: String,
    /// Hub access token (`HF_TOKEN`, else the token file next to the cache).
    pub hf_token: Option<String>,
    /// Folder for torchvision's files.
    pub torch_cache: PathBuf,
    /// URL root of torchvision's files (`RETINANET_TORCHVISION_URL`, for mirrors and tests).
    pub torchvision_url: String,
    /// Use only the caches, never the network (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Show download progress bars on standard error.
    pub progress: bool,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `huggingface_hub`'s reading of boolean variables.
fn env_true(name: &str) -> bool {
    env(name)
        .is_some_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
}

impl HubOptions {
    /// Options from the environment, as `huggingface_hub` and `torch.hub` read it:
    /// `HF_HUB_CACHE` or `HF_HOME` (else `$XDG_CACHE_HOME/huggingface` or
    /// `~/.cache/huggingface`), `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`, `TORCH_HOME` (else
    /// `$XDG_CACHE_HOME/torch` or `~/.cache/torch`) and `RETINANET_TORCHVISION_URL`.
    pub fn from_env() -> Result<Self> {
        let cache_home = || -> Result<PathBuf> {
            if let Some(xdg) = env("XDG_CACHE_HOME") {
                return Ok(PathBuf::from(xdg));
            }
            env("HOME")
                .map(|h| PathBuf::from(h).join(".cache"))
                .ok_or_else(|| {
                    Error::Invalid(
                        "cannot locate a cache folder: set HF_HOME and TORCH_HOME (or HOME)".into(),
                    )
                })
        };
        let hf_home = match env("HF_HOME") {
            Some(h) => PathBuf::from(h),
            None => cache_home()?.join("huggingface"),
        };
        let hf_cache = env("HF_HUB_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_home.join("hub"));
        let hf_token = env("HF_TOKEN").or_else(|| {
            std::fs::read_to_string(hf_home.join("token"))
                .ok()
                .map(|t| t.trim().to_string())
                .filter(|t| !t.is_empty())
        });
        let torch_home = match env("TORCH_HOME") {
            Some(t) => PathBuf::from(t),
            None => cache_home()?.join("torch"),
        };
        Ok(Self {
            hf_cache,
            hf_endpoint: env("HF_ENDPOINT").unwrap_or_else(|| HF_DEFAULT_ENDPOINT.into()),
            hf_token,
            torch_cache: torch_home.join("hub").join("checkpoints"),
            torchvision_url: env("RETINANET_TORCHVISION_URL")
                .unwrap_or_else(|| TORCHVISION_URL_ROOT.into()),
            offline: env_true("HF_HUB_OFFLINE"),
            progress: true,
        })
    }
}

/// The cached copy of `source`, downloading and verifying it first if needed.
///
/// `sha256` is the expected hash of the file, in full or as a prefix (torchvision publishes
/// 8 hex digits in its file names); `None` checks Hub LFS files against the hash the Hub
/// reports and nothing else.
pub fn fetch(source: &Source, sha256: Option<&str>, opts: &HubOptions) -> Result<PathBuf> {
    match *source {
        Source::Torchvision { file } => fetch_url(file, sha256, opts),
        Source::HuggingFace {
            repo,
            revision,
            file,
        } => fetch_hf(repo, revision, file, sha256, opts),
    }
}

/// The cached copy of `source`, if present; never touches the network.
pub fn cached(source: &Source, opts: &HubOptions) -> Option<PathBuf> {
    match *source {
        Source::Torchvision { file } => Some(opts.torch_cache.join(file)).filter(|p| p.is_file()),
        Source::HuggingFace {
            repo,
            revision,
            file,
        } => hf_repo_cache(opts, repo, revision).get(file),
    }
}

fn validate_sha256(sha256: Option<&str>) -> Result<()> {
    match sha256 {
        Some(s) if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Err(Error::Invalid(format!(
                "expected sha256 {s:?} is not a hex string of 1 to 64 digits"
            )))
        }
        _ => Ok(()),
    }
}

/// A name the server chose (commit, ETag) that is safe as one path component.
fn safe_component(url: &str, what: &str, name: &str) -> Result<()> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(Error::Download {
            url: url.to_string(),
            message: format!("the server sent an unusable {what} {name:?}"),
        });
    }
    Ok(())
}

fn hf_repo(repo: &str, revision: &str) -> Repo {
    Repo::with_revision(repo.to_string(), RepoType::Model, revision.to_string())
}

fn hf_repo_cache(opts: &HubOptions, repo: &str, revision: &str) -> hf_hub::CacheRepo {
    Cache::new(opts.hf_cache.clone()).repo(hf_repo(repo, revision))
}

/// Before a download of `url` into `cache`: refuses in offline mode, creates the folder.
fn prepare_download(url: &str, cache: &Path, opts: &HubOptions) -> Result<()> {
    if opts.offline {
        return Err(Error::Download {
            url: url.to_string(),
            message: format!(
                "offline mode (HF_HUB_OFFLINE is set) and the file is not in the cache {}; \
                 run once with network access, or pass the file itself",
                cache.display()
            ),
        });
    }
    std::fs::create_dir_all(cache).map_err(io_error(cache))
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_error(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn check_hash(url: &str, actual: &str, expected: &str) -> Result<()> {
    if actual.starts_with(&expected.to_ascii_lowercase()) {
        Ok(())
    } else {
        Err(Error::ChecksumMismatch {
            url: url.to_string(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        })
    }
}

fn progress_bar(enabled: bool, len: Option<u64>, name: &str) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match len {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let style = indicatif::ProgressStyle::with_template(
        "{msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(name.to_string());
    bar
}

/// torchvision's files: one GET into a temporary file beside the destination, hashed while
/// it streams, renamed into place once the length and hash check out.
fn fetch_url(file: &str, sha256: Option<&str>, opts: &HubOptions) -> Result<PathBuf> {
    validate_sha256(sha256)?;
    let url = torchvision_url(opts, file);
    if file.is_empty() || file.contains(['/', '\\']) || file.starts_with('.') {
        return Err(Error::Invalid(format!("bad file name {file:?} for {url}")));
    }
    let dest = opts.torch_cache.join(file);
    if dest.is_file() {
        return Ok(dest);
    }
    let dir = &opts.torch_cache;
    prepare_download(&url, dir, opts)?;
    let tmp = dir.join(format!(".{file}.{}.part", unique_suffix()));
    let cleanup = TempGuard::new(tmp.clone());

    let download = |message: String| Error::Download {
        url: url.clone(),
        message,
    };
    let response = ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .timeout_connect(std::time::Duration::from_secs(30))
        .timeout_read(std::time::Duration::from_secs(120))
        .build()
        .get(&url)
        .call()
        .map_err(|e| match e {
            ureq::Error::Status(code, r) => download(format!("HTTP {code} {}", r.status_text())),
            ureq::Error::Transport(t) => {
                // ureq's message starts with the URL, which the error already names.
                let msg = t.to_string();
                let msg = msg
                    .strip_prefix(&format!("{url}: "))
                    .unwrap_or(&msg)
                    .to_string();
                download(format!("cannot download: {msg}"))
            }
        })?;
    let expected_len: Option<u64> = response
        .header("Content-Length")
        .and_then(|v| v.parse().ok());
    let bar = progress_bar(opts.progress, expected_len, file);
    let mut reader = response.into_reader();
    let mut out = std::fs::File::create(&tmp).map_err(io_error(&tmp))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| download(format!("download interrupted after {len} bytes: {e}")))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_error(&tmp))?;
        len += n as u64;
        bar.set_position(len);
    }
    bar.finish_and_clear();
    if let Some(expected) = expected_len {
        if len != expected {
            return Err(download(format!(
                "download truncated: {len} of {expected} bytes"
            )));
        }
    }
    let actual = hex(&hasher.finalize());
    if let Some(expected) = sha256 {
        check_hash(&url, &actual, expected)?;
    }
    out.sync_all().map_err(io_error(&tmp))?;
    drop(out);
    cleanup.persist(&dest)?;
    Ok(dest)
}

/// The cached copy of a Hugging Face Hub file (`repo` = `owner/name`), downloading it first
/// if needed; like [`fetch`] with a [`Source::HuggingFace`] built at run time.
///
/// `hf-hub` downloads into a private staging cache inside the real one; the blob is verified,
/// then moved into the real cache's layout (`blobs/`, `snapshots/`, `refs/`).
pub fn fetch_hf(
    repo: &str,
    revision: &str,
    file: &str,
    sha256: Option<&str>,
    opts: &HubOptions,
) -> Result<PathBuf> {
    validate_sha256(sha256)?;
    let url = hf_url(opts, repo, revision, file);
    if repo.split('/').count() != 2 || file.is_empty() || file.split('/').any(|c| c == "..") {
        return Err(Error::Invalid(format!(
            "bad Hub file {repo:?} / {file:?} (expected owner/name and a path in the repository)"
        )));
    }
    if let Some(path) = hf_repo_cache(opts, repo, revision).get(file) {
        return Ok(path);
    }
    let cache_dir = &opts.hf_cache;
    prepare_download(&url, cache_dir, opts)?;
    let staging = cache_dir.join(format!(".retinanet-staging-{}", unique_suffix()));
    let _cleanup = TempGuard::new(staging.clone());

    let api = ApiBuilder::from_cache(Cache::new(staging.clone()))
        .with_endpoint(opts.hf_endpoint.trim_end_matches('/').to_string())
        .with_progress(opts.progress)
        .with_token(opts.hf_token.clone())
        .with_user_agent("retinanet", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| Error::Download {
            url: url.clone(),
            message: format!("cannot set up the Hub client: {e}"),
        })?;
    let staged = api
        .repo(hf_repo(repo, revision))
        .download(file)
        .map_err(|e| Error::Download {
            url: url.clone(),
            message: format!("cannot download: {e}"),
        })?;
    let blob = std::fs::canonicalize(&staged).map_err(io_error(&staged))?;
    let etag = blob
        .file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| Error::Download {
            url: url.clone(),
            message: "the Hub sent no usable ETag".into(),
        })?;
    let actual = sha256_file(&blob)?;
    // LFS files: the ETag is the content's sha256.
    if etag.len() == 64 && etag.bytes().all(|b| b.is_ascii_hexdigit()) {
        check_hash(&url, &actual, &etag)?;
    }
    if let Some(expected) = sha256 {
        check_hash(&url, &actual, expected)?;
    }
    let folder = hf_repo(repo, revision).folder_name();
    let ref_file = staging.join(&folder).join("refs").join(revision);
    let commit = std::fs::read_to_string(&ref_file).map_err(io_error(&ref_file))?;
    safe_component(&url, "commit", commit.trim())?;
    safe_component(&url, "ETag", &etag)?;
    install_hf(
        cache_dir,
        &folder,
        revision,
        commit.trim(),
        file,
        &etag,
        &blob,
    )
}

/// Records in the Hub cache that `revision` (a branch or tag) of `repo` is `commit`, as
/// `huggingface_hub` does in `refs/`.
pub fn record_ref(opts: &HubOptions, repo: &str, revision: &str, commit: &str) -> Result<()> {
    let folder = hf_repo(repo, revision).folder_name();
    let url = hf_url(opts, repo, revision, "");
    safe_component(&url, "commit", commit)?;
    if revision.split('/').any(|c| c.is_empty() || c == "..") {
        return Err(Error::Invalid(format!(
            "bad revision {revision:?} of {repo}"
        )));
    }
    let path = opts.hf_cache.join(folder).join("refs").join(revision);
    write_atomic(&path, commit.as_bytes())
}

/// Moves a verified blob into the Hub cache layout; returns the snapshot path.
fn install_hf(
    cache: &Path,
    folder: &str,
    revision: &str,
    commit: &str,
    file: &str,
    etag: &str,
    blob: &Path,
) -> Result<PathBuf> {
    let root = cache.join(folder);
    let blobs = root.join("blobs");
    std::fs::create_dir_all(&blobs).map_err(io_error(&blobs))?;
    let dest_blob = blobs.join(etag);
    // Another process may have installed the same blob meanwhile: same bytes, keep theirs.
    if !dest_blob.is_file() {
        std::fs::rename(blob, &dest_blob).map_err(io_error(&dest_blob))?;
    }
    let pointer = root.join("snapshots").join(commit).join(file);
    if let Some(parent) = pointer.parent() {
        std::fs::create_dir_all(parent).map_err(io_error(parent))?;
    }
    if !pointer.exists() {
        link_blob(&dest_blob, &pointer, file)?;
    }
    // As huggingface_hub: refs name branches and tags, never commits.
    if revision != commit {
        write_atomic(&root.join("refs").join(revision), commit.as_bytes())?;
    }
    Ok(pointer)
}

/// The pointer is a relative symlink to the blob, as `huggingface_hub` makes it; where
/// symlinks are unavailable, a copy.
fn link_blob(blob: &Path, pointer: &Path, file: &str) -> Result<()> {
    let tmp = pointer.with_file_name(format!(".link-{}", unique_suffix()));
    let cleanup = TempGuard::new(tmp.clone());
    #[cfg(unix)]
    {
        let ups = 1 + Path::new(file).components().count();
        let mut target = PathBuf::new();
        for _ in 0..ups {
            target.push("..");
        }
        target.push("blobs");
        target.push(blob.file_name().unwrap_or_default());
        std::os::unix::fs::symlink(&target, &tmp).map_err(io_error(&tmp))?;
    }
    #[cfg(not(unix))]
    {
        let _ = file;
        std::fs::copy(blob, &tmp).map_err(io_error(&tmp))?;
    }
    cleanup.persist(pointer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> HubOptions {
        HubOptions {
            hf_cache: PathBuf::from("/nonexistent/hf"),
            hf_endpoint: "http://127.0.0.1:9/".into(),
            hf_token: None,
            torch_cache: PathBuf::from("/nonexistent/torch"),
            torchvision_url: "http://127.0.0.1:9/models".into(),
            offline: true,
            progress: false,
        }
    }

    #[test]
    fn urls_follow_each_layout() {
        let o = opts();
        let tv = Source::Torchvision { file: "a-1234.pth" };
        assert_eq!(tv.url(&o), "http://127.0.0.1:9/models/a-1234.pth");
        let hf = Source::HuggingFace {
            repo: "o/n",
            revision: "main",
            file: "m.safetensors",
        };
        assert_eq!(
            hf.url(&o),
            "http://127.0.0.1:9/o/n/resolve/main/m.safetensors"
        );
    }

    #[test]
    fn hash_prefixes_must_match() {
        let h = "eeacb38b11223344";
        assert!(check_hash("u", h, "eeacb38b").is_ok());
        assert!(check_hash("u", h, "EEACB38B").is_ok());
        assert!(matches!(
            check_hash("u", h, "eeacb38c"),
            Err(Error::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn bad_expected_hashes_are_rejected_before_any_io() {
        let src = Source::Torchvision { file: "x.pth" };
        for bad in ["", "xyz", &"a".repeat(65)] {
            assert!(matches!(
                fetch(&src, Some(bad), &opts()),
                Err(Error::Invalid(_))
            ));
        }
    }
}
