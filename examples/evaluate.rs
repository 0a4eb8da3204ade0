//! COCO box evaluation of a results file, printed as pycocotools prints it.
//!
//! ```text
//! cargo run --release --example evaluate -- --annotations GT.json --detections DETS.json \
//!     [--json STATS.json] [--plot PR.png]
//! ```

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use plotters::prelude::*;
use retinanet::eval::{
    detections_from_json_file, evaluate, format_per_class, format_summary, iou_index, AreaRange,
    Evaluation, GroundTruth, PrCurve,
};

/// Evaluates COCO-format detections against COCO ground truth (bbox, as pycocotools).
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// COCO ground-truth JSON (images, annotations, categories).
    #[arg(long)]
    annotations: PathBuf,
    /// COCO results JSON: [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}].
    #[arg(long)]
    detections: PathBuf,
    /// Write the 12 summary numbers to this JSON file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Draw the class-averaged PR curves at IoU 0.50 and 0.75 (area all, maxDets 100) to this PNG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn main() {
    retinanet::device::one_candle_pool_thread();
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let start = Instant::now();
    let gt = GroundTruth::from_json_file(&args.annotations)
        .with_context(|| format!("loading ground truth {}", args.annotations.display()))?;
    let dets = detections_from_json_file(&args.detections)
        .with_context(|| format!("loading detections {}", args.detections.display()))?;
    let loaded = start.elapsed();
    let start = Instant::now();
    let eval = evaluate(&gt, &dets).with_context(|| {
        format!(
            "evaluating {} against {}",
            args.detections.display(),
            args.annotations.display()
        )
    })?;
    let evaluated = start.elapsed();
    eprintln!(
        "{} images, {} annotations, {} detections: loaded in {:.2}s, evaluated in {:.2}s",
        gt.images().len(),
        gt.annotations().len(),
        dets.len(),
        loaded.as_secs_f64(),
        evaluated.as_secs_f64()
    );
    print!("{}", format_summary(eval.summary()));
    println!();
    print!("{}", format_per_class(&eval.per_class()));
    if let Some(path) = &args.json {
        write_stats(&eval, path)?;
    }
    if let Some(path) = &args.plot {
        plot_curves(&eval, path)?;
    }
    Ok(())
}

/// Writes the summary as `{"AP": …, …, "ARl": …}` through a temporary file and a rename.
fn write_stats(eval: &Evaluation, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(eval.summary())? + "\n";
    write_atomically(path, |tmp| {
        fs::write(tmp, &text).with_context(|| format!("writing {}", tmp.display()))
    })
}

/// Runs `write` on a temporary path beside `path`, then renames it over `path`, so that
/// readers never see a half-written file.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = path.with_file_name(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write(&tmp).and_then(|()| {
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Class-averaged PR curves at IoU 0.50 and 0.75, area all, maxDets 100, as a PNG.
fn plot_curves(eval: &Evaluation, path: &Path) -> Result<()> {
    let mut curves = Vec::new();
    for (threshold, color) in [(0.5, BLUE), (0.75, RED)] {
        let t = iou_index(threshold).context("IoU threshold")?;
        if let Some(curve) = eval.mean_pr_curve(t, AreaRange::All, 100)? {
            curves.push((curve, color));
        }
    }
    if curves.is_empty() {
        anyhow::bail!(
            "cannot plot {}: no category has ground truth",
            path.display()
        );
    }
    write_atomically(path, |tmp| {
        draw(&curves, tmp).map_err(|e| anyhow::anyhow!("drawing {}: {e}", tmp.display()))
    })
}

/// Renders into an RGB buffer (the `bitmap_backend` feature has no file encoder) and saves it
/// as PNG with the `image` crate.
fn draw(curves: &[(PrCurve, RGBColor)], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let (width, height) = (800u32, 600u32);
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    render(curves, &mut pixels, (width, height))?;
    image::save_buffer_with_format(
        path,
        &pixels,
        width,
        height,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )?;
    Ok(())
}

fn render(
    curves: &[(PrCurve, RGBColor)],
    pixels: &mut [u8],
    size: (u32, u32),
) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(pixels, size).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Precision-recall (all categories averaged, area all, maxDets 100)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..1.05f64)?;
    chart
        .configure_mesh()
        .x_desc("recall")
        .y_desc("precision")
        .draw()?;
    for (curve, color) in curves {
        let points = curve
            .recall
            .iter()
            .copied()
            .zip(curve.precision.iter().copied());
        let ap = curve.precision.iter().sum::<f64>() / curve.precision.len() as f64;
        let label = format!("IoU={:.2} (AP {ap:.3})", curve.iou_threshold);
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(points, style))?
            .label(label)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
