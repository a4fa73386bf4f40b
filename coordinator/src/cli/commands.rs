//! One function per `jepactl` command: build the request, call the
//! coordinator, print the answer.

use std::process::ExitCode;

use anyhow::Context;
use jepa_common::proto::{self, download_checkpoint_response::Part};
use sha2::{Digest, Sha256};

use super::output::{self, print_checkpoints, print_run, print_runs, print_workers};
use super::{connect, CheckpointAction, Cli, Command, MetricsFormat, Output};

/// Runs one parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let json = cli.output == Output::Json;
    let address = cli.coordinator.as_str();
    match cli.command {
        Command::Submit { spec, dry_run, watch } => {
            let built = spec.build()?;
            if dry_run {
                print!("{}", built.to_toml_string());
                return Ok(ExitCode::SUCCESS);
            }
            let mut client = connect(address).await?;
            let request = proto::SubmitRunRequest {
                spec: Some(proto::RunSpec::from(&built)),
                min_gpu_memory_bytes: spec.min_gpu_memory_bytes(),
                request_id: request_id(),
            };
            let run = client.submit_run(request).await?.into_inner().run.context("empty reply")?;
            if json {
                println!("{}", output::run_json(&run));
            } else {
                let note = if run.pending_reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", run.pending_reason)
                };
                println!(
                    "submitted {} ({}): {}{note}",
                    run.id,
                    run.name,
                    crate::core::state_name(run.state)
                );
            }
            if watch {
                return super::watch::watch(&mut client, &run.id, json).await;
            }
        }
        Command::Get { run_id } => {
            let reply = connect(address)
                .await?
                .get_run(proto::GetRunRequest { run_id })
                .await?
                .into_inner();
            print_run(&reply.run.context("empty reply")?, &reply.events, json);
        }
        Command::List { states, name, sweep, limit, page_token } => {
            let states =
                states.iter().map(|s| parse_state(s)).collect::<anyhow::Result<Vec<_>>>()?;
            let request = proto::ListRunsRequest {
                states,
                name_prefix: name,
                sweep_id: sweep,
                page_size: limit,
                page_token,
            };
            let reply = connect(address).await?.list_runs(request).await?.into_inner();
            print_runs(&reply.runs, &reply.next_page_token, json);
        }
        Command::Watch { run_id } => {
            let mut client = connect(address).await?;
            return super::watch::watch(&mut client, &run_id, json).await;
        }
        Command::Metrics { run_id, series, from, to, limit, format } => {
            let request =
                proto::GetMetricsRequest { run_id, series, step_from: from, step_to: to, limit };
            let reply = connect(address).await?.get_metrics(request).await?.into_inner();
            let format =
                format.unwrap_or(if json { MetricsFormat::Json } else { MetricsFormat::Table });
            println!("{}", output::render_metrics(&reply.series, format));
        }
        Command::Cancel { run_id, reason } => {
            let reply = connect(address)
                .await?
                .cancel_run(proto::CancelRunRequest { run_id, reason })
                .await?;
            let run = reply.into_inner().run.context("empty reply")?;
            if json {
                println!("{}", output::run_json(&run));
            } else {
                println!("{} {}", run.id, crate::core::state_name(run.state));
            }
        }
        Command::Workers { all } => {
            let reply = connect(address)
                .await?
                .list_workers(proto::ListWorkersRequest { include_lost: all })
                .await?;
            print_workers(&reply.into_inner().workers, json);
        }
        Command::Checkpoints { action } => checkpoints(address, action, json).await?,
        Command::Sweep(command) => super::sweep::run(address, *command, json).await?,
        Command::Version => {
            let channel = super::channel(address).await?;
            let mut client = proto::system_client::SystemClient::new(channel);
            let reply = client.get_version(proto::GetVersionRequest {}).await?.into_inner();
            println!("jepactl {}", jepa_common::VERSION);
            println!("coordinator {} (api revision {})", reply.version, reply.api_revision);
        }
        Command::Completions { .. } => {}
    }
    Ok(ExitCode::SUCCESS)
}

async fn checkpoints(address: &str, action: CheckpointAction, json: bool) -> anyhow::Result<()> {
    let mut client = connect(address).await?;
    match action {
        CheckpointAction::List { run_id } => {
            let reply = client.list_checkpoints(proto::ListCheckpointsRequest { run_id }).await?;
            print_checkpoints(&reply.into_inner().checkpoints, json);
        }
        CheckpointAction::Download { run_id, step, file } => {
            let request = proto::DownloadCheckpointRequest { run_id: run_id.clone(), step };
            let mut stream = client.download_checkpoint(request).await?.into_inner();
            let Some(proto::DownloadCheckpointResponse { part: Some(Part::Info(info)) }) =
                stream.message().await?
            else {
                anyhow::bail!(
                    "the coordinator did not start the download with the checkpoint record"
                );
            };
            let mut bytes = Vec::with_capacity(usize::try_from(info.size_bytes).unwrap_or(0));
            while let Some(message) = stream.message().await? {
                if let Some(Part::Chunk(chunk)) = message.part {
                    bytes.extend_from_slice(&chunk);
                }
            }
            let digest: String =
                Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
            anyhow::ensure!(
                digest == info.sha256 && bytes.len() as u64 == info.size_bytes,
                "downloaded checkpoint does not match its record (sha256 {digest}, expected {})",
                info.sha256
            );
            let path = file.unwrap_or_else(|| format!("{run_id}-{}.ckpt", info.step).into());
            std::fs::write(&path, &bytes)
                .with_context(|| format!("failed to write {}", path.display()))?;
            println!(
                "wrote {} ({} bytes, step {}, sha256 verified)",
                path.display(),
                bytes.len(),
                info.step
            );
        }
    }
    Ok(())
}

fn parse_state(text: &str) -> anyhow::Result<i32> {
    use proto::RunState as S;
    let state = match text.to_ascii_lowercase().as_str() {
        "pending" => S::Pending,
        "scheduled" => S::Scheduled,
        "running" => S::Running,
        "succeeded" => S::Succeeded,
        "failed" => S::Failed,
        "cancelled" | "canceled" => S::Cancelled,
        other => anyhow::bail!(
            "--state {other:?}: allowed: pending, scheduled, running, succeeded, failed, cancelled"
        ),
    };
    Ok(state as i32)
}

/// A key that makes a retried submit of this invocation idempotent.
fn request_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("jepactl-{}-{nanos}", std::process::id())
}
