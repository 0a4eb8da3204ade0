//! Training checkpoints as one file: the model under torchvision's names, which
//! [`crate::RetinaNet::load`] reads unchanged (metadata `bn_eps`, `class_names`, `step`, input
//! size), the optimiser's momentum buffers under [`OPTIMIZER_PREFIX`] (which model loading
//! ignores), and in the sorted metadata the optimiser settings and whatever the run adds (its
//! loader position). The loader's order and augmentation derive from (seed, epoch), so the
//! step and the run's settings restore them.
//!
//! The file is written to a temporary, synced and renamed over the previous checkpoint in one
//! rename ([`crate::io::atomic`]): a kill at any instant leaves the previous checkpoint or the
//! new one, both complete. Checkpoints of the older two-file layout (`<stem>.optim.safetensors`
//! beside the model) are still read.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Prefix of the optimiser's tensors in a checkpoint: `optimizer.momentum.<parameter>`.
pub const OPTIMIZER_PREFIX: &str = "optimizer.momentum.";

/// The metadata key of the optimiser settings, present in every one-file checkpoint.
pub const OPTIMIZER_KEY: &str = "optimizer";

/// The optimiser-state file of the older two-file layout for model checkpoint `path`.
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
/// shipping; the loader converts back to f32). The header's keys are sorted, so the same
/// tensors and metadata always give the same bytes.
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
    let cannot = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    let bytes = safetensors::serialize(host.iter().map(|(n, t)| (n, t)), Some(metadata))
        .map_err(|e| cannot(format!("cannot serialise: {e}")))?;
    let bytes = sort_header(&bytes).map_err(cannot)?;
    crate::io::atomic::write_atomic(path, &bytes)
}

/// Rewrites a serialised safetensors file's JSON header with its keys sorted (`safetensors`
/// writes the metadata map in hash order, which differs from run to run). The data and its
/// offsets are unchanged; the header is padded with spaces to 8 bytes, as `safetensors` does.
pub fn sort_header(bytes: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or("shorter than a safetensors header")?;
    let len = usize::try_from(u64::from_le_bytes(len_bytes)).map_err(|e| e.to_string())?;
    let header = bytes
        .get(8..8usize.saturating_add(len))
        .ok_or("header longer than the file")?;
    // serde_json's map is a BTreeMap: parsing and writing again sorts every object.
    let value: serde_json::Value =
        serde_json::from_slice(header).map_err(|e| format!("bad header: {e}"))?;
    let mut sorted = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    sorted.resize(sorted.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&(sorted.len() as u64).to_le_bytes());
    out.extend_from_slice(&sorted);
    out.extend_from_slice(&bytes[8 + len..]);
    Ok(out)
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

/// The momentum buffers of the checkpoint `path` at `step`: from its own
/// [`OPTIMIZER_PREFIX`] tensors, or for the older layout from the optimiser file beside it,
/// which must be at the same step.
pub fn optimizer_state(
    path: &Path,
    step: usize,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let (tensors, metadata) = read_safetensors(path, device)?;
    if metadata.contains_key(OPTIMIZER_KEY) {
        let buffers = tensors.into_iter().filter_map(|(name, t)| {
            let param = name.strip_prefix(OPTIMIZER_PREFIX)?;
            Some((param.to_string(), t))
        });
        return Ok(buffers.collect());
    }
    let opath = optim_path(path);
    if !opath.is_file() {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            message: "holds no optimiser state: a model, not a training checkpoint".into(),
        });
    }
    let (buffers, ometa) = read_safetensors(&opath, device)?;
    let ostep = step_of(&opath, &ometa)?;
    if ostep != step {
        return Err(Error::Checkpoint {
            path: opath,
            message: format!("optimiser state is at step {ostep}, the model at step {step}"),
        });
    }
    Ok(buffers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_sorted_and_the_data_kept() {
        let t = Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let tensors = [("b", &t), ("a", &t)];
        let mut meta = HashMap::new();
        for k in ["zeta", "alpha", "mid", "beta", "omega"] {
            meta.insert(k.to_string(), k.to_uppercase());
        }
        let bytes = safetensors::serialize(tensors, Some(meta)).unwrap();
        let sorted = sort_header(&bytes).unwrap();
        let len = u64::from_le_bytes(sorted[..8].try_into().unwrap()) as usize;
        assert_eq!(len % 8, 0);
        let header = std::str::from_utf8(&sorted[8..8 + len]).unwrap();
        let keys = ["\"alpha\"", "\"beta\"", "\"mid\"", "\"omega\"", "\"zeta\""];
        let at: Vec<usize> = keys.iter().map(|k| header.find(k).unwrap()).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{header}");
        let st = safetensors::SafeTensors::deserialize(&sorted).unwrap();
        assert_eq!(st.tensor("a").unwrap().data(), t_bytes(&t));
        assert_eq!(sort_header(&sorted).unwrap(), sorted, "idempotent");
        assert!(sort_header(&sorted[..5]).is_err());
    }

    fn t_bytes(t: &Tensor) -> Vec<u8> {
        t.to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }
}
