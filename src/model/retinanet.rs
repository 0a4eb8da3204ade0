//! The RetinaNet detector: backbone → FPN → head → anchors → detections.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::VarBuilder;
use image::RgbImage;

use crate::io::checkpoint::{Checkpoint, LoadOptions};
use crate::kernels::Precision;
use crate::model::anchors::AnchorGenerator;
use crate::model::backbone::ResNet;
use crate::model::box_coder::BoxCoder;
use crate::model::config::RetinaNetConfig;
use crate::model::fpn::Fpn;
use crate::model::head::RetinaNetHead;
use crate::model::postprocess::{sigmoid, Detection, LevelCandidates, PostProcessConfig};
use crate::model::transform::{ImageBatch, TransformConfig};
use crate::{Error, Result};

/// Everything the network computes for a batch, before post-processing.
#[derive(Debug, Clone)]
pub struct RawOutput {
    /// C3, C4, C5.
    pub backbone_features: Vec<Tensor>,
    /// P3…P7.
    pub fpn_features: Vec<Tensor>,
    /// Class logits `(N, ΣHWA, K)`, level after level.
    pub cls_logits: Tensor,
    /// Box deltas `(N, ΣHWA, 4)`.
    pub bbox_regression: Tensor,
    /// Anchors `(ΣHWA, 4)` in padded-batch pixels, shared by the batch's images.
    pub anchors: Tensor,
    /// The same anchors on the host (they are computed there), for post-processing and
    /// target assignment.
    pub anchor_boxes: Vec<[f32; 4]>,
    /// H·W·A of each level.
    pub num_anchors_per_level: Vec<usize>,
}

/// A RetinaNet detector.
#[derive(Debug, Clone)]
pub struct RetinaNet {
    config: RetinaNetConfig,
    backbone: ResNet,
    fpn: Fpn,
    head: RetinaNetHead,
    /// Anchor generator.
    pub anchor_generator: AnchorGenerator,
    /// Box coder.
    pub box_coder: BoxCoder,
    /// Image transform settings.
    pub transform: TransformConfig,
    /// Post-processing settings.
    pub postprocess: PostProcessConfig,
    class_names: Option<Vec<String>>,
    device: Device,
    dtype: DType,
}

impl RetinaNet {
    /// Builds the network from `vb` (rooted at the state dict's top level), with torchvision's
    /// default transform and post-processing.
    pub fn new(config: &RetinaNetConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let backbone = ResNet::new(&config.backbone, config.bn_eps, vb.pp("backbone.body"))?;
        let fpn = Fpn::new(
            &config.backbone.out_channels(),
            config.fpn_channels,
            config.extra_input,
            vb.pp("backbone.fpn"),
        )?;
        let head = RetinaNetHead::new(
            config.fpn_channels,
            config.num_anchors,
            config.num_classes,
            config.head_group_norm,
            vb.pp("head"),
        )?;
        let anchor_generator = AnchorGenerator::default();
        if anchor_generator.num_anchors_per_location() != config.num_anchors {
            candle_core::bail!(
                "the head predicts {} anchors per location, the anchor generator makes {}",
                config.num_anchors,
                anchor_generator.num_anchors_per_location()
            );
        }
        Ok(Self {
            config: config.clone(),
            backbone,
            fpn,
            head,
            anchor_generator,
            box_coder: BoxCoder::default(),
            transform: TransformConfig::default(),
            postprocess: PostProcessConfig::default(),
            class_names: None,
            device: vb.device().clone(),
            dtype: vb.dtype(),
        })
    }

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
        let mut model = ckpt.build(opts.dtype, device, |vb| Self::new(&config, vb))?;
        if opts.fuse {
            model.fuse_for_inference_with(opts.precision)?;
        }
        model.transform = opts.transform.clone();
        model.postprocess = opts.postprocess.clone();
        model.class_names = match ckpt.class_names()? {
            Some(names) => Some(names),
            None if config.num_classes == crate::classes::COCO_91.len() => Some(
                crate::classes::COCO_91
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
            ),
            None => None,
        };
        if let Some(names) = &model.class_names {
            if names.len() != config.num_classes {
                return Err(Error::Checkpoint {
                    path: ckpt.path().to_path_buf(),
                    message: format!(
                        "metadata names {} classes, the model has {}",
                        names.len(),
                        config.num_classes
                    ),
                });
            }
        }
        Ok(model)
    }

    /// Prepares the network for inference: folds frozen batch norm into the convolutions and,
    /// on CPU in f32, switches them to the crate's fast fused kernels (`conv` module). The
    /// result is no longer differentiable; training uses the unfused model.
    pub fn fuse_for_inference(&mut self) -> Result<()> {
        self.fuse_for_inference_with(Precision::F32)
    }

    /// As [`RetinaNet::fuse_for_inference`], with the FPN's and the heads' products at
    /// `precision` ([`Precision::Bf16`] is an error on CPUs without AVX512-BF16). The
    /// backbone stays f32: in bf16 its fifty layers compound rounding into 15 % error on the
    /// head outputs (the FPN and heads alone: 0.6 %), measured on the parity fixtures.
    pub fn fuse_for_inference_with(&mut self, precision: Precision) -> Result<()> {
        self.backbone.fuse(Precision::F32)?;
        self.fpn.fuse(precision)?;
        self.head.fuse(precision)?;
        Ok(())
    }

    /// Prepares a model for training: the backbone convolutions whose weights are fixed
    /// (the frozen stages) switch to the fast inference kernels; everything trained stays
    /// differentiable.
    pub fn fuse_frozen(&mut self) -> Result<()> {
        Ok(self.backbone.fuse_frozen()?)
    }

    /// The architecture.
    pub fn config(&self) -> &RetinaNetConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Class names indexed by label, where known.
    pub fn class_names(&self) -> Option<&[String]> {
        self.class_names.as_deref()
    }

    /// Sets the class names (one per class index).
    pub fn set_class_names(&mut self, names: Vec<String>) -> Result<()> {
        if names.len() != self.config.num_classes {
            return Err(Error::Invalid(format!(
                "{} class names for a model with {} classes",
                names.len(),
                self.config.num_classes
            )));
        }
        self.class_names = Some(names);
        Ok(())
    }

    /// The display name of a label: `None` for unnamed classes and placeholders (`N/A`,
    /// `__background__`).
    pub fn class_name(&self, label: usize) -> Option<&str> {
        let name = self.class_names.as_ref()?.get(label)?;
        (!crate::classes::is_placeholder(name)).then_some(name.as_str())
    }

    /// Transforms images into a padded batch on the model's device.
    pub fn preprocess(&self, images: &[RgbImage]) -> Result<ImageBatch> {
        let mut batch = self.transform.preprocess(images, &self.device)?;
        batch.tensor = batch.tensor.to_dtype(self.dtype)?;
        Ok(batch)
    }

    /// Runs the network on a preprocessed batch and returns every intermediate.
    pub fn forward_raw(&self, batch: &ImageBatch) -> Result<RawOutput> {
        self.forward_raw_t(batch, false)
    }

    /// As [`RetinaNet::forward_raw`] in training mode: batch norms that train normalise with
    /// the batch's statistics (torchvision's `model.train()`), which
    /// [`RetinaNet::update_batch_norm_stats`] then applies. Frozen norms behave the same in
    /// both modes.
    pub fn forward_raw_train(&self, batch: &ImageBatch) -> Result<RawOutput> {
        self.forward_raw_t(batch, true)
    }

    /// Moves the running statistics of every trained batch norm towards those of the last
    /// [`RetinaNet::forward_raw_train`] (momentum 0.1, unbiased variance). Returns how many
    /// norms were updated.
    pub fn update_batch_norm_stats(&self) -> Result<usize> {
        Ok(self.backbone.update_running_stats()?)
    }

    fn forward_raw_t(&self, batch: &ImageBatch, train: bool) -> Result<RawOutput> {
        let backbone_features = self.backbone.forward_t(&batch.tensor, train)?;
        let fpn_features = self.fpn.forward(&backbone_features)?;
        let (cls_logits, bbox_regression) = self.head.forward(&fpn_features)?;
        let grid_sizes = fpn_features
            .iter()
            .map(|f| Ok((f.dim(2)?, f.dim(3)?)))
            .collect::<Result<Vec<_>>>()?;
        let a = self.config.num_anchors;
        let num_anchors_per_level = grid_sizes.iter().map(|(h, w)| h * w * a).collect();
        let anchor_boxes = self
            .anchor_generator
            .generate(batch.padded_size()?, &grid_sizes);
        let n = anchor_boxes.len();
        let anchors = Tensor::from_vec(anchor_boxes.concat(), (n, 4), &Device::Cpu)?
            .to_device(&self.device)?;
        Ok(RawOutput {
            backbone_features,
            fpn_features,
            cls_logits,
            bbox_regression,
            anchors,
            anchor_boxes,
            num_anchors_per_level,
        })
    }

    /// Detections of each image of `batch` from the network's outputs, in original-image
    /// pixels, sorted by score.
    pub fn postprocess(&self, raw: &RawOutput, batch: &ImageBatch) -> Result<Vec<Vec<Detection>>> {
        let k = self.config.num_classes;
        let anchors = &raw.anchor_boxes;
        let mut level_anchors: Vec<&[[f32; 4]]> = Vec::new();
        let mut offset = 0;
        for &count in &raw.num_anchors_per_level {
            level_anchors.push(&anchors[offset..offset + count]);
            offset += count;
        }
        let mut out = Vec::with_capacity(batch.image_sizes.len());
        for (i, (&size, &orig)) in batch
            .image_sizes
            .iter()
            .zip(&batch.original_sizes)
            .enumerate()
        {
            let logits = raw.cls_logits.i(i)?;
            let deltas = raw.bbox_regression.i(i)?;
            let mut levels = Vec::with_capacity(raw.num_anchors_per_level.len());
            let mut offset = 0;
            for &count in &raw.num_anchors_per_level {
                levels.push(self.candidates(
                    &logits.narrow(0, offset, count)?,
                    &deltas.narrow(0, offset, count)?,
                    k,
                )?);
                offset += count;
            }
            let dets =
                self.postprocess
                    .detections(&self.box_coder, &levels, &level_anchors, k, size);
            out.push(rescale(dets, size, orig));
        }
        Ok(out)
    }

    /// Copies off the device the rows of one level whose best class passes the threshold.
    fn candidates(&self, logits: &Tensor, deltas: &Tensor, k: usize) -> Result<LevelCandidates> {
        let best: Vec<f32> = match row_maxima_on_host(logits, k) {
            Some(best) => best,
            None => logits.max(D::Minus1)?.to_dtype(DType::F32)?.to_vec1()?,
        };
        let thresh = self.postprocess.score_thresh;
        let anchor_idx: Vec<usize> = best
            .iter()
            .enumerate()
            .filter(|(_, &l)| sigmoid(l) > thresh)
            .map(|(i, _)| i)
            .collect();
        if anchor_idx.is_empty() {
            return Ok(LevelCandidates::default());
        }
        let (logits, deltas) = match (
            rows_on_host(logits, k, &anchor_idx),
            rows_on_host(deltas, 4, &anchor_idx),
        ) {
            (Some(l), Some(d)) => (
                l,
                d.chunks_exact(4)
                    .map(|r| [r[0], r[1], r[2], r[3]])
                    .collect(),
            ),
            _ => {
                let idx: Vec<u32> = anchor_idx.iter().map(|&i| i as u32).collect();
                let idx = Tensor::from_vec(idx, anchor_idx.len(), &self.device)?;
                let logits = logits
                    .index_select(&idx, 0)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                let deltas = deltas
                    .index_select(&idx, 0)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()?
                    .into_iter()
                    .map(|r| [r[0], r[1], r[2], r[3]])
                    .collect();
                (logits, deltas)
            }
        };
        debug_assert_eq!(logits.len(), anchor_idx.len() * k);
        Ok(LevelCandidates {
            anchor_idx,
            logits,
            deltas,
        })
    }

    /// Detects objects in a batch of images of any sizes.
    pub fn detect_batch(&self, images: &[RgbImage]) -> Result<Vec<Vec<Detection>>> {
        let batch = self.preprocess(images)?;
        let raw = self.forward_raw(&batch)?;
        self.postprocess(&raw, &batch)
    }

    /// Detects objects in one image.
    pub fn detect(&self, image: &RgbImage) -> Result<Vec<Detection>> {
        let mut out = self.detect_batch(std::slice::from_ref(image))?;
        Ok(out.pop().unwrap_or_default())
    }
}

/// Maps boxes from the resized image back to the original, as torchvision's `resize_boxes`.
fn rescale(
    mut dets: Vec<Detection>,
    resized: (usize, usize),
    orig: (usize, usize),
) -> Vec<Detection> {
    let ratio_h = orig.0 as f32 / resized.0 as f32;
    let ratio_w = orig.1 as f32 / resized.1 as f32;
    for d in &mut dets {
        d.bbox = [
            d.bbox[0] * ratio_w,
            d.bbox[1] * ratio_h,
            d.bbox[2] * ratio_w,
            d.bbox[3] * ratio_h,
        ];
    }
    dets
}

/// The given rows of a contiguous f32 CPU `(rows, k)` tensor, gathered straight from its
/// storage; `None` for anything else.
fn rows_on_host(t: &Tensor, k: usize, rows: &[usize]) -> Option<Vec<f32>> {
    crate::kernels::host_f32(t, |values| {
        let mut out = Vec::with_capacity(rows.len() * k);
        for &r in rows {
            out.extend_from_slice(values.get(r * k..(r + 1) * k)?);
        }
        Some(out)
    })?
}

/// Per-row maxima of a contiguous f32 CPU `(rows, k)` tensor in one parallel pass (Candle's
/// reduction runs on one thread); `None` for anything else.
fn row_maxima_on_host(t: &Tensor, k: usize) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    if k == 0 {
        return None;
    }
    crate::kernels::host_f32(t, |values| {
        values
            .par_chunks(k)
            .map(|row| row.iter().copied().fold(f32::NEG_INFINITY, f32::max))
            .collect()
    })
}
