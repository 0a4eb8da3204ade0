//! Strict image decoding: a truncated or corrupt file is an error naming it, in every format.
//!
//! The `image` crate decodes JPEG leniently (zune-jpeg outside strict mode fills a truncated
//! scan with grey and carries on, as browsers do), so JPEG is decoded here with zune-jpeg in
//! strict mode, asking for the colour space `image` asks for, so that good files give the
//! same pixels. Other formats go through `image`, which already rejects truncation. Decoded
//! buffers are bounded ([`MAX_PIXELS`]) so that a header claiming a huge image is refused
//! with the figure instead of aborting the process.

use std::path::Path;

use image::{DynamicImage, RgbImage};
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;

use super::{io_err, DataError, Result};

/// The most pixels an image may have: 2^28 (16384 × 16384, 768 MiB as RGB). Aerial
/// orthophotos beyond it must be cut up first.
pub const MAX_PIXELS: u64 = 1 << 28;

/// Decodes an image file to RGB, trusting its content over its extension.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    decode_rgb_bytes(&bytes, path)
}

/// Decodes an image held in memory to RGB; errors name `path`.
pub fn decode_rgb_bytes(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let image_err = |source| DataError::Image {
        path: path.to_path_buf(),
        source,
    };
    let corrupt = |message: String| DataError::Parse {
        file: path.to_path_buf(),
        line: None,
        message: format!("cannot read image: {message}"),
    };
    if bytes.starts_with(&[0xFF, 0xD8]) {
        return decode_jpeg(bytes).map_err(corrupt);
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(io_err(path))?;
    let (w, h) = reader_dimensions(bytes).map_err(image_err)?;
    check_pixels(w, h).map_err(corrupt)?;
    Ok(reader.decode().map_err(image_err)?.to_rgb8())
}

/// An image's size from its header.
fn reader_dimensions(bytes: &[u8]) -> image::ImageResult<(u32, u32)> {
    image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()?
        .into_dimensions()
}

fn check_pixels(w: u32, h: u32) -> std::result::Result<(), String> {
    let pixels = u64::from(w) * u64::from(h);
    if pixels == 0 || pixels > MAX_PIXELS {
        let mib = (pixels * 3) >> 20;
        return Err(format!(
            "{w}×{h} pixels ({mib} MiB as RGB): at most {MAX_PIXELS} pixels and none empty"
        ));
    }
    Ok(())
}

/// Strict JPEG decoding: premature ends, corrupt entropy data and stray markers are errors.
fn decode_jpeg(bytes: &[u8]) -> std::result::Result<RgbImage, String> {
    let jpeg = |e: zune_jpeg::errors::DecodeErrors| format!("corrupt JPEG: {e}");
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(usize::MAX)
        .set_max_height(usize::MAX);
    let mut decoder = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    decoder.decode_headers().map_err(jpeg)?;
    let (w, h) = decoder.dimensions().ok_or("JPEG without a frame header")?;
    let (w, h) = (w as u32, h as u32);
    check_pixels(w, h)?;
    let input = decoder
        .input_colorspace()
        .ok_or("JPEG without a colour space")?;
    // As `image` does: keep RGB(A) and grey (with alpha), convert the rest to RGB.
    let out = match input {
        ColorSpace::RGB | ColorSpace::RGBA | ColorSpace::Luma | ColorSpace::LumaA => input,
        _ => ColorSpace::RGB,
    };
    decoder.set_options(decoder.options().jpeg_set_out_colorspace(out));
    let pixels = decoder.decode().map_err(jpeg)?;
    let short = || format!("JPEG decoded to fewer bytes than {w}×{h} {out:?}");
    let image = match out {
        ColorSpace::RGB => {
            DynamicImage::ImageRgb8(RgbImage::from_raw(w, h, pixels).ok_or_else(short)?)
        }
        ColorSpace::RGBA => {
            DynamicImage::ImageRgba8(image::RgbaImage::from_raw(w, h, pixels).ok_or_else(short)?)
        }
        ColorSpace::Luma => {
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, pixels).ok_or_else(short)?)
        }
        _ => DynamicImage::ImageLumaA8(
            image::GrayAlphaImage::from_raw(w, h, pixels).ok_or_else(short)?,
        ),
    };
    Ok(image.to_rgb8())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bccd_jpeg() -> Option<(std::path::PathBuf, Vec<u8>)> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data/bccd/JPEGImages/BloodImage_00000.jpg");
        let bytes = std::fs::read(&path).ok()?;
        Some((path, bytes))
    }

    #[test]
    fn good_jpegs_decode_as_the_image_crate_does() {
        let Some((path, bytes)) = bccd_jpeg() else {
            eprintln!("skipped: ../shared/data/bccd missing");
            return;
        };
        let ours = decode_rgb(&path).unwrap();
        let theirs = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(ours, theirs);
    }

    #[test]
    fn truncated_and_corrupt_jpegs_are_errors_naming_the_file() {
        let Some((path, bytes)) = bccd_jpeg() else {
            eprintln!("skipped: ../shared/data/bccd missing");
            return;
        };
        // The lenient decoder accepts this truncation: the check is not vacuous.
        let cut = &bytes[..bytes.len() * 2 / 3];
        assert!(image::load_from_memory(cut).is_ok());
        let err = decode_rgb_bytes(cut, &path).unwrap_err().to_string();
        assert!(
            err.contains("BloodImage_00000.jpg") && err.contains("corrupt JPEG"),
            "{err}"
        );
        let mut garbled = bytes.clone();
        let mid = garbled.len() / 2;
        garbled[mid..mid + 64].fill(0xFF);
        assert!(decode_rgb_bytes(&garbled, &path).is_err());
    }

    #[test]
    fn a_header_claiming_a_huge_image_is_refused_with_the_figure() {
        let Some((_, mut bytes)) = bccd_jpeg() else {
            eprintln!("skipped: ../shared/data/bccd missing");
            return;
        };
        // The baseline frame header: FF C0, length, precision, height, width.
        let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        bytes[sof + 5..sof + 9].copy_from_slice(&[0xFF; 4]);
        let err = decode_rgb_bytes(&bytes, Path::new("big.jpg"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("big.jpg") && err.contains("65535×65535 pixels"),
            "{err}"
        );
    }
}
