//! The input pipeline (§5, images resized to a shorter side of the chosen scale), as
//! torchvision's `GeneralizedRCNNTransform` in eval mode: scale to [0, 1], normalise with
//! ImageNet statistics, resize bilinearly so the short side is `min_size` unless the long
//! side would exceed `max_size`, and zero-pad the batch to a multiple of 32.
//!
//! The transform runs on the host in f32 with PyTorch's exact interpolation arithmetic; only
//! the finished batch is copied to the model's device.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use crate::{Error, Result};

/// Settings of the image transform; the defaults are torchvision's.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TransformConfig {
    /// Target length of the short side.
    pub min_size: usize,
    /// Upper bound on the long side.
    pub max_size: usize,
    /// Per-channel mean subtracted from RGB in [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation.
    pub std: [f32; 3],
    /// The padded batch's sides are multiples of this.
    pub size_divisible: usize,
}

impl Default for TransformConfig {
    fn default() -> Self {
        Self {
            min_size: 800,
            max_size: 1333,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            size_divisible: 32,
        }
    }
}

/// A preprocessed batch on the model's device.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// `(N, 3, H, W)`, zero-padded bottom and right.
    pub tensor: Tensor,
    /// `(height, width)` of each image after resizing, before padding.
    pub image_sizes: Vec<(usize, usize)>,
    /// `(height, width)` of each input image.
    pub original_sizes: Vec<(usize, usize)>,
}

impl ImageBatch {
    /// `(H, W)` of the padded batch.
    pub fn padded_size(&self) -> Result<(usize, usize)> {
        let (_, _, h, w) = self.tensor.dims4()?;
        Ok((h, w))
    }
}

/// A planar (CHW) f32 image.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanarImage {
    /// Channel-major pixels.
    pub data: Vec<f32>,
    /// Channels.
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl TransformConfig {
    /// Validates the settings.
    pub fn validate(&self) -> Result<()> {
        if self.min_size == 0 || self.max_size == 0 || self.size_divisible == 0 {
            return Err(Error::Invalid(format!(
                "transform sizes must be positive (min_size {}, max_size {}, size_divisible {})",
                self.min_size, self.max_size, self.size_divisible
            )));
        }
        if self.std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(Error::Invalid(format!("bad std {:?}", self.std)));
        }
        Ok(())
    }

    /// Output `(height, width)` for an input of `(height, width)`: scale =
    /// min(min_size / short, max_size / long) in f64, each side floored.
    pub fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        let short = height.min(width) as f64;
        let long = height.max(width) as f64;
        let scale = (self.min_size as f64 / short).min(self.max_size as f64 / long);
        (
            (height as f64 * scale).floor() as usize,
            (width as f64 * scale).floor() as usize,
        )
    }

    /// Converts to f32 in [0, 1] and normalises, as `(x / 255 − mean) / std`.
    pub fn normalize(&self, image: &RgbImage) -> PlanarImage {
        let (width, height) = (image.width() as usize, image.height() as usize);
        let mut data = vec![0f32; 3 * height * width];
        let raw = image.as_raw();
        for c in 0..3 {
            let (mean, std) = (self.mean[c], self.std[c]);
            let plane = &mut data[c * height * width..(c + 1) * height * width];
            for (o, px) in plane.iter_mut().zip(raw.chunks_exact(3)) {
                *o = (px[c] as f32 / 255.0 - mean) / std;
            }
        }
        PlanarImage {
            data,
            channels: 3,
            height,
            width,
        }
    }

    /// Normalises and resizes one image.
    pub fn prepare(&self, image: &RgbImage) -> Result<PlanarImage> {
        if image.width() == 0 || image.height() == 0 {
            return Err(Error::Invalid(format!(
                "empty image ({}×{})",
                image.width(),
                image.height()
            )));
        }
        let normalized = self.normalize(image);
        let (h, w) = self.resized_size(normalized.height, normalized.width);
        Ok(resize_bilinear(&normalized, h, w))
    }

    /// Transforms a batch of images (of any sizes) into one padded tensor on `device`.
    pub fn preprocess(&self, images: &[RgbImage], device: &Device) -> Result<ImageBatch> {
        self.validate()?;
        if images.is_empty() {
            return Err(Error::Invalid("empty batch: no images".into()));
        }
        let prepared = images
            .par_iter()
            .map(|im| self.prepare(im))
            .collect::<Result<Vec<_>>>()?;
        let original_sizes = images
            .iter()
            .map(|im| (im.height() as usize, im.width() as usize))
            .collect();
        let image_sizes = prepared.iter().map(|p| (p.height, p.width)).collect();
        let tensor = batch_images(&prepared, self.size_divisible, device)?;
        Ok(ImageBatch {
            tensor,
            image_sizes,
            original_sizes,
        })
    }
}

/// Zero-pads planar images to a common size, rounded up to a multiple of `size_divisible`,
/// and stacks them into an `(N, C, H, W)` f32 tensor on `device`.
pub fn batch_images(
    images: &[PlanarImage],
    size_divisible: usize,
    device: &Device,
) -> Result<Tensor> {
    let round_up = |v: usize| v.div_ceil(size_divisible) * size_divisible;
    let channels = images.iter().map(|i| i.channels).max().unwrap_or(3);
    let height = round_up(images.iter().map(|i| i.height).max().unwrap_or(0));
    let width = round_up(images.iter().map(|i| i.width).max().unwrap_or(0));
    let mut data = vec![0f32; images.len() * channels * height * width];
    for (im, out) in images
        .iter()
        .zip(data.chunks_exact_mut(channels * height * width))
    {
        for c in 0..im.channels {
            for y in 0..im.height {
                let src = &im.data[(c * im.height + y) * im.width..][..im.width];
                out[(c * height + y) * width..][..im.width].copy_from_slice(src);
            }
        }
    }
    let t = Tensor::from_vec(data, (images.len(), channels, height, width), &Device::Cpu)?;
    Ok(t.to_device(device)?.to_dtype(DType::F32)?)
}

/// Source indices and weights of one output coordinate for bilinear resampling.
#[derive(Debug, Clone, Copy)]
struct Tap {
    i0: usize,
    i1: usize,
    w0: f32,
    w1: f32,
}

/// PyTorch's `area_pixel_compute_source_index` with align_corners = false, in f32, where the
/// scale is recomputed from the integer sizes. PyTorch's x86 kernels are compiled with FMA
/// contraction, so `scale · (o + ½) − ½` is one fused operation; we fuse it too to get the
/// same bits.
fn taps(input: usize, output: usize) -> Vec<Tap> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = scale.mul_add(o as f32 + 0.5, -0.5).max(0.0);
            let i0 = (src as usize).min(input - 1);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            let w1 = (src - i0 as f32).clamp(0.0, 1.0);
            Tap {
                i0,
                i1,
                w0: 1.0 - w1,
                w1,
            }
        })
        .collect()
}

/// `a·w0 + b·w1` contracted as PyTorch's compiled kernel does: `fma(a, w0, b·w1)`.
fn lerp(a: f32, b: f32, w0: f32, w1: f32) -> f32 {
    a.mul_add(w0, b * w1)
}

/// Bilinear resize (align_corners = false, no antialiasing), bit-exact with PyTorch's
/// `F.interpolate(mode="bilinear")` on x86 CPUs for NCHW input with more than one thread (with
/// one thread PyTorch takes a channels-last kernel that rounds differently, by ~1 ulp).
pub fn resize_bilinear(image: &PlanarImage, height: usize, width: usize) -> PlanarImage {
    let ys = taps(image.height, height);
    let xs = taps(image.width, width);
    let (ih, iw) = (image.height, image.width);
    let mut data = vec![0f32; image.channels * height * width];
    data.par_chunks_mut(width)
        .enumerate()
        .for_each(|(row, out)| {
            let (c, y) = (row / height, row % height);
            let ty = ys[y];
            let r0 = &image.data[(c * ih + ty.i0) * iw..][..iw];
            let r1 = &image.data[(c * ih + ty.i1) * iw..][..iw];
            for (o, tx) in out.iter_mut().zip(&xs) {
                let t0 = lerp(r0[tx.i0], r0[tx.i1], tx.w0, tx.w1);
                let t1 = lerp(r1[tx.i0], r1[tx.i1], tx.w0, tx.w1);
                *o = lerp(t0, t1, ty.w0, ty.w1);
            }
        });
    PlanarImage {
        data,
        channels: image.channels,
        height,
        width,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resized_size_matches_torchvision() {
        let t = TransformConfig::default();
        assert_eq!(t.resized_size(480, 640), (800, 1066));
        assert_eq!(t.resized_size(300, 451), (800, 1202));
        // Long side bound: 400×2000 → scale 1333/2000.
        assert_eq!(t.resized_size(400, 2000), (266, 1333));
    }

    #[test]
    fn resize_to_same_size_is_identity() {
        let im = PlanarImage {
            data: (0..12).map(|v| v as f32).collect(),
            channels: 1,
            height: 3,
            width: 4,
        };
        assert_eq!(resize_bilinear(&im, 3, 4), im);
    }

    #[test]
    fn batch_pads_to_multiple_of_32() {
        let im = PlanarImage {
            data: vec![1.0; 3 * 33 * 40],
            channels: 3,
            height: 33,
            width: 40,
        };
        let t = batch_images(&[im], 32, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 64, 64]);
        let s = t.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(s, (3 * 33 * 40) as f32);
    }
}
