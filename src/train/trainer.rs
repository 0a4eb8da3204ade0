//! One training step on a batch: preprocess → network → anchor assignment → losses →
//! backward → (clipping) → SGD, plus checkpoints and resume.
//!
//! ```no_run
//! # fn main() -> retinanet::Result<()> {
//! use retinanet::train::{LrSchedule, Start, Target, TrainConfig, Trainer};
//! let device = candle_core::Device::Cpu;
//! let start = Start::RetinaNet("retinanet_resnet50_fpn_coco-eeacb38b.pth".into());
//! let config = retinanet::train::params::config_for(&start, 2)?; // 2 classes
//! let schedule = LrSchedule::scaled(1000, 4, 12.0)?;
//! let train_config = TrainConfig::for_start(&config, &start, schedule);
//! let (mut trainer, report) = Trainer::new(&config, &start, train_config, &device)?;
//! println!("{report:?}");
//! let image = image::open("a.jpg").unwrap().to_rgb8();
//! let target = Target { id: "a.jpg".into(), boxes: vec![[10.0, 20.0, 200.0, 180.0]], labels: vec![1] };
//! let stats = trainer.step(&[image], &[target])?;
//! println!("{stats:?}");
//! trainer.save("run/last.safetensors")?;
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use image::RgbImage;

use super::checkpoint::{
    optimizer_state, step_of, write_safetensors, write_safetensors_as, OPTIMIZER_KEY,
    OPTIMIZER_PREFIX,
};
use super::optim::{clip_grad_norm, Sgd, SgdConfig};
use super::params::{
    initial_values, load_exact, role, BackboneNorm, InitReport, ParamStore, Start,
};
use super::schedule::LrSchedule;
use crate::boxes::resize_boxes;
use crate::kernels::{self, Kernels};
use crate::model::focal_loss::{retinanet_losses, LossConfig, LossTargets, Losses};
use crate::model::matcher::Matcher;
use crate::model::{RawOutput, RetinaNet, RetinaNetConfig};
use crate::{Error, Result};

pub use crate::data::Target;

/// Training settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Losses.
    pub loss: LossConfig,
    /// Anchor assignment.
    pub matcher: Matcher,
    /// SGD settings.
    pub sgd: SgdConfig,
    /// Learning rate per step.
    pub schedule: LrSchedule,
    /// Clip the joint gradient norm to this, if set.
    pub clip_grad_norm: Option<f64>,
    /// Backbone stages that train, counted from the top, at most 5 (torchvision's default
    /// with pretrained weights 3: layer2–4, stem and layer1 frozen; from scratch 5).
    pub trainable_backbone_layers: usize,
    /// Batch norm of the backbone: frozen (pretrained starts) or trained with batch
    /// statistics (from scratch, as torchvision).
    pub backbone_norm: BackboneNorm,
    /// Seed of the initialisation of new layers.
    pub seed: u64,
    /// Data type of weights, activations and gradients (f32; f64 for reference checks).
    pub dtype: DType,
    /// The layers', loss's and optimiser's implementation: this crate's CPU kernels, or
    /// Candle's ops only (the path CUDA and Metal run). See [`Kernels`].
    pub kernels: Kernels,
}

impl TrainConfig {
    /// torchvision's recipe for `model` from `start`: [`TrainConfig::for_model`], and from
    /// scratch (as `retinanet_resnet50_fpn` without weights) batch norm in training mode
    /// ([`BackboneNorm::Batch`]) with all 5 backbone stages trained.
    pub fn for_start(model: &RetinaNetConfig, start: &Start, schedule: LrSchedule) -> Self {
        let config = Self::for_model(model, schedule);
        match start {
            Start::Scratch => Self {
                trainable_backbone_layers: 5,
                backbone_norm: BackboneNorm::Batch,
                ..config
            },
            Start::RetinaNet(_) | Start::Backbone(_) => config,
        }
    }

    /// torchvision's recipe for `model` with pretrained weights: v1 → L1 box loss, v2 → GIoU;
    /// momentum 0.9, weight decay 1e-4, 3 trainable backbone stages over frozen batch norm,
    /// no clipping.
    pub fn for_model(model: &RetinaNetConfig, schedule: LrSchedule) -> Self {
        Self {
            loss: if model.head_group_norm {
                LossConfig::v2()
            } else {
                LossConfig::v1()
            },
            matcher: Matcher::default(),
            sgd: SgdConfig::default(),
            schedule,
            clip_grad_norm: None,
            trainable_backbone_layers: 3,
            backbone_norm: BackboneNorm::Frozen,
            seed: 0,
            dtype: DType::F32,
            kernels: Kernels::Native,
        }
    }
}

/// What one step did.
#[derive(Debug, Clone, PartialEq)]
pub struct StepStats {
    /// The step just taken (0-based).
    pub step: usize,
    /// Its learning rate.
    pub lr: f64,
    /// Classification loss before the update.
    pub classification: f32,
    /// Box loss before the update.
    pub box_regression: f32,
    /// Foreground anchors over the batch.
    pub foreground: usize,
    /// Gradient norm before clipping (computed only when clipping).
    pub grad_norm: Option<f64>,
}

/// The losses of a batch with what produced them.
#[derive(Debug, Clone)]
pub struct BatchLosses {
    /// The losses (differentiable).
    pub losses: Losses,
    /// The network outputs.
    pub raw: RawOutput,
    /// Each image's anchor matches (ground-truth index, or −1 background, −2 ignored).
    pub matches: Vec<Vec<i64>>,
    /// Each image's boxes in resized-image pixels.
    pub boxes: Vec<Vec<[f32; 4]>>,
}

/// Trains a RetinaNet.
#[derive(Debug)]
pub struct Trainer {
    config: TrainConfig,
    model_config: RetinaNetConfig,
    params: ParamStore,
    model: RetinaNet,
    sgd: Sgd,
    step: usize,
    last_checkpoint: Option<PathBuf>,
}

impl Trainer {
    /// A trainer for `model_config` with weights from `start` (see [`Start`]) on `device`.
    pub fn new(
        model_config: &RetinaNetConfig,
        start: &Start,
        config: TrainConfig,
        device: &Device,
    ) -> Result<(Self, InitReport)> {
        validate(&config, model_config)?;
        let (values, mut report) = initial_values(model_config, start, config.seed)?;
        let scratch = matches!(start, Start::Scratch);
        if scratch && config.backbone_norm == BackboneNorm::Frozen {
            report.notes.push(
                "from scratch with frozen (identity) batch norm: expect weak features; \
                 torchvision trains batch norm from scratch (BackboneNorm::Batch)"
                    .into(),
            );
        } else if scratch && config.trainable_backbone_layers < 5 {
            report.notes.push(format!(
                "from scratch with the lower backbone stages frozen at random weights \
                 ({} of 5 train): expect weak features",
                config.trainable_backbone_layers
            ));
        }
        if config.backbone_norm == BackboneNorm::Batch {
            report.notes.push(format!(
                "batch norm trains in {} backbone stages: batch statistics, running statistics \
                 updated each step (momentum 0.1)",
                config.trainable_backbone_layers
            ));
        }
        let trainer = Self::from_values(model_config, values, config, device)?;
        Ok((trainer, report))
    }

    fn from_values(
        model_config: &RetinaNetConfig,
        values: std::collections::BTreeMap<String, candle_core::Tensor>,
        config: TrainConfig,
        device: &Device,
    ) -> Result<Self> {
        let (layers, norm) = (config.trainable_backbone_layers, config.backbone_norm);
        let params = ParamStore::new(values, |n| role(n, layers, norm), device, config.dtype)?;
        let mut model = params.build(model_config)?;
        model.set_kernels(config.kernels)?;
        model.fuse_frozen()?;
        let sgd = Sgd::new(params.trained(), config.sgd);
        Ok(Self {
            config,
            model_config: model_config.clone(),
            params,
            model,
            sgd,
            step: 0,
            last_checkpoint: None,
        })
    }

    /// Resumes from a checkpoint written by [`Trainer::save`]: weights, momentum buffers and
    /// step. `model_config` and `config` must be those of the interrupted run.
    pub fn resume(
        path: impl AsRef<Path>,
        model_config: &RetinaNetConfig,
        config: TrainConfig,
        device: &Device,
    ) -> Result<Self> {
        let path = path.as_ref();
        validate(&config, model_config)?;
        let values = load_exact(model_config, path)?;
        let mut trainer = Self::from_values(model_config, values, config, device)?;
        let meta = crate::Checkpoint::open(path)?.metadata().clone();
        let step = step_of(path, &meta)?;
        let buffers = optimizer_state(path, step, device)?;
        trainer.sgd.set_buffers(buffers)?;
        if let Some(names) = crate::Checkpoint::open(path)?.class_names()? {
            trainer.model.set_class_names(names)?;
        }
        trainer.step = step;
        trainer.last_checkpoint = Some(path.to_path_buf());
        Ok(trainer)
    }

    /// The model, sharing the trained weights (use it to detect between steps).
    pub fn model(&self) -> &RetinaNet {
        &self.model
    }

    /// The model, to change its transform, post-processing or class names.
    pub fn model_mut(&mut self) -> &mut RetinaNet {
        &mut self.model
    }

    /// The parameters.
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// The optimiser.
    pub fn optimizer(&self) -> &Sgd {
        &self.sgd
    }

    /// Steps taken so far (the next step's index).
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// Forward pass and losses of a batch in training mode (batch norms that train use the
    /// batch's statistics), without updating anything.
    pub fn losses(&self, images: &[RgbImage], targets: &[Target]) -> Result<BatchLosses> {
        kernels::scoped(self.config.kernels, || self.losses_here(images, targets))
    }

    fn losses_here(&self, images: &[RgbImage], targets: &[Target]) -> Result<BatchLosses> {
        if images.len() != targets.len() || images.is_empty() {
            return Err(Error::Invalid(format!(
                "{} images and {} targets in a batch",
                images.len(),
                targets.len()
            )));
        }
        for t in targets {
            validate_target(t, self.model_config.num_classes)?;
        }
        let batch = self.model.preprocess(images)?;
        let raw = self.model.forward_raw_train(&batch)?;
        let anchors = &raw.anchor_boxes;
        let mut matches = Vec::with_capacity(images.len());
        let mut boxes = Vec::with_capacity(images.len());
        let mut labels = Vec::with_capacity(images.len());
        for ((t, &orig), &size) in targets
            .iter()
            .zip(&batch.original_sizes)
            .zip(&batch.image_sizes)
        {
            let b = resize_boxes(&t.boxes, orig, size);
            matches.push(self.config.matcher.assign(anchors, &b));
            boxes.push(b);
            labels.push(t.labels.iter().map(|&l| l as u32).collect::<Vec<_>>());
        }
        let lt = LossTargets::new(anchors, &matches, &boxes, &labels);
        let losses = retinanet_losses(
            &raw.cls_logits,
            &raw.bbox_regression,
            &lt,
            &self.model.box_coder,
            &self.config.loss,
        )?;
        Ok(BatchLosses {
            losses,
            raw,
            matches,
            boxes,
        })
    }

    /// One SGD step on a batch. A NaN or infinite loss stops with
    /// [`Error::NonFiniteLoss`] before any weight changes.
    pub fn step(&mut self, images: &[RgbImage], targets: &[Target]) -> Result<StepStats> {
        let kernels = self.config.kernels;
        kernels::scoped(kernels, || self.step_here(images, targets))
    }

    fn step_here(&mut self, images: &[RgbImage], targets: &[Target]) -> Result<StepStats> {
        let batch = self.losses(images, targets)?;
        let cls = scalar(&batch.losses.classification)?;
        let boxl = scalar(&batch.losses.box_regression)?;
        if !cls.is_finite() || !boxl.is_finite() {
            return Err(self.non_finite(targets, cls, boxl));
        }
        let mut grads = batch.losses.total()?.backward()?;
        let grad_norm = match self.config.clip_grad_norm {
            Some(max) => {
                let norm = clip_grad_norm(&mut grads, self.sgd.vars(), max)?;
                if !norm.is_finite() {
                    return Err(self.non_finite(targets, cls, boxl));
                }
                Some(norm)
            }
            None => None,
        };
        // The running statistics move with the forward, as in torchvision's training mode
        // (here only once the step is known to go through).
        self.model.update_batch_norm_stats()?;
        let lr = self.config.schedule.lr(self.step);
        self.sgd.step(&grads, lr)?;
        let stats = StepStats {
            step: self.step,
            lr,
            classification: cls,
            box_regression: boxl,
            foreground: batch.matches.iter().flatten().filter(|&&m| m >= 0).count(),
            grad_norm,
        };
        self.step += 1;
        Ok(stats)
    }

    fn non_finite(&self, targets: &[Target], cls: f32, boxl: f32) -> Error {
        Error::NonFiniteLoss {
            step: self.step,
            classification: cls,
            box_regression: boxl,
            images: targets.iter().map(|t| t.id.clone()).collect(),
            checkpoint: self.last_checkpoint.clone(),
        }
    }

    /// Writes a checkpoint to `path`: one safetensors file that [`RetinaNet::load`] reads as a
    /// model (metadata `bn_eps`, `class_names`, `step`, input size) and that also holds the
    /// optimiser state ([`super::checkpoint`]); atomically, the previous file kept until
    /// the new one is complete.
    pub fn save(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.save_with(path, HashMap::new())
    }

    /// As [`Trainer::save`], with `extra` metadata (a run's loader position).
    pub fn save_with(
        &mut self,
        path: impl AsRef<Path>,
        extra: HashMap<String, String>,
    ) -> Result<()> {
        let path = path.as_ref();
        let mut tensors = self.params.tensors();
        for (name, buffer) in self.sgd.buffers() {
            tensors.insert(format!("{OPTIMIZER_PREFIX}{name}"), buffer.clone());
        }
        let mut meta = self.model_metadata();
        let sgd = serde_json::to_string(&self.sgd.config())
            .map_err(|e| Error::Invalid(format!("cannot record the optimiser settings: {e}")))?;
        meta.insert(OPTIMIZER_KEY.to_string(), sgd);
        meta.extend(extra);
        write_safetensors(path, &tensors, meta)?;
        self.last_checkpoint = Some(path.to_path_buf());
        Ok(())
    }

    /// Writes the model alone (no optimiser state) in `dtype`, atomically: with f16, a file
    /// half the size for shipping, which [`crate::RetinaNet::load`] and `detect` read as they
    /// read the f32 checkpoint.
    pub fn export(&self, path: impl AsRef<Path>, dtype: DType) -> Result<()> {
        let tensors = self.params.tensors();
        write_safetensors_as(path.as_ref(), &tensors, self.model_metadata(), dtype)
    }

    /// The model file's metadata: step, batch-norm eps, class names and the input size it
    /// trains at (which `detect` then uses by default).
    fn model_metadata(&self) -> HashMap<String, String> {
        let mut meta = HashMap::new();
        meta.insert("step".to_string(), self.step.to_string());
        let transform = &self.model.transform;
        meta.insert("min_size".to_string(), transform.min_size.to_string());
        meta.insert("max_size".to_string(), transform.max_size.to_string());
        meta.insert(
            "bn_eps".to_string(),
            format!("{:e}", self.model_config.bn_eps),
        );
        if let Some(names) = self.model.class_names() {
            meta.insert(
                "class_names".to_string(),
                serde_json::to_string(names).unwrap_or_default(),
            );
        }
        meta
    }
}

fn scalar(t: &candle_core::Tensor) -> Result<f32> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()?)
}

fn validate(config: &TrainConfig, model: &RetinaNetConfig) -> Result<()> {
    if config.trainable_backbone_layers > 5 {
        return Err(Error::Invalid(format!(
            "trainable_backbone_layers {}: a ResNet has 5 stages (conv1, layer1–4)",
            config.trainable_backbone_layers
        )));
    }
    let eps = model.bn_eps;
    if config.backbone_norm == BackboneNorm::Batch && (eps.is_nan() || eps <= 0.0) {
        return Err(Error::Invalid(format!(
            "batch norm in training needs bn_eps > 0 (torchvision's BatchNorm2d: 1e-5); the \
             model has {eps}"
        )));
    }
    let m = config.matcher;
    if m.bg_iou.is_nan() || m.fg_iou.is_nan() || m.bg_iou > m.fg_iou {
        return Err(Error::Invalid(format!(
            "background IoU threshold {} above the foreground one {}",
            m.bg_iou, m.fg_iou
        )));
    }
    Ok(())
}

fn validate_target(t: &Target, num_classes: usize) -> Result<()> {
    if t.boxes.len() != t.labels.len() {
        return Err(Error::Invalid(format!(
            "image {}: {} boxes but {} labels",
            t.id,
            t.boxes.len(),
            t.labels.len()
        )));
    }
    for (b, &l) in t.boxes.iter().zip(&t.labels) {
        if !(b[0] < b[2] && b[1] < b[3]) || b.iter().any(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!(
                "image {}: degenerate box {b:?} (need x1 < x2, y1 < y2)",
                t.id
            )));
        }
        if l >= num_classes {
            return Err(Error::Invalid(format!(
                "image {}: label {l} for a model of {num_classes} classes",
                t.id
            )));
        }
    }
    Ok(())
}
