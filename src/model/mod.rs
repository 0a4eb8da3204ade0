//! The detector of the paper, one file per part, in the order an image flows through them:
//!
//! - [`config`]: the architecture, built or inferred from a checkpoint (§4);
//! - [`transform`]: RGB image → normalised, resized, zero-padded batch tensor (§5);
//! - [`backbone`]: ResNet, C3–C5 (§4, "Feature Pyramid Network Backbone");
//! - [`fpn`]: the pyramid P3–P7 (§4, "Feature Pyramid Network Backbone");
//! - [`head`]: the classification and box subnets, with their initialisation (§4, §4.1);
//! - [`anchors`]: 9 anchors per location (§4, "Anchors");
//! - [`box_coder`]: box deltas ↔ boxes (§4, "Box Regression Subnet");
//! - [`postprocess`]: score threshold, top-k per level, decoding, NMS (§4.1, "Inference");
//! - [`matcher`]: anchor ↔ ground-truth assignment for training (§4, "Anchors");
//! - [`focal_loss`]: the focal loss and the box losses (§3, §4.1);
//! - [`retinanet`]: [`RetinaNet`], which ties them together.

pub mod anchors;
pub mod backbone;
pub mod box_coder;
pub mod config;
pub mod focal_loss;
pub mod fpn;
pub mod head;
pub mod matcher;
pub mod postprocess;
pub mod retinanet;
pub mod transform;

pub use config::RetinaNetConfig;
pub use retinanet::{RawOutput, RetinaNet};
