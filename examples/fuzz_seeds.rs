//! Writes the generated part of the fuzz targets' seed corpora (`fuzz/seeds/`): images encoded
//! by real encoders in every supported format, requests of both APIs as clients put them on
//! the wire, and tiny model directories of every small architecture in every weight format
//! (int8 with activation ranges calibrated on one image, where the architecture has an int8
//! form; plus their F32 safetensors, which `fuzz/make_seeds.sh` also turns into PyTorch zip and
//! legacy checkpoints). Deterministic: rerunning writes the same bytes.
//!
//!   cargo run --release --example fuzz_seeds -- fuzz/seeds

use std::io::Cursor;
use std::path::Path;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use prost::Message;
use slimserve::formats::model_dir;
use slimserve::formats::model_dir::ModelConfig;
use slimserve::formats::weights::{self, WeightFormat};
use slimserve::fuzzing::{join_model_dir, join_rest_infer, INPUT_SIZE};
use slimserve::grpc::pb::{inference, slimserve::v1 as own};
use slimserve::infer::qmodel::Int8Model;
use slimserve::infer::FastModel;
use slimserve::zoo::{Arch, Model, ModelSpec};

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 255 / w.max(1)) as u8,
            (y * 255 / h.max(1)) as u8,
            ((x ^ y) & 0xff) as u8,
        ])
    })
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn images(dir: &Path) {
    let sizes = [(16, 16), (40, 24), (7, 65)];
    for (w, h) in sizes {
        let rgb = DynamicImage::ImageRgb8(gradient(w, h));
        for (format, ext) in [
            (ImageFormat::Png, "png"),
            (ImageFormat::Jpeg, "jpg"),
            (ImageFormat::Bmp, "bmp"),
            (ImageFormat::Gif, "gif"),
            (ImageFormat::WebP, "webp"),
        ] {
            write(dir, &format!("gen-{w}x{h}.{ext}"), &encode(&rgb, format));
        }
    }
    let base = gradient(24, 24);
    let gray = DynamicImage::ImageLuma8(DynamicImage::ImageRgb8(base.clone()).to_luma8());
    write(dir, "gen-gray.png", &encode(&gray, ImageFormat::Png));
    write(dir, "gen-gray.jpg", &encode(&gray, ImageFormat::Jpeg));
    let rgba = DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(base.clone()).to_rgba8());
    write(dir, "gen-rgba.png", &encode(&rgba, ImageFormat::Png));
    let deep = DynamicImage::ImageRgb16(DynamicImage::ImageRgb8(base).to_rgb16());
    write(dir, "gen-rgb16.png", &encode(&deep, ImageFormat::Png));
}

fn small_png() -> Vec<u8> {
    encode(&DynamicImage::ImageRgb8(gradient(20, 18)), ImageFormat::Png)
}

fn f32_bytes(n: usize) -> Vec<u8> {
    (0..n)
        .flat_map(|i| (i as f32 / n as f32).to_le_bytes())
        .collect()
}

fn classify_requests(dir: &Path) {
    let s = INPUT_SIZE as i64;
    let n = 3 * INPUT_SIZE * INPUT_SIZE;
    let tensor = |dtype: own::DataType, shape: Vec<i64>, data: Vec<u8>| own::ClassifyRequest {
        model: "fuzz".into(),
        top_k: 3,
        input: Some(own::classify_request::Input::Tensor(own::Tensor {
            dtype: dtype as i32,
            shape,
            data: data.into(),
        })),
        ..Default::default()
    };
    let seeds = [
        (
            "image",
            own::ClassifyRequest {
                model: "fuzz".into(),
                input: Some(own::classify_request::Input::Image(small_png().into())),
                ..Default::default()
            },
        ),
        (
            "chw",
            tensor(own::DataType::Float32, vec![3, s, s], f32_bytes(n)),
        ),
        (
            "nchw",
            tensor(own::DataType::Float32, vec![1, 3, s, s], f32_bytes(n)),
        ),
        (
            "hwc",
            tensor(own::DataType::Uint8, vec![s, s, 3], vec![7; n]),
        ),
        (
            "bad-dtype",
            tensor(own::DataType::Unspecified, vec![3, s, s], vec![0; 4 * n]),
        ),
    ];
    for (name, req) in seeds {
        write(dir, &format!("{name}.pb"), &req.encode_to_vec());
    }
}

/// KServe v2 HTTP/REST bodies as tritonclient.http and curl send them: JSON numbers (flat and
/// nested) and the binary tensor extension.
fn rest_infer_requests(dir: &Path) {
    let s = INPUT_SIZE;
    let n = 3 * s * s;
    let json = |v: serde_json::Value| serde_json::to_vec(&v).unwrap();
    let pixels: Vec<u8> = (0..n).map(|i| (i * 7 % 256) as u8).collect();
    let nested: Vec<Vec<Vec<f32>>> = (0..3)
        .map(|c| {
            (0..s)
                .map(|y| (0..s).map(|x| ((c + y + x) % 10) as f32 / 10.0).collect())
                .collect()
        })
        .collect();
    let binary = |name: &str, datatype: &str, shape: Vec<usize>, data: &[u8]| {
        let head = json(serde_json::json!({
            "id": "seed",
            "inputs": [{
                "name": name, "datatype": datatype, "shape": shape,
                "parameters": { "binary_data_size": data.len() },
            }],
            "outputs": [{ "name": "logits", "parameters": { "binary_data": true } }],
        }));
        let mut body = head.clone();
        body.extend_from_slice(data);
        (Some(head.len() as u16), body)
    };
    let f32_bytes: Vec<u8> = (0..2 * n)
        .flat_map(|i| ((i % 100) as f32 / 100.0).to_le_bytes())
        .collect();
    let (len, mut leftover) = binary("image", "UINT8", vec![1, s, s, 3], &pixels);
    leftover.push(0);
    let seeds = [
        (
            "json-image",
            None,
            json(serde_json::json!({
                "inputs": [{ "name": "image", "datatype": "UINT8", "shape": [1, s, s, 3], "data": pixels }],
            })),
        ),
        (
            "json-input-nested",
            None,
            json(serde_json::json!({
                "inputs": [{ "name": "input", "datatype": "FP32", "shape": [1, 3, s, s], "data": [nested] }],
                "outputs": [{ "name": "logits" }],
                "parameters": { "binary_data_output": false },
            })),
        ),
        {
            let (len, body) = binary("image", "UINT8", vec![1, s, s, 3], &pixels);
            ("binary-image", len, body)
        },
        {
            let (len, body) = binary("input", "FP32", vec![2, 3, s, s], &f32_bytes);
            ("binary-input-batch2", len, body)
        },
        ("bad-binary-leftover", len, leftover),
        (
            "bad-json-truncated",
            None,
            br#"{"inputs":[{"name":"image""#.to_vec(),
        ),
    ];
    for (name, len, body) in seeds {
        write(dir, &format!("{name}.bin"), &join_rest_infer(len, &body));
    }
}

fn model_infer_requests(dir: &Path) {
    use inference::model_infer_request::InferInputTensor;
    use inference::InferTensorContents;
    let s = INPUT_SIZE as i64;
    let n = 3 * INPUT_SIZE * INPUT_SIZE;
    let input = |name: &str, datatype: &str, shape: Vec<i64>| InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape,
        ..Default::default()
    };
    let raw = |t: InferInputTensor, data: Vec<u8>| inference::ModelInferRequest {
        model_name: "fuzz".into(),
        inputs: vec![t],
        raw_input_contents: vec![data.into()],
        outputs: vec![inference::model_infer_request::InferRequestedOutputTensor {
            name: "logits".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let typed = |mut t: InferInputTensor, contents: InferTensorContents| {
        t.contents = Some(contents);
        inference::ModelInferRequest {
            model_name: "fuzz".into(),
            model_version: "1".into(),
            id: "seed".into(),
            inputs: vec![t],
            ..Default::default()
        }
    };
    let seeds = [
        (
            "image-raw",
            raw(input("image", "UINT8", vec![2, s, s, 3]), vec![9; 2 * n]),
        ),
        (
            "input-raw",
            raw(input("input", "FP32", vec![1, 3, s, s]), f32_bytes(n)),
        ),
        (
            "input-typed",
            typed(
                input("input", "FP32", vec![1, 3, s, s]),
                InferTensorContents {
                    fp32_contents: (0..n).map(|i| i as f32 / n as f32).collect(),
                    ..Default::default()
                },
            ),
        ),
        (
            "image-typed",
            typed(
                input("image", "UINT8", vec![1, s, s, 3]),
                InferTensorContents {
                    uint_contents: (0..n as u32).map(|i| i % 256).collect(),
                    ..Default::default()
                },
            ),
        ),
    ];
    for (name, req) in seeds {
        write(dir, &format!("{name}.pb"), &req.encode_to_vec());
    }
}

/// Tiny models (every layer 4 or 8 channels wide) of each architecture whose widths are free.
fn model_dirs(dir: &Path, checkpoints: &Path) {
    for arch in Arch::ALL {
        if matches!(arch, Arch::Resnet18 | Arch::MobileNetV2) {
            continue; // fixed ImageNet widths: megabytes of weights, too big for a seed
        }
        let mut spec = ModelSpec::new(arch, 3, arch.min_input_size());
        spec.widths = spec.widths.iter().map(|w| (w / 16).clamp(4, 8)).collect();
        let (varmap, model) = slimserve::zoo::test_models::input_dependent(&spec, 7);
        let f32_tensors = slimserve::zoo::varmap_tensors(&varmap);
        for format in WeightFormat::ALL {
            let mut tensors = f32_tensors.clone();
            if format == WeightFormat::Int8 {
                // Ranges calibrated on one fixed image, as `slimtrain quantize --format int8`
                // stores them; an architecture without an int8 form gets no int8 seed.
                let Some(ranges) = int8_ranges(&model, &spec) else {
                    continue;
                };
                let flat: Vec<f32> = ranges.iter().flat_map(|&(lo, hi)| [lo, hi]).collect();
                tensors.insert(
                    weights::ACTIVATION_RANGES_KEY.to_string(),
                    Tensor::from_vec(flat, (ranges.len(), 2), &Device::Cpu).unwrap(),
                );
            }
            let mut config = ModelConfig::new(spec.clone(), model_dir::default_labels(3));
            config.weights.format = format;
            let json = serde_json::to_vec_pretty(&config).unwrap();
            let bytes = weights::encode(&tensors, format).unwrap();
            write(
                dir,
                &format!("{arch}-{format}.bin"),
                &join_model_dir(&json, &bytes),
            );
            if format == WeightFormat::F32 {
                write(checkpoints, &format!("{arch}.safetensors"), &bytes);
            }
        }
    }
}

/// The int8 engine's activation ranges for `model` over one deterministic image, or `None`
/// when the architecture has no int8 form.
fn int8_ranges(model: &Model, spec: &ModelSpec) -> Option<Vec<(f32, f32)>> {
    let fast = FastModel::compile(model).ok()?;
    let s = spec.input_size;
    let x: Vec<f32> = (0..3 * s * s).map(|i| (i % 251) as f32 / 251.0).collect();
    let ranges = fast.calibrate(&x, 1);
    Int8Model::compile(model, &ranges).ok()?;
    Some(ranges)
}

fn main() {
    let out = std::env::args()
        .nth(1)
        .expect("usage: fuzz_seeds OUT_DIR (e.g. fuzz/seeds)");
    let out = Path::new(&out);
    images(&out.join("image"));
    classify_requests(&out.join("classify_request"));
    model_infer_requests(&out.join("model_infer_request"));
    rest_infer_requests(&out.join("rest_infer_request"));
    model_dirs(&out.join("model_dir"), &out.join("checkpoint"));
    println!("seeds written under {}", out.display());
}
