//! Aerial imagery: GeoTIFF input read window by window, boxes in map coordinates.
//!
//! [`GeoTiff`] reads 8-bit RGB or RGBA TIFFs (pixel-interleaved, stripped or tiled, any
//! compression the `tiff` crate decodes) one window at a time: it decodes only the strips or
//! tiles a window touches and keeps only those the current window needs, so tiled detection
//! ([`crate::tiling::detect_tiled_deepforest`]) holds a few windows of pixels however large
//! the raster (a stripped file: one band of strips as wide as the raster). Its GeoTIFF tags
//! give a [`GeoReference`]: the affine pixel → map transform (from `ModelTransformationTag`,
//! else `ModelTiepointTag` + `ModelPixelScaleTag`, shifted half a pixel for `PixelIsPoint` as
//! GDAL does) and the EPSG code of its CRS (`ProjectedCSTypeGeoKey`, else
//! `GeographicTypeGeoKey`).
//!
//! [`geojson`] writes detections as polygons in that CRS; [`deepforest_csv`] writes the
//! columns of DeepForest's `predict_tile` (`xmin,ymin,xmax,ymax,label,score,image_path`).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use image::RgbImage;
use tiff::decoder::{ChunkType, Decoder, DecodingResult, Limits};
use tiff::tags::{PlanarConfiguration, Tag};
use tiff::ColorType;

use crate::tiling::{Region, WindowSource};
use crate::{Detection, Error, Result, RetinaNet};

/// Pixel → map coordinates, in rasterio's (affine's) order: `x = a·col + b·row + c`,
/// `y = d·col + e·row + f`, for pixel corners (`(0, 0)` is the raster's top-left corner).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine(pub [f64; 6]);

impl Affine {
    /// The map coordinates of pixel position `(col, row)`.
    pub fn apply(&self, col: f64, row: f64) -> (f64, f64) {
        let [a, b, c, d, e, f] = self.0;
        (a * col + b * row + c, d * col + e * row + f)
    }
}

/// Where a raster lies on the map.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GeoReference {
    /// Pixel → map transform.
    pub transform: Affine,
    /// EPSG code of the CRS, where the GeoKeys give one.
    pub epsg: Option<u32>,
}

const PROJECTED_CS_TYPE: u16 = 3072;
const GEOGRAPHIC_TYPE: u16 = 2048;
const RASTER_TYPE: u16 = 1025;
const PIXEL_IS_POINT: u16 = 2;
const USER_DEFINED: u16 = 32767;

/// An 8-bit RGB(A) TIFF, read window by window.
pub struct GeoTiff {
    path: PathBuf,
    decoder: Decoder<BufReader<File>>,
    width: u32,
    height: u32,
    samples: usize,
    chunk: (u32, u32),
    tiled: bool,
    /// Decoded chunks by index: those the last window touched.
    cache: HashMap<u32, Vec<u8>>,
    georef: Option<GeoReference>,
}

impl std::fmt::Debug for GeoTiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoTiff")
            .field("path", &self.path)
            .field("size", &(self.width, self.height))
            .field("georef", &self.georef)
            .finish()
    }
}

/// Whether `path` names a TIFF (by extension).
pub fn is_tiff(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    ext.eq_ignore_ascii_case("tif") || ext.eq_ignore_ascii_case("tiff")
}

impl GeoTiff {
    /// Opens a TIFF; an error names the file and what it cannot read.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let err = |what: String| Error::Invalid(format!("{}: {what}", path.display()));
        let tiff_err = |e: tiff::TiffError| err(format!("cannot read TIFF: {e}"));
        // Chunks are decoded one at a time, so the whole-image limits do not apply.
        let mut decoder = Decoder::new(BufReader::new(file))
            .map_err(tiff_err)?
            .with_limits(Limits::unlimited());
        let (width, height) = decoder.dimensions().map_err(tiff_err)?;
        let samples = match decoder.colortype().map_err(tiff_err)? {
            ColorType::RGB(8) => 3,
            ColorType::RGBA(8) => 4,
            ColorType::Multiband {
                bit_depth: 8,
                num_samples,
            } if num_samples >= 3 => num_samples as usize,
            other => return Err(err(format!("{other:?} pixels; expected 8-bit RGB or RGBA"))),
        };
        let planar = decoder
            .find_tag_unsigned::<u16>(Tag::PlanarConfiguration)
            .map_err(tiff_err)?;
        if planar == Some(PlanarConfiguration::Planar.to_u16()) {
            return Err(err(
                "bands stored separately (PlanarConfiguration 2); expected pixel-interleaved \
                 (GDAL: INTERLEAVE=PIXEL)"
                    .into(),
            ));
        }
        let georef =
            read_georeference(&mut decoder).map_err(|e| err(format!("GeoTIFF tags: {e}")))?;
        let chunk = decoder.chunk_dimensions();
        let tiled = decoder.get_chunk_type() == ChunkType::Tile;
        Ok(Self {
            path,
            decoder,
            width,
            height,
            samples,
            chunk,
            tiled,
            cache: HashMap::new(),
            georef,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the raster lies, if its tags say.
    pub fn georeference(&self) -> Option<&GeoReference> {
        self.georef.as_ref()
    }

    /// The whole raster in memory.
    pub fn read_all(&mut self) -> Result<RgbImage> {
        let (width, height) = (self.width, self.height);
        self.read_window(&Region {
            x: 0,
            y: 0,
            width,
            height,
        })
    }

    /// Chunk indices a region touches.
    fn chunks_of(&self, r: &Region) -> Vec<u32> {
        let (cw, ch) = self.chunk;
        let rows = r.y / ch..=(r.y + r.height - 1) / ch;
        if !self.tiled {
            return rows.collect();
        }
        let across = self.width.div_ceil(cw);
        let cols = r.x / cw..=(r.x + r.width - 1) / cw;
        rows.flat_map(|ty| cols.clone().map(move |tx| ty * across + tx))
            .collect()
    }

    /// Top-left pixel of a chunk.
    fn chunk_origin(&self, index: u32) -> (u32, u32) {
        let (cw, ch) = self.chunk;
        if !self.tiled {
            return (0, index * ch);
        }
        let across = self.width.div_ceil(cw);
        ((index % across) * cw, (index / across) * ch)
    }

    fn decode(&mut self, index: u32) -> Result<()> {
        if self.cache.contains_key(&index) {
            return Ok(());
        }
        let data = match self.decoder.read_chunk(index) {
            Ok(DecodingResult::U8(v)) => v,
            Ok(_) => unreachable!("8-bit samples checked at open"),
            Err(e) => {
                return Err(Error::Invalid(format!(
                    "{}: cannot decode {} {index}: {e}",
                    self.path.display(),
                    if self.tiled { "tile" } else { "strip" }
                )))
            }
        };
        self.cache.insert(index, data);
        Ok(())
    }
}

impl WindowSource for GeoTiff {
    fn dimensions(&self) -> (u32, u32) {
        (self.width, self.height)
    }

    fn read_window(&mut self, r: &Region) -> Result<RgbImage> {
        if r.width == 0
            || r.height == 0
            || r.x + r.width > self.width
            || r.y + r.height > self.height
        {
            return Err(Error::Invalid(format!(
                "{}: window {r:?} outside the {}×{} raster",
                self.path.display(),
                self.width,
                self.height
            )));
        }
        let needed = self.chunks_of(r);
        self.cache.retain(|k, _| needed.contains(k));
        let mut out = RgbImage::new(r.width, r.height);
        for &index in &needed {
            self.decode(index)?;
            let (cx, cy) = self.chunk_origin(index);
            let (dw, dh) = self.decoder.chunk_data_dimensions(index);
            let data = &self.cache[&index];
            let (x0, x1) = (r.x.max(cx), (r.x + r.width).min(cx + dw));
            let (y0, y1) = (r.y.max(cy), (r.y + r.height).min(cy + dh));
            for y in y0..y1 {
                let row = ((y - cy) * dw) as usize;
                for x in x0..x1 {
                    let i = (row + (x - cx) as usize) * self.samples;
                    let p = [data[i], data[i + 1], data[i + 2]];
                    out.put_pixel(x - r.x, y - r.y, image::Rgb(p));
                }
            }
        }
        Ok(out)
    }
}

fn f64_vec(decoder: &mut Decoder<BufReader<File>>, tag: Tag) -> tiff::TiffResult<Option<Vec<f64>>> {
    match decoder.find_tag(tag)? {
        Some(v) => Ok(Some(v.into_f64_vec()?)),
        None => Ok(None),
    }
}

/// The georeference from GeoTIFF tags; `None` for a plain TIFF.
fn read_georeference(
    decoder: &mut Decoder<BufReader<File>>,
) -> std::result::Result<Option<GeoReference>, String> {
    let e = |e: tiff::TiffError| e.to_string();
    let matrix = f64_vec(decoder, Tag::ModelTransformationTag).map_err(e)?;
    let scale = f64_vec(decoder, Tag::ModelPixelScaleTag).map_err(e)?;
    let tie = f64_vec(decoder, Tag::ModelTiepointTag).map_err(e)?;
    let mut t = match (matrix, scale, tie) {
        (Some(m), _, _) if m.len() >= 8 => [m[0], m[1], m[3], m[4], m[5], m[7]],
        (_, Some(s), Some(t)) if s.len() >= 2 && t.len() >= 6 => {
            let (i, j, x, y) = (t[0], t[1], t[3], t[4]);
            [s[0], 0.0, x - i * s[0], 0.0, -s[1], y + j * s[1]]
        }
        (None, None, None) => return Ok(None),
        _ => return Err(
            "a transform needs ModelTransformationTag, or ModelTiepointTag with ModelPixelScaleTag"
                .into(),
        ),
    };
    let keys = match decoder.find_tag(Tag::GeoKeyDirectoryTag).map_err(e)? {
        Some(v) => v.into_u16_vec().map_err(e)?,
        None => Vec::new(),
    };
    let key = |id: u16| {
        keys.get(4..)
            .unwrap_or_default()
            .chunks_exact(4)
            // Location 0: the value is the entry's own last field.
            .find(|k| k[0] == id && k[1] == 0)
            .map(|k| k[3])
    };
    if key(RASTER_TYPE) == Some(PIXEL_IS_POINT) {
        // GDAL's reading: tie points name pixel centres, the transform pixel corners.
        t[2] -= 0.5 * t[0] + 0.5 * t[1];
        t[5] -= 0.5 * t[3] + 0.5 * t[4];
    }
    let epsg = [PROJECTED_CS_TYPE, GEOGRAPHIC_TYPE]
        .into_iter()
        .filter_map(key)
        .find(|&c| c != 0 && c != USER_DEFINED)
        .map(u32::from);
    Ok(Some(GeoReference {
        transform: Affine(t),
        epsg,
    }))
}

/// The label's name where the model has one, else the number.
fn label_name(model: &RetinaNet, d: &Detection) -> String {
    model
        .class_name(d.label)
        .map_or_else(|| d.label.to_string(), str::to_string)
}

/// One image's detections for [`geojson`].
pub struct GeoDetections<'a> {
    /// The image's file name (`image_path` property).
    pub image: String,
    /// Where it lies.
    pub georef: GeoReference,
    /// Its detections in pixels.
    pub detections: &'a [Detection],
}

/// A GeoJSON FeatureCollection of box polygons in the rasters' CRS (named in the legacy
/// `crs` member, as GDAL writes it, since RFC 7946 assumes WGS 84), with properties `label`,
/// `score` and `image_path`. All images must share one CRS.
pub fn geojson(images: &[GeoDetections], model: &RetinaNet) -> Result<serde_json::Value> {
    let epsgs: Vec<Option<u32>> = images.iter().map(|i| i.georef.epsg).collect();
    if epsgs.windows(2).any(|w| w[0] != w[1]) {
        return Err(Error::Invalid(format!(
            "GeoJSON output needs one CRS, the images have EPSG codes {epsgs:?}"
        )));
    }
    let mut features = Vec::new();
    for img in images {
        for d in img.detections {
            let [x1, y1, x2, y2] = d.bbox.map(f64::from);
            let ring: Vec<[f64; 2]> = [(x1, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1)]
                .iter()
                .map(|&(c, r)| {
                    let (x, y) = img.georef.transform.apply(c, r);
                    [x, y]
                })
                .collect();
            features.push(serde_json::json!({
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "label": label_name(model, d),
                    "score": d.score,
                    "image_path": img.image,
                },
            }));
        }
    }
    let mut out = serde_json::json!({"type": "FeatureCollection", "features": features});
    if let Some(Some(code)) = epsgs.first() {
        out["crs"] = serde_json::json!({
            "type": "name",
            "properties": {"name": format!("urn:ogc:def:crs:EPSG::{code}")},
        });
    }
    Ok(out)
}

/// DeepForest's `predict_tile` table as CSV: `xmin,ymin,xmax,ymax,label,score,image_path`,
/// boxes in pixels, `label` the class name, `image_path` the file name.
pub fn deepforest_csv(images: &[(String, Vec<Detection>)], model: &RetinaNet) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let row_err = |e: csv::Error| Error::Invalid(format!("cannot write CSV: {e}"));
    w.write_record([
        "xmin",
        "ymin",
        "xmax",
        "ymax",
        "label",
        "score",
        "image_path",
    ])
    .map_err(row_err)?;
    for (image, detections) in images {
        for d in detections {
            let [x1, y1, x2, y2] = d.bbox;
            w.write_record([
                x1.to_string(),
                y1.to_string(),
                x2.to_string(),
                y2.to_string(),
                label_name(model, d),
                d.score.to_string(),
                image.clone(),
            ])
            .map_err(row_err)?;
        }
    }
    w.into_inner()
        .map_err(|e| Error::Invalid(format!("cannot write CSV: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4×3 RGB TIFF with the given GeoTIFF tags.
    fn tiff_with(name: &str, tags: &[(Tag, Vec<f64>)], keys: &[u16]) -> PathBuf {
        use tiff::encoder::{colortype::RGB8, TiffEncoder};
        let path =
            std::env::temp_dir().join(format!("retinanet-geo-{}-{name}.tif", std::process::id()));
        let file = File::create(&path).unwrap();
        let mut encoder = TiffEncoder::new(std::io::BufWriter::new(file)).unwrap();
        let mut image = encoder.new_image::<RGB8>(4, 3).unwrap();
        for (tag, values) in tags {
            image.encoder().write_tag(*tag, &values[..]).unwrap();
        }
        if !keys.is_empty() {
            image
                .encoder()
                .write_tag(Tag::GeoKeyDirectoryTag, keys)
                .unwrap();
        }
        let pixels: Vec<u8> = (0..36).collect();
        image.write_data(&pixels).unwrap();
        path
    }

    #[test]
    fn georeference_from_tie_point_and_scale_or_matrix() {
        // Version header, then (key, location 0, count 1, value): Projected CRS 3857,
        // raster type PixelIsPoint.
        let keys = [1, 1, 0, 2, 3072, 0, 1, 3857, 1025, 0, 1, 2];
        let tie = vec![0.0, 0.0, 0.0, 100.0, 200.0, 0.0];
        let scale = vec![2.0, 3.0, 0.0];
        let tags = [
            (Tag::ModelTiepointTag, tie),
            (Tag::ModelPixelScaleTag, scale),
        ];
        let path = tiff_with("point", &tags, &keys);
        let mut tiff = GeoTiff::open(&path).unwrap();
        let g = *tiff.georeference().unwrap();
        // GDAL: a PixelIsPoint tie point is a pixel centre, so corners move half a pixel.
        assert_eq!(g.transform.0, [2.0, 0.0, 99.0, 0.0, -3.0, 201.5]);
        assert_eq!(g.epsg, Some(3857));
        let all = tiff.read_all().unwrap();
        assert_eq!(all.get_pixel(3, 2).0, [33, 34, 35]);
        std::fs::remove_file(&path).unwrap();

        let matrix = vec![
            0.5, 0.1, 0.0, 10.0, 0.2, -0.5, 0.0, 20.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0,
        ];
        let keys = [1, 1, 0, 1, 2048, 0, 1, 4326];
        let path = tiff_with("matrix", &[(Tag::ModelTransformationTag, matrix)], &keys);
        let g = *GeoTiff::open(&path).unwrap().georeference().unwrap();
        assert_eq!(g.transform.0, [0.5, 0.1, 10.0, 0.2, -0.5, 20.0]);
        assert_eq!(g.epsg, Some(4326));
        std::fs::remove_file(&path).unwrap();

        let path = tiff_with("plain", &[], &[]);
        assert!(GeoTiff::open(&path).unwrap().georeference().is_none());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn affine_maps_pixel_corners() {
        let t = Affine([0.1, 0.0, 541040.0, 0.0, -0.1, 4977940.0]);
        assert_eq!(t.apply(0.0, 0.0), (541040.0, 4977940.0));
        let (x, y) = t.apply(10.0, 20.0);
        assert!((x - 541041.0).abs() < 1e-9 && (y - 4977938.0).abs() < 1e-9);
    }
}
