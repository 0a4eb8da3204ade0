//! Detect objects in images with a RetinaNet checkpoint.
//!
//! ```text
//! cargo run --release --example detect -- --weights retinanet.safetensors photo.jpg
//! ```
//!
//! Prints (or writes with `--json`) one object per image, in argument order:
//! `{"image", "width", "height", "detections": [{"box", "score", "label", "class"}]}`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Parser;
use retinanet::{LoadOptions, PostProcessConfig, RetinaNet, TransformConfig};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "RetinaNet object detection (torchvision checkpoints, no Python)")]
struct Args {
    /// Checkpoint: `.safetensors` or torchvision `.pth`.
    #[arg(long)]
    weights: PathBuf,
    /// Keep detections scoring above this.
    #[arg(long, default_value_t = 0.05)]
    score_threshold: f32,
    /// Per-class NMS IoU threshold.
    #[arg(long, default_value_t = 0.5)]
    nms_threshold: f64,
    /// Detections kept per image.
    #[arg(long, default_value_t = 300)]
    max_detections: usize,
    /// Short side after resizing.
    #[arg(long, default_value_t = 800)]
    min_size: usize,
    /// Upper bound on the long side after resizing.
    #[arg(long, default_value_t = 1333)]
    max_size: usize,
    /// Frozen batch-norm eps (default: from the checkpoint; 0 for v1, 1e-5 for v2).
    #[arg(long)]
    bn_eps: Option<f64>,
    /// Write the JSON here instead of standard output.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Images (PNG or JPEG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(Serialize)]
struct ImageResult<'a> {
    image: String,
    width: u32,
    height: u32,
    detections: Vec<DetectionOut<'a>>,
}

#[derive(Serialize)]
struct DetectionOut<'a> {
    #[serde(rename = "box")]
    bbox: [f32; 4],
    score: f32,
    label: usize,
    class: Option<&'a str>,
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, then a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().context("output path has no file name")?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if !(0.0..1.0).contains(&args.score_threshold) {
        bail!(
            "--score-threshold must be in [0, 1), got {}",
            args.score_threshold
        );
    }
    let opts = LoadOptions {
        bn_eps: args.bn_eps,
        transform: TransformConfig {
            min_size: args.min_size,
            max_size: args.max_size,
            ..Default::default()
        },
        postprocess: PostProcessConfig {
            score_thresh: args.score_threshold,
            nms_thresh: args.nms_threshold,
            detections_per_img: args.max_detections,
            ..Default::default()
        },
        ..Default::default()
    };
    let device = Device::Cpu;
    let start = Instant::now();
    let model = RetinaNet::load_with(&args.weights, &device, &opts)
        .with_context(|| format!("cannot load weights {}", args.weights.display()))?;
    eprintln!(
        "loaded {} ({}) in {:.2}s",
        args.weights.display(),
        model.config().describe(),
        start.elapsed().as_secs_f64()
    );

    let mut results = Vec::with_capacity(args.images.len());
    for path in &args.images {
        let image = image::open(path)
            .with_context(|| format!("cannot read image {}", path.display()))?
            .to_rgb8();
        let start = Instant::now();
        let detections = model
            .detect(&image)
            .with_context(|| format!("detection failed on {}", path.display()))?;
        eprintln!(
            "{}: {}×{}, {} detections in {:.2}s",
            path.display(),
            image.width(),
            image.height(),
            detections.len(),
            start.elapsed().as_secs_f64()
        );
        results.push(ImageResult {
            image: path.display().to_string(),
            width: image.width(),
            height: image.height(),
            detections: detections
                .iter()
                .map(|d| DetectionOut {
                    bbox: d.bbox,
                    score: d.score,
                    label: d.label,
                    class: model.class_name(d.label),
                })
                .collect(),
        });
    }

    let json = serde_json::to_string_pretty(&results)?;
    match &args.json {
        Some(path) => write_atomic(path, json.as_bytes())?,
        None => println!("{json}"),
    }
    Ok(())
}
