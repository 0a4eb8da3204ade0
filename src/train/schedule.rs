//! The learning-rate schedule (§4.1, "Optimization"): linear warm-up, then ×0.1 decays at
//! given steps; the paper's, and the paper's scaled to another dataset and batch size.

use crate::{Error, Result};

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
