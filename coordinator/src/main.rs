//! `jepa-coordinator`: the process that schedules EC-IJEPA runs across
//! worker daemons and keeps their state; `jepa-coordinator bench` measures
//! it on this machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use jepa_common::telemetry::{self, LogFormat};
use jepa_coordinator::bench::{self, BenchArgs};
use jepa_coordinator::clock::SystemClock;
use jepa_coordinator::config::{parse_duration, CoordinatorConfig, StoreKind};
use jepa_coordinator::server;

/// Command-line options of the coordinator; flags override the config file.
#[derive(Debug, Parser)]
#[command(name = "jepa-coordinator", version, about)]
struct Args {
    /// Config file (TOML); see deploy/coordinator.toml.
    #[arg(long, env = "JEPA_COORDINATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address to serve the gRPC API on.
    #[arg(long, env = "JEPA_LISTEN")]
    listen: Option<SocketAddr>,
    /// Folder of the state store.
    #[arg(long, env = "JEPA_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Keep state in memory only (lost on exit).
    #[arg(long)]
    memory_store: bool,
    /// How long a worker's lease lasts without a heartbeat, e.g. 15s.
    #[arg(long, value_parser = parse_duration)]
    lease_timeout: Option<Duration>,
    /// Heartbeat interval handed to workers, e.g. 5s; a third of the lease
    /// timeout by default when only that is given.
    #[arg(long, value_parser = parse_duration)]
    heartbeat_interval: Option<Duration>,
    /// Emit logs as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// What to do; serving by default.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serves the API (the default).
    Serve,
    /// Measures submit latency, metric ingestion and placement, and prints
    /// the figures.
    Bench(BenchArgs),
    /// Prints the effective configuration and exits.
    Config,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn effective_config(args: &Args) -> anyhow::Result<CoordinatorConfig> {
    let mut config = match &args.config {
        Some(path) => CoordinatorConfig::load(path)?,
        None => CoordinatorConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    if args.memory_store {
        config.store = StoreKind::Memory;
    }
    if let Some(lease) = args.lease_timeout {
        config.lease_timeout_ms = millis(lease);
        if args.heartbeat_interval.is_none() {
            config.heartbeat_interval_ms = (config.lease_timeout_ms / 3).max(1);
        }
    }
    if let Some(interval) = args.heartbeat_interval {
        config.heartbeat_interval_ms = millis(interval);
    }
    config.log_json |= args.log_json;
    config.validate()?;
    Ok(config)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = effective_config(&args)?;
    let format = if config.log_json { LogFormat::Json } else { LogFormat::Text };
    telemetry::init(format, "info");

    match args.command {
        Some(Command::Bench(bench_args)) => {
            let report = bench::run(&bench_args).await?;
            println!("{report}");
            Ok(())
        }
        Some(Command::Config) => {
            println!("{config:#?}");
            Ok(())
        }
        Some(Command::Serve) | None => serve(config).await,
    }
}

async fn serve(config: CoordinatorConfig) -> anyhow::Result<()> {
    let coord = server::open_coordinator(&config, Arc::new(SystemClock))?;
    let (listener, addr) = server::bind(config.listen)
        .await
        .with_context(|| format!("failed to listen on {}", config.listen))?;
    tracing::info!(
        %addr,
        data_dir = %config.data_dir.display(),
        lease_timeout_ms = config.lease_timeout_ms,
        version = jepa_common::VERSION,
        "coordinator listening"
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("failed to install the SIGTERM handler")?;
    server::serve(coord, listener, async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    })
    .await?;
    tracing::info!("coordinator stopped");
    Ok(())
}
