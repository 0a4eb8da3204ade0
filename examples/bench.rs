//! Times one job of the CPU benchmark and prints a JSON line; `scripts/bench.sh` runs it beside
//! torchvision (`scripts/bench_torchvision.py`) on the same weights, images and threads.
//!
//! ```text
//! RAYON_NUM_THREADS=2 cargo run --release --example bench -- --weights W --image I \
//!     [--mode detect|postprocess|matmul] [--min-size 800] [--max-size 1333] [--batch 1]
//! ```
//! `detect` times preprocess + network + post-processing for a batch of copies of the image;
//! `postprocess` the post-processing alone; `train` one SGD step (forward, losses, backward,
//! update; torchvision's default of 3 trainable backbone layers) on a batch of copies with two
//! boxes each; `matmul` a 2048³ f32 matrix product (the machine's gemm peak as Candle reaches
//! it). `peak_rss_mb` is the process's high-water mark.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::Parser;
use retinanet::device::DeviceChoice;
use retinanet::kernels::profile;
use retinanet::train::{LrSchedule, Start, Target, TrainConfig, Trainer};
use retinanet::{Checkpoint, Kernels, LoadOptions, RetinaNet, RetinaNetConfig, TransformConfig};

#[derive(Parser, Debug)]
struct Args {
    /// Checkpoint.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Image to detect on.
    #[arg(long)]
    image: Option<PathBuf>,
    /// What to time.
    #[arg(long, default_value = "detect")]
    mode: String,
    /// Short side after resizing.
    #[arg(long, default_value_t = 800)]
    min_size: usize,
    /// Upper bound on the long side.
    #[arg(long, default_value_t = 1333)]
    max_size: usize,
    /// Copies of the image per batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Products in bf16 (`detect` and `postprocess` modes; CPUs with AVX512-BF16).
    #[arg(long)]
    bf16: bool,
    /// Where to run: cpu (default), cuda, metal or auto.
    #[arg(long, default_value_t = DeviceChoice::Cpu)]
    device: DeviceChoice,
    /// Weights' and activations' data type (`detect`, `postprocess`): f32, f16 or bf16 (on
    /// a GPU; the CPU kernels run f32, see --bf16).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// native (this crate's CPU kernels) or candle (Candle's ops, the GPU path).
    #[arg(long, default_value_t = Kernels::Native)]
    kernels: Kernels,
    /// Also record the time of each convolution shape and network stage over the timed runs
    /// (`profile` in the JSON line, and a table on standard error).
    #[arg(long)]
    profile: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The process's peak resident set (VmHWM), in MB.
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Times `f` on `device`, waiting for the device's queued work after each run (GPU ops are
/// asynchronous).
fn time_runs(args: &Args, device: &Device, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    for _ in 0..args.warmup {
        f()?;
        device.synchronize()?;
    }
    if args.profile {
        profile::enable();
    }
    (0..args.runs)
        .map(|_| {
            let t = Instant::now();
            f()?;
            device.synchronize()?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        })
        .collect()
}

/// Boxes shared with `scripts/bench_torchvision.py`: two objects in the image's own pixels.
fn bench_targets(width: f32, height: f32, n: usize) -> Vec<Target> {
    (0..n)
        .map(|i| Target {
            id: format!("copy{i}"),
            boxes: vec![
                [0.1 * width, 0.2 * height, 0.45 * width, 0.9 * height],
                [0.5 * width, 0.1 * height, 0.95 * width, 0.6 * height],
            ],
            labels: vec![1, 3],
        })
        .collect()
}

/// What [`profile`] recorded over `runs` runs, slowest first, as JSON rows (also printed as a
/// table on standard error).
fn profile_report(runs: usize) -> serde_json::Value {
    let mut rows: Vec<_> = profile::snapshot().into_iter().collect();
    rows.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
    let per_run = |e: &profile::Entry| e.seconds * 1e3 / runs.max(1) as f64;
    let conv_ms: f64 = rows
        .iter()
        .filter(|(name, _)| name.starts_with("conv"))
        .map(|(_, e)| per_run(e))
        .sum();
    eprintln!("| what | calls/run | ms/run | GMAC/s |\n|---|---|---|---|");
    for (name, e) in &rows {
        let rate = e.macs / e.seconds.max(1e-12) / 1e9;
        let calls = e.calls as f64 / runs.max(1) as f64;
        eprintln!("| {name} | {calls} | {:.1} | {rate:.0} |", per_run(e));
    }
    eprintln!("| all convolutions | | {conv_ms:.1} | |");
    serde_json::Value::Array(
        rows.iter()
            .map(|(name, e)| {
                serde_json::json!({
                    "name": name,
                    "calls": e.calls as f64 / runs.max(1) as f64,
                    "ms": per_run(e),
                    "gmacs": e.macs / runs.max(1) as f64 / 1e9,
                })
            })
            .collect(),
    )
}

fn time_train(args: &Args, device: &Device) -> Result<Vec<f64>> {
    let weights = args.weights.as_ref().context("--weights is required")?;
    let path = args.image.as_ref().context("--image is required")?;
    let mut config = RetinaNetConfig::infer(&Checkpoint::open(weights)?)?;
    config.bn_eps = 0.0;
    // A small rate: the fixture's random weights diverge within three steps at 0.01, and a
    // diverged step stops before its backward (the timing would then be of less work).
    let mut tc = TrainConfig::for_model(&config, LrSchedule::constant(1e-4, 1000));
    tc.trainable_backbone_layers = 3;
    tc.kernels = args.kernels;
    let start = Start::RetinaNet(weights.clone());
    let (mut trainer, _) = Trainer::new(&config, &start, tc, device)?;
    trainer.model_mut().transform = TransformConfig {
        min_size: args.min_size,
        max_size: args.max_size,
        ..Default::default()
    };
    let image = image::open(path)?.to_rgb8();
    let targets = bench_targets(image.width() as f32, image.height() as f32, args.batch);
    let images = vec![image; args.batch];
    time_runs(args, device, || {
        trainer.step(&images, &targets)?;
        Ok(())
    })
}

fn main() -> Result<()> {
    retinanet::device::one_candle_pool_thread();
    let args = Args::parse();
    let device = args.device.open()?;
    let dtype = match args.dtype.as_str() {
        "f32" => candle_core::DType::F32,
        "f16" => candle_core::DType::F16,
        "bf16" => candle_core::DType::BF16,
        d => anyhow::bail!("--dtype {d}: expected f32, f16 or bf16"),
    };
    let times = if args.mode == "train" {
        time_train(&args, &device)?
    } else if args.mode == "matmul" {
        let a = Tensor::randn(0f32, 1.0, (2048, 2048), &device)?;
        let b = Tensor::randn(0f32, 1.0, (2048, 2048), &device)?;
        time_runs(&args, &device, || {
            a.matmul(&b)?;
            Ok(())
        })?
    } else {
        let weights = args.weights.as_ref().context("--weights is required")?;
        let path = args.image.as_ref().context("--image is required")?;
        let opts = LoadOptions {
            transform: TransformConfig {
                min_size: args.min_size,
                max_size: args.max_size,
                ..Default::default()
            },
            precision: if args.bf16 {
                retinanet::Precision::Bf16
            } else {
                retinanet::Precision::F32
            },
            dtype,
            kernels: args.kernels,
            ..Default::default()
        };
        let model = RetinaNet::load_with(weights, &device, &opts)?;
        let image = image::open(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .to_rgb8();
        let images = vec![image; args.batch];
        match args.mode.as_str() {
            "detect" => time_runs(&args, &device, || {
                model.detect_batch(&images)?;
                Ok(())
            })?,
            "postprocess" => {
                let batch = model.preprocess(&images)?;
                let raw = model.forward_raw(&batch)?;
                time_runs(&args, &device, || {
                    model.postprocess(&raw, &batch)?;
                    Ok(())
                })?
            }
            m => anyhow::bail!("unknown --mode {m}"),
        }
    };
    let profile = args.profile.then(|| profile_report(args.runs));
    println!(
        "{}",
        serde_json::json!({
            "profile": profile,
            "impl": if args.bf16 { "retinanet-bf16" } else { "retinanet" },
            "device": retinanet::device::name(&device),
            "dtype": args.dtype,
            "kernels": args.kernels.name(),
            "mode": args.mode,
            "batch": args.batch,
            "min_size": args.min_size,
            "ms_median": median(times.clone()),
            "ms_all": times,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}
