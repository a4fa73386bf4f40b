//! `jepa-coordinator`: the process that schedules EC-IJEPA runs across
//! worker daemons and keeps their state.

use std::net::SocketAddr;

use anyhow::Context;
use clap::Parser;
use jepa_common::telemetry::{self, LogFormat};

/// Command-line options of the coordinator.
#[derive(Debug, Parser)]
#[command(name = "jepa-coordinator", version, about)]
struct Args {
    /// Address to serve the gRPC API on.
    #[arg(long, default_value = "127.0.0.1:50051", env = "JEPA_LISTEN")]
    listen: SocketAddr,
    /// Emit logs as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(if args.log_json { LogFormat::Json } else { LogFormat::Text }, "info");

    let (listener, addr) = jepa_coordinator::server::bind(args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    tracing::info!(%addr, version = jepa_common::VERSION, "coordinator listening");
    jepa_coordinator::server::serve(listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    tracing::info!("coordinator stopped");
    Ok(())
}
