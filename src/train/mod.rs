//! Training and fine-tuning, following torchvision's RetinaNet recipe.
//!
//! The pieces, in the order a training step uses them:
//!
//! - [`params`]: the parameter store: initialisation of new layers (the paper's N(0, 0.01)
//!   and prior-probability bias), partial loading from a RetinaNet or ImageNet ResNet
//!   checkpoint, and which tensors train (torchvision's `trainable_backbone_layers`);
//! - [`crate::model::matcher`]: anchor ↔ ground-truth matching (IoU ≥ 0.5 foreground, < 0.4
//!   background, low-quality matches kept), on the host;
//! - [`crate::model::focal_loss`]: sigmoid focal loss and the box losses (L1, smooth L1,
//!   GIoU), differentiable;
//! - [`optim`]: SGD with momentum and weight decay, gradient-norm clipping;
//! - [`schedule`]: the learning rate per step (warm-up, decays);
//! - [`checkpoint`]: atomic training checkpoints (model + optimiser state);
//! - [`trainer`]: [`Trainer`], which ties them into one step on a batch.

pub mod checkpoint;
pub mod optim;
pub mod params;
pub mod run;
pub mod schedule;
pub mod trainer;

pub use crate::model::focal_loss::{BoxLoss, LossConfig, Losses};
pub use crate::model::matcher::Matcher;
pub use optim::{Sgd, SgdConfig};
pub use params::{BackboneNorm, ParamStore, Role, Start};
pub use schedule::{LrSchedule, PAPER_BATCH, PAPER_STEPS};
pub use trainer::{StepStats, Target, TrainConfig, Trainer};
