//! Files and downloads: checkpoint reading, model loading and resolution, the model zoo and
//! the Hugging Face / torchvision downloads behind it, atomic writes and annotated images.

pub mod annotate;
pub mod atomic;
pub mod checkpoint;
pub mod hub;
pub mod hub_repo;
pub mod load;
pub mod pickle;
pub mod results;
pub mod zoo;
