//! Request inputs to model inputs: encoded images and raw tensors become CHW f32 vectors at
//! the model's input size. Shared by both APIs so they validate identically. Everything here is
//! CPU work and runs on the blocking pool.

use std::time::{Duration, Instant};

use crate::error::Error;
use crate::preprocess;
use crate::server::ServedModel;

/// The two tensor forms a model accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Preprocessed FP32, `[N, 3, S, S]` (or `[3, S, S]` where one item is allowed).
    Nchw,
    /// UINT8 RGB pixels at the input size, `[N, S, S, 3]` (or `[S, S, 3]`); normalised here.
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

/// Decodes an encoded image and resizes/crops it as the model was trained.
pub fn image(bytes: &[u8], model: &ServedModel, max_pixels: u64) -> Result<Vec<f32>, Error> {
    let rgb = preprocess::decode(bytes, max_pixels)?;
    Ok(preprocess::image_to_input(
        &rgb,
        &model.config.preprocessing,
    ))
}

/// Validates a raw tensor (`what` names it in messages, e.g. "input `input`") and splits it
/// into per-item CHW inputs. `batched` demands a leading batch dimension of 1..=max_batch.
pub fn tensor(
    what: &str,
    layout: Layout,
    shape: &[i64],
    data: &[u8],
    model: &ServedModel,
    batched: bool,
    max_batch: usize,
) -> Result<Vec<Vec<f32>>, Error> {
    let s = model.input_size();
    let item = layout.item_dims(s);
    let expected = if batched {
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
            "{what} has shape {}; model `{}` expects {} {expected}",
            fmt_shape(shape),
            model.name,
            layout.datatype()
        ))
    };
    let n = match shape {
        [n, rest @ ..] if rest == item && (1..=max_batch as i64).contains(n) => *n as usize,
        rest if !batched && rest == item => 1,
        _ => return Err(wrong_shape()),
    };
    let per_item = 3 * s * s;
    let need = n * per_item * layout.elem_bytes();
    if data.len() != need {
        return Err(Error::invalid(format!(
            "{what} has {} bytes of data, but shape {} of {} needs {need}",
            data.len(),
            fmt_shape(shape),
            layout.datatype()
        )));
    }
    let pp = &model.config.preprocessing;
    let items = match layout {
        Layout::Nchw => {
            let floats: Vec<f32> = data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            if let Some((i, v)) = floats.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(Error::invalid(format!(
                    "{what} contains {v} at element {i}; every value must be finite"
                )));
            }
            floats.chunks_exact(per_item).map(<[f32]>::to_vec).collect()
        }
        Layout::Nhwc => data
            .chunks_exact(per_item)
            .map(|hwc| {
                let plane = s * s;
                let mut chw = vec![0f32; per_item];
                for (p, px) in hwc.chunks_exact(3).enumerate() {
                    for c in 0..3 {
                        chw[c * plane + p] = (px[c] as f32 / 255.0 - pp.mean[c]) / pp.std[c];
                    }
                }
                chw
            })
            .collect(),
    };
    Ok(items)
}

/// Runs `work` on the blocking pool and times it.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<(T, Duration), Error> {
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        work().map(|v| (v, started.elapsed()))
    })
    .await
    .map_err(|e| Error::Internal(format!("preprocessing failed: {e}")))?
}
