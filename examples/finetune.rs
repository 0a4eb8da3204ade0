//! Fine-tune (or train from scratch) a RetinaNet on a COCO, VOC, YOLO or CSV dataset.
//!
//! ```text
//! cargo run --release --example finetune -- --data ../shared/data/bccd --train-split train \
//!     --val-split val --model resnet50_imagenet1k_v2 --epochs 12 --min-size 480 --max-size 640 --out runs/bccd
//! cargo run --release --example finetune -- --data trees/train --val trees/val \
//!     --weights init.safetensors --tile 400 --overlap 64 --min-size 400 --max-size 400 --steps 300 --out runs/trees
//! cargo run --release --example finetune -- ... --out runs/trees --resume    # continue the run
//! ```
//!
//! Writes into `--out`: `metrics.jsonl` (one line per logged step, naming the samples it
//! trained on and which were flipped, and one per validation),
//! `loss.png`, `last.safetensors` (checkpoint with the optimiser state in the same file, for
//! `--resume`),
//! `final.safetensors` (loads in `detect` unchanged; with `--f16` also `final.f16.safetensors`)
//! and `run.json` (the settings, which `--resume` checks). Every file is written atomically.

// Each example draws only its own chart.
#[allow(dead_code)]
#[path = "common/plot.rs"]
mod plot;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use retinanet::data::{Dataset, Format, Loader, LoaderConfig, TileConfig};
use retinanet::device::{self, DeviceChoice};
use retinanet::io::hub::HubOptions;
use retinanet::io::hub_repo::{self, RepoConfig};
use retinanet::tiling;
use retinanet::train::run::{self, Choices, Event, Init, LoopConfig, Metrics, RunConfig};
use retinanet::train::{BackboneNorm, BoxLoss, LossConfig, LrSchedule, Trainer};
use retinanet::{Kernels, ModelSource};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(about = "Fine-tune a RetinaNet on a detection dataset")]
struct Args {
    /// Training data: a COCO .json, a .csv, a VOC or a YOLO folder.
    #[arg(long)]
    data: PathBuf,
    /// Annotation format (default: detected).
    #[arg(long)]
    format: Option<Format>,
    /// Split of --data to train on (VOC ImageSets list or split subfolder).
    #[arg(long)]
    train_split: Option<String>,
    /// Validation data (same formats); its classes follow the training set's.
    #[arg(long, conflicts_with = "val_split")]
    val: Option<PathBuf>,
    /// Validate on this split of --data instead.
    #[arg(long)]
    val_split: Option<String>,
    /// Start from a zoo model (a detector or an ImageNet backbone, see `detect --list-models`)
    /// or a Hugging Face Hub repo, `hf:OWNER/NAME[@REVISION]`; from a DeepForest model with
    /// another class count both heads are new, as DeepForest's `_adjust_classes` makes them.
    #[arg(long, conflicts_with_all = ["weights", "from_scratch"])]
    model: Option<String>,
    /// Start from a RetinaNet checkpoint or an ImageNet ResNet checkpoint.
    #[arg(long, conflicts_with = "from_scratch")]
    weights: Option<PathBuf>,
    /// Start from random weights, as torchvision without weights: batch norm trains with
    /// batch statistics and all 5 backbone stages train (see --batch-norm, --trainable-layers).
    #[arg(long)]
    from_scratch: bool,
    /// ResNet depth with --from-scratch.
    #[arg(long, default_value_t = 50)]
    depth: usize,
    /// Number of classes (default: the dataset's).
    #[arg(long)]
    num_classes: Option<usize>,
    /// Passes over the training set (default 12, the paper's length on COCO).
    #[arg(long, conflicts_with = "steps")]
    epochs: Option<f64>,
    /// Training steps instead of epochs.
    #[arg(long)]
    steps: Option<usize>,
    /// Images per step.
    #[arg(long, default_value_t = 2)]
    batch_size: usize,
    /// Base learning rate (default: the paper's 0.01 at batch 16, scaled to the batch).
    #[arg(long)]
    lr: Option<f64>,
    /// Clip the joint gradient norm to this (against early divergence from weak weights).
    #[arg(long)]
    clip_grad_norm: Option<f64>,
    /// Backbone stages that train, from the top, at most 5 (default 3; 5 with --from-scratch).
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=5))]
    trainable_layers: Option<u64>,
    /// Backbone batch norm: frozen (default with pretrained weights) or trained with batch
    /// statistics and running statistics (default with --from-scratch).
    #[arg(long, value_enum)]
    batch_norm: Option<NormArg>,
    /// Short side after resizing.
    #[arg(long, default_value_t = 800)]
    min_size: usize,
    /// Upper bound on the long side after resizing.
    #[arg(long, default_value_t = 1333)]
    max_size: usize,
    /// Train on overlapping SIZE×SIZE tiles of the images (and validate tiled).
    #[arg(long, value_name = "SIZE")]
    tile: Option<u32>,
    /// Pixels shared by neighbouring tiles.
    #[arg(long, value_name = "PX", default_value_t = 64, requires = "tile")]
    overlap: u32,
    /// Box regression loss (default: torchvision's, l1 for v1 and giou for v2; smooth-l1 is
    /// the paper's, β = 0.11).
    #[arg(long, value_enum)]
    box_loss: Option<BoxLossArg>,
    /// Probability of a horizontal flip.
    #[arg(long, default_value_t = 0.5)]
    hflip: f32,
    /// Seed of initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to train: auto (CUDA, then Metal, then the CPU), cpu, cuda or metal.
    #[arg(long, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// The layers' implementation on the CPU: native (this crate's kernels) or candle
    /// (Candle's device-agnostic ops only, the code CUDA and Metal run).
    #[arg(long, default_value_t = Kernels::Native)]
    kernels: Kernels,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in --out from its last checkpoint (same settings required).
    #[arg(long)]
    resume: bool,
    /// Write a metrics line every this many steps.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    log_every: u64,
    /// Checkpoint every this many steps (default: each epoch).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    checkpoint_every: Option<u64>,
    /// Stop (with a checkpoint) after this many steps of the run; continue with --resume.
    #[arg(long)]
    stop_after: Option<usize>,
    /// Also write the final model in half precision, `final.f16.safetensors` (half the size,
    /// for shipping; `detect` loads it as it loads the f32 file).
    #[arg(long)]
    f16: bool,
    /// Also write the final model as a Hugging Face model repo in DeepForest's format
    /// (model.safetensors + config.json) into this folder, which DeepForest's
    /// `RetinaNetHub.from_pretrained` and `detect --model` load (ResNet-50 v1 models only).
    #[arg(long, value_name = "DIR")]
    save_repo: Option<PathBuf>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum NormArg {
    /// torchvision's FrozenBatchNorm2d: fixed statistics and affine.
    Frozen,
    /// nn.BatchNorm2d in training mode: batch statistics, learned affine, running statistics.
    Train,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum BoxLossArg {
    /// Smooth L1 with β = 0.11 (the paper's).
    SmoothL1,
    /// L1 on the encoded deltas (torchvision's v1).
    L1,
    /// Generalised IoU on decoded boxes (torchvision's v2).
    Giou,
}

impl BoxLossArg {
    fn loss(self) -> BoxLoss {
        match self {
            BoxLossArg::SmoothL1 => LossConfig::paper().box_loss,
            BoxLossArg::L1 => LossConfig::v1().box_loss,
            BoxLossArg::Giou => LossConfig::v2().box_loss,
        }
    }
}

fn main() {
    retinanet::device::one_candle_pool_thread();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    check_numbers(&args)?;
    let device = args.device.open()?;
    let val = match (&args.val, &args.val_split) {
        (Some(p), _) => Some((p.as_path(), None)),
        (None, Some(s)) => Some((args.data.as_path(), Some(s.clone()))),
        (None, None) => None,
    };
    let train = (args.data.as_path(), args.train_split.clone());
    let (train, val) = run::load_datasets(train, val, args.format)?;
    report_dataset("train", &train);
    if let Some(val) = &val {
        report_dataset("val", val);
    }
    let num_classes = run::num_classes(args.num_classes, &train)?;
    let tile = args.tile.map(|size| TileConfig {
        size,
        overlap: args.overlap,
        ..Default::default()
    });
    let mut loader_config = LoaderConfig::new(args.batch_size, args.seed);
    loader_config.augment.hflip = args.hflip;
    let (loader, tiled) = run::loader(train, loader_config, tile.as_ref())?;
    if let (Some(t), Some(stats)) = (&tile, tiled) {
        let (n, kept, gone) = (stats.tiles, stats.boxes_kept, stats.boxes_dropped);
        eprintln!(
            "tiles of {} px: {n} tiles, {kept} boxes ({gone} cut boxes dropped)",
            t.size
        );
    }
    let bpe = loader.batches_per_epoch();
    let steps = run::run_steps(args.steps, args.epochs, bpe)?;
    let schedule = run::schedule(steps, args.batch_size, args.lr)?;
    // Temporaries of a killed run are never complete: remove them before anything else.
    for name in retinanet::io::atomic::remove_stale_temporaries(&args.out)? {
        eprintln!("removed {name}, a temporary left by an interrupted run");
    }
    let hub = hub_start(&args, num_classes)?;
    let start = hub.as_ref().map(|(path, _)| path.as_path());
    let mut trainer = make_trainer(&args, &loader, num_classes, schedule, &device, start)?;
    if let Some(dir) = &args.save_repo {
        // Before training, not after: only DeepForest's architecture makes a repo it loads.
        hub_repo::require_deepforest_architecture(trainer.model().config(), dir)
            .context("--save-repo")?;
    }
    if let Some(f16) = run::complete(&trainer, &args.out, args.f16)? {
        eprintln!("{}: the run is complete", args.out.display());
        f16.inspect(|path| eprintln!("wrote {}", path.display()));
        return Ok(());
    }
    let mut metrics = Metrics::open(&args.out, args.resume, trainer.step_count())?;
    let stop = args.stop_after.map_or(steps, |s| s.min(steps));
    let (lr, on) = (trainer.config().schedule.base_lr, device::name(&device));
    let batch = args.batch_size;
    eprintln!("{steps} steps of batch {batch} ({bpe} per epoch), lr {lr:.3e}, on {on}");
    let val = val.as_ref();
    let config = LoopConfig {
        out: args.out.clone(),
        log_every: args.log_every as usize,
        checkpoint_every: args.checkpoint_every.map(|e| e as usize),
        stop,
        tiling: args
            .tile
            .map(|size| tiling::TileConfig::new(size, args.overlap)),
    };
    let bar = progress_bar(trainer.step_count(), steps);
    run::train_loop(&mut trainer, &loader, val, &mut metrics, &config, |event| {
        match event {
            Event::Step {
                stats,
                images_per_s,
            } => {
                bar.inc(1);
                let (c, b, lr) = (stats.classification, stats.box_regression, stats.lr);
                bar.set_message(format!(
                    "cls {c:.4} box {b:.4} lr {lr:.2e} {images_per_s:.2} img/s"
                ));
            }
            Event::Validation(record) => bar.println(val_line(record)),
            Event::Checkpoint(metrics) => plot::losses(metrics.records(), &args.out)?,
        }
        Ok(())
    })?;
    bar.finish();
    if stop < steps {
        let out = args.out.display();
        eprintln!("stopped after step {stop}; continue with --resume --out {out}");
        return Ok(());
    }
    let val = val.map(|v| (v, config.tiling.as_ref()));
    let record = run::finish(&mut trainer, &args.out, args.f16, val, &mut metrics, bpe)?;
    if let Some(record) = record {
        eprintln!("{}", val_line(&record));
    }
    plot::losses(metrics.records(), &args.out)?;
    let final_path = args.out.join("final.safetensors");
    let tile = args
        .tile
        .map(|t| format!(" --tile {t} --overlap {}", args.overlap))
        .unwrap_or_default();
    // The file's metadata carries the input size, which detect uses by default.
    let path = final_path.display();
    eprintln!("wrote {path}; detect with: cargo run --release --example detect -- --weights {path}{tile} IMAGE");
    if let Some(dir) = &args.save_repo {
        let base = hub.as_ref().and_then(|(_, config)| config.as_ref());
        hub_repo::export_repo(&final_path, base, dir).context("--save-repo")?;
        eprintln!(
            "wrote the repo {} (model.safetensors, config.json)",
            dir.display()
        );
    }
    Ok(())
}

/// Refuses numbers out of range before any work starts, naming the flag.
fn check_numbers(args: &Args) -> Result<()> {
    use retinanet::limits::{check_positive, check_side, check_unit};
    let optional = [
        (args.lr, "--lr"),
        (args.clip_grad_norm, "--clip-grad-norm"),
        (args.epochs, "--epochs"),
    ];
    for (value, flag) in optional {
        value.map(|v| check_positive(v, flag)).transpose()?;
    }
    check_unit(f64::from(args.hflip), "--hflip")?;
    check_side(args.min_size, "--min-size")?;
    check_side(args.max_size, "--max-size")?;
    if args.batch_size == 0 || args.steps == Some(0) || args.depth == 0 {
        bail!("--batch-size, --steps and --depth must be positive");
    }
    Ok(())
}

/// For `--model` naming a Hub repo (or a DeepForest zoo model): its files, fetched once, and
/// the start checkpoint for `num_classes` written into --out (see
/// `hub_repo::training_start`), with the repo's config.
fn hub_start(args: &Args, num_classes: usize) -> Result<Option<(PathBuf, Option<RepoConfig>)>> {
    let Some(spec) = &args.model else {
        return Ok(None);
    };
    let hub = HubOptions::from_env()?;
    let files = match retinanet::zoo::resolve(spec).context("--model")? {
        ModelSource::Hub {
            repo,
            revision,
            file,
        } => hub_repo::fetch_repo(&repo, &revision, file.as_deref(), &hub)?,
        ModelSource::Zoo(entry) if entry.is_deepforest() => {
            hub_repo::fetch_repo(entry.name, "main", None, &hub)?
        }
        _ => return Ok(None),
    };
    let dest = args.out.join("start.safetensors");
    let config = hub_repo::training_start(&files, num_classes, args.seed, &dest)
        .with_context(|| format!("--model {spec}"))?;
    Ok(Some((dest, config)))
}

/// A dataset's summary and first warnings on standard error.
fn report_dataset(what: &str, ds: &Dataset) {
    eprint!("{what}: {}", ds.summary());
    for w in ds.warnings.iter().take(5) {
        eprintln!("  warning: {w}");
    }
    if ds.warnings.len() > 5 {
        eprintln!("  ... {} more warnings", ds.warnings.len() - 5);
    }
}

fn make_trainer(
    args: &Args,
    loader: &Loader,
    num_classes: usize,
    schedule: LrSchedule,
    device: &Device,
    hub_start: Option<&Path>,
) -> Result<Trainer> {
    let init = match (&args.weights, &args.model, hub_start) {
        _ if args.from_scratch => Init::Scratch { depth: args.depth },
        (Some(path), _, _) => Init::Weights(path.clone()),
        (None, Some(_), Some(start)) => Init::Weights(start.to_path_buf()),
        (None, Some(name), None) => Init::Zoo(name.clone()),
        (None, None, _) => bail!("give --model NAME, --weights FILE or --from-scratch"),
    };
    let choices = Choices {
        init,
        trainable_layers: args.trainable_layers.map(|l| l as usize),
        backbone_norm: args.batch_norm.map(|n| match n {
            NormArg::Frozen => BackboneNorm::Frozen,
            NormArg::Train => BackboneNorm::Batch,
        }),
        box_loss: args.box_loss.map(BoxLossArg::loss),
        clip_grad_norm: args.clip_grad_norm,
        seed: args.seed,
    };
    let (start, model_config, mut config) = choices.configs(num_classes, schedule)?;
    config.kernels = args.kernels;
    let data = (args.data.as_path(), args.train_split.as_deref());
    let run_config = RunConfig::new(
        data,
        (&start, &model_config, &config),
        choices.box_loss,
        loader,
        (args.min_size, args.max_size),
        args.tile.map(|t| (t, args.overlap)),
    );
    let backbone = run::describe_backbone(&config);
    eprintln!("backbone: {backbone}; box loss {:?}", config.loss.box_loss);
    let what = model_config.describe();
    let configs = (start, model_config, config);
    let (trainer, report) =
        run::open_trainer(&args.out, args.resume, &run_config, configs, device)?;
    match &report {
        None => eprintln!(
            "resumed {} at step {}",
            args.out.display(),
            trainer.step_count()
        ),
        Some(r) => eprintln!(
            "{what}: {} tensors loaded, {} initialised",
            r.loaded, r.initialised
        ),
    }
    for note in report.iter().flat_map(|r| &r.notes) {
        eprintln!("  note: {note}");
    }
    Ok(trainer)
}

fn progress_bar(position: usize, total: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    let template = "{bar:30} {pos}/{len} steps, eta {eta} {wide_msg}";
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_position(position as u64);
    bar
}

fn val_line(r: &Value) -> String {
    let (step, ap, ap50, ap75, ar) = (&r["step"], &r["AP"], &r["AP50"], &r["AP75"], &r["AR100"]);
    format!("step {step}: val AP {ap:.4} AP50 {ap50:.4} AP75 {ap75:.4} AR100 {ar:.4}")
}
