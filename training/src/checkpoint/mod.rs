//! PyTorch checkpoints, read without Python and without running any of their code.
//!
//! Three file kinds, told apart by their first bytes:
//!
//! * **zip** (`torch.save` since PyTorch 1.6): `ARCHIVE/data.pkl` holds the pickled object,
//!   `ARCHIVE/data/KEY` the raw bytes of each storage;
//! * **legacy** (pre-1.6, and `_use_new_zipfile_serialization=False`): five pickles in a row —
//!   magic number, protocol version, system info, the object, the sorted storage keys — then
//!   each storage as an 8-byte little-endian element count and its raw bytes;
//! * **safetensors**.
//!
//! Both pickle forms go through [`pickle`], a restricted unpickler: it only builds plain
//! values, `OrderedDict`s, storages and tensors, and refuses every other global by name.
//! Tensors are strided views of storages; storage offsets, strides and dtypes are honoured,
//! and every view is checked against the storage's actual bytes.

mod convert;
pub mod pickle;

use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read};
use std::path::Path;

use candle_core::{Device, Tensor};
use slimserve::formats::weights;

pub use convert::{fold_input_normalization, to_model, IMAGENET_MEAN, IMAGENET_STD};
pub use pickle::{PickleError, StorageDtype, StorageRef, TensorRef, Value};

/// The legacy format's first pickle: `0x1950a86a20f9469cfc6c` as a Python long.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// The legacy format's protocol version.
const LEGACY_PROTOCOL: i64 = 1001;
/// Most elements in one tensor (a 4 GB f32 tensor): bounds what a hostile header can ask for.
const MAX_TENSOR_ELEMENTS: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a PyTorch checkpoint (zip or legacy pickle) or safetensors file")]
    UnknownFormat,
    #[error("{0}")]
    Pickle(#[from] PickleError),
    #[error("zip archive: {0}")]
    Zip(String),
    #[error("legacy checkpoint: {0}")]
    Legacy(String),
    #[error("tensor `{name}`: {message}")]
    Tensor { name: String, message: String },
    #[error("no tensors found{0}")]
    NoTensors(String),
    #[error("safetensors: {0}")]
    Safetensors(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// What a file's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Zip,
    LegacyPickle,
    Safetensors,
}

pub fn sniff(head: &[u8]) -> Option<FileKind> {
    if head.starts_with(b"PK\x03\x04") {
        Some(FileKind::Zip)
    } else if head.first() == Some(&0x80) {
        Some(FileKind::LegacyPickle)
    } else if head.len() >= 9 && head[8] == b'{' {
        Some(FileKind::Safetensors)
    } else {
        None
    }
}

/// Reads every tensor of a checkpoint file as f32 (see [`read_bytes`]).
pub fn read(path: &Path, key: Option<&str>) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let bytes = std::fs::read(path)?;
    read_bytes(&bytes, key)
}

/// Reads every tensor of a checkpoint as f32 under its PyTorch key (`module.` prefixes of
/// DataParallel models stripped, `num_batches_tracked` dropped). `key` names the state dict
/// inside the checkpoint; by default the top level, then `state_dict`, `model_state_dict`
/// and `model` are tried.
pub fn read_bytes(
    bytes: &[u8],
    key: Option<&str>,
) -> Result<BTreeMap<String, Tensor>, CheckpointError> {
    let raw: Vec<(String, Tensor)> = match sniff(bytes).ok_or(CheckpointError::UnknownFormat)? {
        FileKind::Safetensors => weights::decode(bytes)
            .map_err(|e| CheckpointError::Safetensors(e.to_string()))?
            .1
            .into_iter()
            .collect(),
        FileKind::Zip => {
            let (root, storages) = read_zip(bytes)?;
            tensors_of(&root, key, &storages)?
        }
        FileKind::LegacyPickle => {
            let (root, storages) = read_legacy(bytes)?;
            tensors_of(&root, key, &storages)?
        }
    };
    let strip = !raw.is_empty() && raw.iter().all(|(k, _)| k.starts_with("module."));
    Ok(raw
        .into_iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .map(|(k, t)| {
            let k = if strip {
                k["module.".len()..].to_string()
            } else {
                k
            };
            (k, t)
        })
        .collect())
}

/// Storage bytes by key.
type Storages<'a> = HashMap<String, &'a [u8]>;

fn read_zip(bytes: &[u8]) -> Result<(Value, Storages<'_>), CheckpointError> {
    let zerr = |e: zip::result::ZipError| CheckpointError::Zip(e.to_string());
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(zerr)?;
    let names: Vec<String> = archive
        .file_names()
        .map(|n| n.map(|n| n.to_string()))
        .collect::<Result<_, _>>()
        .map_err(zerr)?;
    let pkl = names
        .iter()
        .filter(|n| n.ends_with("data.pkl"))
        .min_by_key(|n| n.len())
        .ok_or_else(|| CheckpointError::Zip("no data.pkl in the archive".into()))?
        .clone();
    let prefix = pkl.trim_end_matches("data.pkl").to_string();
    let mut storages = HashMap::new();
    let mut pickle_bytes = Vec::new();
    for i in 0..archive.len() {
        let entry = archive.by_index(i).map_err(zerr)?;
        let name = entry.name().map_err(zerr)?.to_string();
        let stored = entry.compression() == zip::CompressionMethod::Stored;
        let (start, size) = (entry.data_start(), entry.size());
        if name == pkl {
            let mut e = entry;
            let len = usize::try_from(size)
                .ok()
                .filter(|&n| n <= bytes.len())
                .ok_or_else(|| CheckpointError::Zip("data.pkl is larger than the file".into()))?;
            pickle_bytes.reserve(len);
            e.read_to_end(&mut pickle_bytes)?;
        } else if let Some(key) = name.strip_prefix(&format!("{prefix}data/")) {
            if !stored {
                return Err(CheckpointError::Zip(format!(
                    "storage {name} is compressed; torch.save stores them uncompressed"
                )));
            }
            // Stored entries are read in place: no copy of the weights.
            let data = start
                .and_then(|s| usize::try_from(s).ok())
                .zip(usize::try_from(size).ok())
                .and_then(|(s, n)| bytes.get(s..s.checked_add(n)?))
                .ok_or_else(|| CheckpointError::Zip(format!("{name} lies outside the file")))?;
            storages.insert(key.to_string(), data);
        }
    }
    let (root, _) = pickle::load(&pickle_bytes)?;
    Ok((root, storages))
}

fn read_legacy(bytes: &[u8]) -> Result<(Value, Storages<'_>), CheckpointError> {
    let bad = |m: String| CheckpointError::Legacy(m);
    let mut pos = 0;
    let mut next = |what: &str| -> Result<Value, CheckpointError> {
        let (v, used) =
            pickle::load(&bytes[pos..]).map_err(|e| bad(format!("reading the {what}: {e}")))?;
        pos += used;
        Ok(v)
    };
    match next("magic number")? {
        Value::Bytes(b) if b == LEGACY_MAGIC => {}
        _ => {
            return Err(bad(
                "the first pickle is not PyTorch's magic number (not a torch.save file)".into(),
            ))
        }
    }
    match next("protocol version")? {
        Value::Int(LEGACY_PROTOCOL) => {}
        other => {
            return Err(bad(format!(
                "protocol version {other:?}, expected {LEGACY_PROTOCOL}"
            )))
        }
    }
    if let Value::Dict(info) = next("system info")? {
        let little = info.borrow().iter().find_map(|(k, v)| match (k, v) {
            (Value::Str(k), Value::Bool(b)) if k == "little_endian" => Some(*b),
            _ => None,
        });
        if little == Some(false) {
            return Err(bad("written on a big-endian machine; not supported".into()));
        }
    }
    let root = next("checkpoint object")?;
    let keys = match next("storage key list")? {
        Value::List(l) => l
            .borrow()
            .iter()
            .map(|v| match v {
                Value::Str(s) => Ok(s.clone()),
                Value::Int(i) => Ok(i.to_string()),
                other => Err(bad(format!("storage key {other:?} is not a string"))),
            })
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err(bad("the storage key list is not a list".into())),
    };
    let mut dtypes: HashMap<String, StorageDtype> = HashMap::new();
    collect_storages(&root, &mut |s| {
        dtypes.insert(s.key.clone(), s.dtype);
    });
    let mut storages = HashMap::new();
    for key in keys {
        let elem = dtypes
            .get(&key)
            .ok_or_else(|| bad(format!("storage {key} is listed but no tensor uses it")))?
            .size() as u64;
        let head = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| bad(format!("the file ends before storage {key}")))?;
        let numel = u64::from_le_bytes(head.try_into().expect("8 bytes"));
        pos += 8;
        let len = numel
            .checked_mul(elem)
            .and_then(|n| usize::try_from(n).ok())
            .filter(|&n| n <= bytes.len() - pos)
            .ok_or_else(|| {
                bad(format!(
                    "storage {key} claims {numel} elements, more than the file holds"
                ))
            })?;
        storages.insert(key, &bytes[pos..pos + len]);
        pos += len;
    }
    Ok((root, storages))
}

/// Calls `f` on every storage a value refers to.
fn collect_storages(v: &Value, f: &mut impl FnMut(&StorageRef)) {
    match v {
        Value::Storage(s) => f(s),
        Value::Tensor(t) => f(&t.storage),
        Value::Tuple(items) => items.iter().for_each(|x| collect_storages(x, f)),
        Value::List(items) => items.borrow().iter().for_each(|x| collect_storages(x, f)),
        Value::Dict(d) => d.borrow().iter().for_each(|(_, x)| collect_storages(x, f)),
        _ => {}
    }
}

/// The `(name, tensor)` entries of the state dict: the root dict, or the one under `key`.
fn tensors_of(
    root: &Value,
    key: Option<&str>,
    storages: &Storages<'_>,
) -> Result<Vec<(String, Tensor)>, CheckpointError> {
    let lookup = |d: &Value, k: &str| -> Option<Value> {
        match d {
            Value::Dict(items) => items.borrow().iter().find_map(|(name, v)| match name {
                Value::Str(n) if n == k => Some(v.clone()),
                _ => None,
            }),
            _ => None,
        }
    };
    let candidates: Vec<Option<&str>> = match key {
        Some(k) => vec![Some(k)],
        None => vec![
            None,
            Some("state_dict"),
            Some("model_state_dict"),
            Some("model"),
        ],
    };
    for c in candidates {
        let dict = match c {
            None => Some(root.clone()),
            Some(k) => lookup(root, k),
        };
        let Some(Value::Dict(items)) = dict else {
            continue;
        };
        let entries: Vec<(String, std::rc::Rc<TensorRef>)> = items
            .borrow()
            .iter()
            .filter_map(|(k, v)| match (k, v) {
                (Value::Str(k), Value::Tensor(t)) => Some((k.clone(), t.clone())),
                _ => None,
            })
            .collect();
        if entries.is_empty() {
            continue;
        }
        return entries
            .into_iter()
            .map(|(name, t)| {
                let tensor =
                    materialize(&t, storages).map_err(|message| CheckpointError::Tensor {
                        name: name.clone(),
                        message,
                    })?;
                Ok((name, tensor))
            })
            .collect();
    }
    Err(CheckpointError::NoTensors(match key {
        Some(k) => format!(" under key `{k}`"),
        None => " (pass --key with the state dict's key)".into(),
    }))
}

/// Copies a strided view out of its storage into a contiguous f32 tensor.
fn materialize(t: &TensorRef, storages: &Storages<'_>) -> Result<Tensor, String> {
    let data = storages
        .get(&t.storage.key)
        .ok_or_else(|| format!("its storage {} is missing from the file", t.storage.key))?;
    let elem = t.storage.dtype.size();
    let available = (data.len() / elem) as u64;
    let numel = t
        .size
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .filter(|&n| n <= MAX_TENSOR_ELEMENTS)
        .ok_or_else(|| format!("size {:?} is too large", t.size))?;
    if numel > 0 {
        let last = t
            .size
            .iter()
            .zip(&t.stride)
            .try_fold(t.offset, |acc, (&d, &s)| {
                acc.checked_add((d - 1).checked_mul(s)?)
            })
            .ok_or_else(|| "offset and strides overflow".to_string())?;
        if last >= available {
            return Err(format!(
                "view (offset {}, size {:?}, stride {:?}) reaches element {last}, but storage {} holds {available} {} elements",
                t.offset, t.size, t.stride, t.storage.key, t.storage.dtype
            ));
        }
    }
    let read = |i: u64| -> f32 {
        let at = i as usize * elem;
        let b = &data[at..at + elem];
        match t.storage.dtype {
            StorageDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            StorageDtype::F64 => f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32,
            StorageDtype::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            StorageDtype::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            StorageDtype::I64 => i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32,
            StorageDtype::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32,
            StorageDtype::I16 => i16::from_le_bytes([b[0], b[1]]) as f32,
            StorageDtype::I8 => b[0] as i8 as f32,
            StorageDtype::U8 | StorageDtype::Bool => b[0] as f32,
        }
    };
    let mut out = Vec::with_capacity(numel as usize);
    let rank = t.size.len();
    let mut index = vec![0u64; rank];
    for _ in 0..numel {
        let at = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<u64>();
        out.push(read(at));
        // Row-major increment of the multi-index.
        for d in (0..rank).rev() {
            index[d] += 1;
            if index[d] < t.size[d] {
                break;
            }
            index[d] = 0;
        }
    }
    let dims: Vec<usize> = t.size.iter().map(|&d| d as usize).collect();
    Tensor::from_vec(out, dims, &Device::Cpu).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests;

/// The fuzz target `checkpoint` (`fuzz/`) and its regression tests: every tensor of a
/// checkpoint held in memory, in any of the formats [`read_bytes`] takes. Returns how many.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) -> Result<usize, CheckpointError> {
    read_bytes(data, None).map(|tensors| tensors.len())
}
