//! Post-processing, as torchvision's `RetinaNet.postprocess_detections`: per level, sigmoid
//! scores above a threshold, the top candidates, box decoding and clipping; then per-class
//! non-maximum suppression over all levels and the best detections per image.
//!
//! It runs in plain Rust on the few thousand candidates that pass the threshold; the model
//! only copies those rows off its device.

use crate::boxes::{batched_nms, clip};
use crate::model::box_coder::BoxCoder;

/// Settings of post-processing; the defaults are torchvision's.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PostProcessConfig {
    /// Keep (anchor, class) pairs scoring strictly above this.
    pub score_thresh: f32,
    /// Candidates kept per level, by score.
    pub topk_candidates: usize,
    /// Suppress a box whose IoU with a better box of its class is strictly above this.
    pub nms_thresh: f64,
    /// Detections kept per image.
    pub detections_per_img: usize,
}

impl Default for PostProcessConfig {
    fn default() -> Self {
        Self {
            score_thresh: 0.05,
            topk_candidates: 1000,
            nms_thresh: 0.5,
            detections_per_img: 300,
        }
    }
}

/// One detected object.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Detection {
    /// `[x1, y1, x2, y2]` in pixels.
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    /// Sigmoid class probability.
    pub score: f32,
    /// Class index of the model (for torchvision's COCO models, the COCO category id).
    pub label: usize,
}

/// Candidate anchors of one image and level, as copied off the device.
#[derive(Debug, Clone, Default)]
pub struct LevelCandidates {
    /// Index of each candidate anchor within the level.
    pub anchor_idx: Vec<usize>,
    /// Class logits, `anchor_idx.len() × num_classes`, row-major.
    pub logits: Vec<f32>,
    /// Box deltas, `anchor_idx.len() × 4`.
    pub deltas: Vec<[f32; 4]>,
}

/// Logistic sigmoid in f32.
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl PostProcessConfig {
    /// Detections of one image from its candidates per level. `anchors[l]` are the level's
    /// anchors, `image_size` the resized (unpadded) `(height, width)` boxes are clipped to.
    pub fn detections(
        &self,
        coder: &BoxCoder,
        levels: &[LevelCandidates],
        anchors: &[&[[f32; 4]]],
        num_classes: usize,
        image_size: (usize, usize),
    ) -> Vec<Detection> {
        let (h, w) = (image_size.0 as f32, image_size.1 as f32);
        let mut boxes = Vec::new();
        let mut scores = Vec::new();
        let mut labels = Vec::new();
        for (level, level_anchors) in levels.iter().zip(anchors) {
            for (row, k, score) in self.top_candidates(level, num_classes) {
                let anchor = level_anchors[level.anchor_idx[row]];
                boxes.push(clip(coder.decode(level.deltas[row], anchor), h, w));
                scores.push(score);
                labels.push(k);
            }
        }
        let mut keep = batched_nms(&boxes, &scores, &labels, self.nms_thresh);
        keep.truncate(self.detections_per_img);
        keep.into_iter()
            .map(|i| Detection {
                bbox: boxes[i],
                score: scores[i],
                label: labels[i],
            })
            .collect()
    }

    /// The (row, class, score) triples of one level scoring above the threshold, best
    /// `topk_candidates` of them, by score descending (ties by flat index).
    fn top_candidates(&self, level: &LevelCandidates, k: usize) -> Vec<(usize, usize, f32)> {
        let mut cands: Vec<(usize, usize, f32)> = Vec::new();
        // Only logits near or above logit(threshold) can pass: skip the exponential for the
        // rest (the margin keeps the exact f32 test `sigmoid(x) > threshold` the judge).
        let t = self.score_thresh as f64;
        let cut = if t > 0.0 && t < 1.0 {
            ((t / (1.0 - t)).ln() - 1e-3) as f32
        } else {
            f32::NEG_INFINITY
        };
        for (row, logits) in level.logits.chunks_exact(k).enumerate() {
            for (class, &logit) in logits.iter().enumerate() {
                if logit < cut {
                    continue;
                }
                let s = sigmoid(logit);
                if s > self.score_thresh {
                    cands.push((row, class, s));
                }
            }
        }
        // Rows are in anchor order, so (row, class) order is torchvision's flat index order.
        let by_score = |a: &(usize, usize, f32), b: &(usize, usize, f32)| {
            b.2.total_cmp(&a.2).then((a.0, a.1).cmp(&(b.0, b.1)))
        };
        if cands.len() > self.topk_candidates && self.topk_candidates > 0 {
            cands.select_nth_unstable_by(self.topk_candidates - 1, by_score);
        }
        cands.truncate(self.topk_candidates);
        cands.sort_by(by_score);
        cands
    }
}
