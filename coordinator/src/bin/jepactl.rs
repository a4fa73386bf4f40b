//! `jepactl`: the command-line client of the coordinator.

use anyhow::Context;
use clap::{Parser, Subcommand};
use jepa_common::proto::{system_client::SystemClient, GetVersionRequest};

/// Command-line client of the EC-IJEPA coordinator.
#[derive(Debug, Parser)]
#[command(name = "jepactl", version, about)]
struct Cli {
    /// Address of the coordinator.
    #[arg(long, global = true, env = "JEPA_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Prints the versions of this client and of the coordinator.
    Version,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("jepactl {}", jepa_common::VERSION);
            let mut client = SystemClient::connect(cli.coordinator.clone())
                .await
                .with_context(|| format!("cannot reach the coordinator at {}", cli.coordinator))?;
            let reply = client.get_version(GetVersionRequest {}).await?.into_inner();
            println!("coordinator {} (api revision {})", reply.version, reply.api_revision);
        }
    }
    Ok(())
}
