//! The run spec: everything that defines one pretraining run, shared by
//! `jepactl`, the coordinator (which validates and stores it) and the
//! trainer (which runs it).
//!
//! A spec is written as TOML (`jepa-worker train --config run.toml`) or
//! carried as the `jepa.v1.RunSpec` protobuf message. Unknown keys are
//! rejected, every section has defaults that suit one CPU machine, and
//! [`RunSpec::validate`] names the offending field and its allowed range.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Format version of [`RunSpec`]; bumped on any incompatible change.
pub const SPEC_VERSION: u32 = 1;

/// Errors of loading or validating a spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A field holds a value outside its allowed range.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted path of the field, e.g. `mask.context_scale`.
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The text is not valid TOML for a spec (syntax, type or unknown key).
    #[error("invalid run spec: {0}")]
    Parse(String),
    /// The spec file could not be read.
    #[error("failed to read run spec {path}: {source}")]
    Io {
        /// The file that was read.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl SpecError {
    /// Returns the dotted field path for [`SpecError::Invalid`].
    pub fn field(&self) -> Option<&str> {
        match self {
            SpecError::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid { field: field.to_string(), message: message.into() }
}

/// One pretraining run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunSpec {
    /// Format version; must equal [`SPEC_VERSION`].
    pub version: u32,
    /// Human-readable name: 1 to 128 characters of `[A-Za-z0-9._-]`.
    pub name: String,
    /// Seed of weights, data order, augmentation and masks.
    pub seed: u64,
    /// Scheduling priority; higher runs first.
    pub priority: i32,
    /// How often a failed attempt is restarted before the run fails.
    pub max_restarts: u32,
    /// The encoders and the predictor.
    pub model: ModelSpec,
    /// The multi-block mask sampler.
    pub mask: MaskSpec,
    /// EC-IJEPA conditioning, or none for I-JEPA.
    pub conditioning: ConditioningSpec,
    /// Optimiser and schedules.
    pub optim: OptimSpec,
    /// Data set and loading.
    pub data: DataSpec,
    /// Length of the run and the cadence of logs, checkpoints, evaluation.
    pub schedule: ScheduleSpec,
    /// Linear-probe evaluation.
    pub eval: EvalSpec,
    /// Device and number of ranks.
    pub resources: ResourceSpec,
}

impl Default for RunSpec {
    fn default() -> Self {
        RunSpec {
            version: SPEC_VERSION,
            name: "run".to_string(),
            seed: 0,
            priority: 0,
            max_restarts: 2,
            model: ModelSpec::default(),
            mask: MaskSpec::default(),
            conditioning: ConditioningSpec::default(),
            optim: OptimSpec::default(),
            data: DataSpec::default(),
            schedule: ScheduleSpec::default(),
            eval: EvalSpec::default(),
            resources: ResourceSpec::default(),
        }
    }
}

/// Size of the ViT encoders and of the predictor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSpec {
    /// `tiny`, `small`, `base`, `large`, `huge`, `giant` or `custom`. A named
    /// preset fixes the five size fields below.
    pub preset: String,
    /// Side of the square input image in pixels.
    pub image_size: u32,
    /// Side of a square patch in pixels; divides `image_size`.
    pub patch_size: u32,
    /// Input channels: 1 (grey) or 3 (RGB).
    pub in_channels: u32,
    /// Encoder width D.
    pub embed_dim: u32,
    /// Encoder blocks.
    pub depth: u32,
    /// Attention heads of encoder and predictor.
    pub num_heads: u32,
    /// Predictor blocks.
    pub pred_depth: u32,
    /// Predictor width.
    pub pred_dim: u32,
}

/// Sizes of the named presets: (name, D, depth, heads, predictor depth,
/// predictor width), as in the I-JEPA configurations.
pub const PRESETS: [(&str, u32, u32, u32, u32, u32); 6] = [
    ("tiny", 192, 12, 3, 6, 192),
    ("small", 384, 12, 6, 6, 384),
    ("base", 768, 12, 12, 6, 384),
    ("large", 1024, 24, 16, 12, 384),
    ("huge", 1280, 32, 16, 12, 384),
    ("giant", 1408, 40, 16, 16, 384),
];

impl Default for ModelSpec {
    /// A small custom model that trains on Fashion-MNIST on two CPU cores.
    fn default() -> Self {
        ModelSpec {
            preset: "custom".to_string(),
            image_size: 28,
            patch_size: 4,
            in_channels: 1,
            embed_dim: 96,
            depth: 4,
            num_heads: 4,
            pred_depth: 2,
            pred_dim: 64,
        }
    }
}

impl ModelSpec {
    /// Returns this spec with the sizes of the named preset filled in.
    ///
    /// # Errors
    ///
    /// Fails when `name` is not a preset.
    pub fn with_preset(mut self, name: &str) -> Result<Self, SpecError> {
        if name == "custom" {
            self.preset = name.to_string();
            return Ok(self);
        }
        let Some(&(_, d, depth, heads, pd, pw)) = PRESETS.iter().find(|p| p.0 == name) else {
            return Err(invalid("model.preset", preset_names_message(name)));
        };
        self.preset = name.to_string();
        (self.embed_dim, self.depth, self.num_heads, self.pred_depth, self.pred_dim) =
            (d, depth, heads, pd, pw);
        Ok(self)
    }

    /// Side of the patch grid (`image_size / patch_size`).
    pub fn grid(&self) -> u32 {
        self.image_size / self.patch_size.max(1)
    }

    fn validate(&self) -> Result<(), SpecError> {
        if self.preset != "custom" {
            let Some(&(_, d, depth, heads, pd, pw)) = PRESETS.iter().find(|p| p.0 == self.preset)
            else {
                return Err(invalid("model.preset", preset_names_message(&self.preset)));
            };
            let fixed = [
                ("model.embed_dim", self.embed_dim, d),
                ("model.depth", self.depth, depth),
                ("model.num_heads", self.num_heads, heads),
                ("model.pred_depth", self.pred_depth, pd),
                ("model.pred_dim", self.pred_dim, pw),
            ];
            for (field, got, want) in fixed {
                if got != want {
                    return Err(invalid(
                        field,
                        format!(
                            "is {got} but preset {} fixes it to {want}; use preset \"custom\" \
                             for other sizes",
                            self.preset
                        ),
                    ));
                }
            }
        }
        in_range("model.image_size", self.image_size, 8, 4096)?;
        in_range("model.patch_size", self.patch_size, 1, self.image_size)?;
        if self.image_size % self.patch_size != 0 {
            return Err(invalid(
                "model.patch_size",
                format!("{} does not divide model.image_size {}", self.patch_size, self.image_size),
            ));
        }
        if self.grid() < 2 {
            return Err(invalid("model.patch_size", "leaves a patch grid smaller than 2 x 2"));
        }
        if self.in_channels != 1 && self.in_channels != 3 {
            return Err(invalid(
                "model.in_channels",
                format!("is {}; allowed: 1 or 3", self.in_channels),
            ));
        }
        in_range("model.num_heads", self.num_heads, 1, 64)?;
        in_range("model.depth", self.depth, 1, 64)?;
        in_range("model.pred_depth", self.pred_depth, 1, 64)?;
        for (field, width) in
            [("model.embed_dim", self.embed_dim), ("model.pred_dim", self.pred_dim)]
        {
            in_range(field, width, 4, 8192)?;
            // The 2-D sin-cos table splits the width in four equal parts.
            if width % 4 != 0 || width % self.num_heads != 0 {
                return Err(invalid(
                    field,
                    format!(
                        "{width} must be a multiple of 4 and of model.num_heads ({})",
                        self.num_heads
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn preset_names_message(name: &str) -> String {
    let names: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
    format!("unknown preset {name:?}; allowed: {}, custom", names.join(", "))
}

/// Which multi-block sampler to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MaskMode {
    /// Reproduces the public I-JEPA sampler, faults included.
    #[default]
    Faithful,
    /// Corrects the known faults of that sampler.
    Fixed,
}

/// Multi-block mask settings (METHOD.md section 3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskSpec {
    /// Sampler variant.
    pub mode: MaskMode,
    /// Target blocks per image, M.
    pub num_targets: u32,
    /// Share of the grid one target block covers, `[low, high]`.
    pub target_scale: [f64; 2],
    /// Height/width ratio of a target block, `[low, high]`.
    pub target_aspect: [f64; 2],
    /// Share of the grid the context block covers, `[low, high]`.
    pub context_scale: [f64; 2],
    /// Height/width ratio of the context block, `[low, high]`.
    pub context_aspect: [f64; 2],
    /// A block must hold more than this many patches.
    pub min_keep: u32,
}

impl Default for MaskSpec {
    /// I-JEPA's ranges, with `min_keep` lowered to suit the 7 x 7 grid of
    /// the default model (a 0.15 target block there holds 7 patches).
    fn default() -> Self {
        MaskSpec {
            mode: MaskMode::Faithful,
            num_targets: 4,
            target_scale: [0.15, 0.2],
            target_aspect: [0.75, 1.5],
            context_scale: [0.85, 1.0],
            context_aspect: [1.0, 1.0],
            min_keep: 4,
        }
    }
}

impl MaskSpec {
    fn validate(&self, grid: u32) -> Result<(), SpecError> {
        in_range("mask.num_targets", self.num_targets, 1, 16)?;
        unit_range("mask.target_scale", self.target_scale)?;
        unit_range("mask.context_scale", self.context_scale)?;
        positive_range("mask.target_aspect", self.target_aspect)?;
        positive_range("mask.context_aspect", self.context_aspect)?;
        let patches = f64::from(grid * grid);
        let largest_target = (patches * self.target_scale[1]).floor();
        if largest_target <= f64::from(self.min_keep) {
            return Err(invalid(
                "mask.min_keep",
                format!(
                    "is {} but the largest target block holds at most {largest_target} of the \
                     {grid} x {grid} grid's patches; lower mask.min_keep below that or raise \
                     mask.target_scale",
                    self.min_keep
                ),
            ));
        }
        Ok(())
    }
}

/// Whether the encoders are conditioned on the other window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Conditioning {
    /// Plain I-JEPA.
    None,
    /// EC-IJEPA: encoders see position tokens of the other window.
    #[default]
    Ec,
}

/// What a conditioning token holds besides its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CondToken {
    /// A learned vector `c` plus the position embedding.
    #[default]
    Learned,
    /// The position embedding alone (`c = 0`).
    Position,
}

/// EC-IJEPA conditioning (METHOD.md section 2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConditioningSpec {
    /// `none` (I-JEPA) or `ec`.
    pub kind: Conditioning,
    /// Learned token or position only.
    pub token: CondToken,
    /// Side of the pooling window over the grid.
    pub kernel: u32,
    /// Stride of the pooling window.
    pub stride: u32,
}

impl Default for ConditioningSpec {
    fn default() -> Self {
        ConditioningSpec { kind: Conditioning::Ec, token: CondToken::Learned, kernel: 1, stride: 1 }
    }
}

/// Optimiser and schedules (METHOD.md section 5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSpec {
    /// Images per step on each rank.
    pub batch_size: u32,
    /// Peak learning rate, reached at the end of warm-up.
    pub lr: f64,
    /// Learning rate at step 0.
    pub start_lr: f64,
    /// Learning rate at the last step (cosine decay).
    pub final_lr: f64,
    /// Steps of linear warm-up.
    pub warmup_steps: u64,
    /// Weight decay at the first and the last step.
    pub weight_decay: [f64; 2],
    /// EMA momentum of the target encoder at the first and the last step.
    pub ema: [f64; 2],
    /// Maximum gradient norm; 0 turns clipping off.
    pub grad_clip: f64,
}

impl Default for OptimSpec {
    fn default() -> Self {
        OptimSpec {
            batch_size: 64,
            lr: 1e-3,
            start_lr: 1e-4,
            final_lr: 1e-6,
            warmup_steps: 150,
            weight_decay: [0.04, 0.4],
            ema: [0.996, 1.0],
            grad_clip: 0.0,
        }
    }
}

/// Where training images come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// Fashion-MNIST IDX files (Debian's `dataset-fashion-mnist` by default).
    #[default]
    FashionMnist,
    /// MNIST IDX files.
    Mnist,
    /// One folder per class of JPEG/PNG files, with `train/` and `val/` (or
    /// `test/`) splits.
    ImageFolder,
    /// Deterministic generated images, for tests.
    Synthetic,
}

/// Data set and loading.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSpec {
    /// The data set.
    pub dataset: DatasetKind,
    /// Folder of the data set; required for `image_folder`, optional for the
    /// IDX sets (which have a default location).
    pub path: Option<String>,
    /// Loader threads.
    pub num_workers: u32,
    /// Batches prepared ahead of the training step.
    pub prefetch: u32,
    /// Area range of random-resized-crop, `[low, high]`.
    pub crop_scale: [f64; 2],
}

impl Default for DataSpec {
    fn default() -> Self {
        DataSpec {
            dataset: DatasetKind::FashionMnist,
            path: None,
            num_workers: 1,
            prefetch: 4,
            crop_scale: [0.3, 1.0],
        }
    }
}

/// Length of the run and the cadence of its side work.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSpec {
    /// Optimiser steps of the whole run.
    pub steps: u64,
    /// Steps between metric lines.
    pub log_every: u64,
    /// Steps between checkpoints; 0 writes only the final one.
    pub checkpoint_every: u64,
    /// Steps between linear-probe evaluations; 0 evaluates only at the end.
    pub eval_every: u64,
    /// Steps between RankMe measurements; 0 turns them off.
    pub rankme_every: u64,
}

impl Default for ScheduleSpec {
    fn default() -> Self {
        ScheduleSpec {
            steps: 3000,
            log_every: 10,
            checkpoint_every: 100,
            eval_every: 0,
            rankme_every: 50,
        }
    }
}

/// Linear-probe evaluation (METHOD.md section 6).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSpec {
    /// Whether to probe at the end of training.
    pub enabled: bool,
    /// Passes of the probe over its training features.
    pub probe_epochs: u32,
    /// Learning rate of the probe.
    pub probe_lr: f64,
    /// Kernel of the pooled probe; 0 runs only the average-pooled probe.
    pub pooled_kernel: u32,
    /// Stride of the pooled probe.
    pub pooled_stride: u32,
    /// Training images used by the probe; 0 uses the whole split.
    pub max_train: u32,
    /// Test images scored; 0 uses the whole split.
    pub max_test: u32,
}

impl Default for EvalSpec {
    fn default() -> Self {
        EvalSpec {
            enabled: true,
            probe_epochs: 20,
            probe_lr: 1e-3,
            pooled_kernel: 0,
            pooled_stride: 1,
            max_train: 10_000,
            max_test: 2_000,
        }
    }
}

/// Where the run trains.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourceSpec {
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// GPUs in all: one per rank on CUDA, 0 on CPU.
    pub gpus: u32,
    /// Data-parallel ranks in all.
    pub ranks: u32,
    /// Hosts the ranks are spread over; divides `ranks`.
    pub hosts: u32,
}

impl Default for ResourceSpec {
    fn default() -> Self {
        ResourceSpec { device: "cpu".to_string(), gpus: 0, ranks: 1, hosts: 1 }
    }
}

impl ResourceSpec {
    /// Whether the run trains on CUDA devices.
    pub fn is_cuda(&self) -> bool {
        self.device == "cuda" || self.device.starts_with("cuda:")
    }

    fn validate(&self) -> Result<(), SpecError> {
        let device_ok = self.device == "cpu"
            || self.device == "cuda"
            || self.device.strip_prefix("cuda:").is_some_and(|n| n.parse::<u32>().is_ok());
        if !device_ok {
            return Err(invalid(
                "resources.device",
                format!("is {:?}; allowed: cpu, cuda, cuda:N", self.device),
            ));
        }
        in_range("resources.ranks", self.ranks, 1, 4096)?;
        in_range("resources.hosts", self.hosts, 1, self.ranks)?;
        if self.ranks % self.hosts != 0 {
            return Err(invalid(
                "resources.hosts",
                format!("{} does not divide resources.ranks {}", self.hosts, self.ranks),
            ));
        }
        let wanted_gpus = if self.is_cuda() { self.ranks } else { 0 };
        if self.gpus != wanted_gpus {
            return Err(invalid(
                "resources.gpus",
                format!(
                    "is {} but device {} with {} rank(s) needs {wanted_gpus}",
                    self.gpus, self.device, self.ranks
                ),
            ));
        }
        Ok(())
    }
}

impl RunSpec {
    /// Parses a spec from TOML text; missing keys take their defaults.
    ///
    /// # Errors
    ///
    /// Fails on bad syntax, a wrong type or an unknown key. The result is
    /// not validated; call [`RunSpec::validate`].
    pub fn from_toml_str(text: &str) -> Result<Self, SpecError> {
        toml::from_str(text).map_err(|err| SpecError::Parse(err.to_string()))
    }

    /// Reads and parses a spec file.
    ///
    /// # Errors
    ///
    /// Fails when the file cannot be read or parsed.
    pub fn from_file(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| SpecError::Io { path: path.display().to_string(), source })?;
        Self::from_toml_str(&text)
    }

    /// Writes the spec as TOML, every field explicit.
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("a run spec always serialises to TOML")
    }

    /// Returns a stable 64-bit FNV-1a hash of the canonical TOML form, as
    /// lowercase hex; checkpoints record it so a resume with another spec
    /// is caught.
    pub fn spec_hash(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.to_toml_string().bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{hash:016x}")
    }

    /// Checks every field, returning the first one out of range.
    ///
    /// # Errors
    ///
    /// [`SpecError::Invalid`] naming the field and its allowed range.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.version != SPEC_VERSION {
            return Err(invalid(
                "version",
                format!("is {}; this build reads version {SPEC_VERSION}", self.version),
            ));
        }
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 128
            && self.name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !name_ok {
            return Err(invalid(
                "name",
                format!("{:?} must be 1 to 128 characters of A-Z a-z 0-9 . _ -", self.name),
            ));
        }
        in_range("max_restarts", self.max_restarts, 0, 100)?;
        self.model.validate()?;
        self.mask.validate(self.model.grid())?;
        self.validate_conditioning()?;
        self.validate_optim()?;
        self.validate_data()?;
        self.validate_schedule()?;
        self.validate_eval()?;
        self.resources.validate()
    }

    fn validate_conditioning(&self) -> Result<(), SpecError> {
        let grid = self.model.grid();
        in_range("conditioning.kernel", self.conditioning.kernel, 1, grid)?;
        in_range("conditioning.stride", self.conditioning.stride, 1, grid)
    }

    fn validate_optim(&self) -> Result<(), SpecError> {
        let o = &self.optim;
        in_range("optim.batch_size", o.batch_size, 1, 65_536)?;
        finite_in("optim.lr", o.lr, f64::MIN_POSITIVE, 10.0)?;
        finite_in("optim.start_lr", o.start_lr, 0.0, 10.0)?;
        finite_in("optim.final_lr", o.final_lr, 0.0, 10.0)?;
        if o.warmup_steps > self.schedule.steps {
            return Err(invalid(
                "optim.warmup_steps",
                format!(
                    "{} exceeds schedule.steps {}; allowed: 0 to schedule.steps",
                    o.warmup_steps, self.schedule.steps
                ),
            ));
        }
        for (i, wd) in o.weight_decay.iter().enumerate() {
            finite_in(&format!("optim.weight_decay[{i}]"), *wd, 0.0, 10.0)?;
        }
        ordered("optim.ema", o.ema, 0.0, 1.0)?;
        finite_in("optim.grad_clip", o.grad_clip, 0.0, 1e6)
    }

    fn validate_data(&self) -> Result<(), SpecError> {
        let d = &self.data;
        if d.dataset == DatasetKind::ImageFolder && d.path.as_deref().is_none_or(str::is_empty) {
            return Err(invalid("data.path", "is required when data.dataset is image_folder"));
        }
        in_range("data.num_workers", d.num_workers, 0, 64)?;
        in_range("data.prefetch", d.prefetch, 1, 64)?;
        unit_range("data.crop_scale", d.crop_scale)
    }

    fn validate_schedule(&self) -> Result<(), SpecError> {
        let s = &self.schedule;
        in_range("schedule.steps", s.steps, 1, 1_000_000_000)?;
        in_range("schedule.log_every", s.log_every, 1, s.steps.max(1))?;
        Ok(())
    }

    fn validate_eval(&self) -> Result<(), SpecError> {
        let e = &self.eval;
        in_range("eval.probe_epochs", e.probe_epochs, 1, 1000)?;
        finite_in("eval.probe_lr", e.probe_lr, f64::MIN_POSITIVE, 10.0)?;
        in_range("eval.pooled_kernel", e.pooled_kernel, 0, self.model.grid())?;
        in_range("eval.pooled_stride", e.pooled_stride, 1, self.model.grid())
    }
}

fn in_range<T: PartialOrd + fmt::Display + Copy>(
    field: &str,
    value: T,
    low: T,
    high: T,
) -> Result<(), SpecError> {
    if value < low || value > high {
        return Err(invalid(field, format!("is {value}; allowed: {low} to {high}")));
    }
    Ok(())
}

fn finite_in(field: &str, value: f64, low: f64, high: f64) -> Result<(), SpecError> {
    if !value.is_finite() || value < low || value > high {
        let low = if low == f64::MIN_POSITIVE { "above 0".to_string() } else { low.to_string() };
        return Err(invalid(field, format!("is {value}; allowed: {low} to {high}")));
    }
    Ok(())
}

/// Checks `[low, high]` with `min <= low <= high <= max`.
fn ordered(field: &str, range: [f64; 2], min: f64, max: f64) -> Result<(), SpecError> {
    let [low, high] = range;
    if !(low.is_finite() && high.is_finite()) || low < min || high > max {
        return Err(invalid(
            field,
            format!("is [{low}, {high}]; both ends must lie in [{min}, {max}]"),
        ));
    }
    if low > high {
        return Err(invalid(
            field,
            format!("is [{low}, {high}]; the low end exceeds the high end"),
        ));
    }
    Ok(())
}

/// Checks a share range: both ends in (0, 1], low <= high.
fn unit_range(field: &str, range: [f64; 2]) -> Result<(), SpecError> {
    let [low, high] = range;
    if !(low > 0.0 && high <= 1.0) {
        return Err(invalid(field, format!("is [{low}, {high}]; both ends must lie in (0, 1]")));
    }
    ordered(field, range, 0.0, 1.0)
}

/// Checks a ratio range: both ends above 0 and finite, low <= high.
fn positive_range(field: &str, range: [f64; 2]) -> Result<(), SpecError> {
    let [low, high] = range;
    if !(low > 0.0 && high.is_finite()) {
        return Err(invalid(field, format!("is [{low}, {high}]; both ends must be above 0")));
    }
    ordered(field, range, 0.0, f64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_spec_is_valid_and_round_trips_through_toml() {
        let spec = RunSpec::default();
        spec.validate().unwrap();
        let back = RunSpec::from_toml_str(&spec.to_toml_string()).unwrap();
        assert_eq!(back, spec);
        assert_eq!(back.spec_hash(), spec.spec_hash());
    }

    #[test]
    fn the_example_spec_holds_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/run.toml");
        assert_eq!(RunSpec::from_file(&path).unwrap(), RunSpec::default());
    }

    #[test]
    fn partial_toml_takes_defaults_for_the_rest() {
        let spec =
            RunSpec::from_toml_str("name = \"x\"\n[mask]\ncontext_scale = [0.4, 1.0]\n").unwrap();
        assert_eq!(spec.mask.context_scale, [0.4, 1.0]);
        assert_eq!(spec.mask.target_scale, MaskSpec::default().target_scale);
        assert_eq!(spec.name, "x");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = RunSpec::from_toml_str("[mask]\ncontext_scal = [0.4, 1.0]\n").unwrap_err();
        assert!(err.to_string().contains("context_scal"), "{err}");
    }

    #[test]
    fn presets_fill_and_fix_their_sizes() {
        let model =
            ModelSpec { image_size: 224, patch_size: 16, in_channels: 3, ..Default::default() }
                .with_preset("base")
                .unwrap();
        assert_eq!((model.embed_dim, model.depth, model.num_heads), (768, 12, 12));
        let mut spec = RunSpec { model, ..Default::default() };
        spec.mask.min_keep = 10;
        spec.validate().unwrap();
        spec.model.depth = 6;
        assert_eq!(spec.validate().unwrap_err().field(), Some("model.depth"));
    }

    #[test]
    fn bad_values_name_their_field() {
        type Mutation = Box<dyn Fn(&mut RunSpec)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("mask.context_scale", Box::new(|s| s.mask.context_scale = [0.9, 0.4])),
            ("mask.context_scale", Box::new(|s| s.mask.context_scale = [0.0, 1.0])),
            ("mask.target_scale", Box::new(|s| s.mask.target_scale = [0.1, 1.5])),
            ("mask.min_keep", Box::new(|s| s.mask.min_keep = 10)),
            ("model.patch_size", Box::new(|s| s.model.patch_size = 5)),
            ("model.embed_dim", Box::new(|s| s.model.embed_dim = 90)),
            ("optim.lr", Box::new(|s| s.optim.lr = f64::NAN)),
            ("optim.ema", Box::new(|s| s.optim.ema = [1.0, 0.99])),
            ("data.path", Box::new(|s| s.data.dataset = DatasetKind::ImageFolder)),
            ("resources.device", Box::new(|s| s.resources.device = "tpu".into())),
            ("resources.gpus", Box::new(|s| s.resources.device = "cuda".into())),
            ("name", Box::new(|s| s.name = "has space".into())),
            ("optim.warmup_steps", Box::new(|s| s.optim.warmup_steps = 10_000)),
        ];
        for (field, mutate) in cases {
            let mut spec = RunSpec::default();
            mutate(&mut spec);
            let err = spec.validate().unwrap_err();
            assert_eq!(err.field(), Some(field), "{err}");
            assert!(err.to_string().starts_with(field), "{err}");
        }
    }

    #[test]
    fn spec_hash_changes_with_any_field() {
        let a = RunSpec::default();
        let mut b = a.clone();
        b.mask.context_scale = [0.65, 1.0];
        assert_ne!(a.spec_hash(), b.spec_hash());
    }
}
