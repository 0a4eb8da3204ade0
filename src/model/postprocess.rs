//! Inference post-processing (§4.1, "Inference"), as torchvision's
//! `RetinaNet.postprocess_detections`: per level, sigmoid scores above a threshold, the top
//! candidates, box decoding and clipping; then per-class non-maximum suppression over all
//! levels, the best detections per image, and their boxes mapped back to the original image.
//!
//! It runs in plain Rust on the few thousand candidates that pass the threshold; the model
//! only copies those rows off its device.

use candle_core::{DType, IndexOp, Tensor, D};

use crate::model::box_coder::{clip_box, BoxCoder};
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
                boxes.push(clip_box(coder.decode(level.deltas[row], anchor), h, w));
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
    let ratio_h = orig.0 as f32 / resized.0 as f32;
    let ratio_w = orig.1 as f32 / resized.1 as f32;
    for d in &mut dets {
        d.bbox = [
            d.bbox[0] * ratio_w,
            d.bbox[1] * ratio_h,
            d.bbox[2] * ratio_w,
            d.bbox[3] * ratio_h,
        ];
    }
    dets
}

/// The given rows of a contiguous f32 CPU `(rows, k)` tensor, gathered straight from its
/// storage; `None` for anything else.
fn rows_on_host(t: &Tensor, k: usize, rows: &[usize]) -> Option<Vec<f32>> {
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
    if k == 0 {
        return None;
    }
    crate::kernels::host_f32(t, |values| {
        values
            .par_chunks(k)
            .map(|row| row.iter().copied().fold(f32::NEG_INFINITY, f32::max))
            .collect()
    })
}

/// Area of `[x1, y1, x2, y2]` (no +1).
fn area(b: &[f32; 4]) -> f32 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// Non-maximum suppression, as torchvision's `nms` on CPU: boxes in order of score
/// (stable, descending), each suppressing the later ones with IoU strictly above
/// `iou_threshold`. Returns the kept indices by decreasing score.
pub fn nms(boxes: &[[f32; 4]], scores: &[f32], iou_threshold: f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let areas: Vec<f32> = boxes.iter().map(area).collect();
    let mut suppressed = vec![false; boxes.len()];
    let mut keep = Vec::new();
    for (oi, &i) in order.iter().enumerate() {
        if suppressed[i] {
            continue;
        }
        keep.push(i);
        let bi = boxes[i];
        for &j in &order[oi + 1..] {
            if suppressed[j] {
                continue;
            }
            let bj = boxes[j];
            let iw = (bi[2].min(bj[2]) - bi[0].max(bj[0])).max(0.0);
            let ih = (bi[3].min(bj[3]) - bi[1].max(bj[1])).max(0.0);
            let inter = iw * ih;
            let iou = inter / (areas[i] + areas[j] - inter);
            if iou as f64 > iou_threshold {
                suppressed[j] = true;
            }
        }
    }
    keep
}

/// Per-class NMS, as torchvision's `batched_nms`: for up to 1000 boxes it offsets each
/// class's boxes by `label · (max coordinate + 1)` and runs one NMS (the offsets change IoUs
/// in the last bits, so parity needs the same trick); above that it runs NMS per class.
/// Returns kept indices by decreasing score.
pub fn batched_nms(
    boxes: &[[f32; 4]],
    scores: &[f32],
    labels: &[usize],
    iou_threshold: f64,
) -> Vec<usize> {
    if boxes.is_empty() {
        return Vec::new();
    }
    if boxes.len() * 4 <= 4000 {
        batched_nms_offset(boxes, scores, labels, iou_threshold)
    } else {
        batched_nms_per_class(boxes, scores, labels, iou_threshold)
    }
}

fn batched_nms_offset(
    boxes: &[[f32; 4]],
    scores: &[f32],
    labels: &[usize],
    iou_threshold: f64,
) -> Vec<usize> {
    let max_coord = boxes
        .iter()
        .flatten()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let shifted: Vec<[f32; 4]> = boxes
        .iter()
        .zip(labels)
        .map(|(b, &l)| {
            let offset = l as f32 * (max_coord + 1.0);
            b.map(|v| v + offset)
        })
        .collect();
    nms(&shifted, scores, iou_threshold)
}

fn batched_nms_per_class(
    boxes: &[[f32; 4]],
    scores: &[f32],
    labels: &[usize],
    iou_threshold: f64,
) -> Vec<usize> {
    let num_labels = labels.iter().max().map_or(0, |m| m + 1);
    let mut by_label: Vec<Vec<usize>> = vec![Vec::new(); num_labels];
    for (i, &l) in labels.iter().enumerate() {
        by_label[l].push(i);
    }
    let mut keep = Vec::new();
    for idx in by_label.iter().filter(|v| !v.is_empty()) {
        let b: Vec<[f32; 4]> = idx.iter().map(|&i| boxes[i]).collect();
        let s: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
        keep.extend(nms(&b, &s, iou_threshold).into_iter().map(|k| idx[k]));
    }
    // torchvision: kept indices in index order, then sorted by score.
    keep.sort_unstable();
    keep.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nms_suppresses_strictly_above_threshold() {
        // IoU of the two boxes is exactly 0.5: both are kept (suppression needs > 0.5).
        let boxes = [[0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 4.0, 1.0]];
        assert_eq!(nms(&boxes, &[0.9, 0.8], 0.5), vec![0, 1]);
        assert_eq!(nms(&boxes, &[0.8, 0.9], 0.49), vec![1]);
    }

    #[test]
    fn batched_nms_keeps_other_classes() {
        let boxes = [
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 10.0, 9.0],
        ];
        let keep = batched_nms(&boxes, &[0.5, 0.9, 0.7], &[1, 2, 1], 0.5);
        assert_eq!(keep, vec![1, 2]);
    }

    #[test]
    fn both_batched_paths_agree() {
        // A grid of overlapping boxes in three classes, integer coordinates, so the class
        // offsets are exact and both of torchvision's code paths must give the same result.
        let boxes: Vec<[f32; 4]> = (0..1200)
            .map(|i| {
                let x = (i % 40) as f32 * 1.5;
                let y = (i / 40) as f32 * 10.0;
                [x, y, x + 12.0, y + 9.0]
            })
            .collect();
        let scores: Vec<f32> = (0..1200).map(|i| ((i * 7919) % 1200) as f32).collect();
        let labels: Vec<usize> = (0..1200).map(|i| (i / 40 + i % 2) % 3).collect();
        let a = batched_nms_offset(&boxes, &scores, &labels, 0.5);
        let b = batched_nms_per_class(&boxes, &scores, &labels, 0.5);
        assert!(a.len() > 100 && a.len() < 1200, "{}", a.len());
        assert_eq!(a, b);
    }
}
