//! Detections as JSON records: one object per image for people and scripts, and COCO's
//! results format for evaluation tools.

use std::path::Path;

use serde::Serialize;

use crate::{Detection, RetinaNet};

/// One image's detections: `{"image", "width", "height", "detections": [...]}`.
#[derive(Debug, Clone, Serialize)]
pub struct ImageRecord<'a> {
    /// The image's path as given.
    pub image: String,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// Best first.
    pub detections: Vec<DetectionRecord<'a>>,
}

/// One detection: `{"box": [x0, y0, x1, y1], "score", "label", "class"}`.
#[derive(Debug, Clone, Serialize)]
pub struct DetectionRecord<'a> {
    /// Corners in original pixels.
    #[serde(rename = "box")]
    pub bbox: [f32; 4],
    /// Confidence.
    pub score: f32,
    /// Class index.
    pub label: usize,
    /// Class name, where the model knows one.
    pub class: Option<&'a str>,
}

/// One detection in COCO's results format: `{"image_id", "category_id", "bbox": [x, y, w,
/// h], "score"}`.
#[derive(Debug, Clone, Serialize)]
pub struct CocoResult {
    /// The image's id (see [`coco_image_id`]).
    pub image_id: u64,
    /// The label.
    pub category_id: usize,
    /// Corner, width and height.
    pub bbox: [f32; 4],
    /// Confidence.
    pub score: f32,
}

impl<'a> ImageRecord<'a> {
    /// The record of `detections` on the `width`×`height` image at `path`, class names from
    /// `model`.
    pub fn new(
        path: &Path,
        (width, height): (u32, u32),
        detections: &[Detection],
        model: &'a RetinaNet,
    ) -> Self {
        let detections = detections
            .iter()
            .map(|d| DetectionRecord {
                bbox: d.bbox,
                score: d.score,
                label: d.label,
                class: model.class_name(d.label),
            })
            .collect();
        Self {
            image: path.display().to_string(),
            width,
            height,
            detections,
        }
    }
}

impl CocoResult {
    /// `detection` on image `image_id`.
    pub fn new(image_id: u64, detection: &Detection) -> Self {
        let [x0, y0, x1, y1] = detection.bbox;
        Self {
            image_id,
            category_id: detection.label,
            bbox: [x0, y0, x1 - x0, y1 - y0],
            score: detection.score,
        }
    }
}

/// COCO's image id: the numeric file stem (`000000397133.jpg` → 397133), else `index`.
pub fn coco_image_id(path: &Path, index: usize) -> u64 {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or(index as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coco_ids_and_boxes() {
        assert_eq!(coco_image_id(Path::new("a/000000397133.jpg"), 7), 397133);
        assert_eq!(coco_image_id(Path::new("a/dog.jpg"), 7), 7);
        let d = Detection {
            bbox: [1.0, 2.0, 4.0, 7.0],
            score: 0.5,
            label: 3,
        };
        let r = CocoResult::new(9, &d);
        assert_eq!(
            (r.image_id, r.category_id, r.bbox),
            (9, 3, [1.0, 2.0, 3.0, 5.0])
        );
    }
}
