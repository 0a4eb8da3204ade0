//! Training parity with torchvision: anchor assignment, losses, gradients and SGD steps,
//! against the numbers `scripts/make_train_fixtures.py` recorded.
//!
//! Tensors are compared by relative error `max|ours − theirs| / max|theirs|`.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use retinanet::model::focal_loss::{retinanet_losses, LossTargets};
use retinanet::train::optim::clip_grad_norm;
use retinanet::train::params::config_for;
use retinanet::train::{
    BackboneNorm, LossConfig, LrSchedule, Sgd, SgdConfig, Start, Target, TrainConfig, Trainer,
};
use retinanet::Kernels;

const TOL: f64 = 1e-4;

fn dir() -> PathBuf {
    common::fixture_dir("train", "make_train_fixtures.py")
}

fn meta() -> serde_json::Value {
    let text = std::fs::read_to_string(dir().join("meta.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn rel_err(ours: &Tensor, theirs: &Tensor) -> f64 {
    assert_eq!(ours.dims(), theirs.dims());
    let o = ours
        .to_dtype(DType::F64)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let t = theirs.to_dtype(DType::F64).unwrap();
    let diff = (&o - &t).unwrap().abs().unwrap().max_all().unwrap();
    let scale = t.abs().unwrap().max_all().unwrap();
    let diff = diff.to_scalar::<f64>().unwrap();
    let scale = scale.to_scalar::<f64>().unwrap();
    diff / scale.max(1e-30)
}

fn check(what: &str, ours: &Tensor, theirs: &Tensor, tol: f64) -> f64 {
    let e = rel_err(ours, theirs);
    println!("{what}: relative error {e:.2e}");
    assert!(e < tol, "{what}: relative error {e:.3e} ≥ {tol:e}");
    e
}

fn check_scalar(what: &str, ours: f32, theirs: f64, tol: f64) {
    let e = (ours as f64 - theirs).abs() / theirs.abs();
    println!("{what}: {ours} vs {theirs} (relative error {e:.2e})");
    assert!(e < tol, "{what}: {ours} vs torchvision {theirs}");
}

fn batch(meta: &serde_json::Value) -> (Vec<image::RgbImage>, Vec<Target>) {
    let images = meta["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| image::open(p.as_str().unwrap()).unwrap().to_rgb8())
        .collect();
    let targets = meta["boxes"]
        .as_array()
        .unwrap()
        .iter()
        .zip(meta["labels"].as_array().unwrap())
        .enumerate()
        .map(|(i, (b, l))| Target {
            id: format!("image{i}"),
            boxes: serde_json::from_value(b.clone()).unwrap(),
            labels: serde_json::from_value(l.clone()).unwrap(),
        })
        .collect();
    (images, targets)
}

fn trainer(
    meta: &serde_json::Value,
    m: &serde_json::Value,
    dtype: DType,
    kernels: Kernels,
) -> Trainer {
    let start = Start::RetinaNet(
        dir()
            .join(m["name"].as_str().unwrap())
            .join("model.safetensors"),
    );
    let k = meta["num_classes"].as_u64().unwrap() as usize;
    let model_config = config_for(&start, k).unwrap();
    let lr = meta["lr"].as_f64().unwrap();
    let mut config = TrainConfig::for_model(&model_config, LrSchedule::constant(lr, 100));
    config.dtype = dtype;
    config.sgd = SgdConfig {
        momentum: meta["momentum"].as_f64().unwrap(),
        weight_decay: meta["weight_decay"].as_f64().unwrap(),
        ..SgdConfig::default()
    };
    config.loss = match m["box_loss"].as_str().unwrap() {
        "l1" => LossConfig::v1(),
        "giou" => LossConfig::v2(),
        other => panic!("unknown box loss {other}"),
    };
    config.kernels = kernels;
    let device = common::test_device();
    let (mut t, report) = Trainer::new(&model_config, &start, config, &device).unwrap();
    assert_eq!(report.initialised, 0, "{report:?}");
    t.model_mut().transform.min_size = meta["min_size"].as_u64().unwrap() as usize;
    t.model_mut().transform.max_size = meta["max_size"].as_u64().unwrap() as usize;
    t
}

/// Whether a watched tensor sits deep in the network (below the head's last convs), where
/// float32 gradients carry rounding errors of 1e-3 in torchvision itself.
fn is_deep(name: &str) -> bool {
    name.starts_with("backbone.")
}

/// Compares a float32 quantity deep in the network (FPN, backbone) against torchvision's
/// float64 value, to 1e-2. Such gradients are long sums with heavy cancellation: their
/// float32 value depends on the order of summation (torchvision's own float32 error reached
/// 3e-3 on larger images, Candle's conv weight gradient sums differently). The float64 runs
/// check the same quantities to `TOL`.
fn check_deep(what: &str, ours: &Tensor, theirs32: &Tensor, theirs64: &Tensor) {
    let own = rel_err(theirs32, theirs64);
    let tol = (3.0 * own).max(1e-2);
    let e = rel_err(ours, theirs64);
    println!("{what}: relative error to float64 {e:.2e} (torchvision float32: {own:.2e})");
    assert!(
        e < tol,
        "{what}: relative error to float64 {e:.3e} ≥ {tol:.3e}"
    );
}

/// Expected tensors of one run: its own dtype's, and torchvision's float64 ones.
struct Refs<'a> {
    expected: &'a dyn Fn(&str) -> Tensor,
    ref64: &'a dyn Fn(&str) -> Tensor,
    f64_run: bool,
}

/// The watched tensors before the first step (exactly the start) and their first gradients
/// (deep ones in float32 against float64, see [`check_deep`]).
fn check_watched(
    name: &str,
    t: &Trainer,
    grads: &candle_core::backprop::GradStore,
    watched: &[String],
    refs: &Refs,
) {
    for w in watched {
        let p = t.params().get(w).unwrap();
        check(
            &format!("{name} weight {w}"),
            &p,
            &(refs.expected)(&format!("step0.{w}")),
            1e-7,
        );
        let g = grads
            .get(&p)
            .unwrap_or_else(|| panic!("{name}: no gradient for {w}"));
        let k = format!("grad.{w}");
        if is_deep(w) && !refs.f64_run {
            check_deep(
                &format!("{name} grad {w}"),
                g,
                &(refs.expected)(&k),
                &(refs.ref64)(&k),
            );
        } else {
            check(&format!("{name} grad {w}"), g, &(refs.expected)(&k), TOL);
        }
    }
}

/// `steps` SGD steps on the batch, each step's losses against torchvision's. In float32,
/// rounding differences compound over the steps: losses after the first are compared to
/// 1e-3. Returns that tolerance for later checks.
fn check_steps(
    name: &str,
    t: &mut Trainer,
    (images, targets): (&[image::RgbImage], &[Target]),
    losses: &serde_json::Value,
    steps: usize,
    f64_run: bool,
) -> f64 {
    let later = if f64_run { TOL } else { 1e-3 };
    for s in 0..steps {
        let tol = if s == 0 { TOL } else { later };
        let stats = t.step(images, targets).unwrap();
        check_scalar(
            &format!("{name} step {s} classification"),
            stats.classification,
            losses[s][0].as_f64().unwrap(),
            tol,
        );
        check_scalar(
            &format!("{name} step {s} box"),
            stats.box_regression,
            losses[s][1].as_f64().unwrap(),
            tol,
        );
    }
    later
}

fn model_parity(index: usize, dtype: DType, kernels: Kernels) {
    let meta = meta();
    let m = &meta["models"][index];
    let f64_run = dtype == DType::F64;
    let name = format!("{} {dtype:?} {kernels}", m["name"].as_str().unwrap());
    let all = load(
        &dir()
            .join(m["name"].as_str().unwrap())
            .join("expected.safetensors"),
    );
    // This run's references, and the float64 ones.
    let key = |k: &str| {
        if f64_run {
            format!("f64.{k}")
        } else {
            k.to_string()
        }
    };
    let expected = |k: &str| all[&key(k)].clone();
    let ref64 = |k: &str| all[&format!("f64.{k}")].clone();
    let losses = if f64_run {
        &m["losses_f64"]
    } else {
        &m["losses"]
    };
    let mut t = trainer(&meta, m, dtype, kernels);
    let (images, targets) = batch(&meta);

    // The same tensors train as in torchvision with trainable_backbone_layers=3.
    let mut ours: Vec<String> = t.params().trained().into_iter().map(|(n, _)| n).collect();
    let mut theirs: Vec<String> = serde_json::from_value(m["trainable"].clone()).unwrap();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs, "{name}: trained tensors");

    // Assignment, exactly.
    let bl = t.losses(&images, &targets).unwrap();
    let matched: Vec<Vec<i64>> = all["matched_idxs"].to_vec2().unwrap();
    assert_eq!(bl.matches, matched, "{name}: anchor matches");
    for (i, b) in bl.boxes.iter().enumerate() {
        let theirs: Vec<Vec<f32>> = all[&format!("target{i}_boxes")].to_vec2().unwrap();
        let ours: Vec<Vec<f32>> = b.iter().map(|r| r.to_vec()).collect();
        assert_eq!(ours, theirs, "{name}: resized boxes of image {i}");
    }
    check(
        &format!("{name} anchors"),
        &bl.raw.anchors().unwrap(),
        &all["anchors"],
        1e-7,
    );
    for out in ["cls_logits_out", "bbox_regression_out"] {
        check(
            &format!("{name} {out}"),
            &bl.raw.cls_logits_or(out),
            &expected(out),
            TOL,
        );
    }

    // Losses and gradients before the first step.
    let cls = scalar(&bl.losses.classification);
    let boxl = scalar(&bl.losses.box_regression);
    check_scalar(
        &format!("{name} classification loss"),
        cls,
        losses[0][0].as_f64().unwrap(),
        TOL,
    );
    check_scalar(
        &format!("{name} box loss"),
        boxl,
        losses[0][1].as_f64().unwrap(),
        TOL,
    );
    // Gradients of the loss alone, with respect to the head outputs (Candle keeps gradients
    // of variables only: recompute the losses on detached copies made variables).
    let cls_var = Var::from_tensor(&bl.raw.cls_logits.detach()).unwrap();
    let box_var = Var::from_tensor(&bl.raw.bbox_regression.detach()).unwrap();
    let anchors: Vec<[f32; 4]> = bl
        .raw
        .anchors()
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| [r[0], r[1], r[2], r[3]])
        .collect();
    let labels: Vec<Vec<u32>> = targets
        .iter()
        .map(|t| t.labels.iter().map(|&l| l as u32).collect())
        .collect();
    let lt = LossTargets::new(&anchors, &bl.matches, &bl.boxes, &labels);
    let head_losses = retinanet_losses(
        cls_var.as_tensor(),
        box_var.as_tensor(),
        &lt,
        &t.model().box_coder,
        &t.config().loss,
    )
    .unwrap();
    let head_grads = head_losses.total().unwrap().backward().unwrap();
    check(
        &format!("{name} d/d cls_logits"),
        head_grads.get(cls_var.as_tensor()).unwrap(),
        &expected("grad.cls_logits_out"),
        TOL,
    );
    check(
        &format!("{name} d/d bbox_regression"),
        head_grads.get(box_var.as_tensor()).unwrap(),
        &expected("grad.bbox_regression_out"),
        TOL,
    );
    let grads = bl.losses.total().unwrap().backward().unwrap();
    let refs = Refs {
        expected: &expected,
        ref64: &ref64,
        f64_run,
    };
    let watched: Vec<String> = serde_json::from_value(m["watched"].clone()).unwrap();
    check_watched(&name, &t, &grads, &watched, &refs);
    drop(bl);

    // Three SGD steps (momentum, weight decay) on the same batch.
    let steps = meta["steps"].as_u64().unwrap() as usize;
    let later = check_steps(&name, &mut t, (&images, &targets), losses, steps, f64_run);
    let after = t.losses(&images, &targets).unwrap();
    check_scalar(
        &format!("{name} classification after {steps} steps"),
        scalar(&after.losses.classification),
        losses[steps][0].as_f64().unwrap(),
        later,
    );
    check_scalar(
        &format!("{name} box after {steps} steps"),
        scalar(&after.losses.box_regression),
        losses[steps][1].as_f64().unwrap(),
        later,
    );
    for w in &watched {
        let p = t.params().get(w).unwrap();
        let k = format!("step{steps}.{w}");
        let what = format!("{name} weight {w} after {steps} steps");
        if is_deep(w) && !f64_run {
            check_deep(&what, &p, &expected(&k), &ref64(&k));
        } else {
            check(&what, &p, &expected(&k), later);
        }
        // The update itself, which the weights' magnitude would otherwise hide.
        let s0 = expected(&format!("step0.{w}"));
        let ours = (&p - &s0).unwrap();
        let theirs = (expected(&k) - &s0).unwrap();
        if is_deep(w) && !f64_run {
            let s64 = ref64(&format!("step0.{w}"));
            let theirs64 = (ref64(&k) - s64).unwrap();
            check_deep(&format!("{name} update of {w}"), &ours, &theirs, &theirs64);
        } else {
            check(&format!("{name} update of {w}"), &ours, &theirs, later);
        }
    }
}

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
}

trait RawExt {
    fn cls_logits_or(&self, which: &str) -> Tensor;
}

impl RawExt for retinanet::RawOutput {
    fn cls_logits_or(&self, which: &str) -> Tensor {
        match which {
            "cls_logits_out" => self.cls_logits.clone(),
            _ => self.bbox_regression.clone(),
        }
    }
}

#[test]
fn v1_l1_matches_torchvision_f32() {
    model_parity(0, DType::F32, Kernels::Native);
}

#[test]
fn v2_giou_matches_torchvision_f32() {
    model_parity(1, DType::F32, Kernels::Native);
}

#[test]
fn v1_l1_matches_torchvision_f64() {
    model_parity(0, DType::F64, Kernels::Native);
}

#[test]
fn v2_giou_matches_torchvision_f64() {
    model_parity(1, DType::F64, Kernels::Native);
}

#[test]
fn sgd_matches_torch_optim_sgd() {
    let meta = meta();
    let f = load(&dir().join("sgd.safetensors"));
    let lrs: Vec<f64> = serde_json::from_value(meta["sgd"]["lrs"].clone()).unwrap();
    let cases = meta["sgd"]["cases"].as_object().unwrap();
    for (name, c) in cases {
        let var = Var::from_tensor(&f["p0"]).unwrap();
        let vars = vec![("p".to_string(), var.clone())];
        let mut sgd = Sgd::new(
            vars.clone(),
            SgdConfig {
                momentum: c["momentum"].as_f64().unwrap(),
                weight_decay: c["weight_decay"].as_f64().unwrap(),
                dampening: 0.0,
                nesterov: c["nesterov"].as_bool().unwrap(),
            },
        );
        for (i, &lr) in lrs.iter().enumerate() {
            // d/dp Σ p·g = g exactly.
            let g = &f[&format!("g{i}")];
            let mut grads = (var.as_tensor() * g)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            if let Some(max) = c["clip"].as_f64() {
                clip_grad_norm(&mut grads, &vars, max).unwrap();
            }
            sgd.step(&grads, lr).unwrap();
            check(
                &format!("sgd {name} step {}", i + 1),
                var.as_tensor(),
                &f[&format!("{name}.p{}", i + 1)],
                1e-6,
            );
        }
    }
}

#[test]
fn focal_loss_matches_torchvision_on_extreme_logits() {
    let f = load(&dir().join("focal.safetensors"));
    for (name, alpha, gamma) in [("default", 0.25, 2.0), ("a05_g1_5", 0.5, 1.5)] {
        let x = Var::from_tensor(&f["x"]).unwrap();
        let loss = retinanet::model::focal_loss::sigmoid_focal_loss(
            x.as_tensor(),
            &f["t"],
            Some(alpha),
            gamma,
        )
        .unwrap();
        let grads = loss.sum_all().unwrap().backward().unwrap();
        check(
            &format!("focal {name} loss"),
            &loss,
            &f[&format!("{name}.loss")],
            1e-6,
        );
        check(
            &format!("focal {name} grad"),
            grads.get(x.as_tensor()).unwrap(),
            &f[&format!("{name}.grad")],
            1e-6,
        );
        // Elementwise too: every value finite and close.
        let ours: Vec<f32> = loss.to_vec1().unwrap();
        let theirs: Vec<f32> = f[&format!("{name}.loss")].to_vec1().unwrap();
        for (o, t) in ours.iter().zip(&theirs) {
            assert!(
                o.is_finite() && (o - t).abs() <= 1e-5 * t.abs().max(1e-3),
                "{o} vs {t}"
            );
        }
    }
}

fn scratch_dir() -> PathBuf {
    common::fixture_dir("train_scratch", "make_scratch_fixtures.py")
}

/// A trainer over the from-scratch fixture's weights with torchvision's from-scratch recipe:
/// batch norm in training mode, all five backbone stages trained.
fn scratch_trainer(meta: &serde_json::Value, dtype: DType, kernels: Kernels) -> Trainer {
    let start = Start::RetinaNet(scratch_dir().join("model.safetensors"));
    let k = meta["num_classes"].as_u64().unwrap() as usize;
    let model_config = config_for(&start, k).unwrap();
    assert_eq!(model_config.bn_eps, 1e-5);
    let lr = meta["lr"].as_f64().unwrap();
    let schedule = LrSchedule::constant(lr, 100);
    let mut config = TrainConfig::for_start(&model_config, &Start::Scratch, schedule);
    assert_eq!(config.backbone_norm, BackboneNorm::Batch);
    assert_eq!(config.trainable_backbone_layers, 5);
    config.dtype = dtype;
    config.sgd = SgdConfig {
        momentum: meta["momentum"].as_f64().unwrap(),
        weight_decay: meta["weight_decay"].as_f64().unwrap(),
        ..SgdConfig::default()
    };
    config.kernels = kernels;
    let device = common::test_device();
    let (mut t, report) = Trainer::new(&model_config, &start, config, &device).unwrap();
    assert_eq!(report.initialised, 0, "{report:?}");
    t.model_mut().transform.min_size = meta["min_size"].as_u64().unwrap() as usize;
    t.model_mut().transform.max_size = meta["max_size"].as_u64().unwrap() as usize;
    t
}

/// Training from scratch as torchvision's `retinanet_resnet50_fpn` without weights (here on a
/// ResNet-18): batch norm with batch statistics, the stem (max pool included) trained, running
/// statistics updated each step and saved; the saved model evaluates as torchvision's in
/// `model.eval()`.
fn scratch_parity(dtype: DType, kernels: Kernels) {
    let text = std::fs::read_to_string(scratch_dir().join("meta.json")).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&text).unwrap();
    let f64_run = dtype == DType::F64;
    let name = format!("scratch r18 {dtype:?} {kernels}");
    let all = load(&scratch_dir().join("expected.safetensors"));
    let key = |k: &str| {
        if f64_run {
            format!("f64.{k}")
        } else {
            k.to_string()
        }
    };
    let expected = |k: &str| all[&key(k)].clone();
    let ref64 = |k: &str| all[&format!("f64.{k}")].clone();
    let losses = if f64_run {
        &meta["losses_f64"]
    } else {
        &meta["losses"]
    };
    let mut t = scratch_trainer(&meta, dtype, kernels);
    let (images, targets) = batch(&meta);

    // Every parameter trains (batch-norm weights and biases included); running statistics
    // are buffers.
    let mut ours: Vec<String> = t.params().trained().into_iter().map(|(n, _)| n).collect();
    let mut theirs: Vec<String> = serde_json::from_value(meta["trainable"].clone()).unwrap();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs, "{name}: trained tensors");
    let buffers: Vec<String> = serde_json::from_value(meta["buffers"].clone()).unwrap();
    assert_eq!(buffers.len(), 40, "20 batch norms in a ResNet-18");
    for b in &buffers {
        assert!(t.params().is_buffer(b), "{name}: {b} is not a buffer");
    }

    let bl = t.losses(&images, &targets).unwrap();
    check_scalar(
        &format!("{name} classification loss"),
        scalar(&bl.losses.classification),
        losses[0][0].as_f64().unwrap(),
        TOL,
    );
    check_scalar(
        &format!("{name} box loss"),
        scalar(&bl.losses.box_regression),
        losses[0][1].as_f64().unwrap(),
        TOL,
    );
    let grads = bl.losses.total().unwrap().backward().unwrap();
    let refs = Refs {
        expected: &expected,
        ref64: &ref64,
        f64_run,
    };
    let watched: Vec<String> = serde_json::from_value(meta["watched"].clone()).unwrap();
    check_watched(&name, &t, &grads, &watched, &refs);
    drop(bl);

    let steps = meta["steps"].as_u64().unwrap() as usize;
    let later = check_steps(&name, &mut t, (&images, &targets), losses, steps, f64_run);
    // Running statistics after three training forwards (a forward without a step, as
    // `losses`, leaves them alone).
    let after = t.losses(&images, &targets).unwrap();
    let running: Vec<String> = serde_json::from_value(meta["running"].clone()).unwrap();
    for bn in &running {
        for stat in ["running_mean", "running_var"] {
            let k = format!("{bn}.{stat}");
            check(
                &format!("{name} {k} after {steps} steps"),
                &t.params().get(&k).unwrap(),
                &expected(&k),
                later,
            );
        }
    }
    check_scalar(
        &format!("{name} classification after {steps} steps"),
        scalar(&after.losses.classification),
        losses[steps][0].as_f64().unwrap(),
        later,
    );
    check_scalar(
        &format!("{name} box after {steps} steps"),
        scalar(&after.losses.box_regression),
        losses[steps][1].as_f64().unwrap(),
        later,
    );
    drop(after);
    for w in &watched {
        let p = t.params().get(w).unwrap();
        let k = format!("step{steps}.{w}");
        let s0 = expected(&format!("step0.{w}"));
        let ours = (&p - &s0).unwrap();
        let theirs = (expected(&k) - &s0).unwrap();
        let what = format!("{name} update of {w}");
        if is_deep(w) && !f64_run {
            let theirs64 = (ref64(&k) - ref64(&format!("step0.{w}"))).unwrap();
            check_deep(&what, &ours, &theirs, &theirs64);
        } else {
            check(&what, &ours, &theirs, later);
        }
    }

    // Evaluation mode: the trainer's model and the saved checkpoint, loaded as any other,
    // normalise with the running statistics, as torchvision's model.eval().
    let dir = std::env::temp_dir().join(format!("retinanet-scratch-{}", std::process::id()));
    let path = dir.join(format!("scratch-{dtype:?}.safetensors"));
    t.save(&path).unwrap();
    let mut loaded = retinanet::RetinaNet::load(&path, &Device::Cpu).unwrap();
    loaded.transform = t.model().transform.clone();
    for (what, model) in [("trainer's model", t.model()), ("saved model", &loaded)] {
        let b = model.preprocess(&images).unwrap();
        let raw = model.forward_raw(&b).unwrap();
        for (out, k) in [
            (&raw.cls_logits, "eval.cls_logits"),
            (&raw.bbox_regression, "eval.bbox_regression"),
        ] {
            check(&format!("{name} {what} {k}"), out, &expected(k), later);
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn scratch_batch_norm_matches_torchvision_f32() {
    scratch_parity(DType::F32, Kernels::Native);
}

#[test]
fn scratch_batch_norm_matches_torchvision_f64() {
    scratch_parity(DType::F64, Kernels::Native);
}

/// Candle's ops alone (the path CUDA and Metal run), at the same bounds.
#[test]
fn v1_l1_matches_torchvision_f32_candle_kernels() {
    model_parity(0, DType::F32, Kernels::Candle);
}

#[test]
fn v2_giou_matches_torchvision_f32_candle_kernels() {
    model_parity(1, DType::F32, Kernels::Candle);
}

#[test]
fn scratch_batch_norm_matches_torchvision_f32_candle_kernels() {
    scratch_parity(DType::F32, Kernels::Candle);
}
