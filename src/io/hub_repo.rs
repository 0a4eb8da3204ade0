//! Model repositories on the Hugging Face Hub in the layout DeepForest's
//! `RetinaNetHub.save_pretrained` writes: `model.safetensors` with torchvision's tensor names
//! (older revisions prefix them with `model.`, which [`crate::io::checkpoint`] strips) and a
//! `config.json` with `num_classes`, `label_dict`, `score_thresh`, `nms_thresh` and any further
//! keyword arguments of torchvision's `RetinaNet` (`detections_per_img`, `topk_candidates`,
//! `min_size`, `max_size`).
//!
//! Such a model is a torchvision RetinaNet ResNet-50 FPN v1 whose backbone was built with
//! plain `BatchNorm2d` (eps 1e-5), not the eps-0 frozen batch norm of torchvision's COCO
//! weights. Loading a repo reads its config for the class names, thresholds and sizes, and
//! writing one ([`save_repo`]) produces what `RetinaNetHub.from_pretrained` loads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::io::atomic::{write_atomic, write_atomic_with};
use crate::io::checkpoint::Checkpoint;
use crate::io::hub::{self, HubOptions};
use crate::{Error, LoadOptions, Result, RetinaNet, RetinaNetConfig};

/// The repo's configuration file.
pub const CONFIG_FILE: &str = "config.json";
/// The weights file `save_pretrained` writes.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Batch-norm eps of DeepForest's backbone (`nn.BatchNorm2d`'s default).
pub const DEEPFOREST_BN_EPS: f64 = 1e-5;

/// `config.json` of a DeepForest repo. Keys it does not know are kept (and written back).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Number of classes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_classes: Option<usize>,
    /// Class name → label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_dict: Option<BTreeMap<String, i64>>,
    /// torchvision's `score_thresh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score_thresh: Option<f32>,
    /// torchvision's per-class `nms_thresh`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nms_thresh: Option<f64>,
    /// torchvision's `detections_per_img`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detections_per_img: Option<usize>,
    /// torchvision's `topk_candidates`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topk_candidates: Option<usize>,
    /// torchvision's transform `min_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_size: Option<usize>,
    /// torchvision's transform `max_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<usize>,
    /// Everything else, kept as is.
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

impl RepoConfig {
    /// Reads `config.json`; an error names the file and what is wrong.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Self = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            message: format!("not a DeepForest config.json: {e}"),
        })?;
        config.class_names().map_err(|message| Error::Checkpoint {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// Class names by label from `label_dict` (labels must be 0..n, each once, and agree with
    /// `num_classes`).
    pub fn class_names(&self) -> std::result::Result<Option<Vec<String>>, String> {
        let Some(dict) = &self.label_dict else {
            return Ok(None);
        };
        let mut names = vec![None; dict.len()];
        for (name, &label) in dict {
            let slot = usize::try_from(label)
                .ok()
                .and_then(|l| names.get_mut(l))
                .ok_or_else(|| {
                    format!(
                        "label_dict: {name:?} has label {label}, expected 0..{}",
                        dict.len()
                    )
                })?;
            if slot.replace(name.clone()).is_some() {
                return Err(format!("label_dict: label {label} is given twice"));
            }
        }
        if let Some(n) = self.num_classes.filter(|&n| n != dict.len()) {
            return Err(format!(
                "label_dict names {} classes, num_classes is {n}",
                dict.len()
            ));
        }
        Ok(Some(names.into_iter().flatten().collect()))
    }
}

/// The local files of a repo: weights, and `config.json` where the repo has one.
#[derive(Debug, Clone, PartialEq)]
pub struct RepoFiles {
    /// The weights file.
    pub weights: PathBuf,
    /// `config.json`, if the repo has it.
    pub config: Option<PathBuf>,
}

/// The weights file among a repo's files: `wanted`, else `model.safetensors`, else the single
/// `.safetensors` file.
fn pick_weights(repo: &str, files: &[String], wanted: Option<&str>) -> Result<String> {
    if let Some(w) = wanted {
        return Ok(w.to_string());
    }
    if files.iter().any(|f| f == WEIGHTS_FILE) {
        return Ok(WEIGHTS_FILE.into());
    }
    let candidates: Vec<&String> = files
        .iter()
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    match candidates[..] {
        [one] => Ok(one.clone()),
        _ => Err(Error::Invalid(format!(
            "hf:{repo}: cannot tell the weights file: no {WEIGHTS_FILE} and {} .safetensors \
             files among {files:?}; name one as hf:{repo}/FILE",
            candidates.len()
        ))),
    }
}

/// A revision that is a full commit hash.
fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cache folder of a model repo, as `huggingface_hub` names it.
pub fn repo_cache(opts: &HubOptions, repo: &str) -> PathBuf {
    opts.hf_cache
        .join(format!("models--{}", repo.replace('/', "--")))
}

/// The commit a revision stands for in the cache (a commit is itself; a branch or tag is
/// what `refs/` records).
fn cached_commit(opts: &HubOptions, repo: &str, revision: &str) -> Option<String> {
    if is_commit(revision) {
        return Some(revision.to_string());
    }
    let refs = repo_cache(opts, repo).join("refs").join(revision);
    std::fs::read_to_string(refs)
        .ok()
        .map(|c| c.trim().to_string())
}

/// Files of the cached snapshot of `commit`, relative, sorted.
fn snapshot_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    out
}

/// Offline: the repo's files from the cache, or an error naming what is missing.
fn cached_repo(
    repo: &str,
    revision: &str,
    file: Option<&str>,
    opts: &HubOptions,
) -> Result<RepoFiles> {
    let missing = |what: String| Error::Download {
        url: hub::hf_url(opts, repo, revision, file.unwrap_or(WEIGHTS_FILE)),
        message: format!(
            "offline mode (HF_HUB_OFFLINE is set) and {what} in the cache {}; run once with \
             network access",
            opts.hf_cache.display()
        ),
    };
    let commit = cached_commit(opts, repo, revision)
        .ok_or_else(|| missing(format!("revision {revision:?} of {repo} is not")))?;
    let snapshot = repo_cache(opts, repo).join("snapshots").join(&commit);
    let files = snapshot_files(&snapshot);
    let weights = pick_weights(repo, &files, file)?;
    if !files.contains(&weights) {
        return Err(missing(format!("{weights} of {repo}@{commit} is not")));
    }
    let config = files
        .iter()
        .any(|f| f == CONFIG_FILE)
        .then(|| snapshot.join(CONFIG_FILE));
    Ok(RepoFiles {
        weights: snapshot.join(weights),
        config,
    })
}

/// The repo's file list and commit, from the Hub's API (`/api/models/REPO/revision/REV`).
fn repo_info(repo: &str, revision: &str, opts: &HubOptions) -> Result<(Vec<String>, String)> {
    let url = format!(
        "{}/api/models/{repo}/revision/{revision}",
        opts.hf_endpoint.trim_end_matches('/')
    );
    let download = |message: String| Error::Download {
        url: url.clone(),
        message,
    };
    let mut request = ureq::AgentBuilder::new()
        .try_proxy_from_env(true)
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .get(&url);
    if let Some(token) = &opts.hf_token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    let response = request.call().map_err(|e| match e {
        ureq::Error::Status(code, r) => download(format!("HTTP {code} {}", r.status_text())),
        ureq::Error::Transport(t) => download(format!("cannot reach the Hub: {t}")),
    })?;
    let info: hf_hub::api::RepoInfo = response
        .into_json()
        .map_err(|e| download(format!("not a repository description: {e}")))?;
    let files = info.siblings.into_iter().map(|s| s.rfilename).collect();
    Ok((files, info.sha))
}

/// The local files of a Hub repo at `revision`, downloading what the cache lacks: the weights
/// (`file`, else `model.safetensors`, else the repo's only `.safetensors` file) and
/// `config.json` where the repo has one. Online, the revision is resolved to its commit first
/// (one API call); offline (`HF_HUB_OFFLINE`), only the cache is read.
pub fn fetch_repo(
    repo: &str,
    revision: &str,
    file: Option<&str>,
    opts: &HubOptions,
) -> Result<RepoFiles> {
    if opts.offline {
        return cached_repo(repo, revision, file, opts);
    }
    let (files, commit) = match (repo_info(repo, revision, opts), file) {
        (Ok(info), _) => info,
        // A server without the Hub's API (a plain mirror): the named file alone.
        (Err(Error::Download { message, .. }), Some(file)) if message.starts_with("HTTP 404") => {
            let weights = hub::fetch_hf(repo, revision, file, None, opts)?;
            return Ok(RepoFiles {
                weights,
                config: None,
            });
        }
        (Err(e), _) => return Err(e),
    };
    let url = hub::hf_url(opts, repo, revision, "");
    if !is_commit(&commit) {
        return Err(Error::Download {
            url,
            message: format!("the Hub sent an unusable commit {commit:?}"),
        });
    }
    let weights = pick_weights(repo, &files, file)?;
    let snapshot = repo_cache(opts, repo).join("snapshots").join(&commit);
    let get = |name: &str| -> Result<PathBuf> {
        let local = snapshot.join(name);
        if local.is_file() {
            return Ok(local);
        }
        // Downloaded at the resolved commit, so that a branch moving meanwhile cannot mix
        // files of two commits.
        let path = hub::fetch_hf(repo, &commit, name, None, opts)?;
        Ok(path)
    };
    let weights = get(&weights)?;
    let config = match files.iter().any(|f| f == CONFIG_FILE) {
        true => Some(get(CONFIG_FILE)?),
        false => None,
    };
    if !is_commit(revision) {
        hub::record_ref(opts, repo, revision, &commit)?;
    }
    Ok(RepoFiles { weights, config })
}

/// Load options for a repo with `config`: DeepForest's batch-norm eps unless `base` sets one,
/// the repo's thresholds, limits and sizes over `base`'s.
pub fn load_options(config: &RepoConfig, base: &LoadOptions) -> LoadOptions {
    let mut opts = base.clone();
    opts.bn_eps = base.bn_eps.or(Some(DEEPFOREST_BN_EPS));
    let post = &mut opts.postprocess;
    post.score_thresh = config.score_thresh.unwrap_or(post.score_thresh);
    post.nms_thresh = config.nms_thresh.unwrap_or(post.nms_thresh);
    post.detections_per_img = config.detections_per_img.unwrap_or(post.detections_per_img);
    post.topk_candidates = config.topk_candidates.unwrap_or(post.topk_candidates);
    opts.min_size = base.min_size.or(config.min_size);
    opts.max_size = base.max_size.or(config.max_size);
    if opts.min_size.is_some() || opts.max_size.is_some() {
        // A repo that sets one size keeps torchvision's default for the other.
        opts.min_size = opts.min_size.or(Some(800));
        opts.max_size = opts.max_size.or(Some(1333));
    }
    opts
}

/// Loads a repo's files: with its `config.json` as [`load_options`] reads it (class names from
/// `label_dict`), else as a plain checkpoint.
pub fn load_files(files: &RepoFiles, device: &Device, base: &LoadOptions) -> Result<RetinaNet> {
    load_files_with_config(files, device, base).map(|(model, _)| model)
}

/// [`load_files`], also returning the repo's config where it has one.
pub fn load_files_with_config(
    files: &RepoFiles,
    device: &Device,
    base: &LoadOptions,
) -> Result<(RetinaNet, Option<RepoConfig>)> {
    let Some(config_path) = &files.config else {
        return RetinaNet::load_with(&files.weights, device, base).map(|m| (m, None));
    };
    let config = RepoConfig::read(config_path)?;
    let mut model = RetinaNet::load_with(&files.weights, device, &load_options(&config, base))?;
    let k = model.config().num_classes;
    if let Some(n) = config.num_classes.filter(|&n| n != k) {
        return Err(Error::Checkpoint {
            path: config_path.clone(),
            message: format!(
                "num_classes is {n}, the weights {} have {k}",
                files.weights.display()
            ),
        });
    }
    if let Ok(Some(names)) = config.class_names() {
        model
            .set_class_names(names)
            .map_err(|e| Error::Checkpoint {
                path: config_path.clone(),
                message: format!("label_dict: {e}"),
            })?;
    }
    Ok((model, Some(config)))
}

/// Writes a DeepForest repo into `dir`: `weights` (a safetensors checkpoint in torchvision's
/// names, as the trainer writes it) copied to `model.safetensors`, and `config`
/// (checked first) as `config.json`; each file atomically.
pub fn save_repo(weights: &Path, config: &RepoConfig, dir: &Path) -> Result<()> {
    let cfg = dir.join(CONFIG_FILE);
    config.class_names().map_err(|message| Error::Checkpoint {
        path: cfg.clone(),
        message,
    })?;
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_atomic_with(&dir.join(WEIGHTS_FILE), |tmp| {
        std::fs::copy(weights, tmp)
            .map(drop)
            .map_err(|source| Error::Io {
                path: weights.to_path_buf(),
                source,
            })
    })?;
    let json = serde_json::to_string_pretty(config).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&cfg, json.as_bytes())
}

/// DeepForest's `main.deepforest` config defaults, for a repo fine-tuned from no repo.
const DEEPFOREST_SCORE_THRESH: f32 = 0.1;
const DEEPFOREST_NMS_THRESH: f64 = 0.05;

/// Checks that `found` is the architecture of DeepForest's `RetinaNetHub` (ResNet-50 FPN v1,
/// any class count and eps), else an error naming `path` and what `found` is.
pub fn require_deepforest_architecture(found: &RetinaNetConfig, path: &Path) -> Result<()> {
    let expected = RetinaNetConfig {
        bn_eps: found.bn_eps,
        ..RetinaNetConfig::v1(50, found.num_classes)?
    };
    if *found != expected {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            message: format!(
                "DeepForest's RetinaNetHub is a ResNet-50 FPN v1; this model is {}",
                found.describe()
            ),
        });
    }
    Ok(())
}

/// The start of fine-tuning from a repo's `files` for `num_classes`, written to `dest` (with
/// metadata `bn_eps`, so that the trainer builds DeepForest's batch norm): every tensor as the
/// repo has it, except that with another class count both heads are new (torchvision's
/// initialisation, drawn with `seed`), as DeepForest's `_adjust_classes` replaces them.
/// Returns the repo's config.
pub fn training_start(
    files: &RepoFiles,
    num_classes: usize,
    seed: u64,
    dest: &Path,
) -> Result<Option<RepoConfig>> {
    use crate::train::params::{initial_values, model_shapes, Start};
    let config = files.config.as_deref().map(RepoConfig::read).transpose()?;
    let ckpt = Checkpoint::open(&files.weights)?;
    let base = RetinaNetConfig::infer(&ckpt)?;
    let eps = match &config {
        Some(_) => DEEPFOREST_BN_EPS,
        None => base.bn_eps,
    };
    let target = RetinaNetConfig {
        num_classes,
        bn_eps: eps,
        ..base.clone()
    };
    let fresh_heads = base.num_classes != num_classes;
    let fresh = match fresh_heads {
        true => initial_values(&target, &Start::Scratch, seed)?.0,
        false => Default::default(),
    };
    let (vb, _) = ckpt.var_builder(candle_core::DType::F32, &Device::Cpu);
    let mut tensors = std::collections::BTreeMap::new();
    for (name, shape) in model_shapes(&target)? {
        let value = match fresh.get(&name) {
            Some(t) if name.starts_with("head.") => t.clone(),
            _ => vb
                .get(shape.as_slice(), &name)
                .map_err(|e| Error::Checkpoint {
                    path: files.weights.clone(),
                    message: format!("cannot read `{name}`: {e}"),
                })?,
        };
        tensors.insert(name, value);
    }
    let metadata = [("bn_eps".to_string(), format!("{eps:e}"))].into();
    crate::train::checkpoint::write_safetensors(dest, &tensors, metadata)?;
    Ok(config)
}

/// Writes a trained checkpoint (as `finetune` writes it: torchvision's names, metadata
/// `class_names` and the input size) as a DeepForest repo in `dir` that
/// `RetinaNetHub.from_pretrained` loads: `config.json` is `base` (the repo fine-tuned from,
/// else DeepForest's default thresholds) with the checkpoint's classes and, where it trained
/// at another size than torchvision's 800/1333, `min_size`/`max_size`.
pub fn export_repo(checkpoint: &Path, base: Option<&RepoConfig>, dir: &Path) -> Result<()> {
    let ckpt = Checkpoint::open(checkpoint)?;
    let arch = RetinaNetConfig::infer(&ckpt)?;
    require_deepforest_architecture(&arch, checkpoint)?;
    let k = arch.num_classes;
    let names = match ckpt.class_names()? {
        Some(n) if n.len() == k => n,
        _ => (0..k).map(|i| format!("label_{i}")).collect(),
    };
    let mut config = base.cloned().unwrap_or_else(|| RepoConfig {
        score_thresh: Some(DEEPFOREST_SCORE_THRESH),
        nms_thresh: Some(DEEPFOREST_NMS_THRESH),
        ..Default::default()
    });
    config.num_classes = Some(k);
    config.label_dict = Some(names.into_iter().zip(0..).collect());
    if let Some((min, max)) = ckpt.input_size()?.filter(|&s| s != (800, 1333)) {
        (config.min_size, config.max_size) = (Some(min), Some(max));
    }
    save_repo(checkpoint, &config, dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> RepoConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn class_names_come_from_label_dict_by_label() {
        let c = config(r#"{"num_classes": 2, "label_dict": {"Tree": 1, "Bird": 0}, "x": [1]}"#);
        assert_eq!(c.class_names().unwrap().unwrap(), ["Bird", "Tree"]);
        assert_eq!(c.other["x"], serde_json::json!([1]));
        for bad in [
            r#"{"label_dict": {"a": 0, "b": 0}}"#,
            r#"{"label_dict": {"a": 0, "b": 2}}"#,
            r#"{"label_dict": {"a": -1}}"#,
            r#"{"num_classes": 3, "label_dict": {"a": 0}}"#,
        ] {
            assert!(config(bad).class_names().is_err(), "{bad}");
        }
    }

    #[test]
    fn weights_are_found_by_name_or_alone() {
        let files = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let f = files(&["config.json", "model.safetensors", "other.safetensors"]);
        assert_eq!(pick_weights("o/n", &f, None).unwrap(), "model.safetensors");
        let f = files(&["config.json", "NEON.pt", "w.safetensors"]);
        assert_eq!(pick_weights("o/n", &f, None).unwrap(), "w.safetensors");
        let f = files(&["a.safetensors", "b.safetensors"]);
        let err = pick_weights("o/n", &f, None).unwrap_err().to_string();
        assert!(
            err.contains("hf:o/n/FILE") && err.contains("2 .safetensors"),
            "{err}"
        );
        assert_eq!(
            pick_weights("o/n", &f, Some("b.safetensors")).unwrap(),
            "b.safetensors"
        );
    }

    #[test]
    fn repo_settings_apply_unless_the_options_set_them() {
        let c = config(
            r#"{"score_thresh": 0.2, "nms_thresh": 0.05, "detections_per_img": 7, "min_size": 400}"#,
        );
        let o = load_options(&c, &LoadOptions::default());
        assert_eq!(o.bn_eps, Some(DEEPFOREST_BN_EPS));
        assert_eq!(
            (o.postprocess.score_thresh, o.postprocess.nms_thresh),
            (0.2, 0.05)
        );
        assert_eq!(o.postprocess.detections_per_img, 7);
        assert_eq!((o.min_size, o.max_size), (Some(400), Some(1333)));
        let base = LoadOptions {
            bn_eps: Some(0.0),
            min_size: Some(600),
            ..Default::default()
        };
        let o = load_options(&c, &base);
        assert_eq!((o.bn_eps, o.min_size), (Some(0.0), Some(600)));
    }
}
