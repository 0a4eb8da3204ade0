//! Fuzzing every parser on stable Rust: a fixed-seed mutation loop (bit flips, interesting
//! bytes, deletions, insertions, duplications, format tokens, splices, truncations) over
//! seeds taken from the shared datasets and the fixtures, each input run under
//! `catch_unwind`. An error is a pass; a panic fails the test, and the input is saved under
//! `target/fuzz-crashes/`: fixed, it goes to `tests/fuzz_regressions/<target>/`, which every
//! run replays first. (An abort, such as a failed huge
//! allocation, kills the process: the run is deterministic, so the same seed and count
//! reproduce it.)
//!
//! CI runs a bounded count per target. Longer local runs:
//!
//! ```text
//! RETINANET_FUZZ_ITERS=200000 RETINANET_FUZZ_SECS=600 RETINANET_FUZZ_SEED=7 \
//!     cargo test --release --test fuzz -- --nocapture
//! ```
//!
//! `RETINANET_FUZZ_ITERS` (default 20000) caps the executions per target,
//! `RETINANET_FUZZ_SECS` (default 5) its time, `RETINANET_FUZZ_SEED` (default 16) picks the
//! mutations. Executions per target are printed and appended to `target/fuzz-report.txt`.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use retinanet::data::{self, Format, LoadOpts};

fn shared() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A scratch folder of this target's own.
fn scratch(target: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("retinanet-fuzz-{}-{target}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Tokens of the text formats, inserted whole: they reach deeper than random bytes.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"-1",
    b"0",
    b"1e309",
    b"-1e309",
    b"NaN",
    b"Infinity",
    b"null",
    b"true",
    b"\"\"",
    b"[]",
    b"{}",
    b"18446744073709551616",
    b"4294967296",
    b"-0",
    b"1e-45",
    b"<",
    b">",
    b"</",
    b"<object>",
    b"</object>",
    b"<bndbox>",
    b"<xmin>",
    b"<name>",
    b"&amp;",
    b"&#0;",
    b"<!--",
    b"\n",
    b"\r\n",
    b" ",
    b"\t",
    b"#",
    b"names:",
    b"nc:",
    b"- ",
    b"\xff\xd9",
    b"\xff\xd8",
    b"\xff\xc0",
    b"\xff\xda",
    b"IEND",
    b"IDAT",
    b"\x00\x00\x00\x00",
    b"\xff\xff\xff\xff",
    b"\x80\x02",
    b"\x7f",
];

/// One mutation of `input`: up to four edits, a splice from `seeds` now and then.
fn mutate(rng: &mut fastrand::Rng, input: &[u8], seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..rng.usize(1..=4) {
        let len = out.len();
        let at = rng.usize(0..=len);
        match rng.u8(0..8) {
            0 if len > 0 => {
                let i = rng.usize(0..len);
                out[i] ^= 1 << rng.u8(0..8);
            }
            1 if len > 0 => {
                let i = rng.usize(0..len);
                out[i] = [0, 0xFF, 0x7F, 0x80, b'9', b'-'][rng.usize(0..6)];
            }
            2 if len > 0 => {
                let end = (at + rng.usize(1..=16.max(len / 8))).min(len);
                out.drain(at.min(end)..end);
            }
            3 => {
                let bytes: Vec<u8> = (0..rng.usize(1..=8)).map(|_| rng.u8(..)).collect();
                out.splice(at..at, bytes);
            }
            4 if len > 0 => {
                let start = rng.usize(0..len);
                let end = (start + rng.usize(1..=64)).min(len);
                let piece = out[start..end].to_vec();
                out.splice(at..at, piece);
            }
            5 => {
                let token = TOKENS[rng.usize(0..TOKENS.len())];
                out.splice(at..at, token.iter().copied());
            }
            6 => out.truncate(at),
            _ => {
                let other = &seeds[rng.usize(0..seeds.len())];
                if !other.is_empty() {
                    let start = rng.usize(0..other.len());
                    let end = (start + rng.usize(1..=256)).min(other.len());
                    out.splice(at..at, other[start..end].iter().copied());
                }
            }
        }
    }
    out.truncate(1 << 20);
    out
}

/// Runs `exec` on every seed, then on mutations until the budget is spent; fails on any
/// panic, saving its input. Returns the executions.
fn fuzz(target: &str, mut seeds: Vec<Vec<u8>>, mut exec: impl FnMut(&[u8])) -> usize {
    assert!(!seeds.is_empty(), "{target}: no seeds");
    // Inputs that once crashed run first, every time.
    seeds.extend(regressions(target));
    let iters: usize = env_or("RETINANET_FUZZ_ITERS", 20_000);
    let budget = Duration::from_secs_f64(env_or("RETINANET_FUZZ_SECS", 5.0));
    let seed: u64 = env_or("RETINANET_FUZZ_SEED", 16);
    let mut rng = fastrand::Rng::with_seed(seed ^ hash(target));
    let crashes_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-crashes");
    let (start, mut runs, mut crashes) = (Instant::now(), 0, Vec::new());
    // Mutations of mutations reach further from the seeds than mutations of seeds alone.
    let mut last = seeds[0].clone();
    while runs < seeds.len() || (runs < iters && start.elapsed() < budget) {
        let input = match runs < seeds.len() {
            true => seeds[runs].clone(),
            false if rng.bool() => mutate(&mut rng, &last, &seeds),
            false => {
                let base = rng.usize(0..seeds.len());
                mutate(&mut rng, &seeds[base], &seeds)
            }
        };
        if catch_unwind(AssertUnwindSafe(|| exec(&input))).is_err() {
            std::fs::create_dir_all(&crashes_dir).unwrap();
            let path = crashes_dir.join(format!("{target}-{seed}-{runs}.bin"));
            std::fs::write(&path, &input).unwrap();
            crashes.push(path);
        }
        last = input;
        runs += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let line = format!("fuzz {target}: {runs} executions in {secs:.1} s (seed {seed})");
    eprintln!("{line}");
    let report = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-report.txt");
    let _ = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(report)
        .and_then(|mut f| std::io::Write::write_all(&mut f, format!("{line}\n").as_bytes()));
    assert!(crashes.is_empty(), "{target}: panics on {crashes:?}");
    runs
}

/// `tests/fuzz_regressions/<target>/*`: inputs that crashed a parser once, kept as tests.
fn regressions(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_regressions")
        .join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    paths.sort();
    paths.iter().map(read).collect()
}

fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

/// The shared data, or a skip that says it is missing.
fn have_shared(test: &str) -> bool {
    let ok = shared().is_dir();
    if !ok {
        common::skip(test, &format!("{} is missing", shared().display()));
    }
    ok
}

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    let path = path.as_ref();
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The first `n` files of `dir` with extension `ext`, sorted.
fn files(dir: &Path, ext: &str, n: usize) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    out.sort();
    out.truncate(n);
    out
}

/// A small real picture (a crop of a BCCD image) as PNG, for datasets' images: decoding
/// it is cheap, so the executions go to the parsers.
fn small_png() -> Vec<u8> {
    let jpg = shared().join("bccd/JPEGImages/BloodImage_00000.jpg");
    let img = image::open(jpg).unwrap().to_rgb8();
    let crop = image::imageops::crop_imm(&img, 100, 100, 48, 32).to_image();
    let mut png = Vec::new();
    crop.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    png
}

fn load(path: &Path, format: Format) {
    let _ = data::load(path, Some(format), &LoadOpts::default());
}

/// A COCO subset of the real ground truth: its first `n` images with their annotations.
fn coco_subset(n: usize, file_name: Option<&str>) -> Vec<u8> {
    let text = read(shared().join("coco-eval-fake100/gt.json"));
    let mut gt: serde_json::Value = serde_json::from_slice(&text).unwrap();
    let images: Vec<serde_json::Value> = gt["images"].as_array().unwrap()[..n].to_vec();
    let ids: Vec<&serde_json::Value> = images.iter().map(|i| &i["id"]).collect();
    let anns: Vec<serde_json::Value> = gt["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| ids.contains(&&a["image_id"]))
        .cloned()
        .collect();
    let mut images = images.clone();
    if let Some(name) = file_name {
        for im in &mut images {
            im["file_name"] = name.into();
        }
    }
    gt["images"] = images.into();
    gt["annotations"] = anns.into();
    serde_json::to_vec_pretty(&gt).unwrap()
}

#[test]
fn fuzz_coco_json() {
    if !have_shared("fuzz_coco_json") {
        return;
    }
    let dir = scratch("coco");
    std::fs::write(dir.join("a.png"), small_png()).unwrap();
    let seeds = vec![coco_subset(3, Some("a.png")), coco_subset(2, None)];
    let file = dir.join("gt.json");
    fuzz("coco_json", seeds, |input| {
        std::fs::write(&file, input).unwrap();
        load(&file, Format::Coco);
    });
}

#[test]
fn fuzz_coco_eval_json() {
    if !have_shared("fuzz_coco_eval_json") {
        return;
    }
    let gt_text = coco_subset(5, None);
    let gt = retinanet::eval::GroundTruth::from_json_str(std::str::from_utf8(&gt_text).unwrap())
        .unwrap();
    let dets: Vec<serde_json::Value> =
        serde_json::from_slice(&read(shared().join("coco-eval-fake100/dets.json"))).unwrap();
    let ids: Vec<i64> = gt.images().to_vec();
    let dets: Vec<&serde_json::Value> = dets
        .iter()
        .filter(|d| d["image_id"].as_i64().is_some_and(|i| ids.contains(&i)))
        .collect();
    let seeds = vec![gt_text, serde_json::to_vec(&dets).unwrap()];
    fuzz("coco_eval_json", seeds, |input| {
        let Ok(text) = std::str::from_utf8(input) else {
            return;
        };
        // Either side may be the mutated one: both parse, then evaluate together.
        if let Ok(g) = retinanet::eval::GroundTruth::from_json_str(text) {
            let _ = g.images().len();
        }
        if let Ok(d) = retinanet::eval::detections_from_json_str(text) {
            let _ = retinanet::eval::evaluate(&gt, &d);
        }
    });
}

#[test]
fn fuzz_voc_xml() {
    if !have_shared("fuzz_voc_xml") {
        return;
    }
    let dir = scratch("voc");
    std::fs::write(dir.join("x.png"), small_png()).unwrap();
    let mut seeds: Vec<Vec<u8>> = files(&shared().join("bccd/Annotations"), "xml", 12)
        .iter()
        .map(read)
        .collect();
    seeds.push(read(shared().join("deepforest-trees/val/OSBS_029.xml")));
    let file = dir.join("x.xml");
    fuzz("voc_xml", seeds, |input| {
        std::fs::write(&file, input).unwrap();
        load(&dir, Format::Voc);
    });
}

/// A YOLO folder: the chess set's data.yaml, one small image and its label file.
fn yolo_folder(target: &str) -> PathBuf {
    let dir = scratch(target);
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::create_dir_all(dir.join("labels")).unwrap();
    std::fs::write(dir.join("images/x.png"), small_png()).unwrap();
    let yaml = read(shared().join("chess-pieces/data.yaml"));
    std::fs::write(dir.join("data.yaml"), yaml).unwrap();
    dir
}

#[test]
fn fuzz_yolo_labels() {
    if !have_shared("fuzz_yolo_labels") {
        return;
    }
    let dir = yolo_folder("yolo-labels");
    let seeds = files(&shared().join("chess-pieces/valid/labels"), "txt", 16)
        .iter()
        .map(read)
        .collect();
    let file = dir.join("labels/x.txt");
    fuzz("yolo_labels", seeds, |input| {
        std::fs::write(&file, input).unwrap();
        load(&dir, Format::Yolo);
    });
}

#[test]
fn fuzz_yolo_data_yaml() {
    if !have_shared("fuzz_yolo_data_yaml") {
        return;
    }
    let dir = yolo_folder("yolo-yaml");
    let label = &files(&shared().join("chess-pieces/valid/labels"), "txt", 1)[0];
    std::fs::write(dir.join("labels/x.txt"), read(label)).unwrap();
    let seeds = vec![
        read(shared().join("chess-pieces/data.yaml")),
        b"names:\n  0: person\n  1: bicycle\nnc: 2\n".to_vec(),
    ];
    let file = dir.join("data.yaml");
    fuzz("yolo_data_yaml", seeds, |input| {
        std::fs::write(&file, input).unwrap();
        load(&dir, Format::Yolo);
    });
}

#[test]
fn fuzz_csv() {
    if !have_shared("fuzz_csv") {
        return;
    }
    let dir = scratch("csv");
    std::fs::write(dir.join("x.png"), small_png()).unwrap();
    // BCCD's boxes as CSV rows, all on the small image, and an image-only row.
    let opts = LoadOpts {
        check_images: false,
        ..Default::default()
    };
    let voc = data::load(shared().join("bccd"), Some(Format::Voc), &opts).unwrap();
    let mut seeds = Vec::new();
    for sample in voc.samples.iter().take(4) {
        let mut text = String::from("image,x1,y1,x2,y2,label\n");
        for (b, &l) in sample.boxes.iter().zip(&sample.labels) {
            let name = &voc.class_names[l];
            text += &format!("x.png,{},{},{},{},{name}\n", b[0], b[1], b[2], b[3]);
        }
        text += "x.png,,,,,\n";
        seeds.push(text.into_bytes());
    }
    let file = dir.join("boxes.csv");
    fuzz("csv", seeds, |input| {
        std::fs::write(&file, input).unwrap();
        load(&file, Format::Csv);
    });
}

/// A small training checkpoint as `Trainer` writes them: torchvision names and shapes
/// for the head's last layers, the optimiser state, the metadata the crate reads.
fn small_checkpoint() -> Vec<u8> {
    use candle_core::{Device, Tensor};
    let t = |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
    let tensors = [
        ("backbone.body.conv1.weight", t(&[4, 3, 7, 7])),
        (
            "head.classification_head.cls_logits.weight",
            t(&[18, 4, 3, 3]),
        ),
        ("head.classification_head.cls_logits.bias", t(&[18])),
        ("head.regression_head.bbox_reg.weight", t(&[36, 4, 3, 3])),
        (
            "optimizer.momentum.head.regression_head.bbox_reg.weight",
            t(&[36, 4, 3, 3]),
        ),
    ];
    let meta: std::collections::HashMap<String, String> = [
        ("bn_eps", "1e-5"),
        ("class_names", "[\"RBC\",\"WBC\"]"),
        ("min_size", "480"),
        ("max_size", "640"),
        ("step", "12"),
        ("optimizer", "{\"momentum\":0.9}"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let views = tensors.iter().map(|(n, t)| (n.to_string(), t.clone()));
    let views: Vec<(String, Tensor)> = views.collect();
    safetensors::serialize(views.iter().map(|(n, t)| (n, t)), Some(meta)).unwrap()
}

#[test]
fn fuzz_safetensors_header_and_metadata() {
    let dir = scratch("safetensors");
    let file = dir.join("model.safetensors");
    let whole = small_checkpoint();
    let n = u64::from_le_bytes(whole[..8].try_into().unwrap()) as usize;
    let (header, data) = (whole[8..8 + n].to_vec(), whole[8 + n..].to_vec());
    // Whole files, and headers alone (`{…`), given a correct length prefix and the data:
    // mutations of the JSON then reach the metadata and offset checks.
    let seeds = vec![whole, header];
    fuzz("safetensors", seeds, |input| {
        let bytes = match input.first() {
            Some(b'{') => [&(input.len() as u64).to_le_bytes()[..], input, &data].concat(),
            _ => input.to_vec(),
        };
        let _ = retinanet::train::checkpoint::sort_header(&bytes);
        std::fs::write(&file, &bytes).unwrap();
        if let Ok(ckpt) = retinanet::Checkpoint::open(&file) {
            let _ = ckpt.class_names();
            let _ = ckpt.input_size();
            let _ = retinanet::RetinaNetConfig::infer(&ckpt);
        }
    });
}

/// A zip-format `.pth` holding only `archive/data.pkl` (tensor storages are read lazily).
fn pth_with(pickle: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut out = std::io::Cursor::new(Vec::new());
    let mut zip = zip::ZipWriter::new(&mut out);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(pickle).unwrap();
    zip.finish().unwrap();
    out.into_inner()
}

#[test]
fn fuzz_pth_pickle() {
    let fixture = common::fixtures_root().join("parity/v1_r18_k7/model.pth");
    if !fixture.is_file() {
        common::skip(
            "fuzz_pth_pickle",
            &format!(
                "{} is missing (scripts/test.sh makes it)",
                fixture.display()
            ),
        );
        return;
    }
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&fixture).unwrap()).unwrap();
    let name = archive
        .file_names()
        .filter_map(Result::ok)
        .find(|n| n.ends_with("data.pkl"))
        .unwrap()
        .into_owned();
    let mut pickle = Vec::new();
    std::io::Read::read_to_end(&mut archive.by_name(&name).unwrap(), &mut pickle).unwrap();
    let dir = scratch("pth");
    let file = dir.join("model.pth");
    // Mutations of the pickle inside a well-formed zip, and of the whole file.
    let seeds = vec![pickle, pth_with(b"\x80\x02}q\x00.")];
    fuzz("pth_pickle", seeds, |input| {
        let bytes = match input.starts_with(b"PK") {
            true => input.to_vec(),
            false => pth_with(input),
        };
        std::fs::write(&file, bytes).unwrap();
        if let Ok(ckpt) = retinanet::Checkpoint::open(&file) {
            let _ = retinanet::RetinaNetConfig::infer(&ckpt);
        }
    });
}

#[test]
fn fuzz_class_names_and_run_config() {
    let dir = scratch("config");
    let file = dir.join("classes.txt");
    let run = serde_json::json!({
        "data": "../shared/data/bccd", "train_split": "train", "start": "Scratch",
        "num_classes": 3, "class_names": ["Platelets", "RBC", "WBC"], "train_samples": 205,
        "steps": 500, "batch_size": 2, "schedule": "LrSchedule { base_lr: 0.01 }",
        "clip_grad_norm": null, "trainable_layers": 5, "backbone_norm": "Batch",
        "min_size": 240, "max_size": 320, "tile": null, "hflip": 0.5, "seed": 0
    });
    let seeds = vec![
        serde_json::to_vec_pretty(&run).unwrap(),
        b"[\"RBC\", \"WBC\", \"Platelets\"]".to_vec(),
        retinanet::classes::COCO_91.join("\n").into_bytes(),
    ];
    fuzz("config", seeds, |input| {
        let _ = serde_json::from_slice::<retinanet::train::run::RunConfig>(input);
        std::fs::write(&file, input).unwrap();
        let _ = retinanet::classes::read_file(&file);
    });
}

#[test]
fn fuzz_image_headers() {
    if !have_shared("fuzz_image_headers") {
        return;
    }
    let img = image::open(shared().join("bccd/JPEGImages/BloodImage_00001.jpg"))
        .unwrap()
        .to_rgb8();
    let crop = image::imageops::crop_imm(&img, 200, 150, 64, 48).to_image();
    let encode = |format| {
        let mut bytes = Vec::new();
        crop.write_to(&mut std::io::Cursor::new(&mut bytes), format)
            .unwrap();
        bytes
    };
    let chess = files(&shared().join("chess-pieces/valid/images"), "jpg", 1);
    let seeds = vec![
        encode(image::ImageFormat::Jpeg),
        encode(image::ImageFormat::Png),
        read(&chess[0]),
        small_png(),
    ];
    fuzz("image_headers", seeds, |input| {
        let _ = data::decode_rgb_bytes(input, Path::new("fuzz.img"));
    });
}
