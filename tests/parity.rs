//! Parity with torchvision: every intermediate and the final detections of our RetinaNet
//! against torchvision's on the same checkpoints and photos. The reference numbers come from
//! `scripts/make_parity_fixtures.py` (torchvision), never from this crate.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use retinanet::{
    Checkpoint, Detection, Kernels, LoadOptions, RetinaNet, RetinaNetConfig, TransformConfig,
};

const MAX_REL_ERR: f32 = 1e-4;

#[derive(serde::Deserialize)]
struct Meta {
    num_classes: usize,
    min_size: usize,
    max_size: usize,
    images: Vec<PathBuf>,
    image_sizes: Vec<(usize, usize)>,
    original_sizes: Vec<(usize, usize)>,
}

fn config_dir(name: &str) -> PathBuf {
    common::fixture_dir("parity", "make_parity_fixtures.py").join(name)
}

fn read_meta(dir: &Path) -> Meta {
    let text = std::fs::read_to_string(dir.join("meta.json")).expect("meta.json");
    serde_json::from_str(&text).expect("meta.json parses")
}

/// max |ours − theirs| / max |theirs| over the whole tensor.
fn rel_err(ours: &Tensor, theirs: &Tensor) -> f32 {
    assert_eq!(ours.dims(), theirs.dims(), "shape differs");
    let ours = ours
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let theirs = theirs.to_dtype(DType::F32).unwrap();
    let diff = (&ours - &theirs).unwrap().abs().unwrap().max_all().unwrap();
    let scale = theirs.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(1e-12)
}

fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let area = |r: &[f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    inter / (area(a) + area(b) - inter)
}

fn reference_detections(expected: &HashMap<String, Tensor>, i: usize) -> Vec<Detection> {
    let boxes = expected[&format!("det{i}_boxes")].to_vec2::<f32>().unwrap();
    let scores = expected[&format!("det{i}_scores")]
        .to_vec1::<f32>()
        .unwrap();
    let labels = expected[&format!("det{i}_labels")]
        .to_vec1::<i64>()
        .unwrap();
    boxes
        .into_iter()
        .zip(scores)
        .zip(labels)
        .map(|((b, score), label)| Detection {
            bbox: [b[0], b[1], b[2], b[3]],
            score,
            label: label as usize,
        })
        .collect()
}

/// Greedy one-to-one matching: same label, IoU ≥ 0.999, |Δscore| ≤ 1e-4.
/// Returns (matched, ours unmatched).
fn match_detections(ours: &[Detection], theirs: &[Detection]) -> (usize, usize) {
    let mut used = vec![false; ours.len()];
    let mut matched = 0;
    for t in theirs {
        let hit = ours.iter().enumerate().position(|(j, o)| {
            !used[j]
                && o.label == t.label
                && (o.score - t.score).abs() <= 1e-4
                && iou(&o.bbox, &t.bbox) >= 0.999
        });
        if let Some(j) = hit {
            used[j] = true;
            matched += 1;
        }
    }
    (matched, used.iter().filter(|u| !**u).count())
}

/// Loads `file` of the fixture `name`, runs the batch and compares everything, on this
/// crate's kernels and on Candle's ops alone (the path CUDA and Metal run).
fn check(name: &str, file: &str, bn_eps: Option<f64>) {
    check_with(name, file, bn_eps, Kernels::Native);
    check_with(name, file, bn_eps, Kernels::Candle);
}

/// [`check`] with one choice of kernels, on [`common::test_device`].
fn check_with(name: &str, file: &str, bn_eps: Option<f64>, kernels: Kernels) {
    let device = common::test_device();
    let dir = config_dir(name);
    let name = &format!("{name} ({kernels} kernels)");
    let meta = read_meta(&dir);
    let expected = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
        .expect("expected.safetensors");
    let opts = LoadOptions {
        bn_eps,
        transform: TransformConfig {
            min_size: meta.min_size,
            max_size: meta.max_size,
            ..Default::default()
        },
        kernels,
        ..Default::default()
    };
    let model = RetinaNet::load_with(dir.join(file), &device, &opts).expect("model loads");
    assert_eq!(model.config().num_classes, meta.num_classes);
    let images: Vec<_> = meta
        .images
        .iter()
        .map(|p| image::open(p).expect("fixture image").to_rgb8())
        .collect();

    let batch = model.preprocess(&images).unwrap();
    assert_eq!(batch.image_sizes, meta.image_sizes, "{name}: resized sizes");
    assert_eq!(batch.original_sizes, meta.original_sizes);
    let raw = model.forward_raw_with(&batch, true).unwrap();
    let anchors = raw.anchors().unwrap();
    let mut ours: Vec<(&str, &Tensor)> = vec![("input", &batch.tensor)];
    for (n, t) in ["c3", "c4", "c5"].iter().zip(&raw.backbone_features) {
        ours.push((n, t));
    }
    for (n, t) in ["p3", "p4", "p5", "p6", "p7"].iter().zip(&raw.fpn_features) {
        ours.push((n, t));
    }
    ours.push(("cls_logits", &raw.cls_logits));
    ours.push(("bbox_regression", &raw.bbox_regression));
    ours.push(("anchors", &anchors));
    for (n, t) in ours {
        let err = rel_err(t, &expected[n]);
        eprintln!("{name}/{file}: {n:<16} {:?} rel err {err:.2e}", t.dims());
        assert!(err <= MAX_REL_ERR, "{name}/{file}: {n} rel err {err:e}");
    }

    let detections = model.postprocess(&raw, &batch).unwrap();
    for (i, ours) in detections.iter().enumerate() {
        let theirs = reference_detections(&expected, i);
        assert!(
            theirs.len() >= 100,
            "fixture too easy: {} detections",
            theirs.len()
        );
        let (matched, extra) = match_detections(ours, &theirs);
        eprintln!(
            "{name}/{file}: image {i}: {matched}/{} torchvision detections matched, {extra} extra",
            theirs.len()
        );
        assert!(
            matched as f64 >= 0.995 * theirs.len() as f64,
            "{name}: image {i}: only {matched} of {} matched",
            theirs.len()
        );
        assert!(
            extra as f64 <= 0.005 * theirs.len() as f64,
            "{name}: image {i}: {extra} extra detections"
        );
    }
}

#[test]
fn v1_resnet50_coco_eps0_batch_of_two() {
    check("v1_r50_coco", "model.safetensors", None);
}

#[test]
fn v2_resnet50_coco_groupnorm_batch_of_two() {
    check("v2_r50_coco", "model.safetensors", None);
}

#[test]
fn v1_resnet18_seven_classes_eps_from_metadata() {
    check("v1_r18_k7", "model.safetensors", None);
}

#[test]
fn v1_resnet18_pth_old_layout_with_eps_override() {
    check("v1_r18_k7", "model.pth", Some(1e-5));
}

#[test]
fn v2_resnet34_three_classes() {
    check("v2_r34_k3", "model.safetensors", None);
}

#[test]
fn pth_and_safetensors_hold_the_same_weights() {
    for name in ["v1_r50_coco", "v2_r50_coco", "v1_r18_k7", "v2_r34_k3"] {
        let dir = config_dir(name);
        let st = Checkpoint::open(dir.join("model.safetensors")).unwrap();
        let pth = Checkpoint::open(dir.join("model.pth")).unwrap();
        let names: Vec<&str> = st.names().collect();
        assert_eq!(
            names,
            pth.names().collect::<Vec<_>>(),
            "{name}: tensor names"
        );
        let mut config = RetinaNetConfig::infer(&st).unwrap();
        assert_eq!(config, {
            let mut c = RetinaNetConfig::infer(&pth).unwrap();
            c.bn_eps = config.bn_eps; // the .pth carries no metadata
            c
        });
        config.bn_eps = 1e-5;
        let (vb_st, _) = st.var_builder(DType::F32, &Device::Cpu);
        let (vb_pth, _) = pth.var_builder(DType::F32, &Device::Cpu);
        for n in names {
            let shape = st.shape(n).unwrap().to_vec();
            let a = vb_st.get(shape.clone(), n).unwrap();
            let b = vb_pth.get(shape, n).unwrap();
            let d = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0);
            assert_eq!(d.unwrap().to_scalar::<f32>().unwrap(), 0.0, "{name}: {n}");
        }
    }
}

#[test]
fn architecture_is_read_from_the_checkpoint() {
    let expect = [
        ("v1_r50_coco", 50, 91, false, 0.0),
        ("v2_r50_coco", 50, 91, true, 1e-5),
        ("v1_r18_k7", 18, 7, false, 1e-5),
        ("v2_r34_k3", 34, 3, true, 1e-5),
    ];
    for (name, depth, k, v2, eps) in expect {
        let ckpt = Checkpoint::open(config_dir(name).join("model.safetensors")).unwrap();
        let c = RetinaNetConfig::infer(&ckpt).unwrap();
        assert_eq!(c.backbone.depth(), Some(depth), "{name}");
        assert_eq!(c.num_classes, k, "{name}");
        assert_eq!(c.head_group_norm, v2, "{name}");
        assert_eq!(c.bn_eps, eps, "{name}");
        let p6_from_c5 = c.extra_input == retinanet::model::fpn::ExtraInput::C5;
        assert_eq!(p6_from_c5, v2, "{name}");
    }
}

/// The opt-in bf16 products (FPN and heads), measured against torchvision's float32 run on
/// the ResNet-50 fixtures: relative error of the head outputs and how many of torchvision's
/// detections are found again (same label, IoU ≥ 0.9, score within 0.01). Skipped where the
/// CPU lacks AVX512-BF16.
#[test]
fn bf16_products_accuracy_cost() {
    if !retinanet::kernels::bf16::supported() {
        common::skip(
            "parity::bf16_products_accuracy_cost",
            "this CPU has no AVX512-BF16, so the bf16 products' accuracy against torchvision \
             (head outputs within 2e-2, >= 90 % of detections found again) was not measured",
        );
        return;
    }
    // Over both fixtures, at the bounds performance issue #17 holds `--precision bf16` to
    // (IoU ≥ 0.98, |Δscore| ≤ 0.02: at least 92.7 % found again, the share before that work).
    let (mut strict_found, mut strict_total) = (0usize, 0usize);
    for name in ["v2_r50_coco", "v1_r50_coco"] {
        let dir = config_dir(name);
        let meta = read_meta(&dir);
        let expected =
            candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
                .expect("expected.safetensors");
        let opts = LoadOptions {
            transform: TransformConfig {
                min_size: meta.min_size,
                max_size: meta.max_size,
                ..Default::default()
            },
            precision: retinanet::Precision::Bf16,
            ..Default::default()
        };
        let model = RetinaNet::load_with(dir.join("model.safetensors"), &Device::Cpu, &opts)
            .expect("model loads");
        let images: Vec<_> = meta
            .images
            .iter()
            .map(|p| image::open(p).expect("fixture image").to_rgb8())
            .collect();
        let batch = model.preprocess(&images).unwrap();
        let raw = model.forward_raw(&batch).unwrap();
        let cls = rel_err(&raw.cls_logits, &expected["cls_logits"]);
        let reg = rel_err(&raw.bbox_regression, &expected["bbox_regression"]);
        eprintln!("{name} bf16: cls_logits rel err {cls:.2e}, bbox_regression {reg:.2e}");
        assert!(cls < 2e-2 && reg < 2e-2, "{name}: bf16 head outputs off");
        let dets = model.postprocess(&raw, &batch).unwrap();
        for (i, ours) in dets.iter().enumerate() {
            let theirs = reference_detections(&expected, i);
            let mut used = vec![false; ours.len()];
            let mut matched = 0;
            let mut worst = 0f32;
            for t in &theirs {
                let hit = ours.iter().enumerate().position(|(j, o)| {
                    !used[j]
                        && o.label == t.label
                        && (o.score - t.score).abs() <= 0.01
                        && iou(&o.bbox, &t.bbox) >= 0.9
                });
                if let Some(j) = hit {
                    used[j] = true;
                    matched += 1;
                    worst = worst.max((ours[j].score - t.score).abs());
                }
            }
            let share = matched as f32 / theirs.len().max(1) as f32;
            let strict = matches(&theirs, ours, 0.98, 0.02);
            strict_found += strict;
            strict_total += theirs.len();
            eprintln!(
                "{name} bf16 image {i}: {matched}/{} torchvision detections found again \
                 (IoU ≥ 0.9, |Δscore| ≤ 0.01; worst matched |Δscore| {worst:.4}); \
                 {strict} at IoU ≥ 0.98, |Δscore| ≤ 0.02",
                theirs.len()
            );
            assert!(
                share >= 0.9,
                "{name} image {i}: only {matched} of {}",
                theirs.len()
            );
        }
    }
    let share = strict_found as f64 / strict_total.max(1) as f64;
    eprintln!(
        "bf16 over both fixtures: {strict_found}/{strict_total} ({:.1} %) found again at \
         IoU ≥ 0.98, |Δscore| ≤ 0.02",
        100.0 * share
    );
    assert!(
        share >= 0.927,
        "bf16 accuracy fell below 92.7 %: {share:.4}"
    );
}

/// Greedy one-to-one matches of `theirs` among `ours`: same label, IoU ≥ `iou_min`, scores
/// within `score_tol`.
fn matches(theirs: &[Detection], ours: &[Detection], iou_min: f32, score_tol: f32) -> usize {
    let mut used = vec![false; ours.len()];
    theirs
        .iter()
        .filter(|t| {
            let hit = ours.iter().enumerate().position(|(j, o)| {
                !used[j]
                    && o.label == t.label
                    && (o.score - t.score).abs() <= score_tol
                    && iou(&o.bbox, &t.bbox) >= iou_min
            });
            hit.map(|j| used[j] = true).is_some()
        })
        .count()
}
