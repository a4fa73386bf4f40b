//! `jepa-worker`: trains EC-IJEPA with libtorch, alone or for a coordinator.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use jepa_common::spec::RunSpec;
use jepa_common::spec_override::set_field;
use jepa_common::telemetry::{self, LogFormat};
use jepa_worker::collective::SingleRank;
use jepa_worker::data::{open_source, Split};
use jepa_worker::runtime::{self, CudaLoad};
use jepa_worker::train::eval::{self, Features};
use jepa_worker::train::{self, checkpoint, metrics, TrainOptions, Trainer};
use tch::{Kind, Tensor};

/// EC-IJEPA worker: trainer and daemon.
#[derive(Debug, Parser)]
#[command(name = "jepa-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a run spec comes from: a TOML file plus `--set` overrides.
#[derive(Debug, clap::Args)]
struct SpecArgs {
    /// Run spec in TOML; missing keys take their defaults.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Overrides a spec field, e.g. `--set optim.lr=5e-4 --set mask.context_scale=0.4:1.0`.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    set: Vec<String>,
    /// Device: cpu, cuda or cuda:N (overrides resources.device).
    #[arg(long)]
    device: Option<String>,
}

impl SpecArgs {
    fn load(&self) -> anyhow::Result<RunSpec> {
        let mut spec = match &self.config {
            Some(path) => RunSpec::from_file(path)?,
            None => RunSpec::default(),
        };
        for item in &self.set {
            let (path, value) = item
                .split_once('=')
                .with_context(|| format!("--set {item:?} is not PATH=VALUE"))?;
            spec = set_field(&spec, path.trim(), value.trim())?;
        }
        if let Some(device) = &self.device {
            spec.resources.device = device.clone();
            spec.resources.gpus = if spec.resources.is_cuda() { spec.resources.ranks } else { 0 };
        }
        spec.validate()?;
        Ok(spec)
    }
}

/// Which features the `probe` command scores.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProbeFeatures {
    /// Normalised raw pixels.
    Raw,
    /// A randomly initialised encoder (the spec's seed).
    Random,
    /// The target encoder of a checkpoint (`--checkpoint`).
    Checkpoint,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints what libtorch sees on this host and runs one small forward pass.
    Info {
        /// Device for the forward pass: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Trains one run (one rank) from a spec.
    Train {
        #[command(flatten)]
        spec: SpecArgs,
        /// Folder for checkpoints; defaults to runs/<name>.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Checkpoint record to resume from, or `auto` for the newest in --out.
        #[arg(long)]
        resume: Option<String>,
        /// Checkpoints kept on disk.
        #[arg(long, default_value_t = 3)]
        keep_checkpoints: usize,
        /// Metrics as JSON lines even on a terminal.
        #[arg(long)]
        json: bool,
    },
    /// Scores frozen features with the linear probe of the spec's `eval`.
    Probe {
        #[command(flatten)]
        spec: SpecArgs,
        /// What to probe.
        #[arg(long, value_enum, default_value = "checkpoint")]
        features: ProbeFeatures,
        /// Checkpoint record for `--features checkpoint`.
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Times full training steps: images/s, step time, model FLOPs, MFU.
    Bench(jepa_worker::bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(LogFormat::Text, "info");
    match cli.command {
        Command::Info { device } => info(&device),
        Command::Train { spec, out, resume, keep_checkpoints, json } => {
            train(&spec, out, resume, keep_checkpoints, json)
        }
        Command::Probe { spec, features, checkpoint } => probe(&spec, features, checkpoint),
        Command::Bench(args) => jepa_worker::bench::run_cli(&args),
    }
}

/// Reports the libtorch set-up and proves it computes: a 2-layer MLP forward
/// pass whose result is checked against a closed form.
fn info(device: &str) -> anyhow::Result<()> {
    let cuda = match runtime::load_cuda() {
        CudaLoad::Loaded(_) => "loaded".to_string(),
        CudaLoad::NotBuilt => "not in this libtorch build".to_string(),
        CudaLoad::Failed(err) => format!("failed to load: {err}"),
    };
    println!("libtorch:        {}", runtime::LIBTORCH_LIB);
    println!("cuda library:    {cuda}");
    println!("cuda available:  {}", tch::Cuda::is_available());
    println!("cuda devices:    {}", tch::Cuda::device_count());
    println!("cpu threads:     {}", tch::get_num_threads());

    let device = runtime::select_device(device)?;
    // All-ones input through all-ones weights: each hidden unit sums 8 ones,
    // each output sums 16 hidden units of 8, so every output is 128.
    let x = Tensor::ones([4, 8], (Kind::Float, device));
    let w1 = Tensor::ones([8, 16], (Kind::Float, device));
    let w2 = Tensor::ones([16, 2], (Kind::Float, device));
    let y = x.matmul(&w1).relu().matmul(&w2);
    let got = y.mean(Kind::Float).double_value(&[]);
    anyhow::ensure!((got - 128.0).abs() < 1e-6, "forward pass gave {got}, expected 128");
    println!("forward pass:    ok on {device:?} (mean output {got})");
    Ok(())
}

fn train(
    args: &SpecArgs,
    out: Option<PathBuf>,
    resume: Option<String>,
    keep_checkpoints: usize,
    json: bool,
) -> anyhow::Result<()> {
    let spec = args.load()?;
    let device = runtime::select_device(&spec.resources.device)?;
    let out_dir = out.unwrap_or_else(|| PathBuf::from("runs").join(&spec.name));
    let resume = match resume.as_deref() {
        None => None,
        Some("auto") => checkpoint::latest(&out_dir.join("checkpoints")),
        Some(path) => Some(PathBuf::from(path)),
    };
    let crash_at_step = std::env::var("JEPA_FAULT_CRASH_AT_STEP").ok().and_then(|v| v.parse().ok());
    let options = TrainOptions {
        device,
        out_dir,
        resume,
        keep_checkpoints,
        crash_at_step,
        strict_resume: true,
    };

    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("failed to install the signal handler")?;
    }
    let mut sink = metrics::stdout_sink(json, spec.schedule.steps);
    tracing::info!(run = %spec.name, device = ?device, steps = spec.schedule.steps, "training started");
    let mut trainer = Trainer::new(spec, options, Box::new(SingleRank))?;
    let summary = trainer.run(sink.as_mut(), &stop)?;
    tracing::info!(step = summary.step, interrupted = summary.interrupted, "training ended");
    Ok(())
}

fn probe(
    args: &SpecArgs,
    features: ProbeFeatures,
    checkpoint_path: Option<PathBuf>,
) -> anyhow::Result<()> {
    let spec = args.load()?;
    let (size, channels) = (spec.model.image_size as usize, spec.model.in_channels as usize);
    let train_set = open_source(&spec.data, Split::Train, size, channels)?;
    let test_set = open_source(&spec.data, Split::Test, size, channels)?;
    let cfg = train::probe_config(&spec);
    let result = match features {
        ProbeFeatures::Raw => eval::linear_probe(Features::Raw, &train_set, &test_set, &cfg)?,
        ProbeFeatures::Random | ProbeFeatures::Checkpoint => {
            let device = runtime::select_device(&spec.resources.device)?;
            let resume = match features {
                ProbeFeatures::Checkpoint => Some(
                    checkpoint_path.context("--features checkpoint needs --checkpoint RECORD")?,
                ),
                _ => None,
            };
            let options = TrainOptions {
                device,
                out_dir: std::env::temp_dir(),
                resume,
                keep_checkpoints: 1,
                crash_at_step: None,
                strict_resume: false,
            };
            let trainer = Trainer::new(spec.clone(), options, Box::new(SingleRank))?;
            eval::linear_probe(Features::Encoder(trainer.model()), &train_set, &test_set, &cfg)?
        }
    };
    let line = serde_json::json!({
        "features": format!("{features:?}").to_lowercase(),
        "top1": result.top1,
        "pooled_top1": result.pooled_top1,
        "train_images": result.train_images,
        "test_images": result.test_images,
    });
    println!("{line}");
    Ok(())
}
