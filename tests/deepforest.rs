//! DeepForest's models and tiling against deepforest 2.1.0 itself (fixtures from
//! `scripts/make_deepforest_fixtures.py`): a repo written by `RetinaNetHub.save_pretrained`
//! served by a loopback Hub, `predict_tile` outputs, slidingwindow's window placements, and
//! GeoTIFFs written by rasterio with a known transform and CRS.

mod common;
#[path = "common/http.rs"]
mod http;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use http::Server;
use retinanet::geo::{GeoDetections, GeoTiff};
use retinanet::io::hub::HubOptions;
use retinanet::io::hub_repo::{self, RepoFiles};
use retinanet::tiling::{
    deepforest_windows, detect_tiled_deepforest, DeepForestTiling, Overlap, WindowSource,
};
use retinanet::{Detection, LoadOptions, RetinaNet};
use serde_json::Value;

const COMMIT: &str = "5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a5a";

fn fixtures() -> PathBuf {
    common::fixture_dir("deepforest", "make_deepforest_fixtures.py")
}

fn reference() -> Value {
    let text = std::fs::read_to_string(fixtures().join("predict_tile.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Serves `files` as repo `repo` at COMMIT (the API's file list, and each file by commit).
fn serve_repo(server: &Server, repo: &str, files: &[(&str, Vec<u8>)]) {
    let siblings: Vec<Value> = files
        .iter()
        .map(|(name, _)| serde_json::json!({ "rfilename": name }))
        .collect();
    let info = serde_json::json!({ "sha": COMMIT, "siblings": siblings });
    let api = format!("/api/models/{repo}/revision/main");
    server.serve(&api, info.to_string().into_bytes(), "", COMMIT);
    for (name, body) in files {
        let path = format!("/{repo}/resolve/{COMMIT}/{name}");
        server.serve(&path, body.clone(), &common::sha256_hex(body), COMMIT);
    }
}

fn options(server: &Server, dir: &Path) -> HubOptions {
    HubOptions {
        hf_cache: dir.join("hub"),
        hf_endpoint: server.url.clone(),
        hf_token: None,
        torch_cache: dir.join("torch"),
        torchvision_url: format!("{}/models/", server.url),
        offline: false,
        progress: false,
    }
}

fn read(path: PathBuf) -> Vec<u8> {
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Greedy one-to-one matching of DeepForest's boxes to ours (same class, IoU ≥ 0.99,
/// |Δscore| ≤ 1e-3): asserts ≥ 99 % matched and ≤ 1 % extra, and prints the figures.
fn assert_parity(what: &str, reference: &[Value], ours: &[Detection], model: &RetinaNet) {
    assert_parity_min(what, reference, ours, model, 100);
}

fn assert_parity_min(
    what: &str,
    reference: &[Value],
    ours: &[Detection],
    model: &RetinaNet,
    min_boxes: usize,
) {
    let mut used = vec![false; ours.len()];
    let (mut matched, mut max_dscore, mut min_iou) = (0usize, 0f64, 1f64);
    for r in reference {
        let rb = ["xmin", "ymin", "xmax", "ymax"].map(|k| r[k].as_f64().unwrap());
        let (label, score) = (r["label"].as_str().unwrap(), r["score"].as_f64().unwrap());
        let best = ours
            .iter()
            .enumerate()
            .filter(|(j, d)| !used[*j] && model.class_name(d.label) == Some(label))
            .map(|(j, d)| {
                let v = iou(rb, d.bbox.map(f64::from));
                (j, v, (f64::from(d.score) - score).abs())
            })
            .filter(|&(_, v, ds)| v >= 0.99 && ds <= 1e-3)
            .min_by(|a, b| a.2.total_cmp(&b.2));
        if let Some((j, v, ds)) = best {
            used[j] = true;
            matched += 1;
            max_dscore = max_dscore.max(ds);
            min_iou = min_iou.min(v);
        }
    }
    let extra = ours.len() - matched;
    let (n, pct) = (
        reference.len(),
        100.0 * matched as f64 / reference.len() as f64,
    );
    eprintln!(
        "{what}: deepforest {n} boxes, ours {}, matched {matched} ({pct:.2} %), extra {extra} \
         ({:.2} %), max |Δscore| {max_dscore:.2e}, min IoU {min_iou:.4}",
        ours.len(),
        100.0 * extra as f64 / n as f64
    );
    assert!(
        n >= min_boxes,
        "{what}: too few reference boxes to judge ({n})"
    );
    assert!(pct >= 99.0, "{what}: only {pct:.2} % matched");
    assert!(
        extra as f64 <= 0.01 * n as f64,
        "{what}: {extra} extra boxes"
    );
}

fn run_config(run: &Value) -> DeepForestTiling {
    DeepForestTiling {
        patch_size: run["patch_size"].as_u64().unwrap() as u32,
        overlap: Overlap::Fraction(run["patch_overlap"].as_f64().unwrap()),
        iou_threshold: run["iou_threshold"].as_f64().unwrap(),
    }
}

#[test]
fn deepforest_repo_by_name_tiles_a_geotiff_like_predict_tile() {
    let f = fixtures();
    let weights = read(f.join("repo/model.safetensors"));
    let config = read(f.join("repo/config.json"));
    let server = Server::start();
    let repo = "test/deepforest-like";
    serve_repo(
        &server,
        repo,
        &[
            ("config.json", config),
            ("model.safetensors", weights.clone()),
            ("README.md", b"# a model card".to_vec()),
        ],
    );
    let dir = common::scratch_dir("df", "repo");
    let opts = options(&server, &dir);
    let files = hub_repo::fetch_repo(repo, "main", None, &opts).unwrap();

    // huggingface_hub's cache layout: blobs by sha256, snapshots by commit, refs by branch.
    let root = opts.hf_cache.join("models--test--deepforest-like");
    let snapshot = root.join("snapshots").join(COMMIT);
    assert_eq!(files.weights, snapshot.join("model.safetensors"));
    assert_eq!(files.config, Some(snapshot.join("config.json")));
    assert!(root
        .join("blobs")
        .join(common::sha256_hex(&weights))
        .is_file());
    let refs = std::fs::read_to_string(root.join("refs/main")).unwrap();
    assert_eq!(refs, COMMIT);
    let offline = HubOptions {
        offline: true,
        ..opts.clone()
    };
    let before = server.requests();
    assert_eq!(
        hub_repo::fetch_repo(repo, "main", None, &offline).unwrap(),
        files
    );
    assert_eq!(
        hub_repo::fetch_repo(repo, COMMIT, None, &offline).unwrap(),
        files
    );
    assert_eq!(server.requests(), before, "offline: no connection");

    let (model, repo_config) =
        hub_repo::load_files_with_config(&files, &Device::Cpu, &LoadOptions::default()).unwrap();
    assert!(repo_config.is_some());
    assert_eq!(model.class_names().unwrap(), ["Tree", "Snag"]);
    assert_eq!(model.config().bn_eps, 1e-5);
    let post = &model.postprocess;
    assert_eq!((post.score_thresh, post.nms_thresh), (0.3, 0.05));

    let run = &reference()["runs"][0];
    let mut tiff = GeoTiff::open(f.join("tiled_deflate.tif")).unwrap();
    let ours = detect_tiled_deepforest(&model, &mut tiff, &run_config(run)).unwrap();
    let what = "predict_tile(patch_size=400, patch_overlap=0.05, iou_threshold=0.15), GeoTIFF";
    assert_parity(what, run["boxes"].as_array().unwrap(), &ours, &model);

    // Map coordinates: rasterio's transform applied to the boxes' corners, in its CRS.
    let geo: Value = serde_json::from_slice(&read(f.join("geo.json"))).unwrap();
    let t: Vec<f64> = geo["transform"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let georef = *tiff.georeference().expect("georeferenced");
    assert_eq!(georef.epsg, geo["epsg"].as_u64().map(|c| c as u32));
    assert_eq!(georef.transform.0.to_vec(), t);
    let layer = GeoDetections {
        image: "tiled_deflate.tif".into(),
        georef,
        detections: &ours,
    };
    let collection = retinanet::geo::geojson(&[layer], &model).unwrap();
    let crs = format!("urn:ogc:def:crs:EPSG::{}", geo["epsg"]);
    assert_eq!(collection["crs"]["properties"]["name"], crs.as_str());
    let features = collection["features"].as_array().unwrap();
    assert_eq!(features.len(), ours.len());
    for (feature, d) in features.iter().zip(&ours) {
        let ring = feature["geometry"]["coordinates"][0].as_array().unwrap();
        let [x1, y1, x2, y2] = d.bbox.map(f64::from);
        let corners = [(x1, y1), (x2, y1), (x2, y2), (x1, y2), (x1, y1)];
        for (point, (c, r)) in ring.iter().zip(corners) {
            let expected = [t[0] * c + t[1] * r + t[2], t[3] * c + t[4] * r + t[5]];
            for k in 0..2 {
                assert!((point[k].as_f64().unwrap() - expected[k]).abs() < 1e-6);
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap(); // a 130 MB copy
}

#[test]
fn legacy_repo_with_a_lone_safetensors_file_matches_predict_tile() {
    // Older DeepForest revisions prefix every tensor with `model.`; this repo also names its
    // weights file otherwise, so it is found as the repo's only .safetensors file.
    let f = fixtures();
    let server = Server::start();
    let repo = "test/legacy";
    serve_repo(
        &server,
        repo,
        &[
            ("config.json", read(f.join("repo_legacy/config.json"))),
            (
                "NEON.safetensors",
                read(f.join("repo_legacy/model.safetensors")),
            ),
            ("NEON.pt", b"not read".to_vec()),
        ],
    );
    let dir = common::scratch_dir("df", "legacy");
    // A private repo: HF_TOKEN goes with the API call and every download.
    let opts = HubOptions {
        hf_token: Some("hf_secret".into()),
        ..options(&server, &dir)
    };
    let files = hub_repo::fetch_repo(repo, "main", None, &opts).unwrap();
    assert!(files.weights.ends_with("NEON.safetensors"));
    let auth = server.authorizations();
    assert!(auth.len() >= 3, "{auth:?}");
    assert!(auth.iter().all(|a| a == "Bearer hf_secret"), "{auth:?}");
    let model = hub_repo::load_files(&files, &Device::Cpu, &LoadOptions::default()).unwrap();

    let run = &reference()["runs"][1];
    let image = image::open(f.join("image.png")).unwrap().to_rgb8();
    let ours = detect_tiled_deepforest(&model, &mut &image, &run_config(run)).unwrap();
    let what = "predict_tile(patch_size=300, patch_overlap=0.25, iou_threshold=0.3), legacy repo";
    assert_parity(what, run["boxes"].as_array().unwrap(), &ours, &model);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn windows_are_placed_as_slidingwindow_places_them() {
    let reference = reference();
    let runs = reference["runs"].as_array().unwrap();
    let cases = reference["window_cases"].as_array().unwrap();
    let image = image::open(fixtures().join("image.png")).unwrap();
    let mut checked = 0;
    for case in runs.iter().chain(cases) {
        let dim = |k: &str, fallback: u32| case[k].as_u64().map_or(fallback, |v| v as u32);
        let (w, h) = (dim("width", image.width()), dim("height", image.height()));
        let size = case["patch_size"].as_u64().unwrap() as u32;
        let overlap = Overlap::Fraction(case["patch_overlap"].as_f64().unwrap());
        let ours: Vec<[u32; 4]> = deepforest_windows(w, h, size, overlap)
            .unwrap()
            .iter()
            .map(|r| [r.x, r.y, r.width, r.height])
            .collect();
        let theirs: Vec<[u32; 4]> = serde_json::from_value(case["windows"].clone()).unwrap();
        assert_eq!(ours, theirs, "{w}×{h}, {size} px, overlap {overlap:?}");
        checked += 1;
    }
    assert_eq!(checked, runs.len() + cases.len());
}

#[test]
fn geotiffs_stripped_tiled_and_rgba_read_the_png_pixels() {
    let f = fixtures();
    let png = image::open(f.join("image.png")).unwrap().to_rgb8();
    let geo: Value = serde_json::from_slice(&read(f.join("geo.json"))).unwrap();
    for name in geo["files"].as_array().unwrap() {
        let path = f.join(name.as_str().unwrap());
        let mut tiff = GeoTiff::open(&path).unwrap();
        assert_eq!(tiff.dimensions(), png.dimensions(), "{}", path.display());
        assert_eq!(tiff.georeference().unwrap().epsg, Some(32612));
        assert!(tiff.read_all().unwrap() == png, "{}", path.display());
        // Windows across chunk borders, as tiling reads them.
        for w in deepforest_windows(png.width(), png.height(), 300, Overlap::Pixels(37)).unwrap() {
            let crop = image::imageops::crop_imm(&png, w.x, w.y, w.width, w.height).to_image();
            assert!(
                tiff.read_window(&w).unwrap() == crop,
                "{} {w:?}",
                path.display()
            );
        }
    }
    let outside = retinanet::tiling::Region {
        x: png.width() - 10,
        y: 0,
        width: 20,
        height: 20,
    };
    let mut tiff = GeoTiff::open(f.join("tiled_deflate.tif")).unwrap();
    let err = tiff.read_window(&outside).unwrap_err().to_string();
    assert!(
        err.contains("tiled_deflate.tif") && err.contains("outside"),
        "{err}"
    );
    let err = GeoTiff::open(f.join("image.png")).unwrap_err().to_string();
    assert!(err.contains("image.png") && err.contains("TIFF"), "{err}");
}

#[test]
fn bad_repo_configs_are_named() {
    let f = fixtures();
    let dir = common::scratch_dir("df", "bad-config");
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        r#"{"num_classes": 2, "label_dict": {"Tree": 0, "Snag": 0}}"#,
    )
    .unwrap();
    let files = RepoFiles {
        weights: f.join("repo/model.safetensors"),
        config: Some(config.clone()),
    };
    let err = hub_repo::load_files(&files, &Device::Cpu, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("label 0"),
        "{err}"
    );
    std::fs::write(&config, r#"{"num_classes": 3}"#).unwrap();
    let err = hub_repo::load_files(&files, &Device::Cpu, &LoadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("num_classes is 3") && err.contains("have 2"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// deepforest 2.1.0 loading a repo with `RetinaNetHub.from_pretrained` (offline: the
/// ImageNet backbone it would download is replaced anyway) and predicting one image.
const DEEPFOREST_PREDICT: &str = r#"
import json, sys
from functools import partial
import numpy as np, torch, torchvision
from PIL import Image
f = torchvision.models.detection.retinanet_resnet50_fpn
torchvision.models.detection.retinanet_resnet50_fpn = partial(f, weights_backbone=None)
from deepforest.models.retinanet import RetinaNetHub
model = RetinaNetHub.from_pretrained(sys.argv[1]).eval()
names = {v: k for k, v in model.label_dict.items()}
image = np.asarray(Image.open(sys.argv[2]).convert("RGB"), dtype=np.float32) / 255.0
with torch.no_grad():
    out = model([torch.from_numpy(image).permute(2, 0, 1)])[0]
print(json.dumps([dict(xmin=b[0], ymin=b[1], xmax=b[2], ymax=b[3], label=names[int(l)], score=s)
                  for b, l, s in zip(out["boxes"].tolist(), out["labels"], out["scores"].tolist())]))
"#;

#[test]
fn finetuned_repo_round_trips_through_deepforest() {
    // finetune --model hf:… --save-repo writes a repo; deepforest's from_pretrained loads it
    // and predicts what we predict with it.
    let Some(python) = std::env::var_os("RETINANET_DEEPFOREST_PYTHON") else {
        common::skip(
            "finetuned_repo_round_trips_through_deepforest",
            "RETINANET_DEEPFOREST_PYTHON is not set (scripts/test.sh sets it)",
        );
        return;
    };
    let f = fixtures();
    let server = Server::start();
    let repo = "test/round-trip";
    serve_repo(
        &server,
        repo,
        &[
            ("config.json", read(f.join("repo/config.json"))),
            ("model.safetensors", read(f.join("repo/model.safetensors"))),
        ],
    );
    let dir = common::scratch_dir("df", "round-trip");
    let png = image::open(f.join("image.png")).unwrap().to_rgb8();
    let crop = image::imageops::crop_imm(&png, 300, 200, 400, 400).to_image();
    crop.save(dir.join("crop.png")).unwrap();
    let rows =
        "crop.png,10,10,60,60,Tree\ncrop.png,100,120,130,160,Snag\ncrop.png,200,200,260,250,Tree\n";
    std::fs::write(dir.join("boxes.csv"), rows).unwrap();
    let out = dir.join("run");
    let saved = dir.join("saved-repo");
    let run = Command::new(common::example_bin("finetune"))
        .env("HF_HOME", dir.join("hf"))
        .env("HF_ENDPOINT", &server.url)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .arg("--model")
        .arg(format!("hf:{repo}"))
        .arg("--data")
        .arg(dir.join("boxes.csv"))
        .args([
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--lr",
            "1e-7",
            "--hflip",
            "0",
        ])
        .arg("--out")
        .arg(&out)
        .arg("--save-repo")
        .arg(&saved)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");

    // Python's huggingface_hub finds what our download left in the Hub cache, offline.
    let lookup = "import sys; from huggingface_hub import hf_hub_download as d; \
                  print(d(sys.argv[1], 'model.safetensors', cache_dir=sys.argv[2], \
                  local_files_only=True))";
    let found = Command::new(&python)
        .env("HF_HUB_OFFLINE", "1")
        .args(["-c", lookup, repo])
        .arg(dir.join("hf/hub"))
        .output()
        .unwrap();
    let snapshot = dir.join(format!(
        "hf/hub/models--test--round-trip/snapshots/{COMMIT}/model.safetensors"
    ));
    let stdout = String::from_utf8_lossy(&found.stdout);
    assert_eq!(
        stdout.trim(),
        snapshot.to_str().unwrap(),
        "{}",
        String::from_utf8_lossy(&found.stderr)
    );

    let config: Value = serde_json::from_slice(&read(saved.join("config.json"))).unwrap();
    assert_eq!(config["num_classes"], 2);
    assert_eq!(config["score_thresh"].as_f64(), Some(0.3));
    // Trained at torchvision's 800/1333, which RetinaNetHub uses without being told.
    assert!(config.get("min_size").is_none(), "{config}");

    let theirs = Command::new(&python)
        .args(["-c", DEEPFOREST_PREDICT])
        .arg(&saved)
        .arg(dir.join("crop.png"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&theirs.stderr);
    assert!(theirs.status.success(), "deepforest: {err}");
    // deepforest prints progress on standard output too: the JSON is the last line.
    let stdout = String::from_utf8_lossy(&theirs.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let reference: Vec<Value> = serde_json::from_str(last).unwrap();

    let files = RepoFiles {
        weights: saved.join("model.safetensors"),
        config: Some(saved.join("config.json")),
    };
    let model = hub_repo::load_files(&files, &Device::Cpu, &LoadOptions::default()).unwrap();
    let ours = model.detect(&crop).unwrap();
    let what = "finetune --save-repo, loaded back by RetinaNetHub.from_pretrained";
    assert_parity_min(what, &reference, &ours, &model, 20);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn new_class_count_gives_new_heads_as_adjust_classes() {
    let f = fixtures();
    let files = RepoFiles {
        weights: f.join("repo/model.safetensors"),
        config: Some(f.join("repo/config.json")),
    };
    let dir = common::scratch_dir("df", "adjust");
    let dest = dir.join("start.safetensors");
    let config = hub_repo::training_start(&files, 5, 0, &dest).unwrap();
    assert_eq!(config.unwrap().num_classes, Some(2));
    let base = retinanet::Checkpoint::open(&files.weights).unwrap();
    let start = retinanet::Checkpoint::open(&dest).unwrap();
    assert_eq!(start.metadata()["bn_eps"], "1e-5");
    let cls = "head.classification_head.cls_logits.weight";
    assert_eq!(start.shape(cls), Some(&[45, 256, 3, 3][..]));
    let (bvb, _) = base.var_builder(candle_core::DType::F32, &Device::Cpu);
    let (svb, _) = start.var_builder(candle_core::DType::F32, &Device::Cpu);
    let get = |vb: &candle_nn::VarBuilder, name: &str, shape: &[usize]| {
        vb.get(shape, name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    // The backbone and FPN as the repo has them; both heads new (N(0, 0.01) convs).
    let body = ("backbone.body.layer4.2.conv3.weight", [2048, 512, 1, 1]);
    assert_eq!(get(&bvb, body.0, &body.1), get(&svb, body.0, &body.1));
    let conv = ("head.regression_head.conv.0.0.weight", [256, 256, 3, 3]);
    let (old, new) = (get(&bvb, conv.0, &conv.1), get(&svb, conv.0, &conv.1));
    assert_ne!(old, new);
    let std = (new.iter().map(|v| v * v).sum::<f32>() / new.len() as f32).sqrt();
    assert!((std - 0.01).abs() < 1e-3, "regression conv std {std}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn detect_cli_tiles_a_geotiff_from_the_hub_into_geojson_and_csv() {
    let f = fixtures();
    let server = Server::start();
    let repo = "test/cli";
    serve_repo(
        &server,
        repo,
        &[
            ("config.json", read(f.join("repo/config.json"))),
            ("model.safetensors", read(f.join("repo/model.safetensors"))),
        ],
    );
    let dir = common::scratch_dir("df", "cli");
    let (geojson, csv) = (dir.join("boxes.geojson"), dir.join("boxes.csv"));
    let run = Command::new(common::example_bin("detect"))
        .env("HF_HOME", dir.join("hf"))
        .env("HF_ENDPOINT", &server.url)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .args(["--model", &format!("hf:{repo}"), "--tile", "400"])
        .arg("--geojson")
        .arg(&geojson)
        .arg("--csv")
        .arg(&csv)
        .arg(f.join("striped_rgba_lzw.tif"))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );

    // The CSV in DeepForest's columns, against predict_tile's own boxes.
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("xmin,ymin,xmax,ymax,label,score,image_path")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert!(rows.iter().all(|r| r[6] == "striped_rgba_lzw.tif"));
    let reference = reference();
    let theirs = reference["runs"][0]["boxes"].as_array().unwrap();
    let diff = rows.len().abs_diff(theirs.len());
    assert!(
        diff * 100 <= theirs.len(),
        "{} rows, deepforest {}",
        rows.len(),
        theirs.len()
    );
    let top = &theirs[0];
    let first: Vec<f64> = rows[0][..4].iter().map(|v| v.parse().unwrap()).collect();
    let expected = ["xmin", "ymin", "xmax", "ymax"].map(|k| top[k].as_f64().unwrap());
    assert_eq!(first, expected);
    assert_eq!(rows[0][4], top["label"].as_str().unwrap());

    let collection: Value = serde_json::from_slice(&read(geojson)).unwrap();
    assert_eq!(collection["features"].as_array().unwrap().len(), rows.len());
    let crs = &collection["crs"]["properties"]["name"];
    assert_eq!(crs, "urn:ogc:def:crs:EPSG::32612");

    // A PNG has no georeference: --geojson refuses it by name.
    let png = f.join("image.png");
    let run = Command::new(common::example_bin("detect"))
        .env("HF_HOME", dir.join("hf"))
        .env("HF_HUB_OFFLINE", "1")
        .args(["--model", &format!("hf:{repo}"), "--max-size", "64"])
        .arg("--geojson")
        .arg(dir.join("no.geojson"))
        .arg(&png)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("image.png") && stderr.contains("georeferenced"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_repo_refuses_other_architectures_before_training() {
    let f = fixtures();
    let dir = common::scratch_dir("df", "save-repo-r18");
    let png = image::open(f.join("image.png")).unwrap().to_rgb8();
    let crop = image::imageops::crop_imm(&png, 0, 0, 200, 200).to_image();
    crop.save(dir.join("crop.png")).unwrap();
    std::fs::write(dir.join("boxes.csv"), "crop.png,10,10,60,60,Tree\n").unwrap();
    let run = Command::new(common::example_bin("finetune"))
        .args(["--from-scratch", "--depth", "18", "--steps", "1"])
        .arg("--data")
        .arg(dir.join("boxes.csv"))
        .arg("--out")
        .arg(dir.join("run"))
        .arg("--save-repo")
        .arg(dir.join("repo"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        stderr.contains("--save-repo") && stderr.contains("ResNet-50 FPN v1"),
        "{stderr}"
    );
    assert!(
        !dir.join("run/final.safetensors").exists(),
        "trained anyway"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
