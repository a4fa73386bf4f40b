//! The EC-IJEPA model (METHOD.md sections 1, 2 and 4): context encoder,
//! EMA target encoder, predictor, and the loss that ties them together.
//!
//! The trainer builds one [`EcIjepa`] per rank, gives the optimiser
//! [`EcIjepa::var_store`] (context encoder and predictor only; the target
//! encoder lives in a store of its own), and per step calls
//! [`EcIjepa::loss`] with the images and the [`MaskBatch`] of the batch,
//! then, after the optimiser step, [`EcIjepa::ema_update`]. Evaluation
//! reads [`EcIjepa::target_features`]. Weights move to and from PyTorch
//! through [`EcIjepa::save`] and [`EcIjepa::load`].
//!
//! `Conditioning::None` runs exactly the I-JEPA computation: no
//! conditioning tokens exist, so every sequence holds only patch tokens.

mod conditioning;
pub mod config;
mod io;
pub mod layers;
pub mod objective;
pub mod pos_embed;
pub mod predictor;
pub mod vit;

use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

use crate::masks::MaskBatch;
use conditioning::{token_count, CondTokens};
pub use config::{CondConfig, CondToken, Conditioning, ModelConfig, PRESETS};
use layers::gather_tokens;
pub use layers::{Precision, DECAY_GROUP, NO_DECAY_GROUP};
use objective::{ema_step, smooth_l1, target_layer_norm};
use predictor::Predictor;
use vit::VisionTransformer;

/// Errors of building and running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A configuration field holds an impossible value.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted name of the field, e.g. `model.embed_dim`.
        field: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// Images or masks do not fit the model.
    #[error("invalid input: {0}")]
    Input(String),
    /// A weight file does not match the model.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What does not match.
        message: String,
    },
    /// libtorch reported an error.
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl ModelError {
    pub(crate) fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        ModelError::Invalid { field, message: message.into() }
    }

    /// Returns the field name of [`ModelError::Invalid`].
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ModelError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Everything one forward pass computes.
#[derive(Debug)]
pub struct Outputs {
    /// Context-encoder output at the context positions, `[B, Nc, D]`.
    pub context: Tensor,
    /// Normalised target features, `[M * B, Nt, D]`, f32, no gradient.
    pub targets: Tensor,
    /// Predictor output, `[M * B, Nt, D]`.
    pub predictions: Tensor,
    /// Smooth-L1 loss, a f32 scalar.
    pub loss: Tensor,
}

/// Trainable parameters split by weight decay, each sorted by name.
#[derive(Debug)]
pub struct ParamGroups {
    /// Weights of two or more dimensions (including `mask_token` and
    /// `cond_token`, `[1, 1, D]`, as in the public code).
    pub decay: Vec<(String, Tensor)>,
    /// Biases and 1-D parameters (LayerNorm weights).
    pub no_decay: Vec<(String, Tensor)>,
}

/// Sequence lengths entering the encoders, per image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenCounts {
    /// Context patches plus conditioning tokens of the target union.
    pub context: Vec<usize>,
    /// All patches plus conditioning tokens of the context.
    pub target: Vec<usize>,
}

/// The EC-IJEPA model: context encoder, predictor and target encoder.
#[derive(Debug)]
pub struct EcIjepa {
    config: ModelConfig,
    cond: CondConfig,
    precision: Precision,
    device: Device,
    store: VarStore,
    target_store: VarStore,
    encoder: VisionTransformer,
    predictor: Predictor,
    target_encoder: VisionTransformer,
    /// (target, context) parameter pairs the EMA step walks, by name.
    ema_pairs: Vec<(Tensor, Tensor)>,
}

impl EcIjepa {
    /// Builds the model on `device` with fresh I-JEPA initialisation; the
    /// target encoder starts as a copy of the context encoder. Precision is
    /// [`Precision::Bf16`] on CUDA and [`Precision::Fp32`] elsewhere.
    ///
    /// # Errors
    ///
    /// [`ModelError::Invalid`] naming the first invalid size or
    /// conditioning field.
    pub fn new(
        config: &ModelConfig,
        cond: &CondConfig,
        device: Device,
    ) -> Result<Self, ModelError> {
        config.validate()?;
        cond.validate(config.grid())?;

        let store = VarStore::new(device);
        let encoder = VisionTransformer::new(&(store.root() / "encoder"), config, cond);
        let predictor = Predictor::new(&(store.root() / "predictor"), config);
        let mut target_store = VarStore::new(device);
        let target_encoder =
            VisionTransformer::new(&(target_store.root() / "target_encoder"), config, cond);
        target_store.freeze();

        let targets = target_store.variables();
        let mut ema_pairs = Vec::new();
        let mut sources: Vec<(String, Tensor)> = store.variables().into_iter().collect();
        sources.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, source) in sources.iter().filter(|(n, _)| n.starts_with("encoder.")) {
            let mut target = targets[&format!("target_{name}")].shallow_clone();
            tch::no_grad(|| target.f_copy_(source))?;
            // The fixed position table is copied once but kept out of the
            // EMA, so rounding never moves it.
            if source.requires_grad() {
                ema_pairs.push((target, source.shallow_clone()));
            }
        }

        let precision = if device.is_cuda() { Precision::Bf16 } else { Precision::Fp32 };
        Ok(EcIjepa {
            config: config.clone(),
            cond: cond.clone(),
            precision,
            device,
            store,
            target_store,
            encoder,
            predictor,
            target_encoder,
            ema_pairs,
        })
    }

    /// Returns the model with another forward precision (for example bf16
    /// on a CPU test, or f32 on CUDA for a parity check).
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    /// Returns the sizes.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Returns the conditioning settings.
    pub fn conditioning(&self) -> &CondConfig {
        &self.cond
    }

    /// Returns the forward precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Returns the device holding every variable.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Returns the store of the trained variables (`encoder.*`,
    /// `predictor.*`). Build the optimiser from it; its groups are
    /// [`DECAY_GROUP`] and [`NO_DECAY_GROUP`].
    pub fn var_store(&self) -> &VarStore {
        &self.store
    }

    /// Returns the store of the target encoder (`target_encoder.*`), whose
    /// variables never require gradients.
    pub fn target_var_store(&self) -> &VarStore {
        &self.target_store
    }

    /// Returns the trainable parameters split by weight decay: weights of
    /// two or more dimensions decay; biases and 1-D parameters do not.
    pub fn param_groups(&self) -> ParamGroups {
        let mut all: Vec<(String, Tensor)> =
            self.store.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let (no_decay, decay) =
            all.into_iter().partition(|(name, t)| name.ends_with(".bias") || t.dim() <= 1);
        ParamGroups { decay, no_decay }
    }

    /// Moves the target encoder towards the context encoder:
    /// `target = m * target + (1 - m) * context` for every trainable weight
    /// (the learned `cond_token` included), without gradient.
    pub fn ema_update(&mut self, momentum: f64) {
        for (target, context) in self.ema_pairs.iter_mut() {
            ema_step(target, context, momentum);
        }
    }

    /// Runs target encoder, context encoder and predictor on one batch and
    /// returns every intermediate and the loss. Gradients flow into the
    /// context encoder and the predictor unless called under `no_grad`.
    ///
    /// # Errors
    ///
    /// [`ModelError::Input`] when the images are not `[B, C, H, W]` f32 of
    /// this model's size or the masks do not match the batch and grid.
    pub fn forward(&self, images: &Tensor, masks: &MaskBatch) -> Result<Outputs, ModelError> {
        let images = self.check_images(images)?;
        self.check_masks(&images, masks)?;
        let context_indices = index_tensor(masks.context(), self.device); // [B, Nc]
                                                                          // M x [B, Nt]
        let target_indices: Vec<Tensor> =
            masks.targets().iter().map(|lists| index_tensor(lists, self.device)).collect();

        let targets = tch::no_grad(|| {
            let cond = self.cond.is_ec().then(|| self.cond_tokens(masks.context()));
            let h = self.target_encoder.forward(&images, None, cond.as_ref(), self.precision);
            let h = target_layer_norm(&h); // [B, N, D]
            let blocks: Vec<Tensor> = target_indices.iter().map(|i| gather_tokens(&h, i)).collect();
            Tensor::cat(&blocks, 0) // [M*B, Nt, D]
        });

        let cond = self.cond.is_ec().then(|| {
            let unions: Vec<Vec<i64>> =
                (0..masks.batch_size()).map(|b| masks.target_union(b)).collect();
            self.cond_tokens(&unions)
        });
        let p = self.precision;
        // [B, Nc, D], then [M*B, Nt, D]
        let context = self.encoder.forward(&images, Some(&context_indices), cond.as_ref(), p);
        let predictions = self.predictor.forward(&context, &context_indices, &target_indices, p);
        let loss = smooth_l1(&predictions, &targets);
        Ok(Outputs { context, targets, predictions, loss })
    }

    /// Returns the loss of one batch. With `train` the graph is kept for
    /// `backward`; without it the pass runs under `no_grad`.
    ///
    /// # Errors
    ///
    /// As [`EcIjepa::forward`].
    pub fn loss(
        &self,
        images: &Tensor,
        masks: &MaskBatch,
        train: bool,
    ) -> Result<Tensor, ModelError> {
        if train {
            return Ok(self.forward(images, masks)?.loss);
        }
        tch::no_grad(|| Ok(self.forward(images, masks)?.loss))
    }

    /// Encodes whole images with the target encoder, without conditioning
    /// tokens and without gradient: `[B, N, D]` f32 after the final norm,
    /// ready for average pooling over patches.
    ///
    /// # Errors
    ///
    /// [`ModelError::Input`] when the images do not fit the model.
    pub fn target_features(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        let images = self.check_images(images)?;
        let features =
            tch::no_grad(|| self.target_encoder.forward(&images, None, None, self.precision));
        Ok(features.to_kind(Kind::Float))
    }

    /// Returns the sequence length each encoder sees for each image of the
    /// batch; without conditioning these are the patch counts Nc and N.
    pub fn token_counts(&self, masks: &MaskBatch) -> TokenCounts {
        let (nc, n) = (masks.context_len(), self.config.num_patches() as usize);
        let (h, w) = masks.grid();
        let count = |positions: &[i64]| match self.cond.is_ec() {
            true => token_count(positions, h as i64, w as i64, self.cond.kernel, self.cond.stride),
            false => 0,
        };
        let batch = 0..masks.batch_size();
        TokenCounts {
            context: batch.clone().map(|b| nc + count(&masks.target_union(b))).collect(),
            target: batch.map(|b| n + count(&masks.context()[b])).collect(),
        }
    }

    fn cond_tokens(&self, per_image: &[Vec<i64>]) -> CondTokens {
        let grid = (self.config.grid(), self.config.grid());
        CondTokens::build(per_image, grid, self.cond.kernel, self.cond.stride, self.device)
    }

    /// Checks the image batch and moves it to the model's device.
    fn check_images(&self, images: &Tensor) -> Result<Tensor, ModelError> {
        let c = &self.config;
        let want = [c.in_channels, c.image_size, c.image_size];
        let size = images.size();
        if size.len() != 4 || size[1..] != want || images.kind() != Kind::Float {
            let message =
                format!("images are {:?} {size:?}; expected f32 [B, {want:?}]", images.kind());
            return Err(ModelError::Input(message));
        }
        Ok(images.to_device(self.device))
    }

    fn check_masks(&self, images: &Tensor, masks: &MaskBatch) -> Result<(), ModelError> {
        let grid = self.config.grid() as usize;
        if masks.grid() != (grid, grid) {
            let message =
                format!("masks are for a {:?} grid, the model has {grid} x {grid}", masks.grid());
            return Err(ModelError::Input(message));
        }
        let batch = images.size()[0] as usize;
        if masks.batch_size() != batch {
            let message =
                format!("masks are for {} images, the batch has {batch}", masks.batch_size());
            return Err(ModelError::Input(message));
        }
        Ok(())
    }
}

/// Stacks equal-length index lists into a `[rows, len]` i64 tensor.
fn index_tensor(lists: &[Vec<i64>], device: Device) -> Tensor {
    let flat = lists.concat();
    Tensor::from_slice(&flat).view([lists.len() as i64, -1]).to_device(device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::masks::{MaskConfig, MaskMode, MaskSampler};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// A 16 px RGB model with patch 4: a 4 x 4 grid.
    fn small_config() -> ModelConfig {
        ModelConfig {
            image_size: 16,
            patch_size: 4,
            in_channels: 3,
            embed_dim: 32,
            depth: 2,
            num_heads: 4,
            pred_depth: 2,
            pred_dim: 16,
        }
    }

    fn images(config: &ModelConfig, batch: i64) -> Tensor {
        let size = [batch, config.in_channels, config.image_size, config.image_size];
        Tensor::randn(size, (Kind::Float, Device::Cpu))
    }

    /// Explicit masks on the 4 x 4 grid: image 0's two target blocks
    /// coincide, image 1's do not, so their unions differ in size.
    fn masks() -> MaskBatch {
        let context = vec![vec![0, 1, 4, 5, 8], vec![2, 3, 6, 7, 11]];
        let targets = vec![
            vec![vec![10, 11, 14, 15], vec![0, 1, 4, 5]],
            vec![vec![11, 15, 10, 14], vec![8, 9, 12, 13]],
        ];
        MaskBatch::new(4, 4, context, targets).unwrap()
    }

    fn trainable_count(store: &VarStore) -> i64 {
        store.variables().values().filter(|t| t.requires_grad()).map(|t| t.numel() as i64).sum()
    }

    #[test]
    fn built_models_match_the_closed_form_parameter_counts() {
        let position = CondConfig { token: CondToken::Position, ..CondConfig::ec() };
        let tiny = ModelConfig::preset("tiny", 32, 16, 3).unwrap();
        for config in [small_config(), tiny] {
            for cond in [CondConfig::none(), CondConfig::ec(), position.clone()] {
                let model = EcIjepa::new(&config, &cond, Device::Cpu).unwrap();
                let want = config.encoder_params(&cond) + config.predictor_params();
                assert_eq!(trainable_count(model.var_store()), want, "{cond:?}");
                assert_eq!(trainable_count(model.target_var_store()), 0);
            }
        }
    }

    #[test]
    fn small_presets_produce_the_documented_shapes() {
        for name in ["tiny", "small"] {
            let config = ModelConfig::preset(name, 32, 8, 3).unwrap();
            let model = EcIjepa::new(&config, &CondConfig::ec(), Device::Cpu).unwrap();
            let out = tch::no_grad(|| model.forward(&images(&config, 2), &masks()).unwrap());
            let d = config.embed_dim;
            assert_eq!(out.context.size(), [2, 5, d], "{name}");
            assert_eq!(out.targets.size(), [4, 4, d], "{name}");
            assert_eq!(out.predictions.size(), [4, 4, d], "{name}");
            assert_eq!(out.loss.size(), Vec::<i64>::new());
            let features = model.target_features(&images(&config, 3)).unwrap();
            assert_eq!(features.size(), [3, 16, d], "{name}");
        }
    }

    #[test]
    fn none_sees_only_patch_tokens_and_ec_adds_the_other_window() {
        let config = small_config();
        let position = CondConfig { token: CondToken::Position, ..CondConfig::ec() };
        tch::manual_seed(3);
        let none = EcIjepa::new(&config, &CondConfig::none(), Device::Cpu).unwrap();
        tch::manual_seed(3);
        let ec = EcIjepa::new(&config, &position, Device::Cpu).unwrap();
        let masks = masks();
        assert_eq!(
            none.token_counts(&masks),
            TokenCounts { context: vec![5, 5], target: vec![16, 16] }
        );
        // Image 0's two targets coincide (union 4), image 1's do not (8);
        // both contexts hold 5.
        assert_eq!(
            ec.token_counts(&masks),
            TokenCounts { context: vec![9, 13], target: vec![21, 21] }
        );
        let pooled =
            EcIjepa::new(&config, &CondConfig { kernel: 2, stride: 2, ..position }, Device::Cpu)
                .unwrap();
        // Image 0's union fills window 3 only, image 1's windows 0 and 2.
        assert_eq!(pooled.token_counts(&masks).context, vec![6, 7]);

        // Same weights (position-only tokens add no parameter): the
        // conditioning tokens must change both encoders' outputs.
        let x = images(&config, 2);
        let (a, b) =
            tch::no_grad(|| (none.forward(&x, &masks).unwrap(), ec.forward(&x, &masks).unwrap()));
        let differs = |p: &Tensor, q: &Tensor| (p - q).abs().max().double_value(&[]) > 1e-4;
        assert!(differs(&a.context, &b.context) && differs(&a.targets, &b.targets));
        let (fa, fb) = (none.target_features(&x).unwrap(), ec.target_features(&x).unwrap());
        assert!(fa.equal(&fb), "evaluation features must not depend on conditioning");
    }

    #[test]
    fn padded_conditioning_matches_running_each_image_alone() {
        let config = small_config();
        // k = 2, s = 1: image 0's union touches 4 of the 9 windows, image
        // 1's 6, so the context encoder's batch is padded and masked.
        let cond = CondConfig { kernel: 2, stride: 1, ..CondConfig::ec() };
        let model = EcIjepa::new(&config, &cond, Device::Cpu).unwrap();
        let masks = masks();
        assert_eq!(model.token_counts(&masks).context, vec![9, 11]);
        let x = images(&config, 2);
        let both = tch::no_grad(|| model.forward(&x, &masks).unwrap());
        for b in 0..2usize {
            let alone = MaskBatch::new(
                4,
                4,
                vec![masks.context()[b].clone()],
                masks.targets().iter().map(|m| vec![m[b].clone()]).collect(),
            )
            .unwrap();
            let one = tch::no_grad(|| model.forward(&x.narrow(0, b as i64, 1), &alone).unwrap());
            let diff = (both.context.narrow(0, b as i64, 1) - &one.context).abs().max();
            assert!(diff.double_value(&[]) < 1e-5, "image {b}: {diff}");
            // Row m * B + b of the batch is row m of the single image.
            for m in 0..2i64 {
                let row = both.predictions.narrow(0, m * 2 + b as i64, 1);
                let diff = (row - one.predictions.narrow(0, m, 1)).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "image {b} block {m}: {diff}");
            }
        }
    }

    #[test]
    fn gradients_reach_only_the_context_side() {
        let config = small_config();
        let model = EcIjepa::new(&config, &CondConfig::ec(), Device::Cpu).unwrap();
        let x = images(&config, 2);
        model.loss(&x, &masks(), true).unwrap().backward();
        for (name, t) in model.var_store().variables() {
            let has_grad = t.grad().defined();
            assert_eq!(
                has_grad,
                name != "encoder.pos_embed" && name != "predictor.predictor_pos_embed",
                "{name}"
            );
        }
        for (name, t) in model.target_var_store().variables() {
            assert!(!t.requires_grad() && !t.grad().defined(), "{name}");
        }
        let eval = model.loss(&x, &masks(), false).unwrap();
        assert!(!eval.requires_grad());
    }

    #[test]
    fn bf16_forward_tracks_fp32() {
        let config = small_config();
        tch::manual_seed(5);
        let model = EcIjepa::new(&config, &CondConfig::ec(), Device::Cpu).unwrap();
        let x = images(&config, 2);
        let full = tch::no_grad(|| model.forward(&x, &masks()).unwrap());
        let model = model.with_precision(Precision::Bf16);
        let half = model.forward(&x, &masks()).unwrap();
        assert_eq!(half.predictions.kind(), Kind::BFloat16);
        assert_eq!((half.targets.kind(), half.loss.kind()), (Kind::Float, Kind::Float));
        let (a, b) = (full.loss.double_value(&[]), half.loss.double_value(&[]));
        assert!((a - b).abs() < 0.02 * a, "fp32 {a} vs bf16 {b}");
        half.loss.backward();
        let grads: Vec<Tensor> =
            model.var_store().trainable_variables().iter().map(|t| t.grad()).collect();
        assert!(grads.iter().all(|g| g.defined() && g.kind() == Kind::Float));
    }

    #[test]
    fn ema_update_applies_the_momentum_to_every_trained_weight() {
        let config = small_config();
        let mut model = EcIjepa::new(&config, &CondConfig::ec(), Device::Cpu).unwrap();
        let vars = model.var_store().variables();
        let targets = model.target_var_store().variables();
        tch::no_grad(|| {
            for (name, t) in &vars {
                if name.starts_with("encoder.") && t.requires_grad() {
                    let _ = t.shallow_clone().g_add_scalar_(1.0);
                }
            }
        });
        let before: Vec<(String, Tensor)> =
            targets.iter().map(|(n, t)| (n.clone(), t.detach().copy())).collect();
        model.ema_update(0.9);
        for (name, old) in before {
            let source = &vars[name.strip_prefix("target_").unwrap()];
            let got = &targets[&name];
            if name.ends_with("pos_embed") {
                assert!(got.equal(&old), "{name} moved");
                continue;
            }
            // Both started equal, so the target moved by 0.1 towards +1.
            let diff = (got - (old + 0.1)).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "{name}: {diff}");
            assert!((got - source).abs().max().double_value(&[]) > 0.8, "{name}");
        }
    }

    #[test]
    fn param_groups_follow_the_public_weight_decay_rule() {
        let model = EcIjepa::new(&small_config(), &CondConfig::ec(), Device::Cpu).unwrap();
        let groups = model.param_groups();
        let names =
            |list: &[(String, Tensor)]| list.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let (decay, no_decay) = (names(&groups.decay), names(&groups.no_decay));
        for name in
            ["encoder.blocks.0.attn.qkv.weight", "encoder.cond_token", "predictor.mask_token"]
        {
            assert!(decay.contains(&name.to_string()), "{name}");
        }
        for name in [
            "encoder.norm.weight",
            "encoder.blocks.1.mlp.fc1.bias",
            "predictor.predictor_proj.bias",
        ] {
            assert!(no_decay.contains(&name.to_string()), "{name}");
        }
        assert!(!decay.iter().chain(&no_decay).any(|n| n.ends_with("pos_embed")));
        let total = groups.decay.len() + groups.no_decay.len();
        assert_eq!(total, model.var_store().trainable_variables().len());
    }

    #[test]
    fn mismatched_inputs_are_rejected() {
        let config = small_config();
        let model = EcIjepa::new(&config, &CondConfig::ec(), Device::Cpu).unwrap();
        let wrong = Tensor::zeros([2, 1, 16, 16], (Kind::Float, Device::Cpu));
        assert!(matches!(model.loss(&wrong, &masks(), true), Err(ModelError::Input(_))));
        let sampler = MaskSampler::new(MaskConfig {
            mode: MaskMode::Fixed,
            min_keep: 4,
            ..MaskConfig::ijepa(8, 8)
        })
        .unwrap();
        let other_grid = sampler.sample(0, 2, &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
        let err = model.loss(&images(&config, 2), &other_grid, true).unwrap_err();
        assert!(err.to_string().contains("grid"), "{err}");
        assert!(matches!(
            model.loss(&images(&config, 3), &masks(), true),
            Err(ModelError::Input(_))
        ));
    }
}
