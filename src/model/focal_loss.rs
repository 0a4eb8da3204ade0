//! The focal loss (§3, "Focal Loss"; §4.1, "Focal Loss") and the box losses: RetinaNet's
//! training losses, as torchvision computes them.
//!
//! - Classification: sigmoid focal loss (α = 0.25, γ = 2) summed over the foreground and
//!   background anchors of an image (ignored anchors excluded), divided by its number of
//!   foreground anchors (at least 1).
//! - Box regression on foreground anchors, divided the same way: L1 on the encoded deltas
//!   (torchvision v1), smooth L1 (the paper, β = 0.11) or GIoU on the decoded boxes (v2).
//! - Each is averaged over the images of the batch.
//!
//! Everything is built from Candle ops that have a backward pass, so `total().backward()`
//! gives the gradients. Per-image normalisation is folded into per-anchor weights, so a batch
//! is one set of tensor ops.

use candle_core::{DType, Device, Tensor, D};

use crate::model::box_coder::BoxCoder;
use crate::model::matcher::{BACKGROUND, IGNORED};
use crate::{Error, Result};

/// Box regression loss.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum BoxLoss {
    /// L1 on the encoded deltas (torchvision's `retinanet_resnet50_fpn`).
    L1,
    /// Smooth L1 on the encoded deltas: quadratic below `beta`, linear above.
    SmoothL1 {
        /// The switch point (the paper: 0.11).
        beta: f64,
    },
    /// Generalised IoU on the decoded boxes (torchvision's `retinanet_resnet50_fpn_v2`).
    GIoU {
        /// Added to denominators (torchvision: 1e-7).
        eps: f64,
    },
}

impl std::str::FromStr for BoxLoss {
    type Err = Error;

    /// `l1`, `smooth-l1` (the paper's β = 0.11) or `giou` (torchvision's eps = 1e-7).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "l1" => Ok(BoxLoss::L1),
            "smooth-l1" => Ok(BoxLoss::SmoothL1 { beta: 0.11 }),
            "giou" => Ok(BoxLoss::GIoU { eps: 1e-7 }),
            _ => Err(Error::Invalid(format!(
                "unknown box loss `{s}` (expected smooth-l1, l1 or giou)"
            ))),
        }
    }
}

/// Loss settings.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossConfig {
    /// Focal-loss weight of the positive class (`None`: no weighting).
    pub alpha: Option<f64>,
    /// Focal-loss focusing exponent (≥ 1 keeps the gradient finite at p_t = 1).
    pub gamma: f64,
    /// Box loss.
    pub box_loss: BoxLoss,
}

impl LossConfig {
    /// torchvision's v1: focal α = 0.25, γ = 2, L1 box loss.
    pub fn v1() -> Self {
        Self {
            alpha: Some(0.25),
            gamma: 2.0,
            box_loss: BoxLoss::L1,
        }
    }

    /// torchvision's v2: focal α = 0.25, γ = 2, GIoU box loss.
    pub fn v2() -> Self {
        Self {
            box_loss: BoxLoss::GIoU { eps: 1e-7 },
            ..Self::v1()
        }
    }

    /// The paper's: focal α = 0.25, γ = 2, smooth L1 with β = 0.11.
    pub fn paper() -> Self {
        Self::v1().with_box_loss(BoxLoss::SmoothL1 { beta: 0.11 })
    }

    /// These settings with `box_loss` instead.
    pub fn with_box_loss(self, box_loss: BoxLoss) -> Self {
        Self { box_loss, ..self }
    }
}

/// The two losses of a batch (scalars, averaged over images).
#[derive(Debug, Clone)]
pub struct Losses {
    /// Focal classification loss.
    pub classification: Tensor,
    /// Box regression loss.
    pub box_regression: Tensor,
}

impl Losses {
    /// Their sum, the quantity trained.
    pub fn total(&self) -> Result<Tensor> {
        Ok((&self.classification + &self.box_regression)?)
    }
}

/// Elementwise sigmoid focal loss of `logits` against `targets` in [0, 1] (same shape):
/// `α_t · (1 − p_t)^γ · BCE(x, t)`. The cross-entropy is computed as
/// `relu(x) − x·t + ln(1 + e^−|x|)`, finite for any logit (Candle's own BCE takes the log of a
/// sigmoid and overflows for large |x|).
pub fn sigmoid_focal_loss(
    logits: &Tensor,
    targets: &Tensor,
    alpha: Option<f64>,
    gamma: f64,
) -> Result<Tensor> {
    let ce =
        ((logits.relu()? - (logits * targets)?)? + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let p = candle_nn::ops::sigmoid(logits)?;
    // 1 − p_t = p·(1 − t) + (1 − p)·t.
    let one_minus_t = targets.affine(-1.0, 1.0)?;
    let q = ((&p * &one_minus_t)? + (p.affine(-1.0, 1.0)? * targets)?)?;
    let modulating = if gamma == 2.0 {
        q.sqr()?
    } else {
        q.powf(gamma)?
    };
    let loss = (ce * modulating)?;
    Ok(match alpha {
        // α_t = α·t + (1 − α)·(1 − t).
        Some(a) => (loss * targets.affine(2.0 * a - 1.0, 1.0 - a)?)?,
        None => loss,
    })
}

/// `Σ_anchors w_a · Σ_k FL(x_ak, [k = label_a])` over `(N, A, K)` logits in one pass, with
/// its gradient in one more: the same value as [`sigmoid_focal_loss`] against one-hot targets,
/// weighted and summed, without the dozen `(N, A, K)` temporaries (and their gradients) that
/// the elementwise ops create. Sums run in f64. `labels` holds a class per anchor (anything
/// ≥ K for background and ignored anchors), `weights` 0 for ignored ones. f32 CPU tensors
/// only; [`retinanet_losses`] falls back to the elementwise form elsewhere.
pub fn focal_loss_sum(
    logits: &Tensor,
    labels: &[u32],
    weights: &[f32],
    alpha: Option<f64>,
    gamma: f64,
) -> Result<Tensor> {
    let (n, a, k) = logits.dims3()?;
    if labels.len() != n * a || weights.len() != n * a {
        return Err(crate::Error::Invalid(format!(
            "focal loss: {} labels and {} weights for {n}×{a} anchors",
            labels.len(),
            weights.len()
        )));
    }
    let op = FocalSum {
        labels: labels.to_vec(),
        weights: weights.to_vec(),
        k,
        alpha,
        gamma,
        grad: std::sync::OnceLock::new(),
    };
    Ok(logits.contiguous()?.apply_op1(op)?)
}

struct FocalSum {
    labels: Vec<u32>,
    weights: Vec<f32>,
    k: usize,
    alpha: Option<f64>,
    gamma: f64,
    /// ∂loss/∂logits, computed with the loss (they share the exponentials) for `bwd`.
    grad: std::sync::OnceLock<Vec<f32>>,
}

impl FocalSum {
    /// Loss and ∂loss/∂x of one logit `x` with target `t` (0 or 1).
    #[inline]
    fn element(&self, x: f64, t: bool) -> (f64, f64) {
        // With s = ±1 the sign that makes the logit "right": p_t = σ(s·x).
        let s = if t { 1.0 } else { -1.0 };
        let z = s * x;
        // ce = −ln σ(z) = softplus(−z), finite for any z; q = 1 − p_t = σ(−z). One
        // exponential, e^−|z| ≤ 1, serves both.
        // Beyond |z| = 100, e < 4e-44 changes nothing in f32; skipping libm's underflow
        // path there saves its slow special case.
        // (NaN fails the test and propagates.)
        let e = if z.abs() >= 100.0 {
            0.0
        } else {
            (-z.abs()).exp()
        };
        let ce = (-z).max(0.0) + e.ln_1p();
        let q = if z >= 0.0 {
            e / (1.0 + e)
        } else {
            1.0 / (1.0 + e)
        };
        let alpha_t = match self.alpha {
            Some(a) if t => a,
            Some(a) => 1.0 - a,
            None => 1.0,
        };
        let (qg, dqg) = if self.gamma == 2.0 {
            (q * q, 2.0 * q)
        } else {
            (q.powf(self.gamma), self.gamma * q.powf(self.gamma - 1.0))
        };
        // d ce/dz = −q, d q/dz = −q·(1 − q); dz/dx = s.
        let d = alpha_t * (dqg * (-q * (1.0 - q)) * ce + qg * -q) * s;
        (alpha_t * qg * ce, d)
    }
}

impl candle_core::CustomOp1 for FocalSum {
    fn name(&self) -> &'static str {
        "focal-loss-sum"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let candle_core::CpuStorage::F32(v) = storage else {
            candle_core::bail!("the fused focal loss runs on f32 logits");
        };
        let x = &v[layout.start_offset()..][..layout.shape().elem_count()];
        let k = self.k;
        let mut grad = vec![0f32; x.len()];
        let total: f64 = grad
            .par_chunks_mut(k)
            .zip(x.par_chunks(k))
            .zip(self.labels.par_iter().zip(self.weights.par_iter()))
            .map(|((gr, row), (&label, &w))| {
                if w == 0.0 {
                    return 0.0;
                }
                let mut sum = 0f64;
                for (c, (gv, &xv)) in gr.iter_mut().zip(row).enumerate() {
                    let (l, d) = self.element(xv as f64, c as u32 == label);
                    sum += l;
                    *gv = (w as f64 * d) as f32;
                }
                sum * w as f64
            })
            .sum();
        let _ = self.grad.set(grad);
        Ok((candle_core::CpuStorage::F32(vec![total as f32]), ().into()))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        use rayon::prelude::*;
        let scale = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let Some(d) = self.grad.get() else {
            candle_core::bail!("focal loss: backward before forward");
        };
        let g: Vec<f32> = d.par_iter().map(|&v| (scale * v as f64) as f32).collect();
        Ok(Some(Tensor::from_vec(g, arg.shape(), arg.device())?))
    }
}

/// Per-row L1 loss of `(M, 4)` predictions against targets, summed over the 4 columns.
pub fn l1_loss(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    Ok((pred - target)?.abs()?.sum(D::Minus1)?)
}

/// Per-row smooth L1 loss: `0.5·d²/β` where |d| < β, `|d| − 0.5·β` elsewhere, summed over the
/// 4 columns (β = 0 is plain L1).
pub fn smooth_l1_loss(pred: &Tensor, target: &Tensor, beta: f64) -> Result<Tensor> {
    if beta <= 0.0 {
        return l1_loss(pred, target);
    }
    let d = (pred - target)?.abs()?;
    let quadratic = (d.sqr()? * (0.5 / beta))?;
    let linear = d.affine(1.0, -0.5 * beta)?;
    let small = d.lt(beta)?;
    Ok(small.where_cond(&quadratic, &linear)?.sum(D::Minus1)?)
}

/// Decodes `(M, 4)` deltas on `(M, 4)` anchors into boxes, differentiably, as
/// torchvision's `BoxCoder.decode_single` (and [`BoxCoder::decode`]).
pub fn decode_boxes(coder: &BoxCoder, deltas: &Tensor, anchors: &Tensor) -> Result<Tensor> {
    let col = |t: &Tensor, i: usize| t.narrow(1, i, 1);
    let widths = (col(anchors, 2)? - col(anchors, 0)?)?;
    let heights = (col(anchors, 3)? - col(anchors, 1)?)?;
    let ctr_x = (col(anchors, 0)? + (&widths * 0.5)?)?;
    let ctr_y = (col(anchors, 1)? + (&heights * 0.5)?)?;
    let [wx, wy, ww, wh] = coder.weights.map(f64::from);
    let clip = f64::from(coder.clip);
    let dx = (col(deltas, 0)? / wx)?;
    let dy = (col(deltas, 1)? / wy)?;
    let dw = (col(deltas, 2)? / ww)?.minimum(clip)?;
    let dh = (col(deltas, 3)? / wh)?.minimum(clip)?;
    let pred_ctr_x = ((dx * &widths)? + ctr_x)?;
    let pred_ctr_y = ((dy * &heights)? + ctr_y)?;
    let half_w = ((dw.exp()? * widths)? * 0.5)?;
    let half_h = ((dh.exp()? * heights)? * 0.5)?;
    Ok(Tensor::cat(
        &[
            (&pred_ctr_x - &half_w)?,
            (&pred_ctr_y - &half_h)?,
            (&pred_ctr_x + &half_w)?,
            (&pred_ctr_y + &half_h)?,
        ],
        1,
    )?)
}

/// Per-row generalised-IoU loss `1 − GIoU` of `(M, 4)` boxes against `(M, 4)` targets, as
/// torchvision's `generalized_box_iou_loss`.
pub fn giou_loss(boxes: &Tensor, targets: &Tensor, eps: f64) -> Result<Tensor> {
    let col = |t: &Tensor, i: usize| t.narrow(1, i, 1);
    let (x1, y1, x2, y2) = (
        col(boxes, 0)?,
        col(boxes, 1)?,
        col(boxes, 2)?,
        col(boxes, 3)?,
    );
    let (x1g, y1g, x2g, y2g) = (
        col(targets, 0)?,
        col(targets, 1)?,
        col(targets, 2)?,
        col(targets, 3)?,
    );
    // Intersection, zero (with zero gradient) where the boxes do not overlap.
    let iw = (x2.minimum(&x2g)? - x1.maximum(&x1g)?)?.relu()?;
    let ih = (y2.minimum(&y2g)? - y1.maximum(&y1g)?)?.relu()?;
    let inter = (iw * ih)?;
    let area = ((&x2 - &x1)? * (&y2 - &y1)?)?;
    let area_g = ((&x2g - &x1g)? * (&y2g - &y1g)?)?;
    let union = ((area + area_g)? - &inter)?;
    let iou = (inter / (&union + eps)?)?;
    // Smallest enclosing box.
    let cw = (x2.maximum(&x2g)? - x1.minimum(&x1g)?)?;
    let ch = (y2.maximum(&y2g)? - y1.minimum(&y1g)?)?;
    let area_c = (cw * ch)?;
    let penalty = ((&area_c - union)? / (area_c + eps)?)?;
    Ok((iou - penalty)?.affine(-1.0, 1.0)?.squeeze(1)?)
}

/// What the losses need from the anchor assignment of a batch, built on the host.
#[derive(Debug, Clone, Default)]
pub struct LossTargets {
    /// Per anchor of every image (`N·A`): the class of a foreground anchor, else `u32::MAX`.
    pub labels: Vec<u32>,
    /// Per anchor (`N·A`): its classification weight, 0 for ignored anchors, else
    /// 1 / (max(1, foreground anchors of its image) · N).
    pub cls_weights: Vec<f32>,
    /// Foreground rows into the flattened `(N·A, 4)` box outputs.
    pub fg_rows: Vec<u32>,
    /// Per foreground row: its weight, as `cls_weights`.
    pub fg_weights: Vec<f32>,
    /// Per foreground row: its anchor.
    pub fg_anchors: Vec<[f32; 4]>,
    /// Per foreground row: its ground-truth box (resized-image pixels).
    pub fg_boxes: Vec<[f32; 4]>,
}

impl LossTargets {
    /// Builds the targets from each image's matches (see [`crate::model::matcher::Matcher::assign`]), its
    /// boxes and its labels.
    pub fn new(
        anchors: &[[f32; 4]],
        matches: &[Vec<i64>],
        boxes: &[Vec<[f32; 4]>],
        labels: &[Vec<u32>],
    ) -> Self {
        let n = matches.len();
        let mut t = Self::default();
        for ((m, b), l) in matches.iter().zip(boxes).zip(labels) {
            let fg = m.iter().filter(|&&g| g >= 0).count();
            let w = 1.0 / (fg.max(1) as f32 * n as f32);
            let offset = t.labels.len();
            for (a, &g) in m.iter().enumerate() {
                match g {
                    IGNORED => {
                        t.labels.push(u32::MAX);
                        t.cls_weights.push(0.0);
                    }
                    BACKGROUND => {
                        t.labels.push(u32::MAX);
                        t.cls_weights.push(w);
                    }
                    g => {
                        let g = g as usize;
                        t.labels.push(l[g]);
                        t.cls_weights.push(w);
                        t.fg_rows.push((offset + a) as u32);
                        t.fg_weights.push(w);
                        t.fg_anchors.push(anchors[a]);
                        t.fg_boxes.push(b[g]);
                    }
                }
            }
        }
        t
    }
}

fn rows_tensor(rows: &[[f32; 4]], device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(rows.concat(), (rows.len(), 4), device)?)
}

/// The losses of a batch: `cls_logits` `(N, A, K)` and `bbox_regression` `(N, A, 4)` as
/// [`crate::RawOutput`] holds them, against `targets`.
pub fn retinanet_losses(
    cls_logits: &Tensor,
    bbox_regression: &Tensor,
    targets: &LossTargets,
    coder: &BoxCoder,
    config: &LossConfig,
) -> Result<Losses> {
    let (n, a, k) = cls_logits.dims3()?;
    let device = cls_logits.device();
    let dtype = cls_logits.dtype();
    if targets.labels.len() != n * a {
        return Err(crate::Error::Invalid(format!(
            "loss targets cover {} anchors, the outputs {n}×{a}",
            targets.labels.len()
        )));
    }
    let classification = if crate::kernels::native(device) && dtype == DType::F32 {
        let (labels, weights) = (&targets.labels, &targets.cls_weights);
        focal_loss_sum(cls_logits, labels, weights, config.alpha, config.gamma)?
    } else {
        // One-hot targets built on the device from per-anchor labels.
        let labels = Tensor::from_vec(targets.labels.clone(), (n, a, 1), device)?;
        let classes = Tensor::arange(0u32, k as u32, device)?.reshape((1, 1, k))?;
        let onehot = labels.broadcast_eq(&classes)?.to_dtype(dtype)?;
        let weights =
            Tensor::from_vec(targets.cls_weights.clone(), (n, a, 1), device)?.to_dtype(dtype)?;
        let focal = sigmoid_focal_loss(cls_logits, &onehot, config.alpha, config.gamma)?;
        focal.broadcast_mul(&weights)?.sum_all()?
    };

    let m = targets.fg_rows.len();
    let box_regression = if m == 0 {
        // No foreground anyway: zero, with no gradient, as torchvision's empty sum.
        Tensor::zeros((), dtype, device)?
    } else {
        let rows = Tensor::from_vec(targets.fg_rows.clone(), m, device)?;
        let pred = bbox_regression
            .reshape((n * a, 4))?
            .index_select(&rows, 0)?;
        let per_row = match config.box_loss {
            BoxLoss::L1 | BoxLoss::SmoothL1 { .. } => {
                let encoded: Vec<[f32; 4]> = targets
                    .fg_boxes
                    .iter()
                    .zip(&targets.fg_anchors)
                    .map(|(&b, &an)| coder.encode(b, an))
                    .collect();
                let target = rows_tensor(&encoded, device)?.to_dtype(dtype)?;
                match config.box_loss {
                    BoxLoss::SmoothL1 { beta } => smooth_l1_loss(&pred, &target, beta)?,
                    _ => l1_loss(&pred, &target)?,
                }
            }
            BoxLoss::GIoU { eps } => {
                let anchors = rows_tensor(&targets.fg_anchors, device)?.to_dtype(dtype)?;
                let gt = rows_tensor(&targets.fg_boxes, device)?.to_dtype(dtype)?;
                giou_loss(&decode_boxes(coder, &pred, &anchors)?, &gt, eps)?
            }
        };
        let w = Tensor::from_vec(targets.fg_weights.clone(), m, device)?.to_dtype(dtype)?;
        (per_row * w)?.sum_all()?
    };
    Ok(Losses {
        classification,
        box_regression,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn focal_loss_is_finite_and_correct_for_extreme_logits() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[-1000f32, 0.0, 1000.0, -1000.0, 1000.0], &dev).unwrap();
        let t = Tensor::new(&[0f32, 1.0, 1.0, 1.0, 0.0], &dev).unwrap();
        let l: Vec<f32> = sigmoid_focal_loss(&x, &t, Some(0.25), 2.0)
            .unwrap()
            .to_vec1()
            .unwrap();
        // Confident and right: 0. p = ½, t = 1: 0.25 · ¼ · ln 2. Confident and wrong: α_t·|x|.
        assert_eq!(l[0], 0.0);
        assert!((l[1] - 0.25 * 0.25 * std::f32::consts::LN_2).abs() < 1e-7);
        assert_eq!(l[2], 0.0);
        assert!((l[3] - 250.0).abs() < 1e-3, "{l:?}");
        assert!((l[4] - 750.0).abs() < 1e-3, "{l:?}");
    }

    #[test]
    fn fused_focal_sum_propagates_nan_and_handles_huge_logits() {
        let dev = Device::Cpu;
        let sum = |v: Vec<f32>| {
            let x = Tensor::from_vec(v, (1, 1, 3), &dev).unwrap();
            focal_loss_sum(&x, &[1], &[1.0], Some(0.25), 2.0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(sum(vec![0.0, f32::NAN, 1.0]).is_nan());
        assert!(sum(vec![f32::NAN, 2.0, -3.0]).is_nan());
        // Right by a mile: no loss; wrong by a mile: the loss grows linearly.
        assert_eq!(sum(vec![-1e4, 1e4, -1e4]), 0.0);
        let wrong = sum(vec![1e4, -1e4, 0.0]) as f64;
        let expected = 0.75 * 1e4 + 0.25 * 1e4 + 0.75 * 0.25 * std::f64::consts::LN_2;
        assert!(
            (wrong - expected).abs() / expected < 1e-6,
            "{wrong} vs {expected}"
        );
    }

    #[test]
    fn fused_focal_sum_matches_elementwise_loss_and_gradient() {
        let dev = Device::Cpu;
        let (n, a, k) = (2, 7, 5);
        let mut x: Vec<f32> = (0..n * a * k)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7)
            .collect();
        x[3] = 80.0;
        x[9] = -90.0;
        let labels: Vec<u32> = (0..n * a).map(|i| [0, 3, u32::MAX, 4][i % 4]).collect();
        let weights: Vec<f32> = (0..n * a).map(|i| [0.5, 0.25, 0.0, 1.0][i % 3]).collect();
        for (alpha, gamma) in [(Some(0.25), 2.0), (None, 1.5)] {
            let xv = candle_core::Var::from_vec(x.clone(), (n, a, k), &dev).unwrap();
            let fused = focal_loss_sum(xv.as_tensor(), &labels, &weights, alpha, gamma).unwrap();
            let lab = Tensor::from_vec(labels.clone(), (n, a, 1), &dev).unwrap();
            let classes = Tensor::arange(0u32, k as u32, &dev).unwrap();
            let onehot = lab
                .broadcast_eq(&classes.reshape((1, 1, k)).unwrap())
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let w = Tensor::from_vec(weights.clone(), (n, a, 1), &dev).unwrap();
            let plain = sigmoid_focal_loss(xv.as_tensor(), &onehot, alpha, gamma)
                .unwrap()
                .broadcast_mul(&w)
                .unwrap()
                .sum_all()
                .unwrap();
            let (f, p) = (
                fused.to_scalar::<f32>().unwrap(),
                plain.to_scalar::<f32>().unwrap(),
            );
            assert!((f - p).abs() <= 1e-5 * p.abs(), "{f} vs {p}");
            let grad = |loss: &Tensor| -> Vec<f32> {
                let grads = loss.backward().unwrap();
                let g = grads.get(&xv).unwrap().flatten_all().unwrap();
                g.to_vec1().unwrap()
            };
            let (gf, gp) = (grad(&fused), grad(&plain));
            for (i, (a, b)) in gf.iter().zip(&gp).enumerate() {
                assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-2), "{i}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn box_loss_parses_its_names() {
        assert_eq!("l1".parse::<BoxLoss>().unwrap(), LossConfig::v1().box_loss);
        assert_eq!(
            "giou".parse::<BoxLoss>().unwrap(),
            LossConfig::v2().box_loss
        );
        let paper = LossConfig::v2().with_box_loss("smooth-l1".parse().unwrap());
        assert_eq!(paper, LossConfig::paper());
        let e = "smoothl1".parse::<BoxLoss>().unwrap_err().to_string();
        assert!(e.contains("smoothl1") && e.contains("giou"), "{e}");
    }

    #[test]
    fn smooth_l1_switches_at_beta() {
        let dev = Device::Cpu;
        let p = Tensor::new(&[[0.05f32, 1.0, 0.0, 0.0]], &dev).unwrap();
        let t = Tensor::zeros((1, 4), DType::F32, &dev).unwrap();
        let l: Vec<f32> = smooth_l1_loss(&p, &t, 0.11).unwrap().to_vec1().unwrap();
        let expected = 0.5 * 0.05 * 0.05 / 0.11 + (1.0 - 0.055);
        assert!((l[0] - expected).abs() < 1e-6, "{l:?}");
    }

    #[test]
    fn giou_of_identical_boxes_is_zero_and_of_disjoint_boxes_above_one() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[0f32, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]], &dev).unwrap();
        let b = Tensor::new(&[[0f32, 0.0, 10.0, 10.0], [20.0, 0.0, 30.0, 10.0]], &dev).unwrap();
        let l: Vec<f32> = giou_loss(&a, &b, 1e-7).unwrap().to_vec1().unwrap();
        assert!(l[0].abs() < 1e-6);
        // IoU 0, enclosing 30×10 with union 200: 1 + 100/300.
        assert!((l[1] - (1.0 + 1.0 / 3.0)).abs() < 1e-6, "{l:?}");
    }
}
