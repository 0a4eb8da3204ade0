//! `scripts/convert_torchvision.py`: a torchvision `.pth` becomes a `.safetensors` whose
//! metadata (architecture, eps, class names) the loader reads, and whose f16 weights load
//! as an f32 model giving the `.pth`'s detections.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use retinanet::{Checkpoint, Detection, LoadOptions, RetinaNet, RetinaNetConfig, TransformConfig};

/// The pinned venv's python (the fixtures were made with it).
fn python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("bash")
        .arg(root.join("scripts/venv.sh"))
        .output()
        .unwrap();
    assert!(out.status.success(), "scripts/venv.sh failed");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn convert(input: &Path, output: &Path, extra: &[&str]) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/convert_torchvision.py");
    Command::new(python())
        .arg(script)
        .arg(input)
        .arg(output)
        .args(extra)
        .output()
        .unwrap()
}

fn tmp(name: &str) -> PathBuf {
    tmp_in("", name)
}

/// `name` in a folder of this process's own, `sub` apart from the other tests' files (the
/// tests run in parallel, and one counts the temporaries its folder holds).
fn tmp_in(sub: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join(format!("retinanet-convert-{}", std::process::id()))
        .join(sub);
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn detect(weights: &Path) -> Vec<Detection> {
    let opts = LoadOptions {
        bn_eps: None,
        transform: TransformConfig {
            min_size: 320,
            max_size: 512,
            ..Default::default()
        },
        ..Default::default()
    };
    let model = RetinaNet::load_with(weights, &Device::Cpu, &opts).unwrap();
    let dir = common::fixture_dir("parity", "make_parity_fixtures.py");
    model
        .detect(&image::open(dir.join("dog_crop.png")).unwrap().to_rgb8())
        .unwrap()
}

/// dtype of every tensor in a safetensors file.
fn dtypes(path: &Path) -> Vec<safetensors::Dtype> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().into_iter().map(|(_, v)| v.dtype()).collect()
}

#[test]
fn f32_conversion_keeps_the_detections_and_records_metadata() {
    let dir = common::fixture_dir("parity", "make_parity_fixtures.py");
    let pth = dir.join("v1_r18_k7/model.pth"); // pre-0.13 key layout
    let names = tmp("names.txt");
    std::fs::write(&names, "a\nb\nc\nd\ne\nf\ng\n").unwrap();
    let out = tmp("r18.safetensors");
    let run = convert(
        &pth,
        &out,
        &["--bn-eps", "1e-5", "--classes", names.to_str().unwrap()],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let ckpt = Checkpoint::open(&out).unwrap();
    assert_eq!(ckpt.metadata()["architecture"], "retinanet_resnet18_fpn");
    assert_eq!(RetinaNetConfig::infer(&ckpt).unwrap().bn_eps, 1e-5);
    assert_eq!(
        ckpt.class_names().unwrap().unwrap(),
        ["a", "b", "c", "d", "e", "f", "g"]
    );
    assert!(ckpt.names().all(|n| !n.ends_with("num_batches_tracked")));
    assert!(dtypes(&out).iter().all(|&d| d == safetensors::Dtype::F32));

    // Same tensors, eps from the metadata: the detections of the .pth loaded with eps 1e-5.
    let reference = {
        let opts = LoadOptions {
            bn_eps: Some(1e-5),
            transform: TransformConfig {
                min_size: 320,
                max_size: 512,
                ..Default::default()
            },
            ..Default::default()
        };
        let model = RetinaNet::load_with(&pth, &Device::Cpu, &opts).unwrap();
        model
            .detect(&image::open(dir.join("dog_crop.png")).unwrap().to_rgb8())
            .unwrap()
    };
    assert_eq!(detect(&out), reference);
    let model = RetinaNet::load(&out, &Device::Cpu).unwrap();
    assert_eq!(model.class_name(2), Some("c"));

    // Deterministic bytes (a sorted header), written through a symlink to its target.
    let target = tmp_in("link", "target.safetensors");
    let link = tmp_in("link", "link.safetensors");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let again = convert(
        &pth,
        &link,
        &["--bn-eps", "1e-5", "--classes", names.to_str().unwrap()],
    );
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::read(&target).unwrap() == std::fs::read(&out).unwrap());
}

#[test]
fn f16_weights_load_as_an_f32_model() {
    let dir = common::fixture_dir("parity", "make_parity_fixtures.py");
    let pth = dir.join("v1_r18_k7/model.pth");
    let (f32_out, f16_out) = (tmp("r18-f32.safetensors"), tmp("r18-f16.safetensors"));
    for (out, extra) in [(&f32_out, &[][..]), (&f16_out, &["--f16"][..])] {
        let run = convert(&pth, out, extra);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    assert!(dtypes(&f16_out)
        .iter()
        .all(|&d| d == safetensors::Dtype::F16));
    let half = std::fs::metadata(&f16_out).unwrap().len() as f64;
    let full = std::fs::metadata(&f32_out).unwrap().len() as f64;
    assert!((half / full - 0.5).abs() < 0.01, "{half} vs {full}");

    let model = RetinaNet::load(&f16_out, &Device::Cpu).unwrap();
    assert_eq!(model.config().num_classes, 7);
    let (exact, rounded) = (detect(&f32_out), detect(&f16_out));
    assert!(!exact.is_empty());
    // f16 rounding of the weights moves scores and boxes a little: each of the best
    // detections is found again.
    for e in exact.iter().take(10) {
        let found = rounded.iter().any(|r| {
            r.label == e.label
                && (r.score - e.score).abs() < 0.02
                && (0..4).all(|k| (r.bbox[k] - e.bbox[k]).abs() < 2.0)
        });
        assert!(found, "{e:?} lost in f16");
    }
    // The model itself computes in f32.
    let dog = image::open(dir.join("dog_crop.png")).unwrap().to_rgb8();
    assert_eq!(model.preprocess(&[dog]).unwrap().tensor.dtype(), DType::F32);
}

#[test]
fn bad_inputs_fail_naming_the_file_and_write_nothing() {
    let bogus = tmp("bogus.pth");
    std::fs::write(&bogus, b"not a checkpoint").unwrap();
    let out = tmp_in("bad-inputs", "never.safetensors");
    let run = convert(&bogus, &out, &[]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("bogus.pth"));
    assert!(!out.exists());

    let dir = common::fixture_dir("parity", "make_parity_fixtures.py");
    let run = convert(
        &dir.join("v1_r18_k7/model.pth"),
        &out,
        &["--classes", "coco"],
    );
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("91 names for a model with 7 classes"));
    assert!(!out.exists());
    let leftovers = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")
        })
        .count();
    assert_eq!(leftovers, 0);
}
