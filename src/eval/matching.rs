//! pycocotools' `evaluateImg`: detections and ground truth grouped by (category, image), and
//! the greedy matching of each group at every IoU threshold and area range.

use std::cmp::Ordering;
use std::ops::Range;

use rayon::prelude::*;

use super::{iou_thresholds, AreaRange, Detection, GroundTruth, GtBox, A, MAX_DET, T};
use crate::boxes::coco_iou;

/// `evaluateImg` for every (category, image) cell, in parallel.
pub(super) fn evaluate_cells(
    gt: &GroundTruth,
    dets: &[Detection],
    grouped: &Grouped,
) -> Vec<CellEval> {
    let thresholds = iou_thresholds();
    grouped
        .cells
        .par_iter()
        .map(|cell| {
            let gts: Vec<&GtBox> = grouped.gt_order[cell.gts.clone()]
                .iter()
                .map(|&i| &gt.annotations[i])
                .collect();
            let dts: Vec<&Detection> = grouped.det_order[cell.dets.clone()]
                .iter()
                .map(|&i| &dets[i])
                .collect();
            evaluate_cell(&gts, &dts, &thresholds)
        })
        .collect()
}

/// One (category, image) pair that has ground truth or detections: pycocotools' non-`None`
/// `evalImgs` entries. The ranges index `Grouped::gt_order` and `Grouped::det_order`.
pub(super) struct Cell {
    cat: usize,
    gts: Range<usize>,
    pub(super) dets: Range<usize>,
}

pub(super) struct Grouped {
    gt_order: Vec<usize>,
    det_order: Vec<usize>,
    /// Sorted by category, then image: the order pycocotools concatenates in `accumulate`.
    pub(super) cells: Vec<Cell>,
}

/// Groups annotations and detections by (category, image), keeping input order inside a group
/// (pycocotools' `_gts`/`_dts` lists). Annotations on unknown images or categories are dropped.
pub(super) fn group_cells(gt: &GroundTruth, dets: &[Detection]) -> Grouped {
    let n_img = gt.images.len();
    let annotations = gt.annotations.iter().map(|a| (a.category_id, a.image_id));
    let mut gt_keyed = cell_keys(gt, annotations);
    // Detections were validated, so every one has both indices.
    let mut det_keyed = cell_keys(gt, dets.iter().map(|d| (d.category_id, d.image_id)));
    // (key, index) pairs are distinct, so this equals a stable sort by key.
    gt_keyed.par_sort_unstable();
    det_keyed.par_sort_unstable();
    let mut cells = Vec::new();
    let (mut gi, mut di) = (0, 0);
    while gi < gt_keyed.len() || di < det_keyed.len() {
        let gk = gt_keyed.get(gi).map_or(usize::MAX, |p| p.0);
        let dk = det_keyed.get(di).map_or(usize::MAX, |p| p.0);
        let k = gk.min(dk);
        let g_end = run_end(&gt_keyed, gi, k);
        let d_end = run_end(&det_keyed, di, k);
        cells.push(Cell {
            cat: k / n_img.max(1),
            gts: gi..g_end,
            dets: di..d_end,
        });
        (gi, di) = (g_end, d_end);
    }
    Grouped {
        gt_order: gt_keyed.into_iter().map(|p| p.1).collect(),
        det_order: det_keyed.into_iter().map(|p| p.1).collect(),
        cells,
    }
}

/// `(cell key, position)` of each `(category id, image id)` on a known category and image;
/// the key orders by category, then image.
fn cell_keys(gt: &GroundTruth, ids: impl Iterator<Item = (i64, i64)>) -> Vec<(usize, usize)> {
    let n_img = gt.images.len();
    ids.enumerate()
        .filter_map(|(i, (cat, img))| {
            let k = gt.category_index(cat)?;
            Some((k * n_img + gt.image_index(img)?, i))
        })
        .collect()
}

/// End of the run of `key` starting at `start` (which may be empty).
fn run_end(keyed: &[(usize, usize)], start: usize, key: usize) -> usize {
    start + keyed[start..].iter().take_while(|p| p.0 == key).count()
}

/// The range of cells belonging to each category.
pub(super) fn category_ranges(cells: &[Cell], k_len: usize) -> Vec<Range<usize>> {
    let mut ranges = Vec::with_capacity(k_len);
    let mut start = 0;
    for k in 0..k_len {
        let end = start + cells[start..].iter().take_while(|c| c.cat == k).count();
        ranges.push(start..end);
        start = end;
    }
    ranges
}

/// Per-detection outcome at each IoU threshold, one bit per threshold.
#[derive(Clone, Copy, Default)]
pub(super) struct DetFlags {
    /// Matched to a non-ignored ground truth with a non-zero id.
    pub(super) tp: u16,
    /// Neither matched nor ignored.
    pub(super) fp: u16,
}

/// Matching results of one cell for one area range.
pub(super) struct AreaEval {
    pub(super) flags: Vec<DetFlags>,
    /// Number of non-ignored ground truths (pycocotools' `gtIgnore == 0`).
    pub(super) npig: usize,
}

/// pycocotools' `evaluateImg` output for one cell and all four area ranges.
pub(super) struct CellEval {
    /// Scores of the kept detections, highest first.
    pub(super) scores: Vec<f64>,
    pub(super) areas: [AreaEval; A],
}

/// Stable descending sort by score (numpy `argsort(-scores, kind='mergesort')`).
pub(super) fn sort_by_score_desc<X>(items: &mut [X], score: impl Fn(&X) -> f64) {
    items.sort_by(|a, b| score(b).partial_cmp(&score(a)).unwrap_or(Ordering::Equal));
}

/// `evaluateImg` for one (category, image) pair at every area range.
fn evaluate_cell(gts: &[&GtBox], dets: &[&Detection], thresholds: &[f64; T]) -> CellEval {
    let mut dts = dets.to_vec();
    sort_by_score_desc(&mut dts, |d| d.score);
    dts.truncate(MAX_DET);
    let ious = iou_matrix(&dts, gts);
    let areas = AreaRange::VALUES.map(|area| match_area(&dts, gts, &ious, area, thresholds));
    CellEval {
        scores: dts.iter().map(|d| d.score).collect(),
        areas,
    }
}

/// IoU of every detection with every ground truth (row-major D×G), pycocotools' `bbIou`:
/// in double, from [x, y, w, h], with intersection over detection area for crowds.
fn iou_matrix(dts: &[&Detection], gts: &[&GtBox]) -> Vec<f64> {
    let mut out = Vec::with_capacity(dts.len() * gts.len());
    for d in dts {
        for g in gts {
            out.push(coco_iou(&d.bbox, &g.bbox, g.iscrowd));
        }
    }
    out
}

/// Greedy matching of one cell at one area range, for all IoU thresholds.
fn match_area(
    dts: &[&Detection],
    gts: &[&GtBox],
    ious: &[f64],
    area: AreaRange,
    thresholds: &[f64; T],
) -> AreaEval {
    // pycocotools' `ignore` is `iscrowd`; out-of-range boxes are ignored too.
    let ignore: Vec<bool> = gts
        .iter()
        .map(|g| g.iscrowd || area.excludes(g.area))
        .collect();
    // Stable sort with ignored ground truth last, as pycocotools does before matching.
    let mut order: Vec<usize> = (0..gts.len()).collect();
    order.sort_by_key(|&g| ignore[g]);
    let npig = ignore.iter().filter(|&&i| !i).count();
    let mut flags = vec![DetFlags::default(); dts.len()];
    let mut taken = vec![false; gts.len()];
    for (t, &threshold) in thresholds.iter().enumerate() {
        taken.fill(false);
        let bit = 1u16 << t;
        for (d, det) in dts.iter().enumerate() {
            let row = &ious[d * gts.len()..(d + 1) * gts.len()];
            let found = best_match(row, &order, &ignore, gts, &taken, threshold);
            let (matched, gt_ignored) = match found {
                Some(pos) => {
                    taken[pos] = true;
                    let g = order[pos];
                    // pycocotools records the gt id and tests it for non-zero.
                    (gts[g].id != 0, ignore[g])
                }
                None => (false, false),
            };
            let det_area = det.bbox[2] * det.bbox[3];
            let ignored = gt_ignored || (!matched && area.excludes(det_area));
            if ignored {
                continue;
            }
            if matched {
                flags[d].tp |= bit;
            } else {
                flags[d].fp |= bit;
            }
        }
    }
    AreaEval { flags, npig }
}

/// pycocotools' inner matching loop: the best (last on ties) ground truth, in `order`, with
/// IoU ≥ threshold that is free or a crowd, never moving from a regular to an ignored one.
/// Returns its position in `order`.
fn best_match(
    row: &[f64],
    order: &[usize],
    ignore: &[bool],
    gts: &[&GtBox],
    taken: &[bool],
    threshold: f64,
) -> Option<usize> {
    let mut best = threshold.min(1.0 - 1e-10);
    let mut found: Option<usize> = None;
    for (pos, &g) in order.iter().enumerate() {
        if taken[pos] && !gts[g].iscrowd {
            continue;
        }
        if let Some(prev) = found {
            if !ignore[order[prev]] && ignore[g] {
                break;
            }
        }
        if row[g] < best {
            continue;
        }
        best = row[g];
        found = Some(pos);
    }
    found
}
