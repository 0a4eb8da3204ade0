//! Tiled inference for images much larger than the model's input (aerial photos,
//! microscopy): the image is cut into overlapping tiles, each tile goes through
//! [`RetinaNet::detect_batch`] as an image of its own, boxes are shifted back into image
//! pixels and duplicates across tiles are merged with per-class NMS
//! ([`batched_nms`]).
//!
//! Tiles have the same size (the last row and column are moved back to end at the image's
//! edge), so a batch of tiles needs no padding: with one tile per batch each tile's
//! detections equal those of the tile cropped and run alone, with larger batches they match
//! up to the float rounding of the batched convolutions. Training tiles
//! ([`crate::data::Dataset::tile`]) are placed by the same [`tile_windows`], so a model trains
//! on the windows it will detect in.

use image::RgbImage;

use crate::boxes::batched_nms;
use crate::model::postprocess::Detection;
use crate::{Error, Result, RetinaNet};

/// How to tile.
#[derive(Debug, Clone, PartialEq)]
pub struct TileConfig {
    /// Side of a square tile in image pixels.
    pub size: u32,
    /// Pixels shared by neighbouring tiles; objects up to this size lie whole in some tile.
    pub overlap: u32,
    /// Tiles per forward pass.
    pub batch_size: usize,
    /// IoU above which a box is merged into a better one of its class (across tiles);
    /// `None` uses the model's NMS threshold.
    pub merge_iou: Option<f64>,
    /// Detections kept for the whole image after merging, best first; `None` keeps all (each
    /// tile is still capped by the model's `detections_per_img`).
    pub max_detections: Option<usize>,
}

impl TileConfig {
    /// Tiles of `size` pixels overlapping by `overlap`, one per batch, merged at the
    /// model's NMS threshold, uncapped.
    pub fn new(size: u32, overlap: u32) -> Self {
        Self {
            size,
            overlap,
            batch_size: 1,
            merge_iou: None,
            max_detections: None,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.size == 0 || self.overlap >= self.size || self.batch_size == 0 {
            return Err(Error::Invalid(format!(
                "bad tiling: tile size {} and overlap {} (need size > overlap ≥ 0) with batch \
                 size {} (need ≥ 1)",
                self.size, self.overlap, self.batch_size
            )));
        }
        Ok(())
    }
}

/// A window of an image in its pixels: a tile, a training crop, or the part of a source
/// image a [`crate::data::Sample`] covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

/// Start positions along one axis: a stride of `size − overlap`, the last tile moved back to
/// end at the edge; one tile covering everything when `len ≤ size`.
fn starts(len: u32, size: u32, overlap: u32) -> Vec<u32> {
    if len <= size {
        return vec![0];
    }
    let stride = size - overlap;
    let last = len - size;
    let mut out: Vec<u32> = (0..)
        .map(|i| i * stride)
        .take_while(|&s| s < last)
        .collect();
    out.push(last);
    out
}

/// Where tiles go, for inference and for training alike: windows of `size` (clamped to the
/// image) overlapping by at least `overlap` and covering a `width × height` image, row by
/// row. Needs `overlap < size`.
pub fn tile_windows(width: u32, height: u32, size: u32, overlap: u32) -> Vec<Region> {
    let xs = starts(width, size, overlap);
    let ys = starts(height, size, overlap);
    ys.iter()
        .flat_map(|&y| {
            xs.iter().map(move |&x| Region {
                x,
                y,
                width: size.min(width),
                height: size.min(height),
            })
        })
        .collect()
}

/// The tiles covering a `width × height` image, row by row.
pub fn tile_grid(width: u32, height: u32, config: &TileConfig) -> Result<Vec<Region>> {
    config.validate()?;
    if width == 0 || height == 0 {
        return Err(Error::Invalid(format!(
            "cannot tile an empty {width}×{height} image"
        )));
    }
    Ok(tile_windows(width, height, config.size, config.overlap))
}

/// Shifts detections of a tile into image pixels.
pub fn shift(detections: &mut [Detection], tile: &Region) {
    let (dx, dy) = (tile.x as f32, tile.y as f32);
    for d in detections {
        d.bbox = [
            d.bbox[0] + dx,
            d.bbox[1] + dy,
            d.bbox[2] + dx,
            d.bbox[3] + dy,
        ];
    }
}

/// Merges detections from overlapping tiles: per-class NMS at `iou`, best first, at most
/// `max` kept.
pub fn merge(detections: Vec<Detection>, iou: f64, max: Option<usize>) -> Vec<Detection> {
    let boxes: Vec<[f32; 4]> = detections.iter().map(|d| d.bbox).collect();
    let scores: Vec<f32> = detections.iter().map(|d| d.score).collect();
    let labels: Vec<usize> = detections.iter().map(|d| d.label).collect();
    let mut keep = batched_nms(&boxes, &scores, &labels, iou);
    if let Some(max) = max {
        keep.truncate(max);
    }
    keep.into_iter().map(|i| detections[i]).collect()
}

/// Detects objects in a large image tile by tile; boxes are in image pixels, best first.
pub fn detect_tiled(
    model: &RetinaNet,
    image: &RgbImage,
    config: &TileConfig,
) -> Result<Vec<Detection>> {
    let tiles = tile_grid(image.width(), image.height(), config)?;
    let mut all = Vec::new();
    for chunk in tiles.chunks(config.batch_size) {
        let crops: Vec<RgbImage> = chunk
            .iter()
            .map(|t| image::imageops::crop_imm(image, t.x, t.y, t.width, t.height).to_image())
            .collect();
        for (mut dets, tile) in model.detect_batch(&crops)?.into_iter().zip(chunk) {
            shift(&mut dets, tile);
            all.extend(dets);
        }
    }
    let iou = config.merge_iou.unwrap_or(model.postprocess.nms_thresh);
    Ok(merge(all, iou, config.max_detections))
}

/// Overlap of neighbouring windows: a fraction of the window (DeepForest's `patch_overlap`)
/// or pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Overlap {
    /// A fraction in `[0, 1)` of the window side, rounded down to pixels.
    Fraction(f64),
    /// Pixels.
    Pixels(u32),
}

impl Overlap {
    /// Reads `--overlap`: a number below 1 is a fraction, one from 1 up a whole number of
    /// pixels.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            Error::Invalid(format!(
                "overlap {text:?}: expected a fraction in [0, 1) or whole pixels from 1 up"
            ))
        };
        let v: f64 = text.trim().parse().map_err(|_| bad())?;
        if !(v.is_finite() && v >= 0.0) {
            return Err(bad());
        }
        if v < 1.0 {
            return Ok(Overlap::Fraction(v));
        }
        if v.fract() != 0.0 || v > u32::MAX as f64 {
            return Err(bad());
        }
        Ok(Overlap::Pixels(v as u32))
    }

    /// Pixels shared by windows of side `window`: `floor(window · fraction)` as
    /// slidingwindow computes it, or the pixels.
    pub fn pixels(&self, window: u32) -> u32 {
        match *self {
            Overlap::Fraction(f) => (window as f64 * f).floor() as u32,
            Overlap::Pixels(p) => p,
        }
    }
}

/// DeepForest's tiled prediction (`predict_tile` of deepforest 2.1.0).
#[derive(Debug, Clone, PartialEq)]
pub struct DeepForestTiling {
    /// Window side (`patch_size`).
    pub patch_size: u32,
    /// Window overlap (`patch_overlap`).
    pub overlap: Overlap,
    /// IoU above which a box is suppressed by a better one of any class (`iou_threshold`).
    pub iou_threshold: f64,
}

impl Default for DeepForestTiling {
    /// `predict_tile`'s defaults: 400 px windows overlapping by 5 %, merged at IoU 0.15.
    fn default() -> Self {
        Self {
            patch_size: 400,
            overlap: Overlap::Fraction(0.05),
            iou_threshold: 0.15,
        }
    }
}

/// Offsets along one axis as slidingwindow's `generateForSize`: `range(0, last + 1, step)`,
/// plus `last` where the range misses it.
fn sliding_offsets(len: u32, window: u32, overlap: u32) -> Result<Vec<u32>> {
    let step = window
        .checked_sub(overlap)
        .filter(|&s| s > 0)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "overlap of {overlap} px leaves no step for windows of {window} px"
            ))
        })?;
    let last = len - window;
    let mut out: Vec<u32> = (0..=last).step_by(step as usize).collect();
    if out.last() != Some(&last) {
        out.push(last);
    }
    Ok(out)
}

/// DeepForest's windows over a `width × height` image (`preprocess.compute_windows`, i.e.
/// slidingwindow): sides `min(patch_size, image side)`, the overlap taken from each side,
/// column by column (x outer, y inner), as `predict_tile` runs them.
pub fn deepforest_windows(
    width: u32,
    height: u32,
    patch_size: u32,
    overlap: Overlap,
) -> Result<Vec<Region>> {
    if width == 0 || height == 0 || patch_size == 0 {
        return Err(Error::Invalid(format!(
            "cannot tile a {width}×{height} image with {patch_size} px windows"
        )));
    }
    let (ww, wh) = (patch_size.min(width), patch_size.min(height));
    let xs = sliding_offsets(width, ww, overlap.pixels(ww))?;
    let ys = sliding_offsets(height, wh, overlap.pixels(wh))?;
    Ok(xs
        .iter()
        .flat_map(|&x| {
            ys.iter().map(move |&y| Region {
                x,
                y,
                width: ww,
                height: wh,
            })
        })
        .collect())
}

/// Where windows of an image come from: the image in memory, or a raster read window by
/// window ([`crate::geo::GeoTiff`]).
pub trait WindowSource {
    /// `(width, height)`.
    fn dimensions(&self) -> (u32, u32);
    /// The pixels of `region` (inside the image).
    fn read_window(&mut self, region: &Region) -> Result<RgbImage>;
}

impl WindowSource for &RgbImage {
    fn dimensions(&self) -> (u32, u32) {
        RgbImage::dimensions(self)
    }

    fn read_window(&mut self, r: &Region) -> Result<RgbImage> {
        Ok(image::imageops::crop_imm(*self, r.x, r.y, r.width, r.height).to_image())
    }
}

/// Detects as DeepForest's `predict_tile` does: each window (see [`deepforest_windows`])
/// through the model alone, its boxes shifted into image pixels and truncated to whole
/// pixels (DeepForest's `astype(int)`), then NMS across all classes at `iou_threshold` (its
/// `mosiac`). Best first.
pub fn detect_tiled_deepforest(
    model: &RetinaNet,
    source: &mut dyn WindowSource,
    config: &DeepForestTiling,
) -> Result<Vec<Detection>> {
    let (width, height) = source.dimensions();
    let windows = deepforest_windows(width, height, config.patch_size, config.overlap)?;
    let mut all = Vec::new();
    for window in &windows {
        let crop = source.read_window(window)?;
        for d in model.detect(&crop)? {
            let (dx, dy) = (window.x as f64, window.y as f64);
            let b = d.bbox.map(f64::from);
            let bbox = [b[0] + dx, b[1] + dy, b[2] + dx, b[3] + dy].map(|v| v.trunc() as f32);
            all.push(Detection { bbox, ..d });
        }
    }
    if all.len() <= 1 {
        return Ok(all);
    }
    let boxes: Vec<[f32; 4]> = all.iter().map(|d| d.bbox).collect();
    let scores: Vec<f32> = all.iter().map(|d| d.score).collect();
    let keep = crate::boxes::nms(&boxes, &scores, config.iou_threshold);
    Ok(keep.into_iter().map(|i| all[i]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_image_with_at_least_the_overlap() {
        let cfg = TileConfig::new(256, 32);
        for (w, h) in [(1000, 700), (256, 256), (257, 100), (100, 50), (4096, 513)] {
            let tiles = tile_grid(w, h, &cfg).unwrap();
            let mut covered = vec![false; (w * h) as usize];
            for t in &tiles {
                assert!(
                    t.x + t.width <= w && t.y + t.height <= h,
                    "{t:?} in {w}×{h}"
                );
                assert_eq!((t.width, t.height), (256.min(w), 256.min(h)));
                for y in t.y..t.y + t.height {
                    for x in t.x..t.x + t.width {
                        covered[(y * w + x) as usize] = true;
                    }
                }
            }
            assert!(covered.iter().all(|&c| c), "{w}×{h} not covered");
            let xs = starts(w, 256, 32);
            for pair in xs.windows(2) {
                assert!(pair[0] + 256 >= pair[1] + 32, "overlap {xs:?}");
                assert!(pair[1] > pair[0]);
            }
        }
        assert_eq!(starts(1000, 256, 32), vec![0, 224, 448, 672, 744]);
        assert_eq!(starts(480, 256, 32), vec![0, 224]);
    }

    #[test]
    fn bad_configs_are_errors() {
        assert!(tile_grid(100, 100, &TileConfig::new(0, 0)).is_err());
        assert!(tile_grid(100, 100, &TileConfig::new(64, 64)).is_err());
        assert!(tile_grid(0, 100, &TileConfig::new(64, 8)).is_err());
        let cfg = TileConfig {
            batch_size: 0,
            ..TileConfig::new(64, 8)
        };
        assert!(tile_grid(100, 100, &cfg).is_err());
    }

    #[test]
    fn merge_keeps_the_best_of_duplicates_per_class() {
        let det = |x: f32, score: f32, label: usize| Detection {
            bbox: [x, 0.0, x + 10.0, 10.0],
            score,
            label,
        };
        let merged = merge(
            vec![
                det(0.0, 0.5, 1),
                det(1.0, 0.9, 1),
                det(1.0, 0.8, 2),
                det(50.0, 0.7, 1),
            ],
            0.5,
            None,
        );
        assert_eq!(
            merged,
            vec![det(1.0, 0.9, 1), det(1.0, 0.8, 2), det(50.0, 0.7, 1)]
        );
        assert_eq!(merge(merged.clone(), 0.5, Some(1)), vec![det(1.0, 0.9, 1)]);
    }

    #[test]
    fn tile_starts_cover_the_side_with_the_overlap() {
        for len in [1, 399, 400, 401, 1035, 1249, 2299, 2472] {
            for (size, overlap) in [(400, 0), (400, 40), (600, 100), (800, 399)] {
                let starts = starts(len, size, overlap);
                assert_eq!(starts[0], 0);
                assert_eq!(starts.last().unwrap() + size.min(len), len, "{len} {size}");
                for pair in starts.windows(2) {
                    assert!(pair[0] < pair[1]);
                    // Neighbours share at least the overlap (the check allows a pixel of slack).
                    assert!(
                        pair[0] + size >= pair[1] + overlap.saturating_sub(1),
                        "{len} {size} {overlap}: {starts:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn overlap_reads_fractions_and_pixels() {
        assert_eq!(Overlap::parse("0.05").unwrap(), Overlap::Fraction(0.05));
        assert_eq!(Overlap::parse("0").unwrap(), Overlap::Fraction(0.0));
        assert_eq!(Overlap::parse("64").unwrap(), Overlap::Pixels(64));
        for bad in ["-0.1", "1.5", "x", "nan", "inf"] {
            assert!(Overlap::parse(bad).is_err(), "{bad}");
        }
        // slidingwindow: floor(400 · 0.05) = 20, floor(300 · 0.25) = 75.
        assert_eq!(Overlap::Fraction(0.05).pixels(400), 20);
        assert_eq!(Overlap::Fraction(0.25).pixels(300), 75);
    }

    #[test]
    fn deepforest_windows_go_column_by_column_with_the_last_against_the_edge() {
        let w = deepforest_windows(1001, 747, 400, Overlap::Fraction(0.05)).unwrap();
        let xy: Vec<(u32, u32)> = w.iter().map(|r| (r.x, r.y)).collect();
        assert_eq!(
            xy,
            [(0, 0), (0, 347), (380, 0), (380, 347), (601, 0), (601, 347)]
        );
        let small = deepforest_windows(300, 1000, 400, Overlap::Fraction(0.1)).unwrap();
        assert!(small.iter().all(|r| (r.width, r.height) == (300, 400)));
        assert!(deepforest_windows(100, 100, 50, Overlap::Pixels(50)).is_err());
    }
}
