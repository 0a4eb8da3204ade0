//! Feature pyramid network (Lin et al., 2017) over C3–C5 with RetinaNet's extra levels P6
//! and P7, as torchvision's `backbone.fpn`.

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, Conv2dConfig, VarBuilder};

use crate::layers::conv::{Conv, Precision};
use crate::layers::layout::upsample_nearest;

/// Input of the P6 convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExtraInput {
    /// P6 = conv(P5): torchvision's v1 RetinaNet.
    P5,
    /// P6 = conv(C5): the paper, and torchvision's v2.
    C5,
}

/// FPN with lateral 1×1 convs (`inner_blocks.{i}.0`), 3×3 output convs
/// (`layer_blocks.{i}.0`) and `extra_blocks.p6/p7`.
#[derive(Debug, Clone)]
pub struct Fpn {
    inner_blocks: Vec<Conv>,
    layer_blocks: Vec<Conv>,
    p6: Conv,
    p7: Conv,
    extra_input: ExtraInput,
}

impl Fpn {
    /// Builds the FPN (rooted at `backbone.fpn`) for backbone outputs of `in_channels`.
    pub fn new(
        in_channels: &[usize],
        out_channels: usize,
        extra_input: ExtraInput,
        vb: VarBuilder,
    ) -> Result<Self> {
        let same = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let down = Conv2dConfig {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let mut inner_blocks = Vec::new();
        let mut layer_blocks = Vec::new();
        for (i, &c) in in_channels.iter().enumerate() {
            let vb_inner = vb.pp("inner_blocks").pp(i).pp("0");
            let inner = conv2d(c, out_channels, 1, Default::default(), vb_inner)?;
            inner_blocks.push(Conv::Plain(inner));
            let vb_layer = vb.pp("layer_blocks").pp(i).pp("0");
            let layer = conv2d(out_channels, out_channels, 3, same, vb_layer)?;
            layer_blocks.push(Conv::Plain(layer));
        }
        let p6_in = match extra_input {
            ExtraInput::P5 => out_channels,
            ExtraInput::C5 => *in_channels.last().unwrap_or(&out_channels),
        };
        let extra = vb.pp("extra_blocks");
        let p6 = Conv::Plain(conv2d(p6_in, out_channels, 3, down, extra.pp("p6"))?);
        let p7 = Conv::Plain(conv2d(out_channels, out_channels, 3, down, extra.pp("p7"))?);
        Ok(Self {
            inner_blocks,
            layer_blocks,
            p6,
            p7,
            extra_input,
        })
    }

    /// Maps C3–C5 to P3–P7 (all with `out_channels` channels).
    pub fn forward(&self, c: &[Tensor]) -> Result<Vec<Tensor>> {
        let n = c.len();
        let mut last_inner = self.inner_blocks[n - 1].forward(&c[n - 1])?;
        let mut p = vec![self.layer_blocks[n - 1].forward(&last_inner)?];
        for i in (0..n - 1).rev() {
            let (_, _, h, w) = c[i].dims4()?;
            // lateral(C_i) + upsampled top-down path, the sum fused into the lateral conv.
            let top_down = upsample_nearest(&last_inner, h, w)?;
            last_inner = self.inner_blocks[i].forward_with(&c[i], Some(&top_down), false)?;
            p.insert(0, self.layer_blocks[i].forward(&last_inner)?);
        }
        let p6_input = match self.extra_input {
            ExtraInput::P5 => &p[n - 1],
            ExtraInput::C5 => &c[n - 1],
        };
        let p6 = self.p6.forward(p6_input)?;
        // P6 is returned before the ReLU; P7 = conv(ReLU(P6)).
        let p7 = self.p7.forward(&p6.relu()?)?;
        p.push(p6);
        p.push(p7);
        Ok(p)
    }

    /// Switches every convolution to the fast inference path.
    pub fn fuse(&mut self, precision: Precision) -> Result<()> {
        let convs = self
            .inner_blocks
            .iter_mut()
            .chain(self.layer_blocks.iter_mut());
        for conv in convs.chain([&mut self.p6, &mut self.p7]) {
            conv.fuse(None, precision)?;
        }
        Ok(())
    }
}
