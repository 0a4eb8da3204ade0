//! The RetinaNet detector (§4, "RetinaNet Detector"): an image followed top to bottom,
//! [`RetinaNet::preprocess`] → [`RetinaNet::forward_raw`] (backbone → FPN → head, anchors)
//! → [`RetinaNet::postprocess`] → detections.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::RgbImage;

use crate::kernels::{self, profile, Kernels, Precision};
use crate::model::anchors::AnchorGenerator;
use crate::model::backbone::ResNet;
use crate::model::box_coder::BoxCoder;
use crate::model::config::RetinaNetConfig;
use crate::model::fpn::Fpn;
use crate::model::head::RetinaNetHead;
use crate::model::postprocess::{Detection, PostProcessConfig};
use crate::model::transform::{ImageBatch, TransformConfig};
use crate::{Error, Result};

/// Everything the network computes for a batch, before post-processing.
#[derive(Debug, Clone)]
pub struct RawOutput {
    /// C3, C4, C5, kept only when asked ([`RetinaNet::forward_raw_with`]); else empty.
    pub backbone_features: Vec<Tensor>,
    /// P3…P7, kept only when asked; else empty.
    pub fpn_features: Vec<Tensor>,
    /// Class logits `(N, ΣHWA, K)`, level after level.
    pub cls_logits: Tensor,
    /// Box deltas `(N, ΣHWA, 4)`.
    pub bbox_regression: Tensor,
    /// Anchors in padded-batch pixels, shared by the batch's images, on the host (they are
    /// computed there), for post-processing and target assignment.
    pub anchor_boxes: Vec<[f32; 4]>,
    /// H·W·A of each level.
    pub num_anchors_per_level: Vec<usize>,
}

impl RawOutput {
    /// The anchors as a `(ΣHWA, 4)` tensor on the outputs' device, for comparison with
    /// other implementations; the model itself reads [`RawOutput::anchor_boxes`].
    pub fn anchors(&self) -> Result<Tensor> {
        let n = self.anchor_boxes.len();
        let anchors = Tensor::from_vec(self.anchor_boxes.concat(), (n, 4), &Device::Cpu)?;
        Ok(anchors.to_device(self.cls_logits.device())?)
    }
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
    kernels: Kernels,
    /// Whether layers were switched to this crate's fused CPU kernels.
    fused_natively: bool,
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
            kernels: Kernels::Native,
            fused_natively: false,
        })
    }

    /// Prepares the network for inference: folds frozen batch norm into the convolutions and,
    /// on CPU in f32, switches them to the crate's fast fused kernels (`layers::conv`). The
    /// result is no longer differentiable; training uses the unfused model.
    pub fn fuse_for_inference(&mut self) -> Result<()> {
        self.fuse_for_inference_with(Precision::F32)
    }

    /// As [`RetinaNet::fuse_for_inference`], with the FPN's and the heads' products at
    /// `precision` ([`Precision::Bf16`] is an error on CPUs without AVX512-BF16). The
    /// backbone stays f32: in bf16 its fifty layers compound rounding into 15 % error on the
    /// head outputs (the FPN and heads alone: 0.6 %), measured on the parity fixtures.
    pub fn fuse_for_inference_with(&mut self, precision: Precision) -> Result<()> {
        kernels::scoped(self.kernels, || {
            self.backbone.fuse(Precision::F32)?;
            self.fpn.fuse(precision)?;
            self.head.fuse(precision)
        })?;
        self.fused_natively |= kernels::scoped(self.kernels, || kernels::native(&self.device));
        Ok(())
    }

    /// Prepares a model for training: the backbone convolutions whose weights are fixed
    /// (the frozen stages) switch to the fast inference kernels; everything trained stays
    /// differentiable.
    pub fn fuse_frozen(&mut self) -> Result<()> {
        kernels::scoped(self.kernels, || self.backbone.fuse_frozen())?;
        self.fused_natively |= kernels::scoped(self.kernels, || kernels::native(&self.device));
        Ok(())
    }

    /// The implementation the layers run on (see [`Kernels`]).
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// Selects the layers' implementation. Set it before [`RetinaNet::fuse_for_inference`]
    /// (as [`crate::LoadOptions::kernels`] does): layers already fused for this crate's CPU
    /// kernels cannot switch to Candle's ops, which is an error.
    pub fn set_kernels(&mut self, kernels: Kernels) -> Result<()> {
        if kernels == Kernels::Candle && self.fused_natively {
            return Err(Error::Invalid(
                "the model's layers are already fused for this crate's CPU kernels: select \
                 Candle's kernels before fusing (LoadOptions::kernels)"
                    .into(),
            ));
        }
        self.kernels = kernels;
        Ok(())
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

    /// Runs the network on a preprocessed batch: class logits, box deltas and anchors.
    pub fn forward_raw(&self, batch: &ImageBatch) -> Result<RawOutput> {
        self.forward_raw_t(batch, false, false)
    }

    /// As [`RetinaNet::forward_raw`], keeping the backbone's and FPN's features in the output
    /// when `keep_features` (comparisons with torchvision read them; detection does not).
    pub fn forward_raw_with(&self, batch: &ImageBatch, keep_features: bool) -> Result<RawOutput> {
        self.forward_raw_t(batch, false, keep_features)
    }

    /// As [`RetinaNet::forward_raw`] in training mode: batch norms that train normalise with
    /// the batch's statistics (torchvision's `model.train()`), which
    /// [`RetinaNet::update_batch_norm_stats`] then applies. Frozen norms behave the same in
    /// both modes.
    pub fn forward_raw_train(&self, batch: &ImageBatch) -> Result<RawOutput> {
        self.forward_raw_t(batch, true, false)
    }

    /// Moves the running statistics of every trained batch norm towards those of the last
    /// [`RetinaNet::forward_raw_train`] (momentum 0.1, unbiased variance). Returns how many
    /// norms were updated.
    pub fn update_batch_norm_stats(&self) -> Result<usize> {
        Ok(self.backbone.update_running_stats()?)
    }

    fn forward_raw_t(&self, batch: &ImageBatch, train: bool, keep: bool) -> Result<RawOutput> {
        kernels::scoped(self.kernels, || self.network(batch, train, keep))
    }

    /// Backbone → FPN → head, and the anchors of the feature maps' sizes.
    fn network(&self, batch: &ImageBatch, train: bool, keep: bool) -> Result<RawOutput> {
        let stage = |name: &'static str| move || format!("stage {name}");
        let c = profile::timed(stage("2 backbone"), 0.0, || {
            self.backbone.forward_t(&batch.tensor, train)
        })?;
        let p = profile::timed(stage("3 fpn"), 0.0, || self.fpn.forward(&c))?;
        let (cls_logits, bbox_regression) =
            profile::timed(stage("4 head"), 0.0, || self.head.forward(&p))?;
        let grid_sizes = p
            .iter()
            .map(|f| Ok((f.dim(2)?, f.dim(3)?)))
            .collect::<Result<Vec<_>>>()?;
        let a = self.config.num_anchors;
        let num_anchors_per_level = grid_sizes.iter().map(|(h, w)| h * w * a).collect();
        let anchor_boxes = self
            .anchor_generator
            .generate(batch.padded_size()?, &grid_sizes);
        let (backbone_features, fpn_features) = if keep { (c, p) } else { Default::default() };
        Ok(RawOutput {
            backbone_features,
            fpn_features,
            cls_logits,
            bbox_regression,
            anchor_boxes,
            num_anchors_per_level,
        })
    }

    /// Detections of each image of `batch` from the network's outputs, in original-image
    /// pixels, sorted by score.
    pub fn postprocess(&self, raw: &RawOutput, batch: &ImageBatch) -> Result<Vec<Vec<Detection>>> {
        let post = || self.postprocess.batch(&self.box_coder, raw, batch);
        kernels::scoped(self.kernels, post)
    }

    /// Detects objects in a batch of images of any sizes.
    pub fn detect_batch(&self, images: &[RgbImage]) -> Result<Vec<Vec<Detection>>> {
        let stage = |name: &'static str| move || format!("stage {name}");
        let batch = profile::timed(stage("1 preprocess"), 0.0, || self.preprocess(images))?;
        let raw = self.forward_raw(&batch)?;
        profile::timed(stage("5 postprocess"), 0.0, || {
            self.postprocess(&raw, &batch)
        })
    }

    /// Detects objects in one image.
    pub fn detect(&self, image: &RgbImage) -> Result<Vec<Detection>> {
        let mut out = self.detect_batch(std::slice::from_ref(image))?;
        Ok(out.pop().unwrap_or_default())
    }
}
