//! Layers the model is built from, each with its inference and training forms side by side.

pub mod norm;
