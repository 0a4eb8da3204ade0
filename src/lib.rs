//! RetinaNet ("Focal Loss for Dense Object Detection", Lin et al., 2017) on Candle.
//!
//! Module and tensor names mirror torchvision's, so its checkpoints load unchanged and give
//! its detections. An image follows the paper's parts, one file each under [`model`], top to
//! bottom:
//!
//! image → [`model::transform`] (normalise, resize, pad into an [`ImageBatch`]) →
//! [`model::backbone`] (C3–C5) → [`model::fpn`] (P3–P7) → [`model::head`] (class logits and
//! box deltas) + [`model::anchors`] → [`model::postprocess`] ([`model::box_coder`], [`boxes`]'
//! NMS) → [`Detection`]s.
//!
//! Training adds [`model::matcher`] (anchors ↔ ground truth) and [`model::focal_loss`], and
//! [`train`] runs the steps (parameter store, SGD, schedule, checkpoints) over [`data`].
//! [`eval`] scores detections as pycocotools does. [`io`] reads checkpoints, resolves and
//! downloads models ([`zoo::resolve`]), writes files atomically and draws annotated images;
//! [`io::hub_repo`] reads and writes Hugging Face model repos as DeepForest does;
//! [`tiling`] runs large images in windows (DeepForest's `predict_tile` among them) and
//! [`geo`] reads GeoTIFFs window by window and writes boxes in map coordinates.
//! [`layers`] holds the building blocks (convolutions, norms, pools) in their inference and
//! training forms, running on fast CPU kernels kept internal to the crate.
//!
//! ```no_run
//! # fn main() -> Result<(), retinanet::Error> {
//! let device = candle_core::Device::Cpu;
//! let model = retinanet::RetinaNet::load("retinanet.safetensors", &device)?;
//! let image = image::open("photo.jpg").map_err(|e| retinanet::Error::Image {
//!     path: "photo.jpg".into(),
//!     source: e,
//! })?;
//! for det in model.detect(&image.to_rgb8())? {
//!     println!("{:?} {:.3} {}", det.bbox, det.score, det.label);
//! }
//! # Ok(())
//! # }
//! ```

pub mod boxes;
pub mod classes;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod geo;
pub mod io;
/// The CPU kernels behind [`layers`]: internal, public only for the crate's benchmarks.
#[doc(hidden)]
pub mod kernels;
pub mod layers;
pub mod limits;
pub mod model;
pub mod tiling;
pub mod train;

pub use error::{Error, Result};
pub use eval::evaluate_model;
pub use io::checkpoint::Checkpoint;
pub use io::load::LoadOptions;
pub use io::zoo;
pub use io::zoo::{resolve, ModelSource};
pub use kernels::Kernels;
pub use layers::conv::Precision;
pub use model::postprocess::{Detection, PostProcessConfig};
pub use model::transform::{ImageBatch, TransformConfig};
pub use model::{RawOutput, RetinaNet, RetinaNetConfig};
