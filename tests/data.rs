//! Dataset loading, validation, augmentation and batching, on the real datasets in
//! `../shared/data` and on small hand-made files.

use std::path::{Path, PathBuf};

use retinanet::data::{
    self, augment, crop_boxes, detect_format, AugmentConfig, CropConfig, DataError, Dataset,
    Format, LoadOpts, Loader, LoaderConfig, Region, Rng, TileConfig, WarningKind,
};

/// A dataset under `../shared/data`, or a panic that says where it was expected.
fn shared(sub: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data");
    let path = root.join(sub);
    assert!(
        path.exists(),
        "missing test data {}: these tests read the shared datasets from ../shared/data beside \
         the repository (see ../shared/README.md)",
        path.display()
    );
    path
}

fn load(sub: &str, split: Option<&str>) -> Dataset {
    let opts = LoadOpts {
        split: split.map(str::to_string),
        ..LoadOpts::default()
    };
    data::load(shared(sub), None, &opts).unwrap_or_else(|e| panic!("loading {sub}: {e}"))
}

/// A fresh empty folder for one test.
fn temp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("data-tests")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes a `w`×`h` PNG whose pixel (x, y) is (x, y, 7) mod 256.
fn write_png(path: &Path, w: u32, h: u32) {
    let image = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([x as u8, y as u8, 7]));
    image.save(path).unwrap();
}

fn kinds(ds: &Dataset, kind: WarningKind) -> Vec<String> {
    ds.warnings_of(kind).map(|w| w.to_string()).collect()
}

#[test]
fn bccd_splits_have_the_published_counts_and_two_zero_area_warnings() {
    let train = load("bccd", Some("train"));
    let val = load("bccd", Some("val"));
    let test = load("bccd", Some("test"));
    let all = load("bccd", None);
    for ds in [&train, &val, &test, &all] {
        assert_eq!(ds.format, Format::Voc);
        assert_eq!(ds.class_names, ["Platelets", "RBC", "WBC"]);
        assert!(ds.samples.iter().all(|s| (s.width, s.height) == (640, 480)));
    }
    assert_eq!(
        (train.len(), val.len(), test.len(), all.len()),
        (205, 87, 72, 364)
    );
    assert_eq!(train.class_counts(), [209, 2381, 214]);
    assert_eq!(val.class_counts(), [83, 967, 87]);
    assert_eq!(test.class_counts(), [69, 805, 71]);
    // README: RBC 4155, WBC 372, Platelets 361, less the two zero-area RBC boxes.
    assert_eq!(all.class_counts(), [361, 4155 - 2, 372]);
    let empty = kinds(&all, WarningKind::EmptyBox);
    assert_eq!(all.warnings.len(), 2, "{:#?}", all.warnings);
    assert!(empty[0].contains("BloodImage_00338.xml:") && empty[0].contains("object 12 (RBC)"));
    assert!(empty[1].contains("BloodImage_00343.xml:") && empty[1].contains("object 3 (RBC)"));
    // Each split reports only its own file.
    assert_eq!(kinds(&train, WarningKind::EmptyBox).len(), 1);
    assert!(kinds(&train, WarningKind::EmptyBox)[0].contains("00343"));
    assert!(kinds(&val, WarningKind::EmptyBox)[0].contains("00338"));
    assert!(test.warnings.is_empty());
    // The warning's line is the `<object>` tag of the 13th object.
    let w = all.warnings_of(WarningKind::EmptyBox).next().unwrap();
    let text = std::fs::read_to_string(&w.file).unwrap();
    let line = text.lines().nth(w.line.unwrap() - 1).unwrap();
    assert_eq!(line.trim(), "<object>");
    assert_eq!(
        text.lines()
            .take(w.line.unwrap())
            .filter(|l| l.contains("<object>"))
            .count(),
        13
    );
}

#[test]
fn strict_loading_rejects_the_zero_area_box_and_names_it() {
    let strict = |split: &str| LoadOpts {
        strict: true,
        split: Some(split.into()),
        ..LoadOpts::default()
    };
    let err = data::load(shared("bccd"), None, &strict("val")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::Strict(ref w) if w.kind == WarningKind::EmptyBox));
    assert!(
        msg.contains("BloodImage_00338.xml") && msg.contains("object 12"),
        "{msg}"
    );
    // The test split is clean, so strict loading accepts it.
    let test = data::load(shared("bccd"), None, &strict("test")).unwrap();
    assert_eq!(test.len(), 72);
    // The crate error carries the message through.
    let err: retinanet::Error = data::load(shared("bccd"), None, &strict("train"))
        .unwrap_err()
        .into();
    assert!(err.to_string().contains("BloodImage_00343.xml"));
}

#[test]
fn deepforest_trees_load_per_split_with_the_tif_fallback() {
    let train = load("deepforest-trees", Some("train"));
    let val = load("deepforest-trees", Some("val"));
    let all = load("deepforest-trees", None);
    assert_eq!(train.class_names, ["Tree"]);
    let sizes: Vec<_> = train
        .samples
        .iter()
        .map(|s| (s.width, s.height, s.boxes.len()))
        .collect();
    assert_eq!(sizes, [(2299, 2472, 574), (1249, 1035, 279)]);
    assert!(train.warnings.is_empty(), "{:#?}", train.warnings);
    assert_eq!((val.len(), val.num_boxes()), (1, 61));
    assert_eq!(
        val.samples[0].image_path.file_name().unwrap(),
        "OSBS_029.png"
    );
    let fallback = kinds(&val, WarningKind::ImageFallback);
    assert_eq!(fallback.len(), 1, "{:#?}", val.warnings);
    assert!(fallback[0].contains("OSBS_029.xml") && fallback[0].contains("OSBS_029.tif"));
    assert!(fallback[0].contains("OSBS_029.png"));
    assert_eq!((all.len(), all.num_boxes()), (3, 574 + 279 + 61));
    // The fallback keeps data, so strict loading accepts it.
    let strict = LoadOpts {
        strict: true,
        ..LoadOpts::default()
    };
    assert_eq!(
        data::load(shared("deepforest-trees/val"), None, &strict)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn tiling_the_tree_crops_covers_every_small_box_whole() {
    let train = load("deepforest-trees", Some("train"));
    let config = TileConfig {
        size: 600,
        overlap: 100,
        min_visibility: 0.5,
        keep_empty: true,
    };
    let (tiles, stats) = train.tile(&config).unwrap();
    // With strides of at most 500 px, 2299 and 2472 need 5 starts each, 1249 3, 1035 2.
    assert_eq!(stats.tiles, 5 * 5 + 3 * 2);
    assert_eq!(tiles.len(), stats.tiles);
    assert_eq!(stats.boxes_kept, tiles.num_boxes());
    for t in &tiles.samples {
        let r = t.region.unwrap();
        assert_eq!((r.width, r.height), (600, 600));
        assert!(t
            .boxes
            .iter()
            .all(|b| b[0] >= 0.0 && b[1] >= 0.0 && b[2] <= 600.0 && b[3] <= 600.0));
    }
    // A box no larger than the overlap lies whole in some tile.
    for (i, sample) in train.samples.iter().enumerate() {
        for b in sample
            .boxes
            .iter()
            .filter(|b| b[2] - b[0] <= 100.0 && b[3] - b[1] <= 100.0)
        {
            let whole = tiles
                .samples
                .iter()
                .filter(|t| t.image_path == sample.image_path)
                .any(|t| {
                    let r = t.region.unwrap();
                    let shifted = [
                        b[0] - r.x as f32,
                        b[1] - r.y as f32,
                        b[2] - r.x as f32,
                        b[3] - r.y as f32,
                    ];
                    t.boxes.contains(&shifted)
                });
            assert!(whole, "sample {i} box {b:?} is whole in no tile");
        }
    }
    // A tile decodes to its window of the source image.
    let tile = &tiles.samples[7];
    let pixels = tile.load_image().unwrap();
    let source = data::decode_rgb(&tile.image_path).unwrap();
    let r = tile.region.unwrap();
    assert_eq!(pixels.dimensions(), (600, 600));
    assert_eq!(pixels.get_pixel(5, 9), source.get_pixel(r.x + 5, r.y + 9));
    // Dropping empty tiles only removes tiles without boxes.
    let (kept, stats2) = train
        .tile(&TileConfig {
            keep_empty: false,
            ..config
        })
        .unwrap();
    assert_eq!(kept.len() + stats2.empty_skipped, tiles.len());
    assert!(kept.samples.iter().all(|s| !s.boxes.is_empty()));
}

#[test]
fn chess_yolo_splits_classes_and_the_stray_bishop() {
    let train = load("chess-pieces", Some("train"));
    let valid = load("chess-pieces", Some("valid"));
    let val = load("chess-pieces", Some("val"));
    let test = load("chess-pieces", Some("test"));
    assert_eq!(train.format, Format::Yolo);
    assert_eq!(train.num_classes(), 13);
    assert_eq!(train.class_names[0], "bishop");
    assert_eq!(train.class_names[1], "black-bishop");
    assert_eq!(train.class_names[12], "white-rook");
    assert_eq!((train.len(), train.num_boxes()), (606, 6324));
    assert_eq!((valid.len(), valid.num_boxes()), (58, 386));
    assert_eq!(val.samples, valid.samples);
    assert_eq!((test.len(), test.num_boxes()), (29, 376));
    // The stray 13th class `bishop` (index 0) has 3 boxes, all in train.
    assert_eq!(train.class_counts()[0], 3);
    assert_eq!(valid.class_counts()[0] + test.class_counts()[0], 0);
    assert_eq!(
        train.class_counts(),
        [3, 291, 303, 423, 1488, 186, 441, 375, 315, 420, 1422, 243, 414]
    );
    // One test image has an empty label file: kept, without boxes, without a warning.
    assert_eq!(
        test.samples.iter().filter(|s| s.boxes.is_empty()).count(),
        1
    );
    for ds in [&train, &valid, &test] {
        assert!(
            ds.warnings.is_empty(),
            "{:#?}",
            &ds.warnings[..ds.warnings.len().min(3)]
        );
        assert!(ds.samples.iter().all(|s| (s.width, s.height) == (416, 416)));
    }
    // A split folder loads on its own, taking the names from the parent's data.yaml.
    let direct = data::load(shared("chess-pieces/valid"), None, &LoadOpts::default()).unwrap();
    assert_eq!(direct.samples, valid.samples);
    assert_eq!(direct.class_names, valid.class_names);
    let all = load("chess-pieces", None);
    assert_eq!(all.len(), 606 + 58 + 29);
}

#[test]
fn coco_gt_maps_categories_to_contiguous_labels() {
    let path = shared("coco-eval-fake100/gt.json");
    let opts = LoadOpts {
        check_images: false,
        ..LoadOpts::default()
    };
    let ds = data::load(&path, None, &opts).unwrap();
    assert_eq!(ds.format, Format::Coco);
    assert_eq!((ds.len(), ds.num_boxes()), (100, 839 - 9));
    assert_eq!(ds.num_classes(), 80);
    let ids = ds.category_ids.as_ref().unwrap();
    assert_eq!((ids[0], ids[79]), (1, 90));
    assert_eq!(ds.class_names[0], "person");
    assert_eq!(ds.class_counts()[0], 250);
    assert_eq!(kinds(&ds, WarningKind::Crowd).len(), 9);
    assert_eq!(ds.samples[0].image_id, Some(1146));
    assert_eq!((ds.samples[0].width, ds.samples[0].height), (427, 640));
    assert!(ds
        .warnings
        .iter()
        .all(|w| w.kind == WarningKind::Crowd || w.kind == WarningKind::ClippedBox));
    // With image checks on, the missing images are named and skipped, or rejected.
    let checked = data::load(&path, None, &LoadOpts::default()).unwrap();
    assert_eq!(checked.len(), 0);
    let missing = kinds(&checked, WarningKind::UnknownImage);
    assert_eq!(missing.len(), 100);
    assert!(
        missing[0].contains("COCO_val2014_000000001146.jpg"),
        "{}",
        missing[0]
    );
    let strict = LoadOpts {
        strict: true,
        ..LoadOpts::default()
    };
    let err = data::load(&path, None, &strict).unwrap_err().to_string();
    assert!(
        err.contains("gt.json") && err.contains("COCO_val2014_"),
        "{err}"
    );
}

#[test]
fn formats_are_detected_and_named() {
    let detect = |sub: &str| detect_format(&shared(sub)).unwrap();
    assert_eq!(detect("bccd"), Format::Voc);
    assert_eq!(detect("deepforest-trees"), Format::Voc);
    assert_eq!(detect("deepforest-trees/val"), Format::Voc);
    assert_eq!(detect("chess-pieces"), Format::Yolo);
    assert_eq!(detect("chess-pieces/test"), Format::Yolo);
    assert_eq!(detect("coco-eval-fake100/gt.json"), Format::Coco);
    assert_eq!("yolo".parse::<Format>().unwrap(), Format::Yolo);
    assert!("parquet"
        .parse::<Format>()
        .unwrap_err()
        .to_string()
        .contains("parquet"));
    let err = detect_format(&shared("photos")).unwrap_err().to_string();
    assert!(
        err.contains("photos") && err.contains("cannot detect"),
        "{err}"
    );
    let err = data::load(shared("bccd").join("nope"), None, &LoadOpts::default()).unwrap_err();
    assert!(err.to_string().contains("nope"));
    let err = data::load(
        shared("bccd"),
        None,
        &LoadOpts {
            split: Some("holdout".into()),
            ..LoadOpts::default()
        },
    );
    assert!(err.unwrap_err().to_string().contains("holdout.txt"));
}

#[test]
fn csv_rows_are_validated_with_file_and_line() {
    let dir = temp_dir("csv");
    write_png(&dir.join("a.png"), 40, 30);
    write_png(&dir.join("b, c.png"), 20, 20);
    write_png(&dir.join("d.v1.png"), 10, 10);
    let csv = dir.join("boxes.csv");
    let rows = "image,x1,y1,x2,y2,label\n\
                a.png,1,2,11,12,dog\n\
                a.png,-5,0,10,40,cat\n\
                \"b, c.png\",,,,,\n\
                a.png,5,5,5,9,dog\n\
                missing.png,1,1,2,2,dog\n\
                a.png,9,9,3,12,cat\n\
                \"b, c.png\",2,2,8,8,cat\n\
                d.v1.tif,1,1,4,4,cat\n";
    std::fs::write(&csv, rows).unwrap();
    let ds = data::load(&csv, None, &LoadOpts::default()).unwrap();
    assert_eq!(ds.format, Format::Csv);
    assert_eq!(ds.class_names, ["cat", "dog"]);
    assert_eq!(ds.len(), 3);
    let a = &ds.samples[0];
    assert_eq!((a.width, a.height), (40, 30));
    assert_eq!(a.boxes, [[1.0, 2.0, 11.0, 12.0], [0.0, 0.0, 10.0, 30.0]]);
    assert_eq!(a.labels, [1, 0]);
    assert_eq!(ds.samples[1].boxes, [[2.0, 2.0, 8.0, 8.0]]);
    let lines = |kind| {
        ds.warnings_of(kind)
            .map(|w| w.line.unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(lines(WarningKind::ClippedBox), [3]);
    assert_eq!(lines(WarningKind::EmptyBox), [5]);
    assert_eq!(lines(WarningKind::UnknownImage), [6]);
    assert_eq!(lines(WarningKind::InvertedBox), [7]);
    // `d.v1.tif` is missing; `d.v1.png` (a stem with a dot) stands in for it.
    assert_eq!(lines(WarningKind::ImageFallback), [9]);
    assert!(ds.samples[2].image_path.ends_with("d.v1.png"));
    let shown = kinds(&ds, WarningKind::UnknownImage)[0].clone();
    assert!(shown.starts_with(&format!("{}:6:", csv.display())) && shown.contains("missing.png"));
    // Fixed classes: unknown ones are skipped with a warning.
    let fixed = LoadOpts {
        classes: Some(vec!["dog".into()]),
        ..LoadOpts::default()
    };
    let ds = data::load(&csv, Some(Format::Csv), &fixed).unwrap();
    assert_eq!(ds.samples[0].labels, [0]);
    assert_eq!(kinds(&ds, WarningKind::UnknownClass).len(), 4);
    // Strict: the first skipped row is an error naming file and line.
    let strict = LoadOpts {
        strict: true,
        ..LoadOpts::default()
    };
    let err = data::load(&csv, None, &strict).unwrap_err().to_string();
    assert!(
        err.contains("boxes.csv:5:") && err.contains("zero-area"),
        "{err}"
    );
    // A malformed row is always an error with file and line.
    std::fs::write(&csv, "a.png,1,2,11,12,dog\na.png,1,two,11,12,dog\n").unwrap();
    let err = data::load(&csv, None, &LoadOpts::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("boxes.csv:2:") && err.contains("`two`"),
        "{err}"
    );
    std::fs::write(&csv, "a.png,1,2,11,12\n").unwrap();
    let err = data::load(&csv, None, &LoadOpts::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("boxes.csv:1:") && err.contains("6 fields"),
        "{err}"
    );
}

#[test]
fn nothing_is_guessed_or_dropped_silently() {
    // YOLO without class names: numbered from the largest label, with a warning.
    let dir = temp_dir("yolo-unnamed");
    write_png(&dir.join("x.png"), 20, 20);
    std::fs::write(dir.join("x.txt"), "3 0.5 0.5 0.2 0.4\n").unwrap();
    let ds = data::load(&dir, Some(Format::Yolo), &LoadOpts::default()).unwrap();
    assert_eq!(ds.class_names, ["0", "1", "2", "3"]);
    let warning = ds.warnings_of(WarningKind::ClassesGuessed).next().unwrap();
    assert_eq!(warning.file, dir);
    assert!(warning.message.contains("no data.yaml"), "{warning}");
    // A CSV row of empty fields is an error naming its line, not a row dropped.
    let dir = temp_dir("csv-empty-row");
    write_png(&dir.join("a.png"), 20, 20);
    let csv = dir.join("boxes.csv");
    std::fs::write(&csv, "a.png,1,2,11,12,dog\n,,,,,\n").unwrap();
    let err = data::load(&csv, None, &LoadOpts::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("boxes.csv:2:") && err.contains("empty image path"),
        "{err}"
    );
    // A truncated image: a warning naming it, the image skipped and counted.
    let bytes = std::fs::read(dir.join("a.png")).unwrap();
    std::fs::write(dir.join("b.png"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(&csv, "a.png,1,2,11,12,dog\nb.png,1,2,11,12,dog\n").unwrap();
    let ds = data::load(&csv, None, &LoadOpts::default()).unwrap();
    assert_eq!(ds.len(), 1);
    let warning = ds.warnings_of(WarningKind::UnreadableImage).next().unwrap();
    assert!(warning.message.contains("b.png"), "{warning}");
    assert!(
        ds.summary().contains("1 unreadable image(s) skipped"),
        "{}",
        ds.summary()
    );
    // COCO without classes or without annotations.
    let json = dir.join("coco.json");
    let image = r#"{"id": 1, "file_name": "a.png", "width": 20, "height": 20}"#;
    let doc = format!(r#"{{"images": [{image}], "annotations": [], "categories": []}}"#);
    std::fs::write(&json, doc).unwrap();
    let err = data::load(&json, None, &LoadOpts::default()).unwrap_err();
    assert!(err.to_string().contains("`categories` is empty"), "{err}");
    let doc = format!(r#"{{"images": [{image}], "categories": [{{"id": 1, "name": "a"}}]}}"#);
    std::fs::write(&json, doc).unwrap();
    let err = data::load(&json, None, &LoadOpts::default()).unwrap_err();
    assert!(
        err.to_string().contains("missing field `annotations`"),
        "{err}"
    );
}

#[test]
fn yolo_problems_name_file_and_line() {
    let dir = temp_dir("yolo");
    write_png(&dir.join("x.png"), 100, 50);
    write_png(&dir.join("y.png"), 10, 10);
    std::fs::write(dir.join("classes.txt"), "alpha\nbeta\n").unwrap();
    // Box 2 is outside, box 3 has an unknown class, box 4 is a polygon.
    let labels =
        "0 0.5 0.5 0.2 0.4\n1 1.2 0.5 0.1 0.1\n\n5 0.5 0.5 0.1 0.1\n1 0.1 0.2 0.3 0.2 0.2 0.6";
    std::fs::write(dir.join("x.txt"), labels).unwrap();
    std::fs::write(dir.join("orphan.txt"), "0 0.5 0.5 0.1 0.1\n").unwrap();
    let ds = data::load(&dir, None, &LoadOpts::default()).unwrap();
    assert_eq!(ds.format, Format::Yolo);
    assert_eq!(ds.class_names, ["alpha", "beta"]);
    assert_eq!(ds.len(), 2);
    let x = &ds.samples[0];
    assert_eq!(x.labels, [0, 1]);
    assert_eq!(x.boxes[0], [40.0, 15.0, 60.0, 35.0]);
    let p = x.boxes[1];
    let close = |a: f32, b: f32| (a - b).abs() < 1e-4;
    assert!(
        close(p[0], 10.0) && close(p[1], 10.0) && close(p[2], 30.0) && close(p[3], 30.0),
        "{p:?}"
    );
    let line_of = |kind| {
        ds.warnings_of(kind)
            .next()
            .map(|w| (w.file.clone(), w.line))
    };
    assert_eq!(
        line_of(WarningKind::EmptyBox),
        Some((dir.join("x.txt"), Some(2)))
    );
    assert_eq!(
        line_of(WarningKind::UnknownClass),
        Some((dir.join("x.txt"), Some(4)))
    );
    assert_eq!(
        line_of(WarningKind::UnknownImage),
        Some((dir.join("orphan.txt"), None))
    );
    assert_eq!(
        line_of(WarningKind::NoAnnotation),
        Some((dir.join("y.png"), None))
    );
    std::fs::write(dir.join("x.txt"), "0 0.5 0.5 0.2 0.4\n0 0.5 0.5 0.2\n").unwrap();
    let err = data::load(&dir, None, &LoadOpts::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!("{}:2:", dir.join("x.txt").display())),
        "{err}"
    );
}

#[test]
fn yolo_data_yaml_names_in_block_and_map_forms() {
    let dir = temp_dir("yaml");
    for split in ["train", "valid"] {
        std::fs::create_dir_all(dir.join(split).join("images")).unwrap();
        std::fs::create_dir_all(dir.join(split).join("labels")).unwrap();
        write_png(&dir.join(split).join("images/p.png"), 8, 8);
        std::fs::write(dir.join(split).join("labels/p.txt"), "1 0.5 0.5 0.5 0.5\n").unwrap();
    }
    let yaml = dir.join("data.yaml");
    std::fs::write(
        &yaml,
        "train: ../train/images\nnc: 2\nnames:\n  - 'it''s'\n  - \"b\"  # comment\n",
    )
    .unwrap();
    let ds = data::load(&dir, None, &LoadOpts::default()).unwrap();
    assert_eq!(ds.class_names, ["it's", "b"]);
    assert_eq!(ds.len(), 2);
    std::fs::write(&yaml, "names:\n  0: person\n  1: bicycle\nval: x\n").unwrap();
    let ds = data::load(
        &dir,
        None,
        &LoadOpts {
            split: Some("val".into()),
            ..LoadOpts::default()
        },
    )
    .unwrap();
    assert_eq!(ds.class_names, ["person", "bicycle"]);
    assert_eq!(ds.len(), 1);
    assert_eq!(ds.samples[0].labels, [1]);
    std::fs::write(&yaml, "nc: 3\nnames: [a, b]\n").unwrap();
    let err = data::load(&dir, None, &LoadOpts::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("data.yaml:1:") && err.contains("nc: 3"),
        "{err}"
    );
}

#[test]
fn voc_errors_name_the_file() {
    let dir = temp_dir("voc");
    write_png(&dir.join("img.png"), 30, 20);
    let xml = "<annotation>\n<filename>img.png</filename>\n<size><width>30</width><height>25</height></size>\n\
               <object>\n<name>cat</name>\n<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>35</xmax><ymax>12</ymax></bndbox>\n</object>\n\
               </annotation>\n";
    std::fs::write(dir.join("img.xml"), xml).unwrap();
    let ds = data::load(&dir, None, &LoadOpts::default()).unwrap();
    assert_eq!(ds.samples[0].boxes, [[1.0, 2.0, 30.0, 12.0]]);
    let w: Vec<_> = ds.warnings.iter().map(|w| (w.kind, w.line)).collect();
    assert_eq!(
        w,
        [
            (WarningKind::SizeMismatch, None),
            (WarningKind::ClippedBox, Some(4))
        ]
    );
    std::fs::write(
        dir.join("img.xml"),
        "<annotation><object><name>cat</name><bndbox><xmin>a</xmin></bndbox></object></annotation>",
    )
    .unwrap();
    let err = data::load(&dir, None, &LoadOpts::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("img.xml:1:") && err.contains("object 0 (cat)"),
        "{err}"
    );
    std::fs::write(dir.join("img.xml"), "<annotation><object>").unwrap();
    let err = data::load(&dir, None, &LoadOpts::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("img.xml") && err.contains("invalid VOC XML"),
        "{err}"
    );
}

#[test]
fn augmentation_flips_crops_and_picks_sizes_deterministically() {
    let image = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8, y as u8, 0]));
    let boxes = [[2.0, 3.0, 12.0, 13.0], [30.0, 0.0, 40.0, 30.0]];
    let flip = AugmentConfig {
        hflip: 1.0,
        ..AugmentConfig::default()
    };
    let out = augment(image.clone(), &boxes, &[0, 1], &flip, &mut Rng::new(1));
    assert_eq!(out.boxes, [[28.0, 3.0, 38.0, 13.0], [0.0, 0.0, 10.0, 30.0]]);
    assert_eq!(out.image.get_pixel(0, 5), image.get_pixel(39, 5));
    assert_eq!(out.min_size, None);
    let config = AugmentConfig {
        hflip: 0.5,
        min_sizes: vec![240, 320, 400],
        crop: Some(CropConfig {
            width: 20,
            height: 20,
            min_visibility: 0.6,
        }),
    };
    let mut sizes = std::collections::BTreeSet::new();
    let mut flips = 0;
    for seed in 0..64 {
        let a = augment(image.clone(), &boxes, &[0, 1], &config, &mut Rng::new(seed));
        let b = augment(image.clone(), &boxes, &[0, 1], &config, &mut Rng::new(seed));
        assert_eq!(
            (&a.boxes, a.min_size, a.dropped),
            (&b.boxes, b.min_size, b.dropped)
        );
        assert_eq!(a.image.dimensions(), (20, 20));
        assert!(a.boxes.iter().flatten().all(|&v| (0.0..=20.0).contains(&v)));
        sizes.insert(a.min_size.unwrap());
        flips += usize::from(a.image.get_pixel(0, 0)[0] > a.image.get_pixel(19, 0)[0]);
    }
    assert_eq!(sizes.into_iter().collect::<Vec<_>>(), [240, 320, 400]);
    assert!((16..=48).contains(&flips), "{flips} flips in 64");
    // A window keeping 60% of box 0 keeps it clipped; one keeping 40% drops it.
    let window = |x| Region {
        x,
        y: 0,
        width: 20,
        height: 20,
    };
    let (kept, labels, dropped) = crop_boxes(&boxes, &[0, 1], window(6), 0.6);
    assert_eq!(
        (kept, labels, dropped),
        (vec![[0.0, 3.0, 6.0, 13.0]], vec![0], 0)
    );
    let (kept, _, dropped) = crop_boxes(&boxes, &[0, 1], window(8), 0.6);
    assert_eq!((kept.len(), dropped), (0, 1));
}

#[test]
fn loader_shuffles_per_epoch_and_prefetches_batches() {
    let ds = load("bccd", Some("test"));
    let n = ds.len();
    let mut config = LoaderConfig::new(5, 42);
    config.augment.hflip = 0.5;
    let loader = Loader::new(ds.clone(), config.clone()).unwrap();
    assert_eq!(loader.batches_per_epoch(), n.div_ceil(5));
    let e0 = loader.epoch_batches(0);
    let mut seen: Vec<usize> = e0.iter().flatten().copied().collect();
    assert_ne!(seen, (0..n).collect::<Vec<_>>());
    seen.sort();
    assert_eq!(seen, (0..n).collect::<Vec<_>>());
    assert_ne!(loader.epoch_batches(1), e0);
    assert_eq!(
        Loader::new(ds.clone(), config.clone())
            .unwrap()
            .epoch_batches(0),
        e0
    );
    // The prefetched epoch gives the same batches as loading them directly.
    let batches: Vec<_> = loader.epoch(0).take(3).map(Result::unwrap).collect();
    for (batch, ids) in batches.iter().zip(&e0) {
        assert_eq!(&batch.ids, ids);
        let direct = loader.load_batch(0, ids).unwrap();
        assert_eq!(batch.targets, direct.targets);
        assert_eq!(batch.images, direct.images);
        for ((image, target), &id) in batch.images.iter().zip(&batch.targets).zip(ids) {
            let s = &ds.samples[id];
            assert_eq!(image.dimensions(), (s.width, s.height));
            assert_eq!(target.labels, s.labels);
            let flipped: Vec<[f32; 4]> = s
                .boxes
                .iter()
                .map(|b| [640.0 - b[2], b[1], 640.0 - b[0], b[3]])
                .collect();
            assert!(target.boxes == s.boxes || target.boxes == flipped);
        }
    }
    // A stream runs on into the next epoch; drop_last trims the short batch.
    let epochs: Vec<usize> = loader
        .stream(0)
        .take(loader.batches_per_epoch() + 1)
        .map(|b| b.unwrap().epoch)
        .collect();
    assert_eq!((epochs[0], *epochs.last().unwrap()), (0, 1));
    config.drop_last = true;
    config.cache_images = true;
    let trimmed = Loader::new(ds, config).unwrap();
    assert_eq!(trimmed.batches_per_epoch(), n / 5);
    assert!(trimmed.epoch(3).all(|b| b.unwrap().images.len() == 5));
    assert!(Loader::new(
        Dataset {
            samples: vec![],
            ..load("bccd", Some("test"))
        },
        LoaderConfig::new(2, 0)
    )
    .is_err());
}

#[test]
fn loader_random_crops_of_tree_crops_stay_in_bounds() {
    let train = load("deepforest-trees", Some("train"));
    let mut config = LoaderConfig::new(2, 7);
    config.cache_images = true;
    config.augment = AugmentConfig {
        hflip: 0.5,
        min_sizes: vec![400, 500],
        crop: Some(CropConfig {
            width: 600,
            height: 500,
            min_visibility: 0.5,
        }),
    };
    let loader = Loader::new(train, config).unwrap();
    let batch = loader.epoch(0).next().unwrap().unwrap();
    assert_eq!(batch.images.len(), 2);
    for (image, target) in batch.images.iter().zip(&batch.targets) {
        assert_eq!(image.dimensions(), (600, 500));
        assert!(!target.boxes.is_empty());
        assert!(target.boxes.iter().all(|b| b[0] >= 0.0
            && b[2] <= 600.0
            && b[1] >= 0.0
            && b[3] <= 500.0
            && b[0] < b[2]
            && b[1] < b[3]));
        let (boxes, labels) = target.to_tensors(&candle_core::Device::Cpu).unwrap();
        assert_eq!(boxes.dims(), [target.boxes.len(), 4]);
        assert_eq!(labels.dims(), [target.labels.len()]);
    }
    assert!(batch.min_sizes.iter().all(|s| matches!(s, Some(400 | 500))));
}

#[test]
fn coco_problems_are_named_by_annotation() {
    let dir = temp_dir("coco");
    write_png(&dir.join("a.png"), 20, 10);
    let json = dir.join("ann.json");
    let text = r#"{
      "images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 10},
                 {"id": 2, "file_name": "gone.png", "width": 5, "height": 5}],
      "categories": [{"id": 7, "name": "x"}, {"id": 3, "name": "y"}],
      "annotations": [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},
        {"id": 2, "image_id": 9, "category_id": 7, "bbox": [1, 1, 5, 5]},
        {"id": 3, "image_id": 1, "category_id": 4, "bbox": [1, 1, 5, 5]},
        {"id": 4, "image_id": 2, "category_id": 3, "bbox": [1, 1, 2, 2]},
        {"id": 5, "image_id": 1, "category_id": 3, "bbox": [15, 0, 10, 5]}
      ]
    }"#;
    std::fs::write(&json, text).unwrap();
    let ds = data::load(&json, None, &LoadOpts::default()).unwrap();
    assert_eq!(ds.class_names, ["y", "x"]);
    assert_eq!(ds.category_ids, Some(vec![3, 7]));
    assert_eq!(ds.len(), 1);
    assert_eq!(
        ds.samples[0].boxes,
        [[1.0, 1.0, 6.0, 6.0], [15.0, 0.0, 20.0, 5.0]]
    );
    assert_eq!(ds.samples[0].labels, [1, 0]);
    let found: Vec<_> = ds.warnings.iter().map(|w| w.kind).collect();
    use WarningKind::*;
    assert_eq!(
        found,
        [UnknownImage, UnknownImage, UnknownClass, ClippedBox]
    );
    assert!(ds.warnings[0].message.contains("gone.png"));
    assert!(
        ds.warnings[1].message.contains("id 2") && ds.warnings[1].message.contains("image id 9")
    );
    assert!(ds.warnings[2].message.contains("category 4"));
    std::fs::write(&json, "{\n  \"images\": [\n  oops\n]}").unwrap();
    let err = data::load(&json, None, &LoadOpts::default())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with(&format!("{}:3:", json.display())), "{err}");
}
