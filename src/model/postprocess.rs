//! Inference post-processing (§4.1, "Inference"), as torchvision's
//! `RetinaNet.postprocess_detections`: per level, sigmoid scores above a threshold, the top
//! candidates, box decoding and clipping; then per-class non-maximum suppression over all
//! levels, the best detections per image, and their boxes mapped back to the original image.
//!
//! It runs in plain Rust on the few thousand candidates that pass the threshold; the model
//! only copies those rows off its device.

use candle_core::{DType, IndexOp, Tensor, D};

use crate::boxes::{batched_nms, clip};
use crate::model::box_coder::BoxCoder;
use crate::model::retinanet::RawOutput;
use crate::model::transform::ImageBatch;
use crate::Result;

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

impl PostProcessConfig {
    /// Detections of each image of `batch` from the network's outputs `raw`, in
    /// original-image pixels, sorted by score.
    pub fn batch(
        &self,
        coder: &BoxCoder,
        raw: &RawOutput,
        batch: &ImageBatch,
    ) -> Result<Vec<Vec<Detection>>> {
        let k = raw.cls_logits.dim(2)?;
        let level_anchors = split_levels(&raw.anchor_boxes, &raw.num_anchors_per_level);
        let mut out = Vec::with_capacity(batch.image_sizes.len());
        for (i, (&size, &orig)) in batch
            .image_sizes
            .iter()
            .zip(&batch.original_sizes)
            .enumerate()
        {
            let logits = raw.cls_logits.i(i)?;
            let deltas = raw.bbox_regression.i(i)?;
            let mut levels = Vec::with_capacity(raw.num_anchors_per_level.len());
            let mut offset = 0;
            for &count in &raw.num_anchors_per_level {
                levels.push(self.candidates(
                    &logits.narrow(0, offset, count)?,
                    &deltas.narrow(0, offset, count)?,
                    k,
                )?);
                offset += count;
            }
            let dets = self.detections(coder, &levels, &level_anchors, k, size);
            out.push(rescale(dets, size, orig));
        }
        Ok(out)
    }

    /// Copies off the device the rows of one level whose best class passes the threshold.
    fn candidates(&self, logits: &Tensor, deltas: &Tensor, k: usize) -> Result<LevelCandidates> {
        let best: Vec<f32> = match row_maxima_on_host(logits, k) {
            Some(best) => best,
            None => logits.max(D::Minus1)?.to_dtype(DType::F32)?.to_vec1()?,
        };
        let thresh = self.score_thresh;
        let anchor_idx: Vec<usize> = best
            .iter()
            .enumerate()
            .filter(|(_, &l)| sigmoid(l) > thresh)
            .map(|(i, _)| i)
            .collect();
        if anchor_idx.is_empty() {
            return Ok(LevelCandidates::default());
        }
        let (logits, deltas) = match (
            rows_on_host(logits, k, &anchor_idx),
            rows_on_host(deltas, 4, &anchor_idx),
        ) {
            (Some(l), Some(d)) => (
                l,
                d.chunks_exact(4)
                    .map(|r| [r[0], r[1], r[2], r[3]])
                    .collect(),
            ),
            _ => {
                let idx: Vec<u32> = anchor_idx.iter().map(|&i| i as u32).collect();
                let idx = Tensor::from_vec(idx, anchor_idx.len(), logits.device())?;
                let logits = logits
                    .index_select(&idx, 0)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                let deltas = deltas
                    .index_select(&idx, 0)?
                    .to_dtype(DType::F32)?
                    .to_vec2::<f32>()?
                    .into_iter()
                    .map(|r| [r[0], r[1], r[2], r[3]])
                    .collect();
                (logits, deltas)
            }
        };
        debug_assert_eq!(logits.len(), anchor_idx.len() * k);
        Ok(LevelCandidates {
            anchor_idx,
            logits,
            deltas,
        })
    }
}

/// `anchors` cut into consecutive levels of `counts` anchors.
fn split_levels<'a>(anchors: &'a [[f32; 4]], counts: &[usize]) -> Vec<&'a [[f32; 4]]> {
    let mut levels = Vec::with_capacity(counts.len());
    let mut offset = 0;
    for &count in counts {
        levels.push(&anchors[offset..offset + count]);
        offset += count;
    }
    levels
}

/// Maps boxes from the resized image back to the original, as torchvision's `resize_boxes`.
fn rescale(
    mut dets: Vec<Detection>,
    resized: (usize, usize),
    orig: (usize, usize),
) -> Vec<Detection> {
    for d in &mut dets {
        d.bbox = crate::boxes::resize(d.bbox, resized, orig);
    }
    dets
}

/// The given rows of a contiguous f32 CPU `(rows, k)` tensor, gathered straight from its
/// storage; `None` for anything else.
fn rows_on_host(t: &Tensor, k: usize, rows: &[usize]) -> Option<Vec<f32>> {
    if !crate::kernels::native(t.device()) {
        return None;
    }
    crate::kernels::host_f32(t, |values| {
        let mut out = Vec::with_capacity(rows.len() * k);
        for &r in rows {
            out.extend_from_slice(values.get(r * k..(r + 1) * k)?);
        }
        Some(out)
    })?
}

/// Per-row maxima of a contiguous f32 CPU `(rows, k)` tensor in one parallel pass (Candle's
/// reduction runs on one thread); `None` for anything else.
fn row_maxima_on_host(t: &Tensor, k: usize) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    if k == 0 || !crate::kernels::native(t.device()) {
        return None;
    }
    crate::kernels::host_f32(t, |values| {
        values
            .par_chunks(k)
            .map(|row| row.iter().copied().fold(f32::NEG_INFINITY, f32::max))
            .collect()
    })
}
