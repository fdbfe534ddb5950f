//! Request payloads to model inputs, validated identically for both APIs: an encoded image is
//! decoded and resized to a CHW f32 input (on the decoding pool); a raw tensor is checked
//! (shape, byte count, finite values) and split into per-item views of the request's own
//! buffer, converted only when batched.

use prost::bytes::Bytes;

use crate::error::Error;
use crate::preprocess::{self, Preprocessing};
use crate::scheduler::Input;

/// The two tensor forms a model accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Preprocessed FP32, `[N, 3, S, S]` (or `[3, S, S]` where one item is allowed).
    Nchw,
    /// UINT8 RGB pixels at the input size, `[N, S, S, 3]` (or `[S, S, 3]`); normalised when
    /// batched.
    Nhwc,
}

impl Layout {
    pub fn datatype(self) -> &'static str {
        match self {
            Layout::Nchw => "FP32",
            Layout::Nhwc => "UINT8",
        }
    }

    fn elem_bytes(self) -> usize {
        match self {
            Layout::Nchw => 4,
            Layout::Nhwc => 1,
        }
    }

    /// Per-item dims for a model of input side `s`.
    pub fn item_dims(self, s: usize) -> [i64; 3] {
        let s = s as i64;
        match self {
            Layout::Nchw => [3, s, s],
            Layout::Nhwc => [s, s, 3],
        }
    }
}

fn fmt_shape(shape: &[i64]) -> String {
    let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
    format!("[{}]", dims.join(", "))
}

/// A raw tensor as a request carries it.
#[derive(Debug, Clone)]
pub struct RawTensor {
    /// How messages name it, e.g. "input `input`".
    pub what: String,
    pub layout: Layout,
    pub shape: Vec<i64>,
    pub data: Bytes,
    /// A leading batch dimension of 1..=max batch is required (KServe); otherwise one item,
    /// `[3, S, S]` or `[1, 3, S, S]` (own API).
    pub batched: bool,
}

impl RawTensor {
    /// Items the tensor claims (its batch dimension when plausible, else 1): what admission
    /// reserves before validation.
    pub fn claimed_items(&self, max_batch: usize) -> usize {
        match self.shape.first() {
            Some(&n)
                if self.batched && self.shape.len() == 4 && n >= 1 && n as usize <= max_batch =>
            {
                n as usize
            }
            _ => 1,
        }
    }
}

/// Decodes an encoded image and resizes/crops it as the model was trained (`pp`).
pub fn image(bytes: &[u8], pp: &Preprocessing, max_pixels: u64) -> Result<Input, Error> {
    let rgb = preprocess::decode_for(bytes, max_pixels, pp.resize as u32)?;
    Ok(Input::Chw(preprocess::image_to_input(&rgb, pp)))
}

/// Validates a raw tensor for model `model` of input side `s` and splits it into per-item
/// inputs (views of its buffer).
pub fn tensor(t: &RawTensor, model: &str, s: usize, max_batch: usize) -> Result<Vec<Input>, Error> {
    let item = t.layout.item_dims(s);
    let expected = if t.batched {
        format!(
            "[N, {}, {}, {}] with 1 <= N <= {max_batch}",
            item[0], item[1], item[2]
        )
    } else {
        format!(
            "{} or [1, {}, {}, {}]",
            fmt_shape(&item),
            item[0],
            item[1],
            item[2]
        )
    };
    let wrong_shape = || {
        Error::invalid(format!(
            "{} has shape {}; model `{}` expects {} {expected}",
            t.what,
            fmt_shape(&t.shape),
            model,
            t.layout.datatype()
        ))
    };
    let n = match t.shape.as_slice() {
        [n, rest @ ..] if rest == item && (1..=max_batch as i64).contains(n) => *n as usize,
        rest if !t.batched && rest == item => 1,
        _ => return Err(wrong_shape()),
    };
    let per_item = 3 * s * s * t.layout.elem_bytes();
    let need = n * per_item;
    if t.data.len() != need {
        return Err(Error::invalid(format!(
            "{} has {} bytes of data, but shape {} of {} needs {need}",
            t.what,
            t.data.len(),
            fmt_shape(&t.shape),
            t.layout.datatype()
        )));
    }
    if t.layout == Layout::Nchw {
        if let Some(i) = first_non_finite(&t.data) {
            let b = &t.data[4 * i..4 * i + 4];
            let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            return Err(Error::invalid(format!(
                "{} contains {v} at element {i}; every value must be finite",
                t.what
            )));
        }
    }
    Ok((0..n)
        .map(|i| {
            let item = t.data.slice(i * per_item..(i + 1) * per_item);
            match t.layout {
                Layout::Nchw => Input::ChwBytes(item),
                Layout::Nhwc => Input::Hwc(item),
            }
        })
        .collect())
}

/// Index of the first little-endian f32 that is NaN or infinite (all exponent bits set).
fn first_non_finite(data: &[u8]) -> Option<usize> {
    data.chunks_exact(4)
        .position(|b| (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000) == 0x7f80_0000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_values_are_found() {
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        assert_eq!(
            first_non_finite(&bytes(&[0.0, -1.5, f32::MAX, 1e-40])),
            None
        );
        assert_eq!(first_non_finite(&bytes(&[0.0, f32::NAN])), Some(1));
        assert_eq!(first_non_finite(&bytes(&[f32::NEG_INFINITY])), Some(0));
        assert_eq!(
            first_non_finite(&bytes(&[1.0, 2.0, f32::INFINITY])),
            Some(2)
        );
    }
}
