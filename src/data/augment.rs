//! Training augmentation: horizontal flip, multi-scale size choice, random crops, and
//! deterministic tiling of large images. Everything random draws from a seeded [`Rng`], so
//! a seed gives the same batches on every run and every thread count.

use image::RgbImage;

use super::{DataError, Dataset, Region, Result, Sample};
use crate::tiling::tile_windows;

/// A small seeded generator (SplitMix64): fast, and its sequence never changes with a
/// dependency's version.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// A generator for one `(seed, a, b)` combination, e.g. (seed, epoch, sample), whose
    /// stream does not depend on the order the combinations are used in.
    pub fn derive(seed: u64, a: u64, b: u64) -> Self {
        let mut mixer = Rng::new(seed ^ 0x5851_f42d_4c95_7f2d);
        let x = mixer.next_u64() ^ a.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut mixer = Rng::new(x);
        Rng::new(mixer.next_u64() ^ b.wrapping_mul(0xbf58_476d_1ce4_e5b9))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `0..n`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Shuffles in place (Fisher–Yates).
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// A random crop window size and which boxes survive it.
#[derive(Debug, Clone, PartialEq)]
pub struct CropConfig {
    /// Window width; an image narrower than this keeps its width.
    pub width: u32,
    /// Window height; an image shorter than this keeps its height.
    pub height: u32,
    /// A box cut by the window is kept (clipped) when at least this fraction of its area
    /// is inside, and dropped otherwise.
    pub min_visibility: f32,
}

/// Training augmentation; the default does nothing.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AugmentConfig {
    /// Probability of a horizontal flip.
    pub hflip: f32,
    /// Short-side sizes to choose from per sample (multi-scale training); the model's
    /// transform resizes to the chosen one. Empty: keep the transform's `min_size`.
    pub min_sizes: Vec<usize>,
    /// Random crop, applied first (large images).
    pub crop: Option<CropConfig>,
}

impl AugmentConfig {
    /// Checks probabilities, sizes and fractions.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.hflip) {
            return Err(DataError::Invalid(format!(
                "flip probability {} is not in [0, 1]",
                self.hflip
            )));
        }
        if self.min_sizes.contains(&0) {
            return Err(DataError::Invalid(
                "multi-scale sizes must be positive".into(),
            ));
        }
        if let Some(c) = &self.crop {
            if c.width == 0 || c.height == 0 {
                return Err(DataError::Invalid("crop size must be positive".into()));
            }
            check_fraction(c.min_visibility)?;
        }
        Ok(())
    }
}

fn check_fraction(v: f32) -> Result<()> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(DataError::Invalid(format!(
            "minimum visible fraction {v} is not in [0, 1]"
        )))
    }
}

/// An augmented sample.
#[derive(Debug, Clone)]
pub struct Augmented {
    /// The image after crop and flip.
    pub image: RgbImage,
    /// Boxes in the augmented image's pixels.
    pub boxes: Vec<[f32; 4]>,
    /// Their labels.
    pub labels: Vec<usize>,
    /// The short side chosen for this sample, if multi-scale is on.
    pub min_size: Option<usize>,
    /// Boxes the crop cut and dropped for being less than `min_visibility` inside.
    pub dropped: usize,
    /// Whether the image was flipped horizontally.
    pub flipped: bool,
}

/// Applies `config` to one sample: crop, then flip, then the size choice.
pub fn augment(
    image: RgbImage,
    boxes: &[[f32; 4]],
    labels: &[usize],
    config: &AugmentConfig,
    rng: &mut Rng,
) -> Augmented {
    let (mut image, mut boxes, mut labels, mut dropped) =
        (image, boxes.to_vec(), labels.to_vec(), 0);
    if let Some(crop) = &config.crop {
        let (w, h) = image.dimensions();
        let (cw, ch) = (crop.width.min(w), crop.height.min(h));
        let window = Region {
            x: rng.below(u64::from(w - cw) + 1) as u32,
            y: rng.below(u64::from(h - ch) + 1) as u32,
            width: cw,
            height: ch,
        };
        if (cw, ch) != (w, h) {
            image = image::imageops::crop_imm(&image, window.x, window.y, cw, ch).to_image();
            (boxes, labels, dropped) = crop_boxes(&boxes, &labels, window, crop.min_visibility);
        }
    }
    let flipped = config.hflip > 0.0 && rng.uniform() < config.hflip;
    if flipped {
        image::imageops::flip_horizontal_in_place(&mut image);
        let w = image.width() as f32;
        for b in &mut boxes {
            *b = [w - b[2], b[1], w - b[0], b[3]];
        }
    }
    let min_size = (!config.min_sizes.is_empty())
        .then(|| config.min_sizes[rng.below(config.min_sizes.len() as u64) as usize]);
    Augmented {
        image,
        boxes,
        labels,
        min_size,
        dropped,
        flipped,
    }
}

/// Boxes seen through `window`: clipped and shifted into its pixels, keeping those with
/// at least `min_visibility` of their area inside (and some area). Returns the kept boxes,
/// their labels, and how many boxes the window cut and dropped (boxes wholly outside are
/// not counted).
pub fn crop_boxes(
    boxes: &[[f32; 4]],
    labels: &[usize],
    window: Region,
    min_visibility: f32,
) -> (Vec<[f32; 4]>, Vec<usize>, usize) {
    let (wx1, wy1) = (window.x as f32, window.y as f32);
    let (wx2, wy2) = (wx1 + window.width as f32, wy1 + window.height as f32);
    let (mut kept, mut kept_labels, mut dropped) = (Vec::new(), Vec::new(), 0);
    for (b, &label) in boxes.iter().zip(labels) {
        let c = [b[0].max(wx1), b[1].max(wy1), b[2].min(wx2), b[3].min(wy2)];
        if c[2] <= c[0] || c[3] <= c[1] {
            continue;
        }
        let (area, inside) = (crate::boxes::area(b), crate::boxes::area(&c));
        // The tolerance keeps a box exactly at the threshold despite f32 rounding.
        if inside < (min_visibility - 1e-6) * area {
            dropped += 1;
            continue;
        }
        kept.push([c[0] - wx1, c[1] - wy1, c[2] - wx1, c[3] - wy1]);
        kept_labels.push(label);
    }
    (kept, kept_labels, dropped)
}

/// Tiling of large images into overlapping square windows, placed as tiled inference places
/// them ([`tile_windows`]), so a model trains on the tiles it will see.
#[derive(Debug, Clone, PartialEq)]
pub struct TileConfig {
    /// Tile side in pixels; an image side no longer than this stays whole.
    pub size: u32,
    /// Minimum overlap of neighbouring tiles in pixels (objects cut by one tile are whole in
    /// the next when smaller than this).
    pub overlap: u32,
    /// A box cut by a tile edge is kept when at least this fraction of it is inside.
    pub min_visibility: f32,
    /// Keep tiles without boxes (background examples).
    pub keep_empty: bool,
}

impl Default for TileConfig {
    fn default() -> Self {
        Self {
            size: 400,
            overlap: 40,
            min_visibility: 0.5,
            keep_empty: true,
        }
    }
}

/// What tiling did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TileStats {
    /// Tiles made (images small enough stay as one tile).
    pub tiles: usize,
    /// Boxes in the tiles (a box in two overlapping tiles counts twice).
    pub boxes_kept: usize,
    /// Box cuts dropped for low visibility, over all tiles.
    pub boxes_dropped: usize,
    /// Tiles without boxes left out (with `keep_empty` off).
    pub empty_skipped: usize,
}

impl Dataset {
    /// Cuts every sample into overlapping tiles of `config.size` (a deterministic training
    /// set for images much larger than the model's input). Tiles are samples with a
    /// [`Region`]; their boxes are in tile pixels.
    pub fn tile(&self, config: &TileConfig) -> Result<(Dataset, TileStats)> {
        if config.size == 0 || config.overlap >= config.size {
            return Err(DataError::Invalid(format!(
                "tile size {} must be positive and larger than the overlap {}",
                config.size, config.overlap
            )));
        }
        check_fraction(config.min_visibility)?;
        let mut stats = TileStats::default();
        let mut samples = Vec::new();
        for sample in &self.samples {
            for tile in tile_sample(sample, config, &mut stats) {
                if tile.boxes.is_empty() && !config.keep_empty {
                    stats.empty_skipped += 1;
                    continue;
                }
                stats.tiles += 1;
                stats.boxes_kept += tile.boxes.len();
                samples.push(tile);
            }
        }
        let tiled = Dataset {
            samples,
            ..self.clone()
        };
        Ok((tiled, stats))
    }
}

fn tile_sample(sample: &Sample, config: &TileConfig, stats: &mut TileStats) -> Vec<Sample> {
    let (ox, oy) = sample.region.map_or((0, 0), |r| (r.x, r.y));
    tile_windows(sample.width, sample.height, config.size, config.overlap)
        .into_iter()
        .map(|window| {
            let (boxes, labels, dropped) =
                crop_boxes(&sample.boxes, &sample.labels, window, config.min_visibility);
            stats.boxes_dropped += dropped;
            let whole = (window.width, window.height) == (sample.width, sample.height);
            let region = Region {
                x: ox + window.x,
                y: oy + window.y,
                ..window
            };
            Sample {
                image_path: sample.image_path.clone(),
                width: window.width,
                height: window.height,
                boxes,
                labels,
                region: if whole { sample.region } else { Some(region) },
                image_id: sample.image_id,
            }
        })
        .collect()
}
