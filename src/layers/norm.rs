//! Batch norm, frozen (torchvision's `FrozenBatchNorm2d`, the default with pretrained weights)
//! and in training mode (`nn.BatchNorm2d` under `model.train()`, to train from scratch).
//!
//! - [`FrozenBatchNorm2d`]: `y = x · scale + shift` with constants folded from the
//!   checkpoint's four buffers.
//! - [`BatchNorm2dTrain`]: batch norm whose forward in training normalises with the batch's
//!   statistics over (N, H, W) (biased variance), with a learned scale and shift, and whose
//!   running statistics move towards the batch's (momentum 0.1, unbiased variance) once per
//!   training step; outside training it normalises with the running statistics, as a frozen
//!   batch norm.
//! - [`batch_norm_train`]: that normalisation with the residual sum and the ReLU of a ResNet
//!   block fused in, as one op whose hand-written backward keeps a single saved tensor.
//!
//! The fused op runs on f32 and f64 CPU tensors; other devices and dtypes run Candle's ops.

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::VarBuilder;

use crate::kernels::BatchNormOp;

/// Frozen batch norm: `y = x · scale + shift` with per-channel constants.
#[derive(Debug, Clone)]
pub struct FrozenBatchNorm2d {
    /// Per-channel scale `(1, C, 1, 1)`.
    pub scale: Tensor,
    /// Per-channel shift `(1, C, 1, 1)`.
    pub shift: Tensor,
}

impl FrozenBatchNorm2d {
    /// Folds `weight` with the `bias`, `running_mean` and `running_var` read from `vb` and
    /// `eps`.
    pub fn with_weight(weight: Tensor, eps: f64, vb: VarBuilder) -> Result<Self> {
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

/// A batch norm that is frozen or trained, as the training parameter store serves it.
#[derive(Debug, Clone)]
pub(crate) enum Norm {
    /// Fixed statistics and affine.
    Frozen(FrozenBatchNorm2d),
    /// Trained: batch statistics in training.
    Train(BatchNorm2dTrain),
}

impl Norm {
    /// Reads a frozen norm, or a trained one when its weight is a variable.
    pub(crate) fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(channels, "weight")?;
        Ok(if weight.is_variable() {
            Norm::Train(BatchNorm2dTrain::new(channels, eps, vb)?)
        } else {
            Norm::Frozen(FrozenBatchNorm2d::with_weight(weight, eps, vb)?)
        })
    }

    /// The per-channel `(scale, shift)` of evaluation mode, `(1, C, 1, 1)` each.
    pub(crate) fn scale_shift(&self) -> Result<(Tensor, Tensor)> {
        match self {
            Norm::Frozen(bn) => Ok((bn.scale.clone(), bn.shift.clone())),
            Norm::Train(bn) => bn.scale_shift(),
        }
    }
}

/// Weight of the batch's statistics in each update of the running ones (torchvision's 0.1).
pub const BN_MOMENTUM: f64 = 0.1;

/// Per-channel statistics of a batch.
#[derive(Debug, Clone)]
pub struct BatchStats {
    /// Mean over (N, H, W), `(C,)`.
    pub mean: Tensor,
    /// Biased variance (the one that normalises), `(C,)`.
    pub var: Tensor,
    /// Values per channel, N·H·W.
    pub count: usize,
}

impl BatchStats {
    /// The unbiased variance, `var · count / (count − 1)`, which the running variance tracks.
    pub fn unbiased_var(&self) -> Result<Tensor> {
        if self.count < 2 {
            candle_core::bail!("an unbiased variance needs at least two values per channel");
        }
        self.var
            .affine(self.count as f64 / (self.count - 1) as f64, 0.0)
    }
}

/// Batch norm in training mode (`nn.BatchNorm2d` under `model.train()`).
#[derive(Debug, Clone)]
pub struct BatchNorm2dTrain {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    /// The statistics of the last training forward, until [`BatchNorm2dTrain::update_running_stats`].
    pending: Arc<Mutex<Option<BatchStats>>>,
}

impl BatchNorm2dTrain {
    /// Reads `weight`, `bias`, `running_mean` and `running_var` from `vb`. The running
    /// statistics are updated in place: serve them as variables (as the training parameter
    /// store does) for the updates to reach the store that saves them.
    pub fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if eps.is_nan() || eps <= 0.0 {
            candle_core::bail!(
                "batch norm in training needs eps > 0 (torchvision's BatchNorm2d: 1e-5), got {eps}"
            );
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            running_mean: Var::from_tensor(&vb.get(channels, "running_mean")?)?,
            running_var: Var::from_tensor(&vb.get(channels, "running_var")?)?,
            eps,
            pending: Arc::new(Mutex::new(None)),
        })
    }

    /// The norm folded with its running statistics, `(scale, shift)` of shape `(1, C, 1, 1)`
    /// each, as a frozen batch norm (evaluation mode).
    pub fn scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let c = self.weight.elem_count();
        let (w, b) = (self.weight.detach(), self.bias.detach());
        let var = self.running_var.as_tensor().detach();
        let scale = (w * (var + self.eps)?.sqrt()?.recip()?)?;
        let shift = (b - (self.running_mean.as_tensor().detach() * &scale)?)?;
        Ok((scale.reshape((1, c, 1, 1))?, shift.reshape((1, c, 1, 1))?))
    }

    /// `relu?(bn(x) [+ residual])` with the batch's statistics, differentiable in `x`, the
    /// weight, the bias and the residual. Keeps the statistics for the next
    /// [`BatchNorm2dTrain::update_running_stats`].
    pub fn forward_train(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        let (y, stats) = batch_norm_train(x, &self.weight, &self.bias, self.eps, residual, relu)?;
        if let Ok(mut p) = self.pending.lock() {
            *p = Some(stats);
        }
        Ok(y)
    }

    /// Moves the running statistics towards those of the last training forward
    /// (`r ← (1 − m)·r + m·batch`, m = [`BN_MOMENTUM`], the variance unbiased) and forgets
    /// them. Returns whether there was anything to apply.
    pub fn update_running_stats(&self) -> Result<bool> {
        let Some(stats) = self.pending.lock().ok().and_then(|mut p| p.take()) else {
            return Ok(false);
        };
        let update = |running: &Var, batch: &Tensor| -> Result<()> {
            let r = running.as_tensor().detach();
            let batch = batch.to_dtype(r.dtype())?.to_device(r.device())?;
            running.set(&((r * (1.0 - BN_MOMENTUM))? + (batch * BN_MOMENTUM)?)?)
        };
        update(&self.running_mean, &stats.mean)?;
        update(&self.running_var, &stats.unbiased_var()?)?;
        Ok(true)
    }
}

/// `relu?(weight · (x − mean) / √(var + eps) + bias [+ residual])` with the per-channel mean and
/// biased variance of `x` `(N, C, H, W)` over (N, H, W), and those statistics. Differentiable
/// in every tensor argument; an error when a channel has fewer than two values (as PyTorch).
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    let (n, c, h, w) = x.dims4()?;
    if weight.dims() != [c] || bias.dims() != [c] {
        candle_core::bail!(
            "batch norm of {c} channels with weight {:?} and bias {:?}",
            weight.dims(),
            bias.dims()
        );
    }
    if let Some(r) = residual.filter(|r| r.dims() != x.dims()) {
        candle_core::bail!(
            "batch norm: residual {:?} for input {:?}",
            r.dims(),
            x.dims()
        );
    }
    if n * h * w < 2 {
        candle_core::bail!(
            "batch norm in training needs more than one value per channel, got input {:?}",
            x.dims()
        );
    }
    let bn = TrainNorm {
        weight,
        bias,
        eps,
        residual,
        relu,
    };
    if crate::kernels::native(x.device()) && matches!(x.dtype(), DType::F32 | DType::F64) {
        bn.fused(x)
    } else {
        bn.candle(x)
    }
}

/// The arguments of [`batch_norm_train`] besides its input.
#[derive(Clone, Copy)]
struct TrainNorm<'a> {
    weight: &'a Tensor,
    bias: &'a Tensor,
    eps: f64,
    residual: Option<&'a Tensor>,
    relu: bool,
}

impl TrainNorm<'_> {
    /// The fused op on the CPU.
    fn fused(self, x: &Tensor) -> Result<(Tensor, BatchStats)> {
        let (n, _, h, w) = x.dims4()?;
        let x = x.contiguous()?;
        // Weight and bias travel as one `(2, C)` argument; Candle's stack routes its gradient
        // back.
        let wb = Tensor::stack(&[self.weight, self.bias], 0)?.to_dtype(x.dtype())?;
        let stats = Arc::new(OnceLock::new());
        let op = BatchNormOp {
            eps: self.eps,
            relu: self.relu,
            stats: stats.clone(),
        };
        let y = match self.residual {
            Some(r) => x.apply_op3(&wb, &r.contiguous()?, op)?,
            None => x.apply_op2(&wb, op)?,
        };
        let Some(s) = stats.get() else {
            candle_core::bail!("batch norm: the op recorded no statistics");
        };
        let to_tensor = |v: &[f64]| Tensor::new(v, &Device::Cpu)?.to_dtype(x.dtype());
        let stats = BatchStats {
            mean: to_tensor(&s.mean)?,
            var: to_tensor(&s.var)?,
            count: n * h * w,
        };
        Ok((y, stats))
    }

    /// The same with Candle's ops (other devices and dtypes), differentiable through autograd.
    fn candle(self, x: &Tensor) -> Result<(Tensor, BatchStats)> {
        let (n, c, h, w) = x.dims4()?;
        let mean = x.mean_keepdim((0, 2, 3))?;
        let centred = x.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
        let scale = (&var + self.eps)?
            .sqrt()?
            .recip()?
            .broadcast_mul(&self.weight.reshape((1, c, 1, 1))?)?;
        let mut y = centred
            .broadcast_mul(&scale)?
            .broadcast_add(&self.bias.reshape((1, c, 1, 1))?)?;
        if let Some(r) = self.residual {
            y = (y + r)?;
        }
        if self.relu {
            y = y.relu()?;
        }
        let stats = BatchStats {
            mean: mean.flatten_all()?.detach(),
            var: var.flatten_all()?.detach(),
            count: n * h * w,
        };
        Ok((y, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap();
        d.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// Values and gradients of `batch_norm` on f64 inputs, for a random output gradient.
    fn bn_grads(
        residual: bool,
        relu: bool,
        dtype: DType,
        candle: bool,
    ) -> (Tensor, BatchStats, Vec<Tensor>) {
        let dev = Device::Cpu;
        let seeded = |shape: &[usize], scale: f64, offset: f64, seed: u64| {
            let n: usize = shape.iter().product();
            let mut s = seed;
            let v: Vec<f64> = (0..n)
                .map(|_| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * scale + offset
                })
                .collect();
            Tensor::from_vec(v, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let shape = [3, 5, 4, 6];
        let x = Var::from_tensor(&seeded(&shape, 4.0, 1.5, 1)).unwrap();
        let w = Var::from_tensor(&seeded(&[5], 1.0, 1.0, 2)).unwrap();
        let b = Var::from_tensor(&seeded(&[5], 1.0, 0.0, 3)).unwrap();
        let r = Var::from_tensor(&seeded(&shape, 2.0, 0.0, 4)).unwrap();
        let g = seeded(&shape, 2.0, 0.1, 5);
        let res = residual.then(|| r.as_tensor());
        let (x_, w_, b_) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let (y, stats) = if candle {
            let bn = TrainNorm {
                weight: w_,
                bias: b_,
                eps: 1e-5,
                residual: res,
                relu,
            };
            bn.candle(x_)
        } else {
            batch_norm_train(x_, w_, b_, 1e-5, res, relu)
        }
        .unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![x.as_tensor(), w.as_tensor(), b.as_tensor()];
        if residual {
            out.push(r.as_tensor());
        }
        let out = out.iter().map(|t| grads.get(t).unwrap().clone()).collect();
        (y, stats, out)
    }

    #[test]
    fn batch_norm_op_matches_candle_ops() {
        for (residual, relu) in [(false, false), (false, true), (true, true), (true, false)] {
            let (y0, s0, g0) = bn_grads(residual, relu, DType::F64, true);
            for dtype in [DType::F64, DType::F32] {
                let tol = if dtype == DType::F64 { 1e-12 } else { 2e-5 };
                let (y, s, g) = bn_grads(residual, relu, dtype, false);
                let what = format!("residual {residual}, relu {relu}, {dtype:?}");
                assert!(max_diff(&y, &y0) < tol, "{what}: output");
                assert!(max_diff(&s.mean, &s0.mean) < tol, "{what}: mean");
                assert!(max_diff(&s.var, &s0.var) < tol, "{what}: var");
                assert_eq!(s.count, 3 * 4 * 6);
                for (i, (a, b)) in g.iter().zip(&g0).enumerate() {
                    let e = max_diff(a, b);
                    assert!(e < tol * 10.0, "{what}: gradient of argument {i}: {e}");
                }
            }
        }
    }

    #[test]
    fn running_stats_follow_torch() {
        let dev = Device::Cpu;
        let var = |v: Vec<f64>| Var::new(v, &dev).unwrap();
        let (w, b) = (var(vec![1.0, 2.0]), var(vec![0.0, 0.5]));
        let (rm, rv) = (var(vec![0.0, 1.0]), var(vec![1.0, 2.0]));
        let tensors: HashMap<String, Tensor> = [
            ("weight", &w),
            ("bias", &b),
            ("running_mean", &rm),
            ("running_var", &rv),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_string(), v.as_tensor().clone()))
        .collect();
        let vb = VarBuilder::from_tensors(tensors, DType::F64, &dev);
        let bn = BatchNorm2dTrain::new(2, 1e-5, vb).unwrap();
        assert!(!bn.update_running_stats().unwrap(), "nothing to apply yet");
        // Channel 0: 1..=4, channel 1: 10, 10, 10, 14 (two images of 1×2).
        let x = Tensor::new(
            &[
                [[[1f64, 2.0]], [[10.0, 10.0]]],
                [[[3.0, 4.0]], [[10.0, 14.0]]],
            ],
            &dev,
        )
        .unwrap();
        bn.forward_train(&x, None, false).unwrap();
        assert!(bn.update_running_stats().unwrap());
        assert!(!bn.update_running_stats().unwrap(), "applied once");
        let m: Vec<f64> = rm.as_tensor().to_vec1().unwrap();
        let v: Vec<f64> = rv.as_tensor().to_vec1().unwrap();
        // Means 2.5 and 11; unbiased variances 5/3 and 4.
        let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
        assert!(close(m[0], 0.25) && close(m[1], 0.9 + 1.1), "{m:?}");
        assert!(
            close(v[0], 0.9 + 0.1 * 5.0 / 3.0) && close(v[1], 1.8 + 0.4),
            "{v:?}"
        );
        // Evaluation folds the running statistics.
        let (scale, shift) = bn.scale_shift().unwrap();
        let s: Vec<f64> = scale.flatten_all().unwrap().to_vec1().unwrap();
        let t: Vec<f64> = shift.flatten_all().unwrap().to_vec1().unwrap();
        assert!(close(s[1], 2.0 / (v[1] + 1e-5).sqrt()) && close(t[1], 0.5 - m[1] * s[1]));
    }

    #[test]
    fn batch_norm_needs_two_values_per_channel() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((1, 3, 1, 1), DType::F32, &dev).unwrap();
        let w = Tensor::ones(3, DType::F32, &dev).unwrap();
        let b = Tensor::zeros(3, DType::F32, &dev).unwrap();
        assert!(batch_norm_train(&x, &w, &b, 1e-5, None, true).is_err());
        let x = Tensor::zeros((2, 3, 1, 1), DType::F32, &dev).unwrap();
        let (y, _) = batch_norm_train(&x, &w, &b, 1e-5, None, true).unwrap();
        assert_eq!(y.dims(), [2, 3, 1, 1]);
        assert!(batch_norm_train(&x, &b.narrow(0, 0, 2).unwrap(), &b, 1e-5, None, true).is_err());
    }
}
