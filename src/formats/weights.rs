//! Weight encodings: how a model's `state_dict` is stored in a safetensors file.
//!
//! A model's weights are a map from PyTorch `state_dict` key (`cnn.0.0.weight`,
//! `cnn.1.1.running_mean`, `fc.0.bias`, ...) to an f32 tensor. [`encode`] writes such a map
//! into safetensors bytes in one of four [`WeightFormat`]s and [`decode`] reads it back
//! (also accepting files written by PyTorch's `safetensors.torch.save_file`).
//!
//! # Formats
//!
//! * `f32`: every tensor stored as `F32` under its own key, bit-exact. Loads in PyTorch as is.
//! * `f16`: every tensor stored as `F16` (round to nearest even) under its own key.
//! * `uint8` (scheme `per_tensor`) and `uint8_per_channel` (scheme `per_channel`): affine
//!   8-bit quantisation of every tensor, BatchNorm statistics included. For each *range row*
//!   (a set of values sharing one `(min, max)`, both the exact f32 extremes of the row):
//!
//!   ```text
//!   encode: q  = round((w - min) / (max - min) * 255)        stored as U8, q in 0..=255
//!   decode: w' = q / 255 * (max - min) + min                  (evaluated in f64, rounded to f32)
//!   ```
//!
//!   so `|w - w'| <= (max - min) / 510` per element, up to a few f32 ulps of
//!   `max(|min|, |max|)`. A constant row (`max == min`) stores `q = 0` and decodes to exactly
//!   `min`; an empty row stores the range `(0, 0)`. `round` is round-half-away-from-zero.
//!   NaN or infinite input values are rejected.
//!
//!   The range rows of a tensor are: the whole tensor (`per_tensor`, and rank-0/1 tensors
//!   under `per_channel`), or one row per slice along dim 0 (rank >= 2 tensors under
//!   `per_channel`; `shape[0]` rows of `numel / shape[0]` contiguous values each).
//!
//! # On-disk layout of the uint8 formats
//!
//! * **BatchNorm packing.** A BatchNorm is detected generically: a key `P.running_mean`
//!   exists and `P.weight`, `P.bias`, `P.running_mean`, `P.running_var` all exist, are 1-D
//!   and have the same length `C`. Those four are stored as ONE `U8` tensor `P.bn_stats` of
//!   shape `[4, C]` whose rows are, in order, `weight`, `bias`, `running_mean`,
//!   `running_var`, each row quantised with its own range (under both schemes). If the
//!   members do not match that pattern (e.g. a BatchNorm without affine parameters), the
//!   tensors are stored individually like any other tensor.
//! * Every other tensor is stored as a `U8` tensor under its own key, with its own shape.
//! * All ranges live in one `F32` tensor `__ranges__` of shape `[R, 2]`, each row being
//!   `(min, max)`. The stored `U8` tensors are visited in lexicographic (byte) order of their
//!   stored names and each contributes, in order, its range rows: 4 for a `*.bn_stats`
//!   tensor, `shape[0]` for a rank >= 2 tensor under `per_channel`, otherwise 1.
//!   `R` is the total; a `per_channel` tensor with `shape[0] == 0` contributes no row.
//! * Input keys `__ranges__` and `*.bn_stats` are reserved and rejected by [`encode`].
//!
//! * `int8` (scheme `symmetric_per_channel`): the int8 execution path's file. Every tensor of
//!   rank >= 2 (convolution and linear weights) is stored as `I8` under its own key, quantised
//!   symmetrically per output channel (dim-0 slice): `q = round(w / s)`, `s = max|w| / 127`,
//!   `q` in `-127..=127`, with the scales as an `F32` tensor `KEY_scale` of shape `[shape[0]]`
//!   (an all-zero slice has scale 1); decoded as `w' = q * s`, so `|w - w'| <= s / 2`. Every
//!   other tensor (biases, BatchNorm parameters and statistics) stays `F32`. The activation
//!   ranges measured by calibration are an `F32` tensor `__activation_ranges__` of shape
//!   `[P, 2]` (`(min, max)` of the input and of each layer's output, in layer order), required
//!   by this format and returned by [`decode`] under the same key. Any tool that reads
//!   safetensors gets the weights back as `KEY.astype(float32) * KEY_scale[:, None, ...]`.
//!
//! # Common rules
//!
//! * The safetensors `__metadata__` is `{"format": "f32" | "f16" | "uint8"}`, plus
//!   `"scheme": "per_tensor" | "per_channel"` for `uint8`.
//! * Keys ending in `num_batches_tracked` are dropped by [`encode`] (whatever their dtype;
//!   PyTorch refills them on load) and ignored by [`decode`] (any dtype).
//! * [`decode`] validates everything it reads (dtypes as the format says, shapes, the row
//!   count of `__ranges__`, finite `min <= max` ranges, ...) and returns a [`CodecError`]
//!   instead of panicking on any input. A file without our metadata (or with foreign
//!   metadata such as `{"format": "pt"}`) is read by dtype: `F32`, `F16`, `BF16` and `F64`
//!   tensors are converted to f32; the reported format is `f16` if every tensor is `F16`,
//!   otherwise `f32`.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use candle_core::{DType, Device, Shape, Tensor};
use safetensors::{Dtype, SafeTensors, View};

/// How weights are stored on disk. See the module documentation for the exact layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFormat {
    /// Plain `F32` tensors.
    F32,
    /// `F16` tensors.
    F16,
    /// 8-bit affine quantisation with one range per tensor (BatchNorm: per member).
    Uint8,
    /// 8-bit affine quantisation with one range per output channel (dim-0 slice).
    Uint8PerChannel,
    /// Symmetric int8 weights per output channel with their scales, plus the calibrated
    /// activation ranges: what the int8 engine computes with.
    Int8,
}

impl WeightFormat {
    /// Every format, smallest precision loss first.
    pub const ALL: [WeightFormat; 5] = [
        WeightFormat::F32,
        WeightFormat::F16,
        WeightFormat::Uint8,
        WeightFormat::Uint8PerChannel,
        WeightFormat::Int8,
    ];

    /// The canonical name (same as the serde name): `f32`, `f16`, `uint8`, `uint8_per_channel`,
    /// `int8`.
    pub fn as_str(&self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::F16 => "f16",
            WeightFormat::Uint8 => "uint8",
            WeightFormat::Uint8PerChannel => "uint8_per_channel",
            WeightFormat::Int8 => "int8",
        }
    }

    /// Parses a canonical name; ASCII case and `-` instead of `_` are tolerated.
    pub fn parse(s: &str) -> Option<Self> {
        let norm = s.trim().to_ascii_lowercase().replace('-', "_");
        Self::ALL.into_iter().find(|f| f.as_str() == norm)
    }

    fn is_uint8(self) -> bool {
        matches!(self, WeightFormat::Uint8 | WeightFormat::Uint8PerChannel)
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Everything that can go wrong while encoding or decoding weights.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes are not a valid safetensors file (bad header, offsets, truncation...).
    #[error("not a safetensors file: {0}")]
    NotSafetensors(String),
    /// The safetensors writer failed.
    #[error("failed to write safetensors: {0}")]
    Write(String),
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// An input tensor given to [`encode`] is not f32.
    #[error("input tensor `{name}` has dtype {dtype} but only F32 tensors can be encoded")]
    InputDtype { name: String, dtype: String },
    /// NaN or infinity in a tensor to be quantised.
    #[error("non-finite value in tensor `{name}`")]
    NonFinite { name: String },
    /// An input key collides with a name the format uses internally.
    #[error("tensor name `{name}` is reserved by the {format} format")]
    ReservedName { name: String, format: WeightFormat },
    /// A stored tensor has the wrong dtype for the file's format.
    #[error("tensor `{name}` has dtype {found} but format {format} expects {expected}")]
    WrongDtype {
        name: String,
        found: String,
        format: WeightFormat,
        expected: &'static str,
    },
    /// A file without our metadata holds a dtype that cannot be read as weights.
    #[error(
        "tensor `{name}` has dtype {dtype}; a file without weight-format metadata must hold \
         F32, F16, BF16 or F64 tensors"
    )]
    UnsupportedDtype { name: String, dtype: String },
    /// `__metadata__` names a format or scheme we do not know.
    #[error("invalid weight-format metadata: {0}")]
    BadMetadata(String),
    /// A uint8 file lacks its ranges tensor.
    #[error("format {0} requires a `__ranges__` tensor but the file has none")]
    MissingRanges(WeightFormat),
    /// `__ranges__` is not `[R, 2]`.
    #[error("`__ranges__` must have shape [R, 2] but has shape {0:?}")]
    RangesShape(Vec<usize>),
    /// `__ranges__` has a different number of rows than the stored tensors need.
    #[error("`__ranges__` has {found} rows but the tensors need {needed}")]
    RangesRows { found: usize, needed: usize },
    /// A `(min, max)` row is not finite or has `min > max`.
    #[error("`__ranges__` row {row} is invalid: min {min}, max {max} (need finite min <= max)")]
    BadRange { row: usize, min: f32, max: f32 },
    /// An int8 file or input lacks the calibrated activation ranges.
    #[error(
        "format int8 requires the calibrated activation ranges (`__activation_ranges__`, \
         [P, 2] F32) but there are none"
    )]
    MissingActivationRanges,
    /// An int8 weight's scales are missing, misshapen or not finite and positive.
    #[error("tensor `{name}`: {reason}")]
    BadScales { name: String, reason: String },
    /// A stored tensor's shape is unusable.
    #[error("tensor `{name}` has shape {shape:?}: {reason}")]
    BadShape {
        name: String,
        shape: Vec<usize>,
        reason: &'static str,
    },
    /// Unpacking `*.bn_stats` produced a key that is also stored on its own.
    #[error("key `{0}` is stored twice (once inside a `.bn_stats` tensor)")]
    DuplicateKey(String),
}

const RANGES_KEY: &str = "__ranges__";
/// The calibrated activation ranges of an int8 file, `[P, 2]`.
pub const ACTIVATION_RANGES_KEY: &str = "__activation_ranges__";
const SCALE_SUFFIX: &str = "_scale";
const METADATA_KEY: &str = "__metadata__";
const BN_SUFFIX: &str = ".bn_stats";
const BN_MEMBERS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];
const NBT_SUFFIX: &str = "num_batches_tracked";

fn is_ignored(key: &str) -> bool {
    key.ends_with(NBT_SUFFIX)
}

/// An owned tensor ready for `safetensors::serialize`.
struct Blob {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for Blob {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

impl Blob {
    /// An F32 tensor of `shape` holding `values`.
    fn f32(shape: Vec<usize>, values: &[f32]) -> Self {
        Blob {
            dtype: Dtype::F32,
            shape,
            data: f32_bytes(values),
        }
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The values of an input tensor, which must be f32.
fn input_values(name: &str, t: &Tensor) -> Result<Vec<f32>, CodecError> {
    if t.dtype() != DType::F32 {
        return Err(CodecError::InputDtype {
            name: name.to_string(),
            dtype: format!("{:?}", t.dtype()),
        });
    }
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// The values of an input tensor, which must be f32 and finite.
fn finite_input_values(name: &str, t: &Tensor) -> Result<Vec<f32>, CodecError> {
    let v = input_values(name, t)?;
    if v.iter().all(|x| x.is_finite()) {
        Ok(v)
    } else {
        Err(CodecError::NonFinite {
            name: name.to_string(),
        })
    }
}

/// Encodes f32 CPU tensors (any key order) into safetensors bytes. Non-f32 inputs are an
/// error; NaN/Inf values are an error for uint8 formats. Keys ending in
/// `num_batches_tracked` are dropped.
pub fn encode(
    tensors: &BTreeMap<String, Tensor>,
    format: WeightFormat,
) -> Result<Vec<u8>, CodecError> {
    let inputs: BTreeMap<&str, &Tensor> = tensors
        .iter()
        .filter(|(k, _)| !is_ignored(k))
        .map(|(k, t)| (k.as_str(), t))
        .collect();
    if inputs.contains_key(METADATA_KEY) {
        return Err(CodecError::ReservedName {
            name: METADATA_KEY.to_string(),
            format,
        });
    }
    if format != WeightFormat::Int8 && inputs.contains_key(ACTIVATION_RANGES_KEY) {
        return Err(CodecError::ReservedName {
            name: ACTIVATION_RANGES_KEY.to_string(),
            format,
        });
    }
    let mut meta = HashMap::new();
    let blobs = match format {
        WeightFormat::F32 => {
            meta.insert("format".to_string(), "f32".to_string());
            let mut blobs = Vec::with_capacity(inputs.len());
            for (name, t) in &inputs {
                let v = input_values(name, t)?;
                blobs.push((name.to_string(), Blob::f32(t.dims().to_vec(), &v)));
            }
            blobs
        }
        WeightFormat::F16 => {
            meta.insert("format".to_string(), "f16".to_string());
            let mut blobs = Vec::with_capacity(inputs.len());
            for (name, t) in &inputs {
                let v = input_values(name, t)?;
                let data = v
                    .iter()
                    .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                    .collect();
                blobs.push((
                    name.to_string(),
                    Blob {
                        dtype: Dtype::F16,
                        shape: t.dims().to_vec(),
                        data,
                    },
                ));
            }
            blobs
        }
        WeightFormat::Uint8 | WeightFormat::Uint8PerChannel => {
            let per_channel = format == WeightFormat::Uint8PerChannel;
            meta.insert("format".to_string(), "uint8".to_string());
            let scheme = if per_channel {
                "per_channel"
            } else {
                "per_tensor"
            };
            meta.insert("scheme".to_string(), scheme.to_string());
            encode_uint8(&inputs, format, per_channel)?
        }
        WeightFormat::Int8 => {
            meta.insert("format".to_string(), "int8".to_string());
            meta.insert("scheme".to_string(), "symmetric_per_channel".to_string());
            encode_int8(&inputs)?
        }
    };
    safetensors::serialize(blobs, Some(meta)).map_err(|e| CodecError::Write(e.to_string()))
}

/// The int8 format's tensors: rank >= 2 as I8 + `KEY_scale`, the rest F32, the activation
/// ranges as given (checked: `[P, 2]`, finite, `min <= max`).
fn encode_int8(inputs: &BTreeMap<&str, &Tensor>) -> Result<Vec<(String, Blob)>, CodecError> {
    let format = WeightFormat::Int8;
    if let Some(name) = inputs
        .keys()
        .find(|k| k.ends_with(SCALE_SUFFIX) || **k == RANGES_KEY)
    {
        return Err(CodecError::ReservedName {
            name: name.to_string(),
            format,
        });
    }
    let mut blobs = Vec::with_capacity(inputs.len() * 2);
    for (name, t) in inputs {
        let v = finite_input_values(name, t)?;
        let shape = t.dims().to_vec();
        if *name == ACTIVATION_RANGES_KEY {
            check_activation_ranges(&shape, &v)?;
        }
        if shape.len() < 2 || *name == ACTIVATION_RANGES_KEY {
            blobs.push((name.to_string(), Blob::f32(shape, &v)));
            continue;
        }
        let (q, scales) = quantize_symmetric(&v, shape[0]);
        blobs.push((
            format!("{name}{SCALE_SUFFIX}"),
            Blob::f32(vec![shape[0]], &scales),
        ));
        blobs.push((
            name.to_string(),
            Blob {
                dtype: Dtype::I8,
                shape,
                data: q.iter().map(|&x| x as u8).collect(),
            },
        ));
    }
    if !inputs.contains_key(ACTIVATION_RANGES_KEY) {
        return Err(CodecError::MissingActivationRanges);
    }
    Ok(blobs)
}

/// `values` as `rows` slices, each quantised to `-127..=127` with scale `max|w| / 127` (1 for
/// an all-zero or empty slice).
fn quantize_symmetric(values: &[f32], rows: usize) -> (Vec<i8>, Vec<f32>) {
    let per = values.len().checked_div(rows).unwrap_or(0);
    let mut q = vec![0i8; values.len()];
    let mut scales = vec![1f32; rows];
    for r in 0..rows {
        let row = &values[r * per..(r + 1) * per];
        let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        if max > 0.0 {
            scales[r] = max / 127.0;
        }
        for (d, &v) in q[r * per..(r + 1) * per].iter_mut().zip(row) {
            *d = (v / scales[r]).round().clamp(-127.0, 127.0) as i8;
        }
    }
    (q, scales)
}

/// Activation ranges are `[P, 2]` with finite `min <= max` rows.
fn check_activation_ranges(shape: &[usize], values: &[f32]) -> Result<(), CodecError> {
    let bad = |reason: String| CodecError::BadScales {
        name: ACTIVATION_RANGES_KEY.to_string(),
        reason,
    };
    if shape.len() != 2 || shape[1] != 2 || shape[0] == 0 {
        return Err(bad(format!("shape {shape:?}, expected [P, 2] with P > 0")));
    }
    for (row, pair) in values.chunks_exact(2).enumerate() {
        if !(pair[0].is_finite() && pair[1].is_finite() && pair[0] <= pair[1]) {
            return Err(bad(format!(
                "row {row} is [{}, {}], not a finite min <= max",
                pair[0], pair[1]
            )));
        }
    }
    Ok(())
}

fn decode_int8(
    mut raws: BTreeMap<String, RawTensor<'_>>,
) -> Result<BTreeMap<String, Tensor>, CodecError> {
    let format = WeightFormat::Int8;
    let wrong = |name: &str, found: Dtype, expected: &'static str| CodecError::WrongDtype {
        name: name.to_string(),
        found: found.to_string(),
        format,
        expected,
    };
    let ranges = raws
        .remove(ACTIVATION_RANGES_KEY)
        .ok_or(CodecError::MissingActivationRanges)?;
    if ranges.dtype != Dtype::F32 {
        return Err(wrong(ACTIVATION_RANGES_KEY, ranges.dtype, "F32"));
    }
    let range_values = float_values(&ranges).unwrap_or_default();
    check_activation_ranges(&ranges.shape, &range_values)?;
    let mut out = BTreeMap::new();
    out.insert(
        ACTIVATION_RANGES_KEY.to_string(),
        make_tensor(range_values, &ranges.shape)?,
    );
    // Scales are consumed by their weights; any left over is an error.
    let scale_names: Vec<String> = raws
        .keys()
        .filter(|k| k.ends_with(SCALE_SUFFIX))
        .cloned()
        .collect();
    let mut scales: BTreeMap<String, RawTensor<'_>> = scale_names
        .into_iter()
        .filter_map(|k| raws.remove(&k).map(|r| (k, r)))
        .collect();
    for (name, raw) in raws {
        match raw.dtype {
            Dtype::F32 => {
                let values = float_values(&raw).unwrap_or_default();
                out.insert(name, make_tensor(values, &raw.shape)?);
            }
            Dtype::I8 => {
                let bad = |reason: String| CodecError::BadScales {
                    name: name.clone(),
                    reason,
                };
                if raw.shape.len() < 2 {
                    return Err(bad(format!(
                        "an I8 tensor must have rank >= 2, not shape {:?}",
                        raw.shape
                    )));
                }
                let key = format!("{name}{SCALE_SUFFIX}");
                let s = scales
                    .remove(&key)
                    .ok_or_else(|| bad(format!("its scales `{key}` are missing")))?;
                let rows = raw.shape[0];
                let sv = match (s.dtype, s.shape.as_slice()) {
                    (Dtype::F32, [n]) if *n == rows => float_values(&s).unwrap_or_default(),
                    _ => {
                        return Err(bad(format!(
                            "`{key}` must be F32 of shape [{rows}], not {} {:?}",
                            s.dtype, s.shape
                        )))
                    }
                };
                if let Some(v) = sv.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
                    return Err(bad(format!(
                        "scale {v} in `{key}` is not finite and positive"
                    )));
                }
                let per = raw.data.len().checked_div(rows).unwrap_or(0);
                let values: Vec<f32> = raw
                    .data
                    .iter()
                    .enumerate()
                    .map(|(i, &b)| b as i8 as f32 * sv[i / per.max(1)])
                    .collect();
                out.insert(name, make_tensor(values, &raw.shape)?);
            }
            other => return Err(wrong(&name, other, "I8 or F32")),
        }
    }
    if let Some(name) = scales.keys().next() {
        return Err(CodecError::BadScales {
            name: name.clone(),
            reason: "scales without an I8 tensor of the same name".into(),
        });
    }
    Ok(out)
}

/// A tensor as it will be stored in a uint8 file, before quantisation.
struct Pending {
    shape: Vec<usize>,
    values: Vec<f32>,
    rows: usize,
}

fn encode_uint8(
    inputs: &BTreeMap<&str, &Tensor>,
    format: WeightFormat,
    per_channel: bool,
) -> Result<Vec<(String, Blob)>, CodecError> {
    if let Some(name) = inputs
        .keys()
        .find(|k| **k == RANGES_KEY || k.ends_with(BN_SUFFIX))
    {
        return Err(CodecError::ReservedName {
            name: name.to_string(),
            format,
        });
    }

    let mut stored: BTreeMap<String, Pending> = BTreeMap::new();
    let mut consumed: BTreeSet<String> = BTreeSet::new();

    // BatchNorm groups: `P.running_mean` plus the other three members, all 1-D of length C.
    for key in inputs.keys() {
        let Some(prefix) = key.strip_suffix(".running_mean") else {
            continue;
        };
        let names = BN_MEMBERS.map(|m| format!("{prefix}.{m}"));
        let members: Option<Vec<&Tensor>> = names
            .iter()
            .map(|n| inputs.get(n.as_str()).copied())
            .collect();
        let Some(members) = members else { continue };
        let c = match members[0].dims() {
            [c] => *c,
            _ => continue,
        };
        if members.iter().any(|t| t.dims() != [c]) {
            continue;
        }
        let mut values = Vec::with_capacity(4 * c);
        for (name, t) in names.iter().zip(&members) {
            values.extend(finite_input_values(name, t)?);
        }
        stored.insert(
            format!("{prefix}{BN_SUFFIX}"),
            Pending {
                shape: vec![4, c],
                values,
                rows: 4,
            },
        );
        consumed.extend(names);
    }

    for (name, t) in inputs {
        if consumed.contains(*name) {
            continue;
        }
        let shape = t.dims().to_vec();
        let rows = if per_channel && shape.len() >= 2 {
            shape[0]
        } else {
            1
        };
        let values = finite_input_values(name, t)?;
        stored.insert(
            name.to_string(),
            Pending {
                shape,
                values,
                rows,
            },
        );
    }

    let mut ranges: Vec<f32> = Vec::new();
    let mut blobs = Vec::with_capacity(stored.len() + 1);
    for (name, p) in stored {
        let data = quantize_rows(&p.values, p.rows, &mut ranges);
        blobs.push((
            name,
            Blob {
                dtype: Dtype::U8,
                shape: p.shape,
                data,
            },
        ));
    }
    blobs.push((
        RANGES_KEY.to_string(),
        Blob {
            dtype: Dtype::F32,
            shape: vec![ranges.len() / 2, 2],
            data: f32_bytes(&ranges),
        },
    ));
    Ok(blobs)
}

/// Quantises `values` split into `rows` equal contiguous rows (all finite), appending one
/// `(min, max)` pair per row to `ranges`.
fn quantize_rows(values: &[f32], rows: usize, ranges: &mut Vec<f32>) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len());
    if rows == 0 {
        return out;
    }
    let row_len = values.len() / rows;
    for r in 0..rows {
        let row = &values[r * row_len..(r + 1) * row_len];
        let (min, max) = if row.is_empty() {
            (0.0f32, 0.0f32)
        } else {
            row.iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                    (lo.min(x), hi.max(x))
                })
        };
        ranges.push(min);
        ranges.push(max);
        if max > min {
            let lo = f64::from(min);
            let span = f64::from(max) - lo;
            out.extend(row.iter().map(|&w| {
                let q = ((f64::from(w) - lo) / span * 255.0).round();
                q.clamp(0.0, 255.0) as u8
            }));
        } else {
            out.extend(std::iter::repeat_n(0u8, row.len()));
        }
    }
    out
}

/// Inverse of [`quantize_rows`]; `ranges` holds exactly `rows` validated pairs.
fn dequantize_rows(q: &[u8], rows: usize, ranges: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(q.len());
    if rows == 0 {
        return out;
    }
    let row_len = q.len() / rows;
    for r in 0..rows {
        let row = &q[r * row_len..(r + 1) * row_len];
        let (min, max) = (ranges[2 * r], ranges[2 * r + 1]);
        if max > min {
            let lo = f64::from(min);
            let span = f64::from(max) - lo;
            out.extend(
                row.iter()
                    .map(|&q| (f64::from(q) / 255.0 * span + lo) as f32),
            );
        } else {
            out.extend(std::iter::repeat_n(min, row.len()));
        }
    }
    out
}

/// A tensor as read from the file, before conversion.
struct RawTensor<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

fn make_tensor(values: Vec<f32>, shape: &[usize]) -> Result<Tensor, CodecError> {
    Ok(Tensor::from_vec(
        values,
        Shape::from(shape.to_vec()),
        &Device::Cpu,
    )?)
}

/// Converts a float tensor of any supported dtype to f32 values.
fn float_values(raw: &RawTensor<'_>) -> Option<Vec<f32>> {
    let d = raw.data;
    Some(match raw.dtype {
        Dtype::F32 => d
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => d
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => d
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => d
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                f64::from_le_bytes(b) as f32
            })
            .collect(),
        _ => return None,
    })
}

/// Decodes safetensors bytes written by [`encode`] or by PyTorch
/// (`safetensors.torch.save_file`; F32/F16/BF16/F64 accepted and converted to f32) into f32
/// CPU tensors under their PyTorch keys; returns the detected format (a file without our
/// metadata is read by dtype: all F16 -> F16, anything else -> F32).
pub fn decode(bytes: &[u8]) -> Result<(WeightFormat, BTreeMap<String, Tensor>), CodecError> {
    let st = |e: safetensors::SafeTensorError| CodecError::NotSafetensors(e.to_string());
    let (header_len, meta) = SafeTensors::read_metadata(bytes).map_err(st)?;
    let data = 8usize
        .checked_add(header_len)
        .and_then(|start| bytes.get(start..))
        .ok_or_else(|| CodecError::NotSafetensors("header length exceeds the file".into()))?;

    let mut raws: BTreeMap<String, RawTensor<'_>> = BTreeMap::new();
    for (name, info) in meta.tensors() {
        if is_ignored(&name) {
            continue;
        }
        let (s, e) = info.data_offsets;
        let slice = data.get(s..e).ok_or_else(|| {
            CodecError::NotSafetensors(format!("offsets of tensor `{name}` exceed the file"))
        })?;
        // candle multiplies all dimensions together (also when one of them is 0).
        if info
            .shape
            .iter()
            .filter(|&&d| d != 0)
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .is_none()
        {
            return Err(CodecError::BadShape {
                name,
                shape: info.shape.clone(),
                reason: "the product of its dimensions overflows",
            });
        }
        raws.insert(
            name,
            RawTensor {
                dtype: info.dtype,
                shape: info.shape.clone(),
                data: slice,
            },
        );
    }

    let user_meta = meta.metadata().as_ref();
    let format = match user_meta.and_then(|m| m.get("format")).map(String::as_str) {
        Some("f32") => Some(WeightFormat::F32),
        Some("f16") => Some(WeightFormat::F16),
        Some("uint8") => match user_meta.and_then(|m| m.get("scheme")).map(String::as_str) {
            Some("per_tensor") => Some(WeightFormat::Uint8),
            Some("per_channel") => Some(WeightFormat::Uint8PerChannel),
            Some(other) => {
                return Err(CodecError::BadMetadata(format!(
                    "unknown uint8 scheme `{other}` (expected per_tensor or per_channel)"
                )))
            }
            None => {
                return Err(CodecError::BadMetadata(
                    "format uint8 without a `scheme` entry".into(),
                ))
            }
        },
        Some("int8") => match user_meta.and_then(|m| m.get("scheme")).map(String::as_str) {
            Some("symmetric_per_channel") => Some(WeightFormat::Int8),
            other => {
                return Err(CodecError::BadMetadata(format!(
                    "int8 scheme {other:?} (expected symmetric_per_channel)"
                )))
            }
        },
        // No metadata, or someone else's (e.g. {"format": "pt"}): read by dtype.
        _ => None,
    };

    match format {
        None => decode_foreign(raws),
        Some(f @ (WeightFormat::F32 | WeightFormat::F16)) => {
            let want = if f == WeightFormat::F32 {
                Dtype::F32
            } else {
                Dtype::F16
            };
            let mut out = BTreeMap::new();
            for (name, raw) in raws {
                if raw.dtype != want {
                    return Err(CodecError::WrongDtype {
                        name,
                        found: raw.dtype.to_string(),
                        format: f,
                        expected: if want == Dtype::F32 { "F32" } else { "F16" },
                    });
                }
                let values = float_values(&raw).unwrap_or_default();
                out.insert(name, make_tensor(values, &raw.shape)?);
            }
            Ok((f, out))
        }
        Some(WeightFormat::Int8) => Ok((WeightFormat::Int8, decode_int8(raws)?)),
        Some(f) => Ok((f, decode_uint8(raws, f)?)),
    }
}

fn decode_foreign(
    raws: BTreeMap<String, RawTensor<'_>>,
) -> Result<(WeightFormat, BTreeMap<String, Tensor>), CodecError> {
    let all_f16 = !raws.is_empty() && raws.values().all(|r| r.dtype == Dtype::F16);
    let mut out = BTreeMap::new();
    for (name, raw) in raws {
        let Some(values) = float_values(&raw) else {
            return Err(CodecError::UnsupportedDtype {
                name,
                dtype: raw.dtype.to_string(),
            });
        };
        out.insert(name, make_tensor(values, &raw.shape)?);
    }
    let format = if all_f16 {
        WeightFormat::F16
    } else {
        WeightFormat::F32
    };
    Ok((format, out))
}

fn decode_uint8(
    mut raws: BTreeMap<String, RawTensor<'_>>,
    format: WeightFormat,
) -> Result<BTreeMap<String, Tensor>, CodecError> {
    debug_assert!(format.is_uint8());
    let per_channel = format == WeightFormat::Uint8PerChannel;
    let ranges_raw = raws
        .remove(RANGES_KEY)
        .ok_or(CodecError::MissingRanges(format))?;
    if ranges_raw.dtype != Dtype::F32 {
        return Err(CodecError::WrongDtype {
            name: RANGES_KEY.to_string(),
            found: ranges_raw.dtype.to_string(),
            format,
            expected: "F32",
        });
    }
    let range_rows = match ranges_raw.shape.as_slice() {
        [r, 2] => *r,
        other => return Err(CodecError::RangesShape(other.to_vec())),
    };

    // Dtypes, shapes and the number of range rows each stored tensor needs.
    let mut needed = 0usize;
    let mut rows_of = Vec::with_capacity(raws.len());
    for (name, raw) in &raws {
        if raw.dtype != Dtype::U8 {
            return Err(CodecError::WrongDtype {
                name: name.clone(),
                found: raw.dtype.to_string(),
                format,
                expected: "U8",
            });
        }
        let rows = if name.ends_with(BN_SUFFIX) {
            if raw.shape.len() != 2 || raw.shape[0] != 4 {
                return Err(CodecError::BadShape {
                    name: name.clone(),
                    shape: raw.shape.clone(),
                    reason: "a `.bn_stats` tensor must have shape [4, C]",
                });
            }
            4
        } else if per_channel && raw.shape.len() >= 2 {
            raw.shape[0]
        } else {
            1
        };
        needed = needed.saturating_add(rows);
        rows_of.push(rows);
    }
    if needed != range_rows {
        return Err(CodecError::RangesRows {
            found: range_rows,
            needed,
        });
    }

    let ranges = float_values(&ranges_raw).unwrap_or_default();
    if ranges.len() != 2 * range_rows {
        return Err(CodecError::RangesShape(ranges_raw.shape.clone()));
    }
    for (row, pair) in ranges.chunks_exact(2).enumerate() {
        let (min, max) = (pair[0], pair[1]);
        if !(min.is_finite() && max.is_finite() && min <= max) {
            return Err(CodecError::BadRange { row, min, max });
        }
    }

    let mut out = BTreeMap::new();
    let insert = |out: &mut BTreeMap<String, Tensor>, name: String, t: Tensor| match out.entry(name)
    {
        std::collections::btree_map::Entry::Occupied(e) => {
            Err(CodecError::DuplicateKey(e.key().clone()))
        }
        std::collections::btree_map::Entry::Vacant(e) => {
            e.insert(t);
            Ok(())
        }
    };
    let mut next_row = 0usize;
    for ((name, raw), rows) in raws.into_iter().zip(rows_of) {
        let row_ranges = &ranges[2 * next_row..2 * (next_row + rows)];
        next_row += rows;
        let values = dequantize_rows(raw.data, rows, row_ranges);
        if let Some(prefix) = name.strip_suffix(BN_SUFFIX) {
            let c = raw.shape[1];
            for (i, member) in BN_MEMBERS.iter().enumerate() {
                let member_values = values[i * c..(i + 1) * c].to_vec();
                let t = make_tensor(member_values, &[c])?;
                insert(&mut out, format!("{prefix}.{member}"), t)?;
            }
        } else {
            let t = make_tensor(values, &raw.shape)?;
            insert(&mut out, name, t)?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn t(values: Vec<f32>, shape: &[usize]) -> Tensor {
        Tensor::from_vec(values, Shape::from(shape.to_vec()), &Device::Cpu).unwrap()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn random_tensor(rng: &mut StdRng, shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        t(v, shape)
    }

    /// Asserts the uint8 error bound row by row.
    fn check_uint8_bound(orig: &[f32], got: &[f32], rows: usize) {
        assert_eq!(orig.len(), got.len());
        if rows == 0 {
            return;
        }
        let row_len = orig.len() / rows;
        for r in 0..rows {
            let row = &orig[r * row_len..(r + 1) * row_len];
            let dec = &got[r * row_len..(r + 1) * row_len];
            let min = row.iter().copied().fold(f32::INFINITY, f32::min);
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if row.is_empty() {
                continue;
            }
            let span = f64::from(max) - f64::from(min);
            let mag = f64::from(min.abs().max(max.abs()));
            let tol = span / 510.0 + 4.0 * f64::from(f32::EPSILON) * mag;
            for (w, w2) in row.iter().zip(dec) {
                let err = (f64::from(*w) - f64::from(*w2)).abs();
                assert!(
                    err <= tol,
                    "w={w} decoded={w2} err={err} tol={tol} min={min} max={max}"
                );
            }
            if max == min {
                assert!(dec.iter().all(|&x| x == min), "constant row not exact");
            }
        }
    }

    fn tensor_strategy() -> impl Strategy<Value = (Vec<usize>, Vec<f32>)> {
        (
            prop::collection::vec(0usize..=5, 0..=4),
            -3i32..=3,
            -10.0f32..10.0,
            any::<bool>(),
        )
            .prop_flat_map(|(shape, exp, offset, constant)| {
                let n: usize = shape.iter().product();
                let scale = 10f32.powi(exp);
                (
                    Just(shape),
                    prop::collection::vec(-1.0f32..1.0, n).prop_map(move |v| {
                        let first = v.first().copied().unwrap_or(0.0);
                        v.iter()
                            .map(|&x| if constant { first } else { x } * scale + offset)
                            .collect::<Vec<f32>>()
                    }),
                )
            })
    }

    fn roundtrip_case(shape: &[usize], vals: &[f32], format: WeightFormat) {
        let mut m = BTreeMap::new();
        m.insert("layer.weight".to_string(), t(vals.to_vec(), shape));
        m.insert("other".to_string(), t(vec![1.5, -2.0, 0.25], &[3]));
        let bytes = encode(&m, format).unwrap();
        let (f, out) = decode(&bytes).unwrap();
        assert_eq!(f, format);
        assert_eq!(out.len(), 2);
        let got = &out["layer.weight"];
        assert_eq!(got.dims(), shape);
        assert_eq!(got.dtype(), DType::F32);
        let rows = if format == WeightFormat::Uint8PerChannel && shape.len() >= 2 {
            shape[0]
        } else {
            1
        };
        check_uint8_bound(vals, &values(got), rows);
        check_uint8_bound(&[1.5, -2.0, 0.25], &values(&out["other"]), 1);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn uint8_per_tensor_roundtrip((shape, vals) in tensor_strategy()) {
            roundtrip_case(&shape, &vals, WeightFormat::Uint8);
        }

        #[test]
        fn uint8_per_channel_roundtrip((shape, vals) in tensor_strategy()) {
            roundtrip_case(&shape, &vals, WeightFormat::Uint8PerChannel);
        }
    }

    #[test]
    fn edge_shapes_roundtrip() {
        for format in [WeightFormat::Uint8, WeightFormat::Uint8PerChannel] {
            for (shape, vals) in [
                (vec![], vec![3.25f32]),
                (vec![1], vec![-0.5]),
                (vec![0], vec![]),
                (vec![3, 0], vec![]),
                (vec![0, 4], vec![]),
                (vec![1, 1, 1, 1], vec![7.0]),
                (vec![2, 2], vec![f32::MAX, -f32::MAX, 1.0, 1.0]),
            ] {
                roundtrip_case(&shape, &vals, format);
            }
        }
    }

    #[test]
    fn constant_tensors_are_exact() {
        for format in WeightFormat::ALL {
            for c in [0.3f32, -7.0, 0.0, 1e-30, 123456.78] {
                let mut m = BTreeMap::new();
                m.insert("a".to_string(), t(vec![c; 12], &[3, 4]));
                m.insert("b".to_string(), t(vec![c; 5], &[5]));
                let m = encodable(m, format);
                let (_, out) = decode(&encode(&m, format).unwrap()).unwrap();
                for k in ["a", "b"] {
                    let v = values(&out[k]);
                    if format == WeightFormat::Int8 && k == "a" {
                        // 127 steps of c / 127: c to within float rounding.
                        let tol = c.abs() * 2.0 * f32::EPSILON;
                        assert!(v.iter().all(|&x| (x - c).abs() <= tol), "{k} {c}: {v:?}");
                    } else if format == WeightFormat::F16 {
                        let want = half::f16::from_f32(c).to_f32();
                        assert!(v.iter().all(|&x| x == want));
                    } else {
                        assert!(v.iter().all(|&x| x == c), "{format} {k} {c}: {v:?}");
                    }
                }
            }
        }
    }

    fn bn_model(rng: &mut StdRng) -> BTreeMap<String, Tensor> {
        let mut m = BTreeMap::new();
        m.insert("conv.weight".into(), random_tensor(rng, &[4, 2, 3, 3]));
        m.insert("conv.bias".into(), random_tensor(rng, &[4]));
        m.insert("bn.weight".into(), random_tensor(rng, &[4]));
        m.insert("bn.bias".into(), random_tensor(rng, &[4]));
        m.insert("bn.running_mean".into(), random_tensor(rng, &[4]));
        let var: Vec<f32> = (0..4).map(|i| 1.0 + i as f32 * 10.0).collect();
        m.insert("bn.running_var".into(), t(var, &[4]));
        m.insert(
            "bn.num_batches_tracked".into(),
            Tensor::new(17i64, &Device::Cpu).unwrap(),
        );
        m
    }

    #[test]
    fn batchnorm_packing() {
        let mut rng = StdRng::seed_from_u64(7);
        let m = bn_model(&mut rng);
        for format in [WeightFormat::Uint8, WeightFormat::Uint8PerChannel] {
            let bytes = encode(&m, format).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let mut names = st.names();
            names.sort();
            assert_eq!(
                names,
                ["__ranges__", "bn.bn_stats", "conv.bias", "conv.weight"]
            );
            let bn = st.tensor("bn.bn_stats").unwrap();
            assert_eq!(bn.dtype(), Dtype::U8);
            assert_eq!(bn.shape(), [4, 4]);
            let ranges = st.tensor("__ranges__").unwrap();
            assert_eq!(ranges.dtype(), Dtype::F32);
            // bn_stats: 4 rows, conv.bias: 1, conv.weight: 1 or 4 (per channel).
            let want_rows = if format == WeightFormat::Uint8 { 6 } else { 9 };
            assert_eq!(ranges.shape(), [want_rows, 2]);
            // First rows belong to bn.bn_stats (lexicographic order): running_var row is [1, 31].
            let r: Vec<f32> = ranges
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            assert_eq!(&r[6..8], &[1.0, 31.0]);

            let (f, out) = decode(&bytes).unwrap();
            assert_eq!(f, format);
            let keys: Vec<&str> = out.keys().map(String::as_str).collect();
            assert_eq!(
                keys,
                [
                    "bn.bias",
                    "bn.running_mean",
                    "bn.running_var",
                    "bn.weight",
                    "conv.bias",
                    "conv.weight"
                ]
            );
            for k in &keys {
                let rows = if format == WeightFormat::Uint8PerChannel && k == &"conv.weight" {
                    4
                } else {
                    1
                };
                check_uint8_bound(&values(&m[*k]), &values(&out[*k]), rows);
            }
        }
    }

    #[test]
    fn incomplete_batchnorm_is_stored_individually() {
        let mut m = BTreeMap::new();
        m.insert("bn.running_mean".to_string(), t(vec![0.0, 1.0], &[2]));
        m.insert("bn.running_var".to_string(), t(vec![1.0, 2.0], &[2]));
        let bytes = encode(&m, WeightFormat::Uint8).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.len(), 3);
        let (_, out) = decode(&bytes).unwrap();
        assert_eq!(values(&out["bn.running_var"]), [1.0, 2.0]);
    }

    #[test]
    fn f32_is_bit_exact_and_f16_within_precision() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut m = bn_model(&mut rng);
        m.insert(
            "special".into(),
            t(vec![f32::NAN, f32::INFINITY, -0.0, 1e-40, 70000.0], &[5]),
        );
        m.insert("scalar".into(), t(vec![2.5], &[]));
        let (f, out) = decode(&encode(&m, WeightFormat::F32).unwrap()).unwrap();
        assert_eq!(f, WeightFormat::F32);
        assert!(!out.contains_key("bn.num_batches_tracked"));
        assert_eq!(out.len(), m.len() - 1);
        for (k, v) in &out {
            assert_eq!(v.dims(), m[k].dims());
            let a: Vec<u32> = values(v).iter().map(|x| x.to_bits()).collect();
            let b: Vec<u32> = values(&m[k]).iter().map(|x| x.to_bits()).collect();
            assert_eq!(a, b, "{k}");
        }

        m.remove("special");
        let (f, out) = decode(&encode(&m, WeightFormat::F16).unwrap()).unwrap();
        assert_eq!(f, WeightFormat::F16);
        assert_eq!(out.len(), m.len() - 1);
        for (k, v) in &out {
            assert_eq!(v.dims(), m[k].dims());
            for (a, b) in values(&m[k]).iter().zip(values(v)) {
                let tol = a.abs() * 2f32.powi(-11) + 2f32.powi(-24);
                assert!((a - b).abs() <= tol, "{k}: {a} vs {b}");
            }
        }
    }

    fn serialize(blobs: Vec<(String, Blob)>, meta: Option<&[(&str, &str)]>) -> Vec<u8> {
        let meta = meta.map(|m| {
            m.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        });
        safetensors::serialize(blobs, meta).unwrap()
    }

    fn blob(dtype: Dtype, shape: &[usize], data: Vec<u8>) -> Blob {
        Blob {
            dtype,
            shape: shape.to_vec(),
            data,
        }
    }

    #[test]
    fn foreign_files_are_read_by_dtype() {
        let vals = [1.0f32, -2.5, 0.125];
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let bf16: Vec<u8> = vals
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let f64b: Vec<u8> = vals
            .iter()
            .flat_map(|&x| f64::from(x).to_le_bytes())
            .collect();
        let nbt = blob(Dtype::I64, &[], 5i64.to_le_bytes().to_vec());

        let bytes = serialize(
            vec![
                ("a".into(), blob(Dtype::F16, &[3], f16.clone())),
                ("bn.num_batches_tracked".into(), nbt),
            ],
            None,
        );
        let (f, out) = decode(&bytes).unwrap();
        assert_eq!(f, WeightFormat::F16);
        assert_eq!(out.len(), 1);
        assert_eq!(values(&out["a"]), vals);

        let bytes = serialize(
            vec![
                ("a".into(), blob(Dtype::BF16, &[3], bf16)),
                ("b".into(), blob(Dtype::F64, &[1, 3], f64b)),
                ("c".into(), blob(Dtype::F32, &[3], f32_bytes(&vals))),
                ("d".into(), blob(Dtype::F16, &[3], f16)),
            ],
            Some(&[("format", "pt")]),
        );
        let (f, out) = decode(&bytes).unwrap();
        assert_eq!(f, WeightFormat::F32);
        for k in ["a", "b", "c", "d"] {
            assert_eq!(values(&out[k]), vals, "{k}");
        }
        assert_eq!(out["b"].dims(), [1, 3]);

        let bytes = serialize(vec![("a".into(), blob(Dtype::U8, &[2], vec![1, 2]))], None);
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::UnsupportedDtype { .. }), "{err}");
    }

    /// Re-serialises a file after letting `edit` change its tensors.
    fn edit_file(bytes: &[u8], edit: impl FnOnce(&mut Vec<(String, Blob)>)) -> Vec<u8> {
        let (_, meta) = SafeTensors::read_metadata(bytes).unwrap();
        let user_meta = meta.metadata().clone();
        let st = SafeTensors::deserialize(bytes).unwrap();
        let mut blobs: Vec<(String, Blob)> = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, blob(v.dtype(), v.shape(), v.data().to_vec())))
            .collect();
        edit(&mut blobs);
        safetensors::serialize(blobs, user_meta).unwrap()
    }

    fn small_model() -> BTreeMap<String, Tensor> {
        let mut rng = StdRng::seed_from_u64(11);
        bn_model(&mut rng)
    }

    #[test]
    fn decode_errors() {
        let m = small_model();

        // Wrong dtype for the format.
        let bytes = serialize(
            vec![("x".into(), blob(Dtype::U8, &[2], vec![1, 2]))],
            Some(&[("format", "f32")]),
        );
        let err = decode(&bytes).unwrap_err().to_string();
        assert_eq!(err, "tensor `x` has dtype U8 but format f32 expects F32");
        let f32_file = encode(&m, WeightFormat::F32).unwrap();
        let err = decode(&edit_file(&f32_file, |b| {
            b.push(("y".into(), blob(Dtype::F16, &[1], vec![0, 0])))
        }))
        .unwrap_err();
        assert!(matches!(err, CodecError::WrongDtype { .. }), "{err}");
        let f16_file = encode(&m, WeightFormat::F16).unwrap();
        let err = decode(&edit_file(&f16_file, |b| {
            b.push(("y".into(), blob(Dtype::F32, &[1], vec![0; 4])))
        }))
        .unwrap_err()
        .to_string();
        assert_eq!(err, "tensor `y` has dtype F32 but format f16 expects F16");

        let u8_file = encode(&m, WeightFormat::Uint8).unwrap();
        decode(&u8_file).unwrap();
        // A float tensor inside a uint8 file.
        let err = decode(&edit_file(&u8_file, |b| {
            b.push(("y".into(), blob(Dtype::F32, &[1], vec![0; 4])))
        }))
        .unwrap_err()
        .to_string();
        assert_eq!(err, "tensor `y` has dtype F32 but format uint8 expects U8");
        // An extra U8 tensor: one range row short.
        let err = decode(&edit_file(&u8_file, |b| {
            b.push(("y".into(), blob(Dtype::U8, &[1], vec![0])))
        }))
        .unwrap_err()
        .to_string();
        assert_eq!(err, "`__ranges__` has 6 rows but the tensors need 7");
        // Ranges with a dropped row.
        let err = decode(&edit_file(&u8_file, |b| {
            let r = &mut b.iter_mut().find(|(n, _)| n == RANGES_KEY).unwrap().1;
            r.shape = vec![5, 2];
            r.data.truncate(40);
        }))
        .unwrap_err()
        .to_string();
        assert_eq!(err, "`__ranges__` has 5 rows but the tensors need 6");
        // Ranges of the wrong shape / dtype / missing.
        let err = decode(&edit_file(&u8_file, |b| {
            let r = &mut b.iter_mut().find(|(n, _)| n == RANGES_KEY).unwrap().1;
            r.shape = vec![12];
        }))
        .unwrap_err();
        assert!(matches!(err, CodecError::RangesShape(_)), "{err}");
        let err = decode(&edit_file(&u8_file, |b| {
            b.retain(|(n, _)| n != RANGES_KEY);
        }))
        .unwrap_err();
        assert!(matches!(err, CodecError::MissingRanges(_)), "{err}");
        // min > max, NaN.
        for bad in [[2.0f32, 1.0], [f32::NAN, 1.0], [0.0, f32::INFINITY]] {
            let err = decode(&edit_file(&u8_file, |b| {
                let r = &mut b.iter_mut().find(|(n, _)| n == RANGES_KEY).unwrap().1;
                r.data[8..16].copy_from_slice(&f32_bytes(&bad));
            }))
            .unwrap_err();
            assert!(matches!(err, CodecError::BadRange { row: 1, .. }), "{err}");
        }
        // A bn_stats tensor with the wrong shape.
        let err = decode(&edit_file(&u8_file, |b| {
            let r = &mut b.iter_mut().find(|(n, _)| n == "bn.bn_stats").unwrap().1;
            r.shape = vec![2, 8];
        }))
        .unwrap_err();
        assert!(matches!(err, CodecError::BadShape { .. }), "{err}");
        // A member stored both packed and alone.
        let err = decode(&edit_file(&u8_file, |b| {
            b.push(("bn.weight".into(), blob(Dtype::U8, &[4], vec![0; 4])));
            let r = &mut b.iter_mut().find(|(n, _)| n == RANGES_KEY).unwrap().1;
            r.shape = vec![7, 2];
            r.data.extend(f32_bytes(&[0.0, 1.0]));
        }))
        .unwrap_err();
        assert!(matches!(err, CodecError::DuplicateKey(_)), "{err}");
        // Unknown scheme.
        let bytes = serialize(vec![], Some(&[("format", "uint8"), ("scheme", "per_row")]));
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::BadMetadata(_)), "{err}");
        // Garbage.
        let err = decode(b"definitely not safetensors")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("not a safetensors file: "), "{err}");
        // A zero-sized tensor whose dimensions overflow when multiplied.
        let bytes = serialize(
            vec![("z".into(), blob(Dtype::F32, &[0, 1 << 40, 1 << 40], vec![]))],
            None,
        );
        let err = decode(&bytes).unwrap_err();
        assert!(matches!(err, CodecError::BadShape { .. }), "{err}");
    }

    /// `m` with activation ranges added when `format` is int8 (which requires them).
    fn encodable(
        mut m: BTreeMap<String, Tensor>,
        format: WeightFormat,
    ) -> BTreeMap<String, Tensor> {
        if format == WeightFormat::Int8 {
            m.insert(
                ACTIVATION_RANGES_KEY.to_string(),
                t(vec![-1.0, 2.0, 0.0, 6.0], &[2, 2]),
            );
        }
        m
    }

    /// int8: rank >= 2 tensors stored as I8 with `KEY_scale` (what other tools read), within
    /// half a step of the original per output channel; the rest F32 and exact; the activation
    /// ranges returned as stored.
    #[test]
    fn int8_weights_round_trip_within_half_a_step() {
        let mut rng = StdRng::seed_from_u64(8);
        let mut m = BTreeMap::new();
        m.insert(
            "conv.weight".to_string(),
            random_tensor(&mut rng, &[5, 3, 3, 3]),
        );
        m.insert("fc.weight".to_string(), random_tensor(&mut rng, &[4, 7]));
        m.insert("conv.bias".to_string(), random_tensor(&mut rng, &[5]));
        // An all-zero output channel.
        let mut zero_row = values(&m["fc.weight"]);
        zero_row[7..14].fill(0.0);
        m.insert("fc.weight".to_string(), t(zero_row, &[4, 7]));
        let m = encodable(m, WeightFormat::Int8);
        let bytes = encode(&m, WeightFormat::Int8).unwrap();

        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("conv.weight").unwrap().dtype(), Dtype::I8);
        assert_eq!(st.tensor("conv.weight_scale").unwrap().shape(), &[5]);
        assert_eq!(st.tensor("conv.bias").unwrap().dtype(), Dtype::F32);
        assert!(st.tensor("conv.bias_scale").is_err());

        let (format, out) = decode(&bytes).unwrap();
        assert_eq!(format, WeightFormat::Int8);
        assert_eq!(values(&out["conv.bias"]), values(&m["conv.bias"]));
        assert_eq!(
            values(&out[ACTIVATION_RANGES_KEY]),
            vec![-1.0, 2.0, 0.0, 6.0]
        );
        for key in ["conv.weight", "fc.weight"] {
            let (orig, got) = (values(&m[key]), values(&out[key]));
            let rows = m[key].dims()[0];
            let per = orig.len() / rows;
            for r in 0..rows {
                let row = &orig[r * per..(r + 1) * per];
                let step = row.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                for (a, b) in row.iter().zip(&got[r * per..(r + 1) * per]) {
                    assert!(
                        (a - b).abs() <= step / 2.0 * 1.001 + 1e-9,
                        "{key} row {r}: {a} vs {b}"
                    );
                }
            }
        }
        // Every value -127..=127: never -128.
        let q = st.tensor("conv.weight").unwrap();
        assert!(q.data().iter().all(|&b| b as i8 != -128));
    }

    #[test]
    fn int8_files_without_what_they_need_are_refused() {
        let mut m = BTreeMap::new();
        m.insert("w".to_string(), t(vec![0.5, -0.25, 1.0, 0.0], &[2, 2]));
        let err = encode(&m, WeightFormat::Int8).unwrap_err();
        assert!(matches!(err, CodecError::MissingActivationRanges), "{err}");
        let mut bad = encodable(m.clone(), WeightFormat::Int8);
        bad.insert(
            ACTIVATION_RANGES_KEY.to_string(),
            t(vec![3.0, 1.0], &[1, 2]),
        );
        let err = encode(&bad, WeightFormat::Int8).unwrap_err().to_string();
        assert!(err.contains("row 0 is [3, 1]"), "{err}");
        let mut bad = encodable(m.clone(), WeightFormat::Int8);
        bad.insert("w_scale".to_string(), t(vec![1.0], &[1]));
        assert!(matches!(
            encode(&bad, WeightFormat::Int8).unwrap_err(),
            CodecError::ReservedName { .. }
        ));
        // Other formats do not take activation ranges.
        let err = encode(&encodable(m.clone(), WeightFormat::Int8), WeightFormat::F32).unwrap_err();
        assert!(matches!(err, CodecError::ReservedName { .. }), "{err}");

        // Decoding: a scale missing, misshapen, zero; ranges missing.
        let good = encode(&encodable(m, WeightFormat::Int8), WeightFormat::Int8).unwrap();
        let st = SafeTensors::deserialize(&good).unwrap();
        let keep = |skip: &str, replace: Option<(&str, Blob)>| {
            let mut blobs: Vec<(String, Blob)> = st
                .tensors()
                .into_iter()
                .filter(|(k, _)| k != skip)
                .map(|(k, v)| {
                    (
                        k,
                        Blob {
                            dtype: v.dtype(),
                            shape: v.shape().to_vec(),
                            data: v.data().to_vec(),
                        },
                    )
                })
                .collect();
            if let Some((k, b)) = replace {
                blobs.push((k.to_string(), b));
            }
            serialize(
                blobs,
                Some(&[("format", "int8"), ("scheme", "symmetric_per_channel")]),
            )
        };
        let err = decode(&keep("w_scale", None)).unwrap_err().to_string();
        assert!(err.contains("`w_scale` are missing"), "{err}");
        let err = decode(&keep(
            "w_scale",
            Some((
                "w_scale",
                blob(Dtype::F32, &[3], f32_bytes(&[1.0, 1.0, 1.0])),
            )),
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("must be F32 of shape [2]"), "{err}");
        let err = decode(&keep(
            "w_scale",
            Some(("w_scale", blob(Dtype::F32, &[2], f32_bytes(&[1.0, 0.0])))),
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("not finite and positive"), "{err}");
        let err = decode(&keep(ACTIVATION_RANGES_KEY, None)).unwrap_err();
        assert!(matches!(err, CodecError::MissingActivationRanges), "{err}");
    }

    #[test]
    fn encode_errors() {
        let mut m = BTreeMap::new();
        m.insert(
            "x".to_string(),
            Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap(),
        );
        for format in WeightFormat::ALL {
            let err = encode(&m, format).unwrap_err();
            assert!(matches!(err, CodecError::InputDtype { .. }), "{err}");
        }
        let mut m = BTreeMap::new();
        m.insert("x".to_string(), t(vec![1.0, f32::NAN], &[2]));
        for format in [
            WeightFormat::Uint8,
            WeightFormat::Uint8PerChannel,
            WeightFormat::Int8,
        ] {
            let err = encode(&m, format).unwrap_err().to_string();
            assert_eq!(err, "non-finite value in tensor `x`");
        }
        for name in ["__ranges__", "a.bn_stats", "__metadata__"] {
            let mut m = BTreeMap::new();
            m.insert(name.to_string(), t(vec![1.0], &[1]));
            let err = encode(&m, WeightFormat::Uint8).unwrap_err();
            assert!(matches!(err, CodecError::ReservedName { .. }), "{err}");
        }
    }

    #[test]
    fn fuzz_never_panics() {
        let mut rng = StdRng::seed_from_u64(1234);
        for _ in 0..300 {
            let len = rng.random_range(0..200usize);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            if len >= 8 && rng.random_bool(0.5) {
                // A plausible header length.
                let n = rng.random_range(0..len as u64);
                bytes[..8].copy_from_slice(&n.to_le_bytes());
            }
            assert!(decode(&bytes).is_err());
        }
        for format in WeightFormat::ALL {
            let m = encodable(small_model(), format);
            let good = encode(&m, format).unwrap();
            for cut in 0..good.len() {
                assert!(decode(&good[..cut]).is_err(), "{format} cut at {cut}");
            }
            // Random corruption of the header region: any result, but no panic.
            let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
            for _ in 0..300 {
                let mut bad = good.clone();
                for _ in 0..rng.random_range(1..4) {
                    let i = rng.random_range(0..header_end);
                    bad[i] = if rng.random_bool(0.5) {
                        rng.random()
                    } else {
                        b"0123456789[],:\"{}"[rng.random_range(0..17)]
                    };
                }
                let _ = decode(&bad);
            }
        }
    }

    /// The 72-tensor `student-deeper` layout.
    fn student_deeper(rng: &mut StdRng) -> BTreeMap<String, Tensor> {
        let ch = [16usize, 32, 64, 128, 128, 128, 256, 256, 256];
        let mut m = BTreeMap::new();
        let bn = |m: &mut BTreeMap<String, Tensor>, rng: &mut StdRng, p: &str, c: usize| {
            for member in BN_MEMBERS {
                m.insert(format!("{p}.{member}"), random_tensor(rng, &[c]));
            }
        };
        m.insert("cnn.0.0.weight".into(), random_tensor(rng, &[16, 3, 3, 3]));
        m.insert("cnn.0.0.bias".into(), random_tensor(rng, &[16]));
        bn(&mut m, rng, "cnn.0.1", 16);
        for i in 1..=8 {
            let (c, o) = (ch[i - 1], ch[i]);
            m.insert(
                format!("cnn.{i}.0.weight"),
                random_tensor(rng, &[c, 1, 3, 3]),
            );
            m.insert(format!("cnn.{i}.0.bias"), random_tensor(rng, &[c]));
            bn(&mut m, rng, &format!("cnn.{i}.1"), c);
            m.insert(
                format!("cnn.{i}.3.weight"),
                random_tensor(rng, &[o, c, 1, 1]),
            );
            m.insert(format!("cnn.{i}.3.bias"), random_tensor(rng, &[o]));
        }
        m.insert("fc.0.weight".into(), random_tensor(rng, &[11, 256]));
        m.insert("fc.0.bias".into(), random_tensor(rng, &[11]));
        m
    }

    #[test]
    fn student_deeper_sizes() {
        let mut rng = StdRng::seed_from_u64(42);
        let m = student_deeper(&mut rng);
        assert_eq!(m.len(), 72);
        let params: usize = m
            .iter()
            .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
            .map(|(_, t)| t.elem_count())
            .sum();
        assert_eq!(params, 224_011);

        let u8_size = encode(&m, WeightFormat::Uint8).unwrap().len();
        assert!(u8_size <= 232_000, "uint8 file is {u8_size} bytes");
        let f32_size = encode(&m, WeightFormat::F32).unwrap().len();
        let f16_size = encode(&m, WeightFormat::F16).unwrap().len();
        assert!((f16_size as f64) < f32_size as f64 / 1.9);

        let bytes = encode(&m, WeightFormat::Uint8PerChannel).unwrap();
        let (f, out) = decode(&bytes).unwrap();
        assert_eq!(f, WeightFormat::Uint8PerChannel);
        assert_eq!(out.len(), 72);
    }

    #[test]
    fn format_names() {
        for f in WeightFormat::ALL {
            assert_eq!(WeightFormat::parse(f.as_str()), Some(f));
            assert_eq!(f.to_string(), f.as_str());
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.as_str()));
            assert_eq!(serde_json::from_str::<WeightFormat>(&json).unwrap(), f);
        }
        assert_eq!(
            WeightFormat::parse("UINT8-per-channel"),
            Some(WeightFormat::Uint8PerChannel)
        );
        assert_eq!(WeightFormat::parse("int4"), None);
    }
}
