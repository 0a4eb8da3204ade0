//! Anchor assignment (§4, "Anchors": IoU ≥ 0.5 foreground, < 0.4 background), as
//! torchvision's `det_utils.Matcher` with RetinaNet's thresholds.
//!
//! Matching is integer bookkeeping over an IoU matrix, so it runs on the host in f32 with
//! torchvision's order of operations: the thresholds and the ties of low-quality matching
//! then fall exactly as in torchvision.

use crate::boxes::box_iou;

/// Match value of an anchor assigned to the background.
pub const BACKGROUND: i64 = -1;
/// Match value of an anchor ignored by the losses (IoU between the thresholds).
pub const IGNORED: i64 = -2;

/// Assigns anchors to ground-truth boxes by IoU.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Matcher {
    /// Anchors with IoU ≥ this are foreground.
    pub fg_iou: f32,
    /// Anchors with IoU < this are background; those between are ignored.
    pub bg_iou: f32,
    /// Each ground truth also keeps the anchors of its highest IoU (ties included), even
    /// below `fg_iou`, so that every box trains some anchor.
    pub allow_low_quality: bool,
}

impl Default for Matcher {
    /// RetinaNet's: 0.5 / 0.4 with low-quality matches.
    fn default() -> Self {
        Self {
            fg_iou: 0.5,
            bg_iou: 0.4,
            allow_low_quality: true,
        }
    }
}

impl Matcher {
    /// For each anchor, the index of its ground-truth box, [`BACKGROUND`] or [`IGNORED`].
    /// An image without boxes is background everywhere.
    pub fn assign(&self, anchors: &[[f32; 4]], gt: &[[f32; 4]]) -> Vec<i64> {
        if gt.is_empty() {
            return vec![BACKGROUND; anchors.len()];
        }
        // Best ground truth per anchor (the first on ties, as torch.max) and best IoU per
        // ground truth.
        let mut best_gt = vec![0usize; anchors.len()];
        let mut best_iou = vec![f32::NEG_INFINITY; anchors.len()];
        let mut gt_best = vec![f32::NEG_INFINITY; gt.len()];
        let mut ious = vec![0f32; gt.len() * anchors.len()];
        for (g, &b) in gt.iter().enumerate() {
            let row = &mut ious[g * anchors.len()..(g + 1) * anchors.len()];
            for (a, (&anchor, v)) in anchors.iter().zip(row.iter_mut()).enumerate() {
                let iou = box_iou(b, anchor);
                *v = iou;
                if iou > best_iou[a] {
                    best_iou[a] = iou;
                    best_gt[a] = g;
                }
                if iou > gt_best[g] {
                    gt_best[g] = iou;
                }
            }
        }
        let mut matches: Vec<i64> = best_iou
            .iter()
            .zip(&best_gt)
            .map(|(&iou, &g)| {
                if iou < self.bg_iou {
                    BACKGROUND
                } else if iou < self.fg_iou {
                    IGNORED
                } else {
                    g as i64
                }
            })
            .collect();
        if self.allow_low_quality {
            for (g, &best) in gt_best.iter().enumerate() {
                let row = &ious[g * anchors.len()..(g + 1) * anchors.len()];
                for (a, &iou) in row.iter().enumerate() {
                    // torchvision gives the anchor its own best ground truth, not `g`.
                    if iou == best {
                        matches[a] = best_gt[a] as i64;
                    }
                }
            }
        }
        matches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_split_foreground_ignored_background() {
        let gt = [[0.0, 0.0, 10.0, 10.0]];
        let anchors = [
            [0.0, 0.0, 10.0, 10.0], // IoU 1
            [0.0, 0.0, 10.0, 4.5],  // 0.45: ignored
            [0.0, 0.0, 10.0, 3.0],  // 0.3: background
            [0.0, 0.0, 10.0, 5.0],  // 0.5: foreground
        ];
        let m = Matcher::default().assign(&anchors, &gt);
        assert_eq!(m, vec![0, IGNORED, BACKGROUND, 0]);
    }

    #[test]
    fn low_quality_matches_keep_every_tie() {
        // The box's best IoU (0.25) is below 0.4, reached by two anchors.
        let gt = [[0.0, 0.0, 10.0, 10.0]];
        let anchors = [
            [0.0, 0.0, 10.0, 2.5],
            [0.0, 7.5, 10.0, 10.0],
            [0.0, 0.0, 10.0, 1.0],
        ];
        let m = Matcher::default().assign(&anchors, &gt);
        assert_eq!(m, vec![0, 0, BACKGROUND]);
        let strict = Matcher {
            allow_low_quality: false,
            ..Matcher::default()
        };
        assert_eq!(strict.assign(&anchors, &gt), vec![BACKGROUND; 3]);
    }

    #[test]
    fn no_boxes_means_background() {
        let m = Matcher::default().assign(&[[0.0, 0.0, 1.0, 1.0]], &[]);
        assert_eq!(m, vec![BACKGROUND]);
    }
}
