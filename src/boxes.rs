//! Box geometry shared by the model, training, tiling and evaluation: area, IoU, clipping,
//! resizing, the `[x1, y1, x2, y2]` ↔ COCO `[x, y, w, h]` conversions, and (batched)
//! non-maximum suppression.
//!
//! Boxes are `[x1, y1, x2, y2]` in pixels unless a name says `xywh`. The f32 functions follow
//! torchvision's order of operations, so assignments and suppressions fall exactly as in
//! torchvision; [`coco_iou`] follows pycocotools' instead (see there why it is apart).

use std::ops::{Add, Sub};

/// Area of `[x1, y1, x2, y2]` (no +1).
pub fn area(b: &[f32; 4]) -> f32 {
    (b[2] - b[0]) * (b[3] - b[1])
}

/// Area of the intersection of two boxes (0 when they are disjoint).
fn intersection(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    w * h
}

/// IoU from the boxes and their areas (NMS computes each area once).
fn iou_with_areas(a: &[f32; 4], b: &[f32; 4], area_a: f32, area_b: f32) -> f32 {
    let inter = intersection(a, b);
    inter / (area_a + area_b - inter)
}

/// IoU of two boxes, as torchvision's `box_iou` computes it in f32.
pub fn box_iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    iou_with_areas(&a, &b, area(&a), area(&b))
}

/// IoU of a detection `d` and a ground truth `g`, both COCO `[x, y, w, h]` in f64, as
/// pycocotools' `bbIou`; for a crowd `g` the intersection is over the detection's area.
///
/// It stays apart from [`box_iou`] because pycocotools takes the areas from `w · h` and the
/// right edges from `x + w`: going through `[x1, y1, x2, y2]` would change the last bits, and
/// evaluation must match pycocotools exactly.
pub fn coco_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let w = (d[2] + d[0]).min(g[2] + g[0]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[3] + d[1]).min(g[3] + g[1]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let da = d[2] * d[3];
    let i = w * h;
    let u = if crowd { da } else { da + g[2] * g[3] - i };
    i / u
}

/// Clamps a box to `[0, width] × [0, height]`.
pub fn clip(b: [f32; 4], height: f32, width: f32) -> [f32; 4] {
    [
        b[0].clamp(0.0, width),
        b[1].clamp(0.0, height),
        b[2].clamp(0.0, width),
        b[3].clamp(0.0, height),
    ]
}

/// Maps a box from an image of size `from` to one of size `to` (both `(height, width)`), as
/// torchvision's `resize_boxes`: f32 ratios of the integer sizes, per axis.
pub fn resize(b: [f32; 4], from: (usize, usize), to: (usize, usize)) -> [f32; 4] {
    let ratio_h = to.0 as f32 / from.0 as f32;
    let ratio_w = to.1 as f32 / from.1 as f32;
    [
        b[0] * ratio_w,
        b[1] * ratio_h,
        b[2] * ratio_w,
        b[3] * ratio_h,
    ]
}

/// [`resize`] of every box.
pub fn resize_boxes(boxes: &[[f32; 4]], from: (usize, usize), to: (usize, usize)) -> Vec<[f32; 4]> {
    boxes.iter().map(|&b| resize(b, from, to)).collect()
}

/// `[x1, y1, x2, y2]` → COCO's `[x, y, w, h]`.
pub fn xyxy_to_xywh<T: Copy + Sub<Output = T>>(b: [T; 4]) -> [T; 4] {
    [b[0], b[1], b[2] - b[0], b[3] - b[1]]
}

/// COCO's `[x, y, w, h]` → `[x1, y1, x2, y2]`.
pub fn xywh_to_xyxy<T: Copy + Add<Output = T>>(b: [T; 4]) -> [T; 4] {
    [b[0], b[1], b[0] + b[2], b[1] + b[3]]
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
        for &j in &order[oi + 1..] {
            if suppressed[j] {
                continue;
            }
            let iou = iou_with_areas(&boxes[i], &boxes[j], areas[i], areas[j]);
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
        nms(&offset_by_class(boxes, labels), scores, iou_threshold)
    } else {
        per_class_nms(boxes, scores, labels, iou_threshold)
    }
}

/// Boxes moved apart by class, so that boxes of different classes never overlap.
fn offset_by_class(boxes: &[[f32; 4]], labels: &[usize]) -> Vec<[f32; 4]> {
    let max_coord = boxes
        .iter()
        .flatten()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    boxes
        .iter()
        .zip(labels)
        .map(|(b, &l)| {
            let offset = l as f32 * (max_coord + 1.0);
            b.map(|v| v + offset)
        })
        .collect()
}

/// NMS of each class on its own; kept indices by decreasing score.
fn per_class_nms(boxes: &[[f32; 4]], scores: &[f32], labels: &[usize], iou: f64) -> Vec<usize> {
    let num_labels = labels.iter().max().map_or(0, |m| m + 1);
    let mut by_label: Vec<Vec<usize>> = vec![Vec::new(); num_labels];
    for (i, &l) in labels.iter().enumerate() {
        by_label[l].push(i);
    }
    let mut keep = Vec::new();
    for idx in by_label.iter().filter(|v| !v.is_empty()) {
        let b: Vec<[f32; 4]> = idx.iter().map(|&i| boxes[i]).collect();
        let s: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
        keep.extend(nms(&b, &s, iou).into_iter().map(|k| idx[k]));
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
    fn iou_of_half_overlapping_boxes() {
        let (a, b) = ([0.0, 0.0, 3.0, 1.0], [1.0, 0.0, 4.0, 1.0]);
        assert_eq!(box_iou(a, b), 0.5);
        assert_eq!(box_iou(a, [5.0, 0.0, 6.0, 1.0]), 0.0);
        // The same boxes in COCO form; against a crowd, over the detection's area.
        let (ca, cb) = (
            xyxy_to_xywh(a.map(f64::from)),
            xyxy_to_xywh(b.map(f64::from)),
        );
        assert_eq!(
            (coco_iou(&ca, &cb, false), coco_iou(&ca, &cb, true)),
            (0.5, 2.0 / 3.0)
        );
        assert_eq!(xywh_to_xyxy(ca), a.map(f64::from));
    }

    #[test]
    fn resize_and_clip() {
        let b = resize([10.0, 20.0, 30.0, 40.0], (100, 200), (50, 400));
        assert_eq!(b, [20.0, 10.0, 60.0, 20.0]);
        assert_eq!(
            clip([-1.0, 5.0, 70.0, 9.0], 8.0, 64.0),
            [0.0, 5.0, 64.0, 8.0]
        );
    }

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
        let a = nms(&offset_by_class(&boxes, &labels), &scores, 0.5);
        let b = per_class_nms(&boxes, &scores, &labels, 0.5);
        assert!(a.len() > 100 && a.len() < 1200, "{}", a.len());
        assert_eq!(a, b);
    }
}
