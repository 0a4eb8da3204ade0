//! YOLO txt: one `class cx cy w h` line per box, normalised to [0, 1] (or a polygon
//! `class x1 y1 x2 y2 ...`, boxed), in a `.txt` beside each image or under `labels/`.
//! Class names come from `data.yaml` (`names:` as a list, a block list or an index map) or
//! `classes.txt`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::{
    extension, image_size, io_err, is_image, list_files, par_map_ordered, split_dirs,
    split_folders, validate_box, DataError, Dataset, Format, LoadOpts, Report, Result, Sample,
    Warning, WarningKind,
};

/// Image and label folders, and whether they are in the requested split.
struct Unit {
    images: PathBuf,
    labels: PathBuf,
    selected: bool,
}

/// An image, its label file (if any), and the file its problems are reported against.
struct Entry {
    image: Option<PathBuf>,
    label: Option<PathBuf>,
}

/// `data.yaml` or `data.yml` in `dir`.
pub(super) fn yaml_path(dir: &Path) -> Option<PathBuf> {
    ["data.yaml", "data.yml"]
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

/// Whether a file looks like a YOLO label file (not a class list or a readme).
pub(super) fn is_label_file(path: &Path) -> bool {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    extension(path).as_deref() == Some("txt")
        && !matches!(name, "classes.txt" | "obj.names")
        && !name.to_ascii_lowercase().starts_with("readme")
}

pub(super) fn load(path: &Path, opts: &LoadOpts) -> Result<Dataset> {
    let root = if path.is_file() {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else {
        path.to_path_buf()
    };
    let units = plan(&root, opts.split.as_deref())?;
    let mut entries = Vec::new();
    for unit in units.iter().filter(|u| u.selected) {
        entries.extend(pair_files(unit)?);
    }
    let names_given = match &opts.classes {
        Some(names) => Some(names.clone()),
        None => class_names(&root)?,
    };
    // Without names, classes are numbered up to the largest index used.
    let limit = names_given.as_ref().map_or(usize::MAX, Vec::len);
    let built = par_map_ordered(&entries, |e| build_sample(e, limit, opts))?;
    let mut dataset = Dataset::from_built(Format::Yolo, path, Vec::new(), built);
    if names_given.is_none() {
        guess_classes(&mut dataset, &root);
    }
    if let Some(names) = names_given {
        dataset.class_names = names;
    }
    Ok(dataset)
}

/// Without names, classes are numbered up to the largest index used, with a warning: a
/// class above it that no label uses would be missing from the model.
fn guess_classes(dataset: &mut Dataset, root: &Path) {
    let max = dataset.samples.iter().flat_map(|s| &s.labels).max();
    let count = max.map_or(0, |m| m + 1);
    dataset.class_names = (0..count).map(|i| i.to_string()).collect();
    dataset.warnings.push(Warning {
        file: root.to_path_buf(),
        line: None,
        kind: WarningKind::ClassesGuessed,
        message: format!(
            "no data.yaml or classes.txt: {count} classes assumed from the largest label \
             used, named by number; name them in data.yaml (`names:`) if there are more"
        ),
    });
}

/// The image/label folder pairs: `images/` + `labels/` (optionally with split subfolders
/// inside, Ultralytics' layout), split folders each holding `images/` + `labels/`
/// (Roboflow's), or a folder with `.txt` files beside the images.
fn plan(root: &Path, split: Option<&str>) -> Result<Vec<Unit>> {
    let (images, labels) = (root.join("images"), root.join("labels"));
    if images.is_dir() && labels.is_dir() && !split_dirs(&images).is_empty() {
        let units = split_folders(&images, split, |_| Ok(false))?;
        return Ok(units
            .into_iter()
            .map(|(dir, selected)| Unit {
                labels: labels.join(dir.file_name().unwrap_or_default()),
                images: dir,
                selected,
            })
            .collect());
    }
    let holds = |dir: &Path| Ok(dir.join("images").is_dir() || has_labels_beside_images(dir)?);
    let units: Vec<Unit> = split_folders(root, split, holds)?
        .into_iter()
        .map(|(dir, selected)| {
            let (images, labels) = (dir.join("images"), dir.join("labels"));
            if images.is_dir() {
                Unit {
                    images,
                    labels,
                    selected,
                }
            } else {
                Unit {
                    images: dir.clone(),
                    labels: dir,
                    selected,
                }
            }
        })
        .collect();
    Ok(units)
}

fn has_labels_beside_images(dir: &Path) -> Result<bool> {
    Ok(has_paired_labels(&list_files(dir)?))
}

/// Whether some label file has the stem of an image among `files` (a stray licence .txt
/// beside photos does not make a YOLO folder).
pub(super) fn has_paired_labels(files: &[PathBuf]) -> bool {
    let stems: HashSet<&std::ffi::OsStr> = files
        .iter()
        .filter(|f| is_image(f))
        .filter_map(|f| f.file_stem())
        .collect();
    files
        .iter()
        .filter(|f| is_label_file(f))
        .any(|f| f.file_stem().is_some_and(|s| stems.contains(s)))
}

/// Pairs each image with its label file by stem; label files without an image are kept
/// so they can be reported.
fn pair_files(unit: &Unit) -> Result<Vec<Entry>> {
    let images: Vec<PathBuf> = list_files(&unit.images)?
        .into_iter()
        .filter(|f| is_image(f))
        .collect();
    let labels: Vec<PathBuf> = if unit.labels.is_dir() {
        list_files(&unit.labels)?
            .into_iter()
            .filter(|f| is_label_file(f))
            .collect()
    } else {
        Vec::new()
    };
    let stems: HashSet<&std::ffi::OsStr> = images.iter().filter_map(|i| i.file_stem()).collect();
    let mut entries: Vec<Entry> = images
        .iter()
        .map(|image| {
            // Stems may hold dots (`x_jpg.rf.1a2b`): append the extension, never replace.
            let mut name = image.file_stem().unwrap_or_default().to_os_string();
            name.push(".txt");
            let label = unit.labels.join(name);
            Entry {
                image: Some(image.clone()),
                label: label.is_file().then_some(label),
            }
        })
        .collect();
    for label in labels {
        if !label.file_stem().is_some_and(|s| stems.contains(s)) {
            entries.push(Entry {
                image: None,
                label: Some(label),
            });
        }
    }
    Ok(entries)
}

/// Class names from `data.yaml` or `classes.txt` in `root` or its parent (for a split
/// folder).
fn class_names(root: &Path) -> Result<Option<Vec<String>>> {
    let dirs = [Some(root), root.parent()];
    for dir in dirs.into_iter().flatten() {
        if let Some(yaml) = yaml_path(dir) {
            let text = std::fs::read_to_string(&yaml).map_err(io_err(&yaml))?;
            return parse_yaml_names(&text)
                .map(Some)
                .map_err(|(line, message)| DataError::Parse {
                    file: yaml,
                    line: Some(line),
                    message,
                });
        }
        for list in ["classes.txt", "obj.names"].map(|n| dir.join(n)) {
            if list.is_file() {
                let text = std::fs::read_to_string(&list).map_err(io_err(&list))?;
                let names = text.lines().map(str::trim).filter(|l| !l.is_empty());
                return Ok(Some(names.map(str::to_string).collect()));
            }
        }
    }
    Ok(None)
}

/// Reads `names:` from a YOLO `data.yaml`: `names: ['a', 'b']`, a block list
/// (`- a`), or an index map (`0: a`). Checks `nc:` against it. Errors carry a line.
pub(super) fn parse_yaml_names(text: &str) -> std::result::Result<Vec<String>, (usize, String)> {
    let lines: Vec<&str> = text.lines().collect();
    let Some(start) = lines.iter().position(|l| l.starts_with("names:")) else {
        return Err((1, "no `names:` entry".into()));
    };
    let rest = strip_comment(lines[start]["names:".len()..].trim());
    let names = if rest.starts_with('[') {
        let mut flow = String::new();
        for line in &lines[start..] {
            flow.push_str(if flow.is_empty() { &rest } else { line });
            flow.push('\n');
            if flow.trim_end().ends_with(']') {
                break;
            }
        }
        parse_flow_list(&flow).map_err(|m| (start + 1, m))?
    } else if rest.is_empty() {
        parse_block(&lines[start + 1..]).map_err(|(i, m)| (start + 2 + i, m))?
    } else {
        return Err((start + 1, format!("cannot read `names: {rest}`")));
    };
    let nc = lines.iter().enumerate().find_map(|(i, l)| {
        let v = l.strip_prefix("nc:")?;
        Some((i, strip_comment(v.trim()).parse::<usize>()))
    });
    match nc {
        Some((i, Ok(nc))) if nc != names.len() => Err((
            i + 1,
            format!("nc: {nc} but `names` has {} entries", names.len()),
        )),
        Some((i, Err(_))) => Err((i + 1, "`nc:` is not a number".into())),
        _ => Ok(names),
    }
}

/// Drops a ` # comment` outside quotes.
fn strip_comment(s: &str) -> String {
    let mut quote = None;
    for (i, c) in s.char_indices() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if i == 0 || s[..i].ends_with(char::is_whitespace) => {
                return s[..i].trim_end().to_string()
            }
            _ => {}
        }
    }
    s.to_string()
}

/// Unquotes a YAML scalar: `'it''s'`, `"a \"b\""` or bare.
fn unquote(s: &str) -> String {
    let s = s.trim();
    if s.len() >= 2 && s.starts_with('\'') && s.ends_with('\'') {
        return s[1..s.len() - 1].replace("''", "'");
    }
    if s.len() >= 2 && s.starts_with('"') && s.ends_with('"') {
        return s[1..s.len() - 1]
            .replace("\\\"", "\"")
            .replace("\\\\", "\\");
    }
    s.to_string()
}

/// Splits `[a, 'b, c', "d"]` at commas outside quotes.
fn parse_flow_list(flow: &str) -> std::result::Result<Vec<String>, String> {
    let inner = flow.trim();
    let inner = inner
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or("unterminated `names: [...]` list")?;
    let mut items = Vec::new();
    let mut current = String::new();
    let mut quote = None;
    for c in inner.chars() {
        match (quote, c) {
            (None, '\'' | '"') => {
                quote = Some(c);
                current.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                current.push(c);
            }
            (None, ',') => items.push(std::mem::take(&mut current)),
            _ => current.push(c),
        }
    }
    if quote.is_some() {
        return Err("unterminated quote in `names`".into());
    }
    items.push(current);
    let names: Vec<String> = items
        .iter()
        .map(|i| unquote(i.trim()))
        .filter(|i| !i.is_empty())
        .collect();
    Ok(names)
}

/// Reads indented `- name` or `index: name` lines after `names:`.
fn parse_block(lines: &[&str]) -> std::result::Result<Vec<String>, (usize, String)> {
    let mut names = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let item = strip_comment(line.trim());
        if item.is_empty() {
            continue;
        }
        if !line.starts_with([' ', '\t', '-']) {
            break;
        }
        if let Some(name) = item.strip_prefix('-') {
            names.push(unquote(name));
        } else if let Some((index, name)) = item.split_once(':') {
            let index: usize = index
                .trim()
                .parse()
                .map_err(|_| (i, format!("bad entry `{item}`")))?;
            if index != names.len() {
                return Err((
                    i,
                    format!(
                        "class index {index} out of order (expected {})",
                        names.len()
                    ),
                ));
            }
            names.push(unquote(name));
        } else {
            return Err((i, format!("bad entry `{item}`")));
        }
    }
    Ok(names)
}

fn build_sample(
    entry: &Entry,
    num_classes: usize,
    opts: &LoadOpts,
) -> Result<(Option<Sample>, Report)> {
    let mut report = Report::new(opts.strict);
    let Some(image) = &entry.image else {
        let label = entry.label.as_deref().unwrap_or(Path::new(""));
        let msg = "no image with this name, its labels skipped".to_string();
        report.warn(label, None, WarningKind::UnknownImage, msg)?;
        return Ok((None, report));
    };
    let file = entry.label.as_deref().unwrap_or(image);
    let Some((width, height)) = image_size(image, &mut report, file, None)? else {
        return Ok((None, report));
    };
    let mut sample = Sample::unannotated(image.clone(), width, height);
    let Some(label) = &entry.label else {
        let msg = "no label file: kept as an image without objects".to_string();
        report.warn(image, None, WarningKind::NoAnnotation, msg)?;
        return Ok((Some(sample), report));
    };
    let text = std::fs::read_to_string(label).map_err(io_err(label))?;
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (class, raw) = parse_line(line, width, height).map_err(|message| DataError::Parse {
            file: label.clone(),
            line: Some(i + 1),
            message,
        })?;
        let what = format!("box of class {class}");
        if class >= num_classes {
            let msg = format!(
                "{what}: class index {class} but the dataset has {num_classes} classes, skipped"
            );
            report.warn(label, Some(i + 1), WarningKind::UnknownClass, msg)?;
            continue;
        }
        if let Some(b) = validate_box(raw, width, height, &mut report, label, Some(i + 1), &what)? {
            sample.boxes.push(b);
            sample.labels.push(class);
        }
    }
    Ok((Some(sample), report))
}

/// Parses `class cx cy w h` (or a polygon) into a class and a pixel box.
fn parse_line(
    line: &str,
    width: u32,
    height: u32,
) -> std::result::Result<(usize, [f32; 4]), String> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let class = fields[0]
        .parse::<usize>()
        .map_err(|_| format!("class `{}` is not a non-negative integer", fields[0]))?;
    // f64 so that e.g. (0.5 + 0.2 / 2) * 100 lands on 60 exactly once rounded to f32.
    let values: Vec<f64> = fields[1..]
        .iter()
        .map(|v| {
            v.parse::<f64>()
                .map_err(|_| format!("`{v}` is not a number"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let (w, h) = (f64::from(width), f64::from(height));
    let raw = match values.len() {
        4 => {
            let [cx, cy, bw, bh] = [values[0], values[1], values[2], values[3]];
            [
                (cx - bw / 2.0) * w,
                (cy - bh / 2.0) * h,
                (cx + bw / 2.0) * w,
                (cy + bh / 2.0) * h,
            ]
        }
        n if n >= 6 && n % 2 == 0 => {
            let xs = values.iter().step_by(2);
            let ys = values.iter().skip(1).step_by(2);
            let (x1, x2) = xs.fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
            let (y1, y2) = ys.fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
            [x1 * w, y1 * h, x2 * w, y2 * h]
        }
        n => {
            return Err(format!(
            "expected `class cx cy w h` or a polygon `class x1 y1 x2 y2 x3 y3 ...`, got {} fields",
            n + 1
        ))
        }
    };
    Ok((class, raw.map(|v| v as f32)))
}
