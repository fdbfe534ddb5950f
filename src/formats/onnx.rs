//! ONNX export of a model's eval-mode graph.
//!
//! [`export`] writes a self-contained `ModelProto` (IR version 8, default-domain opset 17,
//! producer `slimserve`) with one input `input: f32[N, 3, S, S]` (batch dimension symbolic,
//! named `N`; `S` is the spec's input size) and one output `logits: f32[N, classes]`. The
//! model spec is recorded as JSON in the metadata property `slimserve.spec`.
//!
//! Every weight becomes an initializer under its PyTorch state_dict key (raw little-endian
//! f32), and every layer maps to standard operators with the exact eval-mode semantics of the
//! candle `forward_t(x, false)`:
//!
//! | candle (zoo)                         | ONNX                                                     |
//! |--------------------------------------|----------------------------------------------------------|
//! | [`Conv`] (any k, stride, pad, group) | `Conv` (`kernel_shape`, `strides`, `pads`, `group`, `dilations`=1), bias input only if the layer has one |
//! | [`Bn`] in eval mode                  | `BatchNormalization` (`epsilon` = [`BN_EPS`], running stats; training_mode 0) |
//! | ReLU                                 | `Relu`                                                   |
//! | ReLU6 (`clamp(0, 6)`)                | `Clip` with scalar initializers `relu6.min` = 0, `relu6.max` = 6 |
//! | 2x2 max pool, stride 2 (floor)       | `MaxPool` (kernel 2, stride 2, no padding, `ceil_mode` 0) |
//! | ResNet's 3x3/2 max pool, zero pad 1  | `MaxPool` (kernel 3, stride 2, pads 1). ONNX pads with -inf, candle with 0; they agree because the pool follows a ReLU |
//! | global average pool -> [N, C]        | `GlobalAveragePool` then `Flatten` (axis 1)              |
//! | NCHW flatten before `fc` (PlainCnn)  | `Flatten` (axis 1), same row-major order                 |
//! | [`Linear`]                           | `Gemm` (`transB` = 1, weight `[out, in]`, bias `[out]`) |
//! | residual sum                         | `Add`                                                    |
//!
//! Node names are the layer keys (`cnn.0.0`, `layer1.0.conv1`, ...); intermediate values
//! are named after the node that produces them.

use candle_core::{DType, Device, Tensor};
use prost::Message;

use crate::zoo::{Bn, Conv, Linear, Model, Net, BN_EPS};

#[allow(clippy::all, missing_docs)]
mod pb {
    include!(concat!(env!("OUT_DIR"), "/onnx.rs"));
}

use pb::attribute_proto::AttributeType;
use pb::tensor_proto::DataType;
use pb::tensor_shape_proto::{dimension, Dimension};

/// ONNX IR version written (IR 8 is the first to allow opset 17).
pub const IR_VERSION: i64 = 8;
/// Version of the default ("" / ai.onnx) operator set the graph uses.
pub const OPSET_VERSION: i64 = 17;
/// Name of the graph input, `f32[N, 3, S, S]`.
pub const INPUT_NAME: &str = "input";
/// Name of the graph output, `f32[N, classes]`.
pub const OUTPUT_NAME: &str = "logits";
/// Symbolic name of the batch dimension.
pub const BATCH_DIM: &str = "N";
/// `producer_name` of exported models.
pub const PRODUCER_NAME: &str = "slimserve";

#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    #[error("reading model weights for ONNX export: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("cannot export to ONNX: {0}")]
    Unsupported(String),
}

/// Serialises the model's eval-mode graph as ONNX: opset 17, input "input" `[N,3,S,S]` f32 with
/// symbolic batch dim "N", output "logits" [N, classes].
pub fn export(model: &Model) -> Result<Vec<u8>, OnnxError> {
    Ok(build(model)?.encode_to_vec())
}

fn build(model: &Model) -> Result<pb::ModelProto, OnnxError> {
    let spec = model.spec();
    let mut g = GraphBuilder::default();
    let x = INPUT_NAME.to_string();
    let logits = match model.net() {
        Net::Plain(net) => {
            let mut x = x;
            for (k, (conv, bn)) in net.blocks().iter().enumerate() {
                x = g.conv(&x, conv, &format!("cnn.{}", 4 * k))?;
                x = g.bn(&x, bn, &format!("cnn.{}", 4 * k + 1))?;
                x = g.relu(&x, &format!("cnn.{}", 4 * k + 2));
                x = g.max_pool(&x, 2, 2, 0, &format!("cnn.{}", 4 * k + 3));
            }
            let x = g.flatten(&x, "flatten");
            g.gemm(&x, net.fc(), "fc.0")?
        }
        Net::Mobile(net) => {
            let (conv, bn) = net.stem();
            let mut x = g.conv(&x, conv, "cnn.0.0")?;
            x = g.bn(&x, bn, "cnn.0.1")?;
            x = g.relu6(&x, "cnn.0.2");
            x = g.max_pool(&x, 2, 2, 0, "cnn.0.3");
            for (i, b) in net.blocks().iter().enumerate() {
                let p = format!("cnn.{}", i + 1);
                x = g.conv(&x, &b.spatial, &format!("{p}.0"))?;
                x = g.bn(&x, &b.bn, &format!("{p}.1"))?;
                x = g.relu6(&x, &format!("{p}.2"));
                x = g.conv(&x, &b.pointwise, &format!("{p}.3"))?;
                if b.pool {
                    x = g.max_pool(&x, 2, 2, 0, &format!("{p}.4"));
                }
            }
            let x = g.global_avg_pool(&x, "avgpool");
            g.gemm(&x, net.fc(), "fc.0")?
        }
        Net::Resnet(net) => {
            let (conv, bn) = net.stem();
            let mut x = g.conv(&x, conv, "conv1")?;
            x = g.bn(&x, bn, "bn1")?;
            x = g.relu(&x, "relu");
            x = g.max_pool(&x, 3, 2, 1, "maxpool");
            for (i, b) in net.blocks().iter().enumerate() {
                let p = format!("layer{}.{}", i / 2 + 1, i % 2);
                let mut y = g.conv(&x, &b.conv1, &format!("{p}.conv1"))?;
                y = g.bn(&y, &b.bn1, &format!("{p}.bn1"))?;
                y = g.relu(&y, &format!("{p}.relu1"));
                y = g.conv(&y, &b.conv2, &format!("{p}.conv2"))?;
                y = g.bn(&y, &b.bn2, &format!("{p}.bn2"))?;
                let shortcut = match &b.downsample {
                    Some((conv, bn)) => {
                        let s = g.conv(&x, conv, &format!("{p}.downsample.0"))?;
                        g.bn(&s, bn, &format!("{p}.downsample.1"))?
                    }
                    None => x.clone(),
                };
                let sum = g.node("Add", &format!("{p}.add"), vec![y, shortcut], vec![]);
                x = g.relu(&sum, &format!("{p}.relu2"));
            }
            let x = g.global_avg_pool(&x, "avgpool");
            g.gemm(&x, net.fc(), "fc")?
        }
        Net::MobileV2(net) => {
            let (conv, bn) = net.stem();
            let mut x = g.conv(&x, conv, "features.0.0")?;
            x = g.bn(&x, bn, "features.0.1")?;
            x = g.relu6(&x, "features.0.2");
            for (i, b) in net.blocks().iter().enumerate() {
                let p = format!("features.{}.conv", i + 1);
                // torchvision's key of each layer: t = 1 blocks have no expansion.
                let (dw, project) = if b.expand.is_some() { (1, 2) } else { (0, 1) };
                let mut y = x.clone();
                if let Some((conv, bn)) = &b.expand {
                    y = g.conv(&y, conv, &format!("{p}.0.0"))?;
                    y = g.bn(&y, bn, &format!("{p}.0.1"))?;
                    y = g.relu6(&y, &format!("{p}.0.2"));
                }
                let (conv, bn) = &b.depthwise;
                y = g.conv(&y, conv, &format!("{p}.{dw}.0"))?;
                y = g.bn(&y, bn, &format!("{p}.{dw}.1"))?;
                y = g.relu6(&y, &format!("{p}.{dw}.2"));
                let (conv, bn) = &b.project;
                y = g.conv(&y, conv, &format!("{p}.{project}"))?;
                y = g.bn(&y, bn, &format!("{p}.{}", project + 1))?;
                x = if b.residual {
                    g.node(
                        "Add",
                        &format!("features.{}.add", i + 1),
                        vec![y, x],
                        vec![],
                    )
                } else {
                    y
                };
            }
            let last = format!("features.{}", net.blocks().len() + 1);
            let (conv, bn) = net.head();
            x = g.conv(&x, conv, &format!("{last}.0"))?;
            x = g.bn(&x, bn, &format!("{last}.1"))?;
            x = g.relu6(&x, &format!("{last}.2"));
            let x = g.global_avg_pool(&x, "avgpool");
            g.gemm(&x, net.classifier(), "classifier.1")?
        }
    };
    // Give the last node's output the public name.
    let last = g.nodes.last_mut().expect("every net has a head");
    debug_assert_eq!(last.output, vec![logits]);
    last.output = vec![OUTPUT_NAME.to_string()];

    let s = spec.input_size as i64;
    let spec_json = serde_json::to_string(spec)
        .map_err(|e| OnnxError::Unsupported(format!("model spec is not serialisable: {e}")))?;
    let graph = pb::GraphProto {
        node: g.nodes,
        name: Some(format!("slimserve-{}", spec.arch)),
        initializer: g.initializers,
        input: vec![value_info(
            INPUT_NAME,
            &[
                Dim::Param(BATCH_DIM),
                Dim::Value(3),
                Dim::Value(s),
                Dim::Value(s),
            ],
        )],
        output: vec![value_info(
            OUTPUT_NAME,
            &[Dim::Param(BATCH_DIM), Dim::Value(spec.num_classes as i64)],
        )],
        ..Default::default()
    };
    Ok(pb::ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![pb::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET_VERSION),
        }],
        producer_name: Some(PRODUCER_NAME.to_string()),
        producer_version: Some(env!("CARGO_PKG_VERSION").to_string()),
        doc_string: Some(format!(
            "{} classifier, {} classes, {s}x{s} input",
            spec.arch, spec.num_classes
        )),
        graph: Some(graph),
        metadata_props: vec![pb::StringStringEntryProto {
            key: Some("slimserve.spec".to_string()),
            value: Some(spec_json),
        }],
        ..Default::default()
    })
}

enum Dim<'a> {
    Value(i64),
    Param(&'a str),
}

fn value_info(name: &str, dims: &[Dim]) -> pb::ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Value(v) => dimension::Value::DimValue(*v),
                Dim::Param(p) => dimension::Value::DimParam(p.to_string()),
            }),
            denotation: None,
        })
        .collect();
    pb::ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            denotation: None,
        }),
        ..Default::default()
    }
}

fn attr_int(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn attr_float(name: &str, v: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

/// An f32 initializer with raw little-endian data.
fn f32_tensor(name: &str, dims: &[usize], data: &[f32]) -> pb::TensorProto {
    pb::TensorProto {
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DataType::Float as i32),
        name: Some(name.to_string()),
        raw_data: Some(data.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

#[derive(Default)]
struct GraphBuilder {
    nodes: Vec<pb::NodeProto>,
    initializers: Vec<pb::TensorProto>,
    relu6_bounds: bool,
}

impl GraphBuilder {
    /// Adds a node with one output named after the node; returns that output's name.
    fn node(
        &mut self,
        op: &str,
        name: &str,
        inputs: Vec<String>,
        attribute: Vec<pb::AttributeProto>,
    ) -> String {
        let out = format!("{name}.out");
        self.nodes.push(pb::NodeProto {
            input: inputs,
            output: vec![out.clone()],
            name: Some(name.to_string()),
            op_type: Some(op.to_string()),
            attribute,
            ..Default::default()
        });
        out
    }

    /// Adds `t` (any dtype/device, stored as f32) as an initializer named `name`.
    fn init(&mut self, name: String, t: &Tensor) -> Result<String, OnnxError> {
        let data: Vec<f32> = t
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        self.initializers.push(f32_tensor(&name, t.dims(), &data));
        Ok(name)
    }

    fn conv(&mut self, x: &str, conv: &Conv, name: &str) -> Result<String, OnnxError> {
        let (_, _, kh, kw) = conv.weight().dims4()?;
        let (s, p) = (conv.stride() as i64, conv.padding() as i64);
        let mut inputs = vec![
            x.to_string(),
            self.init(format!("{name}.weight"), conv.weight())?,
        ];
        if let Some(b) = conv.bias() {
            inputs.push(self.init(format!("{name}.bias"), b)?);
        }
        let attrs = vec![
            attr_ints("kernel_shape", &[kh as i64, kw as i64]),
            attr_ints("strides", &[s, s]),
            attr_ints("pads", &[p, p, p, p]),
            attr_ints("dilations", &[1, 1]),
            attr_int("group", conv.groups() as i64),
        ];
        Ok(self.node("Conv", name, inputs, attrs))
    }

    fn bn(&mut self, x: &str, bn: &Bn, name: &str) -> Result<String, OnnxError> {
        let inputs = vec![
            x.to_string(),
            self.init(format!("{name}.weight"), bn.weight())?,
            self.init(format!("{name}.bias"), bn.bias())?,
            self.init(format!("{name}.running_mean"), bn.running_mean())?,
            self.init(format!("{name}.running_var"), bn.running_var())?,
        ];
        let attrs = vec![attr_float("epsilon", BN_EPS as f32)];
        Ok(self.node("BatchNormalization", name, inputs, attrs))
    }

    fn relu(&mut self, x: &str, name: &str) -> String {
        self.node("Relu", name, vec![x.to_string()], vec![])
    }

    fn relu6(&mut self, x: &str, name: &str) -> String {
        if !self.relu6_bounds {
            self.initializers.push(f32_tensor("relu6.min", &[], &[0.0]));
            self.initializers.push(f32_tensor("relu6.max", &[], &[6.0]));
            self.relu6_bounds = true;
        }
        let inputs = vec![x.to_string(), "relu6.min".into(), "relu6.max".into()];
        self.node("Clip", name, inputs, vec![])
    }

    fn max_pool(&mut self, x: &str, k: i64, s: i64, p: i64, name: &str) -> String {
        let attrs = vec![
            attr_ints("kernel_shape", &[k, k]),
            attr_ints("strides", &[s, s]),
            attr_ints("pads", &[p, p, p, p]),
            attr_int("ceil_mode", 0),
        ];
        self.node("MaxPool", name, vec![x.to_string()], attrs)
    }

    fn flatten(&mut self, x: &str, name: &str) -> String {
        self.node(
            "Flatten",
            name,
            vec![x.to_string()],
            vec![attr_int("axis", 1)],
        )
    }

    /// [N, C, H, W] -> [N, C].
    fn global_avg_pool(&mut self, x: &str, name: &str) -> String {
        let pooled = self.node("GlobalAveragePool", name, vec![x.to_string()], vec![]);
        self.flatten(&pooled, &format!("{name}.flatten"))
    }

    fn gemm(&mut self, x: &str, lin: &Linear, name: &str) -> Result<String, OnnxError> {
        let mut inputs = vec![
            x.to_string(),
            self.init(format!("{name}.weight"), lin.weight())?,
        ];
        if let Some(b) = lin.bias() {
            inputs.push(self.init(format!("{name}.bias"), b)?);
        }
        Ok(self.node("Gemm", name, inputs, vec![attr_int("transB", 1)]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zoo::{Arch, ModelSpec};

    fn decoded(arch: Arch, classes: usize) -> (Model, pb::ModelProto) {
        let spec = ModelSpec::new(arch, classes, arch.min_input_size());
        let (_, model) = Model::init(&spec, &Device::Cpu).unwrap();
        let bytes = export(&model).unwrap();
        (model, pb::ModelProto::decode(bytes.as_slice()).unwrap())
    }

    fn dims(v: &pb::ValueInfoProto) -> Vec<String> {
        let Some(pb::type_proto::Value::TensorType(t)) = &v.r#type.as_ref().unwrap().value else {
            panic!("{} is not a tensor", v.name());
        };
        assert_eq!(t.elem_type(), DataType::Float as i32);
        t.shape
            .as_ref()
            .unwrap()
            .dim
            .iter()
            .map(|d| match d.value.as_ref().unwrap() {
                dimension::Value::DimValue(v) => v.to_string(),
                dimension::Value::DimParam(p) => p.clone(),
            })
            .collect()
    }

    #[test]
    fn exported_bytes_decode_with_the_declared_interface() {
        let (model, m) = decoded(Arch::Student, 7);
        assert_eq!(m.ir_version(), IR_VERSION);
        assert_eq!(m.producer_name(), "slimserve");
        assert_eq!(m.opset_import.len(), 1);
        assert_eq!(m.opset_import[0].domain(), "");
        assert_eq!(m.opset_import[0].version(), 17);
        let spec_prop = &m.metadata_props[0];
        assert_eq!(spec_prop.key(), "slimserve.spec");
        let spec: ModelSpec = serde_json::from_str(spec_prop.value()).unwrap();
        assert_eq!(&spec, model.spec());

        let g = m.graph.as_ref().unwrap();
        assert_eq!(g.input.len(), 1);
        assert_eq!(g.output.len(), 1);
        assert_eq!(g.input[0].name(), "input");
        assert_eq!(g.output[0].name(), "logits");
        assert_eq!(dims(&g.input[0]), ["N", "3", "32", "32"]);
        assert_eq!(dims(&g.output[0]), ["N", "7"]);
        assert_eq!(g.node.last().unwrap().output, ["logits"]);
        assert_eq!(g.node.last().unwrap().op_type(), "Gemm");
    }

    #[test]
    fn every_weight_is_an_initializer_under_its_state_dict_key() {
        for arch in [Arch::Big, Arch::GroupConv, Arch::Resnet18] {
            let spec = ModelSpec::new(arch, 5, arch.min_input_size());
            let (varmap, model) = Model::init(&spec, &Device::Cpu).unwrap();
            let bytes = export(&model).unwrap();
            let g = pb::ModelProto::decode(bytes.as_slice())
                .unwrap()
                .graph
                .unwrap();
            let data = varmap.data().lock().unwrap();
            for (key, var) in data.iter() {
                let t = g
                    .initializer
                    .iter()
                    .find(|t| t.name() == key)
                    .unwrap_or_else(|| panic!("{arch}: no initializer `{key}`"));
                let want = var.as_tensor();
                let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
                assert_eq!(dims, want.dims(), "{arch}: {key}");
                assert_eq!(t.data_type(), DataType::Float as i32);
                let got: Vec<f32> = t
                    .raw_data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(got, want, "{arch}: {key}");
            }
            // Weights plus, for the separable nets, the two ReLU6 bounds.
            let extra = usize::from(arch == Arch::GroupConv) * 2;
            assert_eq!(g.initializer.len(), data.len() + extra, "{arch}");
        }
    }
}
