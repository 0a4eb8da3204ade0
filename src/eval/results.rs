//! The accumulated results: the summary, per-class AP, PR curves, and their text tables.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::accumulate::mean_valid;
use super::{
    iou_thresholds, recall_thresholds, AreaRange, Category, EvalError, A, M, MAX_DETS, R, T,
};

/// The twelve numbers of pycocotools' `summarize()`; −1 where no category has ground truth.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// AP @[IoU=0.50:0.95, area=all, maxDets=100].
    #[serde(rename = "AP")]
    pub ap: f64,
    /// AP @[IoU=0.50, area=all, maxDets=100].
    #[serde(rename = "AP50")]
    pub ap50: f64,
    /// AP @[IoU=0.75, area=all, maxDets=100].
    #[serde(rename = "AP75")]
    pub ap75: f64,
    /// AP for small objects.
    #[serde(rename = "APs")]
    pub ap_small: f64,
    /// AP for medium objects.
    #[serde(rename = "APm")]
    pub ap_medium: f64,
    /// AP for large objects.
    #[serde(rename = "APl")]
    pub ap_large: f64,
    /// AR with one detection per image.
    #[serde(rename = "AR1")]
    pub ar1: f64,
    /// AR with ten detections per image.
    #[serde(rename = "AR10")]
    pub ar10: f64,
    /// AR with 100 detections per image.
    #[serde(rename = "AR100")]
    pub ar100: f64,
    /// AR for small objects.
    #[serde(rename = "ARs")]
    pub ar_small: f64,
    /// AR for medium objects.
    #[serde(rename = "ARm")]
    pub ar_medium: f64,
    /// AR for large objects.
    #[serde(rename = "ARl")]
    pub ar_large: f64,
}

impl Summary {
    /// Short names in pycocotools' order, as used for JSON keys.
    pub const NAMES: [&'static str; 12] = [
        "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
    ];

    /// The values in pycocotools' `stats` order.
    pub fn values(&self) -> [f64; 12] {
        [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar1,
            self.ar10,
            self.ar100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]
    }
}

/// Per-category results.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassAp {
    /// Category id.
    pub category_id: i64,
    /// Category name.
    pub name: String,
    /// AP @[IoU=0.50:0.95, area=all, maxDets=100], −1 without ground truth.
    pub ap: f64,
    /// AP @[IoU=0.50, area=all, maxDets=100], −1 without ground truth.
    pub ap50: f64,
    /// Non-crowd ground-truth boxes on evaluated images.
    pub num_gt: usize,
    /// Detections of this category.
    pub num_dets: usize,
}

/// A precision–recall curve sampled at the 101 recall thresholds.
#[derive(Clone, Debug, PartialEq)]
pub struct PrCurve {
    /// The IoU threshold it was computed at.
    pub iou_threshold: f64,
    /// The recall thresholds 0, 0.01, …, 1.
    pub recall: Vec<f64>,
    /// Interpolated precision at each recall threshold (0 beyond the highest recall reached).
    pub precision: Vec<f64>,
}

/// The accumulated results: pycocotools' `eval['precision']`, `eval['recall']` and `stats`.
#[derive(Clone, Debug)]
pub struct Evaluation {
    pub(super) categories: Vec<Category>,
    /// T×R×K×A×M, row-major, −1 where a category has no ground truth.
    pub(super) precision: Vec<f64>,
    /// T×K×A×M, row-major, −1 where a category has no ground truth.
    pub(super) recall: Vec<f64>,
    pub(super) summary: Summary,
    /// (non-crowd ground truths, detections) per category.
    pub(super) counts: Vec<(usize, usize)>,
}

impl Evaluation {
    /// The twelve summary numbers.
    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The evaluated categories (the `K` axis), sorted by id.
    pub fn categories(&self) -> &[Category] {
        &self.categories
    }

    /// Precision, row-major over `precision_shape()` = [T, R, K, A, M] as in pycocotools.
    pub fn precision(&self) -> &[f64] {
        &self.precision
    }

    /// Recall, row-major over `recall_shape()` = [T, K, A, M] as in pycocotools.
    pub fn recall(&self) -> &[f64] {
        &self.recall
    }

    /// Shape of `precision()`: [T, R, K, A, M].
    pub fn precision_shape(&self) -> [usize; 5] {
        [T, R, self.categories.len(), A, M]
    }

    /// Shape of `recall()`: [T, K, A, M].
    pub fn recall_shape(&self) -> [usize; 4] {
        [T, self.categories.len(), A, M]
    }

    fn k_len(&self) -> usize {
        self.categories.len()
    }

    fn p_at(&self, t: usize, r: usize, k: usize, a: usize, m: usize) -> f64 {
        self.precision[(((t * R + r) * self.k_len() + k) * A + a) * M + m]
    }

    /// AP and AP50 per category, computed the usual way from the precision array
    /// (mean over valid entries of `precision[:, :, k, all, 100]`, −1 if none).
    pub fn per_class(&self) -> Vec<ClassAp> {
        let m = M - 1;
        let a = AreaRange::All.index();
        self.categories
            .iter()
            .enumerate()
            .map(|(k, cat)| {
                let all = (0..T).flat_map(|t| (0..R).map(move |r| (t, r)));
                let ap = mean_valid(all.map(|(t, r)| self.p_at(t, r, k, a, m)));
                let ap50 = mean_valid((0..R).map(|r| self.p_at(0, r, k, a, m)));
                ClassAp {
                    category_id: cat.id,
                    name: cat.name.clone(),
                    ap,
                    ap50,
                    num_gt: self.counts[k].0,
                    num_dets: self.counts[k].1,
                }
            })
            .collect()
    }

    /// The PR curve of one category at IoU threshold index `iou_index` (0 → 0.50, 5 → 0.75),
    /// area range and `maxDets` value (1, 10 or 100); `None` when the category has no ground truth.
    pub fn pr_curve(
        &self,
        iou_index: usize,
        category_id: i64,
        area: AreaRange,
        max_dets: usize,
    ) -> Result<Option<PrCurve>, EvalError> {
        let (t, m) = check_selection(iou_index, max_dets)?;
        let k = self
            .categories
            .binary_search_by_key(&category_id, |c| c.id)
            .map_err(|_| EvalError::NoSuchCategory(category_id))?;
        let precision: Vec<f64> = (0..R)
            .map(|r| self.p_at(t, r, k, area.index(), m))
            .collect();
        Ok((precision[0] > -1.0).then(|| curve(t, precision)))
    }

    /// The class-averaged PR curve (mean over categories with ground truth) at IoU threshold
    /// index `iou_index`, area range and `maxDets` value; `None` when no category has ground truth.
    pub fn mean_pr_curve(
        &self,
        iou_index: usize,
        area: AreaRange,
        max_dets: usize,
    ) -> Result<Option<PrCurve>, EvalError> {
        let (t, m) = check_selection(iou_index, max_dets)?;
        let a = area.index();
        let valid: Vec<usize> = (0..self.k_len())
            .filter(|&k| self.p_at(t, 0, k, a, m) > -1.0)
            .collect();
        if valid.is_empty() {
            return Ok(None);
        }
        let precision = (0..R)
            .map(|r| mean_valid(valid.iter().map(|&k| self.p_at(t, r, k, a, m))))
            .collect();
        Ok(Some(curve(t, precision)))
    }
}

fn curve(t: usize, precision: Vec<f64>) -> PrCurve {
    PrCurve {
        iou_threshold: iou_thresholds()[t],
        recall: recall_thresholds().to_vec(),
        precision,
    }
}

fn check_selection(iou_index: usize, max_dets: usize) -> Result<(usize, usize), EvalError> {
    if iou_index >= T {
        return Err(EvalError::InvalidSelection {
            what: "IoU threshold index",
            value: iou_index,
            allowed: format!("0..{T}"),
        });
    }
    let m = MAX_DETS
        .iter()
        .position(|&v| v == max_dets)
        .ok_or_else(|| EvalError::InvalidSelection {
            what: "maxDets",
            value: max_dets,
            allowed: format!("{MAX_DETS:?}"),
        })?;
    Ok((iou_index, m))
}

/// The twelve summary lines exactly as pycocotools' `summarize()` prints them, each ending
/// with a newline.
pub fn format_summary(summary: &Summary) -> String {
    let lines: [(bool, Option<&str>, AreaRange, usize); 12] = [
        (true, None, AreaRange::All, 100),
        (true, Some("0.50"), AreaRange::All, 100),
        (true, Some("0.75"), AreaRange::All, 100),
        (true, None, AreaRange::Small, 100),
        (true, None, AreaRange::Medium, 100),
        (true, None, AreaRange::Large, 100),
        (false, None, AreaRange::All, 1),
        (false, None, AreaRange::All, 10),
        (false, None, AreaRange::All, 100),
        (false, None, AreaRange::Small, 100),
        (false, None, AreaRange::Medium, 100),
        (false, None, AreaRange::Large, 100),
    ];
    let mut out = String::new();
    for ((is_ap, iou, area, max_dets), value) in lines.iter().zip(summary.values()) {
        // ' {:<18} {} @[ IoU={:<9} | area={:>6s} | maxDets={:>3d} ] = {:0.3f}'
        let (title, kind) = if *is_ap {
            ("Average Precision", "(AP)")
        } else {
            ("Average Recall", "(AR)")
        };
        let iou = iou.unwrap_or("0.50:0.95");
        let _ = writeln!(
            out,
            " {title:<18} {kind} @[ IoU={iou:<9} | area={:>6} | maxDets={max_dets:>3} ] = {value:.3}",
            area.label()
        );
    }
    out
}

/// A per-category table: name, id, non-crowd ground truths, detections, AP and AP50
/// (−1.000 where the category has no ground truth).
pub fn format_per_class(classes: &[ClassAp]) -> String {
    let width = classes
        .iter()
        .map(|c| c.name.chars().count())
        .max()
        .unwrap_or(0)
        .max("category".len());
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<width$} {:>8} {:>8} {:>8} {:>7} {:>7}",
        "category", "id", "gt", "dets", "AP", "AP50"
    );
    for c in classes {
        let _ = writeln!(
            out,
            "{:<width$} {:>8} {:>8} {:>8} {:>7.3} {:>7.3}",
            c.name, c.category_id, c.num_gt, c.num_dets, c.ap, c.ap50
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_format_matches_pycocotools() {
        let s = Summary {
            ap: 0.5045806987249628,
            ap50: 0.6969727247299577,
            ap75: 0.5729816669904824,
            ap_small: 0.5856257209410443,
            ap_medium: 0.5193996948036719,
            ap_large: -1.0,
            ar1: 0.38681277964578054,
            ar10: 0.5936795762842003,
            ar100: 0.595352982877607,
            ar_small: 0.6398109626113442,
            ar_medium: 0.5664205978994309,
            ar_large: 0.5642905982905982,
        };
        let text = format_summary(&s);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 0.505"
        );
        assert_eq!(
            lines[1],
            " Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ] = 0.697"
        );
        assert_eq!(
            lines[5],
            " Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ] = -1.000"
        );
        assert_eq!(
            lines[6],
            " Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ] = 0.387"
        );
        assert_eq!(
            lines[10],
            " Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ] = 0.566"
        );
    }
}
