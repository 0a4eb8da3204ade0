//! Detect objects in images with a zoo model or a checkpoint file.
//!
//! ```text
//! cargo run --release --example detect -- photo.jpg                      # COCO, downloaded once
//! cargo run --release --example detect -- --model retinanet_resnet50_fpn_v2_coco --out annotated/ photos/
//! cargo run --release --example detect -- --weights trees.safetensors --tile 800 --overlap 128 'aerial/*.png'
//! ```
//!
//! With no output file asked for (or with `--json -`), prints one JSON object per image, in
//! argument order: `{"image", "width", "height", "detections": [{"box", "score", "label",
//! "class"}]}`. `--json FILE` writes that JSON, `--coco-results` COCO's results format,
//! `--out` annotated images; then standard output gets one summary line per image. Files are
//! written only once every image succeeded.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use retinanet::device::DeviceChoice;
use retinanet::io::annotate::{annotate, output_paths};
use retinanet::io::atomic::Staged;
use retinanet::io::hub::HubOptions;
use retinanet::io::results::{coco_image_id, CocoResult, ImageRecord};
use retinanet::tiling::{detect_tiled, TileConfig};
use retinanet::zoo::{self, ModelSource};
use retinanet::Precision;
use retinanet::{LoadOptions, PostProcessConfig, RetinaNet};

#[derive(Parser, Debug)]
#[command(about = "RetinaNet object detection (torchvision checkpoints, no Python)")]
struct Args {
    /// Zoo model, downloaded and verified once (see --list-models), or a file on the Hugging
    /// Face Hub as `hf:OWNER/NAME/FILE[@REVISION]`.
    #[arg(long, default_value = zoo::DEFAULT_MODEL, conflicts_with = "weights")]
    model: String,
    /// Checkpoint file instead of a zoo model: `.safetensors` or torchvision `.pth`.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// List the zoo's models and exit.
    #[arg(long)]
    list_models: bool,
    /// Where to run: auto (CUDA, then Metal, then the CPU), cpu, cuda or metal.
    #[arg(long, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Precision of the CPU convolutions' products in the FPN and heads: bf16 (CPUs with
    /// AVX512-BF16) is about 1.2× faster, with scores within ~0.01 of f32.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    precision: PrecisionArg,
    /// Class names, one per label: a JSON array or one name per line (default: the
    /// checkpoint's metadata, else COCO's for 91-class models).
    #[arg(long)]
    classes: Option<PathBuf>,
    /// Keep detections scoring above this.
    #[arg(long, default_value_t = 0.05)]
    score_threshold: f32,
    /// Per-class NMS IoU threshold (also merges tiles).
    #[arg(long, default_value_t = 0.5)]
    nms_threshold: f64,
    /// Detections kept per image (per tile with --tile).
    #[arg(long, default_value_t = 300)]
    max_detections: usize,
    /// Short side after resizing (default: the size a fine-tuned checkpoint trained at, from
    /// its metadata, else 800).
    #[arg(long)]
    min_size: Option<usize>,
    /// Upper bound on the long side after resizing (default: from the checkpoint, else 1333).
    #[arg(long)]
    max_size: Option<usize>,
    /// Frozen batch-norm eps (default: from the checkpoint; 0 for v1, 1e-5 for v2).
    #[arg(long)]
    bn_eps: Option<f64>,
    /// Write the JSON to this file (`-`: standard output, the default when no other output
    /// is asked for).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write COCO results (`[{image_id, category_id, bbox: [x, y, w, h], score}]`);
    /// image_id is the file stem where numeric, else the image's index.
    #[arg(long)]
    coco_results: Option<PathBuf>,
    /// Write annotated images into this folder (same file names).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Draw detections scoring at least this on --out images.
    #[arg(long, default_value_t = 0.5)]
    draw_threshold: f32,
    /// Tiled inference: run on overlapping SIZE×SIZE tiles and merge, for large images.
    #[arg(long, value_name = "SIZE")]
    tile: Option<u32>,
    /// Pixels shared by neighbouring tiles.
    #[arg(long, value_name = "PX", default_value_t = 64, requires = "tile")]
    overlap: u32,
    /// One line per image on standard error.
    #[arg(long, short)]
    verbose: bool,
    /// Images, folders (their .jpg/.jpeg/.png files, any case) and glob patterns.
    #[arg(required_unless_present = "list_models")]
    images: Vec<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum PrecisionArg {
    F32,
    Bf16,
}

fn main() -> ExitCode {
    retinanet::device::one_candle_pool_thread();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        // `detect … | head`: the reader has all it wants.
        Err(e) if retinanet::io::atomic::is_broken_pipe(e.as_ref()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    if args.list_models {
        print!("{}", zoo::table(HubOptions::from_env().ok().as_ref()));
        return Ok(());
    }
    if !(0.0..1.0).contains(&args.score_threshold) {
        let t = args.score_threshold;
        bail!("--score-threshold must be in [0, 1), got {t}");
    }
    check_numbers(&args)?;
    let tiling = args.tile.map(|size| TileConfig::new(size, args.overlap));
    if let Some(t) = &tiling {
        retinanet::tiling::tile_grid(1, 1, t).context("--tile/--overlap")?;
    }
    let images = expand_inputs(&args.images)?;
    let annotated = match &args.out {
        Some(dir) => Some(output_paths(dir, &images)?),
        None => None,
    };
    let device = args.device.open()?;
    let model = load_model(&args, &device)?;

    let bar = progress_bar(images.len());
    let mut staged = Staged::default();
    let (mut results, mut coco, mut summaries) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    for (index, path) in images.iter().enumerate() {
        bar.set_message(path.display().to_string());
        // Strict: a truncated or corrupt image is an error naming it.
        let image = retinanet::data::decode_rgb(path)?;
        let t0 = Instant::now();
        let detections = match &tiling {
            Some(t) => detect_tiled(&model, &image, t),
            None => model.detect(&image),
        }
        .with_context(|| format!("detection failed on {}", path.display()))?;
        if args.verbose {
            let (w, h, n) = (image.width(), image.height(), detections.len());
            let s = t0.elapsed().as_secs_f64();
            bar.println(format!(
                "{}: {w}×{h}, {n} detections in {s:.2}s",
                path.display()
            ));
        }
        let mut summary = format!("{}: {} detections", path.display(), detections.len());
        if let Some(plan) = &annotated {
            let drawn = annotate(&image, &detections, &model, args.draw_threshold)?;
            staged.save_image(&plan[index], &drawn)?;
            let above = detections.iter().filter(|d| d.score >= args.draw_threshold);
            let (n, t, dest) = (above.count(), args.draw_threshold, plan[index].display());
            summary += &format!(", {n} ≥ {t} drawn → {dest}");
        }
        summaries.push(summary);
        let image_id = coco_image_id(path, index);
        coco.extend(detections.iter().map(|d| CocoResult::new(image_id, d)));
        let size = image.dimensions();
        results.push(ImageRecord::new(path, size, &detections, &model));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();

    let json = serde_json::to_string_pretty(&results)?;
    if let Some(path) = &args.coco_results {
        staged.write(path, (serde_json::to_string(&coco)? + "\n").as_bytes())?;
    }
    let json_file = args.json.as_deref().filter(|p| *p != Path::new("-"));
    if let Some(path) = json_file {
        // Text files end with a newline (and `/dev/stdout` keeps the next line apart).
        staged.write(path, format!("{json}\n").as_bytes())?;
    }
    staged.commit()?;
    let asked_files = args.out.is_some() || json_file.is_some() || args.coco_results.is_some();
    let json_on_stdout = args.json.is_some() && json_file.is_none() || !asked_files;
    let mut stdout = String::new();
    if json_on_stdout {
        stdout += &format!("{json}\n");
    }
    for line in summaries.iter().filter(|_| asked_files) {
        // Standard output stays pure JSON when it carries the JSON.
        match json_on_stdout {
            true => eprintln!("{line}"),
            false => stdout += &format!("{line}\n"),
        }
    }
    // Errors, not panics: a full disk exits 1 with a message, a closed pipe quietly.
    retinanet::io::atomic::write_stdout(stdout.as_bytes())?;
    let (n, total) = (results.len(), coco.len());
    eprintln!(
        "{n} image(s), {total} detections in {elapsed:.2}s ({:.2} images/s) on {}",
        n as f64 / elapsed.max(1e-9),
        retinanet::device::name(&device)
    );
    Ok(())
}

/// Refuses numbers out of range before any work starts, naming the flag.
fn check_numbers(args: &Args) -> Result<()> {
    use retinanet::limits::{check_non_negative, check_side, check_unit};
    check_unit(args.nms_threshold, "--nms-threshold")?;
    check_unit(f64::from(args.draw_threshold), "--draw-threshold")?;
    if let Some(eps) = args.bn_eps {
        check_non_negative(eps, "--bn-eps")?;
    }
    for (side, flag) in [(args.min_size, "--min-size"), (args.max_size, "--max-size")] {
        side.map(|s| check_side(s, flag)).transpose()?;
    }
    Ok(())
}

/// Files as given, folders' image files (sorted) and glob matches (sorted).
fn expand_inputs(args: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for arg in args {
        let path = Path::new(arg);
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot list folder {arg}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && retinanet::data::is_image(p))
                .collect();
            files.sort();
            files
        } else if path.exists() {
            vec![path.to_path_buf()]
        } else if arg.contains(['*', '?', '[']) {
            let paths = glob::glob(arg).with_context(|| format!("bad pattern {arg}"))?;
            paths
                .filter_map(|p| p.ok())
                .filter(|p| p.is_file())
                .collect()
        } else {
            bail!("cannot read image {arg}: no such file or folder");
        };
        if files.is_empty() && path.is_dir() {
            let extensions = retinanet::data::IMAGE_EXTENSIONS.join(", ");
            bail!("folder {arg} holds no images ({extensions})");
        } else if files.is_empty() {
            bail!("pattern {arg} matches no files");
        }
        out.extend(files);
    }
    Ok(out)
}

fn load_model(args: &Args, device: &candle_core::Device) -> Result<RetinaNet> {
    let source = match &args.weights {
        Some(path) => ModelSource::File(path.clone()),
        None => zoo::resolve(&args.model).context("--model")?,
    };
    let opts = LoadOptions {
        bn_eps: args.bn_eps,
        min_size: args.min_size,
        max_size: args.max_size,
        postprocess: PostProcessConfig {
            score_thresh: args.score_threshold,
            nms_thresh: args.nms_threshold,
            detections_per_img: args.max_detections,
            ..Default::default()
        },
        precision: match args.precision {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
        },
        ..Default::default()
    };
    let start = Instant::now();
    let what = source.describe();
    let mut model = match source {
        ModelSource::File(_) => source.load(device, &opts).context("cannot load weights")?,
        _ => source.load(device, &opts)?,
    };
    if let Some(file) = &args.classes {
        let names = retinanet::classes::read_file(file).context("--classes")?;
        model
            .set_class_names(names)
            .with_context(|| format!("--classes {}", file.display()))?;
    }
    let (config, s) = (model.config().describe(), start.elapsed().as_secs_f64());
    eprintln!("loaded {what} ({config}) in {s:.2}s");
    Ok(model)
}

fn progress_bar(len: usize) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    let template = "{bar:30} {pos}/{len} images, {per_sec}, eta {eta} {wide_msg}";
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}
