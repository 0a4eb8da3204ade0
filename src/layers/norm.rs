//! The pieces a backbone needs to train from scratch, as torchvision's `nn.BatchNorm2d` in
//! training mode and `nn.MaxPool2d(3, 2, 1)` with its backward.
//!
//! - [`BatchNorm2dTrain`]: batch norm whose forward in training normalises with the batch's
//!   statistics over (N, H, W) (biased variance), with a learned scale and shift, and whose
//!   running statistics move towards the batch's (momentum 0.1, unbiased variance) once per
//!   training step; outside training it normalises with the running statistics, as a frozen
//!   batch norm.
//! - [`batch_norm_train`]: that normalisation with the residual sum and the ReLU of a ResNet
//!   block fused in, as one op whose hand-written backward keeps a single saved tensor.
//! - [`max_pool_3x3_s2_p1_train`]: the stem's max pool with a backward that routes each output
//!   gradient to its window's maximum (the first in row-major order among ties, the last NaN
//!   if any, as PyTorch).
//!
//! The ops run on f32 and f64 CPU tensors; other devices run Candle's ops (batch norm) or a
//! round trip through the host (max pool).

use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, Var,
    WithDType,
};
use candle_nn::VarBuilder;
use rayon::prelude::*;

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
    let fast = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    if fast {
        batch_norm_op(x, weight, bias, eps, residual, relu)
    } else {
        batch_norm_candle(x, weight, bias, eps, residual, relu)
    }
}

/// The fused op on the CPU.
fn batch_norm_op(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    let (n, _, h, w) = x.dims4()?;
    let x = x.contiguous()?;
    // Weight and bias travel as one `(2, C)` argument; Candle's stack routes its gradient back.
    let wb = Tensor::stack(&[weight, bias], 0)?.to_dtype(x.dtype())?;
    let stats = Arc::new(OnceLock::new());
    let op = BatchNormOp {
        eps,
        relu,
        stats: stats.clone(),
    };
    let y = match residual {
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
fn batch_norm_candle(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    residual: Option<&Tensor>,
    relu: bool,
) -> Result<(Tensor, BatchStats)> {
    let (n, c, h, w) = x.dims4()?;
    let mean = x.mean_keepdim((0, 2, 3))?;
    let centred = x.broadcast_sub(&mean)?;
    let var = centred.sqr()?.mean_keepdim((0, 2, 3))?;
    let scale = (&var + eps)?
        .sqrt()?
        .recip()?
        .broadcast_mul(&weight.reshape((1, c, 1, 1))?)?;
    let mut y = centred
        .broadcast_mul(&scale)?
        .broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
    if let Some(r) = residual {
        y = (y + r)?;
    }
    if relu {
        y = y.relu()?;
    }
    let stats = BatchStats {
        mean: mean.flatten_all()?.detach(),
        var: var.flatten_all()?.detach(),
        count: n * h * w,
    };
    Ok((y, stats))
}

/// Per-channel mean and biased variance, computed in f64.
#[derive(Debug)]
struct ChannelStats {
    mean: Vec<f64>,
    var: Vec<f64>,
}

impl ChannelStats {
    fn inv_std(&self, eps: f64) -> Vec<f64> {
        self.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
    }
}

struct BatchNormOp {
    eps: f64,
    relu: bool,
    /// Written by the forward, read by the backward and by [`batch_norm_op`].
    stats: Arc<OnceLock<ChannelStats>>,
}

/// The values of an f32 or f64 contiguous CPU argument.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    if !l.is_contiguous() {
        candle_core::bail!("batch norm: expected a contiguous tensor");
    }
    Ok(&s.as_slice::<T>()?[l.start_offset()..][..l.shape().elem_count()])
}

/// The values of a CPU tensor as a vector of `T`.
fn host<T: WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_dtype(T::DTYPE)?.to_vec1::<T>()
}

impl BatchNormOp {
    fn forward<T: WithDType>(
        &self,
        x: &[T],
        dims: (usize, usize, usize),
        wb: &[T],
        residual: Option<&[T]>,
    ) -> Result<Vec<T>> {
        let (n, c, hw) = dims;
        let count = (n * hw) as f64;
        // Two passes per channel in f64: the mean, then the squared deviations.
        let planes = |ch: usize| (0..n).map(move |i| &x[(i * c + ch) * hw..][..hw]);
        let (mean, var): (Vec<f64>, Vec<f64>) = (0..c)
            .into_par_iter()
            .map(|ch| {
                let sum: f64 = planes(ch).flatten().map(|v| v.to_f64()).sum();
                let mean = sum / count;
                let sq: f64 = planes(ch)
                    .flatten()
                    .map(|v| (v.to_f64() - mean).powi(2))
                    .sum();
                (mean, sq / count)
            })
            .unzip();
        let stats = ChannelStats { mean, var };
        // As PyTorch: y = x·α + β with α = w/√(var + eps), β = b − mean·α.
        let inv_std = stats.inv_std(self.eps);
        let alpha: Vec<T> = (0..c)
            .map(|ch| T::from_f64(wb[ch].to_f64() * inv_std[ch]))
            .collect();
        let beta: Vec<T> = (0..c)
            .map(|ch| {
                let a = wb[ch].to_f64() * inv_std[ch];
                T::from_f64(wb[c + ch].to_f64() - stats.mean[ch] * a)
            })
            .collect();
        let zero = T::from_f64(0.0);
        let mut out = vec![zero; x.len()];
        out.par_chunks_mut(hw).enumerate().for_each(|(p, o)| {
            let ch = p % c;
            let (a, b) = (alpha[ch], beta[ch]);
            let xs = &x[p * hw..][..hw];
            for (j, (o, &v)) in o.iter_mut().zip(xs).enumerate() {
                let mut y = v * a + b;
                if let Some(r) = residual {
                    y += r[p * hw + j];
                }
                *o = if self.relu && y < zero { zero } else { y };
            }
        });
        let _ = self.stats.set(stats);
        Ok(out)
    }

    fn cpu_forward(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        wbs: &CpuStorage,
        wbl: &Layout,
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = xl.shape().dims4()?;
        if wbl.shape().dims() != [2, c] {
            candle_core::bail!("batch norm: weight and bias {:?}", wbl.shape());
        }
        let dims = (n, c, h * w);
        let out = match xs {
            CpuStorage::F32(_) => {
                let r = residual.map(|(s, l)| slice::<f32>(s, l)).transpose()?;
                let y = self.forward(slice(xs, xl)?, dims, slice(wbs, wbl)?, r)?;
                CpuStorage::F32(y)
            }
            CpuStorage::F64(_) => {
                let r = residual.map(|(s, l)| slice::<f64>(s, l)).transpose()?;
                let y = self.forward(slice(xs, xl)?, dims, slice(wbs, wbl)?, r)?;
                CpuStorage::F64(y)
            }
            _ => candle_core::bail!("batch norm op: f32 or f64 only"),
        };
        Ok((out, xl.shape().clone()))
    }

    /// Gradients of `x`, of the stacked weight and bias, and of the residual: with `g` the
    /// output gradient masked by the ReLU, `dx = w/σ · (g − mean(g) − x̂ · mean(g·x̂))`,
    /// `dw = Σ g·x̂`, `db = Σ g`, `dresidual = g`.
    fn backward<T: WithDType>(
        &self,
        x: &Tensor,
        wb: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<[Tensor; 3]> {
        let Some(stats) = self.stats.get() else {
            candle_core::bail!("batch norm backward before its forward");
        };
        let (n, c, h, w) = x.dims4()?;
        let hw = h * w;
        let count = (n * hw) as f64;
        let xv = host::<T>(x)?;
        let wbv = host::<T>(wb)?;
        let mut g = host::<T>(grad)?;
        let zero = T::from_f64(0.0);
        if self.relu {
            let r = host::<T>(res)?;
            g.par_iter_mut().zip(r.par_iter()).for_each(|(g, &r)| {
                if r <= zero {
                    *g = zero
                }
            });
        }
        // Per channel: Σg and Σg·(x − mean), in f64.
        let (sum_g, sum_gx): (Vec<f64>, Vec<f64>) = (0..c)
            .into_par_iter()
            .map(|ch| {
                let mean = stats.mean[ch];
                (0..n).fold((0.0, 0.0), |(sg, sgx), i| {
                    let at = (i * c + ch) * hw;
                    let (gs, xs) = (&g[at..][..hw], &xv[at..][..hw]);
                    let a: f64 = gs.iter().map(|v| v.to_f64()).sum();
                    let b: f64 = gs
                        .iter()
                        .zip(xs)
                        .map(|(g, x)| g.to_f64() * (x.to_f64() - mean))
                        .sum();
                    (sg + a, sgx + b)
                })
            })
            .unzip();
        let inv_std = stats.inv_std(self.eps);
        let mut gx = vec![zero; xv.len()];
        gx.par_chunks_mut(hw).enumerate().for_each(|(p, o)| {
            let ch = p % c;
            let (mean, is) = (stats.mean[ch], inv_std[ch]);
            let k = sum_gx[ch] * is * is / count;
            let gm = sum_g[ch] / count;
            let scale = is * wbv[ch].to_f64();
            let (gs, xs) = (&g[p * hw..][..hw], &xv[p * hw..][..hw]);
            for ((o, gv), xv) in o.iter_mut().zip(gs).zip(xs) {
                let d = (xv.to_f64() - mean) * k;
                *o = T::from_f64((gv.to_f64() - gm - d) * scale);
            }
        });
        let gwb: Vec<T> = (0..c)
            .map(|ch| T::from_f64(sum_gx[ch] * inv_std[ch]))
            .chain(sum_g.iter().map(|&v| T::from_f64(v)))
            .collect();
        let dev = x.device();
        Ok([
            Tensor::from_vec(gx, (n, c, h, w), dev)?,
            Tensor::from_vec(gwb, (2, c), dev)?,
            Tensor::from_vec(g, (n, c, h, w), dev)?,
        ])
    }

    fn grads(&self, x: &Tensor, wb: &Tensor, res: &Tensor, grad: &Tensor) -> Result<[Tensor; 3]> {
        match x.dtype() {
            DType::F32 => self.backward::<f32>(x, wb, res, grad),
            DType::F64 => self.backward::<f64>(x, wb, res, grad),
            dt => candle_core::bail!("batch norm op: {dt:?} is not supported"),
        }
    }
}

/// The gradient of `t` if it is tracked.
fn tracked(t: &Tensor, g: Tensor) -> Option<Tensor> {
    t.track_op().then_some(g)
}

impl CustomOp2 for BatchNormOp {
    fn name(&self) -> &'static str {
        "batch-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        wbs: &CpuStorage,
        wbl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_forward(xs, xl, wbs, wbl, None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [gx, gwb, _] = self.grads(x, wb, res, grad)?;
        Ok((tracked(x, gx), tracked(wb, gwb)))
    }
}

impl CustomOp3 for BatchNormOp {
    fn name(&self) -> &'static str {
        "batch-norm-train-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        wbs: &CpuStorage,
        wbl: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if rl.shape() != xl.shape() {
            candle_core::bail!("batch norm: residual {:?} for {:?}", rl.shape(), xl.shape());
        }
        self.cpu_forward(xs, xl, wbs, wbl, Some((rs, rl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        wb: &Tensor,
        r: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [gx, gwb, gr] = self.grads(x, wb, res, grad)?;
        Ok((tracked(x, gx), tracked(wb, gwb), tracked(r, gr)))
    }
}

/// `MaxPool2d(3, stride 2, padding 1)` that back-propagates: each output's gradient goes to
/// the input position that gave its maximum (PyTorch's choice among ties and NaNs), summed
/// where windows overlap. For `(N, C, H, W)` f32 or f64 tensors; CPU tensors run directly,
/// others go through the host.
pub fn max_pool_3x3_s2_p1_train(x: &Tensor) -> Result<Tensor> {
    x.dims4()?;
    if !matches!(x.dtype(), DType::F32 | DType::F64) {
        candle_core::bail!(
            "max pool with backward: f32 or f64 only, got {:?}",
            x.dtype()
        );
    }
    if x.device().is_cpu() {
        x.contiguous()?.apply_op1(MaxPoolTrain)
    } else {
        let dev = x.device().clone();
        x.to_device(&Device::Cpu)?
            .contiguous()?
            .apply_op1(MaxPoolTrain)?
            .to_device(&dev)
    }
}

/// The output size of the pool along an axis of `n` values.
fn pooled(n: usize) -> usize {
    n.div_ceil(2)
}

/// The flat index (within a plane `h × w`) of each output's maximum, as PyTorch's CPU kernel:
/// scan the window clipped to the plane in row-major order, keep a value if it is greater
/// than the best so far or NaN; start from the window's first position.
fn argmax_plane<T: WithDType>(plane: &[T], h: usize, w: usize, out: &mut [u32]) {
    let wo = pooled(w);
    for (o, idx) in out.iter_mut().enumerate() {
        let (y, x) = (o / wo, o % wo);
        let ys = (2 * y).saturating_sub(1)..(2 * y + 2).min(h);
        let xs = (2 * x).saturating_sub(1)..(2 * x + 2).min(w);
        let mut best = ys.start * w + xs.start;
        let mut max = f64::NEG_INFINITY;
        for yy in ys {
            for xx in xs.clone() {
                let v = plane[yy * w + xx].to_f64();
                if v > max || v.is_nan() {
                    max = v;
                    best = yy * w + xx;
                }
            }
        }
        *idx = best as u32;
    }
}

struct MaxPoolTrain;

impl MaxPoolTrain {
    fn forward<T: WithDType>(x: &[T], dims: (usize, usize, usize, usize)) -> Vec<T> {
        let (n, c, h, w) = dims;
        let plane_out = pooled(h) * pooled(w);
        let mut out = vec![T::from_f64(0.0); n * c * plane_out];
        out.par_chunks_mut(plane_out)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, plane)| {
                let mut idx = vec![0u32; plane_out];
                argmax_plane(plane, h, w, &mut idx);
                for (o, &i) in o.iter_mut().zip(&idx) {
                    *o = plane[i as usize];
                }
            });
        out
    }

    fn backward<T: WithDType>(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let plane_out = pooled(h) * pooled(w);
        let xv = host::<T>(x)?;
        let g = host::<T>(grad)?;
        if g.len() != n * c * plane_out {
            candle_core::bail!(
                "max pool backward: gradient {:?} for input {:?}",
                grad.dims(),
                x.dims()
            );
        }
        let mut gx = vec![T::from_f64(0.0); xv.len()];
        gx.par_chunks_mut(h * w)
            .zip(xv.par_chunks(h * w))
            .zip(g.par_chunks(plane_out))
            .for_each(|((d, plane), g)| {
                let mut idx = vec![0u32; plane_out];
                argmax_plane(plane, h, w, &mut idx);
                for (&i, &gv) in idx.iter().zip(g) {
                    d[i as usize] += gv;
                }
            });
        Tensor::from_vec(gx, (n, c, h, w), x.device())
    }
}

impl CustomOp1 for MaxPoolTrain {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2-p1-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, w) = l.shape().dims4()?;
        let dims = (n, c, h, w);
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(Self::forward(slice::<f32>(s, l)?, dims)),
            CpuStorage::F64(_) => CpuStorage::F64(Self::forward(slice::<f64>(s, l)?, dims)),
            _ => candle_core::bail!("max pool with backward: f32 or f64 only"),
        };
        Ok((out, Shape::from((n, c, pooled(h), pooled(w)))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = match arg.dtype() {
            DType::F32 => Self::backward::<f32>(arg, grad)?,
            DType::F64 => Self::backward::<f64>(arg, grad)?,
            dt => candle_core::bail!("max pool with backward: {dt:?} is not supported"),
        };
        Ok(Some(g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// PyTorch's max pool, spelled out: for each output, the window clipped to the plane,
    /// scanned row by row; a value replaces the best if greater or NaN.
    fn brute_pool(x: &[f64], h: usize, w: usize) -> (Vec<f64>, Vec<usize>) {
        let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
        let mut vals = Vec::new();
        let mut idx = Vec::new();
        for oy in 0..ho {
            for ox in 0..wo {
                let mut best: Option<(f64, usize)> = None;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let (y, xx) = ((2 * oy + dy) as i64 - 1, (2 * ox + dx) as i64 - 1);
                        if y < 0 || xx < 0 || y >= h as i64 || xx >= w as i64 {
                            continue;
                        }
                        let i = y as usize * w + xx as usize;
                        let v = x[i];
                        best = match best {
                            None => Some((v, i)),
                            Some((b, _)) if v > b || v.is_nan() => Some((v, i)),
                            keep => keep,
                        };
                    }
                }
                let (v, i) = best.unwrap();
                vals.push(v);
                idx.push(i);
            }
        }
        (vals, idx)
    }

    /// Small integers, so that windows hold ties; some −∞.
    fn tied_values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                match (s >> 33) % 7 {
                    6 => f64::NEG_INFINITY,
                    r => (r % 3) as f64 - 1.0,
                }
            })
            .collect()
    }

    fn pool_case(h: usize, w: usize, dtype: DType, values: Vec<f64>) {
        let dev = Device::Cpu;
        let (n, c) = (2, 3);
        let plane = h * w;
        let x = Var::from_tensor(
            &Tensor::from_vec(values.clone(), (n, c, h, w), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let y = max_pool_3x3_s2_p1_train(x.as_tensor()).unwrap();
        let (ho, wo) = (h.div_ceil(2), w.div_ceil(2));
        assert_eq!(y.dims(), [n, c, ho, wo]);
        let g: Vec<f64> = (0..n * c * ho * wo).map(|i| 1.0 + i as f64).collect();
        let gt = Tensor::from_vec(g.clone(), y.shape(), &dev).unwrap();
        let loss = (y.to_dtype(DType::F64).unwrap() * &gt)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let gx = host::<f64>(grads.get(x.as_tensor()).unwrap()).unwrap();
        let ys = host::<f64>(&y).unwrap();
        for p in 0..n * c {
            let (vals, idx) = brute_pool(&values[p * plane..][..plane], h, w);
            let mut expected = vec![0.0; plane];
            for (o, &i) in idx.iter().enumerate() {
                expected[i] += g[p * ho * wo + o];
            }
            for (o, v) in vals.iter().enumerate() {
                let ours = ys[p * ho * wo + o];
                assert!(
                    ours == *v || ours.is_nan() && v.is_nan(),
                    "{h}x{w} plane {p} out {o}"
                );
            }
            assert_eq!(
                &gx[p * plane..][..plane],
                &expected[..],
                "{h}x{w} plane {p}"
            );
        }
    }

    #[test]
    fn max_pool_backward_matches_brute_force_with_ties_and_borders() {
        for (i, &(h, w)) in [
            (1, 1),
            (1, 4),
            (2, 3),
            (3, 3),
            (5, 4),
            (7, 7),
            (6, 9),
            (10, 5),
        ]
        .iter()
        .enumerate()
        {
            let values = tied_values(6 * h * w, i as u64);
            pool_case(h, w, DType::F64, values.clone());
            pool_case(h, w, DType::F32, values);
        }
        // All equal: every output takes the first position of its clipped window.
        pool_case(4, 4, DType::F64, vec![0.5; 6 * 16]);
        // NaN wins, the last one of a window.
        let mut values = tied_values(6 * 25, 99);
        values[3] = f64::NAN;
        values[7] = f64::NAN;
        values[30] = f64::NAN;
        pool_case(5, 5, DType::F64, values);
    }

    #[test]
    fn max_pool_forward_matches_the_inference_pool() {
        let x = Tensor::randn(0f32, 1.0, (2, 4, 9, 12), &Device::Cpu).unwrap();
        let ours = max_pool_3x3_s2_p1_train(&x).unwrap();
        let fast = crate::kernels::max_pool_3x3_s2_p1(&x).unwrap();
        let d = (ours - fast).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }

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
        let f = if candle {
            batch_norm_candle
        } else {
            batch_norm_train
        };
        let (y, stats) = f(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5, res, relu).unwrap();
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
