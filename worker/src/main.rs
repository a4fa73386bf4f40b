//! `jepa-worker`: trains EC-IJEPA with libtorch, alone or for a coordinator.

use clap::{Parser, Subcommand};
use jepa_common::telemetry::{self, LogFormat};
use jepa_worker::runtime::{self, CudaLoad};
use tch::{Kind, Tensor};

/// EC-IJEPA worker: trainer and (later) daemon.
#[derive(Debug, Parser)]
#[command(name = "jepa-worker", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints what libtorch sees on this host and runs one small forward pass.
    Info {
        /// Device for the forward pass: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(LogFormat::Text, "info");
    match cli.command {
        Command::Info { device } => info(&device),
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
