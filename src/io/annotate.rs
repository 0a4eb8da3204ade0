//! Annotated images: detections drawn as boxes in a colour per class, labelled with class
//! name and score in the bundled DejaVu Sans Mono Bold.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use image::{Rgb, RgbImage};

use crate::{Detection, Error, Result, RetinaNet};

/// DejaVu Sans Mono Bold (Bitstream Vera licence, see `assets/fonts/LICENSE-DejaVu.txt`).
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSansMono-Bold.ttf");

/// Draws detections scoring at least `threshold` on a copy of `image`: boxes with class name
/// (from `model`, else `#label`) and score, best detections drawn last (on top).
pub fn annotate(
    image: &RgbImage,
    detections: &[Detection],
    model: &RetinaNet,
    threshold: f32,
) -> Result<RgbImage> {
    let font =
        FontRef::try_from_slice(FONT).map_err(|e| Error::Invalid(format!("bundled font: {e}")))?;
    let mut img = image.clone();
    let short = image.width().min(image.height()) as f32;
    let thickness = (short / 320.0).round().max(1.0) as i64;
    let px = (short / 40.0).clamp(11.0, 40.0);
    for d in detections.iter().filter(|d| d.score >= threshold).rev() {
        let colour = class_colour(d.label);
        let [x0, y0, x1, y1] = d.bbox.map(|v| v.round() as i64);
        fill_rect(&mut img, x0, y0, x1, y0 + thickness, colour);
        fill_rect(&mut img, x0, y1 - thickness, x1, y1, colour);
        fill_rect(&mut img, x0, y0, x0 + thickness, y1, colour);
        fill_rect(&mut img, x1 - thickness, y0, x1, y1, colour);
        let name = model
            .class_name(d.label)
            .map_or_else(|| format!("#{}", d.label), str::to_string);
        label(
            &mut img,
            &font,
            px,
            (x0, y0),
            &format!("{name} {:.2}", d.score),
            colour,
        );
    }
    Ok(img)
}

/// Where each of `images` is written annotated in the folder `dir`: its file name there
/// (the folder is created with the first file written, so a run that fails first leaves
/// none). Refuses two inputs with one name, overwriting an input, and extensions no
/// encoder writes.
pub fn output_paths(dir: &Path, images: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut seen: HashMap<PathBuf, &Path> = HashMap::new();
    let mut out = Vec::with_capacity(images.len());
    for image in images {
        let invalid = |what: String| Error::Invalid(format!("--out: {what}"));
        let name = image
            .file_name()
            .ok_or_else(|| invalid(format!("{} has no file name", image.display())))?;
        let dest = dir.join(name);
        if let Some(other) = seen.insert(dest.clone(), image) {
            let (a, b, d) = (other.display(), image.display(), dest.display());
            return Err(invalid(format!("{a} and {b} would both be written to {d}")));
        }
        if let (Ok(a), Ok(b)) = (dest.canonicalize(), image.canonicalize()) {
            if a == b {
                let d = dest.display();
                return Err(invalid(format!("{d} would overwrite the input image")));
            }
        }
        image::ImageFormat::from_path(&dest)
            .map_err(|_| invalid(format!("no encoder for {}", dest.display())))?;
        out.push(dest);
    }
    Ok(out)
}

/// A filled label with `text` above the box corner `(x0, y0)`, or inside the box at the top
/// edge of the image; ink black or white, whichever reads better on `colour`.
fn label(
    img: &mut RgbImage,
    font: &FontRef,
    px: f32,
    corner: (i64, i64),
    text: &str,
    colour: Rgb<u8>,
) {
    let (x0, y0) = corner;
    let (tw, th) = text_size(font, px, text);
    let pad = (px / 6.0).ceil();
    let (bw, bh) = ((tw + 2.0 * pad).ceil() as i64, (th + pad).ceil() as i64);
    let ty = if y0 - bh >= 0 { y0 - bh } else { y0 };
    let tx = x0.min(img.width() as i64 - bw).max(0);
    fill_rect(img, tx, ty, tx + bw, ty + bh, colour);
    let luma = 0.299 * colour[0] as f32 + 0.587 * colour[1] as f32 + 0.114 * colour[2] as f32;
    let ink = if luma > 140.0 {
        Rgb([0, 0, 0])
    } else {
        Rgb([255, 255, 255])
    };
    draw_text(
        img,
        font,
        px,
        (tx as f32 + pad, ty as f32 + pad / 2.0),
        text,
        ink,
    );
}

/// A bright colour per class: hues spaced by the golden ratio.
pub fn class_colour(label: usize) -> Rgb<u8> {
    let h = (label as f32 * 0.618_034).fract() * 6.0;
    let (s, v) = (0.85f32, 0.95f32);
    let c = v * s;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    Rgb([r, g, b].map(|u| ((u + m) * 255.0).round() as u8))
}

fn fill_rect(img: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, colour: Rgb<u8>) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    for y in y0.max(0)..y1.min(h) {
        for x in x0.max(0)..x1.min(w) {
            img.put_pixel(x as u32, y as u32, colour);
        }
    }
}

/// Draws `text` with its top-left corner at `(x, y)`, blending by glyph coverage.
fn draw_text(
    img: &mut RgbImage,
    font: &FontRef,
    px: f32,
    (x, y): (f32, f32),
    text: &str,
    colour: Rgb<u8>,
) {
    let scaled = font.as_scaled(PxScale::from(px));
    let mut caret = x;
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        let glyph = id.with_scale_and_position(px, ab_glyph::point(caret, y + scaled.ascent()));
        caret += scaled.h_advance(id);
        let Some(outline) = font.outline_glyph(glyph) else {
            continue;
        };
        let b = outline.px_bounds();
        outline.draw(|gx, gy, coverage| {
            let (px_x, px_y) = (b.min.x as i64 + gx as i64, b.min.y as i64 + gy as i64);
            if px_x < 0 || px_y < 0 || px_x >= img.width() as i64 || px_y >= img.height() as i64 {
                return;
            }
            let p = img.get_pixel_mut(px_x as u32, px_y as u32);
            for k in 0..3 {
                let blended = p[k] as f32 * (1.0 - coverage) + colour[k] as f32 * coverage;
                p[k] = blended.round() as u8;
            }
        });
    }
}

fn text_size(font: &FontRef, px: f32, text: &str) -> (f32, f32) {
    let scaled = font.as_scaled(PxScale::from(px));
    let width = text
        .chars()
        .map(|c| scaled.h_advance(scaled.glyph_id(c)))
        .sum();
    (width, scaled.ascent() - scaled.descent())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_colours_are_bright_and_distinct() {
        let colours: Vec<_> = (0..20).map(class_colour).collect();
        for (i, c) in colours.iter().enumerate() {
            assert!(c.0.iter().any(|&v| v >= 240), "{c:?}");
            assert!(colours[..i].iter().all(|o| o != c), "label {i}");
        }
    }
}
