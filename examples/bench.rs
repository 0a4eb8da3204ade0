//! Times `detect` on one image: median milliseconds over several runs after a warm-up.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release --example bench -- --weights W --image I
//! ```
//! Prints one JSON line; `scripts/bench.sh` runs it beside torchvision.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Parser;
use retinanet::{LoadOptions, RetinaNet};

#[derive(Parser, Debug)]
struct Args {
    /// Checkpoint.
    #[arg(long)]
    weights: PathBuf,
    /// Image to detect on.
    #[arg(long)]
    image: PathBuf,
    /// Timed runs.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let model = RetinaNet::load_with(&args.weights, &Device::Cpu, &LoadOptions::default())?;
    let image = image::open(&args.image)
        .with_context(|| format!("cannot read {}", args.image.display()))?
        .to_rgb8();
    let detect = || -> Result<(f64, f64, f64, usize)> {
        let t0 = Instant::now();
        let batch = model.preprocess(std::slice::from_ref(&image))?;
        let raw = model.forward_raw(&batch)?;
        let t1 = Instant::now();
        let dets = model.postprocess(&raw, &batch)?;
        let t2 = Instant::now();
        let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
        Ok((ms(t0, t2), ms(t0, t1), ms(t1, t2), dets[0].len()))
    };
    for _ in 0..args.warmup {
        detect()?;
    }
    let mut runs = Vec::with_capacity(args.runs);
    for _ in 0..args.runs {
        runs.push(detect()?);
    }
    let median = |f: fn(&(f64, f64, f64, usize)) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{}",
        serde_json::json!({
            "impl": "retinanet (candle)",
            "ms_median": median(|r| r.0),
            "ms_network_median": median(|r| r.1),
            "ms_postprocess_median": median(|r| r.2),
            "ms_all": runs.iter().map(|r| r.0).collect::<Vec<_>>(),
            "detections": runs[0].3,
        })
    );
    Ok(())
}
