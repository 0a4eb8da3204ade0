//! Training checkpoints: the model as a torchvision-named safetensors file that
//! [`crate::RetinaNet::load`] reads unchanged (metadata `bn_eps`, `class_names`, `step`), and
//! beside it `<stem>.optim.safetensors` with the momentum buffers and the step.
//!
//! Each file is written atomically ([`crate::io::atomic`]), so a crash leaves either the old
//! file or the new one. The optimiser state is written first; resume checks that both
//! files carry the same step.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// The optimiser-state file that goes with model checkpoint `path`.
pub fn optim_path(path: &Path) -> PathBuf {
    path.with_extension("optim.safetensors")
}

/// Writes `tensors` (converted to f32, on the host) with `metadata` to `path` atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    write_safetensors_as(path, tensors, metadata, DType::F32)
}

/// As [`write_safetensors`], with the tensors converted to `dtype` (f16 halves a model for
/// shipping; the loader converts back to f32).
pub fn write_safetensors_as(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
    dtype: DType,
) -> Result<()> {
    let host = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_dtype(dtype)?.to_device(&Device::Cpu)?)))
        .collect::<Result<Vec<_>>>()?;
    let bytes =
        safetensors::serialize(host.iter().map(|(n, t)| (n, t)), Some(metadata)).map_err(|e| {
            Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!("cannot serialise: {e}"),
            }
        })?;
    crate::io::atomic::write_atomic(path, &bytes)
}

/// Reads every tensor of a safetensors file and its metadata.
pub fn read_safetensors(
    path: &Path,
    device: &Device,
) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    let ckpt = crate::Checkpoint::open(path)?;
    let metadata = ckpt.metadata().clone();
    let tensors = candle_core::safetensors::load(path, device).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("cannot read: {e}"),
    })?;
    Ok((tensors.into_iter().collect(), metadata))
}

/// The `step` metadata of a checkpoint file.
pub fn step_of(path: &Path, metadata: &HashMap<String, String>) -> Result<usize> {
    metadata
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Checkpoint {
            path: path.to_path_buf(),
            message: "no `step` metadata: not a training checkpoint".into(),
        })
}
