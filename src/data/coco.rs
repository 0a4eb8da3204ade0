//! COCO JSON: `images`, `annotations` with `bbox: [x, y, w, h]`, `categories`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    image_size, io_err, validate_box, DataError, Dataset, Format, LoadOpts, Report, Result, Sample,
    WarningKind,
};

#[derive(Debug, Deserialize)]
struct CocoFile {
    images: Vec<Image>,
    /// Required: a file without it is more likely a results or image-info file than a set
    /// without boxes (which says `"annotations": []`).
    annotations: Vec<Annotation>,
    categories: Vec<Category>,
}

#[derive(Debug, Deserialize)]
struct Image {
    id: i64,
    file_name: String,
    width: Option<u32>,
    height: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct Annotation {
    id: Option<i64>,
    image_id: i64,
    category_id: i64,
    bbox: [f32; 4],
    #[serde(default)]
    iscrowd: u8,
}

#[derive(Debug, Deserialize)]
struct Category {
    id: i64,
    name: String,
}

pub(super) fn load(path: &Path, opts: &LoadOpts) -> Result<Dataset> {
    let file = path;
    if opts.split.is_some() {
        return Err(DataError::Invalid(format!(
            "{}: a COCO file is one split; give the split's JSON file instead of a split name",
            file.display()
        )));
    }
    let text = std::fs::read_to_string(file).map_err(io_err(file))?;
    let coco: CocoFile = serde_json::from_str(&text).map_err(|e| DataError::Parse {
        file: file.to_path_buf(),
        line: Some(e.line()),
        message: format!("invalid COCO JSON: {e}"),
    })?;
    if coco.categories.is_empty() {
        return Err(DataError::Parse {
            file: file.to_path_buf(),
            line: None,
            message: "`categories` is empty: a detector needs at least one class".into(),
        });
    }
    let mut categories: Vec<&Category> = coco.categories.iter().collect();
    categories.sort_by_key(|c| c.id);
    let (class_names, category_ids) = match &opts.classes {
        Some(names) => {
            let ids = names
                .iter()
                .map(|n| {
                    categories
                        .iter()
                        .find(|c| &c.name == n)
                        .map_or(-1, |c| c.id)
                })
                .collect();
            (names.clone(), ids)
        }
        None => categories.iter().map(|c| (c.name.clone(), c.id)).unzip(),
    };
    let label_of: HashMap<i64, usize> = categories
        .iter()
        .filter_map(|c| Some((c.id, class_names.iter().position(|n| n == &c.name)?)))
        .collect();
    let mut report = Report::new(opts.strict);
    let mut samples = image_samples(file, &coco.images, opts)?;
    // Positions in `images`, which `samples` follows.
    let index: HashMap<i64, usize> = coco
        .images
        .iter()
        .enumerate()
        .map(|(i, im)| (im.id, i))
        .collect();
    for (pos, ann) in coco.annotations.iter().enumerate() {
        add_annotation(file, pos, ann, &index, &label_of, &mut samples, &mut report)?;
    }
    let mut warnings = Vec::new();
    let mut kept = Vec::new();
    for (image_report, sample) in samples.into_iter().map(|s| (s.report, s.sample)) {
        warnings.extend(image_report.warnings);
        kept.extend(sample);
    }
    warnings.extend(report.warnings);
    Ok(Dataset {
        samples: kept,
        class_names,
        category_ids: Some(category_ids),
        warnings,
        format: Format::Coco,
        source: path.to_path_buf(),
    })
}

/// A COCO image as loaded: the sample (none when the image is missing) and its warnings.
struct Loaded {
    sample: Option<Sample>,
    report: Report,
}

/// Folders tried for `file_name`s: the given root, else the JSON's folder and its
/// `images/`.
fn image_roots(file: &Path, opts: &LoadOpts) -> Vec<PathBuf> {
    if let Some(root) = &opts.image_root {
        return vec![root.clone()];
    }
    let dir = file.parent().unwrap_or(Path::new(".")).to_path_buf();
    vec![dir.clone(), dir.join("images")]
}

fn image_samples(file: &Path, images: &[Image], opts: &LoadOpts) -> Result<Vec<Loaded>> {
    let roots = image_roots(file, opts);
    super::par_map_ordered(images, |image| {
        let mut report = Report::new(opts.strict);
        let sample = image_sample(file, image, &roots, opts, &mut report)?;
        Ok(Loaded { sample, report })
    })
}

fn image_sample(
    file: &Path,
    image: &Image,
    roots: &[PathBuf],
    opts: &LoadOpts,
    report: &mut Report,
) -> Result<Option<Sample>> {
    let written = image
        .width
        .zip(image.height)
        .filter(|&(w, h)| w > 0 && h > 0);
    let found = roots
        .iter()
        .map(|r| r.join(&image.file_name))
        .find(|p| p.is_file());
    let (path, size) = match (opts.check_images, found, written) {
        (false, found, Some(size)) => (
            found.unwrap_or_else(|| roots[0].join(&image.file_name)),
            size,
        ),
        (_, Some(path), _) => {
            let Some(actual) = image_size(&path, report, file, None)? else {
                return Ok(None);
            };
            if let Some((w, h)) = written.filter(|&s| s != actual) {
                let msg = format!(
                    "image {}: annotated as {w}x{h} but {} is {}x{}; using the image's size",
                    image.id,
                    path.display(),
                    actual.0,
                    actual.1
                );
                report.warn(file, None, WarningKind::SizeMismatch, msg)?;
            }
            (path, actual)
        }
        (_, None, _) => {
            let tried: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
            let msg = format!(
                "image {} `{}` not found in {}, its annotations skipped",
                image.id,
                image.file_name,
                tried.join(" or ")
            );
            report.warn(file, None, WarningKind::UnknownImage, msg)?;
            return Ok(None);
        }
    };
    Ok(Some(Sample {
        image_id: Some(image.id),
        ..Sample::unannotated(path, size.0, size.1)
    }))
}

fn add_annotation(
    file: &Path,
    pos: usize,
    ann: &Annotation,
    index: &HashMap<i64, usize>,
    label_of: &HashMap<i64, usize>,
    samples: &mut [Loaded],
    report: &mut Report,
) -> Result<()> {
    let what = match ann.id {
        Some(id) => format!("annotation {pos} (id {id}, image {})", ann.image_id),
        None => format!("annotation {pos} (image {})", ann.image_id),
    };
    let Some(&i) = index.get(&ann.image_id) else {
        let msg = format!(
            "{what}: image id {} is not in `images`, skipped",
            ann.image_id
        );
        return report.warn(file, None, WarningKind::UnknownImage, msg);
    };
    // Annotations of an image reported missing are dropped with it.
    let Some(sample) = samples[i].sample.as_mut() else {
        return Ok(());
    };
    if ann.iscrowd != 0 {
        let msg = format!("{what}: crowd region left out of training");
        return report.warn(file, None, WarningKind::Crowd, msg);
    }
    let Some(&label) = label_of.get(&ann.category_id) else {
        let msg = format!(
            "{what}: category {} is not one of the dataset's classes, skipped",
            ann.category_id
        );
        return report.warn(file, None, WarningKind::UnknownClass, msg);
    };
    let raw = crate::boxes::xywh_to_xyxy(ann.bbox);
    if let Some(b) = validate_box(raw, sample.width, sample.height, report, file, None, &what)? {
        sample.boxes.push(b);
        sample.labels.push(label);
    }
    Ok(())
}
