//! The model zoo: the study's six architectures and the pretrained MobileNetV2 teacher, built by name.
//!
//! A [`ModelSpec`] (architecture, class count, square input size, channel widths) fully
//! determines the weight keys and shapes, so the same spec drives training, import, export and
//! serving. Weight keys are the PyTorch state_dict keys of the reference models.

pub mod efficientnet_lite;
mod init;
pub mod layers;
mod mobile;
pub mod mobilenet_v2;
mod plain;
mod resnet;
pub mod test_models;

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

pub use layers::{relu, relu6, Bn, Conv, Linear, BN_EPS, BN_MOMENTUM};
pub use mobile::{MobileNet, SeparableBlock};
pub use mobilenet_v2::{InvertedResidual, MobileNetV2};
pub use plain::PlainCnn;
pub use resnet::{BasicBlock, ResNet18};

/// The study's architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Arch {
    #[serde(rename = "big")]
    Big,
    #[serde(rename = "student")]
    Student,
    #[serde(rename = "student-deeper")]
    StudentDeeper,
    #[serde(rename = "std-conv")]
    StdConv,
    #[serde(rename = "group-conv")]
    GroupConv,
    #[serde(rename = "resnet18")]
    Resnet18,
    /// torchvision's MobileNetV2: the ImageNet-pretrained teacher.
    #[serde(rename = "mobilenet-v2")]
    MobileNetV2,
}

impl Arch {
    pub const ALL: [Arch; 7] = [
        Arch::Big,
        Arch::Student,
        Arch::StudentDeeper,
        Arch::StdConv,
        Arch::GroupConv,
        Arch::Resnet18,
        Arch::MobileNetV2,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arch::Big => "big",
            Arch::Student => "student",
            Arch::StudentDeeper => "student-deeper",
            Arch::StdConv => "std-conv",
            Arch::GroupConv => "group-conv",
            Arch::Resnet18 => "resnet18",
            Arch::MobileNetV2 => "mobilenet-v2",
        }
    }

    pub fn parse(name: &str) -> Result<Arch, ZooError> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| ZooError::UnknownArch(name.to_string()))
    }

    /// Channel widths of the reference layout (students: base 16 times the multipliers).
    pub fn default_widths(self) -> Vec<usize> {
        let base = |m: &[usize]| m.iter().map(|m| 16 * m).collect();
        match self {
            Arch::Big => vec![32, 64, 128, 256, 256, 256],
            Arch::StdConv => vec![16, 32, 32, 64, 128, 128],
            Arch::Student => base(&[1, 2, 4, 8, 16, 16, 16, 16]),
            Arch::StudentDeeper => base(&[1, 2, 4, 8, 8, 8, 16, 16, 16]),
            Arch::GroupConv => vec![16, 32, 64, 128, 128, 256],
            Arch::Resnet18 => vec![64, 128, 256, 512],
            Arch::MobileNetV2 => {
                let mut w = vec![mobilenet_v2::STEM_CHANNELS];
                w.extend(mobilenet_v2::STAGES.iter().map(|s| s.1));
                w.push(mobilenet_v2::LAST_CHANNELS);
                w
            }
        }
    }

    /// Which sequence elements (0 = stem) end in a 2x2 max pool, for the separable nets.
    fn pools(self) -> &'static [bool] {
        match self {
            Arch::Student | Arch::GroupConv => {
                &[true, true, true, true, false, false, false, false]
            }
            Arch::StudentDeeper => &[true, true, true, false, false, true, false, false, false],
            _ => &[],
        }
    }

    /// Smallest square input the layout accepts.
    pub fn min_input_size(self) -> usize {
        match self {
            Arch::Big | Arch::StdConv => 64,
            _ => 32,
        }
    }

    /// Key prefix of the classifier head (replaced when fine-tuning on new classes).
    pub fn head_prefix(self) -> &'static str {
        match self {
            Arch::Resnet18 => "fc.",
            Arch::MobileNetV2 => "classifier.",
            _ => "fc.0.",
        }
    }

    /// Whether channel pruning applies (the depthwise-separable students).
    pub fn is_prunable(self) -> bool {
        matches!(self, Arch::Student | Arch::StudentDeeper)
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Arch {
    type Err = ZooError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Arch::parse(s)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ZooError {
    #[error("unknown architecture `{0}` (known: big, student, student-deeper, std-conv, group-conv, resnet18, mobilenet-v2)")]
    UnknownArch(String),
    #[error("invalid model spec: {0}")]
    InvalidSpec(String),
    #[error("weights do not match architecture `{arch}`: {problems}")]
    WeightMismatch { arch: Arch, problems: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Everything that determines a model's layers and weight shapes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    #[serde(rename = "architecture")]
    pub arch: Arch,
    pub num_classes: usize,
    /// Square input side in pixels (the study: 256).
    pub input_size: usize,
    /// Channel widths; differ from the reference only for pruned students.
    pub widths: Vec<usize>,
}

impl ModelSpec {
    pub fn new(arch: Arch, num_classes: usize, input_size: usize) -> Self {
        Self {
            arch,
            num_classes,
            input_size,
            widths: arch.default_widths(),
        }
    }

    pub fn validate(&self) -> Result<(), ZooError> {
        let bad = |m: String| Err(ZooError::InvalidSpec(m));
        if self.num_classes == 0 {
            return bad("num_classes must be at least 1".into());
        }
        let min = self.arch.min_input_size();
        if self.input_size < min {
            return bad(format!(
                "{} needs an input size of at least {min}, got {}",
                self.arch, self.input_size
            ));
        }
        // A config is a file anyone can edit: a side of 100,000 would have the warm-up batch
        // allocate tens of gigabytes before anything could refuse it.
        if self.input_size > MAX_INPUT_SIZE {
            return bad(format!(
                "input size {} is over the limit of {MAX_INPUT_SIZE}",
                self.input_size
            ));
        }
        let expected_len = self.arch.default_widths().len();
        if self.widths.len() != expected_len {
            return bad(format!(
                "{} has {expected_len} channel widths, got {}",
                self.arch,
                self.widths.len()
            ));
        }
        if self.widths.contains(&0) {
            return bad("channel widths must be positive".into());
        }
        match self.arch {
            Arch::Resnet18 | Arch::MobileNetV2 if self.widths != self.arch.default_widths() => {
                bad(format!(
                    "{} widths are fixed at {:?}",
                    self.arch,
                    self.arch.default_widths()
                ))
            }
            Arch::GroupConv if self.widths.iter().any(|w| w % 2 != 0) => {
                bad("group-conv widths must be even (groups = 2)".into())
            }
            _ => Ok(()),
        }
    }
}

/// The largest input side a model may declare.
pub const MAX_INPUT_SIZE: usize = 2048;

/// Multiply-accumulates per image and trainable parameters, tallied layer by layer.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Cost {
    pub macs: u64,
}

impl Cost {
    fn conv(&mut self, conv: &Conv, out_h: usize, out_w: usize) {
        let w = conv.weight().dims();
        let per_pixel: usize = w.iter().product();
        self.macs += (per_pixel * out_h * out_w) as u64;
    }

    fn linear(&mut self, lin: &Linear) {
        self.macs += lin.weight().elem_count() as u64;
    }
}

#[derive(Debug, Clone)]
pub enum Net {
    Plain(PlainCnn),
    Mobile(MobileNet),
    Resnet(ResNet18),
    MobileV2(MobileNetV2),
}

/// A built model: its spec and its layers.
#[derive(Debug, Clone)]
pub struct Model {
    spec: ModelSpec,
    net: Net,
}

impl Model {
    /// Builds the layers, taking (or, with a `VarMap` builder, creating) every weight from `vb`.
    pub fn new(spec: &ModelSpec, vb: VarBuilder) -> Result<Self, ZooError> {
        spec.validate()?;
        let s = spec.input_size;
        let c = spec.num_classes;
        let w = &spec.widths;
        let net = match spec.arch {
            Arch::Big | Arch::StdConv => Net::Plain(PlainCnn::new(w, s, c, vb)?),
            Arch::Student | Arch::StudentDeeper => {
                Net::Mobile(MobileNet::new(w, spec.arch.pools(), None, s, c, vb)?)
            }
            Arch::GroupConv => {
                Net::Mobile(MobileNet::new(w, spec.arch.pools(), Some(2), s, c, vb)?)
            }
            Arch::Resnet18 => Net::Resnet(ResNet18::new(s, c, vb)?),
            Arch::MobileNetV2 => Net::MobileV2(MobileNetV2::new(s, c, vb)?),
        };
        Ok(Self {
            spec: spec.clone(),
            net,
        })
    }

    /// A freshly initialised model whose weights live in the returned `VarMap` (for training).
    pub fn init(spec: &ModelSpec, device: &Device) -> Result<(VarMap, Self), ZooError> {
        let varmap = VarMap::new();
        let model = Self::new(spec, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        Ok((varmap, model))
    }

    /// Like [`Model::init`], but the weights are a function of `seed` (PyTorch's default
    /// distributions, drawn per weight name), so runs are reproducible.
    pub fn init_seeded(
        spec: &ModelSpec,
        device: &Device,
        seed: u64,
    ) -> Result<(VarMap, Self), ZooError> {
        let varmap = VarMap::new();
        let backend = init::Seeded {
            varmap: varmap.clone(),
            seed,
        };
        let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
        let model = Self::new(spec, vb)?;
        Ok((varmap, model))
    }

    /// Builds from named f32 tensors after checking that the names and shapes are exactly
    /// the architecture's (missing, unexpected and mis-shaped keys are all reported).
    pub fn from_tensors(
        spec: &ModelSpec,
        tensors: &BTreeMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self, ZooError> {
        check_weights(spec, tensors)?;
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.to_device(device)?)))
            .collect::<candle_core::Result<_>>()?;
        Self::new(spec, VarBuilder::from_tensors(map, DType::F32, device))
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn net(&self) -> &Net {
        &self.net
    }

    /// Forward multiply-accumulates per image at the spec's input size (convs and linears).
    pub fn macs(&self) -> u64 {
        match &self.net {
            Net::Plain(n) => n.cost(),
            Net::Mobile(n) => n.cost(),
            Net::Resnet(n) => n.cost(),
            Net::MobileV2(n) => n.cost(),
        }
        .macs
    }
}

impl ModuleT for Model {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        match &self.net {
            Net::Plain(n) => n.forward_t(x, train),
            Net::Mobile(n) => n.forward_t(x, train),
            Net::Resnet(n) => n.forward_t(x, train),
            Net::MobileV2(n) => n.forward_t(x, train),
        }
    }
}

/// The current value of every variable in `varmap`, by weight key (a snapshot for saving,
/// exporting or building another model from).
pub fn varmap_tensors(varmap: &VarMap) -> BTreeMap<String, Tensor> {
    varmap
        .data()
        .lock()
        .expect("varmap lock poisoned")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

/// Whether a key holds BatchNorm running statistics (state, not a trainable parameter).
pub fn is_running_stat(key: &str) -> bool {
    key.ends_with(".running_mean")
        || key.ends_with(".running_var")
        || key.ends_with(".num_batches_tracked")
}

/// Every weight key of the spec with its shape, running statistics included.
pub fn weight_shapes(spec: &ModelSpec) -> Result<BTreeMap<String, Vec<usize>>, ZooError> {
    // Building on a VarMap records exactly the keys and shapes the layers ask for.
    let (varmap, _) = Model::init(spec, &Device::Cpu)?;
    let data = varmap.data().lock().expect("varmap lock poisoned");
    Ok(data
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().dims().to_vec()))
        .collect())
}

/// Trainable parameters (BatchNorm running statistics excluded, as in the study's counts).
pub fn param_count(shapes: &BTreeMap<String, Vec<usize>>) -> usize {
    shapes
        .iter()
        .filter(|(k, _)| !is_running_stat(k))
        .map(|(_, s)| s.iter().product::<usize>())
        .sum()
}

fn check_weights(spec: &ModelSpec, tensors: &BTreeMap<String, Tensor>) -> Result<(), ZooError> {
    let expected = weight_shapes(spec)?;
    let mut problems = Vec::new();
    let missing: Vec<&str> = expected
        .keys()
        .filter(|k| !tensors.contains_key(*k))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        problems.push(format!("missing {}", list(&missing)));
    }
    let unexpected: Vec<&str> = tensors
        .keys()
        .filter(|k| !expected.contains_key(*k) && !k.ends_with(".num_batches_tracked"))
        .map(String::as_str)
        .collect();
    if !unexpected.is_empty() {
        problems.push(format!("unexpected {}", list(&unexpected)));
    }
    for (k, shape) in &expected {
        if let Some(t) = tensors.get(k) {
            if t.dims() != shape.as_slice() {
                problems.push(format!(
                    "`{k}` has shape {:?}, expected {:?}",
                    t.dims(),
                    shape
                ));
            } else if t.dtype() != DType::F32 {
                problems.push(format!("`{k}` has dtype {:?}, expected f32", t.dtype()));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ZooError::WeightMismatch {
            arch: spec.arch,
            problems: problems.join("; "),
        })
    }
}

/// Lists up to 8 keys, then a count, so errors stay readable for a wrong-architecture file.
fn list(keys: &[&str]) -> String {
    const SHOWN: usize = 8;
    let head: Vec<String> = keys.iter().take(SHOWN).map(|k| format!("`{k}`")).collect();
    if keys.len() > SHOWN {
        format!("{} and {} more", head.join(", "), keys.len() - SHOWN)
    } else {
        head.join(", ")
    }
}

#[cfg(test)]
mod tests;
