//! SGD with momentum and weight decay (as `torch.optim.SGD`), gradient-norm clipping (as
//! `torch.nn.utils.clip_grad_norm_`) and the learning-rate schedule: linear warm-up, then
//! ×0.1 decays at given steps. Candle's own `SGD` has neither momentum nor weight decay.

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::kernels::f32_slice;
use crate::{Error, Result};

/// SGD hyper-parameters other than the learning rate (which the schedule gives per step).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SgdConfig {
    /// Momentum factor (0 disables).
    pub momentum: f64,
    /// L2 penalty added to the gradient: `g + weight_decay · w`.
    pub weight_decay: f64,
    /// Dampening of the momentum's gradient term.
    pub dampening: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl Default for SgdConfig {
    /// The paper's: momentum 0.9, weight decay 1e-4.
    fn default() -> Self {
        Self {
            momentum: 0.9,
            weight_decay: 1e-4,
            dampening: 0.0,
            nesterov: false,
        }
    }
}

/// Stochastic gradient descent over named variables, step for step as `torch.optim.SGD`:
/// `d = g + λw; b = μb + (1 − τ)d` (`b = d` on a variable's first step); `w ← w − lr·b`
/// (Nesterov: `w ← w − lr·(d + μb)`). Variables without a gradient are left alone.
#[derive(Debug)]
pub struct Sgd {
    config: SgdConfig,
    vars: Vec<(String, Var)>,
    buffers: BTreeMap<String, Tensor>,
}

impl Sgd {
    /// An optimiser over `vars` (name, variable).
    pub fn new(vars: Vec<(String, Var)>, config: SgdConfig) -> Self {
        Self {
            config,
            vars,
            buffers: BTreeMap::new(),
        }
    }

    /// The settings.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// The variables it updates.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Momentum buffers by variable name (only variables that have taken a step).
    pub fn buffers(&self) -> &BTreeMap<String, Tensor> {
        &self.buffers
    }

    /// Restores momentum buffers (from a checkpoint); each must name a variable of the same
    /// shape.
    pub fn set_buffers(&mut self, buffers: BTreeMap<String, Tensor>) -> Result<()> {
        for (name, b) in &buffers {
            let var = self
                .vars
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v)
                .ok_or_else(|| {
                    Error::Invalid(format!("momentum buffer `{name}` names no trained tensor"))
                })?;
            if var.dims() != b.dims() {
                return Err(Error::Invalid(format!(
                    "momentum buffer `{name}` has shape {:?}, the tensor {:?}",
                    b.dims(),
                    var.dims()
                )));
            }
        }
        self.buffers = buffers
            .into_iter()
            .map(|(n, b)| {
                let b = b.to_device(self.vars[0].1.device())?;
                Ok((n, b.to_dtype(self.vars[0].1.dtype())?))
            })
            .collect::<Result<_>>()?;
        Ok(())
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        let c = self.config;
        for (name, var) in &self.vars {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            if step_in_place(&mut self.buffers, self.config, (name, var), g, lr)? {
                continue;
            }
            // Detached: the update must not record a graph (each buffer would otherwise hold
            // every earlier step's).
            let w = var.as_tensor().detach();
            let g = g.detach();
            let mut d = if c.weight_decay != 0.0 {
                (g + (&w * c.weight_decay)?)?
            } else {
                g
            };
            if c.momentum != 0.0 {
                let buf = match self.buffers.get(name) {
                    None => d.copy()?,
                    Some(b) => ((b * c.momentum)? + (&d * (1.0 - c.dampening))?)?,
                };
                d = if c.nesterov {
                    (d + (&buf * c.momentum)?)?
                } else {
                    buf.clone()
                };
                self.buffers.insert(name.clone(), buf);
            }
            var.set(&(w - (d * lr)?)?)?;
        }
        Ok(())
    }
}

/// The update of an f32 CPU variable with momentum as two parallel in-place passes (the
/// buffer, then the weights) with the same float32 arithmetic, in the same order, as the
/// tensor ops of [`Sgd::step`]. Returns false where it does not apply.
fn step_in_place(
    buffers: &mut BTreeMap<String, Tensor>,
    c: SgdConfig,
    (name, var): (&str, &Var),
    g: &Tensor,
    lr: f64,
) -> Result<bool> {
    let w = var.as_tensor();
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if c.momentum == 0.0 || !cpu_f32(w) || !cpu_f32(g) || !w.is_contiguous() {
        return Ok(false);
    }
    if let Some(b) = buffers.get(name) {
        if !cpu_f32(b) || !b.is_contiguous() {
            return Ok(false);
        }
    }
    let g = g.contiguous()?;
    let first = !buffers.contains_key(name);
    if first {
        buffers.insert(name.to_string(), w.zeros_like()?);
    }
    let buf = &buffers[name];
    let coeffs = SgdCoeffs {
        weight_decay: c.weight_decay as f32,
        momentum: c.momentum as f32,
        dampening: c.dampening as f32,
        lr: lr as f32,
        nesterov: c.nesterov,
    };
    buf.inplace_op3(&g, w, &MomentumPass { c: coeffs, first })?;
    w.inplace_op3(&g, buf, &WeightPass { c: coeffs })?;
    Ok(true)
}

#[derive(Clone, Copy)]
struct SgdCoeffs {
    weight_decay: f32,
    momentum: f32,
    dampening: f32,
    lr: f32,
    nesterov: bool,
}

impl SgdCoeffs {
    /// d = g + w·weight_decay.
    #[inline]
    fn decayed(&self, g: f32, w: f32) -> f32 {
        if self.weight_decay != 0.0 {
            g + w * self.weight_decay
        } else {
            g
        }
    }
}

/// buf ← buf·momentum + d·(1 − dampening) (buf ← d on the first step).
struct MomentumPass {
    c: SgdCoeffs,
    first: bool,
}

/// w ← w − lr·(nesterov ? d + buf·momentum : buf).
struct WeightPass {
    c: SgdCoeffs,
}

/// The values of a contiguous f32 CPU storage, to update in place.
fn host_mut<'a>(
    s: &'a mut candle_core::CpuStorage,
    l: &candle_core::Layout,
) -> candle_core::Result<&'a mut [f32]> {
    match s {
        candle_core::CpuStorage::F32(v) if l.is_contiguous() => {
            Ok(&mut v[l.start_offset()..][..l.shape().elem_count()])
        }
        _ => candle_core::bail!("sgd: expected a contiguous f32 CPU tensor"),
    }
}

impl candle_core::InplaceOp3 for MomentumPass {
    fn name(&self) -> &'static str {
        "sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (buf, g, w) = (host_mut(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let c = self.c;
        buf.par_iter_mut()
            .zip(g.par_iter().zip(w.par_iter()))
            .for_each(|(b, (&g, &w))| {
                let d = c.decayed(g, w);
                *b = if self.first {
                    d
                } else {
                    *b * c.momentum + d * (1.0 - c.dampening)
                };
            });
        Ok(())
    }
}

impl candle_core::InplaceOp3 for WeightPass {
    fn name(&self) -> &'static str {
        "sgd-weights"
    }

    fn cpu_fwd(
        &self,
        s1: &mut candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (w, g, buf) = (host_mut(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let c = self.c;
        w.par_iter_mut()
            .zip(g.par_iter().zip(buf.par_iter()))
            .for_each(|(w, (&g, &b))| {
                let d = if c.nesterov {
                    c.decayed(g, *w) + b * c.momentum
                } else {
                    b
                };
                *w -= d * c.lr;
            });
        Ok(())
    }
}

/// Scales the gradients of `vars` so that their joint L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` (factor `max_norm / (norm + 1e-6)`, capped at 1).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[(String, Var)], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f32>()? as f64;
        }
    }
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for (_, v) in vars {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * coef)?);
            }
        }
    }
    Ok(norm)
}

/// Learning rate per step: linear warm-up from `warmup_factor · base_lr` to `base_lr` over
/// `warmup_steps`, then multiplied by `gamma` at each milestone passed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    /// Learning rate after warm-up.
    pub base_lr: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: usize,
    /// Starting fraction of `base_lr`.
    pub warmup_factor: f64,
    /// Steps at which the rate is multiplied by `gamma`.
    pub milestones: Vec<usize>,
    /// Decay factor.
    pub gamma: f64,
    /// Length of the run.
    pub total_steps: usize,
}

/// Images per step in the paper's schedule.
pub const PAPER_BATCH: usize = 16;
/// Steps of the paper's schedule.
pub const PAPER_STEPS: usize = 90_000;

impl LrSchedule {
    /// The paper's: 0.01 at batch 16 for 90k steps, ×0.1 at 60k and 80k, with Detectron's
    /// warm-up of 500 steps from a third of the rate.
    pub fn paper() -> Self {
        Self {
            base_lr: 0.01,
            warmup_steps: 500,
            warmup_factor: 1.0 / 3.0,
            milestones: vec![60_000, 80_000],
            gamma: 0.1,
            total_steps: PAPER_STEPS,
        }
    }

    /// A constant rate (no warm-up, no decay) for `total_steps`.
    pub fn constant(lr: f64, total_steps: usize) -> Self {
        Self {
            base_lr: lr,
            warmup_steps: 0,
            warmup_factor: 1.0,
            milestones: Vec::new(),
            gamma: 1.0,
            total_steps,
        }
    }

    /// The paper's schedule scaled to `epochs` passes over `num_images` at `batch_size`: the
    /// rate scales linearly with the batch (0.01 at 16), warm-up covers the same number of
    /// images (8000, at most a fifth of the run), and the decays fall at the same fractions
    /// of the run (2/3 and 8/9). The paper's 90k steps at 16 are ≈ 12 epochs of COCO train2017.
    pub fn scaled(num_images: usize, batch_size: usize, epochs: f64) -> Result<Self> {
        if num_images == 0 || batch_size == 0 || epochs.is_nan() || epochs <= 0.0 {
            return Err(Error::Invalid(format!(
                "cannot scale a schedule to {num_images} images, batch {batch_size}, {epochs} epochs"
            )));
        }
        let steps_per_epoch = num_images.div_ceil(batch_size);
        let total = ((steps_per_epoch as f64 * epochs).ceil() as usize).max(1);
        let paper = Self::paper();
        let at = |m: usize| (total as f64 * m as f64 / PAPER_STEPS as f64).round() as usize;
        let warmup = (paper.warmup_steps * PAPER_BATCH).div_ceil(batch_size);
        Ok(Self {
            base_lr: paper.base_lr * batch_size as f64 / PAPER_BATCH as f64,
            warmup_steps: warmup.min(total / 5),
            milestones: paper.milestones.iter().map(|&m| at(m)).collect(),
            total_steps: total,
            ..paper
        })
    }

    /// The rate at `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        let warm = if step < self.warmup_steps {
            let t = step as f64 / self.warmup_steps as f64;
            self.warmup_factor * (1.0 - t) + t
        } else {
            1.0
        };
        let decays = self.milestones.iter().filter(|&&m| step >= m).count();
        self.base_lr * warm * self.gamma.powi(decays as i32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paper_schedule_warms_up_and_decays() {
        let s = LrSchedule::paper();
        assert!((s.lr(0) - 0.01 / 3.0).abs() < 1e-12);
        assert!((s.lr(250) - 0.01 * (1.0 / 3.0 * 0.5 + 0.5)).abs() < 1e-12);
        assert_eq!(s.lr(500), 0.01);
        assert_eq!(s.lr(59_999), 0.01);
        assert!((s.lr(60_000) - 0.001).abs() < 1e-12);
        assert!((s.lr(89_999) - 0.0001).abs() < 1e-12);
    }

    #[test]
    fn scaled_schedule_keeps_the_paper_fractions() {
        // COCO-sized: 118 287 images at 16 for 90k steps ≈ 12.17 epochs.
        let s = LrSchedule::scaled(118_287, 16, 90_000.0 * 16.0 / 118_287.0).unwrap();
        assert!((s.total_steps as i64 - 90_000).abs() <= 1, "{s:?}");
        assert_eq!(s.base_lr, 0.01);
        assert_eq!(s.warmup_steps, 500);
        // 1000 images at batch 4 for 20 epochs: 5000 steps.
        let s = LrSchedule::scaled(1000, 4, 20.0).unwrap();
        assert_eq!(s.total_steps, 5000);
        assert_eq!(s.milestones, vec![3333, 4444]);
        assert_eq!(s.base_lr, 0.0025);
        assert_eq!(s.warmup_steps, 1000);
        assert!(LrSchedule::scaled(0, 4, 1.0).is_err());
    }
}
