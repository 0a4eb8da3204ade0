//! The classification and box-regression subnets (§4, "Classification Subnet", "Box
//! Regression Subnet") with their initialisation (§4.1, "Initialization"), as torchvision's
//! `RetinaNetHead`.
//!
//! Each subnet is 4 × (3×3 conv, [GroupNorm(32)], ReLU) followed by a 3×3 conv to A·K class
//! logits or A·4 box deltas, shared across pyramid levels. Every tensor declares its initial
//! value through the `VarBuilder` (a hint stores holding weights ignore): convolution weights
//! N(0, 0.01), biases 0 but the classifier's, which starts at the prior
//! ([`PRIOR_PROBABILITY`]); GroupNorm weight 1, bias 0.

use candle_core::{Module, Result, Tensor};
use candle_nn::{group_norm, Conv2d, Conv2dConfig, GroupNorm, Init, VarBuilder};

use crate::layers::conv::{Algorithm, Conv, Precision, PreparedConv};
use crate::layers::layout::channels_last;

/// The prior probability π of foreground the classifier starts at (§4.1): its bias
/// b = −log((1 − π)/π) keeps the many background anchors from swamping the first losses.
pub const PRIOR_PROBABILITY: f64 = 0.01;

/// The initial weights of every head convolution (§4.1): Gaussian, σ = 0.01.
const WEIGHT_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.01,
};

/// A 3×3, stride-1, padding-1 convolution `channels → out` whose bias, if any, starts at
/// `bias`.
fn conv3x3(channels: usize, out: usize, bias: Option<f64>, vb: VarBuilder) -> Result<Conv2d> {
    let weight = vb.get_with_hints((out, channels, 3, 3), "weight", WEIGHT_INIT)?;
    let bias = bias
        .map(|b| vb.get_with_hints(out, "bias", Init::Const(b)))
        .transpose()?;
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    Ok(Conv2d::new(weight, bias, cfg))
}

/// One conv of a subnet's trunk: `conv.{i}.0` and, in v2, GroupNorm `conv.{i}.1`.
#[derive(Debug, Clone)]
struct ConvNormAct {
    conv: Conv,
    norm: Option<GroupNorm>,
}

impl ConvNormAct {
    fn new(channels: usize, group_norm_: bool, vb: VarBuilder) -> Result<Self> {
        // v2 convs carry no bias: the GroupNorm that follows has one.
        let (conv, norm) = if group_norm_ {
            let conv = conv3x3(channels, channels, None, vb.pp("0"))?;
            (conv, Some(group_norm(32, channels, 1e-5, vb.pp("1"))?))
        } else {
            (conv3x3(channels, channels, Some(0.0), vb.pp("0"))?, None)
        };
        Ok(Self {
            conv: Conv::Plain(conv),
            norm,
        })
    }

    fn forward(&self, conv: &PreparedConv, x: &Tensor) -> Result<Tensor> {
        match &self.norm {
            Some(norm) => norm.forward(&conv.forward_with(x, None, false)?)?.relu(),
            // Without a norm, the ReLU is fused into the convolution.
            None => conv.forward_with(x, None, true),
        }
    }
}

/// A subnet: trunk plus a final conv producing `outputs_per_anchor` values per anchor.
#[derive(Debug, Clone)]
struct Subnet {
    trunk: Vec<ConvNormAct>,
    out: Conv,
    outputs_per_anchor: usize,
}

impl Subnet {
    /// A subnet whose final conv `out_name` starts with bias `out_bias`.
    fn new(
        channels: usize,
        num_anchors: usize,
        outputs_per_anchor: usize,
        (out_name, out_bias): (&str, f64),
        group_norm: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let trunk = (0..4)
            .map(|i| ConvNormAct::new(channels, group_norm, vb.pp("conv").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let outputs = num_anchors * outputs_per_anchor;
        let out = Conv::Plain(conv3x3(channels, outputs, Some(out_bias), vb.pp(out_name))?);
        Ok(Self {
            trunk,
            out,
            outputs_per_anchor,
        })
    }

    /// Runs one level and lays it out as `(N, H·W·A, outputs)`, location-major then anchor.
    fn forward_level(&self, convs: &[PreparedConv], x: &Tensor) -> Result<Tensor> {
        let mut y = x.clone();
        for (layer, conv) in self.trunk.iter().zip(convs) {
            y = layer.forward(conv, &y)?;
        }
        let y = convs[self.trunk.len()].forward_with(&y, None, false)?;
        let n = y.dim(0)?;
        let k = self.outputs_per_anchor;
        // (N, A·K, H, W) → (N, H, W, A·K) = (N, H·W·A, K).
        channels_last(&y)?.reshape((n, (), k))
    }

    /// The forward algorithm of the trainable 3×3 convolutions. Without normalisation (v1),
    /// Winograd F(2×2, 3×3): the R50 training step 4–5 % faster, and train parity unchanged
    /// (float32 gradients as close to float64 as with direct products). With v2's
    /// GroupNorms, direct products: Winograd's rounding near them moved deep gradients 8×
    /// further from float64 and the three-step parity past its bound.
    fn training_algorithm(&self) -> Algorithm {
        if self.trunk.iter().any(|l| l.norm.is_some()) {
            Algorithm::Gemm
        } else {
            Algorithm::Winograd2
        }
    }

    fn fuse(&mut self, precision: Precision) -> Result<()> {
        for layer in &mut self.trunk {
            layer.conv.fuse(None, precision)?;
        }
        self.out.fuse(None, precision)
    }

    fn forward(&self, levels: &[Tensor]) -> Result<Tensor> {
        // The same weights run on every level: prepare each convolution once.
        let algorithm = self.training_algorithm();
        let convs = (self.trunk.iter().map(|l| &l.conv))
            .chain([&self.out])
            .map(|c| c.prepare_with(algorithm))
            .collect::<Result<Vec<_>>>()?;
        let outs = levels
            .iter()
            .map(|x| self.forward_level(&convs, x))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&outs, 1)
    }
}

/// Classification and regression subnets (`head.classification_head`, `head.regression_head`).
#[derive(Debug, Clone)]
pub struct RetinaNetHead {
    classification: Subnet,
    regression: Subnet,
}

impl RetinaNetHead {
    /// Builds both subnets from `vb` (rooted at `head`).
    pub fn new(
        channels: usize,
        num_anchors: usize,
        num_classes: usize,
        group_norm: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let classification = Subnet::new(
            channels,
            num_anchors,
            num_classes,
            ("cls_logits", prior_bias()),
            group_norm,
            vb.pp("classification_head"),
        )?;
        let regression = Subnet::new(
            channels,
            num_anchors,
            4,
            ("bbox_reg", 0.0),
            group_norm,
            vb.pp("regression_head"),
        )?;
        Ok(Self {
            classification,
            regression,
        })
    }

    /// Switches every convolution to the fast inference path.
    pub fn fuse(&mut self, precision: Precision) -> Result<()> {
        self.classification.fuse(precision)?;
        self.regression.fuse(precision)
    }

    /// Class logits `(N, ΣHWA, K)` and box deltas `(N, ΣHWA, 4)` over all levels.
    pub fn forward(&self, levels: &[Tensor]) -> Result<(Tensor, Tensor)> {
        Ok((
            self.classification.forward(levels)?,
            self.regression.forward(levels)?,
        ))
    }
}

/// The classifier's initial bias, b = −log((1 − π)/π) (§4.1).
fn prior_bias() -> f64 {
    -((1.0 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY).ln()
}
