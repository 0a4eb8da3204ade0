//! Training end to end on tiny synthetic images: overfitting to near-zero loss and then
//! detecting the boxes, resume equal to an uninterrupted run, checkpoints that
//! `RetinaNet::load` reads, and a non-finite loss reported with step, images and checkpoint.

mod common;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use image::{Rgb, RgbImage};
use retinanet::train::params::config_for;
use retinanet::train::{LrSchedule, Start, Target, TrainConfig, Trainer};
use retinanet::{Error, RetinaNet};

/// A ResNet-18 RetinaNet checkpoint (3 classes) written by the training fixtures.
fn start() -> Start {
    let dir = common::fixture_dir("train", "make_train_fixtures.py");
    Start::RetinaNet(dir.join("v1_r18").join("model.safetensors"))
}

/// Grey noise-free images with coloured rectangles; returns images and their targets.
fn data() -> (Vec<RgbImage>, Vec<Target>) {
    let scene = |w: u32, h: u32, rects: &[([u32; 4], [u8; 3])]| {
        RgbImage::from_fn(w, h, |x, y| {
            rects
                .iter()
                .find(|(r, _)| x >= r[0] && x < r[2] && y >= r[1] && y < r[3])
                .map_or(Rgb([120, 120, 120]), |(_, c)| Rgb(*c))
        })
    };
    let a = [
        ([8, 10, 48, 50], [220, 30, 30]),
        ([60, 20, 92, 60], [30, 30, 220]),
    ];
    let b = [([30, 6, 80, 40], [30, 200, 30])];
    let images = vec![scene(96, 64, &a), scene(96, 64, &b)];
    let boxes = |rects: &[([u32; 4], [u8; 3])]| {
        rects
            .iter()
            .map(|(r, _)| r.map(|v| v as f32))
            .collect::<Vec<_>>()
    };
    let targets = vec![
        Target {
            id: "a".into(),
            boxes: boxes(&a),
            labels: vec![0, 1],
        },
        Target {
            id: "b".into(),
            boxes: boxes(&b),
            labels: vec![2],
        },
    ];
    (images, targets)
}

fn trainer(layers: usize, lr: f64, steps: usize) -> Trainer {
    let start = start();
    let model_config = config_for(&start, 3).unwrap();
    let mut config = TrainConfig::for_model(&model_config, LrSchedule::constant(lr, steps));
    config.trainable_backbone_layers = layers;
    config.clip_grad_norm = Some(10.0);
    let (mut t, _) = Trainer::new(&model_config, &start, config, &Device::Cpu).unwrap();
    // Keep the images at their size: 64 × 96, padded to 64 × 96.
    t.model_mut().transform.min_size = 64;
    t.model_mut().transform.max_size = 96;
    t
}

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("retinanet-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    retinanet::boxes::box_iou(a, b)
}

#[test]
fn overfits_a_few_images_then_detects_their_boxes() {
    let (images, targets) = data();
    let steps = 120;
    let mut t = trainer(0, 0.02, steps);
    let t0 = std::time::Instant::now();
    let first = t.step(&images, &targets).unwrap();
    let mut last = first.clone();
    for _ in 1..steps {
        last = t.step(&images, &targets).unwrap();
    }
    let per_step = t0.elapsed().as_secs_f64() / steps as f64;
    let (l0, l1) = (
        first.classification + first.box_regression,
        last.classification + last.box_regression,
    );
    println!("loss {l0:.4} → {l1:.4} in {steps} steps ({per_step:.3} s/step)");
    assert!(l1 < 0.05 * l0, "loss only went from {l0} to {l1}");

    let mut model = t.model().clone();
    model.transform.min_size = 64;
    model.transform.max_size = 96;
    let dets = model.detect_batch(&images).unwrap();
    for (d, target) in dets.iter().zip(&targets) {
        for (&b, &l) in target.boxes.iter().zip(&target.labels) {
            let best = d
                .iter()
                .filter(|x| x.label == l && x.score > 0.5)
                .map(|x| iou(x.bbox, b))
                .fold(0.0, f32::max);
            assert!(
                best > 0.7,
                "{}: box {b:?} class {l}: best IoU {best}; {d:?}",
                target.id
            );
        }
        // Nothing confident elsewhere.
        let spurious = d
            .iter()
            .filter(|x| x.score > 0.5)
            .filter(|x| !target.boxes.iter().any(|&b| iou(x.bbox, b) > 0.5))
            .count();
        assert_eq!(spurious, 0, "{}: {d:?}", target.id);
    }

    // Exported in f16 (the shipping form), the model loads as an ordinary checkpoint, half
    // the size, and finds the same confident boxes.
    let dir = tmp_dir("export");
    let (f32_path, f16_path) = (
        dir.join("model.safetensors"),
        dir.join("model.f16.safetensors"),
    );
    t.export(&f32_path, candle_core::DType::F32).unwrap();
    t.export(&f16_path, candle_core::DType::F16).unwrap();
    let size = |p: &PathBuf| std::fs::metadata(p).unwrap().len() as f64;
    let ratio = size(&f16_path) / size(&f32_path);
    assert!(
        (0.45..0.55).contains(&ratio),
        "f16 file is {ratio} of the f32 one"
    );
    // The metadata carries the input size it trained at (detect's default).
    let ckpt = retinanet::Checkpoint::open(&f16_path).unwrap();
    assert_eq!(ckpt.input_size().unwrap(), Some((64, 96)));
    let mut half = RetinaNet::load(&f16_path, &Device::Cpu).unwrap();
    assert_eq!(half.config(), model.config());
    half.transform.min_size = 64;
    half.transform.max_size = 96;
    let half_dets = half.detect_batch(&images).unwrap();
    for (full, half) in dets.iter().zip(&half_dets) {
        let confident = |d: &[retinanet::Detection]| {
            d.iter()
                .filter(|x| x.score > 0.5)
                .cloned()
                .collect::<Vec<_>>()
        };
        let (full, half) = (confident(full), confident(half));
        assert_eq!(full.len(), half.len(), "{full:?} vs {half:?}");
        for (a, b) in full.iter().zip(&half) {
            assert_eq!(a.label, b.label);
            assert!((a.score - b.score).abs() < 0.01, "{a:?} vs {b:?}");
            assert!(iou(a.bbox, b.bbox) > 0.98, "{a:?} vs {b:?}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn trained_tensors(t: &Trainer) -> Vec<(String, Tensor)> {
    t.params()
        .trained()
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
        .collect()
}

#[test]
fn resume_continues_exactly_and_checkpoints_load_for_inference() {
    let (images, targets) = data();
    let dir = tmp_dir("resume");
    let ckpt = dir.join("half.safetensors");
    // Warm-up and a decay inside the run, so the schedule's position matters too.
    let schedule = LrSchedule {
        base_lr: 0.01,
        warmup_steps: 2,
        warmup_factor: 0.1,
        milestones: vec![3],
        gamma: 0.1,
        total_steps: 4,
    };
    let make = || {
        let mut t = trainer(3, 0.01, 4);
        let mut config = t.config().clone();
        config.schedule = schedule.clone();
        let model_config = t.model().config().clone();
        t = Trainer::new(&model_config, &start(), config, &Device::Cpu)
            .unwrap()
            .0;
        t.model_mut().transform.min_size = 64;
        t.model_mut().transform.max_size = 96;
        t
    };

    let mut straight = make();
    for _ in 0..4 {
        straight.step(&images, &targets).unwrap();
    }

    let mut first = make();
    for _ in 0..2 {
        first.step(&images, &targets).unwrap();
    }
    first.save(&ckpt).unwrap();
    let config = first.config().clone();
    let model_config = first.model().config().clone();
    drop(first);
    let mut resumed = Trainer::resume(&ckpt, &model_config, config, &Device::Cpu).unwrap();
    assert_eq!(resumed.step_count(), 2);
    resumed.model_mut().transform.min_size = 64;
    resumed.model_mut().transform.max_size = 96;
    for _ in 0..2 {
        resumed.step(&images, &targets).unwrap();
    }

    let a = trained_tensors(&straight);
    let b = trained_tensors(&resumed);
    assert_eq!(a.len(), b.len());
    for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let diff = (ta - tb).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(
            diff.to_scalar::<f32>().unwrap(),
            0.0,
            "{na} differs after resume"
        );
    }

    // The checkpoint is an ordinary model file for inference, with its metadata.
    let model = RetinaNet::load(&ckpt, &Device::Cpu).unwrap();
    assert_eq!(model.config(), &model_config);
    // One file holds the optimiser state too, and nothing else is left beside it.
    let bytes = std::fs::read(&ckpt).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st
        .names()
        .iter()
        .any(|n| n.starts_with("optimizer.momentum.")));
    let mut left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("half") || n.starts_with(".half"))
        .collect();
    left.sort();
    assert_eq!(left, ["half.safetensors"]);

    // The older two-file layout (the optimiser state beside the model) still resumes.
    use retinanet::train::checkpoint::{optim_path, write_safetensors, OPTIMIZER_PREFIX};
    let (tensors, mut meta) =
        retinanet::train::checkpoint::read_safetensors(&ckpt, &Device::Cpu).unwrap();
    meta.remove("optimizer");
    let (optim, model): (Vec<_>, Vec<_>) = tensors
        .into_iter()
        .partition(|(n, _)| n.starts_with(OPTIMIZER_PREFIX));
    let legacy = dir.join("legacy.safetensors");
    write_safetensors(&legacy, &model.into_iter().collect(), meta).unwrap();
    let buffers: std::collections::BTreeMap<String, Tensor> = optim
        .into_iter()
        .map(|(n, t)| (n[OPTIMIZER_PREFIX.len()..].to_string(), t))
        .collect();
    let step = |s: &str| [("step".to_string(), s.to_string())].into();
    write_safetensors(&optim_path(&legacy), &buffers, step("2")).unwrap();
    let config = straight.config().clone();
    let old = Trainer::resume(&legacy, &model_config, config.clone(), &Device::Cpu).unwrap();
    assert_eq!(old.step_count(), 2);
    assert_eq!(old.optimizer().buffers().len(), buffers.len());
    write_safetensors(&optim_path(&legacy), &buffers, step("3")).unwrap();
    let err = Trainer::resume(&legacy, &model_config, config, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("optimiser state is at step 3, the model at step 2"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn non_finite_loss_names_step_images_and_checkpoint() {
    let (images, targets) = data();
    let dir = tmp_dir("nan");
    let ckpt = dir.join("good.safetensors");
    let mut t = trainer(0, 0.01, 10);
    t.step(&images, &targets).unwrap();
    t.save(&ckpt).unwrap();
    // Poison the classifier bias.
    let (_, bias) = t
        .params()
        .trained()
        .into_iter()
        .find(|(n, _)| n == "head.classification_head.cls_logits.bias")
        .unwrap();
    bias.set(&bias.as_tensor().affine(0.0, f64::NAN).unwrap())
        .unwrap();
    match t.step(&images, &targets) {
        Err(Error::NonFiniteLoss {
            step,
            images,
            checkpoint,
            ..
        }) => {
            assert_eq!(step, 1);
            assert_eq!(images, vec!["a".to_string(), "b".to_string()]);
            assert_eq!(checkpoint.as_deref(), Some(ckpt.as_path()));
        }
        other => panic!("expected a non-finite loss error, got {other:?}"),
    }
    assert_eq!(t.step_count(), 1);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_targets_and_settings_are_errors() {
    let (images, mut targets) = data();
    let mut t = trainer(0, 0.01, 10);
    targets[1].labels = vec![3];
    assert!(matches!(t.step(&images, &targets), Err(Error::Invalid(_))));
    targets[1].labels = vec![2];
    targets[1].boxes[0] = [10.0, 10.0, 5.0, 20.0];
    assert!(matches!(t.step(&images, &targets), Err(Error::Invalid(_))));
    let model_config = t.model().config().clone();
    let mut config = t.config().clone();
    config.trainable_backbone_layers = 6;
    assert!(matches!(
        Trainer::new(&model_config, &start(), config, &Device::Cpu),
        Err(Error::Invalid(_))
    ));
}
