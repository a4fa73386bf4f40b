//! The threaded batch loader: which samples each rank sees at each step,
//! transformed on worker threads and prefetched.
//!
//! Sample order is a pure function of (seed, step, rank): the stream of all
//! samples is a sequence of epochs, each a seeded permutation of the data
//! set; global step `s` takes positions `[s * G, (s + 1) * G)` with
//! `G = batch * world`, and rank `r` takes the `r`-th slice of `batch`.
//! So a resumed run sees exactly the batches it would have seen, and two
//! ranks with batch B see the same images as one rank with batch 2B. The
//! crop of a sample is seeded by its stream position, not by its rank.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::augment::{center_square, crop_window, resize_normalise};
use super::{DataError, SharedSource};

/// How a loader picks and transforms samples.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Seed of sample order and crops.
    pub seed: u64,
    /// Images per step on this rank.
    pub batch_size: usize,
    /// This rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
    /// Output image side.
    pub image_size: usize,
    /// Output channels.
    pub channels: usize,
    /// Random-resized-crop area range; `None` takes the centred square.
    pub crop_scale: Option<[f64; 2]>,
    /// Loader threads; 0 loads on the caller's thread.
    pub num_workers: usize,
    /// Batches each thread prepares ahead.
    pub prefetch: usize,
}

/// One batch of normalised images, `[B, C, H, W]` flattened, and labels.
#[derive(Clone, Debug)]
pub struct Batch {
    /// The global step this batch belongs to.
    pub step: u64,
    /// Pixels in NCHW order.
    pub images: Vec<f32>,
    /// One label per image.
    pub labels: Vec<i64>,
    /// Images in the batch.
    pub batch_size: usize,
    /// Channels.
    pub channels: usize,
    /// Image side.
    pub size: usize,
}

impl Batch {
    /// Copies the batch into a tensor `[B, C, H, W]` on `device`.
    pub fn images_tensor(&self, device: tch::Device) -> tch::Tensor {
        let shape = [self.batch_size, self.channels, self.size, self.size].map(|d| d as i64);
        tch::Tensor::from_slice(&self.images).view(shape).to_device(device)
    }
}

/// Computes the data-set indices of one rank's slice of one step.
#[derive(Clone, Debug)]
pub struct Plan {
    seed: u64,
    len: usize,
    batch: usize,
    rank: usize,
    world: usize,
    cached: Option<(u64, Vec<usize>)>,
}

impl Plan {
    /// A plan over a data set of `len` samples.
    pub fn new(seed: u64, len: usize, batch: usize, rank: usize, world: usize) -> Self {
        Plan { seed, len, batch, rank, world, cached: None }
    }

    /// Stream positions and data-set indices of this rank at `step`.
    pub fn indices(&mut self, step: u64) -> Vec<(u64, usize)> {
        let global = (self.batch * self.world) as u64;
        let first = step * global + (self.rank * self.batch) as u64;
        (first..first + self.batch as u64).map(|pos| (pos, self.index_at(pos))).collect()
    }

    fn index_at(&mut self, position: u64) -> usize {
        let epoch = position / self.len as u64;
        let offset = (position % self.len as u64) as usize;
        if self.cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<usize> = (0..self.len).collect();
            let mut rng = ChaCha8Rng::seed_from_u64(mix(self.seed, epoch));
            perm.shuffle(&mut rng);
            self.cached = Some((epoch, perm));
        }
        self.cached.as_ref().map_or(offset, |(_, perm)| perm[offset])
    }
}

/// Combines two numbers into one well-spread seed (splitmix64 finaliser).
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(0x632b_e59b_d9b2_7ac5);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Builds the batch of `step` from a source.
///
/// # Errors
///
/// Fails when a sample cannot be read.
pub fn make_batch(
    source: &SharedSource,
    config: &LoaderConfig,
    plan: &mut Plan,
    step: u64,
) -> Result<Batch, DataError> {
    let (mean, std) = source.normalisation(config.channels);
    let per_image = config.channels * config.image_size * config.image_size;
    let mut images = vec![0f32; config.batch_size * per_image];
    let mut labels = Vec::with_capacity(config.batch_size);
    for (slot, (position, index)) in plan.indices(step).into_iter().enumerate() {
        let (image, label) = source.get(index)?;
        let window = match config.crop_scale {
            Some(scale) => {
                let mut rng = ChaCha8Rng::seed_from_u64(mix(config.seed ^ 0x00c0_ffee, position));
                crop_window(image.height, image.width, scale, &mut rng)
            }
            None => center_square(image.height, image.width),
        };
        let out = &mut images[slot * per_image..(slot + 1) * per_image];
        resize_normalise(&image, window, config.image_size, config.channels, &mean, &std, out);
        labels.push(label);
    }
    Ok(Batch {
        step,
        images,
        labels,
        batch_size: config.batch_size,
        channels: config.channels,
        size: config.image_size,
    })
}

type BatchResult = Result<Batch, DataError>;

/// Produces batches for consecutive steps, in order, from worker threads.
pub struct Loader {
    source: SharedSource,
    config: LoaderConfig,
    start: u64,
    next_step: u64,
    inline_plan: Plan,
    /// One channel per thread; thread `w` serves steps `start + w + k * n`.
    /// Dropping a receiver ends its thread at its next send.
    workers: Vec<(Receiver<BatchResult>, JoinHandle<()>)>,
    wait: Duration,
}

impl Loader {
    /// Starts loading at `start_step`.
    pub fn new(source: SharedSource, config: LoaderConfig, start_step: u64) -> Self {
        let plan =
            Plan::new(config.seed, source.len(), config.batch_size, config.rank, config.world);
        let threads = config.num_workers;
        let workers = (0..threads)
            .map(|w| {
                let (tx, rx) = sync_channel(config.prefetch.max(1));
                let (source, config, mut plan) =
                    (Arc::clone(&source), config.clone(), plan.clone());
                let handle = std::thread::spawn(move || {
                    let mut step = start_step + w as u64;
                    // Sending fails once the loader is dropped; the thread ends.
                    while tx.send(make_batch(&source, &config, &mut plan, step)).is_ok() {
                        step += threads as u64;
                    }
                });
                (rx, handle)
            })
            .collect();
        Loader {
            source,
            config,
            start: start_step,
            next_step: start_step,
            inline_plan: plan,
            workers,
            wait: Duration::ZERO,
        }
    }

    /// Returns the batch of the next step, waiting for it if needed.
    ///
    /// # Errors
    ///
    /// Fails when a sample cannot be read or a loader thread died.
    pub fn next_batch(&mut self) -> Result<Batch, DataError> {
        let step = self.next_step;
        self.next_step += 1;
        let started = Instant::now();
        let batch = if self.workers.is_empty() {
            make_batch(&self.source, &self.config, &mut self.inline_plan, step)
        } else {
            let slot = ((step - self.start) % self.workers.len() as u64) as usize;
            self.workers[slot].0.recv().unwrap_or_else(|_| {
                Err(DataError::Io { path: "loader".into(), message: "loader thread died".into() })
            })
        };
        self.wait += started.elapsed();
        batch
    }

    /// Total time `next_batch` spent waiting, reset by the call.
    pub fn take_wait(&mut self) -> Duration {
        std::mem::take(&mut self.wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::SyntheticSource;

    fn config(batch: usize, rank: usize, world: usize, threads: usize) -> LoaderConfig {
        LoaderConfig {
            seed: 5,
            batch_size: batch,
            rank,
            world,
            image_size: 8,
            channels: 1,
            crop_scale: Some([0.3, 1.0]),
            num_workers: threads,
            prefetch: 2,
        }
    }

    fn source() -> SharedSource {
        Arc::new(SyntheticSource { len: 50, size: 12, channels: 1, offset: 0 })
    }

    #[test]
    fn every_epoch_visits_each_sample_once() {
        let mut plan = Plan::new(1, 50, 10, 0, 1);
        let mut seen: Vec<usize> = (0..5).flat_map(|s| plan.indices(s)).map(|(_, i)| i).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        let next_epoch: Vec<usize> = plan.indices(5).into_iter().map(|(_, i)| i).collect();
        let first_epoch: Vec<usize> = plan.indices(0).into_iter().map(|(_, i)| i).collect();
        assert_ne!(next_epoch, first_epoch, "epochs are reshuffled");
    }

    #[test]
    fn two_ranks_split_what_one_rank_with_double_batch_sees() {
        let src = source();
        let mut one = Loader::new(Arc::clone(&src), config(8, 0, 1, 0), 3);
        let mut r0 = Loader::new(Arc::clone(&src), config(4, 0, 2, 2), 3);
        let mut r1 = Loader::new(Arc::clone(&src), config(4, 1, 2, 1), 3);
        for _ in 0..3 {
            let whole = one.next_batch().unwrap();
            let (a, b) = (r0.next_batch().unwrap(), r1.next_batch().unwrap());
            assert_eq!((a.step, b.step), (whole.step, whole.step));
            let joined: Vec<f32> = a.images.iter().chain(&b.images).copied().collect();
            assert_eq!(joined, whole.images);
            assert_eq!([a.labels, b.labels].concat(), whole.labels);
        }
    }

    #[test]
    fn threaded_loading_matches_inline_loading_and_resumes_exactly() {
        let src = source();
        let mut inline = Loader::new(Arc::clone(&src), config(6, 0, 1, 0), 0);
        let all: Vec<Batch> = (0..7).map(|_| inline.next_batch().unwrap()).collect();
        let mut threaded = Loader::new(Arc::clone(&src), config(6, 0, 1, 3), 0);
        for expected in &all {
            assert_eq!(threaded.next_batch().unwrap().images, expected.images);
        }
        let mut resumed = Loader::new(src, config(6, 0, 1, 2), 4);
        for expected in &all[4..] {
            let got = resumed.next_batch().unwrap();
            assert_eq!((got.step, &got.images), (expected.step, &expected.images));
        }
    }

    #[test]
    fn batch_tensor_has_nchw_shape() {
        let mut loader = Loader::new(source(), config(3, 0, 1, 0), 0);
        let t = loader.next_batch().unwrap().images_tensor(tch::Device::Cpu);
        assert_eq!(t.size(), vec![3, 1, 8, 8]);
    }
}
