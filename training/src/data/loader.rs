//! Batching: a producer thread per epoch decodes and augments samples on a rayon pool and
//! hands finished `[B, 3, S, S]` batches over a bounded channel, so at most `prefetch` batches
//! (plus the one being built) are in memory.
//!
//! Unreadable or undecodable images are skipped: reported once by path (callback and
//! [`Loader::bad_images`]), counted, and left out of this and later epochs. Batches are
//! refilled from the following samples, so every batch but the last has `batch_size` images
//! and the batch count reflects the images lost.
//!
//! Order and augmentation are reproducible: the epoch's order is a shuffle keyed by
//! `seed ^ epoch`, and each sample's augmentation is keyed by (seed, epoch, sample index).
//! `skip_batches` resumes mid-epoch by skipping `skip_batches * batch_size` entries of that
//! order; this is exact when the skipped part held no unreadable images not yet known to this
//! loader (otherwise the rest shifts by that many images).

use std::collections::BTreeMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use slimserve::preprocess::{decode_for, Preprocessing, DEFAULT_MAX_PIXELS};

use super::augment::{eval_input, train_input, Augment};
use super::rng::Rng;
use super::{DataError, Sample, SampleSource};

/// Training (augmented) or evaluation (resize + centre crop) preprocessing.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Train(Augment),
    Eval,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Resize and crop sizes (the crop is the model's input side `S`), mean and std.
    pub preprocessing: Preprocessing,
    pub mode: Mode,
    /// Shuffle every epoch (keyed by `seed ^ epoch`).
    pub shuffle: bool,
    /// Drop the last incomplete batch.
    pub drop_last: bool,
    pub seed: u64,
    /// Finished batches that may wait in the channel.
    pub prefetch: usize,
    /// Decoding threads; 0 = one per available core.
    pub threads: usize,
    /// Larger images are refused (and counted as bad) from their header.
    pub max_pixels: u64,
}

impl LoaderConfig {
    /// Training: the study's augmentation, shuffled, last incomplete batch dropped.
    pub fn train(batch_size: usize, size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            preprocessing: Preprocessing::for_input(size),
            mode: Mode::Train(Augment::default()),
            shuffle: true,
            drop_last: true,
            seed,
            prefetch: 4,
            threads: 0,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }

    /// Evaluation: `slimserve::preprocess::image_to_input`, in order, every sample.
    pub fn eval(batch_size: usize, size: usize) -> Self {
        Self {
            mode: Mode::Eval,
            shuffle: false,
            drop_last: false,
            ..Self::train(batch_size, size, 0)
        }
    }
}

/// An image that could not be used.
#[derive(Debug, Clone, PartialEq)]
pub struct BadImage {
    /// Index of the sample in the loader's sample list.
    pub index: usize,
    pub path: String,
    pub reason: String,
}

type BadImageCallback = Box<dyn Fn(&BadImage) + Send + Sync>;

struct BadImages {
    seen: Mutex<BTreeMap<usize, BadImage>>,
    callback: Option<BadImageCallback>,
}

impl BadImages {
    fn record(&self, bad: BadImage) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.contains_key(&bad.index) {
            return;
        }
        if let Some(cb) = &self.callback {
            cb(&bad);
        }
        seen.insert(bad.index, bad);
    }

    fn contains(&self, index: usize) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.contains_key(&index)
    }

    fn all(&self) -> Vec<BadImage> {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.values().cloned().collect()
    }
}

/// Yields batches of a sample list; see the module docs.
pub struct Loader {
    samples: Arc<[Sample]>,
    cfg: Arc<LoaderConfig>,
    pool: Arc<rayon::ThreadPool>,
    bad: Arc<BadImages>,
}

impl Loader {
    pub fn new(samples: &[Sample], cfg: LoaderConfig) -> Result<Self, DataError> {
        if cfg.batch_size == 0 {
            return Err(DataError::Config("batch size must be at least 1".into()));
        }
        if cfg.preprocessing.crop == 0 || cfg.preprocessing.resize < cfg.preprocessing.crop {
            return Err(DataError::Config(format!(
                "need 0 < crop <= resize, got crop {} resize {}",
                cfg.preprocessing.crop, cfg.preprocessing.resize
            )));
        }
        if samples.is_empty() {
            return Err(DataError::Config("no samples to load".into()));
        }
        let threads = if cfg.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            cfg.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("slimtrain-data-{i}"))
            .build()
            .map_err(|e| DataError::Config(format!("decode thread pool: {e}")))?;
        Ok(Self {
            samples: samples.into(),
            cfg: Arc::new(cfg),
            pool: Arc::new(pool),
            bad: Arc::new(BadImages {
                seen: Mutex::new(BTreeMap::new()),
                callback: None,
            }),
        })
    }

    /// Calls `f` once for every image found unusable (e.g. to print its path). Replaces any
    /// previous callback and forgets images already found bad.
    pub fn on_bad_image(mut self, f: impl Fn(&BadImage) + Send + Sync + 'static) -> Self {
        self.bad = Arc::new(BadImages {
            seen: Mutex::new(BTreeMap::new()),
            callback: Some(Box::new(f)),
        });
        self
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// Number of samples, including any found bad.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Batches in a full epoch over the samples not (yet) known to be bad.
    pub fn batches_per_epoch(&self) -> usize {
        let n = self.samples.len() - self.bad_image_count();
        let b = self.cfg.batch_size;
        if self.cfg.drop_last {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// Images found unusable so far.
    pub fn bad_image_count(&self) -> usize {
        self.bad
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn bad_images(&self) -> Vec<BadImage> {
        self.bad.all()
    }

    /// The sample order of `epoch` (before skipping bad images).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.samples.len()).collect();
        if self.cfg.shuffle {
            Rng::derive(&[self.cfg.seed ^ epoch]).shuffle(&mut order);
        }
        order
    }

    /// Iterates over the batches of `epoch`, starting after `skip_batches` batches (resume).
    /// Batches are `(images [B, 3, S, S] f32, labels [B] u32)` on the CPU; move them to the
    /// training device with `to_device`.
    pub fn epoch(&self, epoch: u64, skip_batches: usize) -> Batches {
        let order: Vec<usize> = self
            .epoch_order(epoch)
            .into_iter()
            .filter(|&i| !self.bad.contains(i))
            .skip(skip_batches.saturating_mul(self.cfg.batch_size))
            .collect();
        let (tx, rx) = sync_channel(self.cfg.prefetch.max(1));
        let producer = Producer {
            samples: self.samples.clone(),
            cfg: self.cfg.clone(),
            pool: self.pool.clone(),
            bad: self.bad.clone(),
            epoch,
        };
        let handle = std::thread::Builder::new()
            .name("slimtrain-batches".into())
            .spawn(move || producer.run(order, tx))
            .expect("spawning the batch producer thread");
        Batches {
            rx: Some(rx),
            handle: Some(handle),
        }
    }
}

type BatchResult = Result<(Tensor, Tensor), DataError>;

struct Producer {
    samples: Arc<[Sample]>,
    cfg: Arc<LoaderConfig>,
    pool: Arc<rayon::ThreadPool>,
    bad: Arc<BadImages>,
    epoch: u64,
}

impl Producer {
    fn load(&self, index: usize) -> Result<Vec<f32>, String> {
        let sample = &self.samples[index];
        let pp = &self.cfg.preprocessing;
        let img = match &sample.source {
            SampleSource::File(path) => {
                let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
                // Decoded as the server decodes it (large JPEGs at a reduced IDCT scale).
                decode_for(&bytes, self.cfg.max_pixels, pp.resize as u32)
                    .map_err(|e| e.to_string())?
            }
            SampleSource::Grey {
                width,
                height,
                pixels,
            } => grey_to_rgb(*width, *height, pixels)?,
        };
        Ok(match &self.cfg.mode {
            Mode::Train(aug) => train_input(&img, aug, pp, self.cfg.seed, self.epoch, index),
            Mode::Eval => eval_input(&img, pp),
        })
    }

    fn run(self, order: Vec<usize>, tx: SyncSender<BatchResult>) {
        let b = self.cfg.batch_size;
        let s = self.cfg.preprocessing.crop;
        let mut images: Vec<f32> = Vec::with_capacity(b * 3 * s * s);
        let mut labels: Vec<u32> = Vec::with_capacity(b);
        for chunk in order.chunks(b) {
            let loaded: Vec<Result<Vec<f32>, String>> = self
                .pool
                .install(|| chunk.par_iter().map(|&i| self.load(i)).collect());
            for (&index, result) in chunk.iter().zip(loaded) {
                match result {
                    Ok(x) => {
                        images.extend_from_slice(&x);
                        labels.push(self.samples[index].label as u32);
                    }
                    Err(reason) => self.bad.record(BadImage {
                        index,
                        path: self.samples[index].path_or_id.clone(),
                        reason,
                    }),
                }
                if labels.len() == b && !send(&tx, &mut images, &mut labels, s) {
                    return;
                }
            }
        }
        if !labels.is_empty() && !self.cfg.drop_last {
            send(&tx, &mut images, &mut labels, s);
        }
    }
}

/// Sends the batch in the buffers (emptying them); false when the receiver has gone.
fn send(
    tx: &SyncSender<BatchResult>,
    images: &mut Vec<f32>,
    labels: &mut Vec<u32>,
    s: usize,
) -> bool {
    let n = labels.len();
    let batch = Tensor::from_vec(std::mem::take(images), (n, 3, s, s), &Device::Cpu)
        .and_then(|x| {
            Ok((
                x,
                Tensor::from_vec(std::mem::take(labels), n, &Device::Cpu)?,
            ))
        })
        .map_err(DataError::from);
    images.reserve(n * 3 * s * s);
    tx.send(batch).is_ok()
}

fn grey_to_rgb(width: u32, height: u32, pixels: &[u8]) -> Result<RgbImage, String> {
    if width == 0 || height == 0 || pixels.len() != width as usize * height as usize {
        return Err(format!(
            "grey image {width}x{height} with {} pixels",
            pixels.len()
        ));
    }
    let rgb = pixels.iter().flat_map(|&p| [p, p, p]).collect();
    RgbImage::from_raw(width, height, rgb).ok_or_else(|| "grey image buffer size".to_string())
}

/// The batches of one epoch. Dropping it stops the producer after its current chunk.
pub struct Batches {
    rx: Option<Receiver<BatchResult>>,
    handle: Option<JoinHandle<()>>,
}

impl Iterator for Batches {
    type Item = BatchResult;

    fn next(&mut self) -> Option<BatchResult> {
        let item = self.rx.as_ref()?.recv().ok();
        if item.is_none() {
            self.finish();
        }
        item
    }
}

impl Batches {
    fn finish(&mut self) {
        self.rx = None;
        if let Some(h) = self.handle.take() {
            if let Err(panic) = h.join() {
                std::panic::resume_unwind(panic);
            }
        }
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        self.rx = None;
        if let Some(h) = self.handle.take() {
            // A producer panic is re-raised by `next`; while dropping, just wait for it.
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::super::testutil::{encode, image, write_image};
    use super::super::{open_food11, Dataset};
    use super::*;

    /// 3 classes x 4 training images (20x16 PNG/JPEG) in the Food-11 layout.
    fn food(root: &std::path::Path) -> Dataset {
        for label in 0..3u8 {
            for i in 0..4u8 {
                let ext = if i % 2 == 0 { "png" } else { "jpg" };
                write_image(
                    &root.join("training").join(format!("{label}_{i}.{ext}")),
                    label * 4 + i,
                );
            }
            write_image(
                &root.join("validation").join(format!("{label}_0.png")),
                label,
            );
        }
        open_food11(root).unwrap()
    }

    fn collect(batches: Batches) -> Vec<(Vec<f32>, Vec<u32>)> {
        batches
            .map(|b| {
                let (x, y) = b.unwrap();
                (
                    x.flatten_all().unwrap().to_vec1().unwrap(),
                    y.to_vec1().unwrap(),
                )
            })
            .collect()
    }

    fn cfg(batch: usize, size: usize, seed: u64) -> LoaderConfig {
        LoaderConfig {
            threads: 2,
            prefetch: 1,
            ..LoaderConfig::train(batch, size, seed)
        }
    }

    #[test]
    fn batches_have_the_right_shape_and_range() {
        let dir = tempfile::tempdir().unwrap();
        let ds = food(dir.path());
        let loader = Loader::new(&ds.train, cfg(5, 8, 1)).unwrap();
        assert_eq!(loader.batches_per_epoch(), 2);
        let mut n = 0;
        for b in loader.epoch(0, 0) {
            let (x, y) = b.unwrap();
            assert_eq!(x.dims(), [5, 3, 8, 8]);
            assert_eq!(x.dtype(), candle_core::DType::F32);
            assert_eq!(y.dims(), [5]);
            assert_eq!(y.dtype(), candle_core::DType::U32);
            let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|p| (0.0..=1.0).contains(p)));
            assert!(v.iter().any(|&p| p > 0.05));
            assert!(y.to_vec1::<u32>().unwrap().iter().all(|&l| l < 3));
            n += 1;
        }
        assert_eq!(n, 2); // 12 images, batch 5, last 2 dropped

        // Eval keeps the partial batch and the order; its pixels are the eval path's.
        let eval = Loader::new(
            &ds.train,
            LoaderConfig {
                threads: 2,
                ..LoaderConfig::eval(5, 8)
            },
        )
        .unwrap();
        let batches = collect(eval.epoch(0, 0));
        assert_eq!(
            batches.iter().map(|b| b.1.len()).collect::<Vec<_>>(),
            [5, 5, 2]
        );
        let labels: Vec<u32> = batches.iter().flat_map(|b| b.1.clone()).collect();
        assert_eq!(labels, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
        let SampleSource::File(p) = &ds.train[6].source else {
            panic!()
        };
        let img =
            slimserve::preprocess::decode(&std::fs::read(p).unwrap(), DEFAULT_MAX_PIXELS).unwrap();
        let want = eval_input(&img, &Preprocessing::for_input(8));
        assert_eq!(&batches[1].0[192..384], &want[..]);
    }

    #[test]
    fn epochs_are_reproducible_and_differ() {
        let dir = tempfile::tempdir().unwrap();
        let ds = food(dir.path());
        let a = Loader::new(&ds.train, cfg(4, 8, 7)).unwrap();
        let b = Loader::new(&ds.train, cfg(4, 8, 7)).unwrap();
        let e0 = collect(a.epoch(0, 0));
        assert_eq!(e0, collect(b.epoch(0, 0)));
        assert_eq!(e0.len(), 3);
        let e1 = collect(a.epoch(1, 0));
        assert_ne!(e0, e1);
        assert_ne!(a.epoch_order(0), a.epoch_order(1));
        // Every sample appears once per epoch.
        let mut labels: Vec<u32> = e1.iter().flat_map(|b| b.1.clone()).collect();
        labels.sort();
        assert_eq!(labels, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]);
    }

    #[test]
    fn skip_batches_resumes_mid_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let ds = food(dir.path());
        let loader = Loader::new(&ds.train, cfg(3, 8, 5)).unwrap();
        let full = collect(loader.epoch(2, 0));
        assert_eq!(full.len(), 4);
        let rest = collect(loader.epoch(2, 1));
        assert_eq!(rest, full[1..]);
        assert!(collect(loader.epoch(2, 4)).is_empty());
        assert!(collect(loader.epoch(2, 100)).is_empty());
        // Stopping early (dropping the iterator) is fine.
        let mut it = loader.epoch(3, 0);
        assert!(it.next().is_some());
        drop(it);
    }

    #[test]
    fn corrupt_images_are_reported_once_counted_and_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut ds = food(dir.path());
        let junk = dir.path().join("training/1_90.jpg");
        std::fs::write(
            &junk,
            [0x17u8, 0x42, 0x99, 0x00, 0xfe, 0x33, 0x10, 0x01].repeat(40),
        )
        .unwrap();
        let jpeg = encode(&image(20, 16, 1), image::ImageFormat::Jpeg);
        let truncated = dir.path().join("training/2_91.jpg");
        std::fs::write(&truncated, &jpeg[..jpeg.len() / 2]).unwrap();
        let missing = dir.path().join("training/0_92.png");
        ds.train.push(Sample::file(junk.clone(), 1));
        ds.train.push(Sample::file(truncated.clone(), 2));
        ds.train.push(Sample::file(missing.clone(), 0));
        assert_eq!(ds.train.len(), 15);

        let reported = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(AtomicUsize::new(0));
        let (r, c) = (reported.clone(), calls.clone());
        let loader = Loader::new(&ds.train, cfg(4, 8, 3))
            .unwrap()
            .on_bad_image(move |b| {
                r.lock().unwrap().push(b.path.clone());
                c.fetch_add(1, Ordering::SeqCst);
            });
        assert_eq!(loader.batches_per_epoch(), 3); // 15 / 4, before anything is known bad
        let e0 = collect(loader.epoch(0, 0));
        // 12 good images -> 3 full batches, none of them short.
        assert_eq!(e0.len(), 3);
        assert!(e0.iter().all(|b| b.1.len() == 4));
        assert_eq!(loader.bad_image_count(), 3);
        let mut paths = reported.lock().unwrap().clone();
        paths.sort();
        let mut want: Vec<String> = [&junk, &truncated, &missing]
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        want.sort();
        assert_eq!(paths, want);
        assert!(loader.bad_images().iter().all(|b| !b.reason.is_empty()));

        // Later epochs neither report nor include them again.
        let e1 = collect(loader.epoch(1, 0));
        assert_eq!(e1.len(), 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(loader.bad_image_count(), 3);

        // Without drop_last the remainder is kept: 12 good of 15 at batch 5 -> 5, 5, 2.
        let eval = Loader::new(
            &ds.train,
            LoaderConfig {
                threads: 2,
                ..LoaderConfig::eval(5, 8)
            },
        )
        .unwrap();
        let sizes: Vec<usize> = collect(eval.epoch(0, 0))
            .iter()
            .map(|b| b.1.len())
            .collect();
        assert_eq!(sizes, [5, 5, 2]);
        assert_eq!(eval.bad_image_count(), 3);
        assert_eq!(eval.batches_per_epoch(), 3);
    }

    #[test]
    fn grey_images_use_the_same_paths() {
        let pixels: Arc<[u8]> = (0..28 * 28)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>()
            .into();
        let samples: Vec<Sample> = (0..4)
            .map(|i| Sample {
                path_or_id: format!("grey/{i}"),
                label: i,
                source: SampleSource::Grey {
                    width: 28,
                    height: 28,
                    pixels: pixels.clone(),
                },
            })
            .collect();
        let eval = Loader::new(
            &samples,
            LoaderConfig {
                threads: 1,
                ..LoaderConfig::eval(4, 16)
            },
        )
        .unwrap();
        let (x, y) = eval.epoch(0, 0).next().unwrap().unwrap();
        assert_eq!(x.dims(), [4, 3, 16, 16]);
        assert_eq!(y.to_vec1::<u32>().unwrap(), [0, 1, 2, 3]);
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        // Grey: the three channels are equal.
        assert_eq!(v[..256], v[256..512]);
        assert_eq!(v[..256], v[512..768]);
        let rgb = grey_to_rgb(28, 28, &pixels).unwrap();
        assert_eq!(
            &v[..768],
            &eval_input(&rgb, &Preprocessing::for_input(16))[..]
        );

        let train = Loader::new(&samples, cfg(2, 16, 0)).unwrap();
        let b = collect(train.epoch(0, 0));
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].0[..256], b[0].0[256..512]);
        assert!(grey_to_rgb(28, 27, &pixels).is_err());
    }

    #[test]
    fn bad_configs_are_errors() {
        let s = vec![Sample::file("x.png".into(), 0)];
        assert!(Loader::new(
            &s,
            LoaderConfig {
                batch_size: 0,
                ..cfg(1, 8, 0)
            }
        )
        .is_err());
        assert!(Loader::new(&[], cfg(1, 8, 0)).is_err());
        let mut c = cfg(1, 8, 0);
        c.preprocessing.resize = 4;
        assert!(Loader::new(&s, c).is_err());
    }
}
