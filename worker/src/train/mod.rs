//! The trainer: one rank of one EC-IJEPA pretraining run. It turns a run
//! spec into a model, data loader, mask sampler and optimiser, and runs the
//! step loop with metrics, checkpoints and evaluation.
//!
//! The same code runs under the daemon and by hand
//! (`jepa-worker train --config run.toml`).

pub mod checkpoint;
pub mod eval;
pub mod metrics;
pub mod optim;
pub mod schedule;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use jepa_common::spec::{self, RunSpec};
use rand::SeedableRng;
use tch::{Device, Tensor};

use crate::collective::Collective;
use crate::data::loader::{mix, Loader, LoaderConfig};
use crate::data::{open_source, SharedSource, Split};
use crate::masks::{MaskConfig, MaskMode, MaskSampler};
use crate::model::{CondConfig, CondToken, Conditioning, EcIjepa, ModelConfig};
use eval::{Features, ProbeConfig, ProbeResult};
use metrics::{Event, Sink};
use optim::AdamW;
use schedule::Schedules;

/// Images RankMe is measured on (the first of the training split).
const RANKME_IMAGES: usize = 256;

/// Seed streams, so masks, crops and weights never share draws.
const MASK_STREAM: u64 = 0x6d61_736b;

/// Returns the model sizes of a spec.
pub fn model_config(spec: &RunSpec) -> ModelConfig {
    let m = &spec.model;
    ModelConfig {
        image_size: i64::from(m.image_size),
        patch_size: i64::from(m.patch_size),
        in_channels: i64::from(m.in_channels),
        embed_dim: i64::from(m.embed_dim),
        depth: i64::from(m.depth),
        num_heads: i64::from(m.num_heads),
        pred_depth: i64::from(m.pred_depth),
        pred_dim: i64::from(m.pred_dim),
    }
}

/// Returns the conditioning settings of a spec.
pub fn cond_config(spec: &RunSpec) -> CondConfig {
    let c = &spec.conditioning;
    CondConfig {
        kind: match c.kind {
            spec::Conditioning::None => Conditioning::None,
            spec::Conditioning::Ec => Conditioning::Ec,
        },
        token: match c.token {
            spec::CondToken::Learned => CondToken::Learned,
            spec::CondToken::Position => CondToken::Position,
        },
        kernel: i64::from(c.kernel),
        stride: i64::from(c.stride),
    }
}

/// Returns the mask sampler settings of a spec.
pub fn mask_config(spec: &RunSpec) -> MaskConfig {
    let (m, grid) = (&spec.mask, spec.model.grid() as usize);
    MaskConfig {
        mode: match m.mode {
            spec::MaskMode::Faithful => MaskMode::Faithful,
            spec::MaskMode::Fixed => MaskMode::Fixed,
        },
        grid_h: grid,
        grid_w: grid,
        num_targets: m.num_targets as usize,
        target_scale: m.target_scale,
        target_aspect: m.target_aspect,
        context_scale: m.context_scale,
        context_aspect: m.context_aspect,
        min_keep: m.min_keep as usize,
    }
}

/// How one trainer process runs, beyond its spec.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Device of this rank.
    pub device: Device,
    /// Folder for checkpoints (`<out>/checkpoints`).
    pub out_dir: PathBuf,
    /// Checkpoint record to resume from.
    pub resume: Option<PathBuf>,
    /// Checkpoints kept on disk; older ones are deleted.
    pub keep_checkpoints: usize,
    /// Fault injection for tests: fail when this step is reached.
    pub crash_at_step: Option<u64>,
    /// Refuse a checkpoint written under another spec. Off only for reading
    /// weights to evaluate them, where the probe settings may differ.
    pub strict_resume: bool,
}

/// What a finished (or interrupted) run reports.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// Steps completed.
    pub step: u64,
    /// Loss of the last step.
    pub last_loss: f64,
    /// Probe result of the final evaluation, if it ran.
    pub probe: Option<ProbeResult>,
    /// Whether a stop request ended the run early.
    pub interrupted: bool,
    /// Record of the last checkpoint written.
    pub checkpoint: Option<PathBuf>,
}

/// One rank of a pretraining run.
pub struct Trainer {
    spec: RunSpec,
    options: TrainOptions,
    model: EcIjepa,
    optim: AdamW,
    sampler: MaskSampler,
    loader: Loader,
    train_source: SharedSource,
    collective: Box<dyn Collective>,
    schedules: Schedules,
    step: u64,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer").field("run", &self.spec.name).field("step", &self.step).finish()
    }
}

impl Trainer {
    /// Builds the run: validates the spec, opens the data, initialises the
    /// model from the seed (or restores a checkpoint) and starts the loader.
    ///
    /// # Errors
    ///
    /// Fails on an invalid spec, missing data, or a checkpoint that is
    /// corrupt or belongs to another spec.
    pub fn new(
        spec: RunSpec,
        options: TrainOptions,
        mut collective: Box<dyn Collective>,
    ) -> anyhow::Result<Self> {
        spec.validate()?;
        let sampler = MaskSampler::new(mask_config(&spec))?;
        let (size, channels) = (spec.model.image_size as usize, spec.model.in_channels as usize);
        let train_source = open_source(&spec.data, Split::Train, size, channels)
            .context("failed to open the training data")?;

        tch::manual_seed(spec.seed as i64);
        let model = EcIjepa::new(&model_config(&spec), &cond_config(&spec), options.device)?;
        let groups = model.param_groups();
        let mut optim = AdamW::new(groups.decay, groups.no_decay);
        let mut step = 0;
        if let Some(record) = &options.resume {
            step = restore(
                &spec,
                &model,
                &mut optim,
                record,
                collective.world(),
                options.strict_resume,
            )?;
        } else {
            // By name: every rank must pass the tensors in the same order.
            let mut all: Vec<(String, Tensor)> =
                model.var_store().variables().into_iter().collect();
            all.sort_by(|a, b| a.0.cmp(&b.0));
            let mut target: Vec<(String, Tensor)> =
                model.target_var_store().variables().into_iter().collect();
            target.sort_by(|a, b| a.0.cmp(&b.0));
            all.extend(target);
            collective.broadcast(&all.iter().map(|(_, t)| t).collect::<Vec<_>>())?;
        }

        let loader = Loader::new(
            Arc::clone(&train_source),
            LoaderConfig {
                seed: spec.seed,
                batch_size: spec.optim.batch_size as usize,
                rank: collective.rank(),
                world: collective.world(),
                image_size: size,
                channels,
                crop_scale: Some(spec.data.crop_scale),
                num_workers: spec.data.num_workers as usize,
                prefetch: spec.data.prefetch as usize,
            },
            step,
        );
        let schedules = Schedules::new(&spec.optim, spec.schedule.steps);
        Ok(Trainer {
            spec,
            options,
            model,
            optim,
            sampler,
            loader,
            train_source,
            collective,
            schedules,
            step,
        })
    }

    /// Steps completed so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The model being trained.
    pub fn model(&self) -> &EcIjepa {
        &self.model
    }

    /// Runs one optimiser step; returns the loss averaged over ranks.
    ///
    /// Order (METHOD.md section 5): schedules; target forward; context
    /// encoder; predictor; loss; backward; gradient all-reduce; clipping;
    /// optimiser step; EMA update.
    ///
    /// # Errors
    ///
    /// Fails when data cannot be read, the loss is not finite, or a
    /// collective fails.
    pub fn train_step(&mut self) -> anyhow::Result<f64> {
        let step = self.step;
        if self.options.crash_at_step == Some(step) {
            bail!("injected fault: crash at step {step}");
        }
        let (lr, wd) = (self.schedules.lr(step), self.schedules.weight_decay(step));
        let momentum = self.schedules.momentum(step);

        let batch = self.loader.next_batch()?;
        let images = batch.images_tensor(self.options.device);
        // One mask generator per image, seeded by the image's position in
        // the global batch, so any split over ranks draws the same masks.
        let per_rank = batch.batch_size as u64;
        let first =
            (step * self.collective.world() as u64 + self.collective.rank() as u64) * per_rank;
        let base = mix(self.spec.seed, MASK_STREAM);
        let mut rngs: Vec<rand_chacha::ChaCha8Rng> = (first..first + per_rank)
            .map(|position| rand_chacha::ChaCha8Rng::seed_from_u64(mix(base, position)))
            .collect();
        let masks = self.sampler.sample_each(step, &mut rngs)?;

        self.optim.zero_grad();
        let loss = self.model.loss(&images, &masks, true)?;
        loss.backward();
        let grads: Vec<Tensor> = self.optim.tensors().iter().map(|t| t.grad()).collect();
        let defined: Vec<&Tensor> = grads.iter().filter(|g| g.defined()).collect();
        self.collective.all_reduce_mean(&defined)?;
        if self.spec.optim.grad_clip > 0.0 {
            self.optim.clip_grad_norm(self.spec.optim.grad_clip);
        }
        self.optim.step(lr, wd);
        self.model.ema_update(momentum);

        let reported = loss.detach().to_kind(tch::Kind::Float);
        self.collective.all_reduce_mean(&[&reported])?;
        let value = reported.double_value(&[]);
        if !value.is_finite() {
            bail!("loss is {value} at step {step}; lower optim.lr or set optim.grad_clip");
        }
        self.step += 1;
        Ok(value)
    }

    /// Runs until the last step or until `stop` is set, reporting to `sink`.
    /// On a stop request it writes a checkpoint before returning.
    ///
    /// # Errors
    ///
    /// Fails when a step, a checkpoint or the evaluation fails.
    pub fn run(&mut self, sink: &mut dyn Sink, stop: &AtomicBool) -> anyhow::Result<RunSummary> {
        let total = self.spec.schedule.steps;
        let lead = self.collective.rank() == 0;
        let params = self.optim.tensors().iter().map(|t| t.numel() as i64).sum();
        if lead {
            sink.emit(&Event::Start { step: self.step, total, params });
        }
        let s = self.spec.schedule.clone();
        let every = |n: u64, step: u64| n > 0 && step % n == 0;
        let (mut window_start, mut window_steps, mut window_loss) = (Instant::now(), 0u64, 0.0);
        let mut summary = RunSummary {
            step: self.step,
            last_loss: f64::NAN,
            probe: None,
            interrupted: false,
            checkpoint: None,
        };

        let mut saved_at = None;
        while self.step < total {
            if stop.load(Ordering::SeqCst) {
                summary.interrupted = true;
                break;
            }
            let step_index = self.step;
            summary.last_loss = self.train_step()?;
            (window_steps, window_loss) = (window_steps + 1, window_loss + summary.last_loss);
            let step = self.step;
            if lead && (every(s.log_every, step) || step == total) {
                let elapsed = window_start.elapsed().as_secs_f64().max(1e-9);
                let images = window_steps
                    * u64::from(self.spec.optim.batch_size)
                    * self.collective.world() as u64;
                sink.emit(&Event::Step {
                    step,
                    loss: summary.last_loss,
                    loss_avg: window_loss / window_steps as f64,
                    lr: self.schedules.lr(step_index),
                    wd: self.schedules.weight_decay(step_index),
                    momentum: self.schedules.momentum(step_index),
                    images_per_s: images as f64 / elapsed,
                    data_wait: (self.loader.take_wait().as_secs_f64() / elapsed).min(1.0),
                });
                (window_start, window_steps, window_loss) = (Instant::now(), 0, 0.0);
            }
            if lead && every(s.rankme_every, step) {
                sink.emit(&Event::Rankme { step, value: self.rankme()? });
            }
            if every(s.checkpoint_every, step) && step < total {
                summary.checkpoint = self.checkpoint(sink)?;
                saved_at = Some(step);
            }
            if lead && every(s.eval_every, step) && step < total {
                self.evaluate(sink)?;
            }
        }

        summary.step = self.step;
        if saved_at != Some(self.step) {
            summary.checkpoint = self.checkpoint(sink)?;
        }
        if lead && !summary.interrupted && self.spec.eval.enabled {
            summary.probe = Some(self.evaluate(sink)?);
        }
        if lead {
            sink.emit(&Event::Done { step: self.step, interrupted: summary.interrupted });
        }
        Ok(summary)
    }

    /// RankMe of average-pooled target features of the first training
    /// images.
    ///
    /// # Errors
    ///
    /// Fails when the images cannot be read.
    pub fn rankme(&self) -> anyhow::Result<f64> {
        let n = RANKME_IMAGES.min(self.train_source.len());
        let indices: Vec<usize> = (0..n).collect();
        let (size, channels) =
            (self.spec.model.image_size as usize, self.spec.model.in_channels as usize);
        let (images, _) = eval::load_images(&self.train_source, &indices, size, channels)?;
        let features = self.model.target_features(&images.to_device(self.options.device))?;
        Ok(eval::rankme(&features.mean_dim(1, false, tch::Kind::Float)))
    }

    /// Runs the linear probe (and the pooled probe when configured).
    ///
    /// # Errors
    ///
    /// Fails when the test split cannot be opened or read.
    pub fn evaluate(&self, sink: &mut dyn Sink) -> anyhow::Result<ProbeResult> {
        let (size, channels) =
            (self.spec.model.image_size as usize, self.spec.model.in_channels as usize);
        let test = open_source(&self.spec.data, Split::Test, size, channels)
            .context("failed to open the test split for evaluation")?;
        let cfg = probe_config(&self.spec);
        let result =
            eval::linear_probe(Features::Encoder(&self.model), &self.train_source, &test, &cfg)?;
        sink.emit(&Event::Eval {
            step: self.step,
            top1: result.top1,
            pooled_top1: result.pooled_top1,
        });
        Ok(result)
    }

    /// Writes a checkpoint of the current step (rank 0 only).
    fn checkpoint(&self, sink: &mut dyn Sink) -> anyhow::Result<Option<PathBuf>> {
        if self.collective.rank() != 0 {
            return Ok(None);
        }
        let mut tensors: Vec<(String, Tensor)> =
            self.model.var_store().variables().into_iter().collect();
        tensors.extend(self.model.target_var_store().variables());
        tensors.extend(self.optim.state());
        tensors.push(("optim.steps".to_string(), Tensor::from_slice(&[self.optim.steps()])));
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        let dir = self.options.out_dir.join("checkpoints");
        let (record, path) = checkpoint::write(
            &dir,
            &tensors,
            self.step,
            &self.spec.spec_hash(),
            self.spec.seed,
            self.collective.world(),
        )?;
        checkpoint::prune(&dir, self.options.keep_checkpoints.max(1));
        tracing::info!(step = self.step, path = %path.display(), "checkpoint written");
        sink.emit(&Event::Checkpoint {
            step: self.step,
            path: path.display().to_string(),
            sha256: record.sha256,
        });
        Ok(Some(path))
    }
}

/// The probe settings of a spec.
pub fn probe_config(spec: &RunSpec) -> ProbeConfig {
    ProbeConfig {
        epochs: spec.eval.probe_epochs,
        lr: spec.eval.probe_lr,
        pooled_kernel: i64::from(spec.eval.pooled_kernel),
        pooled_stride: i64::from(spec.eval.pooled_stride),
        max_train: spec.eval.max_train as usize,
        max_test: spec.eval.max_test as usize,
        seed: spec.seed,
        image_size: spec.model.image_size as usize,
        channels: spec.model.in_channels as usize,
    }
}

/// Loads a checkpoint into model and optimiser; returns its step.
fn restore(
    spec: &RunSpec,
    model: &EcIjepa,
    optim: &mut AdamW,
    record_path: &std::path::Path,
    world: usize,
    strict: bool,
) -> anyhow::Result<u64> {
    if record_path.extension().is_some_and(|e| e == "safetensors") {
        // A bare weight file, e.g. one downloaded with `jepactl checkpoints
        // download`: its checksum was verified by the download, and it has
        // no record to check the spec against, so it serves evaluation only.
        if strict {
            bail!(
                "resuming needs the checkpoint's JSON record beside the weights, not the bare file {}",
                record_path.display()
            );
        }
        let tensors: HashMap<String, Tensor> =
            Tensor::read_safetensors(record_path)?.into_iter().collect();
        copy_into(model.var_store().variables(), &tensors)?;
        copy_into(model.target_var_store().variables(), &tensors)?;
        let step = tensors.get("optim.steps").map_or(0, |t| t.int64_value(&[0]));
        tracing::info!(step, path = %record_path.display(), "loaded weights");
        return Ok(u64::try_from(step).unwrap_or(0));
    }
    let (record, tensors) = checkpoint::read(record_path)?;
    if strict && record.spec_hash != spec.spec_hash() {
        bail!(
            "checkpoint {} was written by another run spec (hash {}, this spec {})",
            record_path.display(),
            record.spec_hash,
            spec.spec_hash()
        );
    }
    if strict && record.world != world {
        bail!(
            "checkpoint {} was trained on {} ranks, not {world}",
            record_path.display(),
            record.world
        );
    }
    copy_into(model.var_store().variables(), &tensors)?;
    copy_into(model.target_var_store().variables(), &tensors)?;
    let steps = tensors
        .get("optim.steps")
        .map(|t| t.int64_value(&[0]))
        .context("checkpoint has no optim.steps")?;
    optim
        .load_state(&tensors, steps)
        .map_err(|e| anyhow::anyhow!("checkpoint optimiser state: {e}"))?;
    tracing::info!(step = record.step, path = %record_path.display(), "resumed from checkpoint");
    Ok(record.step)
}

fn copy_into(vars: HashMap<String, Tensor>, saved: &HashMap<String, Tensor>) -> anyhow::Result<()> {
    for (name, mut var) in vars {
        let source = saved.get(&name).with_context(|| format!("checkpoint lacks {name}"))?;
        if source.size() != var.size() {
            bail!("checkpoint {name} has shape {:?}, model has {:?}", source.size(), var.size());
        }
        tch::no_grad(|| var.copy_(source));
    }
    Ok(())
}
