//! Library errors. Every variant names its culprit: a file, a tensor, a shape.

use std::path::PathBuf;

/// Errors returned by this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside Candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// An image could not be decoded.
    #[error("{path}: cannot read image: {source}")]
    Image {
        /// The image file.
        path: PathBuf,
        /// The decoder's error.
        source: image::ImageError,
    },

    /// A checkpoint could not be opened or parsed.
    #[error("{path}: {message}")]
    Checkpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// The model asked for a tensor the checkpoint does not hold.
    #[error("{path}: missing tensor `{name}` (model expects shape {expected:?})")]
    MissingTensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor name (torchvision's naming).
        name: String,
        /// The shape the model expects.
        expected: Vec<usize>,
    },

    /// A tensor has a different shape in the checkpoint than in the model.
    #[error("{path}: tensor `{name}` has shape {actual:?} in the checkpoint, the model expects {expected:?}")]
    ShapeMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape stored in the checkpoint.
        actual: Vec<usize>,
    },

    /// The checkpoint holds tensors the model does not use.
    #[error("{path}: {} unexpected tensor(s) for this architecture: {}", names.len(), names.join(", "))]
    UnexpectedTensors {
        /// The checkpoint file.
        path: PathBuf,
        /// Their names.
        names: Vec<String>,
    },

    /// A configuration value or an input is invalid.
    #[error("{0}")]
    Invalid(String),

    /// A download failed, or offline mode forbade it.
    #[error("{url}: {message}")]
    Download {
        /// The URL of the file.
        url: String,
        /// What went wrong.
        message: String,
    },

    /// A downloaded file does not have the expected sha256; it was not cached.
    #[error("{url}: checksum mismatch: sha256 {actual} does not match the expected {expected}; the file was discarded")]
    ChecksumMismatch {
        /// The URL of the file.
        url: String,
        /// The expected sha256 (or its published prefix), hex.
        expected: String,
        /// The sha256 of the downloaded bytes, hex.
        actual: String,
    },

    /// Training met a NaN or infinite loss; the weights were not updated.
    #[error("non-finite loss at step {step} (classification {classification}, box {box_regression}) on images [{}]; last good checkpoint: {}", images.join(", "), checkpoint.as_ref().map_or_else(|| "none saved".to_string(), |p| p.display().to_string()))]
    NonFiniteLoss {
        /// The step (0-based) whose loss was not finite.
        step: usize,
        /// The classification loss.
        classification: f32,
        /// The box loss.
        box_regression: f32,
        /// Ids of the batch's images.
        images: Vec<String>,
        /// The last checkpoint written, if any.
        checkpoint: Option<PathBuf>,
    },

    /// COCO evaluation failed.
    #[error(transparent)]
    Eval(#[from] crate::eval::EvalError),

    /// A dataset could not be loaded or batched.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
