//! Pascal VOC XML: `Annotations/*.xml` with `JPEGImages/` and optional
//! `ImageSets/Main/{split}.txt`, or `.xml` files beside their images.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    class_index, extension, image_size, io_err, list_files, par_map_ordered, resolve_image,
    split_aliases, split_folders, validate_box, DataError, Dataset, Format, LoadOpts, Report,
    Result, Sample, WarningKind,
};

#[derive(Debug, Deserialize)]
struct Annotation {
    filename: Option<String>,
    size: Option<Size>,
    #[serde(default)]
    object: Vec<Object>,
}

#[derive(Debug, Deserialize)]
struct Size {
    width: Option<String>,
    height: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Object {
    name: Option<String>,
    bndbox: Option<BndBox>,
}

#[derive(Debug, Deserialize)]
struct BndBox {
    xmin: Option<String>,
    ymin: Option<String>,
    xmax: Option<String>,
    ymax: Option<String>,
}

/// An XML file to read, the folder its image is in, and whether it is in the split.
struct Unit {
    xml: PathBuf,
    image_dir: PathBuf,
    selected: bool,
}

/// A parsed annotation file.
struct Parsed {
    annotation: Annotation,
    /// Line of each `<object>` tag, in order.
    object_lines: Vec<usize>,
}

pub(super) fn load(path: &Path, opts: &LoadOpts) -> Result<Dataset> {
    let units = plan(path, opts.split.as_deref())?;
    let parsed = par_map_ordered(&units, |u| parse_file(&u.xml))?;
    let found = parsed
        .iter()
        .flat_map(|p| &p.annotation.object)
        .filter_map(|o| o.name.as_ref().map(|n| n.trim().to_string()));
    let class_names = class_index(&opts.classes, found);
    let selected: Vec<(&Unit, &Parsed)> = units
        .iter()
        .zip(&parsed)
        .filter(|(u, _)| u.selected)
        .collect();
    let built = par_map_ordered(&selected, |(unit, parsed)| {
        build_sample(unit, parsed, &class_names, opts)
    })?;
    Ok(Dataset::from_built(Format::Voc, path, class_names, built))
}

/// Lists the XML files: a single file, a VOC devkit folder, or folders of XML files.
fn plan(path: &Path, split: Option<&str>) -> Result<Vec<Unit>> {
    if path.is_file() {
        let image_dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        return Ok(vec![Unit {
            xml: path.to_path_buf(),
            image_dir,
            selected: true,
        }]);
    }
    let annotations = path.join("Annotations");
    if annotations.is_dir() {
        return plan_devkit(path, &annotations, split);
    }
    let has_xml = |dir: &Path| Ok(xml_files(dir)?.next().is_some());
    let mut units = Vec::new();
    for (dir, selected) in split_folders(path, split, has_xml)? {
        for xml in xml_files(&dir)? {
            units.push(Unit {
                xml,
                image_dir: dir.clone(),
                selected,
            });
        }
    }
    if units.is_empty() {
        return Err(DataError::Invalid(format!(
            "{}: no .xml annotation files",
            path.display()
        )));
    }
    Ok(units)
}

fn xml_files(dir: &Path) -> Result<impl Iterator<Item = PathBuf>> {
    Ok(list_files(dir)?
        .into_iter()
        .filter(|f| extension(f).as_deref() == Some("xml")))
}

/// A VOC devkit folder: every `Annotations/*.xml`, selected by `ImageSets/Main/{split}.txt`.
fn plan_devkit(root: &Path, annotations: &Path, split: Option<&str>) -> Result<Vec<Unit>> {
    let image_dir = ["JPEGImages", "images"]
        .iter()
        .map(|d| root.join(d))
        .find(|d| d.is_dir())
        .unwrap_or_else(|| root.to_path_buf());
    let xmls: Vec<PathBuf> = xml_files(annotations)?.collect();
    let wanted = match split {
        Some(split) => Some(split_ids(root, split, annotations, &xmls)?),
        None => None,
    };
    Ok(xmls
        .into_iter()
        .map(|xml| {
            let stem = xml.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            let selected = wanted.as_ref().is_none_or(|ids| ids.contains(stem));
            Unit {
                xml: xml.clone(),
                image_dir: image_dir.clone(),
                selected,
            }
        })
        .collect())
}

/// Image ids listed in `ImageSets/Main/{split}.txt`; each must have an annotation file.
fn split_ids(
    root: &Path,
    split: &str,
    annotations: &Path,
    xmls: &[PathBuf],
) -> Result<HashSet<String>> {
    let sets = root.join("ImageSets").join("Main");
    let list = split_aliases(split)
        .into_iter()
        .map(|s| sets.join(format!("{s}.txt")))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            DataError::Invalid(format!("{}: no split list {split}.txt", sets.display()))
        })?;
    let text = std::fs::read_to_string(&list).map_err(io_err(&list))?;
    let known: HashSet<&str> = xmls
        .iter()
        .filter_map(|x| x.file_stem().and_then(|s| s.to_str()))
        .collect();
    let mut ids = HashSet::new();
    for (i, line) in text.lines().enumerate() {
        // Per-class lists (`aeroplane_train.txt`) hold "id flag"; the plain list holds "id".
        let Some(id) = line.split_whitespace().next() else {
            continue;
        };
        if !known.contains(id) {
            return Err(DataError::Parse {
                file: list.clone(),
                line: Some(i + 1),
                message: format!(
                    "image `{id}` has no {}",
                    annotations.join(format!("{id}.xml")).display()
                ),
            });
        }
        ids.insert(id.to_string());
    }
    Ok(ids)
}

fn parse_file(xml: &Path) -> Result<Parsed> {
    let text = std::fs::read_to_string(xml).map_err(io_err(xml))?;
    let annotation: Annotation = quick_xml::de::from_str(&text).map_err(|e| DataError::Parse {
        file: xml.to_path_buf(),
        line: None,
        message: format!("invalid VOC XML: {e}"),
    })?;
    Ok(Parsed {
        object_lines: object_lines(&text),
        annotation,
    })
}

/// 1-based line of each `<object>` start tag.
fn object_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    let mut line = 1;
    let mut rest = text;
    while let Some(pos) = rest.find("<object") {
        line += rest[..pos].matches('\n').count();
        let after = &rest[pos + "<object".len()..];
        if after.starts_with(['>', ' ', '\t', '\n', '\r', '/']) {
            lines.push(line);
        }
        rest = after;
    }
    lines
}

fn build_sample(
    unit: &Unit,
    parsed: &Parsed,
    class_names: &[String],
    opts: &LoadOpts,
) -> Result<(Option<Sample>, Report)> {
    let mut report = Report::new(opts.strict);
    let file = unit.xml.as_path();
    let ann = &parsed.annotation;
    let stem = || {
        file.file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string()
    };
    let name = ann
        .filename
        .as_deref()
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .unwrap_or_else(stem);
    let written = ann.size.as_ref().and_then(|s| {
        let w = s.width.as_deref()?.trim().parse::<u32>().ok()?;
        let h = s.height.as_deref()?.trim().parse::<u32>().ok()?;
        (w > 0 && h > 0).then_some((w, h))
    });
    let Some((image_path, (width, height))) = locate(unit, &name, written, opts, &mut report)?
    else {
        return Ok((None, report));
    };
    let mut sample = Sample::unannotated(image_path, width, height);
    for (i, object) in ann.object.iter().enumerate() {
        let line = parsed.object_lines.get(i).copied();
        add_object(&mut sample, i, object, class_names, &mut report, file, line)?;
    }
    Ok((Some(sample), report))
}

/// Finds the image and its size, checking it against the size the XML gives.
fn locate(
    unit: &Unit,
    name: &str,
    written: Option<(u32, u32)>,
    opts: &LoadOpts,
    report: &mut Report,
) -> Result<Option<(PathBuf, (u32, u32))>> {
    let file = unit.xml.as_path();
    if !opts.check_images {
        if let Some(size) = written {
            return Ok(Some((unit.image_dir.join(name), size)));
        }
    }
    let Some(path) = resolve_image(&unit.image_dir, name, report, file, None)? else {
        return Ok(None);
    };
    if !opts.check_images {
        if let Some(size) = written {
            return Ok(Some((path, size)));
        }
    }
    let Some(actual) = image_size(&path, report, file, None)? else {
        return Ok(None);
    };
    if let Some((w, h)) = written.filter(|&s| s != actual) {
        let msg = format!(
            "<size> says {w}x{h} but {} is {}x{}; using the image's size",
            path.display(),
            actual.0,
            actual.1
        );
        report.warn(file, None, WarningKind::SizeMismatch, msg)?;
    }
    Ok(Some((path, actual)))
}

fn add_object(
    sample: &mut Sample,
    index: usize,
    object: &Object,
    class_names: &[String],
    report: &mut Report,
    file: &Path,
    line: Option<usize>,
) -> Result<()> {
    let name = object.name.as_deref().map(str::trim).unwrap_or_default();
    let what = format!("object {index} ({name})");
    let Some(label) = class_names.iter().position(|c| c == name) else {
        let msg = format!("{what}: class `{name}` is not one of the dataset's classes, skipped");
        return report.warn(file, line, WarningKind::UnknownClass, msg);
    };
    let coords = object
        .bndbox
        .as_ref()
        .map(|b| [&b.xmin, &b.ymin, &b.xmax, &b.ymax]);
    let parsed: Option<Vec<f32>> = coords.and_then(|c| {
        c.iter()
            .map(|v| v.as_deref()?.trim().parse::<f32>().ok())
            .collect()
    });
    let Some(raw) = parsed else {
        return Err(DataError::Parse {
            file: file.to_path_buf(),
            line,
            message: format!("{what}: <bndbox> needs numeric xmin, ymin, xmax, ymax"),
        });
    };
    let raw = [raw[0], raw[1], raw[2], raw[3]];
    if let Some(b) = validate_box(raw, sample.width, sample.height, report, file, line, &what)? {
        sample.boxes.push(b);
        sample.labels.push(label);
    }
    Ok(())
}
