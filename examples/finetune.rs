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
//! `loss.png`, `last.safetensors` (checkpoint with optimiser state beside it, for `--resume`),
//! `final.safetensors` (loads in `detect` unchanged; with `--f16` also `final.f16.safetensors`)
//! and `run.json` (the settings, which `--resume` checks). Every file is written atomically.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use clap::{Parser, ValueEnum};
use image::ImageEncoder as _;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use retinanet::data::{self, Dataset, Format, LoadOpts, Loader, LoaderConfig, TileConfig};
use retinanet::eval::{self, Category, GroundTruth, GtBox};
use retinanet::io::atomic::write_atomic;
use retinanet::io::hub::HubOptions;
use retinanet::train::params::config_for;
use retinanet::train::{BackboneNorm, LrSchedule, Start, StepStats, Target, TrainConfig, Trainer};
use retinanet::{tiling, zoo, Checkpoint, RetinaNet, RetinaNetConfig};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

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
    /// Start from a zoo model (a detector or an ImageNet backbone, see `detect --list-models`).
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
    /// Probability of a horizontal flip.
    #[arg(long, default_value_t = 0.5)]
    hflip: f32,
    /// Seed of initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to train.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
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
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum NormArg {
    /// torchvision's FrozenBatchNorm2d: fixed statistics and affine.
    Frozen,
    /// nn.BatchNorm2d in training mode: batch statistics, learned affine, running statistics.
    Train,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
    Metal,
}

/// The settings that decide the result; `--resume` requires them unchanged.
#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct RunConfig {
    data: PathBuf,
    train_split: Option<String>,
    start: String,
    num_classes: usize,
    class_names: Vec<String>,
    train_samples: usize,
    steps: usize,
    batch_size: usize,
    schedule: String,
    clip_grad_norm: Option<f64>,
    trainable_layers: usize,
    /// Absent in runs written before batch norm could train, which all froze it.
    #[serde(default)]
    backbone_norm: BackboneNorm,
    min_size: usize,
    max_size: usize,
    tile: Option<(u32, u32)>,
    hflip: f32,
    seed: u64,
}

fn main() {
    retinanet::device::one_candle_pool_thread();
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<()> {
    let device = select_device(args.device)?;
    let train = load_train(&args)?;
    let val = load_val(&args, &train.class_names)?;
    let num_classes = args.num_classes.unwrap_or(train.num_classes());
    if num_classes < train.num_classes() {
        bail!(
            "--num-classes {num_classes} but the data has {} classes",
            train.num_classes()
        );
    }
    let loader = make_loader(&args, train)?;
    let bpe = loader.batches_per_epoch();
    let steps = match (args.steps, args.epochs) {
        (Some(s), _) => s,
        (None, e) => (bpe as f64 * e.unwrap_or(12.0)).ceil() as usize,
    };
    if steps == 0 {
        bail!("nothing to train: 0 steps");
    }
    let schedule = schedule(&args, steps)?;
    let (mut trainer, run_config) = make_trainer(&args, &loader, num_classes, schedule, &device)?;
    if trainer.step_count() >= steps && args.out.join("final.safetensors").exists() {
        eprintln!("{}: the run is complete", args.out.display());
        if args.f16 {
            // The last checkpoint of a complete run is the final model.
            let path = args.out.join("final.f16.safetensors");
            trainer.export(&path, DType::F16)?;
            eprintln!("wrote {}", path.display());
        }
        return Ok(());
    }
    let mut metrics = Metrics::open(&args.out, args.resume, trainer.step_count())?;
    let stop = args.stop_after.map_or(steps, |s| s.min(steps));
    eprintln!(
        "{} steps of batch {} ({bpe} per epoch), lr {:.3e}, on {}",
        steps,
        args.batch_size,
        trainer.config().schedule.base_lr,
        retinanet::device::name(&device)
    );
    train_loop(
        &args,
        &mut trainer,
        &loader,
        val.as_ref(),
        &mut metrics,
        stop,
    )?;
    if stop < steps {
        eprintln!(
            "stopped after step {stop}; continue with --resume --out {}",
            args.out.display()
        );
        return Ok(());
    }
    finish(&args, &mut trainer, val.as_ref(), &mut metrics, &run_config)
}

fn load_train(args: &Args) -> Result<Dataset> {
    let opts = LoadOpts {
        split: args.train_split.clone(),
        ..Default::default()
    };
    let ds = data::load(&args.data, args.format, &opts)
        .with_context(|| format!("cannot load {}", args.data.display()))?;
    report_dataset("train", &ds);
    if ds.is_empty() {
        bail!("{}: no training images", args.data.display());
    }
    Ok(ds)
}

fn load_val(args: &Args, classes: &[String]) -> Result<Option<Dataset>> {
    let (path, split) = match (&args.val, &args.val_split) {
        (Some(p), _) => (p, None),
        (None, Some(s)) => (&args.data, Some(s.clone())),
        (None, None) => return Ok(None),
    };
    let opts = LoadOpts {
        split,
        classes: Some(classes.to_vec()),
        ..Default::default()
    };
    let ds = data::load(path, args.format, &opts)
        .with_context(|| format!("cannot load validation data {}", path.display()))?;
    report_dataset("val", &ds);
    Ok(Some(ds))
}

fn report_dataset(what: &str, ds: &Dataset) {
    eprint!("{what}: {}", ds.summary());
    for w in ds.warnings.iter().take(5) {
        eprintln!("  warning: {w}");
    }
    if ds.warnings.len() > 5 {
        eprintln!("  ... {} more warnings", ds.warnings.len() - 5);
    }
}

fn make_loader(args: &Args, train: Dataset) -> Result<Loader> {
    let train = match args.tile {
        Some(size) => {
            let config = TileConfig {
                size,
                overlap: args.overlap,
                ..Default::default()
            };
            let (tiled, stats) = train.tile(&config)?;
            eprintln!(
                "tiles of {size} px: {} tiles, {} boxes ({} cut boxes dropped)",
                stats.tiles, stats.boxes_kept, stats.boxes_dropped
            );
            tiled
        }
        None => train,
    };
    let mut config = LoaderConfig::new(args.batch_size, args.seed);
    config.augment.hflip = args.hflip;
    // Tiles share a few large source images: decode each once.
    config.cache_images = args.tile.is_some();
    Ok(Loader::new(train, config)?)
}

/// The paper's schedule scaled to the run (warm-up, decays at 2/3 and 8/9), with --lr as
/// its base rate if given.
fn schedule(args: &Args, steps: usize) -> Result<LrSchedule> {
    // One "epoch" of steps × batch images gives exactly `steps` steps.
    let mut s = LrSchedule::scaled(steps * args.batch_size, args.batch_size, 1.0)?;
    if let Some(lr) = args.lr {
        s.base_lr = lr;
    }
    Ok(s)
}

/// Where the weights come from and the architecture they imply.
fn start_and_config(args: &Args, num_classes: usize) -> Result<(Start, RetinaNetConfig)> {
    if args.from_scratch {
        // torchvision's BatchNorm2d eps, which the checkpoints record for evaluation.
        let config = RetinaNetConfig {
            bn_eps: 1e-5,
            ..RetinaNetConfig::v1(args.depth, num_classes)?
        };
        return Ok((Start::Scratch, config));
    }
    if let Some(path) = &args.weights {
        let ckpt = Checkpoint::open(path)
            .with_context(|| format!("cannot open weights {}", path.display()))?;
        let start = if ckpt
            .shape("head.classification_head.cls_logits.weight")
            .is_some()
        {
            Start::RetinaNet(path.clone())
        } else {
            Start::Backbone(path.clone())
        };
        let config = config_for(&start, num_classes)?;
        return Ok((start, config));
    }
    let Some(name) = &args.model else {
        bail!("give --model NAME, --weights FILE or --from-scratch");
    };
    let entry = zoo::find(name)?;
    let path = entry
        .fetch(&HubOptions::from_env()?)
        .with_context(|| format!("cannot get {name}"))?;
    match entry.architecture.retinanet_config(num_classes) {
        // The zoo knows the detector's batch-norm eps, which the file may not say.
        Some(config) => Ok((Start::RetinaNet(path), config?)),
        None => {
            let start = Start::Backbone(path);
            let config = config_for(&start, num_classes)?;
            Ok((start, config))
        }
    }
}

fn make_trainer(
    args: &Args,
    loader: &Loader,
    num_classes: usize,
    schedule: LrSchedule,
    device: &Device,
) -> Result<(Trainer, RunConfig)> {
    let (start, model_config) = start_and_config(args, num_classes)?;
    let mut config = TrainConfig::for_start(&model_config, &start, schedule);
    if let Some(layers) = args.trainable_layers {
        config.trainable_backbone_layers = layers as usize;
    }
    match args.batch_norm {
        Some(NormArg::Frozen) => config.backbone_norm = BackboneNorm::Frozen,
        Some(NormArg::Train) => config.backbone_norm = BackboneNorm::Batch,
        None => {}
    }
    config.clip_grad_norm = args.clip_grad_norm;
    config.seed = args.seed;
    let schedule = &config.schedule;
    let names = &loader.dataset().class_names;
    let run_config = RunConfig {
        data: args.data.clone(),
        train_split: args.train_split.clone(),
        start: format!("{start:?}"),
        num_classes,
        class_names: names.clone(),
        train_samples: loader.dataset().len(),
        steps: schedule.total_steps,
        batch_size: args.batch_size,
        schedule: format!("{schedule:?}"),
        clip_grad_norm: args.clip_grad_norm,
        trainable_layers: config.trainable_backbone_layers,
        backbone_norm: config.backbone_norm,
        min_size: args.min_size,
        max_size: args.max_size,
        tile: args.tile.map(|t| (t, args.overlap)),
        hflip: args.hflip,
        seed: args.seed,
    };
    eprintln!("backbone: {}", describe_backbone(&config));
    let mut trainer = if args.resume {
        check_resumable(&args.out, &run_config)?;
        let last = args.out.join("last.safetensors");
        let t = Trainer::resume(&last, &model_config, config, device)
            .with_context(|| format!("cannot resume from {}", last.display()))?;
        eprintln!("resumed {} at step {}", last.display(), t.step_count());
        t
    } else {
        if args.out.join("last.safetensors").exists() {
            bail!(
                "{} holds a run: pass --resume to continue it, or choose another --out",
                args.out.display()
            );
        }
        let (t, report) = Trainer::new(&model_config, &start, config, device)?;
        eprintln!(
            "{}: {} tensors loaded, {} initialised",
            model_config.describe(),
            report.loaded,
            report.initialised
        );
        for note in &report.notes {
            eprintln!("  note: {note}");
        }
        write_atomic(
            &args.out.join("run.json"),
            &serde_json::to_vec_pretty(&run_config)?,
        )?;
        t
    };
    if names.len() == num_classes {
        trainer.model_mut().set_class_names(names.clone())?;
    }
    trainer.model_mut().transform.min_size = args.min_size;
    trainer.model_mut().transform.max_size = args.max_size;
    Ok((trainer, run_config))
}

/// The backbone's training setup in words, e.g. `5 of 5 stages train, batch norm trains
/// (batch statistics)`.
fn describe_backbone(config: &TrainConfig) -> String {
    let norm = match config.backbone_norm {
        BackboneNorm::Frozen => "batch norm frozen",
        BackboneNorm::Batch => "batch norm trains (batch statistics)",
    };
    format!(
        "{} of 5 stages train, {norm}",
        config.trainable_backbone_layers
    )
}

fn check_resumable(out: &Path, run_config: &RunConfig) -> Result<()> {
    let path = out.join("run.json");
    let text = std::fs::read(&path)
        .with_context(|| format!("--resume: no run to continue in {}", out.display()))?;
    let old: RunConfig = serde_json::from_slice(&text)
        .with_context(|| format!("cannot parse {}", path.display()))?;
    if &old != run_config {
        bail!(
            "--resume: the settings differ from the interrupted run's ({}):\n  was {old:?}\n  now {run_config:?}",
            path.display()
        );
    }
    Ok(())
}

fn train_loop(
    args: &Args,
    trainer: &mut Trainer,
    loader: &Loader,
    val: Option<&Dataset>,
    metrics: &mut Metrics,
    stop: usize,
) -> Result<()> {
    let bpe = loader.batches_per_epoch();
    let first = trainer.step_count();
    let every = args.checkpoint_every.map_or(bpe, |e| e as usize);
    // Batches depend only on (seed, epoch, ids): skipping reproduces an uninterrupted run.
    let mut batches = loader.stream(first / bpe).skip(first % bpe);
    let bar = progress_bar(first, trainer.config().schedule.total_steps);
    let mut speed = Speed::new();
    while trainer.step_count() < stop {
        let started = Instant::now();
        let batch = batches.next().context("the loader stopped")??;
        let (ids, flipped) = (batch.ids.clone(), batch.flipped.clone());
        let (images, targets) = to_train_batch(loader.dataset(), batch);
        let stats = trainer.step(&images, &targets)?;
        let done = trainer.step_count();
        let ips = speed.update(images.len());
        bar.set_position(done as u64);
        bar.set_message(step_message(&stats, ips));
        if (done as u64).is_multiple_of(args.log_every) || done == stop {
            let seconds = started.elapsed().as_secs_f64();
            let mut record = step_record(&stats, done, bpe, ips, seconds);
            // What the step saw, so that a reference run can replay the same batches.
            record["samples"] = json!(ids);
            record["flipped"] = json!(flipped);
            metrics.push(record);
        }
        let epoch_end = done.is_multiple_of(bpe);
        if epoch_end && done < trainer.config().schedule.total_steps {
            if let Some(val) = val {
                let record = validate(args, trainer.model(), val, done, bpe)?;
                bar.println(val_line(&record));
                metrics.push(record);
            }
        }
        if done.is_multiple_of(every) || done == stop {
            trainer.save(args.out.join("last.safetensors"))?;
            metrics.flush()?;
            plot_losses(&metrics.records, &args.out.join("loss.png"))?;
        }
    }
    bar.finish();
    Ok(())
}

fn finish(
    args: &Args,
    trainer: &mut Trainer,
    val: Option<&Dataset>,
    metrics: &mut Metrics,
    run_config: &RunConfig,
) -> Result<()> {
    let steps = run_config.steps;
    let final_path = args.out.join("final.safetensors");
    trainer.save(&final_path)?;
    if args.f16 {
        trainer.export(args.out.join("final.f16.safetensors"), DType::F16)?;
    }
    if let Some(val) = val {
        let bpe = run_config.train_samples.div_ceil(args.batch_size);
        let record = validate(args, trainer.model(), val, steps, bpe)?;
        eprintln!("{}", val_line(&record));
        metrics.push(record);
    }
    metrics.flush()?;
    plot_losses(&metrics.records, &args.out.join("loss.png"))?;
    let tile = args
        .tile
        .map(|t| format!(" --tile {t} --overlap {}", args.overlap))
        .unwrap_or_default();
    // The file's metadata carries the input size, which detect uses by default.
    eprintln!(
        "wrote {0}; detect with: cargo run --release --example detect -- --weights {0}{tile} IMAGE",
        final_path.display()
    );
    Ok(())
}

/// Loader batches as training targets, named by file (and tile) for error messages.
fn to_train_batch(ds: &Dataset, batch: data::Batch) -> (Vec<image::RgbImage>, Vec<Target>) {
    let targets = batch
        .ids
        .iter()
        .zip(batch.targets)
        .map(|(&id, t)| Target {
            id: sample_name(&ds.samples[id]),
            boxes: t.boxes,
            labels: t.labels,
        })
        .collect();
    (batch.images, targets)
}

fn sample_name(s: &data::Sample) -> String {
    match s.region {
        Some(r) => format!("{} at ({}, {})", s.image_path.display(), r.x, r.y),
        None => s.image_path.display().to_string(),
    }
}

/// Images per second, smoothed over recent steps.
struct Speed {
    last: Instant,
    rate: Option<f64>,
}

impl Speed {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            rate: None,
        }
    }

    fn update(&mut self, images: usize) -> f64 {
        let now = Instant::now();
        let r = images as f64 / now.duration_since(self.last).as_secs_f64().max(1e-9);
        self.last = now;
        let rate = self.rate.map_or(r, |old| 0.9 * old + 0.1 * r);
        self.rate = Some(rate);
        rate
    }
}

fn progress_bar(position: usize, total: usize) -> ProgressBar {
    let bar = ProgressBar::new(total as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps, eta {eta} {wide_msg}")
    {
        bar.set_style(style);
    }
    bar.set_position(position as u64);
    bar
}

fn step_message(s: &StepStats, ips: f64) -> String {
    format!(
        "cls {:.4} box {:.4} lr {:.2e} {ips:.2} img/s",
        s.classification, s.box_regression, s.lr
    )
}

/// One metrics line; `seconds` is the step's wall time, batch wait included.
fn step_record(s: &StepStats, done: usize, bpe: usize, ips: f64, seconds: f64) -> Value {
    json!({
        "step": done,
        "epoch": done as f64 / bpe as f64,
        "lr": s.lr,
        "classification": s.classification,
        "box_regression": s.box_regression,
        "loss": s.classification + s.box_regression,
        "foreground": s.foreground,
        "images_per_s": ips,
        "seconds": seconds,
    })
}

/// COCO box AP of `model` on `val`, as a metrics record.
fn validate(
    args: &Args,
    model: &RetinaNet,
    val: &Dataset,
    done: usize,
    bpe: usize,
) -> Result<Value> {
    let (gt, dets) = predictions(args, model, val)?;
    let evaluation = eval::evaluate(&gt, &dets)?;
    let mut record = json!({"step": done, "epoch": done as f64 / bpe as f64});
    for (name, v) in eval::Summary::NAMES
        .iter()
        .zip(evaluation.summary().values())
    {
        record[*name] = json!(v);
    }
    Ok(record)
}

/// Ground truth and detections of `val` in original pixels; image ids are sample indices,
/// category ids the 0-based labels.
fn predictions(
    args: &Args,
    model: &RetinaNet,
    val: &Dataset,
) -> Result<(GroundTruth, Vec<eval::Detection>)> {
    let categories = (0..model.config().num_classes)
        .map(|k| Category {
            id: k as i64,
            name: val.class_names.get(k).cloned().unwrap_or_default(),
        })
        .collect();
    let xywh = |b: [f32; 4]| {
        let b = b.map(f64::from);
        [b[0], b[1], b[2] - b[0], b[3] - b[1]]
    };
    let mut boxes = Vec::new();
    let mut dets = Vec::new();
    for (i, sample) in val.samples.iter().enumerate() {
        for (b, &l) in sample.boxes.iter().zip(&sample.labels) {
            // Ids from 1: pycocotools never matches an annotation with id 0.
            let id = boxes.len() as i64 + 1;
            boxes.push(GtBox::new(id, i as i64, l as i64, xywh(*b)));
        }
        let image = sample.load_image()?;
        for d in detect(args, model, &image)? {
            dets.push(eval::Detection::new(
                i as i64,
                d.label as i64,
                xywh(d.bbox),
                f64::from(d.score),
            ));
        }
    }
    let gt = GroundTruth::new(0..val.len() as i64, categories, boxes)?;
    Ok((gt, dets))
}

fn detect(
    args: &Args,
    model: &RetinaNet,
    image: &image::RgbImage,
) -> Result<Vec<retinanet::Detection>> {
    match args.tile {
        Some(size) if image.width().max(image.height()) > size => {
            let config = tiling::TileConfig::new(size, args.overlap);
            Ok(tiling::detect_tiled(model, image, &config)?)
        }
        _ => Ok(model.detect(image)?),
    }
}

fn val_line(r: &Value) -> String {
    format!(
        "step {}: val AP {:.4} AP50 {:.4} AP75 {:.4} AR100 {:.4}",
        r["step"], r["AP"], r["AP50"], r["AP75"], r["AR100"]
    )
}

/// `metrics.jsonl`, kept in memory and rewritten atomically at checkpoints and at the end.
struct Metrics {
    path: PathBuf,
    records: Vec<Value>,
}

impl Metrics {
    /// A new log, or on resume the old one up to the checkpoint's step.
    fn open(out: &Path, resume: bool, step: usize) -> Result<Self> {
        let path = out.join("metrics.jsonl");
        let mut records = Vec::new();
        if resume && path.exists() {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let r: Value = serde_json::from_str(line)
                    .with_context(|| format!("{}: bad line {line:?}", path.display()))?;
                if r["step"].as_u64().is_some_and(|s| s as usize <= step) {
                    records.push(r);
                }
            }
        }
        Ok(Self { path, records })
    }

    fn push(&mut self, record: Value) {
        self.records.push(record);
    }

    fn flush(&self) -> Result<()> {
        let mut text = String::new();
        for r in &self.records {
            text.push_str(&r.to_string());
            text.push('\n');
        }
        write_atomic(&self.path, text.as_bytes())?;
        Ok(())
    }
}

/// A named series of (step, value) points and its colour.
type Curve<'a> = (&'a str, Vec<(f64, f64)>, RGBColor);

/// Loss curves (classification, box, total) over steps, as a PNG.
fn plot_losses(records: &[Value], path: &Path) -> Result<()> {
    let series = |key: &str| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| Some((r["step"].as_f64()?, r.get(key)?.as_f64()?)))
            .collect()
    };
    let curves = [
        ("total", series("loss"), BLACK),
        ("classification", series("classification"), BLUE),
        ("box regression", series("box_regression"), RED),
    ];
    if curves[0].1.is_empty() {
        return Ok(());
    }
    let (width, height) = (800u32, 500u32);
    let mut pixels = vec![0u8; (width * height * 3) as usize];
    render_losses(&curves, &mut pixels, (width, height))
        .map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png).write_image(
        &pixels,
        width,
        height,
        image::ExtendedColorType::Rgb8,
    )?;
    write_atomic(path, &png)?;
    Ok(())
}

/// The y range: the largest total loss, but at most 4× its median, so that one early spike
/// does not flatten the rest of the curve.
fn y_limit(total: &[(f64, f64)]) -> f64 {
    let mut v: Vec<f64> = total
        .iter()
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .collect();
    v.sort_by(f64::total_cmp);
    let (Some(&median), Some(&max)) = (v.get(v.len() / 2), v.last()) else {
        return 1.0;
    };
    max.min(4.0 * median).max(1e-3)
}

fn render_losses(
    curves: &[Curve],
    pixels: &mut [u8],
    size: (u32, u32),
) -> Result<(), Box<dyn std::error::Error>> {
    let max_step = curves[0].1.last().map_or(1.0, |p| p.0).max(1.0);
    let max_loss = y_limit(&curves[0].1);
    let root = BitMapBackend::with_buffer(pixels, size).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Training loss (spikes clipped)", ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..max_step, 0f64..max_loss * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("loss")
        .draw()?;
    for (name, points, color) in curves {
        let style = color.stroke_width(2);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), style))?
            .label(*name)
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
