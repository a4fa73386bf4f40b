//! `jepa-worker bench`: how fast this trainer runs full training steps of a
//! given model size, batch and device, and how much of the accelerator's
//! arithmetic it uses.
//!
//! The bench builds its run spec the way `train` does (preset sizes, the
//! I-JEPA mask ranges, default optimiser), then the model and [`AdamW`]
//! exactly as [`crate::train::Trainer`] builds them, and times the
//! trainer's step: target forward without gradient, context encoder,
//! predictor, loss, backward, gradient all-reduce (one rank), optimiser
//! step, EMA update, and reading the loss back. Images are random and
//! already on the device, and masks are drawn by [`MaskSampler`] before
//! the clock starts, so the figures are those of the step alone, without
//! data loading.
//!
//! `tests/bench/compare.py` runs the same workload (`--workload-out`) in
//! PyTorch eager and prints both throughputs and their ratio;
//! `docs/bench.md` explains the figures.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{bail, Context};
use jepa_common::spec::{self, ModelSpec, RunSpec};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::collective::{Collective, SingleRank};
use crate::masks::{MaskBatch, MaskConfig, MaskSampler};
use crate::model::{EcIjepa, ModelConfig, Precision, TokenCounts};
use crate::runtime;
use crate::train::optim::AdamW;
use crate::train::{cond_config, mask_config, model_config};

/// Dense bf16 peak of one H100 or H200 SXM in TFLOP/s (NVIDIA's figure
/// without sparsity), the default denominator of MFU on CUDA.
pub const DEFAULT_PEAK_TFLOPS: f64 = 989.0;

/// `min_keep` of the public I-JEPA configurations; smaller grids get the
/// largest value below it that their blocks allow.
const IJEPA_MIN_KEEP: usize = 10;

/// Seed stream of the bench's masks, apart from the weights' seed.
const MASK_STREAM: u64 = 0x6265_6e63;

const MIB: f64 = 1024.0 * 1024.0;

/// Whether the bench runs I-JEPA or EC-IJEPA.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchConditioning {
    /// Plain I-JEPA: no conditioning tokens.
    None,
    /// EC-IJEPA with the default conditioning (learned token, k = s = 1).
    Ec,
}

/// Command-line arguments of `jepa-worker bench`.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// Model size: tiny, small, base, large, huge, giant, or custom (the
    /// default run spec's widths, changed with --embed-dim and friends).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Side of the square input image in pixels.
    #[arg(long, default_value_t = 224)]
    pub image_size: u32,
    /// Side of a square patch in pixels.
    #[arg(long, default_value_t = 16)]
    pub patch_size: u32,
    /// Input channels: 1 or 3.
    #[arg(long, default_value_t = 3)]
    pub channels: u32,
    /// Encoder width (custom preset only).
    #[arg(long)]
    pub embed_dim: Option<u32>,
    /// Encoder blocks (custom preset only).
    #[arg(long)]
    pub depth: Option<u32>,
    /// Attention heads (custom preset only).
    #[arg(long)]
    pub heads: Option<u32>,
    /// Predictor blocks (custom preset only).
    #[arg(long)]
    pub pred_depth: Option<u32>,
    /// Predictor width (custom preset only).
    #[arg(long)]
    pub pred_dim: Option<u32>,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    pub batch: u32,
    /// Timed steps.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps before the timed ones (allocator, kernel selection).
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Conditioning: none (I-JEPA) or ec (EC-IJEPA).
    #[arg(long, value_enum, default_value = "ec")]
    pub conditioning: BenchConditioning,
    /// Peak of the device in TFLOP/s for MFU; defaults to 989 (H100/H200
    /// dense bf16) on CUDA, and MFU is left out on CPU unless given.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// libtorch's intra-op CPU threads; libtorch's default (one per
    /// physical core) when not given.
    #[arg(long)]
    pub threads: Option<i32>,
    /// Seed of weights, images and masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Writes the configuration and every step's masks as JSON, for the
    /// PyTorch side of `tests/bench/compare.py`.
    #[arg(long)]
    pub workload_out: Option<PathBuf>,
    /// Prints the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// A bench to run: the run spec it builds from and how to time it.
#[derive(Clone, Debug)]
pub struct BenchPlan {
    /// Model, masks, conditioning and optimiser settings; `optim.batch_size`
    /// is the batch.
    pub spec: RunSpec,
    /// Device of the model and the data.
    pub device: Device,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps before them.
    pub warmup: usize,
    /// Peak TFLOP/s for MFU, if any.
    pub peak_tflops: Option<f64>,
    /// libtorch's intra-op CPU threads, if not its default.
    pub threads: Option<i32>,
    /// Where to write the workload for the PyTorch side.
    pub workload_out: Option<PathBuf>,
}

/// What one bench measured.
#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// Preset name, or `custom`.
    pub preset: String,
    /// Model sizes.
    pub image_size: u32,
    /// Patch side in pixels.
    pub patch_size: u32,
    /// Input channels.
    pub channels: u32,
    /// Encoder width D.
    pub embed_dim: u32,
    /// Encoder blocks.
    pub depth: u32,
    /// Attention heads.
    pub num_heads: u32,
    /// Predictor blocks.
    pub pred_depth: u32,
    /// Predictor width.
    pub pred_dim: u32,
    /// `none` or `ec`.
    pub conditioning: String,
    /// Images per step.
    pub batch: u32,
    /// Timed steps.
    pub steps: usize,
    /// Untimed steps.
    pub warmup: usize,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// `fp32` or `bf16` (matrix products).
    pub precision: String,
    /// libtorch's intra-op CPU threads in this process.
    pub threads: i32,
    /// Trained parameters (context encoder and predictor).
    pub params: i64,
    /// `min_keep` of the masks, fitted to the grid.
    pub min_keep: u32,
    /// Mean wall time of a timed step, in milliseconds.
    pub step_ms_mean: f64,
    /// Median wall time of a timed step.
    pub step_ms_median: f64,
    /// Fastest timed step.
    pub step_ms_min: f64,
    /// Slowest timed step.
    pub step_ms_max: f64,
    /// Wall time of every timed step, in order.
    pub step_times_ms: Vec<f64>,
    /// Images per second over the timed steps.
    pub images_per_s: f64,
    /// Model FLOPs of a timed step, averaged ([`step_flops`]).
    pub flops_per_step: f64,
    /// Model FLOPs per second over the timed steps, in TFLOP/s.
    pub achieved_tflops: f64,
    /// The peak MFU is measured against, in TFLOP/s.
    pub peak_tflops: Option<f64>,
    /// Achieved over peak, in [0, 1].
    pub mfu: Option<f64>,
    /// Peak device memory the bench added on CUDA, in MiB
    /// ([`cuda_memory_in_use`]).
    pub peak_memory_mib: Option<f64>,
    /// Loss of the first step, before any update; the PyTorch side must
    /// reproduce it from the same weights, images and masks.
    pub first_loss: f64,
    /// Loss of the last step.
    pub last_loss: f64,
}

/// Returns the forward FLOPs of one pre-norm ViT block of width `d` over a
/// sequence of `n` tokens: `24 n d^2 + 4 n^2 d`.
///
/// One multiply-add counts as two FLOPs. The linear layers give `24 n d^2`
/// (qkv `6`, output projection `2`, MLP `8 + 8` with hidden width `4d`);
/// attention gives `4 n^2 d` (`Q K^T` and the product with `V`, `2 n^2 d`
/// each, summed over heads). Norms, softmax, GELU and residual additions
/// are left out, as is usual for model FLOPs.
pub fn block_flops(n: f64, d: f64) -> f64 {
    24.0 * n * d * d + 4.0 * n * n * d
}

/// Model FLOPs of one training step, forward passes split by network.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct StepFlops {
    /// Target encoder forward (no backward runs through it).
    pub target_forward: f64,
    /// Context encoder forward.
    pub context_forward: f64,
    /// Predictor forward.
    pub predictor_forward: f64,
}

impl StepFlops {
    /// Returns the FLOPs of the whole step: `1x` the target forward plus
    /// `3x` the forward of context encoder and predictor (backward costs
    /// twice the forward: gradients with respect to inputs and weights).
    pub fn total(&self) -> f64 {
        self.target_forward + 3.0 * (self.context_forward + self.predictor_forward)
    }
}

/// Returns the model FLOPs of one step on `masks`, whose sequence lengths
/// per image are `counts` (from [`EcIjepa::token_counts`]).
///
/// Per image, with N patches, patch input `C p^2`, width D, predictor
/// width Dp, M target blocks of Nt patches and Nc context patches:
///
/// - patch embedding `2 N C p^2 D` in each encoder (the context encoder
///   embeds every patch before it keeps the context ones);
/// - target encoder: `depth` blocks over `counts.target` tokens (N plus the
///   EC tokens of the context);
/// - context encoder: `depth` blocks over `counts.context` tokens (Nc plus
///   the EC tokens of the target union);
/// - predictor: embedding `2 Nc D Dp`, then for each of the M blocks
///   `pred_depth` blocks of width Dp over `Nc + Nt` tokens and the
///   projection `2 Nt Dp D`.
///
/// Only real tokens count: padding that batches EC tokens of different
/// counts is computed by the device but is not model work.
pub fn step_flops(config: &ModelConfig, masks: &MaskBatch, counts: &TokenCounts) -> StepFlops {
    let (d, dp) = (config.embed_dim as f64, config.pred_dim as f64);
    let patch_in = (config.in_channels * config.patch_size * config.patch_size) as f64;
    let patch_embed = 2.0 * config.num_patches() as f64 * patch_in * d;
    let (depth, pred_depth) = (config.depth as f64, config.pred_depth as f64);
    let (nc, nt) = (masks.context_len() as f64, masks.target_len() as f64);
    let m = masks.num_targets() as f64;

    let mut flops = StepFlops { target_forward: 0.0, context_forward: 0.0, predictor_forward: 0.0 };
    for (&target, &context) in counts.target.iter().zip(&counts.context) {
        flops.target_forward += patch_embed + depth * block_flops(target as f64, d);
        flops.context_forward += patch_embed + depth * block_flops(context as f64, d);
        let per_block = pred_depth * block_flops(nc + nt, dp) + 2.0 * nt * dp * d;
        flops.predictor_forward += 2.0 * nc * d * dp + m * per_block;
    }
    flops
}

/// Returns the I-JEPA mask settings on a `grid` x `grid` patch grid with
/// the largest `min_keep`, at most I-JEPA's 10, that the sampler accepts.
///
/// # Errors
///
/// Fails when no `min_keep` works (grids too small for the block scales).
pub fn fitted_masks(grid: usize) -> anyhow::Result<MaskConfig> {
    let mut last_error = None;
    for min_keep in (0..=IJEPA_MIN_KEEP).rev() {
        let config = MaskConfig { min_keep, ..MaskConfig::ijepa(grid, grid) };
        match config.validate() {
            Ok(()) => return Ok(config),
            Err(err) => last_error = Some(err),
        }
    }
    let err = last_error.expect("the loop tries at least one min_keep");
    Err(anyhow::Error::new(err).context(format!("no I-JEPA masks fit a {grid} x {grid} grid")))
}

/// Turns command-line arguments into a plan: the run spec with preset
/// sizes, fitted masks and the batch, validated as `train` validates it.
///
/// # Errors
///
/// Fails on an unknown preset, a size that does not fit, a custom size
/// given with a named preset, a grid too small for the masks, or a device
/// that is not usable.
pub fn plan(args: &BenchArgs) -> anyhow::Result<BenchPlan> {
    let mut model = ModelSpec::default().with_preset(&args.preset)?;
    (model.image_size, model.patch_size, model.in_channels) =
        (args.image_size, args.patch_size, args.channels);
    let sizes = [
        (&mut model.embed_dim, args.embed_dim),
        (&mut model.depth, args.depth),
        (&mut model.num_heads, args.heads),
        (&mut model.pred_depth, args.pred_depth),
        (&mut model.pred_dim, args.pred_dim),
    ];
    for (field, value) in sizes {
        if let Some(value) = value {
            *field = value;
        }
    }

    let mut spec = RunSpec { name: "bench".into(), seed: args.seed, model, ..Default::default() };
    spec.conditioning.kind = match args.conditioning {
        BenchConditioning::None => spec::Conditioning::None,
        BenchConditioning::Ec => spec::Conditioning::Ec,
    };
    spec.optim.batch_size = args.batch;
    let (size, patch) = (spec.model.image_size, spec.model.patch_size);
    // An impossible grid is left to validation, which names the field.
    if patch > 0 && size % patch == 0 && spec.model.grid() >= 2 {
        spec.mask.min_keep = fitted_masks(spec.model.grid() as usize)?.min_keep as u32;
    }
    spec.validate().context("invalid bench configuration")?;
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if args.peak_tflops.is_some_and(|p| !(p.is_finite() && p > 0.0)) {
        bail!("--peak-tflops must be a positive number");
    }
    if args.threads.is_some_and(|n| n < 1) {
        bail!("--threads must be at least 1");
    }

    let device = runtime::select_device(&args.device)?;
    let peak_tflops = args.peak_tflops.or(device.is_cuda().then_some(DEFAULT_PEAK_TFLOPS));
    Ok(BenchPlan {
        spec,
        device,
        steps: args.steps,
        warmup: args.warmup,
        peak_tflops,
        threads: args.threads,
        workload_out: args.workload_out.clone(),
    })
}

/// Runs the bench: warm-up steps, then timed steps, and returns what they
/// measured.
///
/// # Errors
///
/// Fails when the model cannot be built, a step fails or gives a
/// non-finite loss, or the workload file cannot be written.
// Limitation: the timed step leaves out mask sampling and the copy of a
// real batch to the device, which the trainer does on its main thread every
// step, so the bench's images/s are an upper bound on a training run's.
pub fn run(plan: &BenchPlan) -> anyhow::Result<BenchReport> {
    let device = plan.device;
    if let Some(threads) = plan.threads {
        tch::set_num_threads(threads);
    }
    // The baseline holds the CUDA context, so the peak counts only what
    // the bench itself allocates.
    let warm = Tensor::zeros([1], (Kind::Float, device));
    synchronize(device);
    let baseline = cuda_memory_in_use(device);
    drop(warm);

    let mut bench = Workload::build(plan)?;
    if let Some(path) = &plan.workload_out {
        write_workload(path, plan, &bench)?;
    }

    let mut measured =
        Measured { times_ms: Vec::new(), flops: 0.0, peak: None, losses: Vec::new() };
    for step in 0..bench.masks.len() {
        let start = Instant::now();
        let loss = bench.step(step, &plan.spec)?;
        synchronize(device);
        let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
        measured.losses.push(loss);
        if step < plan.warmup {
            continue;
        }
        measured.times_ms.push(elapsed_ms);
        let masks = &bench.masks[step];
        let counts = bench.model.token_counts(masks);
        measured.flops += step_flops(bench.model.config(), masks, &counts).total();
        if let (Some(base), Some(now)) = (baseline, cuda_memory_in_use(device)) {
            measured.peak = Some(measured.peak.unwrap_or(0).max(now.saturating_sub(base)));
        }
    }
    Ok(report(plan, &bench, measured))
}

/// Everything a bench step touches, built as the trainer builds it.
struct Workload {
    model: EcIjepa,
    optim: AdamW,
    collective: SingleRank,
    images: Tensor,
    /// Masks of every step, warm-up ones first.
    masks: Vec<MaskBatch>,
    params: i64,
}

impl Workload {
    /// Draws the masks of every step, then builds model, optimiser and a
    /// random image batch from the spec's seed.
    fn build(plan: &BenchPlan) -> anyhow::Result<Self> {
        let spec = &plan.spec;
        let batch = spec.optim.batch_size as usize;
        let sampler = MaskSampler::new(mask_config(spec))?;
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ MASK_STREAM);
        let masks = (0..plan.warmup + plan.steps)
            .map(|step| sampler.sample(step as u64, batch, &mut rng))
            .collect::<Result<Vec<_>, _>>()?;

        tch::manual_seed(spec.seed as i64);
        let model = EcIjepa::new(&model_config(spec), &cond_config(spec), plan.device)?;
        let groups = model.param_groups();
        let optim = AdamW::new(groups.decay, groups.no_decay);
        let params = optim.tensors().iter().map(|t| t.numel() as i64).sum();
        let (c, size) = (i64::from(spec.model.in_channels), i64::from(spec.model.image_size));
        let images = Tensor::randn([batch as i64, c, size, size], (Kind::Float, plan.device));
        Ok(Workload { model, optim, collective: SingleRank, images, masks, params })
    }

    /// One training step in the trainer's order (`Trainer::train_step`,
    /// less data loading and mask sampling) with the schedules' start
    /// values; returns the loss.
    fn step(&mut self, index: usize, spec: &RunSpec) -> anyhow::Result<f64> {
        let o = &spec.optim;
        self.optim.zero_grad();
        let loss = self.model.loss(&self.images, &self.masks[index], true)?;
        loss.backward();
        let grads: Vec<Tensor> = self.optim.tensors().iter().map(|t| t.grad()).collect();
        let defined: Vec<&Tensor> = grads.iter().filter(|g| g.defined()).collect();
        self.collective.all_reduce_mean(&defined)?;
        if o.grad_clip > 0.0 {
            self.optim.clip_grad_norm(o.grad_clip);
        }
        self.optim.step(o.lr, o.weight_decay[0]);
        self.model.ema_update(o.ema[0]);

        let reported = loss.detach().to_kind(Kind::Float);
        self.collective.all_reduce_mean(&[&reported])?;
        let value = reported.double_value(&[]);
        if !value.is_finite() {
            bail!("loss is {value} at bench step {index}");
        }
        Ok(value)
    }
}

/// What the timed steps measured.
struct Measured {
    times_ms: Vec<f64>,
    flops: f64,
    /// Bytes of device memory added, at most, on CUDA.
    peak: Option<u64>,
    /// Losses of every step, warm-up ones included.
    losses: Vec<f64>,
}

fn report(plan: &BenchPlan, bench: &Workload, measured: Measured) -> BenchReport {
    let (spec, m) = (&plan.spec, &plan.spec.model);
    let stats = Timing::of(&measured.times_ms);
    let seconds = stats.total_ms / 1e3;
    let achieved_tflops = measured.flops / seconds / 1e12;
    BenchReport {
        preset: m.preset.clone(),
        image_size: m.image_size,
        patch_size: m.patch_size,
        channels: m.in_channels,
        embed_dim: m.embed_dim,
        depth: m.depth,
        num_heads: m.num_heads,
        pred_depth: m.pred_depth,
        pred_dim: m.pred_dim,
        conditioning: conditioning_name(spec).to_string(),
        batch: spec.optim.batch_size,
        steps: plan.steps,
        warmup: plan.warmup,
        device: device_name(plan.device),
        precision: precision_name(bench.model.precision()).to_string(),
        threads: tch::get_num_threads(),
        params: bench.params,
        min_keep: spec.mask.min_keep,
        step_ms_mean: stats.mean,
        step_ms_median: stats.median,
        step_ms_min: stats.min,
        step_ms_max: stats.max,
        step_times_ms: measured.times_ms,
        images_per_s: f64::from(spec.optim.batch_size) * plan.steps as f64 / seconds,
        flops_per_step: measured.flops / plan.steps as f64,
        achieved_tflops,
        peak_tflops: plan.peak_tflops,
        mfu: plan.peak_tflops.map(|peak| achieved_tflops / peak),
        peak_memory_mib: measured.peak.map(|bytes| bytes as f64 / MIB),
        first_loss: measured.losses[0],
        last_loss: measured.losses[measured.losses.len() - 1],
    }
}

/// Runs `jepa-worker bench` and prints the report, as text or as JSON.
///
/// # Errors
///
/// As [`plan`] and [`run`].
pub fn run_cli(args: &BenchArgs) -> anyhow::Result<()> {
    let plan = plan(args)?;
    let report = run(&plan)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// Summary of step times in milliseconds.
struct Timing {
    total_ms: f64,
    mean: f64,
    median: f64,
    min: f64,
    max: f64,
}

impl Timing {
    fn of(times_ms: &[f64]) -> Self {
        let mut sorted = times_ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        let n = sorted.len();
        let median = match n % 2 {
            1 => sorted[n / 2],
            _ => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
        };
        let total_ms: f64 = sorted.iter().sum();
        Timing { total_ms, mean: total_ms / n as f64, median, min: sorted[0], max: sorted[n - 1] }
    }
}

/// Waits for the device's queued work, so a step's time covers its kernels.
fn synchronize(device: Device) {
    if let Device::Cuda(index) = device {
        tch::Cuda::synchronize(index as i64);
    }
}

fn device_name(device: Device) -> String {
    match device {
        Device::Cuda(index) => format!("cuda:{index}"),
        _ => "cpu".to_string(),
    }
}

fn precision_name(precision: Precision) -> &'static str {
    match precision {
        Precision::Fp32 => "fp32",
        Precision::Bf16 => "bf16",
    }
}

fn conditioning_name(spec: &RunSpec) -> &'static str {
    match spec.conditioning.kind {
        spec::Conditioning::None => "none",
        spec::Conditioning::Ec => "ec",
    }
}

/// Writes what the PyTorch side needs to run the same steps: sizes,
/// conditioning, optimiser constants, threads and every step's masks as
/// JSON at `path`, and the initial weights and the images as safetensors
/// next to it (`<path>.weights.safetensors`, `<path>.images.safetensors`).
fn write_workload(path: &Path, plan: &BenchPlan, bench: &Workload) -> anyhow::Result<()> {
    let file_name = path.file_name().context("--workload-out names no file")?.to_string_lossy();
    let (weights, pixels) =
        (format!("{file_name}.weights.safetensors"), format!("{file_name}.images.safetensors"));
    bench
        .model
        .save(&path.with_file_name(&weights))
        .with_context(|| format!("failed to write the bench weights next to {}", path.display()))?;
    let cpu_images = bench.images.to_device(Device::Cpu);
    Tensor::write_safetensors(&[("images", &cpu_images)], path.with_file_name(&pixels))
        .with_context(|| format!("failed to write the bench images next to {}", path.display()))?;

    let (spec, m) = (&plan.spec, &plan.spec.model);
    let steps: Vec<serde_json::Value> = bench
        .masks
        .iter()
        .map(|b| serde_json::json!({ "context": b.context(), "targets": b.targets() }))
        .collect();
    let workload = serde_json::json!({
        "model": {
            "image_size": m.image_size, "patch_size": m.patch_size, "in_channels": m.in_channels,
            "embed_dim": m.embed_dim, "depth": m.depth, "num_heads": m.num_heads,
            "pred_depth": m.pred_depth, "pred_dim": m.pred_dim,
        },
        "conditioning": {
            "kind": conditioning_name(spec),
            "learned_token": spec.conditioning.token == spec::CondToken::Learned,
            "kernel": spec.conditioning.kernel,
            "stride": spec.conditioning.stride,
        },
        "batch": spec.optim.batch_size,
        "warmup": plan.warmup,
        "steps": plan.steps,
        "seed": spec.seed,
        "lr": spec.optim.lr,
        "weight_decay": spec.optim.weight_decay[0],
        "momentum": spec.optim.ema[0],
        "grad_clip": spec.optim.grad_clip,
        "device": device_name(plan.device),
        "threads": tch::get_num_threads(),
        "weights": weights,
        "images": pixels,
        "masks": steps,
    });
    let text = serde_json::to_string(&workload)?;
    std::fs::write(path, text)
        .with_context(|| format!("failed to write the workload to {}", path.display()))
}

fn print_report(r: &BenchReport) {
    let fmt_opt = |v: Option<f64>, unit: &str| match v {
        Some(v) => format!("{v:.1}{unit}"),
        None => "n/a".to_string(),
    };
    println!(
        "model:        {} ({} px, patch {}, {} channels)",
        r.preset, r.image_size, r.patch_size, r.channels
    );
    println!(
        "widths:       D {}, depth {}, heads {}, predictor {} x {}",
        r.embed_dim, r.depth, r.num_heads, r.pred_depth, r.pred_dim
    );
    println!(
        "conditioning: {}; masks: I-JEPA multi-block, min_keep {}",
        r.conditioning, r.min_keep
    );
    println!("parameters:   {} trained", r.params);
    println!("device:       {} ({}, {} CPU threads)", r.device, r.precision, r.threads);
    println!("batch:        {}; {} timed steps after {} warm-up", r.batch, r.steps, r.warmup);
    println!(
        "step time:    mean {:.1} ms, median {:.1} ms (min {:.1}, max {:.1})",
        r.step_ms_mean, r.step_ms_median, r.step_ms_min, r.step_ms_max
    );
    println!("throughput:   {:.1} images/s", r.images_per_s);
    println!("model FLOPs:  {:.4} TFLOP per step (docs/bench.md)", r.flops_per_step / 1e12);
    println!("achieved:     {:.3} TFLOP/s", r.achieved_tflops);
    match (r.mfu, r.peak_tflops) {
        (Some(mfu), Some(peak)) => println!("MFU:          {:.2} % of {peak} TFLOP/s", 100.0 * mfu),
        _ => println!("MFU:          n/a (no --peak-tflops for this device)"),
    }
    println!("peak memory:  {}", fmt_opt(r.peak_memory_mib, " MiB (CUDA device memory added)"));
    println!("loss:         {:.6} first, {:.6} last", r.first_loss, r.last_loss);
}

/// Returns the bytes in use on a CUDA device (total minus free, from the
/// CUDA runtime's `cudaMemGetInfo`), or `None` on CPU or when the runtime's
/// symbols cannot be found.
// Limitation: tch exposes no statistics of libtorch's caching allocator,
// so peak memory is device-wide usage: it counts the blocks the allocator
// has reserved (like `torch.cuda.max_memory_reserved`, not the smaller
// `max_memory_allocated`), cuBLAS workspaces, and any other process on the
// same GPU; a peak inside a step is seen because the allocator keeps
// freed blocks reserved.
pub fn cuda_memory_in_use(device: Device) -> Option<u64> {
    type GetDevice = unsafe extern "C" fn(*mut i32) -> i32;
    type SetDevice = unsafe extern "C" fn(i32) -> i32;
    type MemGetInfo = unsafe extern "C" fn(*mut usize, *mut usize) -> i32;
    let Device::Cuda(index) = device else {
        return None;
    };
    let library = cuda_runtime()?;
    // SAFETY: the symbols are the CUDA runtime's C API with these exact
    // signatures (cudaError_t is a C enum, int-sized); the pointers passed
    // are to live locals, and the thread's current device is restored.
    unsafe {
        let get_device = library.get::<GetDevice>(b"cudaGetDevice\0").ok()?;
        let set_device = library.get::<SetDevice>(b"cudaSetDevice\0").ok()?;
        let mem_get_info = library.get::<MemGetInfo>(b"cudaMemGetInfo\0").ok()?;
        let mut previous = 0i32;
        if get_device(&mut previous) != 0 || set_device(index as i32) != 0 {
            return None;
        }
        let (mut free, mut total) = (0usize, 0usize);
        let status = mem_get_info(&mut free, &mut total);
        set_device(previous);
        (status == 0).then(|| (total - free) as u64)
    }
}

/// The CUDA runtime libtorch loaded: found in the process's global symbol
/// scope (where [`runtime::load_cuda`] put libtorch_cuda.so and its
/// dependencies), else by its usual sonames.
fn cuda_runtime() -> Option<&'static libloading::os::unix::Library> {
    use libloading::os::unix::{Library, RTLD_NOW};
    static RUNTIME: OnceLock<Option<Library>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            // SAFETY: looking up a symbol runs no code; opening a library
            // that is already loaded returns the loaded instance, and the
            // sonames tried are the CUDA runtime's own.
            let has_symbol =
                |lib: &Library| unsafe { lib.get::<*const ()>(b"cudaMemGetInfo\0") }.is_ok();
            let this = Library::this();
            if has_symbol(&this) {
                return Some(this);
            }
            ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
                .into_iter()
                .filter_map(|name| unsafe { Library::open(Some(name), RTLD_NOW) }.ok())
                .find(has_symbol)
        })
        .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(line: &str) -> BenchArgs {
        Cli::parse_from(std::iter::once("bench").chain(line.split_whitespace())).bench
    }

    /// An 8 px grey model with patch 4 (a 2 x 2 grid), D 8, one block,
    /// predictor width 4.
    fn flops_config() -> ModelConfig {
        ModelConfig {
            image_size: 8,
            patch_size: 4,
            in_channels: 1,
            embed_dim: 8,
            depth: 1,
            num_heads: 2,
            pred_depth: 1,
            pred_dim: 4,
        }
    }

    #[test]
    fn block_flops_follow_the_closed_form() {
        // 24 * 4 * 64 + 4 * 16 * 8
        assert_eq!(block_flops(4.0, 8.0), 6144.0 + 512.0);
    }

    #[test]
    fn step_flops_match_a_hand_computed_case() {
        // One image: context {0, 1}, one target block {3}.
        let masks = MaskBatch::new(2, 2, vec![vec![0, 1]], vec![vec![vec![3]]]).unwrap();
        let counts = TokenCounts { context: vec![2], target: vec![4] };
        let flops = step_flops(&flops_config(), &masks, &counts);
        // Patch embedding 2 * 4 patches * 16 inputs * 8 = 1024 per encoder.
        // Target: 1024 + (24 * 4 * 64 + 4 * 16 * 8) = 1024 + 6656.
        assert_eq!(flops.target_forward, 7680.0);
        // Context: 1024 + (24 * 2 * 64 + 4 * 4 * 8) = 1024 + 3200.
        assert_eq!(flops.context_forward, 4224.0);
        // Predictor: embed 2 * 2 * 8 * 4 = 128; block over 3 tokens at
        // width 4: 24 * 3 * 16 + 4 * 9 * 4 = 1296; projection 2 * 1 * 4 * 8.
        assert_eq!(flops.predictor_forward, 128.0 + 1296.0 + 64.0);
        assert_eq!(flops.total(), 7680.0 + 3.0 * (4224.0 + 1488.0));

        // One EC token more in the context encoder: a block over 3 tokens.
        let ec = TokenCounts { context: vec![3], target: vec![4] };
        let flops = step_flops(&flops_config(), &masks, &ec);
        assert_eq!(flops.context_forward, 1024.0 + 24.0 * 3.0 * 64.0 + 4.0 * 9.0 * 8.0);
    }

    #[test]
    fn masks_keep_ijepa_min_keep_where_the_grid_allows_it() {
        assert_eq!(fitted_masks(14).unwrap().min_keep, 10);
        let small = fitted_masks(7).unwrap();
        assert!(small.min_keep < 10 && small.validate().is_ok(), "{small:?}");
        let too_tight = MaskConfig { min_keep: small.min_keep + 1, ..MaskConfig::ijepa(7, 7) };
        assert!(too_tight.validate().is_err());
    }

    #[test]
    fn named_presets_refuse_custom_widths() {
        let err = plan(&args("--preset tiny --embed-dim 64")).unwrap_err();
        assert!(format!("{err:#}").contains("model.embed_dim"), "{err:#}");
        let plan = plan(&args("--preset custom --image-size 32 --patch-size 4 --embed-dim 64"));
        let plan = plan.unwrap();
        assert_eq!((plan.spec.model.embed_dim, plan.spec.model.grid()), (64, 8));
        assert_eq!(plan.peak_tflops, None, "no MFU on CPU by default");
    }

    #[test]
    fn tiny_custom_bench_reports_positive_finite_figures() {
        let line = "--preset custom --image-size 16 --patch-size 4 --channels 1 --embed-dim 16 \
                    --depth 1 --heads 2 --pred-depth 1 --pred-dim 8 --batch 2 --steps 2 \
                    --warmup 1 --peak-tflops 1";
        let dir = tempfile::tempdir().unwrap();
        let mut plan = plan(&args(line)).unwrap();
        plan.workload_out = Some(dir.path().join("workload.json"));
        let report = run(&plan).unwrap();

        let figures = [
            report.step_ms_mean,
            report.step_ms_median,
            report.step_ms_min,
            report.images_per_s,
            report.flops_per_step,
            report.achieved_tflops,
            report.mfu.unwrap(),
        ];
        assert!(figures.iter().all(|f| f.is_finite() && *f > 0.0), "{report:?}");
        assert!(report.step_ms_min <= report.step_ms_median);
        assert!(report.first_loss.is_finite() && report.last_loss.is_finite());
        assert_eq!((report.steps, report.batch, report.peak_memory_mib), (2, 2, None));
        assert!((report.mfu.unwrap() - report.achieved_tflops).abs() < 1e-12);

        let text = std::fs::read_to_string(dir.path().join("workload.json")).unwrap();
        let workload: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(workload["masks"].as_array().unwrap().len(), 3, "warm-up and timed steps");
        assert_eq!(workload["masks"][0]["targets"].as_array().unwrap().len(), 4);
        let images = dir.path().join("workload.json.images.safetensors");
        let saved = Tensor::read_safetensors(images).unwrap();
        assert_eq!(saved[0].1.size(), [2, 1, 16, 16]);
        assert!(dir.path().join("workload.json.weights.safetensors").exists());
    }
}
