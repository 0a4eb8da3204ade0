//! Feature pyramid network (Lin et al., 2017) over C3–C5 with RetinaNet's extra levels P6
//! and P7, as torchvision's `backbone.fpn`.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{conv2d, Conv2dConfig, VarBuilder};
use rayon::prelude::*;

use crate::kernels::Conv;

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
    pub fn fuse(&mut self, precision: crate::kernels::Precision) -> Result<()> {
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

/// Nearest upsampling to `(h, w)`, as torchvision's `F.interpolate(size=…)`. An exact 2×
/// (always the case for batches padded to a multiple of 32) is [`Upsample2x`] for f32 on the
/// CPU and elsewhere reshape and broadcast: the same values, and correct gradients, whereas
/// Candle's `upsample_nearest2d` backward overwrites the gradient already accumulated for
/// its input.
pub fn upsample_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (n, c, xh, xw) = x.dims4()?;
    if (h, w) == (2 * xh, 2 * xw) && x.device().is_cpu() && x.dtype() == DType::F32 {
        x.contiguous()?.apply_op1(Upsample2x)
    } else if (h, w) == (2 * xh, 2 * xw) {
        x.reshape((n, c, xh, 1, xw, 1))?
            .broadcast_as((n, c, xh, 2, xw, 2))?
            .reshape((n, c, h, w))
    } else {
        x.upsample_nearest2d(h, w)
    }
}

/// Exact 2× nearest upsampling of a contiguous f32 CPU `(n, c, h, w)` tensor, planes in
/// parallel. Its backward sums each 2×2 block of the output gradient in one parallel pass;
/// through broadcast and reshape, Candle summed them with a single-threaded strided
/// reduction (≈ 40 ms of every R50 training step at 512², while the other core idled).
struct Upsample2x;

impl CustomOp1 for Upsample2x {
    fn name(&self) -> &'static str {
        "upsample-nearest-2x"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let x = crate::kernels::f32_slice(s, l)?;
        let mut out = vec![0f32; n * c * 4 * h * w];
        out.par_chunks_mut(4 * h * w)
            .zip(x.par_chunks(h * w))
            .for_each(|(dst, src)| {
                for (pair, row) in dst.chunks_exact_mut(4 * w).zip(src.chunks_exact(w)) {
                    let (top, bottom) = pair.split_at_mut(2 * w);
                    for (d, &v) in top.chunks_exact_mut(2).zip(row) {
                        d.fill(v);
                    }
                    bottom.copy_from_slice(top);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((n, c, 2 * h, 2 * w))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (n, c, h, w) = arg.dims4()?;
        let grad = grad.contiguous()?;
        let sums = crate::kernels::host_f32(&grad, |g| {
            let mut out = vec![0f32; n * c * h * w];
            out.par_chunks_mut(h * w)
                .zip(g.par_chunks(4 * h * w))
                .for_each(|(dst, src)| {
                    for (row, pair) in dst.chunks_exact_mut(w).zip(src.chunks_exact(4 * w)) {
                        let (top, bottom) = pair.split_at(2 * w);
                        let blocks = top.chunks_exact(2).zip(bottom.chunks_exact(2));
                        for (d, (t, b)) in row.iter_mut().zip(blocks) {
                            *d = (t[0] + t[1]) + (b[0] + b[1]);
                        }
                    }
                });
            out
        });
        match sums {
            Some(sums) => Ok(Some(Tensor::from_vec(sums, (n, c, h, w), arg.device())?)),
            None => candle_core::bail!("upsample backward: expected an f32 CPU gradient"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::upsample_nearest;
    use candle_core::{DType, Device, Tensor, Var};

    #[test]
    fn upsample_2x_matches_candle_and_accumulates_gradients() {
        let x = Var::from_tensor(
            &Tensor::arange(0f32, 12.0, &Device::Cpu)
                .unwrap()
                .reshape((1, 2, 2, 3))
                .unwrap(),
        )
        .unwrap();
        let ours = upsample_nearest(x.as_tensor(), 4, 6).unwrap();
        let theirs = x.as_tensor().upsample_nearest2d(4, 6).unwrap();
        let diff = (&ours - &theirs).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        // x is used twice: the gradient must be 1 (direct) + 4 (four copies) per element.
        let loss = (ours.sum_all().unwrap() + x.as_tensor().sum_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        assert!(g.to_vec1::<f32>().unwrap().iter().all(|&v| v == 5.0));
    }

    /// The f32 CPU op against the reshape-and-broadcast path (taken for f64): the values,
    /// and the gradient of a weighted sum, where each 2×2 block has different weights.
    #[test]
    fn upsample_2x_op_matches_broadcast_path() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (2, 3, 5, 7), &dev).unwrap();
        let m = Tensor::randn(0f32, 1.0, (2, 3, 10, 14), &dev).unwrap();
        let x64 = Var::from_tensor(&x.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let m64 = m.to_dtype(DType::F64).unwrap();
        let ours = upsample_nearest(x.as_tensor(), 10, 14).unwrap();
        let theirs = upsample_nearest(x64.as_tensor(), 10, 14).unwrap();
        let diff = (ours.to_dtype(DType::F64).unwrap() - &theirs).unwrap();
        assert_eq!(
            diff.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap(),
            0.0
        );
        let g = (ours * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let g64 = (theirs * &m64)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g = g.get(x.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
        let g64 = g64.get(x64.as_tensor()).unwrap();
        let err = (g - g64).unwrap().abs().unwrap().max_all().unwrap();
        assert!(err.to_scalar::<f64>().unwrap() < 1e-5);
    }
}
