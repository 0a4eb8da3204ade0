//! SGD with momentum and weight decay (as `torch.optim.SGD`) and gradient-norm clipping (as
//! `torch.nn.utils.clip_grad_norm_`). Candle's own `SGD` has neither momentum nor weight
//! decay. The learning rate per step comes from [`super::schedule`].

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
    let cpu_f32 = |t: &Tensor| crate::kernels::native(t.device()) && t.dtype() == DType::F32;
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
    let pass = |pass| SgdPass { c: coeffs, pass };
    buf.inplace_op3(&g, w, &pass(Pass::Momentum { first }))?;
    w.inplace_op3(&g, buf, &pass(Pass::Weights))?;
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

/// One of the two parallel in-place passes of an SGD step with momentum.
#[derive(Clone, Copy)]
enum Pass {
    /// buf ← buf·momentum + d·(1 − dampening) (buf ← d on the first step).
    Momentum { first: bool },
    /// w ← w − lr·(nesterov ? d + buf·momentum : buf).
    Weights,
}

/// A [`Pass`] with its coefficients, as an in-place op on (updated, gradient, other): the
/// buffer with the weights as other, or the weights with the buffer.
struct SgdPass {
    c: SgdCoeffs,
    pass: Pass,
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

impl candle_core::InplaceOp3 for SgdPass {
    fn name(&self) -> &'static str {
        match self.pass {
            Pass::Momentum { .. } => "sgd-momentum",
            Pass::Weights => "sgd-weights",
        }
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
        let (updated, g, other) = (host_mut(s1, l1)?, f32_slice(s2, l2)?, f32_slice(s3, l3)?);
        let c = self.c;
        let elements = updated
            .par_iter_mut()
            .zip(g.par_iter().zip(other.par_iter()));
        match self.pass {
            Pass::Momentum { first } => elements.for_each(|(b, (&g, &w))| {
                let d = c.decayed(g, w);
                *b = if first {
                    d
                } else {
                    *b * c.momentum + d * (1.0 - c.dampening)
                };
            }),
            Pass::Weights => elements.for_each(|(w, (&g, &b))| {
                let d = if c.nesterov {
                    c.decayed(g, *w) + b * c.momentum
                } else {
                    b
                };
                *w -= d * c.lr;
            }),
        }
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
