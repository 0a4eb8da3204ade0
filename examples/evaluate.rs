//! COCO box evaluation of a results file, printed as pycocotools prints it.
//!
//! ```text
//! cargo run --release --example evaluate -- --annotations GT.json --detections DETS.json \
//!     [--json STATS.json] [--plot PR.png]
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
// Each example draws only its own chart.
#[allow(dead_code)]
#[path = "common/plot.rs"]
mod plot;

use retinanet::eval::{
    detections_from_json_file, evaluate, format_per_class, format_summary, Evaluation, GroundTruth,
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
    match run(&args) {
        // `evaluate … | head`: the reader has all it wants.
        Err(e) if retinanet::io::atomic::is_broken_pipe(e.as_ref()) => {}
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
        Ok(()) => {}
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
    let printout = format!(
        "{}\n{}",
        format_summary(eval.summary()),
        format_per_class(&eval.per_class())
    );
    // Errors, not panics: a full disk exits 1 with a message, a closed pipe quietly.
    retinanet::io::atomic::write_stdout(printout.as_bytes())?;
    if let Some(path) = &args.json {
        write_stats(&eval, path)?;
    }
    if let Some(path) = &args.plot {
        plot::pr_curves(&eval, path)?;
    }
    Ok(())
}

/// Writes the summary as `{"AP": …, …, "ARl": …}`, atomically.
fn write_stats(eval: &Evaluation, path: &Path) -> Result<()> {
    let text = serde_json::to_string_pretty(eval.summary())? + "\n";
    retinanet::io::atomic::write_atomic(path, text.as_bytes())?;
    Ok(())
}
