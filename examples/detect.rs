//! Detect objects in images with a zoo model or a checkpoint file.
//!
//! ```text
//! cargo run --release --example detect -- photo.jpg                      # COCO, downloaded once
//! cargo run --release --example detect -- --model retinanet_resnet50_fpn_v2_coco --out annotated/ photos/
//! cargo run --release --example detect -- --weights trees.safetensors --tile 800 --overlap 128 'aerial/*.png'
//! cargo run --release --example detect -- --model weecology/deepforest-tree --tile 400 \
//!     --geojson crowns.geojson --csv crowns.csv orthomosaic.tif       # DeepForest's predict_tile
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
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use retinanet::device::DeviceChoice;
use retinanet::geo::{GeoDetections, GeoReference, GeoTiff};
use retinanet::io::annotate::{annotate, output_paths};
use retinanet::io::atomic::Staged;
use retinanet::io::hub::HubOptions;
use retinanet::io::results::{coco_image_id, CocoResult, ImageRecord};
use retinanet::tiling::{
    detect_tiled, detect_tiled_deepforest, DeepForestTiling, Overlap, TileConfig, WindowSource,
};
use retinanet::zoo::{self, ModelSource};
use retinanet::{Detection, LoadOptions, PostProcessConfig, RetinaNet};
use retinanet::{Kernels, Precision};

#[derive(Parser, Debug)]
#[command(about = "RetinaNet object detection (torchvision checkpoints, no Python)")]
struct Args {
    /// Zoo model, downloaded and verified once (see --list-models), or a Hugging Face Hub
    /// model repo as `hf:OWNER/NAME[@REVISION]` (a DeepForest repo's config.json gives class
    /// names and thresholds) or a file in one as `hf:OWNER/NAME/FILE[@REVISION]`.
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
    /// The layers' implementation on the CPU: native (this crate's kernels) or candle
    /// (Candle's device-agnostic ops only, the code CUDA and Metal run).
    #[arg(long, default_value_t = Kernels::Native)]
    kernels: Kernels,
    /// Precision of the CPU convolutions' products in the FPN and heads: bf16 (CPUs with
    /// AVX512-BF16) is about 1.2× faster, with scores within ~0.01 of f32.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    precision: PrecisionArg,
    /// Class names, one per label: a JSON array or one name per line (default: the
    /// checkpoint's metadata, else COCO's for 91-class models).
    #[arg(long)]
    classes: Option<PathBuf>,
    /// Keep detections scoring above this [default: the Hub repo's score_thresh, else 0.05].
    #[arg(long)]
    score_threshold: Option<f32>,
    /// Per-class NMS IoU threshold (also merges grid tiles) [default: the Hub repo's
    /// nms_thresh, else 0.5].
    #[arg(long)]
    nms_threshold: Option<f64>,
    /// Detections kept per image (per tile with --tile) [default: the Hub repo's, else 300].
    #[arg(long)]
    max_detections: Option<usize>,
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
    /// Tiled inference: run on overlapping SIZE×SIZE tiles and merge, for large images. With
    /// a DeepForest model, as its predict_tile(patch_size=SIZE) places and merges windows.
    #[arg(long, value_name = "SIZE")]
    tile: Option<u32>,
    /// Overlap of neighbouring tiles: a fraction below 1 (DeepForest's patch_overlap) or
    /// pixels from 1 up [default: 0.05 for DeepForest models, else 64 px].
    #[arg(long, value_name = "FRACTION|PX", requires = "tile")]
    overlap: Option<String>,
    /// How tiles are placed and merged: deepforest (predict_tile: windows column by column,
    /// boxes truncated to whole pixels, NMS across classes at --tile-iou) or grid (per-class
    /// NMS at --nms-threshold) [default: deepforest for DeepForest models, else grid].
    #[arg(long, value_enum, requires = "tile")]
    tiling: Option<TilingArg>,
    /// deepforest tiling: IoU above which a box is suppressed across windows (predict_tile's
    /// iou_threshold).
    #[arg(long, default_value_t = 0.15, requires = "tile")]
    tile_iou: f64,
    /// Write boxes as GeoJSON polygons in the rasters' CRS (georeferenced GeoTIFFs only).
    #[arg(long, value_name = "FILE")]
    geojson: Option<PathBuf>,
    /// Write DeepForest's CSV columns: xmin,ymin,xmax,ymax,label,score,image_path.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// One line per image on standard error.
    #[arg(long, short)]
    verbose: bool,
    /// Images, folders (their .jpg/.jpeg/.png files, any case) and glob patterns.
    #[arg(required_unless_present = "list_models")]
    images: Vec<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq)]
enum TilingArg {
    Deepforest,
    Grid,
}

/// How one run tiles.
enum Tiling {
    Grid(TileConfig),
    DeepForest(DeepForestTiling),
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
        let table = zoo::table(HubOptions::from_env().ok().as_ref());
        retinanet::io::atomic::write_stdout(table.as_bytes())?;
        return Ok(());
    }
    if let Some(t) = args.score_threshold.filter(|t| !(0.0..1.0).contains(t)) {
        bail!("--score-threshold must be in [0, 1), got {t}");
    }
    check_numbers(&args)?;
    let overlap = match &args.overlap {
        Some(text) => Some(Overlap::parse(text).context("--overlap")?),
        None => None,
    };
    let images = expand_inputs(&args.images)?;
    let annotated = match &args.out {
        Some(dir) => Some(output_paths(dir, &images)?),
        None => None,
    };
    let device = args.device.open()?;
    let (model, deepforest) = load_model(&args, &device)?;
    let tiling = match args.tile {
        Some(size) => Some(tiling(&args, size, overlap, deepforest)?),
        None => None,
    };
    let (mut geo, mut rows) = (Vec::new(), Vec::new());

    let bar = progress_bar(images.len());
    let mut staged = Staged::default();
    let (mut results, mut coco, mut summaries) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    for (index, path) in images.iter().enumerate() {
        bar.set_message(path.display().to_string());
        let t0 = Instant::now();
        let (detections, image, size, georef) = detect_one(&model, path, tiling.as_ref())
            .with_context(|| format!("detection failed on {}", path.display()))?;
        if args.csv.is_some() {
            rows.push((file_name(path), detections.clone()));
        }
        if args.geojson.is_some() {
            let georef = georef.with_context(|| {
                format!(
                    "--geojson: {} is not a georeferenced GeoTIFF",
                    path.display()
                )
            })?;
            geo.push((file_name(path), georef, detections.clone()));
        }
        if args.verbose {
            let ((w, h), n) = (size, detections.len());
            let s = t0.elapsed().as_secs_f64();
            bar.println(format!(
                "{}: {w}×{h}, {n} detections in {s:.2}s",
                path.display()
            ));
        }
        let mut summary = format!("{}: {} detections", path.display(), detections.len());
        if let Some(plan) = &annotated {
            let image = match image {
                Some(image) => image,
                None => GeoTiff::open(path)?.read_all()?,
            };
            let drawn = annotate(&image, &detections, &model, args.draw_threshold)?;
            staged.save_image(&plan[index], &drawn)?;
            let above = detections.iter().filter(|d| d.score >= args.draw_threshold);
            let (n, t, dest) = (above.count(), args.draw_threshold, plan[index].display());
            summary += &format!(", {n} ≥ {t} drawn → {dest}");
        }
        summaries.push(summary);
        let image_id = coco_image_id(path, index);
        coco.extend(detections.iter().map(|d| CocoResult::new(image_id, d)));
        results.push(ImageRecord::new(path, size, &detections, &model));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();

    let json = serde_json::to_string_pretty(&results)?;
    if let Some(out) = &args.geojson {
        let layers: Vec<GeoDetections> = geo
            .iter()
            .map(|(image, georef, dets)| GeoDetections {
                image: image.clone(),
                georef: *georef,
                detections: dets,
            })
            .collect();
        let collection = retinanet::geo::geojson(&layers, &model).context("--geojson")?;
        staged.write(out, serde_json::to_string(&collection)?.as_bytes())?;
    }
    if let Some(out) = &args.csv {
        staged.write(out, &retinanet::geo::deepforest_csv(&rows, &model)?)?;
    }
    if let Some(path) = &args.coco_results {
        staged.write(path, (serde_json::to_string(&coco)? + "\n").as_bytes())?;
    }
    let json_file = args.json.as_deref().filter(|p| *p != Path::new("-"));
    if let Some(path) = json_file {
        // Text files end with a newline (and `/dev/stdout` keeps the next line apart).
        staged.write(path, format!("{json}\n").as_bytes())?;
    }
    staged.commit()?;
    let asked_files = args.out.is_some()
        || json_file.is_some()
        || args.coco_results.is_some()
        || args.geojson.is_some()
        || args.csv.is_some();
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
    if let Some(t) = args.nms_threshold {
        check_unit(t, "--nms-threshold")?;
    }
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

/// The model, and whether it is DeepForest's (a Hub repo with config.json).
fn load_model(args: &Args, device: &candle_core::Device) -> Result<(RetinaNet, bool)> {
    let source = match &args.weights {
        Some(path) => ModelSource::File(path.clone()),
        None => zoo::resolve(&args.model).context("--model")?,
    };
    // Flags given win over a Hub repo's config.json, which wins over the defaults.
    let flags = |post: &mut PostProcessConfig| {
        post.score_thresh = args.score_threshold.unwrap_or(post.score_thresh);
        post.nms_thresh = args.nms_threshold.unwrap_or(post.nms_thresh);
        post.detections_per_img = args.max_detections.unwrap_or(post.detections_per_img);
    };
    let mut postprocess = PostProcessConfig::default();
    flags(&mut postprocess);
    let opts = LoadOptions {
        bn_eps: args.bn_eps,
        min_size: args.min_size,
        max_size: args.max_size,
        postprocess,
        precision: match args.precision {
            PrecisionArg::F32 => Precision::F32,
            PrecisionArg::Bf16 => Precision::Bf16,
        },
        kernels: args.kernels,
        ..Default::default()
    };
    let start = Instant::now();
    let what = source.describe();
    let (mut model, repo_config) = match source {
        ModelSource::File(_) => (
            source.load(device, &opts).context("cannot load weights")?,
            None,
        ),
        _ => source.load_with_config(device, &opts)?,
    };
    flags(&mut model.postprocess);
    if let Some(file) = &args.classes {
        let names = retinanet::classes::read_file(file).context("--classes")?;
        model
            .set_class_names(names)
            .with_context(|| format!("--classes {}", file.display()))?;
    }
    let (config, s) = (model.config().describe(), start.elapsed().as_secs_f64());
    eprintln!("loaded {what} ({config}) in {s:.2}s");
    Ok((model, repo_config.is_some()))
}

/// The tiling of this run: DeepForest's for its models unless --tiling says otherwise.
fn tiling(args: &Args, size: u32, overlap: Option<Overlap>, deepforest: bool) -> Result<Tiling> {
    let scheme = args.tiling.unwrap_or(match deepforest {
        true => TilingArg::Deepforest,
        false => TilingArg::Grid,
    });
    Ok(match scheme {
        TilingArg::Deepforest => Tiling::DeepForest(DeepForestTiling {
            patch_size: size,
            overlap: overlap.unwrap_or(Overlap::Fraction(0.05)),
            iou_threshold: args.tile_iou,
        }),
        TilingArg::Grid => {
            let px = overlap.unwrap_or(Overlap::Pixels(64)).pixels(size);
            let config = TileConfig::new(size, px);
            retinanet::tiling::tile_grid(1, 1, &config).context("--tile/--overlap")?;
            Tiling::Grid(config)
        }
    })
}

/// One image's result: detections, the image where it was decoded whole, its size and, for
/// a georeferenced GeoTIFF, where it lies.
type Detected = (
    Vec<Detection>,
    Option<RgbImage>,
    (u32, u32),
    Option<GeoReference>,
);

/// Detects in one image; a GeoTIFF under DeepForest's tiling is read window by window.
fn detect_one(model: &RetinaNet, path: &Path, tiling: Option<&Tiling>) -> Result<Detected> {
    if retinanet::geo::is_tiff(path) {
        let mut tiff = GeoTiff::open(path)?;
        let (size, georef) = (tiff.dimensions(), tiff.georeference().copied());
        if let Some(Tiling::DeepForest(t)) = tiling {
            let detections = detect_tiled_deepforest(model, &mut tiff, t)?;
            return Ok((detections, None, size, georef));
        }
        let image = tiff.read_all()?;
        let detections = detect_image(model, &image, tiling)?;
        return Ok((detections, Some(image), size, georef));
    }
    // Strict: a truncated or corrupt image is an error naming it.
    let image = retinanet::data::decode_rgb(path)?;
    let detections = detect_image(model, &image, tiling)?;
    let size = image.dimensions();
    Ok((detections, Some(image), size, None))
}

fn detect_image(
    model: &RetinaNet,
    image: &RgbImage,
    tiling: Option<&Tiling>,
) -> Result<Vec<Detection>> {
    Ok(match tiling {
        None => model.detect(image)?,
        Some(Tiling::Grid(t)) => detect_tiled(model, image, t)?,
        Some(Tiling::DeepForest(t)) => detect_tiled_deepforest(model, &mut &*image, t)?,
    })
}

/// The file name, as DeepForest's `image_path` column has it.
fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn progress_bar(len: usize) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    let template = "{bar:30} {pos}/{len} images, {per_sec}, eta {eta} {wide_msg}";
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar
}
