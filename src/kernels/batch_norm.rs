//! The fused training batch norm op: per-channel statistics, normalisation, residual and ReLU
//! in one pass, with a hand-written backward that keeps only the output.

use std::sync::{Arc, OnceLock};

use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

use super::host::{host, slice};

#[derive(Debug)]
pub(crate) struct ChannelStats {
    pub(crate) mean: Vec<f64>,
    pub(crate) var: Vec<f64>,
}

impl ChannelStats {
    fn inv_std(&self, eps: f64) -> Vec<f64> {
        self.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect()
    }
}

pub(crate) struct BatchNormOp {
    pub(crate) eps: f64,
    pub(crate) relu: bool,
    /// Written by the forward, read by the backward and by [`batch_norm_op`].
    pub(crate) stats: Arc<OnceLock<ChannelStats>>,
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
