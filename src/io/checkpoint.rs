//! Reading torchvision checkpoints: `.safetensors` (memory-mapped) and zip-format `.pth`.
//!
//! Tensor names are normalised to torchvision's current layout (pre-0.13 head and FPN keys,
//! a `module.` or DeepForest's legacy `model.` prefix and `num_batches_tracked` buffers are
//! accepted), and the model is built
//! through a [`VarBuilder`] backend
//! that checks every shape and records which tensors were used, so missing, mis-shaped and
//! unexpected tensors are reported by name.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{pickle::PthTensors, DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::{Error, Result};

enum Store {
    Safetensors(MmapedSafetensors),
    Pth(PthTensors),
}

struct Inner {
    path: PathBuf,
    store: Store,
    /// Canonical name → (name in the file, shape).
    tensors: BTreeMap<String, (String, Vec<usize>)>,
    metadata: HashMap<String, String>,
}

/// An opened checkpoint. Cheap to clone.
#[derive(Clone)]
pub struct Checkpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.inner.path)
            .field("tensors", &self.inner.tensors.len())
            .finish()
    }
}

/// torchvision's current name for a tensor stored under `name`, or `None` for buffers the
/// model does not use.
pub fn canonical_name(name: &str) -> Option<String> {
    let name = name.strip_prefix("module.").unwrap_or(name);
    // DeepForest's older Hub revisions (and its Lightning checkpoints) nest the model under
    // `model.`; its `_strip_legacy_prefix` drops it the same way.
    let name = name.strip_prefix("model.").unwrap_or(name);
    // Training checkpoints carry the optimiser's state beside the model.
    if name.ends_with("num_batches_tracked")
        || name.starts_with(crate::train::checkpoint::OPTIMIZER_PREFIX)
    {
        return None;
    }
    let parts: Vec<&str> = name.split('.').collect();
    // Pre-0.13 FPN: backbone.fpn.{inner,layer}_blocks.{i}.{weight,bias}.
    if let ["backbone", "fpn", blocks @ ("inner_blocks" | "layer_blocks"), i, leaf] = parts[..] {
        return Some(format!("backbone.fpn.{blocks}.{i}.0.{leaf}"));
    }
    // Pre-0.13 heads: conv.{0,2,4,6}.{weight,bias} with ReLUs between.
    if let ["head", head, "conv", j, leaf] = parts[..] {
        if let Ok(j) = j.parse::<usize>() {
            if j % 2 == 0 {
                return Some(format!("head.{head}.conv.{}.0.{leaf}", j / 2));
            }
        }
    }
    Some(name.to_string())
}

impl Checkpoint {
    /// Opens `.safetensors` or `.pth` (by extension; other names are tried as both).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(Error::Checkpoint {
                path,
                message: "no such file".into(),
            });
        }
        // The content decides, not the name: a safetensors file renamed `.pth` is common.
        let (store, raw) = match sniff(&path)? {
            Some(Kind::Safetensors) => open_safetensors(&path)?,
            Some(Kind::Zip) => open_pth(&path)?,
            Some(Kind::LegacyPickle) => {
                return Err(Error::Checkpoint {
                    path,
                    message: "a legacy (pre-1.6, non-zip) torch.save file: re-save it with \
                              torch.save in PyTorch ≥ 1.6, or convert it to safetensors"
                        .into(),
                })
            }
            None => {
                return Err(Error::Checkpoint {
                    path,
                    message: "neither safetensors nor a zip-format .pth (by content)".into(),
                })
            }
        };
        let metadata = match store {
            Store::Safetensors(_) => read_safetensors_metadata(&path)?,
            Store::Pth(_) => HashMap::new(),
        };
        let mut tensors = BTreeMap::new();
        for (stored, shape) in raw {
            if let Some(name) = canonical_name(&stored) {
                tensors.insert(name, (stored, shape));
            }
        }
        if tensors.is_empty() {
            return Err(Error::Checkpoint {
                path,
                message: "holds no tensors".into(),
            });
        }
        Ok(Self {
            inner: Arc::new(Inner {
                path,
                store,
                tensors,
                metadata,
            }),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Canonical tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.inner.tensors.keys().map(String::as_str)
    }

    /// Shape of a tensor by canonical name.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.inner.tensors.get(name).map(|(_, s)| s.as_slice())
    }

    /// safetensors `__metadata__` (empty for `.pth`).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.inner.metadata
    }

    /// Class names from the metadata key `class_names` (a JSON array), if present.
    pub fn class_names(&self) -> Result<Option<Vec<String>>> {
        match self.metadata().get("class_names") {
            None => Ok(None),
            Some(s) => serde_json::from_str(s).map(Some).map_err(|e| {
                self.err(format!(
                    "metadata `class_names` is not a JSON array of strings: {e}"
                ))
            }),
        }
    }

    /// The input size the model was trained at, `(min_size, max_size)` from the metadata keys
    /// `min_size` and `max_size` (written by [`crate::train::Trainer`]), if both are present.
    pub fn input_size(&self) -> Result<Option<(usize, usize)>> {
        let get = |key: &str| -> Result<Option<usize>> {
            match self.metadata().get(key) {
                None => Ok(None),
                Some(s) => s.trim().parse().map(Some).map_err(|_| {
                    self.err(format!("metadata `{key}` is not a positive integer: {s:?}"))
                }),
            }
        };
        match (get("min_size")?, get("max_size")?) {
            (Some(min), Some(max)) if min > 0 && max >= min => {
                // A downloaded file controls these: bound them before any buffer is sized.
                let source = format!("{}: metadata", self.inner.path.display());
                crate::limits::check_input_size(min, max, &source)?;
                Ok(Some((min, max)))
            }
            (None, None) => Ok(None),
            (min, max) => Err(self.err(format!(
                "metadata `min_size` {min:?} and `max_size` {max:?} do not make an input size"
            ))),
        }
    }

    fn err(&self, message: String) -> Error {
        Error::Checkpoint {
            path: self.inner.path.clone(),
            message,
        }
    }

    /// A [`VarBuilder`] over this checkpoint and the tracker of which tensors it served.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> (VarBuilder<'static>, Usage) {
        let usage = Usage::default();
        let served = Served {
            ckpt: self.clone(),
            usage: usage.clone(),
        };
        (var_builder(served, dtype, device), usage)
    }

    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (stored, _) = &self.inner.tensors[name];
        let t = match &self.inner.store {
            Store::Safetensors(st) => st.load(stored, device)?,
            Store::Pth(pth) => contain(&self.inner.path, || pth.get(stored))??
                .ok_or_else(|| self.err(format!("tensor `{stored}` vanished")))?
                .to_device(device)?,
        };
        Ok(t)
    }

    /// Runs `build` against this checkpoint and checks that every tensor was used, turning
    /// shape and name failures into errors that name the tensor.
    pub fn build<T>(
        &self,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder<'static>) -> candle_core::Result<T>,
    ) -> Result<T> {
        let (vb, usage) = self.var_builder(dtype, device);
        let built = build(vb);
        if let Some(e) = usage.take_error() {
            return Err(e);
        }
        let model = built?;
        let used = usage.used();
        let unused: Vec<String> = self
            .names()
            .filter(|n| !used.contains(*n))
            .map(|n| self.inner.tensors[n].0.clone())
            .collect();
        if !unused.is_empty() {
            return Err(Error::UnexpectedTensors {
                path: self.inner.path.clone(),
                names: unused,
            });
        }
        Ok(model)
    }
}

/// Which tensors a [`Checkpoint`]'s `VarBuilder` served, and its first typed error.
#[derive(Clone, Default)]
pub struct Usage {
    used: Arc<Mutex<HashSet<String>>>,
    error: Arc<Mutex<Option<Error>>>,
}

impl Usage {
    /// Canonical names served so far.
    pub fn used(&self) -> HashSet<String> {
        self.used.lock().map(|u| u.clone()).unwrap_or_default()
    }

    fn take_error(&self) -> Option<Error> {
        self.error.lock().ok().and_then(|mut e| e.take())
    }

    fn fail(&self, e: Error) -> candle_core::Error {
        let msg = candle_core::Error::Msg(e.to_string());
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
        msg
    }
}

/// What a model being built asks a [`TensorStore`] for.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// Full name, e.g. `backbone.body.conv1.weight`.
    pub name: &'a str,
    /// The shape the model expects.
    pub shape: &'a [usize],
    /// The initialisation the model declares for a new tensor (ignored by stores that
    /// hold values).
    pub init: candle_nn::Init,
    /// The data type the model asks for.
    pub dtype: DType,
    /// The device the model lives on.
    pub device: &'a Device,
}

/// A source of named tensors a model is built from: a checkpoint, the training parameter
/// store, a recorder of what the model declares. One adapter makes each a [`VarBuilder`]
/// backend ([`var_builder`]).
pub trait TensorStore: Send + Sync + 'static {
    /// The tensor `request` asks for; an error says which tensor and why.
    fn tensor(&self, request: &Request) -> candle_core::Result<Tensor>;
    /// Whether the store holds `name`.
    fn contains(&self, name: &str) -> bool;
}

/// A [`VarBuilder`] over `store`, making tensors of `dtype` on `device`.
pub fn var_builder(store: impl TensorStore, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(Backend(store)), dtype, device.clone())
}

struct Backend<S>(S);

impl<S: TensorStore> SimpleBackend for Backend<S> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        init: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0.tensor(&Request {
            name,
            shape: s.dims(),
            init,
            dtype,
            device,
        })
    }

    /// Every tensor of a RetinaNet has a known shape: a request without one is a bug.
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("`{name}` asked for without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// A checkpoint serving a build, recording what it served.
struct Served {
    ckpt: Checkpoint,
    usage: Usage,
}

impl TensorStore for Served {
    fn tensor(&self, request: &Request) -> candle_core::Result<Tensor> {
        let (name, expected) = (request.name, request.shape);
        let path = self.ckpt.inner.path.clone();
        let Some(actual) = self.ckpt.shape(name) else {
            return Err(self.usage.fail(Error::MissingTensor {
                path,
                name: name.to_string(),
                expected: expected.to_vec(),
            }));
        };
        if actual != expected {
            return Err(self.usage.fail(Error::ShapeMismatch {
                path,
                name: name.to_string(),
                expected: expected.to_vec(),
                actual: actual.to_vec(),
            }));
        }
        if let Ok(mut used) = self.usage.used.lock() {
            used.insert(name.to_string());
        }
        let t = self
            .ckpt
            .load(name, request.device)
            .map_err(|e| self.usage.fail(e))?;
        t.to_dtype(request.dtype)
    }

    fn contains(&self, name: &str) -> bool {
        self.ckpt.shape(name).is_some()
    }
}

type RawList = Vec<(String, Vec<usize>)>;

thread_local! {
    /// Set while [`contain`] runs on this thread: its panics are errors, not messages.
    static CONTAINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `read` (Candle's `.pth` reader), turning a panic inside it into an error naming
/// `path`: the reader indexes into what a malformed pickle says (found by `tests/fuzz.rs`).
/// The panic message is kept off standard error for this thread only; other panics still
/// reach the previous hook.
fn contain<T>(path: &Path, read: impl FnOnce() -> T) -> Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CONTAINED.with(|c| c.get()) {
                previous(info);
            }
        }));
    });
    let was = CONTAINED.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read));
    CONTAINED.with(|c| c.set(was));
    result.map_err(|_| Error::Checkpoint {
        path: path.to_path_buf(),
        message: "malformed .pth: its pickle does not describe tensors as torch.save writes \
                  them"
            .into(),
    })
}

/// A checkpoint file's format by its first bytes.
enum Kind {
    /// An 8-byte little-endian header length, then a JSON object.
    Safetensors,
    /// A zip archive: PyTorch ≥ 1.6's `torch.save`.
    Zip,
    /// A bare pickle (protocol 2+): older `torch.save`.
    LegacyPickle,
}

fn sniff(path: &Path) -> Result<Option<Kind>> {
    use std::io::Read;
    let mut head = Vec::with_capacity(9);
    std::fs::File::open(path)
        .and_then(|f| f.take(9).read_to_end(&mut head))
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(match head.as_slice() {
        [b'P', b'K', 3, 4, ..] => Some(Kind::Zip),
        [0x80, 2..=5, ..] => Some(Kind::LegacyPickle),
        [_, _, _, _, _, _, _, _, b'{'] => Some(Kind::Safetensors),
        _ => None,
    })
}

fn open_safetensors(path: &Path) -> Result<(Store, RawList)> {
    // SAFETY: the file is mapped read-only; like every mmap reader we assume it is not
    // truncated while in use.
    let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("not a readable safetensors file: {e}"),
    })?;
    let raw = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec()))
        .collect();
    Ok((Store::Safetensors(st), raw))
}

fn open_pth(path: &Path) -> Result<(Store, RawList)> {
    let err = |message: String| Error::Checkpoint {
        path: path.to_path_buf(),
        message,
    };
    crate::io::pickle::check_pth(path)?;
    // A bare state dict, or one nested under a usual key of training checkpoints.
    let mut last_err = None;
    for key in [None, Some("model"), Some("state_dict")] {
        match contain(path, || PthTensors::new(path, key))? {
            Ok(pth) if !pth.tensor_infos().is_empty() => {
                let raw = pth
                    .tensor_infos()
                    .iter()
                    .map(|(n, info)| (n.clone(), info.layout.shape().dims().to_vec()))
                    .collect();
                return Ok((Store::Pth(pth), raw));
            }
            Ok(_) => {}
            Err(e) => last_err = Some(e),
        }
    }
    Err(err(match last_err {
        Some(e) => format!(
            "not a readable zip-format .pth (PyTorch ≥ 1.6): {e}; convert it to safetensors \
             or re-save it with torch.save"
        ),
        None => "no tensors found (looked at the top level, `model` and `state_dict`)".into(),
    }))
}

/// Reads the `__metadata__` map of a safetensors header.
fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    use std::io::Read;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    // The length comes from the file: check it against the file before allocating.
    let size = f.metadata().map_err(io)?.len();
    if len > size.saturating_sub(8) {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            message: format!("bad safetensors header: {len} bytes long in a {size}-byte file"),
        });
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(io)?;
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__", default)]
        metadata: HashMap<String, String>,
    }
    let h: Header = serde_json::from_slice(&header).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("bad safetensors header: {e}"),
    })?;
    Ok(h.metadata)
}

#[cfg(test)]
mod tests {
    use super::{canonical_name, Checkpoint};
    use std::collections::HashMap;

    /// A one-tensor safetensors file with `metadata`, opened.
    fn with_metadata(name: &str, metadata: &[(&str, &str)]) -> (Checkpoint, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("retinanet-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.safetensors"));
        let t = candle_core::Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
        let meta: HashMap<String, String> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let bytes = safetensors::serialize([("x", &t)], Some(meta)).unwrap();
        std::fs::write(&path, bytes).unwrap();
        (Checkpoint::open(&path).unwrap(), path)
    }

    #[test]
    fn the_content_decides_the_format_and_bad_headers_are_errors() {
        let (_, path) = with_metadata("renamed", &[("bn_eps", "0")]);
        let pth = path.with_extension("pth");
        std::fs::copy(&path, &pth).unwrap();
        assert!(Checkpoint::open(&pth).unwrap().shape("x").is_some());
        // A header length far beyond the file: an error, nothing allocated.
        let huge = path.with_file_name("huge.safetensors");
        std::fs::write(&huge, [&[0xFF; 7][..], &[0x7F], b"{}"].concat()).unwrap();
        let e = Checkpoint::open(&huge).unwrap_err().to_string();
        assert!(e.contains("huge.safetensors"), "{e}");
        let legacy = path.with_file_name("legacy.pth");
        std::fs::write(&legacy, b"\x80\x02}q\x00.").unwrap();
        let e = Checkpoint::open(&legacy).unwrap_err().to_string();
        assert!(e.contains("legacy") && e.contains("torch.save"), "{e}");
    }

    #[test]
    fn input_size_from_metadata() {
        let (c, _) = with_metadata("sized", &[("min_size", "400"), ("max_size", "400")]);
        assert_eq!(c.input_size().unwrap(), Some((400, 400)));
        let (c, _) = with_metadata("unsized", &[("bn_eps", "1e-5")]);
        assert_eq!(c.input_size().unwrap(), None);
        for (name, meta) in [
            ("half", [("min_size", "400"), ("bn_eps", "0")]),
            ("text", [("min_size", "big"), ("max_size", "400")]),
            ("inverted", [("min_size", "800"), ("max_size", "400")]),
        ] {
            let (c, path) = with_metadata(name, &meta);
            let e = c.input_size().unwrap_err().to_string();
            assert!(
                e.contains(&path.display().to_string()) && e.contains("min_size"),
                "{name}: {e}"
            );
        }
    }

    #[test]
    fn old_layouts_map_to_current_names() {
        assert_eq!(
            canonical_name("head.classification_head.conv.6.bias").unwrap(),
            "head.classification_head.conv.3.0.bias"
        );
        assert_eq!(
            canonical_name("backbone.fpn.inner_blocks.2.weight").unwrap(),
            "backbone.fpn.inner_blocks.2.0.weight"
        );
        assert_eq!(
            canonical_name("module.head.regression_head.conv.1.0.weight").unwrap(),
            "head.regression_head.conv.1.0.weight"
        );
        assert!(canonical_name("backbone.body.bn1.num_batches_tracked").is_none());
    }
}
