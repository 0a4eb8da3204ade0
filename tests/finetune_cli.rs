//! The `finetune` example end to end on three BCCD images at a small input size, from the
//! ResNet-18 parity fixture (7 classes, so `cls_logits` is re-initialised for BCCD's 2):
//! metrics, loss plot, a final checkpoint that `detect` loads, and `--resume` after an
//! interruption reaching the same weights as an uninterrupted run.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const STEPS: usize = 4;

/// Three BCCD images with their VOC annotations, side by side in a folder.
fn bccd_subset() -> PathBuf {
    bccd_subset_in("data")
}

/// As [`bccd_subset`], in a folder of its own (tests run in parallel).
fn bccd_subset_in(name: &str) -> PathBuf {
    let bccd = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/bccd");
    let dir = common::scratch_dir("finetune", name);
    for i in 0..3 {
        let stem = format!("BloodImage_0000{i}");
        let jpg = format!("{stem}.jpg");
        let xml = format!("{stem}.xml");
        std::fs::copy(bccd.join("JPEGImages").join(&jpg), dir.join(&jpg)).unwrap();
        std::fs::copy(bccd.join("Annotations").join(&xml), dir.join(&xml)).unwrap();
    }
    dir
}

fn weights() -> PathBuf {
    common::fixture_dir("parity", "make_parity_fixtures.py").join("v1_r18_k7/model.safetensors")
}

fn finetune(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let steps = STEPS.to_string();
    let output = Command::new(common::example_bin("finetune"))
        .arg("--data")
        .arg(data)
        .arg("--val")
        .arg(data)
        .arg("--weights")
        .arg(weights())
        .args(["--steps", &steps, "--batch-size", "2", "--lr", "0.005"])
        .args(["--min-size", "128", "--max-size", "160", "--seed", "3"])
        .args(["--device", "cpu"])
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    output
}

fn check_ok(output: &Output) {
    assert!(
        output.status.success(),
        "finetune failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn records(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every tensor of a safetensors file, as raw bytes by name.
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect();
    out.sort();
    out
}

/// The step lines without their timing fields.
fn losses(records: &[Value]) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| {
            let mut r = r.clone();
            let m = r.as_object_mut().unwrap();
            m.remove("images_per_s");
            m.remove("seconds");
            r
        })
        .collect()
}

#[test]
fn trains_logs_plots_resumes_and_detect_loads_the_result() {
    let data = bccd_subset();
    let full = common::scratch_dir("finetune", "full");
    check_ok(&finetune(&data, &full, &[]));

    // metrics.jsonl: one line per step, then the final validation.
    let recs = records(&full);
    let steps = losses(&recs);
    assert_eq!(steps.len(), STEPS, "{recs:?}");
    for (i, r) in steps.iter().enumerate() {
        assert_eq!(r["step"], i + 1);
        assert!(r["loss"].as_f64().unwrap().is_finite());
        assert!(r["lr"].as_f64().unwrap() > 0.0);
    }
    let last = recs.last().unwrap();
    assert_eq!(last["step"], STEPS);
    let ap = last["AP"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&ap), "{last}");
    assert!(last["AP50"].as_f64().unwrap() >= ap);

    let png = image::open(full.join("loss.png")).unwrap();
    assert_eq!((png.width(), png.height()), (800, 500));

    // The final weights load in `detect` unchanged, with the dataset's class names.
    let json = full.join("dets.json");
    let status = Command::new(common::example_bin("detect"))
        .arg("--weights")
        .arg(full.join("final.safetensors"))
        .args([
            "--min-size",
            "128",
            "--max-size",
            "160",
            "--score-threshold",
            "0.0",
        ])
        .arg("--json")
        .arg(&json)
        .arg(data.join("BloodImage_00000.jpg"))
        .status()
        .unwrap();
    assert!(status.success());
    let dets: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let first = &dets[0]["detections"][0];
    assert!(
        ["RBC", "WBC"].contains(&first["class"].as_str().unwrap()),
        "{first}"
    );

    // Interrupted after 3 steps (inside the second epoch of 2 batches), then resumed: the
    // same weights and losses.
    let split = common::scratch_dir("finetune", "split");
    check_ok(&finetune(&data, &split, &["--stop-after", "3"]));
    assert!(!split.join("final.safetensors").exists());
    assert_eq!(losses(&records(&split)).len(), 3);
    let changed = finetune(&data, &split, &["--resume", "--hflip", "0.9"]);
    assert!(!changed.status.success());
    assert!(String::from_utf8_lossy(&changed.stderr).contains("settings differ"));
    check_ok(&finetune(&data, &split, &["--resume"]));
    assert_eq!(losses(&records(&split)), steps);
    assert!(
        tensors(&split.join("final.safetensors")) == tensors(&full.join("final.safetensors")),
        "resumed weights differ from the uninterrupted run's"
    );

    // A fresh run into a folder holding one is refused.
    let again = finetune(&data, &full, &[]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
}

/// `--box-loss` chooses the box loss: recorded in `run.json`, and a step's box loss differs
/// from the default's (L1 for this v1 model) on the same batch; unknown names are refused.
#[test]
fn box_loss_flag_is_honoured() {
    let data = bccd_subset_in("box-data");
    let first_box_loss = |extra: &[&str], name: &str| {
        let out = common::scratch_dir("finetune", name);
        let output = finetune(&data, &out, &[&["--stop-after", "1"], extra].concat());
        check_ok(&output);
        let run: Value =
            serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
        let loss = records(&out)[0]["box_regression"].as_f64().unwrap();
        (run.get("box_loss").cloned(), loss)
    };
    let (default_run, l1) = first_box_loss(&[], "box-default");
    assert_eq!(default_run, None, "torchvision's default is not recorded");
    let (smooth_run, smooth) = first_box_loss(&["--box-loss", "smooth-l1"], "box-smooth");
    assert_eq!(
        smooth_run,
        Some(serde_json::json!({"SmoothL1": {"beta": 0.11}}))
    );
    assert!(l1 > 0.0 && smooth > 0.0 && l1 != smooth, "{l1} {smooth}");

    let bad = finetune(
        &data,
        &common::scratch_dir("finetune", "box-bad"),
        &["--box-loss", "huber"],
    );
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("huber") && stderr.contains("giou"),
        "{stderr}"
    );
}
