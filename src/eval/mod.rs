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

use std::cmp::Ordering;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{de, Deserialize, Deserializer, Serialize};

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

    /// Parses a COCO ground-truth document (`images`, `annotations`, `categories`). An
    /// annotation without `area` gets `w * h`; `iscrowd` and `ignore` default to 0.
    pub fn from_json_str(text: &str) -> Result<Self, EvalError> {
        Self::parse(text, "ground truth")
    }

    /// Reads and parses a COCO ground-truth file; errors name the file.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self, EvalError> {
        let path = path.as_ref();
        let text = read_file(path)?;
        Self::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, what: &str) -> Result<Self, EvalError> {
        let raw: RawGroundTruth = parse_json(text, what)?;
        let annotations = raw
            .annotations
            .into_iter()
            .enumerate()
            .map(|(index, a)| a.into_gt_box(index))
            .collect::<Result<Vec<_>, _>>()?;
        let categories = raw
            .categories
            .into_iter()
            .map(|c| Category {
                id: c.id,
                name: c.name.unwrap_or_default(),
            })
            .collect();
        Self::new(
            raw.images.into_iter().map(|i| i.id),
            categories,
            annotations,
        )
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

/// Parses a COCO results document: `[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]`.
/// Python's `NaN`/`Infinity` tokens are accepted here and reported as non-finite numbers.
pub fn detections_from_json_str(text: &str) -> Result<Vec<Detection>, EvalError> {
    parse_detections(text, "detections")
}

/// Reads and parses a COCO results file; errors name the file.
pub fn detections_from_json_file(path: impl AsRef<Path>) -> Result<Vec<Detection>, EvalError> {
    let path = path.as_ref();
    let text = read_file(path)?;
    parse_detections(&text, &path.display().to_string())
}

fn parse_detections(text: &str, what: &str) -> Result<Vec<Detection>, EvalError> {
    let raw: Vec<RawDetection> = parse_json(text, what)?;
    raw.into_iter()
        .enumerate()
        .map(|(index, d)| d.into_detection(index))
        .collect()
}

fn read_file(path: &Path) -> Result<String, EvalError> {
    std::fs::read_to_string(path).map_err(|error| EvalError::Io {
        path: path.to_path_buf(),
        error,
    })
}

/// Parses JSON; if that fails and the text holds Python's non-finite tokens, retries with them
/// turned into `null` so that the offending entry can be named.
fn parse_json<T: de::DeserializeOwned>(text: &str, what: &str) -> Result<T, EvalError> {
    serde_json::from_str(text).or_else(|error| {
        nulls_for_non_finite(text)
            .and_then(|fixed| serde_json::from_str(&fixed).ok())
            .ok_or_else(|| EvalError::Json {
                what: what.to_string(),
                error,
            })
    })
}

/// Replaces `NaN`, `Infinity` and `-Infinity` outside strings by `null`; `None` if there are none.
fn nulls_for_non_finite(text: &str) -> Option<String> {
    const TOKENS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let (mut i, mut copied) = (0, 0);
    let (mut in_string, mut escaped) = (false, false);
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
        } else if b == b'"' {
            in_string = true;
        } else if let Some(token) = TOKENS.iter().find(|t| bytes[i..].starts_with(t.as_bytes())) {
            out.push_str(&text[copied..i]);
            out.push_str("null");
            i += token.len();
            copied = i;
            continue;
        }
        i += 1;
    }
    if copied == 0 {
        return None;
    }
    out.push_str(&text[copied..]);
    Some(out)
}

#[derive(Deserialize)]
struct RawGroundTruth {
    images: Vec<RawImage>,
    #[serde(default)]
    annotations: Vec<RawAnnotation>,
    categories: Vec<RawCategory>,
}

#[derive(Deserialize)]
struct RawImage {
    id: i64,
}

#[derive(Deserialize)]
struct RawCategory {
    id: i64,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct RawAnnotation {
    id: i64,
    image_id: i64,
    category_id: i64,
    bbox: Vec<Option<f64>>,
    #[serde(default)]
    area: Option<f64>,
    #[serde(default)]
    iscrowd: Flag,
    #[serde(default)]
    ignore: Flag,
}

impl RawAnnotation {
    fn into_gt_box(self, index: usize) -> Result<GtBox, EvalError> {
        let bbox = box_from_json(&self.bbox, "annotation", index)?;
        Ok(GtBox {
            id: self.id,
            image_id: self.image_id,
            category_id: self.category_id,
            bbox,
            area: self.area.unwrap_or(bbox[2] * bbox[3]),
            iscrowd: self.iscrowd.0,
            ignore: self.ignore.0,
        })
    }
}

#[derive(Deserialize)]
struct RawDetection {
    image_id: i64,
    category_id: i64,
    bbox: Vec<Option<f64>>,
    // Required but nullable: a missing score is a parse error, a null one a non-finite score.
    #[serde(deserialize_with = "nullable_f64")]
    score: Option<f64>,
}

impl RawDetection {
    fn into_detection(self, index: usize) -> Result<Detection, EvalError> {
        let bbox = box_from_json(&self.bbox, "detection", index)?;
        let score = self.score.unwrap_or(f64::NAN);
        if !score.is_finite() {
            return Err(EvalError::InvalidScore { index, score });
        }
        Ok(Detection::new(self.image_id, self.category_id, bbox, score))
    }
}

fn nullable_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Option::<f64>::deserialize(d)
}

/// A COCO 0/1 flag, accepted as a number or a boolean; any non-zero number is true, like
/// pycocotools' truth test.
#[derive(Clone, Copy, Default)]
struct Flag(bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct FlagVisitor;
        impl de::Visitor<'_> for FlagVisitor {
            type Value = Flag;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("0, 1 or a boolean")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Flag, E> {
                Ok(Flag(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Flag, E> {
                Ok(Flag(v != 0))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Flag, E> {
                Ok(Flag(v != 0))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Flag, E> {
                Ok(Flag(v != 0.0))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Flag, E> {
                Ok(Flag(false))
            }
        }
        d.deserialize_any(FlagVisitor)
    }
}

/// Converts a JSON box; nulls (from NaN/Infinity tokens) become NaN and fail the box check.
fn box_from_json(
    values: &[Option<f64>],
    what: &'static str,
    index: usize,
) -> Result<[f64; 4], EvalError> {
    let bbox: [Option<f64>; 4] = values.try_into().map_err(|_| EvalError::InvalidBox {
        what,
        index,
        reason: format!("expected 4 numbers [x, y, w, h], got {}", values.len()),
    })?;
    let bbox = bbox.map(|v| v.unwrap_or(f64::NAN));
    check_box(&bbox, what, index)?;
    Ok(bbox)
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
    categories: Vec<Category>,
    /// T×R×K×A×M, row-major, −1 where a category has no ground truth.
    precision: Vec<f64>,
    /// T×K×A×M, row-major, −1 where a category has no ground truth.
    recall: Vec<f64>,
    summary: Summary,
    counts: Vec<(usize, usize)>,
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

/// numpy's `np.mean(s[s > -1])`, or −1 when nothing is valid.
fn mean_valid(values: impl Iterator<Item = f64>) -> f64 {
    let valid: Vec<f64> = values.filter(|&v| v > -1.0).collect();
    if valid.is_empty() {
        -1.0
    } else {
        pairwise_sum(&valid) / valid.len() as f64
    }
}

/// numpy's pairwise summation (`add.reduce` on a contiguous float64 array), so that the means
/// agree with pycocotools to the last bit.
fn pairwise_sum(a: &[f64]) -> f64 {
    const BLOCK: usize = 128;
    let n = a.len();
    if n < 8 {
        a.iter().fold(0.0, |s, &v| s + v)
    } else if n <= BLOCK {
        let mut r = [0.0; 8];
        r.copy_from_slice(&a[..8]);
        let full = n - n % 8;
        for chunk in a[8..full].chunks_exact(8) {
            for (acc, &v) in r.iter_mut().zip(chunk) {
                *acc += v;
            }
        }
        let head = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        a[full..].iter().fold(head, |s, &v| s + v)
    } else {
        let half = n / 2;
        let half = half - half % 8;
        pairwise_sum(&a[..half]) + pairwise_sum(&a[half..])
    }
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

/// `evaluateImg` for every (category, image) cell, in parallel.
fn evaluate_cells(gt: &GroundTruth, dets: &[Detection], grouped: &Grouped) -> Vec<CellEval> {
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
struct Cell {
    cat: usize,
    gts: Range<usize>,
    dets: Range<usize>,
}

struct Grouped {
    gt_order: Vec<usize>,
    det_order: Vec<usize>,
    /// Sorted by category, then image: the order pycocotools concatenates in `accumulate`.
    cells: Vec<Cell>,
}

/// Groups annotations and detections by (category, image), keeping input order inside a group
/// (pycocotools' `_gts`/`_dts` lists). Annotations on unknown images or categories are dropped.
fn group_cells(gt: &GroundTruth, dets: &[Detection]) -> Grouped {
    let n_img = gt.images.len();
    let key = |cat: usize, img: usize| cat * n_img + img;
    let mut gt_keyed: Vec<(usize, usize)> = gt
        .annotations
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            let k = gt.category_index(a.category_id)?;
            Some((key(k, gt.image_index(a.image_id)?), i))
        })
        .collect();
    // Detections were validated, so every one has both indices.
    let mut det_keyed: Vec<(usize, usize)> = dets
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let k = gt.category_index(d.category_id)?;
            Some((key(k, gt.image_index(d.image_id)?), i))
        })
        .collect();
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

/// End of the run of `key` starting at `start` (which may be empty).
fn run_end(keyed: &[(usize, usize)], start: usize, key: usize) -> usize {
    start + keyed[start..].iter().take_while(|p| p.0 == key).count()
}

/// The range of cells belonging to each category.
fn category_ranges(cells: &[Cell], k_len: usize) -> Vec<Range<usize>> {
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
struct DetFlags {
    /// Matched to a non-ignored ground truth with a non-zero id.
    tp: u16,
    /// Neither matched nor ignored.
    fp: u16,
}

/// Matching results of one cell for one area range.
struct AreaEval {
    flags: Vec<DetFlags>,
    /// Number of non-ignored ground truths (pycocotools' `gtIgnore == 0`).
    npig: usize,
}

/// pycocotools' `evaluateImg` output for one cell and all four area ranges.
struct CellEval {
    /// Scores of the kept detections, highest first.
    scores: Vec<f64>,
    areas: [AreaEval; A],
}

/// Stable descending sort by score (numpy `argsort(-scores, kind='mergesort')`).
fn sort_by_score_desc<X>(items: &mut [X], score: impl Fn(&X) -> f64) {
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
            out.push(box_iou(&d.bbox, &g.bbox, g.iscrowd));
        }
    }
    out
}

fn box_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
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

/// Accumulated precision and recall of one (category, area, maxDets) setting.
struct Accumulated {
    recall: [f64; T],
    precision: [[f64; R]; T],
}

/// pycocotools' `accumulate` for one category and `maxDets` value, at every area range;
/// `None` where there is no non-ignored ground truth (left at −1).
fn accumulate(
    cells: &[CellEval],
    max_det: usize,
    recall_thr: &[f64; R],
) -> [Option<Box<Accumulated>>; A] {
    // Concatenate in image order, then one stable sort: numpy's mergesort tie order.
    let mut entries: Vec<(f64, u32, u32)> = Vec::new();
    for (c, cell) in cells.iter().enumerate() {
        for (d, &s) in cell.scores.iter().take(max_det).enumerate() {
            entries.push((s, c as u32, d as u32));
        }
    }
    sort_by_score_desc(&mut entries, |e| e.0);
    std::array::from_fn(|a| {
        let npig: usize = cells.iter().map(|c| c.areas[a].npig).sum();
        if npig == 0 {
            return None;
        }
        let flags: Vec<DetFlags> = entries
            .iter()
            .map(|&(_, c, d)| cells[c as usize].areas[a].flags[d as usize])
            .collect();
        Some(Box::new(precision_recall(&flags, npig, recall_thr)))
    })
}

/// Cumulative TP/FP along the ranked detections, then interpolated precision and final recall.
fn precision_recall(flags: &[DetFlags], npig: usize, recall_thr: &[f64; R]) -> Accumulated {
    let mut out = Accumulated {
        recall: [0.0; T],
        precision: [[0.0; R]; T],
    };
    let mut rc = Vec::with_capacity(flags.len());
    let mut pr = Vec::with_capacity(flags.len());
    for t in 0..T {
        let bit = 1u16 << t;
        rc.clear();
        pr.clear();
        let (mut tp, mut fp) = (0usize, 0usize);
        for f in flags {
            tp += usize::from(f.tp & bit != 0);
            fp += usize::from(f.fp & bit != 0);
            let (tpf, fpf) = (tp as f64, fp as f64);
            rc.push(tpf / npig as f64);
            pr.push(tpf / (fpf + tpf + f64::EPSILON));
        }
        out.recall[t] = rc.last().copied().unwrap_or(0.0);
        interpolate(&rc, &mut pr, recall_thr, &mut out.precision[t]);
    }
    out
}

/// Makes precision non-increasing from the right, then samples it at the first rank whose
/// recall reaches each threshold (`np.searchsorted(rc, recThrs, side='left')`); thresholds
/// beyond the final recall keep 0.
fn interpolate(rc: &[f64], pr: &mut [f64], recall_thr: &[f64; R], out: &mut [f64; R]) {
    for i in (1..pr.len()).rev() {
        if pr[i] > pr[i - 1] {
            pr[i - 1] = pr[i];
        }
    }
    for (q, &thr) in out.iter_mut().zip(recall_thr) {
        let pos = rc.partition_point(|&x| x < thr);
        match pr.get(pos) {
            Some(&p) => *q = p,
            None => break,
        }
    }
}

/// Lays the per-(k, m) results out as pycocotools' precision [T,R,K,A,M] and recall [T,K,A,M].
fn assemble(
    k_len: usize,
    jobs: &[(usize, usize)],
    results: &[[Option<Box<Accumulated>>; A]],
) -> (Vec<f64>, Vec<f64>) {
    let mut precision = vec![-1.0; T * R * k_len * A * M];
    let mut recall = vec![-1.0; T * k_len * A * M];
    for (&(k, m), per_area) in jobs.iter().zip(results) {
        for (a, acc) in per_area.iter().enumerate() {
            let Some(acc) = acc else { continue };
            for t in 0..T {
                recall[((t * k_len + k) * A + a) * M + m] = acc.recall[t];
                for r in 0..R {
                    precision[(((t * R + r) * k_len + k) * A + a) * M + m] = acc.precision[t][r];
                }
            }
        }
    }
    (precision, recall)
}

/// pycocotools' `_summarizeDets`.
fn summarize(precision: &[f64], recall: &[f64], k_len: usize) -> Summary {
    let ap = |t: Option<usize>, area: AreaRange, m: usize| {
        let ts = t.map_or(0..T, |t| t..t + 1);
        let a = area.index();
        // C order of precision[t, :, :, a, m]: t, then r, then k.
        let values = ts.flat_map(|t| {
            (0..R).flat_map(move |r| {
                (0..k_len).map(move |k| (((t * R + r) * k_len + k) * A + a) * M + m)
            })
        });
        mean_valid(values.map(|i| precision[i]))
    };
    let ar = |area: AreaRange, m: usize| {
        let a = area.index();
        let values =
            (0..T).flat_map(|t| (0..k_len).map(move |k| ((t * k_len + k) * A + a) * M + m));
        mean_valid(values.map(|i| recall[i]))
    };
    // pycocotools looks the thresholds up by exact equality, which holds for 0.5 and 0.75.
    let t50 = iou_index(0.5);
    let t75 = iou_index(0.75);
    let last = M - 1;
    Summary {
        ap: ap(None, AreaRange::All, last),
        ap50: t50.map_or(-1.0, |t| ap(Some(t), AreaRange::All, last)),
        ap75: t75.map_or(-1.0, |t| ap(Some(t), AreaRange::All, last)),
        ap_small: ap(None, AreaRange::Small, last),
        ap_medium: ap(None, AreaRange::Medium, last),
        ap_large: ap(None, AreaRange::Large, last),
        ar1: ar(AreaRange::All, 0),
        ar10: ar(AreaRange::All, 1),
        ar100: ar(AreaRange::All, last),
        ar_small: ar(AreaRange::Small, last),
        ar_medium: ar(AreaRange::Medium, last),
        ar_large: ar(AreaRange::Large, last),
    }
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

    fn small_gt() -> GroundTruth {
        let cats = vec![
            Category {
                id: 1,
                name: "a".into(),
            },
            Category {
                id: 3,
                name: "b".into(),
            },
        ];
        let anns = vec![
            GtBox::new(1, 10, 1, [0.0, 0.0, 10.0, 10.0]),
            GtBox::new(2, 11, 3, [5.0, 5.0, 50.0, 40.0]),
        ];
        GroundTruth::new([10, 11, 12], cats, anns).unwrap()
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
    fn pairwise_sum_matches_plain_sum_closely() {
        let v: Vec<f64> = (0..1000).map(|i| (i as f64).sqrt()).collect();
        let plain: f64 = v.iter().sum();
        assert!((pairwise_sum(&v) - plain).abs() < 1e-9);
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

    #[test]
    fn non_finite_tokens_become_null() {
        let s = r#"[{"a": NaN, "b": "NaN", "c": -Infinity, "d": Infinity}]"#;
        let fixed = nulls_for_non_finite(s).unwrap();
        assert_eq!(fixed, r#"[{"a": null, "b": "NaN", "c": null, "d": null}]"#);
        assert!(nulls_for_non_finite(r#"{"x": "NaN"}"#).is_none());
    }

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
