//! Detect objects in images with a zoo model or a checkpoint file.
//!
//! ```text
//! cargo run --release --example detect -- photo.jpg                      # COCO, downloaded once
//! cargo run --release --example detect -- --model retinanet_resnet50_fpn_v2_coco --out annotated/ photos/
//! cargo run --release --example detect -- --weights trees.safetensors --tile 800 --overlap 128 'aerial/*.png'
//! ```
//!
//! Prints (or writes with `--json`) one object per image, in argument order:
//! `{"image", "width", "height", "detections": [{"box", "score", "label", "class"}]}`;
//! `--coco-results` writes COCO's results format, `--out` annotated images.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ab_glyph::{Font, FontRef, PxScale, ScaleFont};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use clap::{Parser, ValueEnum};
use image::{Rgb, RgbImage};
use indicatif::{ProgressBar, ProgressStyle};
use retinanet::kernels::Precision;
use retinanet::io::hub::{write_atomic, HubOptions};
use retinanet::tiling::{detect_tiled, TileConfig};
use retinanet::{zoo, Detection, LoadOptions, PostProcessConfig, RetinaNet, TransformConfig};
use serde::Serialize;

/// DejaVu Sans Mono Bold (Bitstream Vera licence, see `assets/fonts/LICENSE-DejaVu.txt`).
const FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSansMono-Bold.ttf");

/// Extensions picked from folders.
const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png"];

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
    /// Where to run: auto picks CUDA, then Metal, then the CPU.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
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
    /// Write the JSON here instead of standard output.
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
    /// Images, folders (their .jpg/.jpeg/.png files) and glob patterns.
    #[arg(required_unless_present = "list_models")]
    images: Vec<String>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum PrecisionArg {
    F32,
    Bf16,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
    Metal,
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

#[derive(Serialize)]
struct CocoResult {
    image_id: u64,
    category_id: usize,
    bbox: [f32; 4],
    score: f32,
}

fn main() {
    retinanet::device::one_candle_pool_thread();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    if args.list_models {
        list_models();
        return Ok(());
    }
    if !(0.0..1.0).contains(&args.score_threshold) {
        bail!(
            "--score-threshold must be in [0, 1), got {}",
            args.score_threshold
        );
    }
    let tiling = args.tile.map(|size| TileConfig::new(size, args.overlap));
    if let Some(t) = &tiling {
        retinanet::tiling::tile_grid(1, 1, t).context("--tile/--overlap")?;
    }
    let images = expand_inputs(&args.images)?;
    let staged_out = match &args.out {
        Some(dir) => Some(plan_outputs(dir, &images)?),
        None => None,
    };
    let device = select_device(args.device)?;
    let mut model = load_model(&args, &device)?;
    if let Some(file) = &args.classes {
        let names = read_classes(file)?;
        model
            .set_class_names(names)
            .with_context(|| format!("--classes {}", file.display()))?;
    }

    let bar = progress_bar(images.len());
    let font = FontRef::try_from_slice(FONT).context("bundled font")?;
    let mut staged = Staged::default();
    let mut results = Vec::with_capacity(images.len());
    let mut coco = Vec::new();
    let start = Instant::now();
    for (index, path) in images.iter().enumerate() {
        bar.set_message(path.display().to_string());
        let image = image::open(path)
            .with_context(|| format!("cannot read image {}", path.display()))?
            .to_rgb8();
        let t0 = Instant::now();
        let detections = match &tiling {
            Some(t) => detect_tiled(&model, &image, t),
            None => model.detect(&image),
        }
        .with_context(|| format!("detection failed on {}", path.display()))?;
        if args.verbose {
            bar.println(format!(
                "{}: {}×{}, {} detections in {:.2}s",
                path.display(),
                image.width(),
                image.height(),
                detections.len(),
                t0.elapsed().as_secs_f64()
            ));
        }
        if let Some(plan) = &staged_out {
            let annotated = annotate(&image, &detections, &model, args.draw_threshold, &font);
            staged.save(&annotated, &plan[index])?;
        }
        let image_id = coco_image_id(path, index);
        coco.extend(detections.iter().map(|d| CocoResult {
            image_id,
            category_id: d.label,
            bbox: [
                d.bbox[0],
                d.bbox[1],
                d.bbox[2] - d.bbox[0],
                d.bbox[3] - d.bbox[1],
            ],
            score: d.score,
        }));
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
        bar.inc(1);
    }
    bar.finish_and_clear();
    let elapsed = start.elapsed().as_secs_f64();

    let json = serde_json::to_string_pretty(&results)?;
    if let Some(path) = &args.coco_results {
        write_atomic(path, serde_json::to_string(&coco)?.as_bytes())?;
    }
    match &args.json {
        Some(path) => write_atomic(path, json.as_bytes())?,
        None => println!("{json}"),
    }
    staged.commit()?;
    let total: usize = results.iter().map(|r| r.detections.len()).sum();
    eprintln!(
        "{} image(s), {total} detections in {elapsed:.2}s ({:.2} images/s) on {}",
        results.len(),
        results.len() as f64 / elapsed.max(1e-9),
        retinanet::device::name(&device)
    );
    Ok(())
}

fn list_models() {
    println!(
        "{:<32} {:<40} {:<28} source",
        "name", "architecture", "accuracy"
    );
    let hub = HubOptions::from_env().ok();
    for e in zoo::ZOO {
        let url = hub
            .as_ref()
            .map_or_else(|| format!("{:?}", e.source), |h| e.url(h));
        println!(
            "{:<32} {:<40} {:<28} {url}",
            e.name,
            e.architecture.describe(),
            format!("{} {}", e.accuracy.metric, e.accuracy.value)
        );
    }
}

/// Files as given, folders' image files (sorted) and glob matches (sorted).
fn expand_inputs(args: &[String]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for arg in args {
        let path = Path::new(arg);
        if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("cannot list folder {arg}"))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && has_image_extension(p))
                .collect();
            if files.is_empty() {
                bail!(
                    "folder {arg} holds no images ({})",
                    IMAGE_EXTENSIONS.join(", ")
                );
            }
            files.sort();
            out.extend(files);
        } else if path.exists() {
            out.push(path.to_path_buf());
        } else if arg.contains(['*', '?', '[']) {
            let files: Vec<PathBuf> = glob::glob(arg)
                .with_context(|| format!("bad pattern {arg}"))?
                .filter_map(|p| p.ok())
                .filter(|p| p.is_file())
                .collect();
            if files.is_empty() {
                bail!("pattern {arg} matches no files");
            }
            out.extend(files);
        } else {
            bail!("cannot read image {arg}: no such file or folder");
        }
    }
    Ok(out)
}

fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// The annotated image's path for each input, refusing collisions and overwriting inputs.
fn plan_outputs(dir: &Path, images: &[PathBuf]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create --out {}", dir.display()))?;
    let mut seen: HashMap<PathBuf, &Path> = HashMap::new();
    let mut out = Vec::with_capacity(images.len());
    for image in images {
        let name = image
            .file_name()
            .with_context(|| format!("{} has no file name", image.display()))?;
        let dest = dir.join(name);
        if let Some(other) = seen.insert(dest.clone(), image) {
            bail!(
                "--out: {} and {} would both be written to {}",
                other.display(),
                image.display(),
                dest.display()
            );
        }
        if let (Ok(a), Ok(b)) = (dest.canonicalize(), image.canonicalize()) {
            if a == b {
                bail!("--out: {} would overwrite the input image", dest.display());
            }
        }
        image::ImageFormat::from_path(&dest)
            .with_context(|| format!("--out: no encoder for {}", dest.display()))?;
        out.push(dest);
    }
    Ok(out)
}

/// Annotated images written to temporary files beside their destination, renamed into
/// place only once every image succeeded; removed otherwise.
#[derive(Default)]
struct Staged {
    files: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    fn save(&mut self, image: &RgbImage, dest: &Path) -> Result<()> {
        let name = dest.file_name().unwrap_or_default().to_string_lossy();
        let tmp = dest.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
        let format = image::ImageFormat::from_path(dest)?;
        // Registered before writing, so a failed write is cleaned up too.
        self.files.push((tmp.clone(), dest.to_path_buf()));
        image
            .save_with_format(&tmp, format)
            .with_context(|| format!("cannot write {}", dest.display()))
    }

    fn commit(mut self) -> Result<()> {
        for (tmp, dest) in std::mem::take(&mut self.files) {
            std::fs::rename(&tmp, &dest)
                .with_context(|| format!("cannot write {}", dest.display()))?;
        }
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (tmp, _) in &self.files {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

fn select_device(arg: DeviceArg) -> Result<Device> {
    use retinanet::device::DeviceChoice;
    let choice = match arg {
        DeviceArg::Auto => DeviceChoice::Auto,
        DeviceArg::Cpu => DeviceChoice::Cpu,
        DeviceArg::Cuda => DeviceChoice::Cuda,
        DeviceArg::Metal => DeviceChoice::Metal,
    };
    let flag = format!("--device {arg:?}").to_lowercase();
    retinanet::device::select(choice).with_context(|| flag)
}

/// The input size: the flags, else what a checkpoint trained at, else torchvision's 800/1333.
fn input_size(args: &Args) -> Result<(usize, usize)> {
    let trained = match &args.weights {
        Some(path) if args.min_size.is_none() || args.max_size.is_none() => {
            retinanet::Checkpoint::open(path)
                .and_then(|c| c.input_size())
                .with_context(|| format!("cannot load weights {}", path.display()))?
        }
        _ => None,
    };
    let (min, max) = trained.unwrap_or((800, 1333));
    Ok((args.min_size.unwrap_or(min), args.max_size.unwrap_or(max)))
}

fn load_model(args: &Args, device: &Device) -> Result<RetinaNet> {
    let (min_size, max_size) = input_size(args)?;
    let opts = LoadOptions {
        bn_eps: args.bn_eps,
        transform: TransformConfig {
            min_size,
            max_size,
            ..Default::default()
        },
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
    let (model, what) = match &args.weights {
        Some(path) => {
            let model = RetinaNet::load_with(path, device, &opts)
                .with_context(|| format!("cannot load weights {}", path.display()))?;
            (model, path.display().to_string())
        }
        None if args.model.starts_with("hf:") => {
            let hub = HubOptions::from_env()?;
            let (repo, revision, file) = parse_hf(&args.model)?;
            let path = retinanet::io::hub::fetch_hf(repo, revision, file, None, &hub).map_err(|e| {
                anyhow!(
                    "cannot get {}: {e}\nhint: download it by other means and pass --weights FILE",
                    args.model
                )
            })?;
            let model = RetinaNet::load_with(&path, device, &opts).with_context(|| {
                format!("cannot load weights {} ({})", path.display(), args.model)
            })?;
            (model, args.model.clone())
        }
        None => {
            let entry = zoo::find(&args.model)?;
            let hub = HubOptions::from_env()?;
            let model = entry.load(device, &opts, &hub).map_err(|e| {
                anyhow!(
                    "cannot load model {}: {e}\nhint: download {} by other means and pass \
                     --weights FILE (HF_HUB_OFFLINE=1 uses only the cache)",
                    entry.name,
                    entry.url(&hub)
                )
            })?;
            (model, entry.name.to_string())
        }
    };
    eprintln!(
        "loaded {what} ({}) in {:.2}s",
        model.config().describe(),
        start.elapsed().as_secs_f64()
    );
    Ok(model)
}

/// `hf:OWNER/NAME/FILE[@REVISION]` → (`OWNER/NAME`, revision, `FILE`).
fn parse_hf(spec: &str) -> Result<(&str, &str, &str)> {
    let rest = spec.trim_start_matches("hf:");
    let (rest, revision) = rest.rsplit_once('@').unwrap_or((rest, "main"));
    let mut parts = rest.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(owner), Some(name), Some(file))
            if !owner.is_empty()
                && !name.is_empty()
                && !file.is_empty()
                && !revision.is_empty() =>
        {
            Ok((&rest[..owner.len() + 1 + name.len()], revision, file))
        }
        _ => bail!("--model {spec}: expected hf:OWNER/NAME/FILE[@REVISION]"),
    }
}

/// A JSON array of names, or one name per line.
fn read_classes(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read --classes {}", path.display()))?;
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(&text)
            .with_context(|| format!("--classes {}: not a JSON array of strings", path.display()));
    }
    let names: Vec<String> = text
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect();
    if names.iter().all(|n| n.trim().is_empty()) {
        bail!("--classes {}: no class names", path.display());
    }
    Ok(names)
}

/// COCO's image id: the numeric file stem (`000000397133.jpg` → 397133), else the index.
fn coco_image_id(path: &Path, index: usize) -> u64 {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or(index as u64)
}

fn progress_bar(len: usize) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:30} {pos}/{len} images, {per_sec}, eta {eta} {wide_msg}")
    {
        bar.set_style(style);
    }
    bar
}

/// A bright colour per class: hues spaced by the golden ratio.
fn class_colour(label: usize) -> Rgb<u8> {
    let h = (label as f32 * 0.618_034).fract() * 6.0;
    let (s, v) = (0.85f32, 0.95f32);
    let c = v * s;
    let x = c * (1.0 - (h % 2.0 - 1.0).abs());
    let (r, g, b) = match h as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    Rgb([r, g, b].map(|u| ((u + m) * 255.0).round() as u8))
}

fn fill_rect(img: &mut RgbImage, x0: i64, y0: i64, x1: i64, y1: i64, colour: Rgb<u8>) {
    let (w, h) = (img.width() as i64, img.height() as i64);
    for y in y0.max(0)..y1.min(h) {
        for x in x0.max(0)..x1.min(w) {
            img.put_pixel(x as u32, y as u32, colour);
        }
    }
}

/// Draws `text` with its top-left corner at (x, y), blending by glyph coverage.
fn draw_text(
    img: &mut RgbImage,
    font: &FontRef,
    px: f32,
    x: f32,
    y: f32,
    text: &str,
    colour: Rgb<u8>,
) {
    let scaled = font.as_scaled(PxScale::from(px));
    let mut caret = x;
    for c in text.chars() {
        let id = scaled.glyph_id(c);
        let glyph = id.with_scale_and_position(px, ab_glyph::point(caret, y + scaled.ascent()));
        caret += scaled.h_advance(id);
        let Some(outline) = font.outline_glyph(glyph) else {
            continue;
        };
        let b = outline.px_bounds();
        outline.draw(|gx, gy, coverage| {
            let (px_x, px_y) = (b.min.x as i64 + gx as i64, b.min.y as i64 + gy as i64);
            if px_x < 0 || px_y < 0 || px_x >= img.width() as i64 || px_y >= img.height() as i64 {
                return;
            }
            let p = img.get_pixel_mut(px_x as u32, px_y as u32);
            for k in 0..3 {
                let blended = p[k] as f32 * (1.0 - coverage) + colour[k] as f32 * coverage;
                p[k] = blended.round() as u8;
            }
        });
    }
}

fn text_size(font: &FontRef, px: f32, text: &str) -> (f32, f32) {
    let scaled = font.as_scaled(PxScale::from(px));
    let width = text
        .chars()
        .map(|c| scaled.h_advance(scaled.glyph_id(c)))
        .sum();
    (width, scaled.ascent() - scaled.descent())
}

/// Boxes with class name and score, a colour per class, best detections drawn last (on top).
fn annotate(
    image: &RgbImage,
    detections: &[Detection],
    model: &RetinaNet,
    threshold: f32,
    font: &FontRef,
) -> RgbImage {
    let mut img = image.clone();
    let short = image.width().min(image.height()) as f32;
    let thickness = (short / 320.0).round().max(1.0) as i64;
    let px = (short / 40.0).clamp(11.0, 40.0);
    for d in detections.iter().filter(|d| d.score >= threshold).rev() {
        let colour = class_colour(d.label);
        let [x0, y0, x1, y1] = d.bbox.map(|v| v.round() as i64);
        fill_rect(&mut img, x0, y0, x1, y0 + thickness, colour);
        fill_rect(&mut img, x0, y1 - thickness, x1, y1, colour);
        fill_rect(&mut img, x0, y0, x0 + thickness, y1, colour);
        fill_rect(&mut img, x1 - thickness, y0, x1, y1, colour);

        let name = model
            .class_name(d.label)
            .map_or_else(|| format!("#{}", d.label), str::to_string);
        let text = format!("{name} {:.2}", d.score);
        let (tw, th) = text_size(font, px, &text);
        let pad = (px / 6.0).ceil();
        let (bw, bh) = ((tw + 2.0 * pad).ceil() as i64, (th + pad).ceil() as i64);
        // Above the box, or inside it at the top edge of the image.
        let ty = if y0 - bh >= 0 { y0 - bh } else { y0 };
        let tx = x0.min(img.width() as i64 - bw).max(0);
        fill_rect(&mut img, tx, ty, tx + bw, ty + bh, colour);
        let luma = 0.299 * colour[0] as f32 + 0.587 * colour[1] as f32 + 0.114 * colour[2] as f32;
        let ink = if luma > 140.0 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        };
        draw_text(
            &mut img,
            font,
            px,
            tx as f32 + pad,
            ty as f32 + pad / 2.0,
            &text,
            ink,
        );
    }
    img
}
