//! The `detect` example end to end: JSON schema, agreement with the library, and clean
//! failures that name the bad file and write nothing.

mod common;
#[path = "common/http.rs"]
mod http;

use std::path::PathBuf;
use std::process::Command;

use candle_core::Device;
use retinanet::{LoadOptions, RetinaNet, TransformConfig};

/// `target/<profile>/examples/detect`, built by `cargo test` alongside the tests.
fn detect_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("examples").join("detect");
    assert!(
        bin.is_file(),
        "{} not built (cargo test builds examples)",
        bin.display()
    );
    bin
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("retinanet-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[test]
fn json_lists_images_in_order_and_matches_the_library() {
    let dir = common::fixture_dir("parity", "make_parity_fixtures.py");
    let weights = dir.join("v1_r18_k7/model.safetensors");
    let images = [
        dir.join("dog_crop.png"),
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/photos/chelsea.png"),
    ];
    let out = tmp("dets.json");
    let status = Command::new(detect_bin())
        .args(["--weights", weights.to_str().unwrap()])
        .args([
            "--min-size",
            "320",
            "--max-size",
            "512",
            "--max-detections",
            "50",
        ])
        .args(["--json", out.to_str().unwrap()])
        .args(&images)
        .status()
        .unwrap();
    assert!(status.success());
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let arr = json.as_array().unwrap();
    assert_eq!(arr.len(), 2);

    let opts = LoadOptions {
        transform: TransformConfig {
            min_size: 320,
            max_size: 512,
            ..Default::default()
        },
        ..Default::default()
    };
    let model = RetinaNet::load_with(&weights, &Device::Cpu, &opts).unwrap();
    for (entry, path) in arr.iter().zip(&images) {
        assert_eq!(entry["image"], path.display().to_string());
        let img = image::open(path).unwrap().to_rgb8();
        assert_eq!(entry["width"], img.width());
        assert_eq!(entry["height"], img.height());
        let ours = model.detect(&img).unwrap();
        let dets = entry["detections"].as_array().unwrap();
        assert_eq!(dets.len(), ours.len().min(50));
        assert!(!dets.is_empty());
        let mut last = f64::INFINITY;
        for (d, o) in dets.iter().zip(&ours) {
            let score = d["score"].as_f64().unwrap();
            assert!(score <= last, "sorted by score");
            last = score;
            assert_eq!(d["label"], o.label);
            assert!(
                d["class"].is_null(),
                "no names for a 7-class model without metadata"
            );
            let b: Vec<f64> = numbers(&d["box"]);
            assert_eq!(b.len(), 4);
            assert!(b[0] >= 0.0 && b[2] <= img.width() as f64 && b[0] <= b[2] && b[1] <= b[3]);
        }
    }
}

#[test]
fn unreadable_image_fails_and_writes_nothing() {
    let dir = common::fixture_dir("parity", "make_parity_fixtures.py");
    let bad = tmp("broken.png");
    std::fs::write(&bad, b"\x89PNG not really").unwrap();
    let out = tmp("never.json");
    let output = Command::new(detect_bin())
        .args([
            "--weights",
            dir.join("v1_r18_k7/model.safetensors").to_str().unwrap(),
        ])
        .args(["--min-size", "128", "--max-size", "256"])
        .args(["--json", out.to_str().unwrap()])
        .arg(dir.join("dog_crop.png"))
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("broken.png"), "{stderr}");
    assert!(!out.exists(), "no partial JSON");
}

#[test]
fn bad_weights_fail_with_the_file_named() {
    let weights = tmp("bogus.safetensors");
    std::fs::write(&weights, b"{}").unwrap();
    let output = Command::new(detect_bin())
        .args(["--weights", weights.to_str().unwrap()])
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/photos/chelsea.png"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("bogus.safetensors"), "{stderr}");
}

fn photos() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/photos")
}

fn r18() -> PathBuf {
    common::fixture_dir("parity", "make_parity_fixtures.py").join("v1_r18_k7/model.safetensors")
}

/// A fresh folder holding copies of photos under the given names.
fn folder_with(name: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir = tmp(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (photo, as_name) in files {
        std::fs::copy(photos().join(photo), dir.join(as_name)).unwrap();
    }
    dir
}

/// The numbers of a JSON array (a box).
fn numbers(v: &serde_json::Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

fn json_file(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn folders_globs_annotations_and_coco_results() {
    let input = folder_with(
        "inputs",
        &[
            ("chelsea.png", "000000000042.png"),
            ("coffee.png", "coffee.png"),
        ],
    );
    std::fs::write(input.join("notes.txt"), "not an image").unwrap();
    let glob_dir = folder_with("globbed", &[("astronaut.png", "astro.png")]);
    let out = tmp("annotated");
    let _ = std::fs::remove_dir_all(&out);
    let (json, coco) = (tmp("all.json"), tmp("coco.json"));
    let output = Command::new(detect_bin())
        .args(["--weights", r18().to_str().unwrap()])
        .args([
            "--min-size",
            "256",
            "--max-size",
            "320",
            "--max-detections",
            "20",
        ])
        .args(["--draw-threshold", "0.0", "--device", "cpu"])
        .args([
            "--out",
            out.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ])
        .args(["--coco-results", coco.to_str().unwrap()])
        .arg(&input)
        .arg(format!("{}/*.png", glob_dir.display()))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("3 image(s)") && stderr.contains("images/s"),
        "{stderr}"
    );

    let results = json_file(&json);
    let images: Vec<&str> = results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["image"].as_str().unwrap())
        .collect();
    let expected = [
        input.join("000000000042.png"),
        input.join("coffee.png"),
        glob_dir.join("astro.png"),
    ];
    assert_eq!(
        images,
        expected
            .iter()
            .map(|p| p.to_str().unwrap())
            .collect::<Vec<_>>()
    );

    // Annotated copies: same sizes, pixels changed where boxes are drawn, no temp files.
    let mut written: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    written.sort();
    assert_eq!(written, ["000000000042.png", "astro.png", "coffee.png"]);
    for src in &expected {
        let a = image::open(src).unwrap().to_rgb8();
        let b = image::open(out.join(src.file_name().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_eq!(a.dimensions(), b.dimensions());
        assert_ne!(a, b, "boxes drawn on {}", src.display());
    }

    // COCO results: one entry per detection, id from a numeric stem or the index.
    let coco = json_file(&coco);
    let coco = coco.as_array().unwrap();
    let total: usize = results
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["detections"].as_array().unwrap().len())
        .sum();
    assert_eq!(coco.len(), total);
    let first = &results[0]["detections"][0];
    let c = &coco[0];
    assert_eq!(c["image_id"], 42);
    assert_eq!(c["category_id"], first["label"]);
    assert_eq!(c["score"], first["score"]);
    let b: Vec<f64> = numbers(&first["box"]);
    let bb: Vec<f64> = numbers(&c["bbox"]);
    assert_eq!(bb[0], b[0]);
    assert_eq!(bb[1], b[1]);
    assert!((bb[2] - (b[2] - b[0])).abs() < 1e-3 && (bb[3] - (b[3] - b[1])).abs() < 1e-3);
    let ids: std::collections::BTreeSet<u64> = coco
        .iter()
        .map(|c| c["image_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.into_iter().collect::<Vec<_>>(), [1, 2, 42]);
}

#[test]
fn a_bad_image_leaves_no_outputs_at_all() {
    let input = folder_with("bad-inputs", &[("chelsea.png", "a.png")]);
    std::fs::write(input.join("b.png"), b"\x89PNG truncated").unwrap();
    let out = tmp("no-annotations");
    let _ = std::fs::remove_dir_all(&out);
    let (json, coco) = (tmp("no.json"), tmp("no-coco.json"));
    let output = Command::new(detect_bin())
        .args([
            "--weights",
            r18().to_str().unwrap(),
            "--min-size",
            "128",
            "--max-size",
            "256",
        ])
        .args([
            "--out",
            out.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ])
        .args(["--coco-results", coco.to_str().unwrap()])
        .arg(&input)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("b.png"), "{stderr}");
    assert!(!json.exists() && !coco.exists());
    // Not even the --out folder: it was created for a.png's annotation, and removed.
    let left: Vec<_> = std::fs::read_dir(&out).into_iter().flatten().collect();
    assert!(
        !out.exists(),
        "the --out folder (with a.png's annotation or its temp file?) was left: {left:?}"
    );
}

#[test]
fn class_names_from_a_file() {
    let names = tmp("names.txt");
    std::fs::write(&names, "zero\none\ntwo\nthree\nfour\nfive\nsix\n").unwrap();
    let json = tmp("named.json");
    let status = Command::new(detect_bin())
        .args([
            "--weights",
            r18().to_str().unwrap(),
            "--min-size",
            "128",
            "--max-size",
            "256",
        ])
        .args([
            "--classes",
            names.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
        ])
        .arg(photos().join("chelsea.png"))
        .status()
        .unwrap();
    assert!(status.success());
    let all = ["zero", "one", "two", "three", "four", "five", "six"];
    for d in json_file(&json)[0]["detections"].as_array().unwrap() {
        assert_eq!(d["class"], all[d["label"].as_u64().unwrap() as usize]);
    }

    let wrong = tmp("names.json");
    std::fs::write(&wrong, r#"["a", "b"]"#).unwrap();
    let output = Command::new(detect_bin())
        .args([
            "--weights",
            r18().to_str().unwrap(),
            "--classes",
            wrong.to_str().unwrap(),
        ])
        .arg(photos().join("chelsea.png"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("names.json") && stderr.contains("2 class names"),
        "{stderr}"
    );
}

#[test]
fn tiled_detection_matches_the_library() {
    let json = tmp("tiled.json");
    let image = photos().join("darknet_dog.jpg");
    let status = Command::new(detect_bin())
        .args([
            "--weights",
            r18().to_str().unwrap(),
            "--min-size",
            "256",
            "--max-size",
            "256",
        ])
        .args([
            "--tile",
            "256",
            "--overlap",
            "64",
            "--json",
            json.to_str().unwrap(),
        ])
        .arg(&image)
        .status()
        .unwrap();
    assert!(status.success());
    let opts = LoadOptions {
        transform: TransformConfig {
            min_size: 256,
            max_size: 256,
            ..Default::default()
        },
        ..Default::default()
    };
    let model = RetinaNet::load_with(r18(), &Device::Cpu, &opts).unwrap();
    let img = image::open(&image).unwrap().to_rgb8();
    let ours =
        retinanet::tiling::detect_tiled(&model, &img, &retinanet::tiling::TileConfig::new(256, 64))
            .unwrap();
    let dets = json_file(&json)[0]["detections"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(dets.len(), ours.len());
    assert!(dets.len() > 300, "merged over tiles, not capped per image");
    for (d, o) in dets.iter().zip(&ours) {
        assert_eq!(d["label"], o.label);
        assert_eq!(d["score"].as_f64().unwrap() as f32, o.score);
    }
}

#[test]
fn devices_not_built_in_fail_clearly() {
    for (device, built) in [
        ("cuda", cfg!(feature = "cuda")),
        ("metal", cfg!(feature = "metal")),
    ] {
        if built {
            continue;
        }
        let output = Command::new(detect_bin())
            .args(["--weights", r18().to_str().unwrap(), "--device", device])
            .arg(photos().join("chelsea.png"))
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&format!("--features {device}")), "{stderr}");
    }
}

/// `--model` with a throw-away cache and the torchvision URL root on 127.0.0.1.
fn detect_with_model(
    torch_home: &std::path::Path,
    url: &str,
    offline: bool,
) -> std::process::Output {
    let mut cmd = Command::new(detect_bin());
    cmd.env("TORCH_HOME", torch_home)
        .env("HF_HOME", torch_home.join("hf"))
        .env("RETINANET_TORCHVISION_URL", url)
        .env_remove("HF_HUB_CACHE")
        .args([
            "--model",
            "retinanet_resnet50_fpn_coco",
            "--min-size",
            "256",
            "--max-size",
            "320",
        ])
        .args(["--max-detections", "5"])
        .arg(photos().join("chelsea.png"));
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    } else {
        cmd.env_remove("HF_HUB_OFFLINE");
    }
    cmd.output().unwrap()
}

#[test]
#[cfg(unix)]
fn zoo_models_download_verify_and_work_offline() {
    let server = http::Server::start();
    // Not the published file: its sha256 does not start with eeacb38b.
    server.serve(
        "/models/retinanet_resnet50_fpn_coco-eeacb38b.pth",
        b"forged".to_vec(),
        "",
        "",
    );
    let home = tmp("torch-home");
    let _ = std::fs::remove_dir_all(&home);
    let url = format!("{}/models", server.url);

    let output = detect_with_model(&home, &url, true);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("HF_HUB_OFFLINE") && stderr.contains("--weights"),
        "{stderr}"
    );
    assert_eq!(server.requests(), 0);

    let output = detect_with_model(&home, &url, false);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("checksum mismatch") && stderr.contains("eeacb38b"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{url}/retinanet_resnet50_fpn_coco-eeacb38b.pth")),
        "{stderr}"
    );
    let cache = home.join("hub/checkpoints");
    assert_eq!(
        std::fs::read_dir(&cache).unwrap().count(),
        0,
        "nothing cached"
    );

    // A cached file is used as is, offline: here the R50 COCO fixture (old key layout).
    let fixture =
        common::fixture_dir("parity", "make_parity_fixtures.py").join("v1_r50_coco/model.pth");
    std::os::unix::fs::symlink(
        &fixture,
        cache.join("retinanet_resnet50_fpn_coco-eeacb38b.pth"),
    )
    .unwrap();
    let output = detect_with_model(&home, &url, true);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let dets = json[0]["detections"].as_array().unwrap();
    assert_eq!(dets.len(), 5);
    for d in dets {
        let label = d["label"].as_u64().unwrap() as usize;
        let name = retinanet::classes::COCO_91[label];
        if retinanet::classes::is_placeholder(name) {
            assert!(d["class"].is_null());
        } else {
            assert_eq!(d["class"], name, "COCO names by default");
        }
    }
}

#[test]
fn hub_models_download_once_and_then_work_offline() {
    let body = std::fs::read(r18()).unwrap();
    let hash: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&body)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let server = http::Server::start();
    let commit = "1111111111111111111111111111111111111111";
    server.serve(
        "/test/tiny/resolve/v1.0/model.safetensors",
        body,
        &hash,
        commit,
    );
    let home = tmp("hf-home");
    let _ = std::fs::remove_dir_all(&home);
    let run = |offline: bool| {
        let mut cmd = Command::new(detect_bin());
        cmd.env("HF_HOME", &home)
            .env("HF_ENDPOINT", &server.url)
            .env_remove("HF_HUB_CACHE")
            .args(["--model", "hf:test/tiny/model.safetensors@v1.0"])
            .args([
                "--min-size",
                "128",
                "--max-size",
                "256",
                "--max-detections",
                "3",
            ])
            .arg(photos().join("chelsea.png"));
        if offline {
            cmd.env("HF_HUB_OFFLINE", "1");
        } else {
            cmd.env_remove("HF_HUB_OFFLINE");
        }
        cmd.output().unwrap()
    };
    let first = run(false);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let requests = server.requests();
    assert!(requests > 0);
    let cached = home.join(format!(
        "hub/models--test--tiny/snapshots/{commit}/model.safetensors"
    ));
    assert!(cached.is_file());
    let second = run(true);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(server.requests(), requests, "offline: no connection");
    assert_eq!(first.stdout, second.stdout);

    let bad = Command::new(detect_bin())
        .args(["--model", "hf:only-owner"])
        .arg(photos().join("chelsea.png"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("hf:OWNER/NAME/FILE"));
    std::fs::remove_dir_all(&home).unwrap(); // a 77 MB copy
}

/// The tree-crown model shipped in the repository (see weights/README.md).
const TREE_MODEL: &str = "weights/tree_crowns_r18.f16.safetensors";
/// Its AP50 on OSBS_029 is 0.107 (f32 and f16 alike, finetune's validation); a model that
/// failed to load its weights properly scores 0.
const TREE_AP50_FLOOR: f64 = 0.09;

/// The README's first command: the bundled tree-crown model on the held-out aerial image,
/// with no network (offline mode), scored against the image's own annotations.
#[test]
fn bundled_tree_model_detects_trees_offline() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let weights = root.join(TREE_MODEL);
    let val = root.join("../shared/data/deepforest-trees/val");
    assert!(
        val.is_dir(),
        "missing test data {}: this test reads ../shared/data beside the repository",
        val.display()
    );
    // The bundled copy of the held-out image, as the README's command uses it.
    let image = root.join("assets/images/OSBS_029.png");
    let (out, json) = (tmp("trees-annotated"), tmp("trees.json"));
    let status = Command::new(detect_bin())
        .env("HF_HUB_OFFLINE", "1")
        .args(["--weights", weights.to_str().unwrap()])
        .args(["--out", out.to_str().unwrap()])
        .args(["--json", json.to_str().unwrap()])
        .arg(&image)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(out.join("OSBS_029.png").is_file());
    let json = json_file(&json);
    let dets = json[0]["detections"].as_array().unwrap();
    assert!(dets.iter().all(|d| d["class"] == "Tree"));

    // AP50 against the 61 annotated crowns (pycocotools' rules, retinanet::eval).
    let ds = retinanet::data::load(&val, None, &retinanet::data::LoadOpts::default()).unwrap();
    let xywh = |b: [f64; 4]| [b[0], b[1], b[2] - b[0], b[3] - b[1]];
    let gt_boxes = ds.samples[0]
        .boxes
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let b = xywh(b.map(f64::from));
            retinanet::eval::GtBox::new(i as i64 + 1, 0, 0, b)
        })
        .collect();
    let category = retinanet::eval::Category {
        id: 0,
        name: "Tree".into(),
    };
    let gt = retinanet::eval::GroundTruth::new([0], vec![category], gt_boxes).unwrap();
    let found: Vec<_> = dets
        .iter()
        .map(|d| {
            let b: Vec<f64> = numbers(&d["box"]);
            let score = d["score"].as_f64().unwrap();
            retinanet::eval::Detection::new(0, 0, xywh([b[0], b[1], b[2], b[3]]), score)
        })
        .collect();
    let ap50 = retinanet::eval::evaluate(&gt, &found)
        .unwrap()
        .summary()
        .ap50;
    println!("bundled tree model: AP50 {ap50:.4} on OSBS_029");
    assert!(ap50 >= TREE_AP50_FLOOR, "AP50 {ap50} on OSBS_029");
}

/// With an output file asked for, standard output gets a summary line per image, not the
/// JSON; `--json -` keeps the JSON there (and the summaries move to standard error).
#[test]
fn output_files_print_one_line_per_image() {
    let out = tmp("summary-annotated");
    let _ = std::fs::remove_dir_all(&out);
    let run = |json: &[&str]| {
        Command::new(detect_bin())
            .args(["--weights", r18().to_str().unwrap()])
            .args(["--min-size", "128", "--max-size", "256"])
            .args(["--draw-threshold", "0.1", "--out", out.to_str().unwrap()])
            .args(json)
            .arg(photos().join("chelsea.png"))
            .output()
            .unwrap()
    };
    let output = run(&[]);
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let dest = out.join("chelsea.png");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    let line = stdout.trim_end();
    assert!(line.starts_with(&format!("{}: ", photos().join("chelsea.png").display())));
    assert!(
        line.ends_with(&format!("≥ 0.1 drawn → {}", dest.display())),
        "{line}"
    );
    assert!(dest.is_file());

    let output = run(&["--json", "-"]);
    assert!(output.status.success());
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let (n, drawn) = {
        let dets = json[0]["detections"].as_array().unwrap();
        let above = dets
            .iter()
            .filter(|d| d["score"].as_f64().unwrap() as f32 >= 0.1);
        (dets.len(), above.count())
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(": {n} detections, {drawn} ≥ 0.1 drawn → ")),
        "{stderr}"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

/// `load_with` uses the input size a checkpoint records (fine-tuned files do) unless the
/// options set one, side by side.
#[test]
fn loading_uses_the_recorded_input_size_unless_set() {
    use retinanet::train::checkpoint::{read_safetensors, write_safetensors};
    let (tensors, mut metadata) = read_safetensors(&r18(), &Device::Cpu).unwrap();
    metadata.insert("min_size".into(), "128".into());
    metadata.insert("max_size".into(), "160".into());
    let path = tmp("sized.safetensors");
    write_safetensors(&path, &tensors, metadata).unwrap();
    let size = |opts: &LoadOptions| {
        let t = RetinaNet::load_with(&path, &Device::Cpu, opts)
            .unwrap()
            .transform;
        (t.min_size, t.max_size)
    };
    assert_eq!(size(&LoadOptions::default()), (128, 160));
    let min_only = LoadOptions {
        min_size: Some(144),
        ..Default::default()
    };
    assert_eq!(size(&min_only), (144, 160));
    let both = LoadOptions {
        min_size: Some(320),
        max_size: Some(512),
        ..Default::default()
    };
    assert_eq!(size(&both), (320, 512));
    let unsized_model = RetinaNet::load_with(r18(), &Device::Cpu, &LoadOptions::default());
    let t = unsized_model.unwrap().transform;
    assert_eq!(
        (t.min_size, t.max_size),
        (800, 1333),
        "torchvision's without metadata"
    );
}

/// `--kernels candle` (Candle's ops only, the GPU path) finds what the CPU kernels find: the
/// bundled model on its aerial image, every detection matched (IoU ≥ 0.99, |Δscore| ≤ 1e-3).
#[test]
fn candle_kernels_detect_what_the_cpu_kernels_detect() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let image = root.join("assets/images/OSBS_029.png");
    let run = |kernels: &str| {
        let json = tmp(&format!("kernels-{kernels}.json"));
        let status = Command::new(detect_bin())
            .args(["--weights", root.join(TREE_MODEL).to_str().unwrap()])
            .args(["--device", "cpu", "--kernels", kernels])
            .args(["--json", json.to_str().unwrap()])
            .arg(&image)
            .status()
            .unwrap();
        assert!(status.success(), "--kernels {kernels}");
        json_file(&json)[0]["detections"]
            .as_array()
            .unwrap()
            .clone()
    };
    let (native, candle) = (run("native"), run("candle"));
    assert!(native.len() > 50, "{} detections", native.len());
    let boxes = |d: &serde_json::Value| numbers(&d["box"]);
    let iou = |a: &[f64], b: &[f64]| {
        let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
        let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
        let area = |r: &[f64]| (r[2] - r[0]) * (r[3] - r[1]);
        iw * ih / (area(a) + area(b) - iw * ih)
    };
    let matched = native
        .iter()
        .filter(|n| {
            candle.iter().any(|c| {
                let ds = (n["score"].as_f64().unwrap() - c["score"].as_f64().unwrap()).abs();
                ds <= 1e-3 && iou(&boxes(n), &boxes(c)) >= 0.99
            })
        })
        .count();
    println!(
        "--kernels candle: {matched}/{} matched, {} found",
        native.len(),
        candle.len()
    );
    assert_eq!(matched, native.len());
    assert_eq!(candle.len(), native.len());
    let bad = Command::new(detect_bin())
        .args(["--kernels", "cuda"])
        .arg(&image)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("\"native\""));
}
