//! The parameters of a RetinaNet in training: their initial values, where they come from, and
//! which of them train.
//!
//! A [`ParamStore`] holds every tensor of the model under torchvision's names. Trained ones
//! are Candle [`Var`]s; frozen ones (the backbone stages torchvision freezes, and every
//! frozen batch-norm buffer) are plain tensors, so autograd neither computes their gradients
//! nor back-propagates below the first trained layer. The running statistics of batch norms
//! that train ([`BackboneNorm::Batch`]) are buffers: variables the model updates in place,
//! outside the optimiser. The model is built from the store with
//! [`ParamStore::var_builder`], and sees optimiser updates because a `Var` is updated in place.
//!
//! New layers are initialised as torchvision does: the head as it declares (the paper's
//! N(0, 0.01) and prior bias, see [`crate::model::head`]), FPN convs Kaiming-uniform (a = 1)
//! with zero biases, and, from scratch, backbone convs Kaiming-normal (fan-out) with identity
//! batch norm. One seeded generator draws them all, in name order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::io::checkpoint::{var_builder, Checkpoint, Request, TensorStore};
use crate::model::config::resnet_blocks;
use crate::model::{RetinaNet, RetinaNetConfig};
use crate::{Error, Result};

pub use crate::model::head::PRIOR_PROBABILITY;

/// Where the initial weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// Everything freshly initialised (batch norm with weight 1, bias 0, mean 0, variance 1).
    /// torchvision then trains the whole backbone with batch norm in training mode
    /// (`TrainConfig::for_start`).
    Scratch,
    /// A full RetinaNet checkpoint (torchvision layout). With another class count,
    /// `cls_logits` is re-initialised with the prior.
    RetinaNet(std::path::PathBuf),
    /// An ImageNet ResNet checkpoint (torchvision or timm names: `conv1.weight`,
    /// `layer1.0.conv1.weight`, `bn1.running_mean`, …; `fc.*` is ignored); FPN and heads new.
    Backbone(std::path::PathBuf),
}

/// What initialisation did, for the user.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InitReport {
    /// Tensors read from the checkpoint.
    pub loaded: usize,
    /// Tensors freshly initialised.
    pub initialised: usize,
    /// Notes worth telling (e.g. a re-initialised classifier).
    pub notes: Vec<String>,
}

/// Every tensor of a model in training, by torchvision name.
#[derive(Debug, Clone)]
pub struct ParamStore {
    frozen: BTreeMap<String, Tensor>,
    trained: BTreeMap<String, Var>,
    buffers: BTreeMap<String, Var>,
    device: Device,
    dtype: DType,
}

/// How the backbone's batch norms behave in training.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BackboneNorm {
    /// torchvision's `FrozenBatchNorm2d`, its default with pretrained weights: fixed
    /// statistics and affine, folded into the convolutions.
    #[default]
    Frozen,
    /// `nn.BatchNorm2d` in training mode, torchvision's choice from scratch: in the trained
    /// stages, normalisation by the batch's statistics over (N, H, W), a learned weight and
    /// bias, and running statistics updated each step (momentum 0.1, unbiased variance) that
    /// checkpoints keep for evaluation. Frozen stages keep frozen batch norm.
    Batch,
}

/// What a tensor does in training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Updated by the optimiser.
    Trained,
    /// Updated in place by the model, outside the optimiser (running statistics of batch
    /// norms in training mode).
    Buffer,
    /// Fixed.
    Frozen,
}

/// Whether `name` (a full torchvision name) is a batch-norm tensor of the backbone.
fn is_backbone_norm(name: &str) -> bool {
    name.starts_with("backbone.body.") && (name.contains(".bn") || name.contains("downsample.1."))
        || name.starts_with("backbone.body.bn1.")
}

/// Whether `name` trains with `trainable_backbone_layers` (torchvision: the last that many of
/// layer4, layer3, layer2, layer1, conv1). Frozen batch norm never trains; FPN and heads do.
pub fn is_trainable(name: &str, trainable_backbone_layers: usize) -> bool {
    role(name, trainable_backbone_layers, BackboneNorm::Frozen) == Role::Trained
}

/// The role of `name` in training with `trainable_backbone_layers` (torchvision: the last
/// that many of layer4, layer3, layer2, layer1 and the stem, conv1 with bn1) and `norm`: FPN
/// and heads train; in the trained stages the convolutions train, and so do the batch norms'
/// weights and biases with [`BackboneNorm::Batch`], their running statistics being buffers.
pub fn role(name: &str, trainable_backbone_layers: usize, norm: BackboneNorm) -> Role {
    let Some(rest) = name.strip_prefix("backbone.body.") else {
        return Role::Trained;
    };
    let stage = rest.split('.').next().unwrap_or("");
    let stage = if stage == "bn1" { "conv1" } else { stage };
    let trained_stage = ["layer4", "layer3", "layer2", "layer1", "conv1"]
        .iter()
        .take(trainable_backbone_layers)
        .any(|&l| l == stage);
    match (trained_stage, is_backbone_norm(name), norm) {
        (false, _, _) | (true, true, BackboneNorm::Frozen) => Role::Frozen,
        (true, false, _) => Role::Trained,
        (true, true, BackboneNorm::Batch) => {
            if name.ends_with(".running_mean") || name.ends_with(".running_var") {
                Role::Buffer
            } else {
                Role::Trained
            }
        }
    }
}

/// Tensors by name: shape and declared initialisation.
pub type Declared = BTreeMap<String, (Vec<usize>, Init)>;

/// Every tensor `RetinaNet::new` asks for, by name: its shape and the initialisation its
/// module declares.
pub fn model_tensors(config: &RetinaNetConfig) -> Result<Declared> {
    let recorder = Recorder::default();
    RetinaNet::new(
        config,
        var_builder(recorder.clone(), DType::F32, &Device::Cpu),
    )?;
    let declared = recorder.0.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(declared)
}

/// Names and shapes of every tensor `RetinaNet::new` asks for.
pub fn model_shapes(config: &RetinaNetConfig) -> Result<BTreeMap<String, Vec<usize>>> {
    let tensors = model_tensors(config)?;
    Ok(tensors
        .into_iter()
        .map(|(n, (shape, _))| (n, shape))
        .collect())
}

/// Records what a model asks for, serving zeros.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Declared>>);

impl TensorStore for Recorder {
    fn tensor(&self, request: &Request) -> candle_core::Result<Tensor> {
        if let Ok(mut m) = self.0.lock() {
            m.insert(
                request.name.to_string(),
                (request.shape.to_vec(), request.init),
            );
        }
        Tensor::zeros(request.shape, request.dtype, request.device)
    }

    fn contains(&self, _: &str) -> bool {
        true
    }
}

/// A small seeded generator (SplitMix64) so that initialisation is reproducible.
#[derive(Debug, Clone)]
pub struct InitRng(u64);

impl InitRng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal_vec(&mut self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                // Box–Muller.
                let u1 = 1.0 - self.uniform();
                let u2 = self.uniform();
                (mean + (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
            })
            .collect()
    }

    fn uniform_vec(&mut self, n: usize, bound: f64) -> Vec<f32> {
        (0..n)
            .map(|_| ((2.0 * self.uniform() - 1.0) * bound) as f32)
            .collect()
    }
}

/// The initial value of a new tensor: for the head, the initialisation it declares (the
/// paper's, §4.1); for the FPN and backbone, whose layers declare Candle's defaults,
/// torchvision's, by name.
fn fresh(name: &str, shape: &[usize], declared: Init, rng: &mut InitRng) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let leaf = name.rsplit('.').next().unwrap_or("");
    let data = if name.starts_with("head.") {
        draw(name, declared, n, rng)?
    } else if is_backbone_norm(name) {
        // Batch norm: identity (weight 1, bias 0, mean 0, var 1).
        let v = if matches!(leaf, "weight" | "running_var") {
            1.0
        } else {
            0.0
        };
        vec![v; n]
    } else if leaf == "bias" {
        vec![0.0; n]
    } else if name.starts_with("backbone.fpn.") {
        // kaiming_uniform_(a=1): bound √(3 / fan_in).
        let fan_in: usize = shape[1..].iter().product();
        rng.uniform_vec(n, (3.0 / fan_in as f64).sqrt())
    } else {
        // Backbone conv: kaiming_normal_(mode="fan_out", nonlinearity="relu").
        let fan_out = shape[0] * shape[2..].iter().product::<usize>();
        rng.normal_vec(n, 0.0, (2.0 / fan_out as f64).sqrt())
    };
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
}

/// `n` values drawn as `init` says.
fn draw(name: &str, init: Init, n: usize, rng: &mut InitRng) -> Result<Vec<f32>> {
    match init {
        Init::Const(v) => Ok(vec![v as f32; n]),
        Init::Randn { mean, stdev } => Ok(rng.normal_vec(n, mean, stdev)),
        other => Err(Error::Invalid(format!(
            "`{name}` declares the initialisation {other:?}, which training cannot draw"
        ))),
    }
}

/// Reads `name` from `ckpt` if it is there with `shape`.
fn read(ckpt: &Checkpoint, vb: &VarBuilder, name: &str, shape: &[usize]) -> Result<Tensor> {
    vb.get(shape, name).map_err(|e| Error::Checkpoint {
        path: ckpt.path().to_path_buf(),
        message: format!("cannot read `{name}`: {e}"),
    })
}

/// Initial values of every tensor of `config`, from `start`.
pub fn initial_values(
    config: &RetinaNetConfig,
    start: &Start,
    seed: u64,
) -> Result<(BTreeMap<String, Tensor>, InitReport)> {
    let declared = model_tensors(config)?;
    let mut rng = InitRng::new(seed);
    let mut report = InitReport::default();
    let mut values = BTreeMap::new();
    let ckpt = match start {
        Start::Scratch => None,
        Start::RetinaNet(p) | Start::Backbone(p) => Some(Checkpoint::open(p)?),
    };
    let vb = ckpt
        .as_ref()
        .map(|c| c.var_builder(DType::F32, &Device::Cpu).0);
    let mut used = BTreeSet::new();
    for (name, (shape, init)) in &declared {
        // The checkpoint name this tensor would have, if the start provides it.
        let source = match start {
            Start::Scratch => None,
            Start::RetinaNet(_) => Some(name.clone()),
            Start::Backbone(_) => name.strip_prefix("backbone.body.").map(str::to_string),
        };
        let value = match (&ckpt, &vb, source) {
            (Some(c), Some(vb), Some(src)) => match c.shape(&src) {
                Some(s) if s == shape.as_slice() => {
                    used.insert(src.clone());
                    report.loaded += 1;
                    Some(read(c, vb, &src, shape)?)
                }
                Some(s) if name.starts_with("head.classification_head.cls_logits.") => {
                    used.insert(src.clone());
                    if name.ends_with("bias") {
                        report.notes.push(format!(
                            "{}: {} classes in the checkpoint, {} in the model: cls_logits \
                             re-initialised with prior {PRIOR_PROBABILITY}",
                            c.path().display(),
                            s[0] / config.num_anchors,
                            config.num_classes
                        ));
                    }
                    None
                }
                Some(s) => {
                    return Err(Error::ShapeMismatch {
                        path: c.path().to_path_buf(),
                        name: src,
                        expected: shape.clone(),
                        actual: s.to_vec(),
                    })
                }
                None => {
                    return Err(Error::MissingTensor {
                        path: c.path().to_path_buf(),
                        name: src,
                        expected: shape.clone(),
                    })
                }
            },
            _ => None,
        };
        let value = match value {
            Some(v) => v,
            None => {
                report.initialised += 1;
                fresh(name, shape, *init, &mut rng)?
            }
        };
        values.insert(name.clone(), value);
    }
    if let Some(c) = &ckpt {
        let unexpected: Vec<String> = c
            .names()
            .filter(|n| !used.contains(*n))
            .filter(|n| !(matches!(start, Start::Backbone(_)) && n.starts_with("fc.")))
            .map(str::to_string)
            .collect();
        if !unexpected.is_empty() {
            return Err(Error::UnexpectedTensors {
                path: c.path().to_path_buf(),
                names: unexpected,
            });
        }
    }
    Ok((values, report))
}

impl ParamStore {
    /// A store over `values` on `device` in `dtype` (f32 for training; f64 for reference
    /// checks), each tensor in the [`Role`] that `role` gives it.
    pub fn new(
        values: BTreeMap<String, Tensor>,
        role: impl Fn(&str) -> Role,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let mut frozen = BTreeMap::new();
        let mut trained = BTreeMap::new();
        let mut buffers = BTreeMap::new();
        for (name, v) in values {
            let v = v.to_dtype(dtype)?.to_device(device)?;
            match role(&name) {
                Role::Trained => trained.insert(name, Var::from_tensor(&v)?),
                Role::Buffer => buffers.insert(name, Var::from_tensor(&v)?),
                Role::Frozen => {
                    frozen.insert(name, v.detach());
                    None
                }
            };
        }
        Ok(Self {
            frozen,
            trained,
            buffers,
            device: device.clone(),
            dtype,
        })
    }

    /// The trained variables, by name.
    pub fn trained(&self) -> Vec<(String, Var)> {
        self.trained
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }

    /// Whether `name` is trained.
    pub fn is_trained(&self, name: &str) -> bool {
        self.trained.contains_key(name)
    }

    /// Whether `name` is a buffer the model updates (see [`Role::Buffer`]).
    pub fn is_buffer(&self, name: &str) -> bool {
        self.buffers.contains_key(name)
    }

    /// Every tensor by name (current values).
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut all = self.frozen.clone();
        for (n, v) in self.trained.iter().chain(&self.buffers) {
            all.insert(n.clone(), v.as_tensor().detach());
        }
        all
    }

    /// The current value of one tensor (trained ones and buffers as variables).
    pub fn get(&self, name: &str) -> Option<Tensor> {
        self.trained
            .get(name)
            .or_else(|| self.buffers.get(name))
            .map(|v| v.as_tensor().clone())
            .or_else(|| self.frozen.get(name).cloned())
    }

    /// The device.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A `VarBuilder` serving these tensors (trained ones as variables) to `RetinaNet::new`.
    pub fn var_builder(&self) -> VarBuilder<'static> {
        var_builder(self.clone(), self.dtype, &self.device)
    }

    /// Builds the model over these tensors.
    pub fn build(&self, config: &RetinaNetConfig) -> Result<RetinaNet> {
        Ok(RetinaNet::new(config, self.var_builder())?)
    }
}

impl TensorStore for ParamStore {
    fn tensor(&self, request: &Request) -> candle_core::Result<Tensor> {
        let name = request.name;
        let Some(t) = ParamStore::get(self, name) else {
            candle_core::bail!("no tensor `{name}` in the parameter store");
        };
        if t.dims() != request.shape {
            candle_core::bail!(
                "tensor `{name}` has shape {:?} in the store, the model expects {:?}",
                t.dims(),
                request.shape
            );
        }
        if t.dtype() != request.dtype {
            candle_core::bail!(
                "`{name}` is {:?} in the store, the model asks for {:?}",
                t.dtype(),
                request.dtype
            );
        }
        Ok(t)
    }

    fn contains(&self, name: &str) -> bool {
        ParamStore::get(self, name).is_some()
    }
}

/// The architecture to train from `start` with `num_classes`: a RetinaNet checkpoint's own
/// (depth, v1/v2, eps) with the class count replaced; for an ImageNet backbone, torchvision's
/// v1 layout on the ResNet the checkpoint holds, with its batch-norm eps 1e-5. From scratch
/// there is nothing to infer: build a [`RetinaNetConfig`] directly.
pub fn config_for(start: &Start, num_classes: usize) -> Result<RetinaNetConfig> {
    match start {
        Start::Scratch => Err(Error::Invalid(
            "from scratch the architecture cannot be inferred: use RetinaNetConfig::v1/v2".into(),
        )),
        Start::RetinaNet(p) => Ok(RetinaNetConfig {
            num_classes,
            ..RetinaNetConfig::infer(&Checkpoint::open(p)?)?
        }),
        Start::Backbone(p) => {
            let backbone = resnet_blocks(&Checkpoint::open(p)?, "");
            let depth = backbone.depth().ok_or_else(|| Error::Checkpoint {
                path: p.clone(),
                message: format!(
                    "not a standard ResNet (blocks per stage {:?})",
                    backbone.layers
                ),
            })?;
            Ok(RetinaNetConfig {
                bn_eps: 1e-5,
                ..RetinaNetConfig::v1(depth, num_classes)?
            })
        }
    }
}

/// Loads `path` (a RetinaNet checkpoint) into `config`'s tensors, strictly: used by resume.
pub fn load_exact(config: &RetinaNetConfig, path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let shapes = model_shapes(config)?;
    let ckpt = Checkpoint::open(path)?;
    let (vb, _) = ckpt.var_builder(DType::F32, &Device::Cpu);
    let mut out = BTreeMap::new();
    for (name, shape) in &shapes {
        match ckpt.shape(name) {
            Some(s) if s == shape.as_slice() => {
                out.insert(name.clone(), read(&ckpt, &vb, name, shape)?);
            }
            Some(s) => {
                return Err(Error::ShapeMismatch {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    expected: shape.clone(),
                    actual: s.to_vec(),
                })
            }
            None => {
                return Err(Error::MissingTensor {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    expected: shape.clone(),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trainable_layers_follow_torchvision() {
        let t = |n: &str, k| is_trainable(n, k);
        assert!(t("head.classification_head.cls_logits.weight", 0));
        assert!(t("backbone.fpn.layer_blocks.0.0.weight", 0));
        assert!(t("backbone.body.layer2.0.conv1.weight", 3));
        assert!(!t("backbone.body.layer1.0.conv1.weight", 3));
        assert!(!t("backbone.body.conv1.weight", 4));
        assert!(t("backbone.body.conv1.weight", 5));
        assert!(!t("backbone.body.layer2.0.bn1.weight", 5));
        assert!(!t("backbone.body.layer2.0.downsample.1.running_var", 5));
        assert!(t("backbone.body.layer2.0.downsample.0.weight", 3));
        assert!(!t("backbone.body.layer4.0.conv1.weight", 0));
        assert!(!t("backbone.body.bn1.weight", 5));
    }

    #[test]
    fn batch_norm_trains_in_trained_stages() {
        let r = |n: &str, k| role(n, k, BackboneNorm::Batch);
        assert_eq!(r("backbone.body.bn1.weight", 5), Role::Trained);
        assert_eq!(r("backbone.body.bn1.running_var", 5), Role::Buffer);
        assert_eq!(r("backbone.body.conv1.weight", 5), Role::Trained);
        assert_eq!(r("backbone.body.bn1.bias", 4), Role::Frozen);
        assert_eq!(r("backbone.body.layer1.0.bn2.bias", 4), Role::Trained);
        assert_eq!(
            r("backbone.body.layer2.0.downsample.1.running_mean", 3),
            Role::Buffer
        );
        assert_eq!(
            r("backbone.body.layer1.0.bn1.running_mean", 3),
            Role::Frozen
        );
        assert_eq!(r("backbone.fpn.inner_blocks.0.0.weight", 0), Role::Trained);
        assert_eq!(r("head.regression_head.conv.0.1.weight", 0), Role::Trained);
    }

    #[test]
    fn fresh_values_follow_torchvision() {
        let config = RetinaNetConfig::v2(18, 2).unwrap();
        let (values, _) = initial_values(&config, &Start::Scratch, 0).unwrap();
        let b: Vec<f32> = values["head.classification_head.cls_logits.bias"]
            .to_vec1()
            .unwrap();
        assert!((b[0] - (-(99f32).ln())).abs() < 1e-6);
        let v = &values["backbone.body.layer1.0.bn1.running_var"];
        assert_eq!(v.to_vec1::<f32>().unwrap(), vec![1.0; 64]);
        // The second conv of a head is a convolution, not a norm.
        let c = &values["head.classification_head.conv.1.0.weight"];
        assert!(
            c.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 0.1
        );
        let g = &values["head.regression_head.conv.0.1.weight"];
        assert_eq!(g.to_vec1::<f32>().unwrap(), vec![1.0; 256]);
        let w = values["head.regression_head.conv.0.0.weight"]
            .flatten_all()
            .unwrap();
        let std = w.sqr().unwrap().mean_all().unwrap().sqrt().unwrap();
        let std = std.to_scalar::<f32>().unwrap();
        assert!((std - 0.01).abs() < 2e-4, "{std}");
    }
}
