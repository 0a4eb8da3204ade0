//! CSV rows `image,x1,y1,x2,y2,label` in pixels, one box a row, with an optional header.
//! A row with the box and label fields empty (`image,,,,,`) lists an image without
//! objects. Image paths are relative to the CSV's folder (or [`LoadOpts::image_root`]).

use std::collections::HashMap;
use std::path::Path;

use super::{
    class_index, image_size, par_map_ordered, resolve_image, validate_box, DataError, Dataset,
    Format, LoadOpts, Report, Result, Sample, WarningKind,
};

/// One box row (or an image-only row, with `bbox` `None`).
struct Row {
    line: usize,
    bbox: Option<([f32; 4], String)>,
}

/// An image and its rows, in order of first appearance.
struct ImageRows {
    name: String,
    rows: Vec<Row>,
}

pub(super) fn load(path: &Path, opts: &LoadOpts) -> Result<Dataset> {
    if opts.split.is_some() {
        return Err(DataError::Invalid(format!(
            "{}: a CSV file is one split; give the split's file instead of a split name",
            path.display()
        )));
    }
    let images = read_rows(path)?;
    let found = images
        .iter()
        .flat_map(|i| &i.rows)
        .filter_map(|r| r.bbox.as_ref().map(|(_, label)| label.clone()));
    let class_names = class_index(&opts.classes, found);
    let root = opts
        .image_root
        .clone()
        .unwrap_or_else(|| path.parent().unwrap_or(Path::new(".")).to_path_buf());
    let built = par_map_ordered(&images, |image| {
        build_sample(path, &root, image, &class_names, opts.strict)
    })?;
    Ok(Dataset::from_built(Format::Csv, path, class_names, built))
}

fn read_rows(path: &Path) -> Result<Vec<ImageRows>> {
    let parse_err = |line: Option<usize>, message: String| DataError::Parse {
        file: path.to_path_buf(),
        line,
        message,
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_path(path)
        .map_err(|e| parse_err(None, e.to_string()))?;
    let mut images: Vec<ImageRows> = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize);
            parse_err(line, e.to_string())
        })?;
        let line = record.position().map_or(i + 1, |p| p.line() as usize);
        // A line of blanks is no row; a row of empty fields (`,,,,,`) is an error below
        // (no image path), not silently nothing.
        if record.len() == 1 && record[0].is_empty() {
            continue;
        }
        if record.len() != 6 {
            let msg = format!(
                "expected 6 fields `image,x1,y1,x2,y2,label`, got {}",
                record.len()
            );
            return Err(parse_err(Some(line), msg));
        }
        // A first row whose coordinates are not numbers is a header.
        if i == 0 && !record[1].is_empty() && record[1].parse::<f32>().is_err() {
            continue;
        }
        let bbox = parse_box(&record).map_err(|m| parse_err(Some(line), m))?;
        let name = record[0].to_string();
        if name.is_empty() {
            return Err(parse_err(Some(line), "empty image path".into()));
        }
        let slot = *by_name.entry(name.clone()).or_insert_with(|| {
            images.push(ImageRows {
                name,
                rows: Vec::new(),
            });
            images.len() - 1
        });
        images[slot].rows.push(Row { line, bbox });
    }
    Ok(images)
}

/// The box and label of a row, or `None` for an image-only row.
fn parse_box(
    record: &csv::StringRecord,
) -> std::result::Result<Option<([f32; 4], String)>, String> {
    if record.iter().skip(1).all(str::is_empty) {
        return Ok(None);
    }
    let mut coords = [0f32; 4];
    for (k, c) in coords.iter_mut().enumerate() {
        let v = &record[k + 1];
        *c = v.parse().map_err(|_| format!("`{v}` is not a number"))?;
    }
    if record[5].is_empty() {
        return Err("empty label".into());
    }
    Ok(Some((coords, record[5].to_string())))
}

fn build_sample(
    file: &Path,
    root: &Path,
    image: &ImageRows,
    class_names: &[String],
    strict: bool,
) -> Result<(Option<Sample>, Report)> {
    let mut report = Report::new(strict);
    // Image problems are reported at the image's first row.
    let first = image.rows.first().map(|r| r.line);
    let Some(path) = resolve_image(root, &image.name, &mut report, file, first)? else {
        return Ok((None, report));
    };
    let Some((width, height)) = image_size(&path, &mut report, file, first)? else {
        return Ok((None, report));
    };
    let mut sample = Sample::unannotated(path, width, height);
    for row in &image.rows {
        let Some((raw, name)) = &row.bbox else {
            continue;
        };
        let what = format!("{} box ({name})", image.name);
        let Some(label) = class_names.iter().position(|c| c == name) else {
            let msg =
                format!("{what}: class `{name}` is not one of the dataset's classes, skipped");
            report.warn(file, Some(row.line), WarningKind::UnknownClass, msg)?;
            continue;
        };
        if let Some(b) = validate_box(
            *raw,
            width,
            height,
            &mut report,
            file,
            Some(row.line),
            &what,
        )? {
            sample.boxes.push(b);
            sample.labels.push(label);
        }
    }
    Ok((Some(sample), report))
}
