//! A training run's bookkeeping around [`Trainer`]: where the weights
//! start, the schedule, the settings that `--resume` requires unchanged (`run.json`), the
//! metrics log (`metrics.jsonl`), the step speed and the conversion of loader batches to
//! training targets.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use candle_core::Device;

use crate::data::{Batch, Dataset, Format, LoadOpts, Loader, LoaderConfig, Sample, TileStats};
use crate::eval::{Evaluation, Summary};
use crate::io::atomic::write_atomic;
use crate::io::hub::HubOptions;
use crate::io::zoo;
use crate::model::focal_loss::BoxLoss;
use crate::tiling::TileConfig;
use crate::train::params::config_for;
use crate::train::params::InitReport;
use crate::train::{BackboneNorm, LrSchedule, Start, StepStats, Target, TrainConfig, Trainer};
use crate::{Checkpoint, Error, Result, RetinaNet, RetinaNetConfig};

/// The settings that decide a run's result; resuming requires them unchanged.
#[derive(Serialize, Deserialize, PartialEq, Debug, Clone)]
pub struct RunConfig {
    /// Training data.
    pub data: PathBuf,
    /// Its split.
    pub train_split: Option<String>,
    /// Where the weights started ([`Start`] in words).
    pub start: String,
    /// Classes of the model.
    pub num_classes: usize,
    /// The training set's class names.
    pub class_names: Vec<String>,
    /// Training samples (tiles, when tiled).
    pub train_samples: usize,
    /// Steps of the whole run.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// The learning-rate schedule in words.
    pub schedule: String,
    /// Gradient-norm clipping.
    pub clip_grad_norm: Option<f64>,
    /// Backbone stages that train.
    pub trainable_layers: usize,
    /// Absent in runs written before batch norm could train, which all froze it.
    #[serde(default)]
    pub backbone_norm: BackboneNorm,
    /// The box loss where chosen; absent: torchvision's for the architecture (L1 for v1,
    /// GIoU for v2), as in runs written before it could be chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub box_loss: Option<BoxLoss>,
    /// Short side after resizing.
    pub min_size: usize,
    /// Upper bound on the long side.
    pub max_size: usize,
    /// Tile size and overlap, when training on tiles.
    pub tile: Option<(u32, u32)>,
    /// Probability of a horizontal flip.
    pub hflip: f32,
    /// Seed of initialisation, shuffling and augmentation.
    pub seed: u64,
}

impl RunConfig {
    /// The settings of a run training `configs` on `loader`'s data (`data`, split
    /// `train_split`) at `input_size` (min, max), tiled as `tile` (size, overlap);
    /// `box_loss` as chosen.
    pub fn new(
        (data, train_split): (&Path, Option<&str>),
        (start, model_config, config): (&Start, &RetinaNetConfig, &TrainConfig),
        box_loss: Option<BoxLoss>,
        loader: &Loader,
        (min_size, max_size): (usize, usize),
        tile: Option<(u32, u32)>,
    ) -> Self {
        Self {
            data: data.to_path_buf(),
            train_split: train_split.map(str::to_string),
            start: format!("{start:?}"),
            num_classes: model_config.num_classes,
            class_names: loader.dataset().class_names.clone(),
            train_samples: loader.dataset().len(),
            steps: config.schedule.total_steps,
            batch_size: loader.config().batch_size,
            schedule: format!("{:?}", config.schedule),
            clip_grad_norm: config.clip_grad_norm,
            trainable_layers: config.trainable_backbone_layers,
            backbone_norm: config.backbone_norm,
            box_loss,
            min_size,
            max_size,
            tile,
            hflip: loader.config().augment.hflip,
            seed: config.seed,
        }
    }

    /// `run.json` in the output folder `out`.
    pub fn path(out: &Path) -> PathBuf {
        out.join("run.json")
    }

    /// Writes `run.json` into `out`.
    pub fn write(&self, out: &Path) -> Result<()> {
        let text = serde_json::to_vec_pretty(self).map_err(|e| invalid(&Self::path(out), e))?;
        write_atomic(&Self::path(out), &text)
    }

    /// Checks that the run in `out` was started with these settings.
    pub fn check_resumable(&self, out: &Path) -> Result<()> {
        let path = Self::path(out);
        let text = std::fs::read(&path).map_err(|_| {
            Error::Invalid(format!(
                "--resume: no run to continue in {} (no run.json: stopped before it began? \
                 start it without --resume)",
                out.display()
            ))
        })?;
        let old: RunConfig = serde_json::from_slice(&text).map_err(|e| invalid(&path, e))?;
        if &old != self {
            return Err(Error::Invalid(format!(
                "--resume: the settings differ from the interrupted run's ({}):\n  was {old:?}\n  now {self:?}",
                path.display()
            )));
        }
        Ok(())
    }
}

/// How a run's weights start, as the command line chooses.
#[derive(Debug, Clone, PartialEq)]
pub enum Init {
    /// Random weights, a ResNet of this depth (torchvision's batch-norm eps 1e-5).
    Scratch {
        /// ResNet depth.
        depth: usize,
    },
    /// A RetinaNet or ImageNet ResNet checkpoint file.
    Weights(PathBuf),
    /// A zoo model (a detector or an ImageNet backbone), downloaded once.
    Zoo(String),
}

impl Init {
    /// Where the weights come from and the architecture they imply for `num_classes`.
    pub fn start_and_config(&self, num_classes: usize) -> Result<(Start, RetinaNetConfig)> {
        match self {
            Init::Scratch { depth } => {
                // torchvision's BatchNorm2d eps, which the checkpoints record for evaluation.
                let config = RetinaNetConfig {
                    bn_eps: 1e-5,
                    ..RetinaNetConfig::v1(*depth, num_classes)?
                };
                Ok((Start::Scratch, config))
            }
            Init::Weights(path) => {
                let ckpt = Checkpoint::open(path)?;
                let start = match ckpt.shape("head.classification_head.cls_logits.weight") {
                    Some(_) => Start::RetinaNet(path.clone()),
                    None => Start::Backbone(path.clone()),
                };
                let config = config_for(&start, num_classes)?;
                Ok((start, config))
            }
            Init::Zoo(name) => {
                let entry = zoo::find(name)?;
                let path = entry.fetch(&HubOptions::from_env()?)?;
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
        }
    }
}

/// Training choices beyond the schedule, as a command line makes them; each `None` keeps
/// torchvision's default for the start ([`TrainConfig::for_start`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Choices {
    /// Where the weights start.
    pub init: Init,
    /// Backbone stages that train, from the top.
    pub trainable_layers: Option<usize>,
    /// Backbone batch norm.
    pub backbone_norm: Option<BackboneNorm>,
    /// Box regression loss.
    pub box_loss: Option<BoxLoss>,
    /// Gradient-norm clipping.
    pub clip_grad_norm: Option<f64>,
    /// Seed of initialisation.
    pub seed: u64,
}

impl Choices {
    /// The start, the architecture for `num_classes` and the training configuration.
    pub fn configs(
        &self,
        num_classes: usize,
        schedule: LrSchedule,
    ) -> Result<(Start, RetinaNetConfig, TrainConfig)> {
        let (start, model_config) = self.init.start_and_config(num_classes)?;
        let mut config = TrainConfig::for_start(&model_config, &start, schedule);
        if let Some(layers) = self.trainable_layers {
            config.trainable_backbone_layers = layers;
        }
        if let Some(norm) = self.backbone_norm {
            config.backbone_norm = norm;
        }
        if let Some(loss) = self.box_loss {
            config.loss.box_loss = loss;
        }
        config.clip_grad_norm = self.clip_grad_norm;
        config.seed = self.seed;
        Ok((start, model_config, config))
    }
}

/// Loads the training set `(path, split)` (it must hold images) and the validation set, whose
/// classes follow the training set's.
pub fn load_datasets(
    (train, split): (&Path, Option<String>),
    val: Option<(&Path, Option<String>)>,
    format: Option<Format>,
) -> Result<(Dataset, Option<Dataset>)> {
    let opts = LoadOpts {
        split,
        ..Default::default()
    };
    let train_set = crate::data::load(train, format, &opts)?;
    if train_set.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: no training images",
            train.display()
        )));
    }
    let val = val
        .map(|(path, split)| {
            let opts = LoadOpts {
                split,
                classes: Some(train_set.class_names.clone()),
                ..Default::default()
            };
            crate::data::load(path, format, &opts)
        })
        .transpose()?;
    Ok((train_set, val))
}

/// The model's class count: `requested`, at least the training set's, else the training
/// set's.
pub fn num_classes(requested: Option<usize>, train: &Dataset) -> Result<usize> {
    let n = train.num_classes();
    if n == 0 && requested.is_none_or(|k| k == 0) {
        return Err(Error::Invalid(format!(
            "{}: the training data names no classes",
            train.source.display()
        )));
    }
    match requested {
        Some(k) if k < n => Err(Error::Invalid(format!(
            "--num-classes {k} but the data has {n} classes"
        ))),
        k => Ok(k.unwrap_or(n)),
    }
}

/// Whether the run in `out` is complete (its schedule done and `final.safetensors`
/// written); then with `f16` its half-precision copy is written (the last checkpoint of a
/// complete run is the final model) and returned.
pub fn complete(trainer: &Trainer, out: &Path, f16: bool) -> Result<Option<Option<PathBuf>>> {
    let done = trainer.step_count() >= trainer.config().schedule.total_steps;
    if !done || !out.join("final.safetensors").exists() {
        return Ok(None);
    }
    if !f16 {
        return Ok(Some(None));
    }
    let path = out.join("final.f16.safetensors");
    trainer.export(&path, candle_core::DType::F16)?;
    Ok(Some(Some(path)))
}

/// The steps of a run: `steps` if given, else `epochs` (default 12, the paper's length on
/// COCO) of `batches_per_epoch`.
pub fn run_steps(
    steps: Option<usize>,
    epochs: Option<f64>,
    batches_per_epoch: usize,
) -> Result<usize> {
    let steps = steps
        .unwrap_or_else(|| (batches_per_epoch as f64 * epochs.unwrap_or(12.0)).ceil() as usize);
    if steps == 0 {
        return Err(Error::Invalid("nothing to train: 0 steps".into()));
    }
    Ok(steps)
}

/// The training loader: batches of `config`, over `train` cut into tiles where `tile` is
/// given (with the tiling's statistics).
pub fn loader(
    train: Dataset,
    mut config: LoaderConfig,
    tile: Option<&crate::data::TileConfig>,
) -> Result<(Loader, Option<TileStats>)> {
    let Some(tile) = tile else {
        return Ok((Loader::new(train, config)?, None));
    };
    let (tiled, stats) = train.tile(tile)?;
    // Tiles share a few large source images: decode each once.
    config.cache_images = true;
    Ok((Loader::new(tiled, config)?, Some(stats)))
}

/// Starts the run in `out` (refusing to overwrite one, writing `run.json`), or with `resume`
/// continues it from `last.safetensors` (refusing other settings). A new trainer comes with
/// the report of what it loaded.
pub fn open_trainer(
    out: &Path,
    resume: bool,
    run_config: &RunConfig,
    (start, model_config, config): (Start, RetinaNetConfig, TrainConfig),
    device: &Device,
) -> Result<(Trainer, Option<InitReport>)> {
    let last = out.join("last.safetensors");
    let (mut trainer, report) = if resume && last.exists() {
        run_config.check_resumable(out)?;
        let trainer = Trainer::resume(&last, &model_config, config, device)?;
        (trainer, None)
    } else if resume {
        // Stopped before its first checkpoint: the same settings start it again.
        run_config.check_resumable(out)?;
        let (trainer, mut report) = Trainer::new(&model_config, &start, config, device)?;
        let note = "no checkpoint yet (stopped before the first): the run starts again";
        report.notes.push(note.into());
        (trainer, Some(report))
    } else if last.exists() {
        return Err(Error::Invalid(format!(
            "{} holds a run: pass --resume to continue it, or choose another --out",
            out.display()
        )));
    } else {
        let (trainer, report) = Trainer::new(&model_config, &start, config, device)?;
        run_config.write(out)?;
        (trainer, Some(report))
    };
    let names = &run_config.class_names;
    if names.len() == run_config.num_classes {
        trainer.model_mut().set_class_names(names.clone())?;
    }
    // The checkpoints record the input size, which `detect` then uses by default.
    trainer.model_mut().transform.min_size = run_config.min_size;
    trainer.model_mut().transform.max_size = run_config.max_size;
    Ok((trainer, report))
}

/// Ends a run: saves `final.safetensors` in `out` (and with `f16` a half-precision copy),
/// validates on `val` (tiled as in `tiling`) and writes the metrics. Returns the validation
/// record.
pub fn finish(
    trainer: &mut Trainer,
    out: &Path,
    f16: bool,
    val: Option<(&Dataset, Option<&TileConfig>)>,
    metrics: &mut Metrics,
    batches_per_epoch: usize,
) -> Result<Option<Value>> {
    // The final model ships without the optimiser state that `last.safetensors` keeps.
    trainer.export(out.join("final.safetensors"), candle_core::DType::F32)?;
    if f16 {
        trainer.export(out.join("final.f16.safetensors"), candle_core::DType::F16)?;
    }
    let record = match val {
        Some((val, tiling)) => {
            let done = trainer.step_count();
            let record = validate(trainer.model(), val, tiling, done, batches_per_epoch)?;
            metrics.push(record.clone());
            Some(record)
        }
        None => None,
    };
    metrics.flush()?;
    Ok(record)
}

/// The paper's schedule scaled to a run of `steps` steps of `batch_size` images (warm-up,
/// decays at 2/3 and 8/9), with `base_lr` as its base rate if given.
pub fn schedule(steps: usize, batch_size: usize, base_lr: Option<f64>) -> Result<LrSchedule> {
    // One "epoch" of steps × batch images gives exactly `steps` steps.
    let mut s = LrSchedule::scaled(steps * batch_size, batch_size, 1.0)?;
    if let Some(lr) = base_lr {
        s.base_lr = lr;
    }
    Ok(s)
}

/// The backbone's training setup in words, e.g. `5 of 5 stages train, batch norm trains
/// (batch statistics)`.
pub fn describe_backbone(config: &TrainConfig) -> String {
    let norm = match config.backbone_norm {
        BackboneNorm::Frozen => "batch norm frozen",
        BackboneNorm::Batch => "batch norm trains (batch statistics)",
    };
    let layers = config.trainable_backbone_layers;
    format!("{layers} of 5 stages train, {norm}")
}

/// Loader batches as training images and targets, named by file (and tile) for messages.
pub fn to_train_batch(ds: &Dataset, batch: Batch) -> (Vec<image::RgbImage>, Vec<Target>) {
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

fn sample_name(s: &Sample) -> String {
    match s.region {
        Some(r) => format!("{} at ({}, {})", s.image_path.display(), r.x, r.y),
        None => s.image_path.display().to_string(),
    }
}

/// Images per second, smoothed over recent steps.
#[derive(Debug, Clone)]
pub struct Speed {
    last: Instant,
    rate: Option<f64>,
}

impl Default for Speed {
    fn default() -> Self {
        Self {
            last: Instant::now(),
            rate: None,
        }
    }
}

impl Speed {
    /// Counts a step of `images` images; returns the smoothed rate.
    pub fn update(&mut self, images: usize) -> f64 {
        let now = Instant::now();
        let r = images as f64 / now.duration_since(self.last).as_secs_f64().max(1e-9);
        self.last = now;
        let rate = self.rate.map_or(r, |old| 0.9 * old + 0.1 * r);
        self.rate = Some(rate);
        rate
    }
}

/// One step's metrics record; `seconds` is the step's wall time, batch wait included.
pub fn step_record(
    s: &StepStats,
    done: usize,
    batches_per_epoch: usize,
    images_per_s: f64,
    seconds: f64,
) -> Value {
    json!({
        "step": done,
        "epoch": done as f64 / batches_per_epoch as f64,
        "lr": s.lr,
        "classification": s.classification,
        "box_regression": s.box_regression,
        "loss": s.classification + s.box_regression,
        "foreground": s.foreground,
        "images_per_s": images_per_s,
        "seconds": seconds,
    })
}

/// A validation's metrics record: the step and the 12 COCO summary numbers by name.
pub fn validation_record(evaluation: &Evaluation, done: usize, batches_per_epoch: usize) -> Value {
    let mut record = json!({"step": done, "epoch": done as f64 / batches_per_epoch as f64});
    for (name, v) in Summary::NAMES.iter().zip(evaluation.summary().values()) {
        record[*name] = json!(v);
    }
    record
}

/// `metrics.jsonl`: one JSON record per line, kept in memory and rewritten atomically.
#[derive(Debug, Clone)]
pub struct Metrics {
    path: PathBuf,
    records: Vec<Value>,
}

impl Metrics {
    /// A new log in `out`, or on resume the old one up to the checkpoint's `step`.
    pub fn open(out: &Path, resume: bool, step: usize) -> Result<Self> {
        let path = out.join("metrics.jsonl");
        let mut records = Vec::new();
        if resume && path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let r: Value = serde_json::from_str(line)
                    .map_err(|e| invalid(&path, format!("bad line {line:?}: {e}")))?;
                if r["step"].as_u64().is_some_and(|s| s as usize <= step) {
                    records.push(r);
                }
            }
        }
        Ok(Self { path, records })
    }

    /// Adds a record.
    pub fn push(&mut self, record: Value) {
        self.records.push(record);
    }

    /// The records so far.
    pub fn records(&self) -> &[Value] {
        &self.records
    }

    /// Rewrites the file with every record.
    pub fn flush(&self) -> Result<()> {
        let mut text = String::new();
        for r in &self.records {
            text.push_str(&r.to_string());
            text.push('\n');
        }
        write_atomic(&self.path, text.as_bytes())
    }
}

/// What [`train_loop`] reports as it goes.
#[derive(Debug)]
pub enum Event<'a> {
    /// A step finished: its statistics and the smoothed images per second.
    Step {
        /// The step's losses and learning rate.
        stats: &'a StepStats,
        /// Images per second, smoothed.
        images_per_s: f64,
    },
    /// A validation finished, with this metrics record.
    Validation(&'a Value),
    /// A checkpoint was saved and the metrics flushed.
    Checkpoint(&'a Metrics),
}

/// How [`train_loop`] runs.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    /// Output folder (`last.safetensors`, `metrics.jsonl`).
    pub out: PathBuf,
    /// Record every this many steps (and the last).
    pub log_every: usize,
    /// Checkpoint every this many steps (and at the stop); `None`: each epoch.
    pub checkpoint_every: Option<usize>,
    /// Stop once the trainer has done this many steps.
    pub stop: usize,
    /// Validate tiled, as the run trains.
    pub tiling: Option<TileConfig>,
}

/// Trains until `config.stop`: steps on `loader`'s batches (continuing where the trainer
/// is, as an uninterrupted run would), metrics records, validation on `val` at the end of
/// each epoch but the last, and checkpoints.
pub fn train_loop(
    trainer: &mut Trainer,
    loader: &Loader,
    val: Option<&Dataset>,
    metrics: &mut Metrics,
    config: &LoopConfig,
    mut report: impl FnMut(Event) -> Result<()>,
) -> Result<()> {
    let bpe = loader.batches_per_epoch();
    let first = trainer.step_count();
    let every = config.checkpoint_every.unwrap_or(bpe);
    check_loader_position(&config.out.join("last.safetensors"), first, bpe)?;
    // Batches depend only on (seed, epoch, ids): skipping reproduces an uninterrupted run.
    let mut batches = loader.stream(first / bpe).skip(first % bpe);
    let mut speed = Speed::default();
    while trainer.step_count() < config.stop {
        let started = Instant::now();
        let batch = batches
            .next()
            .ok_or_else(|| Error::Invalid("the loader stopped".into()))??;
        let (ids, flipped) = (batch.ids.clone(), batch.flipped.clone());
        let (images, targets) = to_train_batch(loader.dataset(), batch);
        let stats = trainer.step(&images, &targets)?;
        let done = trainer.step_count();
        let images_per_s = speed.update(images.len());
        report(Event::Step {
            stats: &stats,
            images_per_s,
        })?;
        if done.is_multiple_of(config.log_every) || done == config.stop {
            let seconds = started.elapsed().as_secs_f64();
            let mut record = step_record(&stats, done, bpe, images_per_s, seconds);
            // What the step saw, so that a reference run can replay the same batches.
            record["samples"] = json!(ids);
            record["flipped"] = json!(flipped);
            metrics.push(record);
        }
        let epoch_end = done.is_multiple_of(bpe);
        if let Some(val) = val.filter(|_| epoch_end && done < trainer.config().schedule.total_steps)
        {
            let record = validate(trainer.model(), val, config.tiling.as_ref(), done, bpe)?;
            report(Event::Validation(&record))?;
            metrics.push(record);
        }
        if done.is_multiple_of(every) || done == config.stop {
            // Metrics first: records past the checkpoint's step are dropped on resume, while
            // a checkpoint ahead of its metrics would lose records.
            metrics.flush()?;
            let position = loader_position(done, bpe);
            trainer.save_with(config.out.join("last.safetensors"), position)?;
            report(Event::Checkpoint(metrics))?;
        }
    }
    Ok(())
}

/// The checkpoint metadata `loader`: where the loader stands after `done` steps of
/// `batches_per_epoch` (its order and flips derive from the seed and the epoch).
fn loader_position(
    done: usize,
    batches_per_epoch: usize,
) -> std::collections::HashMap<String, String> {
    let position = json!({
        "epoch": done / batches_per_epoch,
        "batch": done % batches_per_epoch,
        "batches_per_epoch": batches_per_epoch,
    });
    [("loader".to_string(), position.to_string())].into()
}

/// On resume from `last` after `done` steps: the loader must stand where the checkpoint
/// says (it does unless the data changed under the run).
fn check_loader_position(last: &Path, done: usize, batches_per_epoch: usize) -> Result<()> {
    if done == 0 || !last.is_file() {
        return Ok(());
    }
    let ckpt = Checkpoint::open(last)?;
    let Some(saved) = ckpt.metadata().get("loader") else {
        return Ok(());
    };
    let expected = &loader_position(done, batches_per_epoch)["loader"];
    let same = serde_json::from_str::<Value>(saved).ok() == serde_json::from_str(expected).ok();
    if !same {
        return Err(Error::Checkpoint {
            path: last.to_path_buf(),
            message: format!(
                "the loader stood at {saved} when saved, it would now stand at {expected}: \
                 has the training data changed?"
            ),
        });
    }
    Ok(())
}

/// COCO box AP of `model` on `val` after `done` steps, as a metrics record.
pub fn validate(
    model: &RetinaNet,
    val: &Dataset,
    tiling: Option<&TileConfig>,
    done: usize,
    batches_per_epoch: usize,
) -> Result<Value> {
    let evaluation = crate::eval::evaluate_model(model, val, tiling)?;
    Ok(validation_record(&evaluation, done, batches_per_epoch))
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_resume_up_to_the_checkpoint_step() {
        let out = std::env::temp_dir().join(format!("retinanet-run-{}", std::process::id()));
        let mut m = Metrics::open(&out, false, 0).unwrap();
        for step in 1..=3 {
            m.push(json!({"step": step}));
        }
        m.flush().unwrap();
        let resumed = Metrics::open(&out, true, 2).unwrap();
        assert_eq!(resumed.records(), [json!({"step": 1}), json!({"step": 2})]);
        assert!(Metrics::open(&out, false, 2).unwrap().records().is_empty());
        std::fs::remove_dir_all(&out).unwrap();
    }

    #[test]
    fn schedules_span_the_run() {
        let s = schedule(90, 2, Some(0.5)).unwrap();
        assert_eq!((s.total_steps, s.base_lr), (90, 0.5));
        assert!(schedule(0, 2, None).is_err());
    }
}
