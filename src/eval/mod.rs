//! COCO box evaluation, numerically identical to pycocotools' `COCOeval` with `iouType="bbox"`.
//!
//! The numbers match pycocotools 2.0.x exactly (not just approximately): the same IoU and recall
//! thresholds (bit-identical to its `np.linspace` values), the same area ranges, stable score
//! sorting with the same tie order, the same greedy matching with crowd and out-of-range ground
//! truth, the same precision interpolation, and numpy's pairwise summation for the averages.
//!
//! Semantics carried over from pycocotools on purpose, including its quirks:
//! - Images are the ground truth's `images`, categories its `categories`; ground-truth
//!   annotations on other images or categories are skipped.
//! - A ground-truth box is ignored when it is a crowd or its `area` field is outside the area
//!   range. The `ignore` field is read but, as in pycocotools (which overwrites it with
//!   `iscrowd`), it has no effect.
//! - A detection's area is `w * h` (pycocotools' `loadRes`); detections are never crowds.
//! - A detection matched to a ground-truth annotation whose `id` is 0 counts as unmatched,
//!   because pycocotools stores the matched id and tests it for non-zero.
//!
//! Unlike pycocotools, detections on unknown images *or* categories, malformed boxes and
//! non-finite scores are errors, and an empty detection list is allowed.
//!
//! JSON numbers are parsed by `serde_json`; without its `float_roundtrip` feature a literal with
//! 17 significant digits can come out one ulp off, which could only change a result for an IoU or
//! area that ties a threshold exactly.
//!
//! The files follow pycocotools' steps: `coco_json` reads the documents, `matching` is
//! `evaluateImg` (IoU from [`crate::boxes::coco_iou`]), `accumulate` is `accumulate` and
//! `summarize`, and `results` holds the [`Evaluation`] and its text tables.

use std::path::PathBuf;

use rayon::prelude::*;

use crate::boxes::xyxy_to_xywh;

use accumulate::{accumulate, assemble, summarize, Accumulated};
use matching::{category_ranges, evaluate_cells, group_cells};

mod accumulate;
mod coco_json;
mod matching;
mod results;

pub use coco_json::{detections_from_json_file, detections_from_json_str};
pub use results::{format_per_class, format_summary, ClassAp, Evaluation, PrCurve, Summary};

mod model;
pub use model::{evaluate_model, predictions};

/// Number of IoU thresholds (pycocotools' `T`).
pub const NUM_IOU_THRESHOLDS: usize = 10;
/// Number of recall thresholds (pycocotools' `R`).
pub const NUM_RECALL_THRESHOLDS: usize = 101;
/// Number of area ranges (pycocotools' `A`).
pub const NUM_AREA_RANGES: usize = 4;
/// The `maxDets` settings: detections kept per image and category (pycocotools' `M` values).
pub const MAX_DETS: [usize; 3] = [1, 10, 100];

const T: usize = NUM_IOU_THRESHOLDS;
const R: usize = NUM_RECALL_THRESHOLDS;
const A: usize = NUM_AREA_RANGES;
const M: usize = MAX_DETS.len();
/// Detections kept per image and category before matching (`maxDets[-1]`).
const MAX_DET: usize = MAX_DETS[M - 1];

/// Errors from reading inputs and evaluating.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A file could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        error: std::io::Error,
    },
    /// A JSON document could not be parsed into the expected structure.
    #[error("{what}: invalid JSON: {error}")]
    Json {
        /// What was being parsed (a file name or a description).
        what: String,
        /// The underlying error, with line and column.
        error: serde_json::Error,
    },
    /// A detection refers to an image that is not in the ground truth.
    #[error("detection {index}: image_id {image_id} is not an image of the ground truth")]
    UnknownImage {
        /// Position of the detection in its list.
        index: usize,
        /// The unknown image id.
        image_id: i64,
    },
    /// A detection refers to a category that is not in the ground truth.
    #[error("detection {index}: category_id {category_id} is not a category of the ground truth")]
    UnknownCategory {
        /// Position of the detection in its list.
        index: usize,
        /// The unknown category id.
        category_id: i64,
    },
    /// A box is not four finite numbers `[x, y, w, h]` with `w, h >= 0`.
    #[error("{what} {index}: malformed bbox: {reason}")]
    InvalidBox {
        /// `"detection"` or `"annotation"`.
        what: &'static str,
        /// Position of the entry in its list.
        index: usize,
        /// What is wrong with the box.
        reason: String,
    },
    /// A detection score is NaN, infinite or null.
    #[error("detection {index}: score {score} is not a finite number")]
    InvalidScore {
        /// Position of the detection in its list.
        index: usize,
        /// The score (NaN stands for a JSON `null` or `NaN`).
        score: f64,
    },
    /// A ground-truth area is NaN or infinite.
    #[error("annotation {index}: area {area} is not a finite number")]
    InvalidArea {
        /// Position of the annotation in its list.
        index: usize,
        /// The area.
        area: f64,
    },
    /// Two ground-truth annotations share an id (pycocotools would silently evaluate one twice).
    #[error("annotation {index}: id {id} is already used by an earlier annotation")]
    DuplicateAnnotationId {
        /// Position of the second annotation in its list.
        index: usize,
        /// The repeated id.
        id: i64,
    },
    /// A result accessor was asked for a category that is not evaluated.
    #[error("category_id {0} is not a category of this evaluation")]
    NoSuchCategory(i64),
    /// A result accessor was given an IoU threshold index or `maxDets` value that does not exist.
    #[error("{what} {value} is not one of {allowed}")]
    InvalidSelection {
        /// `"IoU threshold index"` or `"maxDets"`.
        what: &'static str,
        /// The value given.
        value: usize,
        /// The accepted values.
        allowed: String,
    },
    /// A ground-truth document lacks what an evaluation needs (categories).
    #[error("{what}: {message}")]
    Incomplete {
        /// The document (a file name or a description).
        what: String,
        /// What is missing.
        message: String,
    },
}

/// The ten IoU thresholds 0.50:0.05:0.95, bit-identical to `np.linspace(.5, 0.95, 10)`.
pub fn iou_thresholds() -> [f64; T] {
    linspace(0.5, 0.95)
}

/// The 101 recall thresholds 0:0.01:1, bit-identical to `np.linspace(.0, 1.00, 101)`.
pub fn recall_thresholds() -> [f64; R] {
    linspace(0.0, 1.0)
}

/// numpy's linspace arithmetic: `i * step + start`, with the last element set to `stop`.
fn linspace<const N: usize>(start: f64, stop: f64) -> [f64; N] {
    let step = (stop - start) / (N - 1) as f64;
    std::array::from_fn(|i| {
        if i == N - 1 {
            stop
        } else {
            i as f64 * step + start
        }
    })
}

/// Index of an IoU threshold (e.g. 0.5 → 0, 0.75 → 5), or `None` if it is not one of the ten.
pub fn iou_index(threshold: f64) -> Option<usize> {
    iou_thresholds()
        .iter()
        .position(|&t| (t - threshold).abs() < 1e-9)
}

/// A COCO object-size range, by the ground truth's `area` field (a detection's `w * h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AreaRange {
    /// Every size: `[0, 1e10]`.
    All,
    /// `[0, 32²]`.
    Small,
    /// `[32², 96²]`.
    Medium,
    /// `[96², 1e10]`.
    Large,
}

impl AreaRange {
    /// The four ranges in pycocotools' order.
    pub const VALUES: [AreaRange; A] = [Self::All, Self::Small, Self::Medium, Self::Large];

    /// Inclusive bounds, as pycocotools' `areaRng`.
    pub fn bounds(self) -> (f64, f64) {
        match self {
            Self::All => (0.0, 1e10),
            Self::Small => (0.0, 1024.0),
            Self::Medium => (1024.0, 9216.0),
            Self::Large => (9216.0, 1e10),
        }
    }

    /// pycocotools' label: `all`, `small`, `medium` or `large`.
    pub fn label(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Small => "small",
            Self::Medium => "medium",
            Self::Large => "large",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Written as pycocotools' test `area < lo or area > hi` so that edge cases agree.
    fn excludes(self, area: f64) -> bool {
        let (lo, hi) = self.bounds();
        area < lo || area > hi
    }
}

/// A ground-truth category.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Category {
    /// COCO `id`.
    pub id: i64,
    /// COCO `name` (empty when absent).
    pub name: String,
}

/// One ground-truth annotation.
#[derive(Clone, Debug, PartialEq)]
pub struct GtBox {
    /// Annotation `id` (0 is legal but never counts as a match, as in pycocotools).
    pub id: i64,
    /// The image it belongs to.
    pub image_id: i64,
    /// Its category.
    pub category_id: i64,
    /// `[x, y, w, h]` in pixels.
    pub bbox: [f64; 4],
    /// The area deciding the area range (COCO stores the mask area here, not `w * h`).
    pub area: f64,
    /// Crowd region: matches any number of detections, by intersection over detection area.
    pub iscrowd: bool,
    /// COCO's optional `ignore` flag; pycocotools overwrites it with `iscrowd`, so it has no effect.
    pub ignore: bool,
}

impl GtBox {
    /// A non-crowd box whose area is `w * h`.
    pub fn new(id: i64, image_id: i64, category_id: i64, bbox: [f64; 4]) -> Self {
        Self {
            id,
            image_id,
            category_id,
            bbox,
            area: bbox[2] * bbox[3],
            iscrowd: false,
            ignore: false,
        }
    }
}

/// One detection, as an entry of a COCO results file.
///
/// It stays a type apart from the model's [`crate::Detection`] (a box `[x1, y1, x2, y2]` in
/// f32 and a class index, within one image): pycocotools reads image ids, category ids and
/// `[x, y, w, h]` in doubles. [`Detection::from_model`] converts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detection {
    /// The image it was found in.
    pub image_id: i64,
    /// Its predicted category.
    pub category_id: i64,
    /// `[x, y, w, h]` in pixels.
    pub bbox: [f64; 4],
    /// Confidence; higher ranks first.
    pub score: f64,
}

impl Detection {
    /// A detection from its parts.
    pub fn new(image_id: i64, category_id: i64, bbox: [f64; 4], score: f64) -> Self {
        Self {
            image_id,
            category_id,
            bbox,
            score,
        }
    }

    /// The results entry of a model's detection on image `image_id`, its label taken as the
    /// category id; the width and height are computed in f64 from the f32 corners.
    pub fn from_model(image_id: i64, det: &crate::Detection) -> Self {
        let bbox = xyxy_to_xywh(det.bbox.map(f64::from));
        Self::new(image_id, det.label as i64, bbox, f64::from(det.score))
    }
}

/// Ground truth: the evaluated images and categories, and the annotations.
#[derive(Clone, Debug, PartialEq)]
pub struct GroundTruth {
    images: Vec<i64>,
    categories: Vec<Category>,
    annotations: Vec<GtBox>,
}

impl GroundTruth {
    /// Builds ground truth from Rust values. Image and category ids are sorted and deduplicated
    /// (a repeated category keeps its last name, like pycocotools' index); boxes and areas are
    /// checked and annotation ids must be unique.
    pub fn new(
        images: impl IntoIterator<Item = i64>,
        categories: Vec<Category>,
        annotations: Vec<GtBox>,
    ) -> Result<Self, EvalError> {
        let mut images: Vec<i64> = images.into_iter().collect();
        images.sort_unstable();
        images.dedup();
        let mut categories = categories;
        // Stable sort, then keep the last of each id.
        categories.sort_by_key(|c| c.id);
        let mut unique: Vec<Category> = Vec::with_capacity(categories.len());
        for cat in categories {
            match unique.last_mut() {
                Some(last) if last.id == cat.id => *last = cat,
                _ => unique.push(cat),
            }
        }
        validate_annotations(&annotations)?;
        Ok(Self {
            images,
            categories: unique,
            annotations,
        })
    }

    /// Evaluated image ids, sorted.
    pub fn images(&self) -> &[i64] {
        &self.images
    }

    /// Evaluated categories, sorted by id.
    pub fn categories(&self) -> &[Category] {
        &self.categories
    }

    /// All annotations, in input order.
    pub fn annotations(&self) -> &[GtBox] {
        &self.annotations
    }

    fn image_index(&self, id: i64) -> Option<usize> {
        self.images.binary_search(&id).ok()
    }

    fn category_index(&self, id: i64) -> Option<usize> {
        self.categories.binary_search_by_key(&id, |c| c.id).ok()
    }
}

fn check_box(bbox: &[f64; 4], what: &'static str, index: usize) -> Result<(), EvalError> {
    let invalid = |reason: String| EvalError::InvalidBox {
        what,
        index,
        reason,
    };
    if let Some(pos) = bbox.iter().position(|v| !v.is_finite()) {
        return Err(invalid(format!(
            "value {pos} of {bbox:?} is not a finite number"
        )));
    }
    if bbox[2] < 0.0 || bbox[3] < 0.0 {
        return Err(invalid(format!("negative width or height in {bbox:?}")));
    }
    Ok(())
}

fn validate_annotations(annotations: &[GtBox]) -> Result<(), EvalError> {
    let mut ids: Vec<(i64, usize)> = Vec::with_capacity(annotations.len());
    for (index, a) in annotations.iter().enumerate() {
        check_box(&a.bbox, "annotation", index)?;
        if !a.area.is_finite() {
            return Err(EvalError::InvalidArea {
                index,
                area: a.area,
            });
        }
        ids.push((a.id, index));
    }
    ids.sort_unstable();
    match ids.windows(2).find(|w| w[0].0 == w[1].0) {
        Some(w) => Err(EvalError::DuplicateAnnotationId {
            index: w[1].1,
            id: w[1].0,
        }),
        None => Ok(()),
    }
}

/// Checks that every detection is on a known image and category, with a valid box and score.
/// The first offending detection (by position) is reported.
pub fn validate_detections(gt: &GroundTruth, dets: &[Detection]) -> Result<(), EvalError> {
    for (index, d) in dets.iter().enumerate() {
        if gt.image_index(d.image_id).is_none() {
            return Err(EvalError::UnknownImage {
                index,
                image_id: d.image_id,
            });
        }
        if gt.category_index(d.category_id).is_none() {
            return Err(EvalError::UnknownCategory {
                index,
                category_id: d.category_id,
            });
        }
        check_box(&d.bbox, "detection", index)?;
        if !d.score.is_finite() {
            return Err(EvalError::InvalidScore {
                index,
                score: d.score,
            });
        }
    }
    Ok(())
}

/// Evaluates detections against ground truth exactly as pycocotools'
/// `COCOeval(gt, dt, "bbox")`'s `evaluate()`, `accumulate()` and `summarize()`.
pub fn evaluate(gt: &GroundTruth, dets: &[Detection]) -> Result<Evaluation, EvalError> {
    validate_detections(gt, dets)?;
    let grouped = group_cells(gt, dets);
    let cells = evaluate_cells(gt, dets, &grouped);
    let k_len = gt.categories.len();
    let ranges = category_ranges(&grouped.cells, k_len);
    let recall_thr = recall_thresholds();
    // Categories and maxDets settings are independent: one parallel job each.
    let jobs: Vec<(usize, usize)> = (0..k_len)
        .flat_map(|k| (0..M).map(move |m| (k, m)))
        .collect();
    let results: Vec<[Option<Box<Accumulated>>; A]> = jobs
        .par_iter()
        .map(|&(k, m)| accumulate(&cells[ranges[k].clone()], MAX_DETS[m], &recall_thr))
        .collect();
    let (precision, recall) = assemble(k_len, &jobs, &results);
    let counts = ranges
        .iter()
        .map(|range| {
            let num_gt = cells[range.clone()].iter().map(|c| c.areas[0].npig).sum();
            let num_dets = grouped.cells[range.clone()]
                .iter()
                .map(|c| c.dets.len())
                .sum();
            (num_gt, num_dets)
        })
        .collect();
    let summary = summarize(&precision, &recall, k_len);
    Ok(Evaluation {
        categories: gt.categories.clone(),
        precision,
        recall,
        summary,
        counts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_gt() -> GroundTruth {
        let cats = [(1, "a"), (3, "b")].map(|(id, name)| Category {
            id,
            name: name.into(),
        });
        let anns = vec![
            GtBox::new(1, 10, 1, [0.0, 0.0, 10.0, 10.0]),
            GtBox::new(2, 11, 3, [5.0, 5.0, 50.0, 40.0]),
        ];
        GroundTruth::new([10, 11, 12], cats.to_vec(), anns).unwrap()
    }

    #[test]
    fn thresholds_match_numpy_linspace() {
        let t = iou_thresholds();
        // Bits printed by numpy 2.4 for np.linspace(.5, 0.95, 10).
        assert_eq!(t[1].to_bits(), 0x3fe199999999999a);
        assert_eq!(t[8].to_bits(), 0x3feccccccccccccc);
        assert_eq!(t[5], 0.75);
        assert_eq!(iou_index(0.75), Some(5));
        let r = recall_thresholds();
        assert!((0..100).all(|i| r[i] == i as f64 * 0.01));
        assert_eq!(r[100], 1.0);
    }

    #[test]
    fn perfect_detections_give_ap_one() {
        let gt = small_gt();
        let dets = [
            Detection::new(10, 1, [0.0, 0.0, 10.0, 10.0], 0.9),
            Detection::new(11, 3, [5.0, 5.0, 50.0, 40.0], 0.8),
        ];
        let e = evaluate(&gt, &dets).unwrap();
        // pycocotools divides by tp + fp + eps, so a perfect score is 1 - 2^-52.
        assert_eq!(e.summary().ap, 1.0 / (1.0 + f64::EPSILON));
        assert_eq!(e.summary().ap_large, -1.0);
        let curve = e.mean_pr_curve(0, AreaRange::All, 100).unwrap().unwrap();
        assert!(curve.precision.iter().all(|&p| (p - 1.0).abs() < 1e-12));
    }

    #[test]
    fn curve_accessors_check_their_arguments() {
        let dets = [Detection::new(10, 1, [0.0, 0.0, 10.0, 10.0], 0.9)];
        let e = evaluate(&small_gt(), &dets).unwrap();
        let curve = e.pr_curve(5, 1, AreaRange::All, 100).unwrap().unwrap();
        assert_eq!(curve.iou_threshold, 0.75);
        assert_eq!(curve.precision.len(), NUM_RECALL_THRESHOLDS);
        // Category 3 has ground truth but no detection: a curve of zeros.
        let zeros = e.pr_curve(0, 3, AreaRange::All, 100).unwrap().unwrap();
        assert!(zeros.precision.iter().all(|&p| p == 0.0));
        assert!(e.pr_curve(0, 1, AreaRange::Large, 100).unwrap().is_none());
        assert!(matches!(
            e.pr_curve(0, 2, AreaRange::All, 100),
            Err(EvalError::NoSuchCategory(2))
        ));
        assert!(e.pr_curve(10, 1, AreaRange::All, 100).is_err());
        assert!(e.mean_pr_curve(0, AreaRange::All, 5).is_err());
    }

    #[test]
    fn model_detections_become_coco_entries() {
        let det = crate::Detection {
            bbox: [1.5, 2.0, 11.25, 32.0],
            score: 0.75,
            label: 3,
        };
        let d = Detection::from_model(12, &det);
        assert_eq!(d, Detection::new(12, 3, [1.5, 2.0, 9.75, 30.0], 0.75));
    }

    #[test]
    fn duplicate_annotation_ids_are_rejected() {
        let anns = vec![
            GtBox::new(4, 10, 1, [0.0, 0.0, 1.0, 1.0]),
            GtBox::new(4, 11, 1, [0.0, 0.0, 1.0, 1.0]),
        ];
        let err = GroundTruth::new([10, 11], vec![], anns).unwrap_err();
        assert!(err.to_string().contains("annotation 1: id 4"), "{err}");
    }

    #[test]
    fn no_detections_give_zero() {
        let e = evaluate(&small_gt(), &[]).unwrap();
        assert_eq!(e.summary().ap, 0.0);
        assert_eq!(e.summary().ar100, 0.0);
    }
}
