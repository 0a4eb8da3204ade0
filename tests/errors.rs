//! Bad checkpoints and inputs give errors that name the culprit, never panics.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use retinanet::{Error, RetinaNet};

/// The ResNet-18 fixture's tensors (torchvision names, current layout).
fn r18_tensors() -> HashMap<String, Tensor> {
    let dir = common::fixture_dir("parity", "make_parity_fixtures.py");
    candle_core::safetensors::load(dir.join("v1_r18_k7/model.safetensors"), &Device::Cpu).unwrap()
}

fn save(tensors: &HashMap<String, Tensor>, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("retinanet-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    candle_core::safetensors::save(tensors, &path).unwrap();
    path
}

fn load_err(path: &Path) -> Error {
    RetinaNet::load(path, &Device::Cpu).expect_err("load must fail")
}

#[test]
fn missing_tensor_is_named_with_its_shape() {
    let mut t = r18_tensors();
    t.remove("backbone.body.layer3.1.bn2.running_var");
    let path = save(&t, "missing.safetensors");
    let msg = load_err(&path).to_string();
    assert!(
        msg.contains("backbone.body.layer3.1.bn2.running_var"),
        "{msg}"
    );
    assert!(
        msg.contains("[256]") && msg.contains("missing.safetensors"),
        "{msg}"
    );
}

#[test]
fn misshaped_tensor_is_named_with_both_shapes() {
    let mut t = r18_tensors();
    let name = "backbone.body.layer2.0.conv2.weight";
    t.insert(
        name.into(),
        Tensor::zeros((128, 128, 1, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = save(&t, "misshaped.safetensors");
    match load_err(&path) {
        Error::ShapeMismatch {
            name: n,
            expected,
            actual,
            ..
        } => {
            assert_eq!(n, name);
            assert_eq!(expected, vec![128, 128, 3, 3]);
            assert_eq!(actual, vec![128, 128, 1, 3]);
        }
        e => panic!("unexpected error: {e}"),
    }
}

#[test]
fn unexpected_tensor_is_named() {
    let mut t = r18_tensors();
    t.insert(
        "head.extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let path = save(&t, "unexpected.safetensors");
    let msg = load_err(&path).to_string();
    assert!(msg.contains("head.extra.weight"), "{msg}");
}

#[test]
fn not_a_retinanet_checkpoint() {
    let mut t = HashMap::new();
    t.insert(
        "fc.weight".to_string(),
        Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
    );
    let path = save(&t, "classifier.safetensors");
    let msg = load_err(&path).to_string();
    assert!(
        msg.contains("classifier.safetensors") && msg.contains("backbone"),
        "{msg}"
    );
}

#[test]
fn garbage_and_missing_files_are_named() {
    let dir = std::env::temp_dir();
    let garbage = dir.join(format!("retinanet-garbage-{}.pth", std::process::id()));
    std::fs::write(&garbage, b"not a checkpoint").unwrap();
    let msg = load_err(&garbage).to_string();
    assert!(msg.contains(&*garbage.to_string_lossy()), "{msg}");
    let msg = load_err(Path::new("/no/such/model.safetensors")).to_string();
    assert!(msg.contains("/no/such/model.safetensors"), "{msg}");
}

#[test]
fn explicit_config_overrides_inference() {
    let dir = common::fixture_dir("parity", "make_parity_fixtures.py");
    // Asking for 5 classes where the checkpoint has 7 names the class-logit tensor.
    let opts = retinanet::LoadOptions {
        config: Some(retinanet::RetinaNetConfig::v1(18, 5).unwrap()),
        ..Default::default()
    };
    let err = RetinaNet::load_with(dir.join("v1_r18_k7/model.safetensors"), &Device::Cpu, &opts)
        .expect_err("wrong class count");
    assert!(err.to_string().contains("cls_logits.weight"), "{err}");
    assert!(retinanet::RetinaNetConfig::v1(19, 5).is_err());
}

#[test]
fn empty_batch_is_an_error() {
    let dir = common::fixture_dir("parity", "make_parity_fixtures.py");
    let model = RetinaNet::load(dir.join("v1_r18_k7/model.safetensors"), &Device::Cpu).unwrap();
    assert!(model.detect_batch(&[]).is_err());
}
