//! Files and downloads: checkpoint reading, the model zoo and the Hugging Face / torchvision
//! downloads behind it.

pub mod checkpoint;
pub mod hub;
pub mod zoo;
