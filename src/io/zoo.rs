//! The model zoo: published weights by name, with where they come from and how to check
//! them. `weights/README.md` documents the same table.
//!
//! ```no_run
//! # fn main() -> Result<(), retinanet::Error> {
//! use retinanet::{io::hub::HubOptions, zoo, LoadOptions};
//! let entry = zoo::find("retinanet_resnet50_fpn_coco")?;
//! let hub = HubOptions::from_env()?;
//! let model = entry.load(&candle_core::Device::Cpu, &LoadOptions::default(), &hub)?;
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::io::hub::{self, HubOptions, Source};
use crate::{Error, LoadOptions, Result, RetinaNet, RetinaNetConfig};

/// What a zoo file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// torchvision's `retinanet_resnet50_fpn` layout (v1: P6 from P5, plain heads).
    RetinaNetV1 {
        /// ResNet depth.
        depth: usize,
    },
    /// torchvision's `retinanet_resnet50_fpn_v2` layout (P6 from C5, GroupNorm heads).
    RetinaNetV2 {
        /// ResNet depth.
        depth: usize,
    },
    /// An ImageNet classifier in torchvision's (and timm's) ResNet naming: `conv1`, `bn1`,
    /// `layer1`…`layer4`, `fc`. Under the prefix `backbone.body.` its tensors (less `fc`)
    /// initialise a RetinaNet backbone for fine-tuning.
    ResNet {
        /// ResNet depth.
        depth: usize,
    },
}

impl Architecture {
    /// The detector configuration for `num_classes`, or `None` for a backbone.
    pub fn retinanet_config(&self, num_classes: usize) -> Option<Result<RetinaNetConfig>> {
        match *self {
            Architecture::RetinaNetV1 { depth } => Some(RetinaNetConfig::v1(depth, num_classes)),
            Architecture::RetinaNetV2 { depth } => Some(RetinaNetConfig::v2(depth, num_classes)),
            Architecture::ResNet { .. } => None,
        }
    }

    /// A short description, e.g. `RetinaNet ResNet-50 FPN v1`.
    pub fn describe(&self) -> String {
        match self {
            Architecture::RetinaNetV1 { depth } => format!("RetinaNet ResNet-{depth} FPN v1"),
            Architecture::RetinaNetV2 { depth } => format!("RetinaNet ResNet-{depth} FPN v2"),
            Architecture::ResNet { depth } => format!("ResNet-{depth} (ImageNet classifier)"),
        }
    }
}

/// The label set a zoo model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classes {
    /// COCO in torchvision's 91-index order (label = COCO category id), see
    /// [`crate::classes::COCO_91`].
    Coco91,
    /// The 1000 ImageNet-1k classes of a classifier; a detector built on it replaces them.
    ImageNet1k,
    /// Named classes by label (a DeepForest model's `label_dict`).
    Named(&'static [&'static str]),
}

impl Classes {
    /// Number of classes.
    pub fn len(&self) -> usize {
        match self {
            Classes::Coco91 => crate::classes::COCO_91.len(),
            Classes::ImageNet1k => 1000,
            Classes::Named(names) => names.len(),
        }
    }

    /// Never empty; present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The names by label, where the crate ships them (COCO).
    pub fn names(&self) -> Option<&'static [&'static str]> {
        match self {
            Classes::Coco91 => Some(&crate::classes::COCO_91),
            Classes::ImageNet1k => None,
            Classes::Named(names) => Some(names),
        }
    }
}

/// A published accuracy figure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accuracy {
    /// What was measured, e.g. `COCO val2017 box AP`.
    pub metric: &'static str,
    /// The published value (percent); `None` where the publisher gives no figure.
    pub value: Option<f64>,
}

impl Accuracy {
    /// `metric value`, or the metric alone.
    pub fn describe(&self) -> String {
        match self.value {
            Some(v) => format!("{} {v}", self.metric),
            None => self.metric.to_string(),
        }
    }
}

/// One zoo model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ZooEntry {
    /// Name used on the command line, e.g. `retinanet_resnet50_fpn_coco`.
    pub name: &'static str,
    /// What the file holds.
    pub architecture: Architecture,
    /// Label set.
    pub classes: Classes,
    /// Accuracy as published by the source.
    pub accuracy: Accuracy,
    /// Where the file comes from.
    pub source: Source,
    /// Expected sha256 of the file, hex: in full, or the prefix the publisher put in the
    /// file name (torchvision: 8 digits); empty for Hub repos, whose LFS files are checked
    /// against the hash the Hub reports.
    pub sha256: &'static str,
    /// What the model was trained on.
    pub trained_on: &'static str,
    /// The window size the publisher tiles large images with (DeepForest's `patch_size`):
    /// `detect --tile` uses it when no size is given.
    pub window: Option<u32>,
}

const fn torchvision(
    name: &'static str,
    architecture: Architecture,
    classes: Classes,
    metric: &'static str,
    value: f64,
    file: &'static str,
    sha256: &'static str,
) -> ZooEntry {
    ZooEntry {
        name,
        architecture,
        classes,
        accuracy: Accuracy {
            metric,
            value: Some(value),
        },
        source: Source::Torchvision { file },
        sha256,
        trained_on: if matches!(classes, Classes::Coco91) {
            "COCO train2017"
        } else {
            "ImageNet-1k"
        },
        window: None,
    }
}

const COCO_AP: &str = "COCO val2017 box AP";
const IMAGENET_TOP1: &str = "ImageNet-1k top-1";

const fn resnet(
    name: &'static str,
    depth: usize,
    top1: f64,
    file: &'static str,
    sha256: &'static str,
) -> ZooEntry {
    torchvision(
        name,
        Architecture::ResNet { depth },
        Classes::ImageNet1k,
        IMAGENET_TOP1,
        top1,
        file,
        sha256,
    )
}

/// Every zoo model. File names, hash prefixes and accuracies are torchvision's own
/// (`torchvision.models.*_Weights`, torchvision 0.29).
pub const ZOO: &[ZooEntry] = &[
    torchvision(
        "retinanet_resnet50_fpn_coco",
        Architecture::RetinaNetV1 { depth: 50 },
        Classes::Coco91,
        COCO_AP,
        36.4,
        "retinanet_resnet50_fpn_coco-eeacb38b.pth",
        "eeacb38b",
    ),
    torchvision(
        "retinanet_resnet50_fpn_v2_coco",
        Architecture::RetinaNetV2 { depth: 50 },
        Classes::Coco91,
        COCO_AP,
        41.5,
        "retinanet_resnet50_fpn_v2_coco-5905b1c5.pth",
        "5905b1c5",
    ),
    resnet(
        "resnet18_imagenet1k_v1",
        18,
        69.758,
        "resnet18-f37072fd.pth",
        "f37072fd",
    ),
    resnet(
        "resnet34_imagenet1k_v1",
        34,
        73.314,
        "resnet34-b627a593.pth",
        "b627a593",
    ),
    resnet(
        "resnet50_imagenet1k_v1",
        50,
        76.130,
        "resnet50-0676ba61.pth",
        "0676ba61",
    ),
    resnet(
        "resnet50_imagenet1k_v2",
        50,
        80.858,
        "resnet50-11ad3fa6.pth",
        "11ad3fa6",
    ),
    resnet(
        "resnet101_imagenet1k_v1",
        101,
        77.374,
        "resnet101-63fe2227.pth",
        "63fe2227",
    ),
    resnet(
        "resnet101_imagenet1k_v2",
        101,
        81.886,
        "resnet101-cd907fc2.pth",
        "cd907fc2",
    ),
    resnet(
        "resnet152_imagenet1k_v1",
        152,
        78.312,
        "resnet152-394f9c45.pth",
        "394f9c45",
    ),
    resnet(
        "resnet152_imagenet1k_v2",
        152,
        82.284,
        "resnet152-f82ba261.pth",
        "f82ba261",
    ),
];

const fn deepforest(
    name: &'static str,
    classes: &'static [&'static str],
    trained_on: &'static str,
    accuracy: Accuracy,
) -> ZooEntry {
    ZooEntry {
        name,
        architecture: Architecture::RetinaNetV1 { depth: 50 },
        classes: Classes::Named(classes),
        accuracy,
        source: Source::HuggingFace {
            repo: name,
            revision: "main",
            file: crate::io::hub_repo::WEIGHTS_FILE,
        },
        sha256: "",
        trained_on,
        window: Some(400),
    }
}

/// DeepForest's published RetinaNet box detectors (weecology on the Hugging Face Hub; repo
/// names, classes and figures from DeepForest's documentation, `docs/user_guide/02_prebuilt.md`
/// and the model loader tutorial). Each is a [`crate::io::hub_repo`] repo: `config.json` gives
/// the class names and thresholds; DeepForest tiles large images in 400 px windows.
pub const DEEPFOREST: &[ZooEntry] = &[
    deepforest(
        "weecology/deepforest-tree",
        &["Tree"],
        "NEON airborne RGB (0.1 m), LiDAR-generated crowns then hand annotations (Weinstein et al. 2019, 2020)",
        Accuracy {
            metric: "none in DeepForest's docs",
            value: None,
        },
    ),
    deepforest(
        "weecology/deepforest-bird",
        &["Bird"],
        "over 250,000 bird annotations from 13 aerial projects (Weinstein et al. 2022)",
        Accuracy {
            metric: "recall on unseen aerial data, precision 50 %:",
            value: Some(65.0),
        },
    ),
    deepforest(
        "weecology/deepforest-livestock",
        &["cattle"],
        "drone imagery of cattle, sheep and other large mammals in agricultural settings",
        Accuracy {
            metric: "none published",
            value: None,
        },
    ),
    deepforest(
        "weecology/everglades-nest-detection",
        &["Nest"],
        "Everglades wading-bird colonies, drone imagery",
        Accuracy {
            metric: "none published",
            value: None,
        },
    ),
];

/// Every model the zoo knows: torchvision's and DeepForest's.
pub fn all() -> impl Iterator<Item = &'static ZooEntry> {
    ZOO.iter().chain(DEEPFOREST)
}

/// The default detector of the command-line tools.
pub const DEFAULT_MODEL: &str = "retinanet_resnet50_fpn_coco";

/// The zoo entry called `name`, or an error listing the known names.
pub fn find(name: &str) -> Result<&'static ZooEntry> {
    all().find(|e| e.name == name).ok_or_else(|| {
        let names: Vec<&str> = all().map(|e| e.name).collect();
        Error::Invalid(format!(
            "unknown model {name:?}; the zoo has: {}",
            names.join(", ")
        ))
    })
}

/// The zoo as a text table: name, architecture, classes, accuracy and download URL (under
/// `hub`, else the source); DeepForest's models add what they were trained on and their
/// window size.
pub fn table(hub: Option<&HubOptions>) -> String {
    let mut text = format!(
        "{:<36} {:<34} {:<14} {:<28} source\n",
        "name", "architecture", "classes", "accuracy"
    );
    for e in all() {
        let url = hub.map_or_else(|| format!("{:?}", e.source), |h| e.url(h));
        let arch = e.architecture.describe();
        let classes = match e.classes {
            Classes::Named(names) => names.join(", "),
            Classes::Coco91 => "COCO (91)".into(),
            Classes::ImageNet1k => "ImageNet-1k".into(),
        };
        let accuracy = e.accuracy.describe();
        text += &format!(
            "{:<36} {arch:<34} {classes:<14} {accuracy:<28} {url}\n",
            e.name
        );
        if let Some(w) = e.window {
            text += &format!(
                "{:<36} trained on {}; windows of {w} px\n",
                "", e.trained_on
            );
        }
    }
    text
}

/// Where a model comes from, as [`resolve`] reads a command line's model argument.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A checkpoint file: `.safetensors` or torchvision `.pth`.
    File(PathBuf),
    /// A model repo, or a file in one, on the Hugging Face Hub.
    Hub {
        /// `OWNER/NAME`.
        repo: String,
        /// Branch, tag or commit (`main` unless given).
        revision: String,
        /// Path of the weights file in the repository; `None`: found as
        /// [`crate::io::hub_repo::fetch_repo`] says.
        file: Option<String>,
    },
    /// A zoo model, downloaded and verified once.
    Zoo(&'static ZooEntry),
}

/// Reads a model argument: `hf:OWNER/NAME[/FILE][@REVISION]`, a checkpoint path (an existing
/// file, or a name ending in `.safetensors` or `.pth`), else a zoo name.
pub fn resolve(spec: &str) -> Result<ModelSource> {
    if spec.starts_with("hf:") {
        return parse_hf(spec);
    }
    let path = Path::new(spec);
    let is_checkpoint = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("safetensors" | "pth")
    );
    if is_checkpoint || path.is_file() {
        return Ok(ModelSource::File(path.to_path_buf()));
    }
    find(spec).map(ModelSource::Zoo)
}

/// `hf:OWNER/NAME[/FILE][@REVISION]` → [`ModelSource::Hub`].
fn parse_hf(spec: &str) -> Result<ModelSource> {
    let rest = spec.trim_start_matches("hf:");
    let (rest, revision) = rest.rsplit_once('@').unwrap_or((rest, "main"));
    let mut parts = rest.splitn(3, '/');
    let (owner, name, file) = (parts.next(), parts.next(), parts.next());
    match (owner, name) {
        (Some(owner), Some(name))
            if ![owner, name, revision, file.unwrap_or("-")].contains(&"") =>
        {
            Ok(ModelSource::Hub {
                repo: format!("{owner}/{name}"),
                revision: revision.to_string(),
                file: file.map(str::to_string),
            })
        }
        _ => Err(Error::Invalid(format!(
            "{spec}: expected hf:OWNER/NAME (a model repo) or hf:OWNER/NAME/FILE, each \
             optionally @REVISION"
        ))),
    }
}

impl ZooEntry {
    /// Whether this is a detector (as opposed to a backbone for fine-tuning).
    pub fn is_detector(&self) -> bool {
        self.architecture.retinanet_config(0).is_some()
    }

    /// The download URL under `opts`.
    pub fn url(&self, opts: &HubOptions) -> String {
        self.source.url(opts)
    }

    /// The verified local file, downloaded once into the cache.
    pub fn fetch(&self, opts: &HubOptions) -> Result<PathBuf> {
        let sha256 = Some(self.sha256).filter(|s| !s.is_empty());
        hub::fetch(&self.source, sha256, opts)
    }

    /// Whether this is a DeepForest model (a Hub repo with `config.json`).
    pub fn is_deepforest(&self) -> bool {
        DEEPFOREST.iter().any(|e| e.name == self.name)
    }

    /// Downloads (once) and loads the detector, with its architecture and batch-norm eps
    /// unless `opts` sets them.
    pub fn load(&self, device: &Device, opts: &LoadOptions, hub: &HubOptions) -> Result<RetinaNet> {
        self.load_with_config(device, opts, hub)
            .map(|(model, _)| model)
    }

    /// [`ZooEntry::load`], also returning a DeepForest model's `config.json`.
    pub fn load_with_config(
        &self,
        device: &Device,
        opts: &LoadOptions,
        hub: &HubOptions,
    ) -> Result<(RetinaNet, Option<crate::io::hub_repo::RepoConfig>)> {
        let config = self
            .architecture
            .retinanet_config(self.classes.len())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{} is an ImageNet backbone for fine-tuning, not a detector",
                    self.name
                ))
            })??;
        if let Source::HuggingFace { repo, revision, .. } = self.source {
            // The repo's own weights and config.json say the class count, not the listing.
            let files = crate::io::hub_repo::fetch_repo(repo, revision, None, hub)?;
            return crate::io::hub_repo::load_files_with_config(&files, device, opts);
        }
        let path = self.fetch(hub)?;
        let opts = LoadOptions {
            config: opts.config.clone().or(Some(config)),
            ..opts.clone()
        };
        RetinaNet::load_with(path, device, &opts).map(|m| (m, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_found() {
        let zoo: Vec<_> = all().collect();
        for (i, e) in zoo.iter().enumerate() {
            assert_eq!(find(e.name).unwrap(), *e);
            assert!(zoo[..i].iter().all(|o| o.name != e.name), "{}", e.name);
        }
        let tree = find("weecology/deepforest-tree").unwrap();
        assert!(tree.is_deepforest() && tree.is_detector());
        assert_eq!(
            (tree.classes.names().unwrap(), tree.window),
            (&["Tree"][..], Some(400))
        );
        assert!(table(None).contains("weecology/everglades-nest-detection"));
        let err = find("retinanet_nope").unwrap_err().to_string();
        assert!(
            err.contains("retinanet_nope") && err.contains(DEFAULT_MODEL),
            "{err}"
        );
        assert!(find(DEFAULT_MODEL).unwrap().is_detector());
    }

    #[test]
    fn specs_resolve_to_files_hub_files_and_zoo_models() {
        assert_eq!(
            resolve("runs/final.safetensors").unwrap(),
            ModelSource::File("runs/final.safetensors".into())
        );
        assert_eq!(
            resolve("hf:me/trees/model.safetensors@v1").unwrap(),
            ModelSource::Hub {
                repo: "me/trees".into(),
                revision: "v1".into(),
                file: Some("model.safetensors".into()),
            }
        );
        assert_eq!(
            resolve("hf:weecology/deepforest-tree").unwrap(),
            ModelSource::Hub {
                repo: "weecology/deepforest-tree".into(),
                revision: "main".into(),
                file: None,
            }
        );
        let ModelSource::Hub { revision, file, .. } = resolve("hf:me/trees/a/b.pth").unwrap()
        else {
            panic!("not a Hub file");
        };
        assert_eq!(
            (revision.as_str(), file.as_deref()),
            ("main", Some("a/b.pth"))
        );
        for bad in [
            "hf:only-owner",
            "hf:me/trees/",
            "hf:me/trees/f@",
            "hf:me/@v1",
        ] {
            let err = resolve(bad).unwrap_err().to_string();
            assert!(err.contains("hf:OWNER/NAME/FILE"), "{err}");
        }
        assert_eq!(
            resolve(DEFAULT_MODEL).unwrap(),
            ModelSource::Zoo(find(DEFAULT_MODEL).unwrap())
        );
        assert!(resolve("retinanet_nope").is_err());
    }

    #[test]
    fn torchvision_checksums_are_the_prefix_in_the_file_name() {
        for e in all() {
            let Source::Torchvision { file } = e.source else {
                continue;
            };
            // torchvision's `check_hash`: the digits between the last '-' and the extension.
            let stem = file.strip_suffix(".pth").unwrap();
            let prefix = stem.rsplit('-').next().unwrap();
            assert_eq!(prefix, e.sha256, "{}", e.name);
            assert!(prefix.len() >= 8 && prefix.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }

    #[test]
    fn detectors_have_configs_and_backbones_refuse_to_load() {
        let v1 = find("retinanet_resnet50_fpn_coco").unwrap();
        let c = v1.architecture.retinanet_config(91).unwrap().unwrap();
        assert_eq!(
            (c.num_classes, c.head_group_norm, c.bn_eps),
            (91, false, 0.0)
        );
        let v2 = find("retinanet_resnet50_fpn_v2_coco").unwrap();
        assert!(
            v2.architecture
                .retinanet_config(91)
                .unwrap()
                .unwrap()
                .head_group_norm
        );
        let backbone = find("resnet50_imagenet1k_v2").unwrap();
        assert!(!backbone.is_detector());
        let hub = HubOptions {
            hf_cache: "/nonexistent".into(),
            hf_endpoint: "http://127.0.0.1:9".into(),
            hf_token: None,
            torch_cache: "/nonexistent".into(),
            torchvision_url: "http://127.0.0.1:9".into(),
            offline: true,
            progress: false,
        };
        let err = backbone
            .load(&Device::Cpu, &LoadOptions::default(), &hub)
            .unwrap_err();
        assert!(err.to_string().contains("not a detector"), "{err}");
    }
}
