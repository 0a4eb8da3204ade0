//! RetinaNet ("Focal Loss for Dense Object Detection", Lin et al., 2017) on Candle.
//!
//! Module and tensor names mirror torchvision's, so its checkpoints load unchanged and give
//! its detections. The data flow reads top to bottom:
//!
//! image → [`transform`] → [`backbone`] (C3–C5) → [`fpn`] (P3–P7) → [`head`] →
//! [`anchors`] + [`box_coder`] → [`postprocess`] → [`Detection`]s.
//!
//! [`model::RetinaNet`] ties the pieces together; [`checkpoint`] reads `.safetensors` and
//! `.pth` files and infers the architecture from them.
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
pub mod io;
pub mod kernels;
pub mod layers;
pub mod model;
pub mod tiling;
pub mod train;

pub use error::{Error, Result};
pub use io::checkpoint::Checkpoint;
pub use io::load::LoadOptions;
pub use io::zoo;
pub use model::postprocess::{Detection, PostProcessConfig};
pub use model::transform::TransformConfig;
pub use model::{RawOutput, RetinaNet, RetinaNetConfig};
