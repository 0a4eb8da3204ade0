//! Layers the model is built from, each with its inference and training forms side by side.

pub mod conv;
pub mod conv_train;
pub mod layout;
pub mod norm;
pub mod pool;
