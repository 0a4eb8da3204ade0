//! Batches for training: shuffled per epoch, decoded and augmented in parallel (rayon) on a
//! background thread that keeps the next batches ready while the model trains.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use image::RgbImage;
use rayon::prelude::*;

use super::{augment, decode_rgb, AugmentConfig, Augmented, DataError, Dataset, Result, Rng};

/// Settings of a [`Loader`].
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Seed of the shuffling and the augmentation.
    pub seed: u64,
    /// Shuffle the samples each epoch (off: dataset order, e.g. for evaluation).
    pub shuffle: bool,
    /// Leave out the last batch of an epoch when it is smaller than `batch_size`.
    pub drop_last: bool,
    /// Batches decoded ahead of the consumer.
    pub prefetch: usize,
    /// Keep decoded images in memory across epochs (for a few large images, such as tiles
    /// of one aerial photo, that would otherwise be decoded once per tile).
    pub cache_images: bool,
    /// Augmentation applied to each sample.
    pub augment: AugmentConfig,
}

impl LoaderConfig {
    /// Training defaults for `batch_size`: shuffled, no augmentation, 2 batches ahead.
    pub fn new(batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            seed,
            shuffle: true,
            drop_last: false,
            prefetch: 2,
            cache_images: false,
            augment: AugmentConfig::default(),
        }
    }
}

/// The ground truth of one training image: what a [`Loader`] yields per image and what
/// [`crate::train::Trainer`] takes (it is `retinanet::train::Target` too).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Target {
    /// An id for messages: the file name (and tile position, see [`super::Sample::name`]), a COCO
    /// id…
    pub id: String,
    /// Boxes `[x1, y1, x2, y2]` in the image's pixels, with x1 < x2 and y1 < y2; empty for an
    /// image of background.
    pub boxes: Vec<[f32; 4]>,
    /// Class index of each box, below the model's class count.
    pub labels: Vec<usize>,
}

impl Target {
    /// `(N, 4)` f32 boxes and `(N,)` u32 labels on `device`.
    pub fn to_tensors(
        &self,
        device: &candle_core::Device,
    ) -> crate::Result<(candle_core::Tensor, candle_core::Tensor)> {
        let flat: Vec<f32> = self.boxes.iter().flatten().copied().collect();
        let boxes = candle_core::Tensor::from_vec(flat, (self.boxes.len(), 4), device)?;
        let labels: Vec<u32> = self.labels.iter().map(|&l| l as u32).collect();
        let labels = candle_core::Tensor::from_vec(labels, self.labels.len(), device)?;
        Ok((boxes, labels))
    }
}

/// A batch of decoded, augmented images and their targets.
#[derive(Debug, Clone)]
pub struct Batch {
    /// RGB images (sizes differ; the model's transform resizes and pads them).
    pub images: Vec<RgbImage>,
    /// Boxes and labels of each image.
    pub targets: Vec<Target>,
    /// Index of each image's sample in [`Dataset::samples`].
    pub ids: Vec<usize>,
    /// Short side chosen for each image by multi-scale augmentation.
    pub min_sizes: Vec<Option<usize>>,
    /// Boxes dropped by random crops in this batch.
    pub dropped_boxes: usize,
    /// Whether each image was flipped horizontally.
    pub flipped: Vec<bool>,
    /// The epoch the batch belongs to.
    pub epoch: usize,
}

/// Makes batches of a dataset. Cheap to clone; the dataset is shared.
#[derive(Debug, Clone)]
pub struct Loader {
    dataset: Arc<Dataset>,
    config: LoaderConfig,
    cache: Arc<Mutex<HashMap<PathBuf, Arc<RgbImage>>>>,
}

impl Loader {
    /// A loader over `dataset`; fails on an empty dataset or invalid settings.
    pub fn new(dataset: impl Into<Arc<Dataset>>, config: LoaderConfig) -> Result<Self> {
        let dataset = dataset.into();
        if config.batch_size == 0 {
            return Err(DataError::Invalid("batch size must be positive".into()));
        }
        if dataset.is_empty() {
            return Err(DataError::Invalid(format!(
                "{}: the dataset has no images",
                dataset.source.display()
            )));
        }
        config.augment.validate()?;
        Ok(Self {
            dataset,
            config,
            cache: Arc::default(),
        })
    }

    /// The dataset.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// The settings.
    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }

    /// Batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        let (n, b) = (self.dataset.len(), self.config.batch_size);
        if self.config.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Sample indices of each batch of `epoch`, in order.
    pub fn epoch_batches(&self, epoch: usize) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.dataset.len()).collect();
        if self.config.shuffle {
            Rng::derive(self.config.seed, epoch as u64, u64::MAX).shuffle(&mut order);
        }
        let mut batches: Vec<Vec<usize>> = order
            .chunks(self.config.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        if self.config.drop_last
            && batches
                .last()
                .is_some_and(|b| b.len() < self.config.batch_size)
        {
            batches.pop();
        }
        batches
    }

    /// Decodes and augments the samples `ids` in parallel as batch of `epoch`. The result
    /// depends only on the seed, the epoch and the ids.
    pub fn load_batch(&self, epoch: usize, ids: &[usize]) -> Result<Batch> {
        let items: Vec<Augmented> = ids
            .par_iter()
            .map(|&id| self.load_item(epoch, id))
            .collect::<Vec<_>>()
            .into_iter()
            .collect::<Result<_>>()?;
        let mut batch = Batch {
            images: Vec::with_capacity(ids.len()),
            targets: Vec::with_capacity(ids.len()),
            ids: ids.to_vec(),
            min_sizes: Vec::with_capacity(ids.len()),
            dropped_boxes: 0,
            flipped: Vec::with_capacity(ids.len()),
            epoch,
        };
        for (item, &id) in items.into_iter().zip(ids) {
            batch.images.push(item.image);
            batch.targets.push(Target {
                id: self.dataset.samples[id].name(),
                boxes: item.boxes,
                labels: item.labels,
            });
            batch.min_sizes.push(item.min_size);
            batch.dropped_boxes += item.dropped;
            batch.flipped.push(item.flipped);
        }
        Ok(batch)
    }

    fn load_item(&self, epoch: usize, id: usize) -> Result<Augmented> {
        let sample = self.dataset.samples.get(id).ok_or_else(|| {
            DataError::Invalid(format!(
                "sample {id} out of range ({} samples)",
                self.dataset.len()
            ))
        })?;
        let image = if self.config.cache_images {
            sample.crop_decoded(&*self.cached(&sample.image_path)?)?
        } else {
            sample.load_image()?
        };
        let mut rng = Rng::derive(self.config.seed, epoch as u64, id as u64);
        Ok(augment(
            image,
            &sample.boxes,
            &sample.labels,
            &self.config.augment,
            &mut rng,
        ))
    }

    fn cached(&self, path: &PathBuf) -> Result<Arc<RgbImage>> {
        let hit = self.cache.lock().ok().and_then(|c| c.get(path).cloned());
        if let Some(image) = hit {
            return Ok(image);
        }
        let image = Arc::new(decode_rgb(path)?);
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(path.clone(), image.clone());
        }
        Ok(image)
    }

    /// The batches of one epoch, prepared on a background thread.
    pub fn epoch(&self, epoch: usize) -> Batches {
        self.spawn(epoch, Some(epoch + 1))
    }

    /// Batches of epoch `start_epoch`, then the next epochs, without end (for training by
    /// step count; stop by dropping the iterator).
    pub fn stream(&self, start_epoch: usize) -> Batches {
        self.spawn(start_epoch, None)
    }

    fn spawn(&self, start: usize, end: Option<usize>) -> Batches {
        let (sender, receiver) = sync_channel(self.config.prefetch.max(1));
        let loader = self.clone();
        let handle = std::thread::spawn(move || {
            let mut epoch = start;
            while end.is_none_or(|e| epoch < e) {
                for ids in loader.epoch_batches(epoch) {
                    // A closed channel means the consumer is gone: stop.
                    if sender.send(loader.load_batch(epoch, &ids)).is_err() {
                        return;
                    }
                }
                epoch += 1;
            }
        });
        Batches {
            receiver: Some(receiver),
            handle: Some(handle),
        }
    }
}

/// Iterator over prefetched batches; a batch whose image fails to decode comes as an
/// error and the following batches still come.
#[derive(Debug)]
pub struct Batches {
    receiver: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.receiver.as_ref()?.recv().ok()
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        // Closing the channel first lets the producer's pending send fail so it exits.
        self.receiver.take();
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}
