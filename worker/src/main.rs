//! `jepa-worker`: trains EC-IJEPA with libtorch, alone or for a coordinator.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use jepa_common::duration::parse_duration;
use jepa_common::spec::{RunSpec, SpecError};
use jepa_common::spec_override::set_field;
use jepa_common::telemetry::{self, LogFormat};
use jepa_worker::collective::tcp::{RingConfig, RingListener, TcpRing};
use jepa_worker::collective::{nccl, Collective, SingleRank};
use jepa_worker::daemon::{self, attempt::EXIT_INVALID_SPEC, resources};
use jepa_worker::data::{open_source, Split};
use jepa_worker::runtime::{self, CudaLoad};
use jepa_worker::train::eval::{self, Features};
use jepa_worker::train::metrics::Sink as _;
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
        /// libtorch CPU threads; libtorch's default (one per core) when absent.
        #[arg(long)]
        threads: Option<usize>,
        /// Data parallelism: ranks, rank 0's address, and the ring's settings.
        #[command(flatten)]
        ranks: RankArgs,
    },
    /// Scores frozen features with the linear probe of the spec's `eval`.
    Probe {
        #[command(flatten)]
        spec: SpecArgs,
        /// What to probe.
        #[arg(long, value_enum, default_value = "checkpoint")]
        features: ProbeFeatures,
        /// Checkpoint for `--features checkpoint`: a record (`.json`) or a
        /// downloaded weight file (`.safetensors`).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
    },
    /// Times full training steps: images/s, step time, model FLOPs, MFU.
    Bench(jepa_worker::bench::BenchArgs),
    /// Times the CPU ring's all-reduce between rank processes on this host.
    BenchAllreduce(jepa_worker::collective::bench::AllreduceBenchArgs),
    /// Serves a coordinator: registers this host's resources and runs the
    /// trainers of the attempts it is assigned.
    Daemon(DaemonArgs),
}

/// Where this trainer sits in a data-parallel run (the CPU ring backend).
#[derive(Debug, Clone, clap::Args)]
struct RankArgs {
    /// This process's rank.
    #[arg(long, default_value_t = 0)]
    rank: usize,
    /// Ranks in all; must equal the spec's resources.ranks.
    #[arg(long, default_value_t = 1)]
    world: usize,
    /// What rank 0 published: its bootstrap address (host:port) on CPU, or
    /// its NCCL id (`nccl:<hex>`) on CUDA; ranks other than 0 need it.
    #[arg(long)]
    master: Option<String>,
    /// Address this rank listens on for its ring neighbour (port 0 picks a
    /// free one); rank 0 prints it as a `listening` event.
    #[arg(long, default_value = "127.0.0.1:0")]
    bind: String,
    /// Token of the attempt; peers with another token are refused.
    #[arg(long, default_value = "")]
    token: String,
    /// Deadline of every collective operation, e.g. 300s: a rank that
    /// hangs ends the attempt after it, a rank that dies at once.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    collective_timeout: Duration,
}

impl RankArgs {
    /// Joins the ring (or stays alone with one rank), announcing rank 0's
    /// listening address on stdout first.
    fn collective(&self, spec: &RunSpec) -> anyhow::Result<Box<dyn Collective>> {
        anyhow::ensure!(
            self.world == spec.resources.ranks as usize,
            "--world {} does not match the spec's resources.ranks {}",
            self.world,
            spec.resources.ranks
        );
        anyhow::ensure!(
            self.rank < self.world,
            "--rank {} must be below --world {}",
            self.rank,
            self.world
        );
        if self.world == 1 {
            return Ok(Box::new(SingleRank));
        }
        if spec.resources.is_cuda() {
            // NCCL: rank 0 makes the id, the others join with it.
            let id = if self.rank == 0 {
                let id = nccl::unique_id()?;
                metrics::JsonLines.emit(&metrics::Event::Listening { address: id.to_text() });
                id
            } else {
                let text = self
                    .master
                    .as_deref()
                    .with_context(|| format!("--rank {} needs --master nccl:<id>", self.rank))?;
                nccl::UniqueId::from_text(text)?
            };
            let comm = nccl::NcclComm::init(&id, self.rank, self.world, self.collective_timeout)?;
            return Ok(Box::new(comm));
        }
        let listener = RingListener::bind(&self.bind)?;
        if self.rank == 0 {
            let address = listener.local_addr()?.to_string();
            metrics::JsonLines.emit(&metrics::Event::Listening { address });
        } else {
            anyhow::ensure!(self.master.is_some(), "--rank {} needs --master HOST:PORT", self.rank);
        }
        let config = RingConfig {
            rank: self.rank,
            world: self.world,
            token: self.token.clone(),
            timeout: self.collective_timeout,
        };
        let master = match &self.master {
            Some(text) => Some(
                text.parse::<std::net::SocketAddr>()
                    .with_context(|| format!("--master {text:?} is not HOST:PORT"))?,
            ),
            None => None,
        };
        Ok(Box::new(TcpRing::connect(&config, listener, master)?))
    }
}

/// Options of `jepa-worker daemon`.
#[derive(Debug, clap::Args)]
struct DaemonArgs {
    /// Address of the coordinator.
    #[arg(long, env = "JEPA_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    /// Unique name of this daemon; the host name by default. Daemons that
    /// share a host need distinct names.
    #[arg(long)]
    name: Option<String>,
    /// Address other hosts reach this daemon on (for multi-host runs).
    #[arg(long, default_value = "")]
    address: String,
    /// Folder for the attempts' specs, checkpoints and logs;
    /// `.data/worker-<name>` by default.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// CPU slots to offer, one CPU rank each; one per 8 cores by default.
    #[arg(long)]
    cpu_slots: Option<u32>,
    /// CUDA devices to offer: all, none, or indices such as 0,1.
    #[arg(long, default_value = "all")]
    gpus: String,
    /// Time a stopped trainer gets to write a final checkpoint before it is
    /// killed, e.g. 30s.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    grace: Duration,
    /// Interval of metric flushes to the coordinator, e.g. 1s.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    metrics_flush: Duration,
    /// Deadline of the trainers' collective operations in multi-rank runs,
    /// e.g. 300s: a rank that hangs ends its attempt after it.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    collective_timeout: Duration,
    /// Emit logs as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        Command::Daemon(args) if args.log_json => LogFormat::Json,
        _ => LogFormat::Text,
    };
    telemetry::init(format, "info");
    let result = match cli.command {
        Command::Info { device } => info(&device),
        Command::Train { spec, out, resume, keep_checkpoints, json, threads, ranks } => {
            train(&spec, out, resume, keep_checkpoints, json, threads, &ranks)
        }
        Command::Probe { spec, features, checkpoint } => probe(&spec, features, checkpoint),
        Command::Bench(args) => jepa_worker::bench::run_cli(&args),
        Command::BenchAllreduce(args) => jepa_worker::collective::bench::run(&args),
        Command::Daemon(args) => run_daemon(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("Error: {err:#}");
            // The daemon does not retry a run whose spec is refused.
            if err.chain().any(|cause| cause.downcast_ref::<SpecError>().is_some()) {
                ExitCode::from(u8::try_from(EXIT_INVALID_SPEC).unwrap_or(2))
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run_daemon(args: DaemonArgs) -> anyhow::Result<()> {
    let name = match args.name {
        Some(name) => name,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "worker".to_string()),
    };
    let cores = resources::cpu_cores();
    let gpus = resources::select_gpus(&args.gpus, resources::cuda_devices())
        .map_err(anyhow::Error::msg)?;
    let cpu_slots = args.cpu_slots.unwrap_or_else(|| resources::default_cpu_slots(cores));
    anyhow::ensure!(
        cpu_slots > 0 || !gpus.is_empty(),
        "--cpu-slots 0 with no CUDA device offers nothing; allowed: at least 1 slot, or GPUs"
    );
    let config = daemon::DaemonConfig {
        coordinator: args.coordinator,
        work_dir: args.work_dir.unwrap_or_else(|| PathBuf::from(format!(".data/worker-{name}"))),
        name,
        address: args.address,
        cpu_slots,
        memory_bytes: resources::memory_bytes(),
        trainer_threads: resources::threads_per_trainer(cores, cpu_slots, gpus.len()),
        gpus,
        trainer: std::env::current_exe().context("cannot find this executable")?,
        grace: args.grace,
        metrics_flush: args.metrics_flush,
        collective_timeout: args.collective_timeout,
    };
    tracing::info!(
        name = %config.name,
        coordinator = %config.coordinator,
        work_dir = %config.work_dir.display(),
        cpu_slots = config.cpu_slots,
        gpus = config.gpus.len(),
        trainer_threads = config.trainer_threads,
        "worker daemon starting"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .context("failed to install the SIGTERM handler")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            tracing::info!("shutdown requested");
            let _ = stop.send(true);
        });
        daemon::run(config, stopped).await
    })
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
    match nccl::version() {
        Ok(v) => println!("nccl:            {}.{}.{}", v / 10_000, v / 100 % 100, v % 100),
        Err(err) => println!("nccl:            not usable ({err})"),
    }

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
    threads: Option<usize>,
    ranks: &RankArgs,
) -> anyhow::Result<()> {
    let spec = args.load()?;
    if let Some(threads) = threads {
        anyhow::ensure!(threads > 0, "--threads must be at least 1");
        tch::set_num_threads(i32::try_from(threads).unwrap_or(i32::MAX));
    }
    let device = runtime::select_device(&spec.resources.device)?;
    let out_dir = out.unwrap_or_else(|| PathBuf::from("runs").join(&spec.name));
    let resume = match resume.as_deref() {
        None => None,
        Some("auto") => checkpoint::latest(&out_dir.join("checkpoints")),
        Some(path) => Some(PathBuf::from(path)),
    };
    let crash_at_step = injected_crash_step()?;
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
    if let Some(delay) = injected_step_delay()? {
        sink = Box::new(Paced { inner: sink, delay });
    }
    tracing::info!(run = %spec.name, device = ?device, steps = spec.schedule.steps, "training started");
    let collective = ranks.collective(&spec)?;
    let mut trainer = Trainer::new(spec, options, collective)?;
    let summary = trainer.run(sink.as_mut(), &stop)?;
    tracing::info!(step = summary.step, interrupted = summary.interrupted, "training ended");
    Ok(())
}

/// The fault-injection step of `JEPA_FAULT_CRASH_AT_STEP`: `STEP` crashes
/// every attempt at that step, `STEP@N` only attempt N (the daemon passes
/// the attempt number in `JEPA_ATTEMPT`), so a restart can succeed.
fn injected_crash_step() -> anyhow::Result<Option<u64>> {
    let Ok(text) = std::env::var("JEPA_FAULT_CRASH_AT_STEP") else { return Ok(None) };
    let bad = || format!("JEPA_FAULT_CRASH_AT_STEP={text:?} is not STEP or STEP@ATTEMPT");
    let (step, only) = match text.split_once('@') {
        Some((step, attempt)) => (step, Some(attempt.trim().parse::<u32>().with_context(bad)?)),
        None => (text.as_str(), None),
    };
    let step: u64 = step.trim().parse().with_context(bad)?;
    let attempt: Option<u32> = std::env::var("JEPA_ATTEMPT").ok().and_then(|a| a.parse().ok());
    Ok(match only {
        Some(only) if attempt != Some(only) => None,
        _ => Some(step),
    })
}

/// `JEPA_FAULT_SLOW_STEP_MS`: a pause after every logged step, to make a
/// tiny run last long enough for tests to cancel or kill it mid-training.
fn injected_step_delay() -> anyhow::Result<Option<Duration>> {
    let Ok(text) = std::env::var("JEPA_FAULT_SLOW_STEP_MS") else { return Ok(None) };
    let ms: u64 = text.trim().parse().with_context(|| {
        format!("JEPA_FAULT_SLOW_STEP_MS={text:?} is not a number of milliseconds")
    })?;
    Ok(Some(Duration::from_millis(ms)))
}

/// Passes events on and pauses after each step report.
struct Paced {
    inner: Box<dyn metrics::Sink>,
    delay: Duration,
}

impl metrics::Sink for Paced {
    fn emit(&mut self, event: &metrics::Event) {
        self.inner.emit(event);
        if matches!(event, metrics::Event::Step { .. }) {
            std::thread::sleep(self.delay);
        }
    }
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
                    checkpoint_path
                        .context("--features checkpoint needs --checkpoint RECORD|WEIGHTS")?,
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
