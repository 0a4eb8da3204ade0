//! The architecture of a RetinaNet (§4, "RetinaNet Detector"): trunk, pyramid width, head
//! layout and class count, built for torchvision's layouts or inferred from a checkpoint.

use crate::io::checkpoint::Checkpoint;
use crate::model::backbone::{BlockKind, ResNetConfig};
use crate::model::fpn::ExtraInput;
use crate::{Error, Result};

/// Architecture of a RetinaNet.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RetinaNetConfig {
    /// ResNet trunk.
    pub backbone: ResNetConfig,
    /// Number of classes K (torchvision's COCO models: 91, indexed by category id).
    pub num_classes: usize,
    /// Anchors per location A.
    pub num_anchors: usize,
    /// FPN width.
    pub fpn_channels: usize,
    /// P6 from P5 (v1) or C5 (v2).
    pub extra_input: ExtraInput,
    /// GroupNorm(32) after each head conv (v2).
    pub head_group_norm: bool,
    /// Frozen batch-norm eps.
    pub bn_eps: f64,
}

impl RetinaNetConfig {
    /// torchvision's `retinanet_resnet50_fpn` layout (v1) on a ResNet of `depth`, with the
    /// COCO checkpoint's batch-norm eps of 0.
    pub fn v1(depth: usize, num_classes: usize) -> Result<Self> {
        Ok(Self {
            backbone: resnet(depth)?,
            num_classes,
            num_anchors: 9,
            fpn_channels: 256,
            extra_input: ExtraInput::P5,
            head_group_norm: false,
            bn_eps: 0.0,
        })
    }

    /// torchvision's `retinanet_resnet50_fpn_v2` layout on a ResNet of `depth`.
    pub fn v2(depth: usize, num_classes: usize) -> Result<Self> {
        Ok(Self {
            extra_input: ExtraInput::C5,
            head_group_norm: true,
            bn_eps: 1e-5,
            ..Self::v1(depth, num_classes)?
        })
    }

    /// Infers the architecture of a torchvision RetinaNet checkpoint: ResNet depth from block
    /// counts, v1/v2 from the head's norm layers and the P6 input channels, the class count
    /// from `cls_logits`, and the batch-norm eps from the metadata key `bn_eps` (else 0 for
    /// v1, 1e-5 for v2).
    pub fn infer(ckpt: &Checkpoint) -> Result<Self> {
        let backbone = resnet_blocks(ckpt, "backbone.body.");
        if let Some(l) = backbone.layers.iter().position(|&count| count == 0) {
            return Err(ckpt_error(
                ckpt,
                format!(
                    "not a torchvision ResNet backbone: no tensor `backbone.body.layer{}.0.conv1.weight`",
                    l + 1
                ),
            ));
        }
        let fpn_channels = shape4(ckpt, "backbone.fpn.inner_blocks.0.0.weight")?[0];
        let p6_in = shape4(ckpt, "backbone.fpn.extra_blocks.p6.weight")?[1];
        let extra_input = if p6_in == fpn_channels {
            ExtraInput::P5
        } else {
            ExtraInput::C5
        };
        let reg_out = shape4(ckpt, "head.regression_head.bbox_reg.weight")?[0];
        let cls_out = shape4(ckpt, "head.classification_head.cls_logits.weight")?[0];
        let num_anchors = reg_out / 4;
        if reg_out % 4 != 0 || num_anchors == 0 || cls_out % num_anchors != 0 {
            return Err(ckpt_error(
                ckpt,
                format!(
                    "head shapes disagree: bbox_reg has {reg_out} outputs, cls_logits {cls_out}"
                ),
            ));
        }
        let head_group_norm = ckpt
            .shape("head.classification_head.conv.0.1.weight")
            .is_some();
        let bn_eps = match ckpt.metadata().get("bn_eps") {
            Some(s) => s.parse().map_err(|_| {
                ckpt_error(ckpt, format!("metadata `bn_eps` is not a number: {s:?}"))
            })?,
            None if head_group_norm => 1e-5,
            None => 0.0,
        };
        Ok(Self {
            backbone,
            num_classes: cls_out / num_anchors,
            num_anchors,
            fpn_channels,
            extra_input,
            head_group_norm,
            bn_eps,
        })
    }

    /// A short human-readable description, e.g. `ResNet-50 FPN v1, 91 classes`.
    pub fn describe(&self) -> String {
        let depth = self
            .backbone
            .depth()
            .map_or_else(|| format!("{:?}", self.backbone.layers), |d| d.to_string());
        let version = if self.head_group_norm { "v2" } else { "v1" };
        format!(
            "ResNet-{depth} FPN {version} (P6 from {:?}), {} classes, bn eps {}",
            self.extra_input, self.num_classes, self.bn_eps
        )
    }
}

/// The ResNet whose blocks `ckpt` holds under `prefix` (`backbone.body.` in a RetinaNet,
/// empty in an ImageNet checkpoint): bottleneck blocks if `layer1.0` has a third conv, and
/// the blocks `layer{1–4}.{i}` counted up to the first missing one (0 where a stage is
/// absent).
pub fn resnet_blocks(ckpt: &Checkpoint, prefix: &str) -> ResNetConfig {
    let block = if ckpt
        .shape(&format!("{prefix}layer1.0.conv3.weight"))
        .is_some()
    {
        BlockKind::Bottleneck
    } else {
        BlockKind::Basic
    };
    let mut layers = [0; 4];
    for (l, count) in layers.iter_mut().enumerate() {
        while ckpt
            .shape(&format!("{prefix}layer{}.{count}.conv1.weight", l + 1))
            .is_some()
        {
            *count += 1;
        }
    }
    ResNetConfig { block, layers }
}

fn resnet(depth: usize) -> Result<ResNetConfig> {
    ResNetConfig::from_depth(depth).ok_or_else(|| {
        Error::Invalid(format!(
            "unsupported ResNet depth {depth} (expected 18, 34, 50, 101 or 152)"
        ))
    })
}

fn ckpt_error(ckpt: &Checkpoint, message: String) -> Error {
    Error::Checkpoint {
        path: ckpt.path().to_path_buf(),
        message,
    }
}

/// The shape of the 4-d tensor `name`, which a RetinaNet checkpoint must hold.
fn shape4<'a>(ckpt: &'a Checkpoint, name: &str) -> Result<&'a [usize]> {
    match ckpt.shape(name) {
        Some(s) if s.len() == 4 => Ok(s),
        Some(s) => Err(ckpt_error(
            ckpt,
            format!("tensor `{name}` has shape {s:?}, expected rank 4"),
        )),
        None => Err(ckpt_error(
            ckpt,
            format!("not a torchvision RetinaNet checkpoint: no tensor `{name}`"),
        )),
    }
}
