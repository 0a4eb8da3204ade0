//! ResNet backbone (He et al., 2016) returning C3, C4 and C5, as torchvision's
//! `backbone.body` (`IntermediateLayerGetter` over layer2…layer4).
//!
//! Batch norm is frozen: each `bn` becomes a per-channel scale and shift computed once from
//! the checkpoint's four buffers, as torchvision's `FrozenBatchNorm2d` does. A norm whose
//! weight is a variable (the training parameter store serves it so when batch norm trains,
//! see [`crate::train::BackboneNorm`]) is a [`BatchNorm2dTrain`] instead: batch statistics in
//! a training forward ([`ResNet::forward_t`]), running statistics otherwise.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{conv2d_no_bias, Conv2dConfig, VarBuilder};

use crate::layers::norm::{max_pool_3x3_s2_p1_train, BatchNorm2dTrain};
use crate::kernels::{conv2d_train, conv2d_train_fused, Conv, Precision, TrainBias};

/// Residual block type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BlockKind {
    /// Two 3×3 convolutions (ResNet-18/34).
    Basic,
    /// 1×1, 3×3, 1×1 convolutions with 4× expansion (ResNet-50/101/152).
    Bottleneck,
}

impl BlockKind {
    /// Output channels of a block over `planes`.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// ResNet architecture: block type and number of blocks in layer1…layer4.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResNetConfig {
    /// Block type.
    pub block: BlockKind,
    /// Blocks per stage.
    pub layers: [usize; 4],
}

impl ResNetConfig {
    /// The standard configuration for a depth of 18, 34, 50, 101 or 152.
    pub fn from_depth(depth: usize) -> Option<Self> {
        let (block, layers) = match depth {
            18 => (BlockKind::Basic, [2, 2, 2, 2]),
            34 => (BlockKind::Basic, [3, 4, 6, 3]),
            50 => (BlockKind::Bottleneck, [3, 4, 6, 3]),
            101 => (BlockKind::Bottleneck, [3, 4, 23, 3]),
            152 => (BlockKind::Bottleneck, [3, 8, 36, 3]),
            _ => return None,
        };
        Some(Self { block, layers })
    }

    /// The standard depth this configuration corresponds to, if any.
    pub fn depth(&self) -> Option<usize> {
        [18, 34, 50, 101, 152]
            .into_iter()
            .find(|&d| Self::from_depth(d).as_ref() == Some(self))
    }

    /// Channels of C3, C4 and C5.
    pub fn out_channels(&self) -> [usize; 3] {
        let e = self.block.expansion();
        [128 * e, 256 * e, 512 * e]
    }
}

/// Frozen batch norm: `y = x · scale + shift` with per-channel constants.
#[derive(Debug, Clone)]
pub struct FrozenBatchNorm2d {
    /// Per-channel scale `(1, C, 1, 1)`.
    pub scale: Tensor,
    /// Per-channel shift `(1, C, 1, 1)`.
    pub shift: Tensor,
}

impl FrozenBatchNorm2d {
    /// Reads `weight`, `bias`, `running_mean`, `running_var` and folds them with `eps`.
    pub fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Self::with_weight(vb.get(channels, "weight")?, eps, vb)
    }

    /// As [`FrozenBatchNorm2d::new`] with the weight already read.
    fn with_weight(weight: Tensor, eps: f64, vb: VarBuilder) -> Result<Self> {
        let channels = weight.elem_count();
        let bias = vb.get(channels, "bias")?;
        let mean = vb.get(channels, "running_mean")?;
        let var = vb.get(channels, "running_var")?;
        // As torchvision: scale = w · (var + eps)^-½, shift = b − mean · scale.
        let scale = (weight * (var + eps)?.sqrt()?.recip()?)?;
        let shift = (bias - (mean * &scale)?)?;
        Ok(Self {
            scale: scale.reshape((1, channels, 1, 1))?,
            shift: shift.reshape((1, channels, 1, 1))?,
        })
    }
}

impl Module for FrozenBatchNorm2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_mul(&self.scale)?.broadcast_add(&self.shift)
    }
}

/// The batch norm after a backbone convolution.
#[derive(Debug, Clone)]
enum Norm {
    /// Fixed statistics and affine.
    Frozen(FrozenBatchNorm2d),
    /// Trained: batch statistics in training.
    Train(BatchNorm2dTrain),
}

impl Norm {
    /// Reads a frozen norm, or a trained one when its weight is a variable.
    fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        Ok(if weight.is_variable() {
            Norm::Train(BatchNorm2dTrain::new(channels, eps, vb)?)
        } else {
            Norm::Frozen(FrozenBatchNorm2d::with_weight(weight, eps, vb)?)
        })
    }

    /// The per-channel `(scale, shift)` of evaluation mode, `(1, C, 1, 1)` each.
    fn scale_shift(&self) -> Result<(Tensor, Tensor)> {
        match self {
            Norm::Frozen(bn) => Ok((bn.scale.clone(), bn.shift.clone())),
            Norm::Train(bn) => bn.scale_shift(),
        }
    }
}

/// A bias-free convolution followed by batch norm (`convN` + `bnN`, or `downsample.0` +
/// `downsample.1`). [`ConvBn::fuse`] folds the norm into the convolution.
#[derive(Debug, Clone)]
pub struct ConvBn {
    conv: Conv,
    bn: Option<Norm>,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        eps: f64,
        vb_conv: VarBuilder,
        vb_bn: VarBuilder,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: k / 2,
            stride,
            ..Default::default()
        };
        Ok(Self {
            conv: Conv::Plain(conv2d_no_bias(cin, cout, k, cfg, vb_conv)?),
            bn: Some(Norm::new(cout, eps, vb_bn)?),
        })
    }

    /// `relu?(bn(conv(x)) [+ residual])` in evaluation mode.
    pub fn forward(&self, x: &Tensor, residual: Option<&Tensor>, relu: bool) -> Result<Tensor> {
        self.forward_t(x, residual, relu, false)
    }

    /// `relu?(bn(conv(x)) [+ residual])`; with `train`, a trained batch norm normalises with
    /// the batch's statistics (and keeps them for [`ConvBn::update_running_stats`]).
    pub fn forward_t(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
        train: bool,
    ) -> Result<Tensor> {
        let (Some(bn), Conv::Plain(c)) = (&self.bn, &self.conv) else {
            return self.conv.forward_with(x, residual, relu);
        };
        let cfg = c.config();
        if let (Norm::Train(bn), true) = (bn, train) {
            let y = conv2d_train(x, c.weight(), cfg.stride, cfg.padding)?;
            return bn.forward_train(&y, residual, relu);
        }
        // The norm's evaluation form folds into the convolution, its scale into the kernel
        // (still differentiable in the weights) and its shift into a constant bias.
        let (scale, shift) = bn.scale_shift()?;
        let (s, p) = (cfg.stride, cfg.padding);
        if scale.track_op() {
            // A trainable norm in evaluation mode: the scale needs its gradient too.
            let cout = scale.elem_count();
            let w = c.weight().broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
            let shift = TrainBias::Constant(&shift);
            return conv2d_train_fused(x, &w, s, p, shift, residual, relu);
        }
        let norm = TrainBias::FrozenNorm {
            scale: &scale,
            shift: &shift,
        };
        conv2d_train_fused(x, c.weight(), s, p, norm, residual, relu)
    }

    /// Applies the statistics of the last training forward to a trained norm's running
    /// statistics; returns whether there were any.
    pub fn update_running_stats(&self) -> Result<bool> {
        match &self.bn {
            Some(Norm::Train(bn)) => bn.update_running_stats(),
            _ => Ok(false),
        }
    }

    /// Whether the convolution's weights are fixed (no variable behind them).
    fn is_frozen(&self) -> bool {
        match &self.conv {
            Conv::Plain(c) => !c.weight().track_op(),
            Conv::Fused(_) => true,
        }
    }

    /// Whether [`ConvBn::fuse`] switched this layer to the fast inference path.
    pub fn is_fused(&self) -> bool {
        matches!(self.conv, Conv::Fused(_))
    }

    /// As [`ConvBn::fuse`] for a frozen layer of a model in training (see
    /// [`Conv::fuse_frozen`]).
    fn fuse_frozen(&mut self) -> Result<()> {
        self.fold_bn(|conv, bn| conv.fuse_frozen(bn))
    }

    /// Folds the batch norm into the convolution's weights and bias (inference only).
    pub fn fuse(&mut self, precision: Precision) -> Result<()> {
        self.fold_bn(|conv, bn| conv.fuse(bn, precision))
    }

    /// Runs `fuse` with the norm's scale and shift, dropping the norm once the
    /// convolution holds it.
    fn fold_bn(
        &mut self,
        fuse: impl FnOnce(&mut Conv, Option<(&Tensor, &Tensor)>) -> Result<()>,
    ) -> Result<()> {
        if let Some(bn) = &self.bn {
            let (scale, shift) = bn.scale_shift()?;
            fuse(&mut self.conv, Some((&scale, &shift)))?;
            if matches!(self.conv, Conv::Fused(_)) {
                self.bn = None;
            }
        }
        Ok(())
    }
}

/// One residual block; the stride sits on the 3×3 convolution (ResNet v1.5, as torchvision).
#[derive(Debug, Clone)]
struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    fn new(
        kind: BlockKind,
        cin: usize,
        planes: usize,
        stride: usize,
        eps: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        let cout = planes * kind.expansion();
        // (in, out, kernel, stride) of conv1, conv2[, conv3].
        let shapes = match kind {
            BlockKind::Basic => vec![(cin, planes, 3, stride), (planes, planes, 3, 1)],
            BlockKind::Bottleneck => vec![
                (cin, planes, 1, 1),
                (planes, planes, 3, stride),
                (planes, cout, 1, 1),
            ],
        };
        let convs = shapes
            .into_iter()
            .enumerate()
            .map(|(i, (ci, co, k, s))| {
                let (conv, bn) = (format!("conv{}", i + 1), format!("bn{}", i + 1));
                ConvBn::new(ci, co, k, s, eps, vb.pp(conv), vb.pp(bn))
            })
            .collect::<Result<Vec<_>>>()?;
        let downsample = if stride != 1 || cin != cout {
            let vb = vb.pp("downsample");
            Some(ConvBn::new(
                cin,
                cout,
                1,
                stride,
                eps,
                vb.pp("0"),
                vb.pp("1"),
            )?)
        } else {
            None
        };
        Ok(Self { convs, downsample })
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let identity = match &self.downsample {
            Some(d) => d.forward_t(x, None, false, train)?,
            None => x.clone(),
        };
        let Some((last, rest)) = self.convs.split_last() else {
            candle_core::bail!("a residual block without convolutions");
        };
        let mut y = x.clone();
        for conv in rest {
            y = conv.forward_t(&y, None, true, train)?;
        }
        // The residual sum and its ReLU are fused into the last convolution (or its norm).
        last.forward_t(&y, Some(&identity), true, train)
    }

    fn convs(&self) -> impl Iterator<Item = &ConvBn> {
        self.convs.iter().chain(self.downsample.as_ref())
    }

    fn fuse(&mut self, precision: Precision) -> Result<()> {
        for c in self.convs.iter_mut().chain(self.downsample.as_mut()) {
            c.fuse(precision)?;
        }
        Ok(())
    }

    fn fuse_frozen(&mut self) -> Result<()> {
        for c in self.convs.iter_mut().chain(self.downsample.as_mut()) {
            if c.is_frozen() {
                c.fuse_frozen()?;
            }
        }
        Ok(())
    }
}

/// ResNet trunk under `backbone.body`.
#[derive(Debug, Clone)]
pub struct ResNet {
    stem: ConvBn,
    layers: [Vec<Block>; 4],
}

impl ResNet {
    /// Builds the trunk from `vb` (rooted at `backbone.body`).
    pub fn new(cfg: &ResNetConfig, bn_eps: f64, vb: VarBuilder) -> Result<Self> {
        let stem = ConvBn::new(3, 64, 7, 2, bn_eps, vb.pp("conv1"), vb.pp("bn1"))?;
        let mut cin = 64;
        let mut stage = |i: usize| -> Result<Vec<Block>> {
            let planes = 64 << i;
            let vb = vb.pp(format!("layer{}", i + 1));
            (0..cfg.layers[i])
                .map(|j| {
                    let stride = if j == 0 && i > 0 { 2 } else { 1 };
                    let block = Block::new(cfg.block, cin, planes, stride, bn_eps, vb.pp(j))?;
                    cin = planes * cfg.block.expansion();
                    Ok(block)
                })
                .collect()
        };
        let layers = [stage(0)?, stage(1)?, stage(2)?, stage(3)?];
        Ok(Self { stem, layers })
    }

    /// Moves the running statistics of every trained batch norm towards those of the last
    /// training forward (momentum [`crate::layers::norm::BN_MOMENTUM`], as torchvision does
    /// in each training-mode forward). Returns how many norms were updated.
    pub fn update_running_stats(&self) -> Result<usize> {
        let mut updated = usize::from(self.stem.update_running_stats()?);
        for block in self.layers.iter().flatten() {
            for conv in block.convs() {
                updated += usize::from(conv.update_running_stats()?);
            }
        }
        Ok(updated)
    }

    /// Folds every batch norm into its convolution (inference only).
    pub fn fuse(&mut self, precision: Precision) -> Result<()> {
        self.stem.fuse(precision)?;
        for block in self.layers.iter_mut().flatten() {
            block.fuse(precision)?;
        }
        Ok(())
    }

    /// Folds the batch norm of every convolution whose weights are fixed (the stages
    /// training leaves frozen) into the fast inference path; trained ones stay differentiable.
    pub fn fuse_frozen(&mut self) -> Result<()> {
        if self.stem.is_frozen() {
            self.stem.fuse_frozen()?;
        }
        for block in self.layers.iter_mut().flatten() {
            block.fuse_frozen()?;
        }
        Ok(())
    }

    /// Returns C3, C4, C5 (outputs of layer2, layer3, layer4) for an `(N, 3, H, W)` batch,
    /// in evaluation mode.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        self.forward_t(x, false)
    }

    /// As [`ResNet::forward`]; with `train`, trained batch norms use the batch's statistics
    /// (torchvision's `model.train()`), to be applied with [`ResNet::update_running_stats`].
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let x = self.stem.forward_t(x, None, true, train)?;
        let mut x = if self.stem.is_fused() {
            crate::kernels::max_pool_3x3_s2_p1(&x)?
        } else if x.track_op() {
            // A trained stem: the pool's gradient must reach it.
            max_pool_3x3_s2_p1_train(&x)?
        } else {
            max_pool_3x3_s2_p1(&x)?
        };
        let mut out = Vec::with_capacity(3);
        for (i, layer) in self.layers.iter().enumerate() {
            for block in layer {
                x = block.forward(&x, train)?;
            }
            if i > 0 {
                out.push(x.clone());
            }
        }
        Ok(out)
    }
}

/// `MaxPool2d(3, stride 2, padding 1)`. Candle's pool has no padding: replicate-padding
/// gives the same maxima as PyTorch's implicit −∞ padding.
fn max_pool_3x3_s2_p1(x: &Tensor) -> Result<Tensor> {
    let x = x
        .pad_with_same(D::Minus1, 1, 1)?
        .pad_with_same(D::Minus2, 1, 1)?;
    x.max_pool2d_with_stride(3, 2)
}
