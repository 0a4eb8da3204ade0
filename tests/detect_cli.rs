//! The `detect` example end to end: JSON schema, agreement with the library, and clean
//! failures that name the bad file and write nothing.

mod common;

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
            let b: Vec<f64> = d["box"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
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
