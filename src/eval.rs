//! COCO evaluation (being written).

/// Evaluation errors.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(pub String);
