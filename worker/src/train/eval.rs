//! Evaluation of frozen features: the linear probe (average-pooled target
//! encoder features, or the pooled-probe variant with a kernel and stride
//! over the patch grid) and RankMe, the collapse monitor (METHOD.md
//! section 6).

use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::data::augment::{center_square, resize_normalise};
use crate::data::{DataError, SharedSource};
use crate::model::EcIjepa;

/// What the probe reads its features from.
#[derive(Clone, Copy, Debug)]
pub enum Features<'a> {
    /// Normalised pixels, flattened: the floor any encoder should beat.
    Raw,
    /// The target encoder of a model, without conditioning tokens.
    Encoder(&'a EcIjepa),
}

/// How the probe is trained.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// Passes over the training features.
    pub epochs: u32,
    /// Adam learning rate.
    pub lr: f64,
    /// Kernel of the pooled probe over the patch grid; 0 skips it.
    pub pooled_kernel: i64,
    /// Stride of the pooled probe.
    pub pooled_stride: i64,
    /// Training images used; 0 uses all.
    pub max_train: usize,
    /// Test images scored; 0 uses all.
    pub max_test: usize,
    /// Seed of the probe's initialisation and order.
    pub seed: u64,
    /// Model input side.
    pub image_size: usize,
    /// Model input channels.
    pub channels: usize,
}

/// Test top-1 of the probes.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeResult {
    /// Top-1 of the probe on average-pooled features, in [0, 1].
    pub top1: f64,
    /// Top-1 of the pooled probe, when it ran.
    pub pooled_top1: Option<f64>,
    /// Training images used.
    pub train_images: usize,
    /// Test images scored.
    pub test_images: usize,
}

/// Loads images `indices` of `source`, centred and resized, as
/// `[n, C, H, W]`, with their labels.
///
/// # Errors
///
/// Fails when an image cannot be read.
pub fn load_images(
    source: &SharedSource,
    indices: &[usize],
    size: usize,
    channels: usize,
) -> Result<(Tensor, Tensor), DataError> {
    let (mean, std) = source.normalisation(channels);
    let per = channels * size * size;
    let mut pixels = vec![0f32; indices.len() * per];
    let mut labels = Vec::with_capacity(indices.len());
    for (slot, &i) in indices.iter().enumerate() {
        let (image, label) = source.get(i)?;
        let window = center_square(image.height, image.width);
        let out = &mut pixels[slot * per..(slot + 1) * per];
        resize_normalise(&image, window, size, channels, &mean, &std, out);
        labels.push(label);
    }
    let shape = [indices.len() as i64, channels as i64, size as i64, size as i64];
    Ok((Tensor::from_slice(&pixels).view(shape), Tensor::from_slice(&labels)))
}

/// Features of `images` in chunks: `[n, F]` average-pooled (or flattened
/// pixels), and `[n, D, g, g]` patch grids when `grids` is set.
fn features(
    kind: Features<'_>,
    images: &Tensor,
    grids: bool,
) -> Result<(Tensor, Option<Tensor>), crate::model::ModelError> {
    let Features::Encoder(model) = kind else {
        return Ok((images.flatten(1, -1), None));
    };
    let device = model.device();
    let grid = model.config().grid();
    let (mut pooled, mut grid_out) = (Vec::new(), Vec::new());
    for chunk in images.split(256, 0) {
        let h = model.target_features(&chunk.to_device(device))?.to_device(Device::Cpu); // [b, N, D]
        pooled.push(h.mean_dim(1, false, Kind::Float)); // [b, D]
        if grids {
            let (b, d) = (h.size()[0], h.size()[2]);
            grid_out.push(h.transpose(1, 2).reshape([b, d, grid, grid])); // [b, D, g, g]
        }
    }
    let grid_out = grids.then(|| Tensor::cat(&grid_out, 0));
    Ok((Tensor::cat(&pooled, 0), grid_out))
}

/// Trains a linear classifier on standardised training features and
/// returns its top-1 on the test features.
fn fit_linear(
    train: &Tensor,
    train_y: &Tensor,
    test: &Tensor,
    test_y: &Tensor,
    classes: i64,
    cfg: &ProbeConfig,
) -> f64 {
    tch::manual_seed(cfg.seed as i64);
    let mean = train.mean_dim(0, true, Kind::Float);
    let std = train.std_dim(0, true, true) + 1e-6;
    let train = (train - &mean) / &std;
    let test = (test - &mean) / &std;

    let vs = nn::VarStore::new(Device::Cpu);
    let linear = nn::linear(vs.root() / "probe", train.size()[1], classes, Default::default());
    let mut opt = nn::Adam::default().build(&vs, cfg.lr).expect("adam on a fresh store");
    let n = train.size()[0] as usize;
    let mut order: Vec<i64> = (0..n as i64).collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed);
    for _ in 0..cfg.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(256) {
            let idx = Tensor::from_slice(chunk);
            let logits = linear.forward(&train.index_select(0, &idx));
            let loss = logits.cross_entropy_for_logits(&train_y.index_select(0, &idx));
            opt.backward_step(&loss);
        }
    }
    tch::no_grad(|| linear.forward(&test).accuracy_for_logits(test_y).double_value(&[]))
}

/// Runs the probe(s) on `train` and `test` splits.
///
/// # Errors
///
/// Fails when images cannot be read or the model rejects them.
pub fn linear_probe(
    kind: Features<'_>,
    train: &SharedSource,
    test: &SharedSource,
    cfg: &ProbeConfig,
) -> anyhow::Result<ProbeResult> {
    let pick =
        |len: usize, max: usize| (0..if max == 0 { len } else { len.min(max) }).collect::<Vec<_>>();
    let train_idx = pick(train.len(), cfg.max_train);
    let test_idx = pick(test.len(), cfg.max_test);
    let (train_x, train_y) = load_images(train, &train_idx, cfg.image_size, cfg.channels)?;
    let (test_x, test_y) = load_images(test, &test_idx, cfg.image_size, cfg.channels)?;

    let grids = cfg.pooled_kernel > 0 && matches!(kind, Features::Encoder(_));
    let (train_f, train_g) = features(kind, &train_x, grids)?;
    let (test_f, test_g) = features(kind, &test_x, grids)?;
    let classes = train.num_classes().max(test.num_classes()) as i64;
    let top1 = fit_linear(&train_f, &train_y, &test_f, &test_y, classes, cfg);

    let pooled_top1 = match (train_g, test_g) {
        (Some(a), Some(b)) => {
            let pool = |g: &Tensor| {
                let (k, s) = (cfg.pooled_kernel, cfg.pooled_stride);
                g.avg_pool2d([k, k], [s, s], [0, 0], false, true, None::<i64>).flatten(1, -1)
            };
            Some(fit_linear(&pool(&a), &train_y, &pool(&b), &test_y, classes, cfg))
        }
        _ => None,
    };
    Ok(ProbeResult {
        top1,
        pooled_top1,
        train_images: train_idx.len(),
        test_images: test_idx.len(),
    })
}

/// RankMe of a feature matrix `[n, D]`: `exp` of the entropy of its
/// normalised singular values (Garrido et al.); between 1 and min(n, D).
pub fn rankme(features: &Tensor) -> f64 {
    let (_, s, _) = features.to_kind(Kind::Float).to_device(Device::Cpu).svd(true, false);
    let p = &s / (s.sum(Kind::Float) + 1e-7) + 1e-7;
    (-(&p * p.log()).sum(Kind::Float)).exp().double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{open_source, Split};
    use jepa_common::spec::{DataSpec, DatasetKind};

    #[test]
    fn rankme_counts_equal_directions() {
        // Three orthogonal directions of equal strength: effective rank 3.
        let f = Tensor::eye(3, (Kind::Float, Device::Cpu)).pad([0, 5], "constant", 0.0);
        assert!((rankme(&f) - 3.0).abs() < 1e-3, "{}", rankme(&f));
        // One direction only: collapse.
        let collapsed = Tensor::ones([16, 8], (Kind::Float, Device::Cpu));
        assert!((rankme(&collapsed) - 1.0).abs() < 1e-3);
    }

    #[test]
    fn raw_pixel_probe_learns_synthetic_classes() {
        let spec = DataSpec { dataset: DatasetKind::Synthetic, ..Default::default() };
        let train = open_source(&spec, Split::Train, 12, 1).unwrap();
        let test = open_source(&spec, Split::Test, 12, 1).unwrap();
        let cfg = ProbeConfig {
            epochs: 30,
            lr: 1e-2,
            pooled_kernel: 0,
            pooled_stride: 1,
            max_train: 1000,
            max_test: 300,
            seed: 0,
            image_size: 12,
            channels: 1,
        };
        let result = linear_probe(Features::Raw, &train, &test, &cfg).unwrap();
        assert_eq!((result.train_images, result.test_images), (1000, 300));
        // Ten classes: chance is 0.1; the stripes are linearly separable only
        // in part (random phase), so demand clearly better than chance.
        assert!(result.top1 > 0.2, "top-1 {}", result.top1);
        assert!(result.pooled_top1.is_none());
    }
}
