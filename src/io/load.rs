//! Loading a model: from a checkpoint file with [`LoadOptions`], or from wherever a
//! [`ModelSource`] says it is (a file, the Hugging Face Hub, the zoo).

use std::path::Path;

use candle_core::{DType, Device};

use crate::io::checkpoint::Checkpoint;
use crate::io::hub::{self, HubOptions};
use crate::io::hub_repo::{self, RepoConfig};
use crate::io::zoo::ModelSource;
use crate::kernels::{Kernels, Precision};
use crate::model::postprocess::PostProcessConfig;
use crate::model::transform::TransformConfig;
use crate::{Error, Result, RetinaNet, RetinaNetConfig};

/// How to load a model; everything not set is read from the checkpoint or defaulted.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Architecture; `None` infers it from the checkpoint.
    pub config: Option<RetinaNetConfig>,
    /// Frozen batch-norm eps; `None` uses the checkpoint's metadata, else 0.0 for v1 (as
    /// torchvision's COCO v1 weights need) and 1e-5 for v2.
    pub bn_eps: Option<f64>,
    /// Data type of weights and activations.
    pub dtype: DType,
    /// Image transform. Its `min_size` and `max_size` apply only where neither
    /// [`LoadOptions::min_size`]/[`LoadOptions::max_size`] nor the checkpoint set them.
    pub transform: TransformConfig,
    /// Short side after resizing; `None`: what the checkpoint trained at (metadata
    /// `min_size`, see [`Checkpoint::input_size`]), else `transform.min_size`.
    pub min_size: Option<usize>,
    /// Upper bound on the long side; `None`: the checkpoint's, else `transform.max_size`.
    pub max_size: Option<usize>,
    /// Post-processing.
    pub postprocess: PostProcessConfig,
    /// Fold batch norm and use the fast inference kernels (see
    /// [`RetinaNet::fuse_for_inference`]); turn off to keep the model differentiable.
    pub fuse: bool,
    /// Precision of the fused CPU kernels' products in the FPN and heads: f32, or bf16 on
    /// CPUs with AVX512-BF16 (see [`Precision`] and [`RetinaNet::fuse_for_inference_with`]).
    pub precision: Precision,
    /// The layers' implementation: this crate's CPU kernels, or Candle's ops only (the path
    /// CUDA and Metal run, testable on the CPU). See [`Kernels`].
    pub kernels: Kernels,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            config: None,
            bn_eps: None,
            dtype: DType::F32,
            transform: TransformConfig::default(),
            min_size: None,
            max_size: None,
            postprocess: PostProcessConfig::default(),
            fuse: true,
            precision: Precision::F32,
            kernels: Kernels::Native,
        }
    }
}

impl LoadOptions {
    /// The transform for `ckpt`: sizes from the options, else the checkpoint, else the
    /// transform's.
    fn transform_for(&self, ckpt: &Checkpoint) -> Result<TransformConfig> {
        let trained = match (self.min_size, self.max_size) {
            (Some(_), Some(_)) => None,
            _ => ckpt.input_size()?,
        };
        let (min, max) = trained.unwrap_or((self.transform.min_size, self.transform.max_size));
        let (min_size, max_size) = (self.min_size.unwrap_or(min), self.max_size.unwrap_or(max));
        let source = format!("input size for {}", ckpt.path().display());
        crate::limits::check_input_size(min_size, max_size, &source)?;
        Ok(TransformConfig {
            min_size,
            max_size,
            ..self.transform.clone()
        })
    }
}

/// A NaN or negative eps gives no detections without a word: refuse it, naming its source.
fn check_bn_eps(eps: f64, from_options: bool, ckpt: &Checkpoint) -> Result<()> {
    let source = match from_options {
        true => "bn_eps (--bn-eps)".to_string(),
        false => format!("{}: metadata `bn_eps`", ckpt.path().display()),
    };
    crate::limits::check_non_negative(eps, &source)
}

impl RetinaNet {
    /// Loads a checkpoint (`.safetensors` or `.pth`) with default options.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        Self::load_with(path, device, &LoadOptions::default())
    }

    /// Loads a checkpoint with explicit options.
    pub fn load_with(path: impl AsRef<Path>, device: &Device, opts: &LoadOptions) -> Result<Self> {
        let ckpt = Checkpoint::open(path)?;
        let mut config = match &opts.config {
            Some(c) => c.clone(),
            None => RetinaNetConfig::infer(&ckpt)?,
        };
        if let Some(eps) = opts.bn_eps {
            config.bn_eps = eps;
        }
        check_bn_eps(config.bn_eps, opts.bn_eps.is_some(), &ckpt)?;
        // Checked before the (costly) build.
        let transform = opts.transform_for(&ckpt)?;
        let mut model = ckpt.build(opts.dtype, device, |vb| Self::new(&config, vb))?;
        model.set_kernels(opts.kernels)?;
        if opts.fuse {
            model.fuse_for_inference_with(opts.precision)?;
        }
        model.transform = transform;
        model.postprocess = opts.postprocess.clone();
        if let Some(names) = class_names(&ckpt, config.num_classes)? {
            model.set_class_names(names)?;
        }
        Ok(model)
    }
}

/// The checkpoint's class names, else COCO's for a 91-class model.
fn class_names(ckpt: &Checkpoint, num_classes: usize) -> Result<Option<Vec<String>>> {
    let coco = &crate::classes::COCO_91;
    let names = match ckpt.class_names()? {
        Some(names) => names,
        None if num_classes == coco.len() => coco.iter().map(|s| s.to_string()).collect(),
        None => return Ok(None),
    };
    if names.len() != num_classes {
        return Err(Error::Checkpoint {
            path: ckpt.path().to_path_buf(),
            message: format!(
                "metadata names {} classes, the model has {num_classes}",
                names.len()
            ),
        });
    }
    Ok(Some(names))
}

impl ModelSource {
    /// A short name for messages: the path, the `hf:` spec or the zoo name.
    pub fn describe(&self) -> String {
        match self {
            ModelSource::File(path) => path.display().to_string(),
            ModelSource::Hub {
                repo,
                revision,
                file: Some(file),
            } => format!("hf:{repo}/{file}@{revision}"),
            ModelSource::Hub { repo, revision, .. } => format!("hf:{repo}@{revision}"),
            ModelSource::Zoo(entry) => entry.name.to_string(),
        }
    }

    /// Loads the model, downloading it first (once, verified, into the cache; hub settings
    /// from the environment) where it is not a file. A failed download or load of a remote
    /// model says how to do without the network. A Hub repo with a `config.json` is read as
    /// DeepForest writes it (see [`crate::io::hub_repo`]).
    pub fn load(&self, device: &Device, opts: &LoadOptions) -> Result<RetinaNet> {
        self.load_with_config(device, opts).map(|(model, _)| model)
    }

    /// [`ModelSource::load`], also returning the Hub repo's `config.json` where the model
    /// came from a repo with one (DeepForest's models).
    pub fn load_with_config(
        &self,
        device: &Device,
        opts: &LoadOptions,
    ) -> Result<(RetinaNet, Option<RepoConfig>)> {
        let (result, url) = match self {
            ModelSource::File(path) => {
                return RetinaNet::load_with(path, device, opts).map(|m| (m, None))
            }
            ModelSource::Hub {
                repo,
                revision,
                file,
            } => {
                let hub = HubOptions::from_env()?;
                let weights = file.as_deref().unwrap_or(hub_repo::WEIGHTS_FILE);
                let url = hub::hf_url(&hub, repo, revision, weights);
                let loaded = hub_repo::fetch_repo(repo, revision, file.as_deref(), &hub)
                    .and_then(|files| hub_repo::load_files_with_config(&files, device, opts));
                (loaded, url)
            }
            ModelSource::Zoo(entry) => {
                let hub = HubOptions::from_env()?;
                (entry.load_with_config(device, opts, &hub), entry.url(&hub))
            }
        };
        result.map_err(|e| {
            Error::Invalid(format!(
                "cannot load model {}: {e}\nhint: download {url} by other means and load the \
                 file (detect: --weights FILE); HF_HUB_OFFLINE=1 uses only the cache",
                self.describe()
            ))
        })
    }
}
