//! COCO evaluation of a model on a dataset: the dataset's boxes as ground truth, the model's
//! detections as results, both in original pixels.

use crate::data::Dataset;
use crate::eval::{evaluate, Category, Detection, Evaluation, GroundTruth, GtBox};
use crate::tiling::{detect_tiled, TileConfig};
use crate::{Result, RetinaNet};

/// COCO box evaluation of `model` on `dataset`; with `tiling`, images larger than a tile are
/// detected tile by tile (as they were trained).
pub fn evaluate_model(
    model: &RetinaNet,
    dataset: &Dataset,
    tiling: Option<&TileConfig>,
) -> Result<Evaluation> {
    let (gt, dets) = predictions(model, dataset, tiling)?;
    Ok(evaluate(&gt, &dets)?)
}

/// Ground truth and detections of `dataset` in original pixels; image ids are sample
/// indices, category ids the 0-based labels (one category per model class).
pub fn predictions(
    model: &RetinaNet,
    dataset: &Dataset,
    tiling: Option<&TileConfig>,
) -> Result<(GroundTruth, Vec<Detection>)> {
    let categories = (0..model.config().num_classes)
        .map(|k| Category {
            id: k as i64,
            name: dataset.class_names.get(k).cloned().unwrap_or_default(),
        })
        .collect();
    let mut boxes = Vec::new();
    let mut dets = Vec::new();
    for (i, sample) in dataset.samples.iter().enumerate() {
        for (b, &l) in sample.boxes.iter().zip(&sample.labels) {
            // Ids from 1: pycocotools never matches an annotation with id 0.
            let id = boxes.len() as i64 + 1;
            boxes.push(GtBox::new(id, i as i64, l as i64, xywh(*b)));
        }
        let image = sample.load_image()?;
        let found = match tiling {
            Some(t) if image.width().max(image.height()) > t.size => {
                detect_tiled(model, &image, t)?
            }
            _ => model.detect(&image)?,
        };
        dets.extend(
            found.iter().map(|d| {
                Detection::new(i as i64, d.label as i64, xywh(d.bbox), f64::from(d.score))
            }),
        );
    }
    let gt = GroundTruth::new(0..dataset.len() as i64, categories, boxes)?;
    Ok((gt, dets))
}

/// `[x0, y0, x1, y1]` → COCO's `[x, y, w, h]`.
fn xywh(b: [f32; 4]) -> [f64; 4] {
    let b = b.map(f64::from);
    [b[0], b[1], b[2] - b[0], b[3] - b[1]]
}
