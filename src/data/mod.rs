//! Detection datasets for fine-tuning: loading, validation, augmentation and batching.
//!
//! [`load`] reads COCO JSON, Pascal VOC XML, YOLO txt and CSV (`image,x1,y1,x2,y2,label`)
//! annotations into one [`Dataset`], detecting the format when none is given. Loading
//! validates every box: boxes reaching outside the image are clipped, empty or inverted
//! boxes, unknown classes and missing images are skipped with a [`Warning`] that names the
//! file and line (or object), and [`LoadOpts::strict`] turns those skips into errors.
//!
//! # Label convention
//!
//! Labels are 0-based and contiguous over the dataset's classes: `labels[i]` indexes
//! [`Dataset::class_names`], and a model for the dataset has `num_classes = K =
//! class_names.len()` sigmoid outputs (RetinaNet has no background class).
//! - VOC and CSV: classes sorted by name, unless [`LoadOpts::classes`] fixes the list.
//!   The names are collected over every split of the dataset, so splits agree.
//! - YOLO: the order of `names` in `data.yaml` (or `classes.txt`); labels are the file's
//!   class indices unchanged.
//! - COCO: categories sorted by id; [`Dataset::category_ids`] maps a label back to its
//!   COCO category id (for evaluation), and [`Sample::image_id`] keeps the image id.
//!
//! When loading a validation set separately, pass the training set's names in
//! [`LoadOpts::classes`] so both use the same indices.
//!
//! Boxes are `[x1, y1, x2, y2]` in pixels of the image (or of the tile, for tiled
//! samples), as torchvision's detection models take them.
//!
//! [`augment`] holds flips, multi-scale size choice, random crops and tiling; [`Loader`]
//! decodes and augments batches in parallel on a background thread.

mod augment;
mod coco;
mod csv_format;
mod decode;
mod loader;
mod voc;
mod yolo;

use std::fmt;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

/// The window of a source image a tile or crop covers (the type tiled inference uses).
pub use crate::tiling::Region;
pub use augment::{
    augment, crop_boxes, AugmentConfig, Augmented, CropConfig, Rng, TileConfig, TileStats,
};
pub use decode::{decode_rgb, decode_rgb_bytes, MAX_PIXELS};
pub use loader::{Batch, Batches, Loader, LoaderConfig, Target};

/// Result type of this module.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// The image extensions this crate decodes (with `image`'s features it enables), lower case;
/// matched case-insensitively. Folders yield these files; an annotation naming a missing
/// image falls back to a file with the same stem and one of these (tried in this order, then
/// in upper case).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Split folder and list names tried for a split, so `val` also finds `valid`.
fn split_aliases(split: &str) -> Vec<String> {
    let mut names = vec![split.to_string()];
    match split {
        "val" => names.push("valid".into()),
        "valid" => names.push("val".into()),
        _ => {}
    }
    names
}

/// Split names recognised as subfolders of a dataset.
const SPLIT_NAMES: [&str; 4] = ["train", "val", "valid", "test"];

/// Errors of dataset loading and batching.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An annotation file is malformed.
    #[error("{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Parse {
        /// The annotation file.
        file: PathBuf,
        /// 1-based line, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// Strict loading met a problem that would otherwise skip data.
    #[error("{0} (rejected by strict loading)")]
    Strict(Warning),
    /// An image could not be read or decoded.
    #[error("{}: cannot read image: {source}", path.display())]
    Image {
        /// The image file.
        path: PathBuf,
        /// The decoder's error.
        source: image::ImageError,
    },
    /// The format of a path could not be detected.
    #[error("{}: cannot detect the dataset format (expected a COCO .json, a .csv, a VOC folder with Annotations/ or .xml files, or a YOLO folder with data.yaml, images/ and labels/ or .txt files); give the format explicitly", path.display())]
    UnknownFormat {
        /// The path given.
        path: PathBuf,
    },
    /// An option or an argument is invalid.
    #[error("{0}")]
    Invalid(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Annotation formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// COCO JSON (`images`, `annotations`, `categories`).
    Coco,
    /// Pascal VOC XML, one file per image.
    Voc,
    /// YOLO txt, one file per image: `class cx cy w h` normalised to [0, 1].
    Yolo,
    /// CSV rows `image,x1,y1,x2,y2,label` in pixels; an optional header row.
    Csv,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Coco => "coco",
            Format::Voc => "voc",
            Format::Yolo => "yolo",
            Format::Csv => "csv",
        })
    }
}

impl std::str::FromStr for Format {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "coco" | "json" => Ok(Format::Coco),
            "voc" | "pascal" | "pascal-voc" | "xml" => Ok(Format::Voc),
            "yolo" | "txt" => Ok(Format::Yolo),
            "csv" => Ok(Format::Csv),
            _ => Err(DataError::Invalid(format!(
                "unknown dataset format `{s}` (expected coco, voc, yolo or csv)"
            ))),
        }
    }
}

/// Options of [`load`].
#[derive(Debug, Clone)]
pub struct LoadOpts {
    /// Fail on the first problem that would skip data (see [`WarningKind::skips_data`]).
    pub strict: bool,
    /// Split to load (`train`, `val`/`valid`, `test`, ...): a VOC `ImageSets/Main/{split}.txt`
    /// list or a split subfolder. `None` loads every split.
    pub split: Option<String>,
    /// Class names fixing the label order; objects of other classes are skipped with a
    /// warning. `None` takes the classes from the data.
    pub classes: Option<Vec<String>>,
    /// Folder that COCO `file_name`s and CSV image paths are relative to; by default the
    /// annotation file's folder (and, for COCO, its `images/` subfolder).
    pub image_root: Option<PathBuf>,
    /// Check that every image exists and read its size from its header. COCO and VOC
    /// annotations carry the size, so they load without images when this is off.
    pub check_images: bool,
}

impl Default for LoadOpts {
    fn default() -> Self {
        Self {
            strict: false,
            split: None,
            classes: None,
            image_root: None,
            check_images: true,
        }
    }
}

/// What a [`Warning`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WarningKind {
    /// A box reached outside the image and was clipped to it (kept).
    ClippedBox,
    /// A box has zero width or height, or lies outside the image (skipped).
    EmptyBox,
    /// A box has x2 < x1 or y2 < y1, or a non-finite coordinate (skipped).
    InvertedBox,
    /// An object's class is not among the dataset's classes (skipped).
    UnknownClass,
    /// An annotation names an image that is not there, or an image id that the file does
    /// not define (skipped).
    UnknownImage,
    /// An image header could not be read (skipped).
    UnreadableImage,
    /// The annotated image was missing and a file with the same stem was used instead.
    ImageFallback,
    /// The size written in the annotation differs from the image's; the image's is used.
    SizeMismatch,
    /// A COCO crowd annotation (`iscrowd: 1`) was left out, as torchvision's training does.
    Crowd,
    /// An image has no annotation file; it is kept as an image without objects.
    NoAnnotation,
    /// No class names were given (YOLO without `data.yaml` or `classes.txt`): the classes
    /// were numbered up to the largest label used, and named by their numbers.
    ClassesGuessed,
}

impl WarningKind {
    /// Whether the problem drops data (a box or an image); strict loading rejects these.
    pub fn skips_data(self) -> bool {
        matches!(
            self,
            WarningKind::EmptyBox
                | WarningKind::InvertedBox
                | WarningKind::UnknownClass
                | WarningKind::UnknownImage
                | WarningKind::UnreadableImage
        )
    }
}

/// A problem found while loading, and what was done about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Warning {
    /// The annotation file.
    pub file: PathBuf,
    /// 1-based line in `file`, when the format has lines (VOC: the `<object>` tag's line).
    pub line: Option<usize>,
    /// The kind of problem.
    pub kind: WarningKind,
    /// What was wrong and what was done, naming the object.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// One annotated image (or one tile of an image).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The image file.
    pub image_path: PathBuf,
    /// Width of the sample in pixels (the region's, for a tile).
    pub width: u32,
    /// Height of the sample in pixels.
    pub height: u32,
    /// Boxes `[x1, y1, x2, y2]` in the sample's pixels, inside `[0, width] × [0, height]`.
    pub boxes: Vec<[f32; 4]>,
    /// Label of each box, indexing [`Dataset::class_names`].
    pub labels: Vec<usize>,
    /// The window of the image this sample covers; `None` for the whole image.
    pub region: Option<Region>,
    /// COCO image id, for mapping detections back to the annotation file.
    pub image_id: Option<i64>,
}

impl Sample {
    /// The image file's path, with the tile's position for a tile (for messages).
    pub fn name(&self) -> String {
        match self.region {
            Some(r) => format!("{} at ({}, {})", self.image_path.display(), r.x, r.y),
            None => self.image_path.display().to_string(),
        }
    }

    /// A whole image of `width × height` pixels, without boxes yet.
    fn unannotated(image_path: PathBuf, width: u32, height: u32) -> Self {
        Self {
            image_path,
            width,
            height,
            boxes: Vec::new(),
            labels: Vec::new(),
            region: None,
            image_id: None,
        }
    }

    /// Decodes the image (and crops the region, for a tile) as RGB.
    pub fn load_image(&self) -> Result<image::RgbImage> {
        let image = decode_rgb(&self.image_path)?;
        if self.region.is_none() && image.dimensions() == (self.width, self.height) {
            return Ok(image);
        }
        self.crop_decoded(&image)
    }

    /// Cuts this sample's region out of its decoded source image, checking the sizes the
    /// boxes were validated against.
    pub fn crop_decoded(&self, image: &image::RgbImage) -> Result<image::RgbImage> {
        let (w, h) = image.dimensions();
        let region = self.region.unwrap_or(Region {
            x: 0,
            y: 0,
            width: self.width,
            height: self.height,
        });
        let fits = region.x.checked_add(region.width).is_some_and(|r| r <= w)
            && region.y.checked_add(region.height).is_some_and(|b| b <= h);
        let whole = self.region.is_none() && (w, h) == (self.width, self.height);
        if self.region.is_none() && !whole || !fits {
            return Err(DataError::Invalid(format!(
                "{}: image is {w}x{h}, the annotation expects {}x{}{}",
                self.image_path.display(),
                self.width,
                self.height,
                self.region
                    .map(|r| format!(" at ({}, {})", r.x, r.y))
                    .unwrap_or_default()
            )));
        }
        if whole {
            return Ok(image.clone());
        }
        let view =
            image::imageops::crop_imm(image, region.x, region.y, region.width, region.height);
        Ok(view.to_image())
    }
}

/// A loaded dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Annotated images, in a stable order (file or annotation order).
    pub samples: Vec<Sample>,
    /// Class names; a label is an index into this list.
    pub class_names: Vec<String>,
    /// COCO only: the category id of each label.
    pub category_ids: Option<Vec<i64>>,
    /// Problems found while loading, in file order.
    pub warnings: Vec<Warning>,
    /// The format the data was read as.
    pub format: Format,
    /// The path it was loaded from.
    pub source: PathBuf,
}

impl Dataset {
    /// A dataset of per-image results in image order (the loaders' `build_sample`s), their
    /// warnings gathered in the same order; no COCO category ids.
    fn from_built(
        format: Format,
        source: &Path,
        class_names: Vec<String>,
        built: Vec<(Option<Sample>, Report)>,
    ) -> Self {
        let mut samples = Vec::new();
        let mut warnings = Vec::new();
        for (sample, report) in built {
            samples.extend(sample);
            warnings.extend(report.warnings);
        }
        Self {
            samples,
            class_names,
            category_ids: None,
            warnings,
            format,
            source: source.to_path_buf(),
        }
    }

    /// Number of classes `K` (the model's `num_classes`).
    pub fn num_classes(&self) -> usize {
        self.class_names.len()
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Total number of boxes.
    pub fn num_boxes(&self) -> usize {
        self.samples.iter().map(|s| s.boxes.len()).sum()
    }

    /// Number of boxes of each class; a class with very few boxes stands out here.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.class_names.len()];
        for &label in self.samples.iter().flat_map(|s| &s.labels) {
            counts[label] += 1;
        }
        counts
    }

    /// Drops samples without boxes (torchvision's COCO training does this).
    pub fn retain_non_empty(&mut self) {
        self.samples.retain(|s| !s.boxes.is_empty());
    }

    /// Warnings of one kind.
    pub fn warnings_of(&self, kind: WarningKind) -> impl Iterator<Item = &Warning> {
        self.warnings.iter().filter(move |w| w.kind == kind)
    }

    /// One line per class with its box count, then the sample count and warning count.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} ({}): {} images, {} boxes, {} classes, {} warnings\n",
            self.source.display(),
            self.format,
            self.len(),
            self.num_boxes(),
            self.num_classes(),
            self.warnings.len()
        );
        let unreadable = self
            .warnings
            .iter()
            .filter(|w| w.kind == WarningKind::UnreadableImage)
            .count();
        if unreadable > 0 {
            out.push_str(&format!(
                "  {unreadable} unreadable image(s) skipped (see the warnings)\n"
            ));
        }
        for (name, count) in self.class_names.iter().zip(self.class_counts()) {
            out.push_str(&format!("  {name}: {count}\n"));
        }
        out
    }
}

/// Loads a dataset from `path`, detecting the format when `format` is `None`.
///
/// `path` is a COCO `.json` file, a `.csv` file, a VOC folder (with `Annotations/`, or
/// `.xml` files beside the images) or a YOLO folder (with `data.yaml`, `images/` and
/// `labels/`, or `.txt` files beside the images). Split subfolders (`train/`, `valid/`,
/// ...) are recognised; [`LoadOpts::split`] picks one.
pub fn load(path: impl AsRef<Path>, format: Option<Format>, opts: &LoadOpts) -> Result<Dataset> {
    let path = path.as_ref();
    if !path.exists() {
        return Err(DataError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        });
    }
    let format = match format {
        Some(f) => f,
        None => detect_format(path)?,
    };
    let dataset = match format {
        Format::Coco => coco::load(path, opts),
        Format::Voc => voc::load(path, opts),
        Format::Yolo => yolo::load(path, opts),
        Format::Csv => csv_format::load(path, opts),
    }?;
    debug_assert!(dataset
        .samples
        .iter()
        .all(|s| s.boxes.len() == s.labels.len()));
    Ok(dataset)
}

/// Detects the annotation format of a file or folder.
pub fn detect_format(path: &Path) -> Result<Format> {
    let unknown = || DataError::UnknownFormat {
        path: path.to_path_buf(),
    };
    if path.is_file() {
        return match extension(path).as_deref() {
            Some("json") => Ok(Format::Coco),
            Some("csv") => Ok(Format::Csv),
            Some("yaml" | "yml") => Ok(Format::Yolo),
            Some("xml") => Ok(Format::Voc),
            _ => Err(unknown()),
        };
    }
    if path.join("Annotations").is_dir() {
        return Ok(Format::Voc);
    }
    if yolo::yaml_path(path).is_some()
        || path.join("images").is_dir() && path.join("labels").is_dir()
    {
        return Ok(Format::Yolo);
    }
    let files = list_files(path)?;
    let has = |ext: &str| files.iter().any(|f| extension(f).as_deref() == Some(ext));
    if has("xml") {
        return Ok(Format::Voc);
    }
    if yolo::has_paired_labels(&files) {
        return Ok(Format::Yolo);
    }
    if has("json") {
        return Ok(Format::Coco);
    }
    if has("csv") {
        return Ok(Format::Csv);
    }
    for split in SPLIT_NAMES {
        let sub = path.join(split);
        if sub.is_dir() {
            return detect_format(&sub).map_err(|_| unknown());
        }
    }
    Err(unknown())
}

/// Lowercase extension of a path.
fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
}

/// Whether a path has one of the [`IMAGE_EXTENSIONS`], in any case.
pub fn is_image(path: &Path) -> bool {
    extension(path).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
}

/// Files (not folders) of a folder, sorted by name.
fn list_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Split subfolders of `dir` (`train`, `valid`, ...), in [`SPLIT_NAMES`] order.
fn split_dirs(dir: &Path) -> Vec<(String, PathBuf)> {
    SPLIT_NAMES
        .iter()
        .map(|s| (s.to_string(), dir.join(s)))
        .filter(|(_, p)| p.is_dir())
        .collect()
}

/// Collects warnings for one annotation file, turning data-skipping ones into errors
/// under strict loading.
#[derive(Debug)]
struct Report {
    strict: bool,
    warnings: Vec<Warning>,
}

impl Report {
    fn new(strict: bool) -> Self {
        Self {
            strict,
            warnings: Vec::new(),
        }
    }

    fn warn(
        &mut self,
        file: &Path,
        line: Option<usize>,
        kind: WarningKind,
        message: String,
    ) -> Result<()> {
        let warning = Warning {
            file: file.to_path_buf(),
            line,
            kind,
            message,
        };
        if self.strict && kind.skips_data() {
            return Err(DataError::Strict(warning));
        }
        self.warnings.push(warning);
        Ok(())
    }
}

/// Checks one box against an image of `width` × `height`: clips it, or returns `None`
/// after warning when it is empty, inverted or not finite. `what` names the object.
fn validate_box(
    raw: [f32; 4],
    width: u32,
    height: u32,
    report: &mut Report,
    file: &Path,
    line: Option<usize>,
    what: &str,
) -> Result<Option<[f32; 4]>> {
    let [x1, y1, x2, y2] = raw;
    let shown = format!("[{x1}, {y1}, {x2}, {y2}]");
    if raw.iter().any(|v| !v.is_finite()) || x2 < x1 || y2 < y1 {
        let msg = format!("{what}: inverted or non-finite box {shown} skipped");
        report.warn(file, line, WarningKind::InvertedBox, msg)?;
        return Ok(None);
    }
    if x2 == x1 || y2 == y1 {
        let msg = format!("{what}: zero-area box {shown} skipped");
        report.warn(file, line, WarningKind::EmptyBox, msg)?;
        return Ok(None);
    }
    let clipped = crate::boxes::clip(raw, height as f32, width as f32);
    if clipped[2] <= clipped[0] || clipped[3] <= clipped[1] {
        let msg = format!("{what}: box {shown} lies outside the {width}x{height} image, skipped");
        report.warn(file, line, WarningKind::EmptyBox, msg)?;
        return Ok(None);
    }
    if clipped != raw {
        let msg = format!(
            "{what}: box {shown} clipped to the {width}x{height} image: [{}, {}, {}, {}]",
            clipped[0], clipped[1], clipped[2], clipped[3]
        );
        report.warn(file, line, WarningKind::ClippedBox, msg)?;
    }
    Ok(Some(clipped))
}

/// Finds the image an annotation names: `dir/name`, else a file in `dir` with the same
/// stem and a known extension (warning [`WarningKind::ImageFallback`]).
fn resolve_image(
    dir: &Path,
    name: &str,
    report: &mut Report,
    file: &Path,
    line: Option<usize>,
) -> Result<Option<PathBuf>> {
    let direct = dir.join(name);
    if direct.is_file() {
        return Ok(Some(direct));
    }
    if let Some(stem) = Path::new(name).file_stem() {
        let lower = IMAGE_EXTENSIONS.iter().map(|e| e.to_string());
        for ext in lower.chain(IMAGE_EXTENSIONS.iter().map(|e| e.to_ascii_uppercase())) {
            let mut file_name = stem.to_os_string();
            file_name.push(format!(".{ext}"));
            let candidate = dir.join(file_name);
            if candidate.is_file() {
                let msg = format!(
                    "image {} not found, using {} (same name, another extension)",
                    direct.display(),
                    candidate.display()
                );
                report.warn(file, line, WarningKind::ImageFallback, msg)?;
                return Ok(Some(candidate));
            }
        }
    }
    let msg = format!(
        "image {} not found, its annotations skipped",
        direct.display()
    );
    report.warn(file, line, WarningKind::UnknownImage, msg)?;
    Ok(None)
}

/// Decodes an image in full (a truncated or corrupt file must not reach training) for its
/// size, warning [`WarningKind::UnreadableImage`] on failure.
fn image_size(
    path: &Path,
    report: &mut Report,
    file: &Path,
    line: Option<usize>,
) -> Result<Option<(u32, u32)>> {
    match decode_rgb(path) {
        Ok(image) => Ok(Some(image.dimensions())),
        Err(e) => {
            let msg = format!("{e}; skipped");
            report.warn(file, line, WarningKind::UnreadableImage, msg)?;
            Ok(None)
        }
    }
}

/// Maps class names to labels: the given list, or the sorted distinct names found.
fn class_index(
    given: &Option<Vec<String>>,
    found: impl IntoIterator<Item = String>,
) -> Vec<String> {
    match given {
        Some(names) => names.clone(),
        None => {
            let mut names: Vec<String> = found.into_iter().collect();
            names.sort();
            names.dedup();
            names
        }
    }
}

/// Runs `f` over items in parallel and returns the results in order, or the first error in
/// order (so strict loading reports the same file every time).
fn par_map_ordered<T: Sync, U: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<U> + Sync + Send,
) -> Result<Vec<U>> {
    let results: Vec<Result<U>> = items.par_iter().map(f).collect();
    results.into_iter().collect()
}

/// Folders to read for a folder dataset, each marked selected when it belongs to the
/// requested split. `holds_data` says whether a folder holds annotations itself; if `path`
/// does not but has split subfolders, those are the folders (all read, so class names
/// agree across splits).
fn split_folders(
    path: &Path,
    split: Option<&str>,
    holds_data: impl Fn(&Path) -> Result<bool>,
) -> Result<Vec<(PathBuf, bool)>> {
    let subfolders = split_dirs(path);
    if holds_data(path)? || subfolders.is_empty() {
        if let Some(split) = split {
            return Err(DataError::Invalid(format!(
                "{}: no `{split}` split here (no split list or split subfolder)",
                path.display()
            )));
        }
        return Ok(vec![(path.to_path_buf(), true)]);
    }
    let wanted = split.map(split_aliases);
    let folders: Vec<(PathBuf, bool)> = subfolders
        .into_iter()
        .map(|(name, dir)| {
            let selected = wanted.as_ref().is_none_or(|w| w.contains(&name));
            (dir, selected)
        })
        .collect();
    if !folders.iter().any(|(_, selected)| *selected) {
        let found: Vec<String> = split_dirs(path).into_iter().map(|(n, _)| n).collect();
        return Err(DataError::Invalid(format!(
            "{}: no `{}` split (found {})",
            path.display(),
            split.unwrap_or_default(),
            found.join(", ")
        )));
    }
    Ok(folders)
}
