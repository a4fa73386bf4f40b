//! `jepactl watch`: a live progress bar (step, loss, throughput, ETA) fed
//! by the coordinator's watch stream; with `--output json`, one JSON line
//! per event instead.

use std::process::ExitCode;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use jepa_common::proto::{self, user_service_client::UserServiceClient, watch_run_response::Event};
use tonic::transport::Channel;

use super::output::run_json;
use crate::core::{is_terminal, state_name};

/// Follows a run until it finishes; the exit code says whether it
/// succeeded.
///
/// # Errors
///
/// Fails when the stream cannot be opened or breaks.
pub async fn watch(
    client: &mut UserServiceClient<Channel>,
    run_id: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let request =
        proto::WatchRunRequest { run_id: run_id.to_string(), metrics: json, series: Vec::new() };
    let mut stream = client.watch_run(request).await?.into_inner();
    let bar = ProgressBar::new(0);
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps  {msg}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(run_id.to_string());
    bar.enable_steady_tick(Duration::from_millis(500));

    let mut last_state = proto::RunState::Unspecified as i32;
    while let Some(message) = stream.message().await? {
        match message.event {
            Some(Event::Run(run)) => {
                last_state = run.state;
                if json {
                    println!("{}", serde_json::json!({ "run": run_json(&run) }));
                    continue;
                }
                update_bar(&bar, &run);
            }
            Some(Event::Metrics(batch)) => {
                let points: Vec<_> = batch
                    .points
                    .iter()
                    .map(|p| serde_json::json!({ "series": p.series, "step": p.step, "value": p.value }))
                    .collect();
                println!("{}", serde_json::json!({ "metrics": points }));
            }
            None => {}
        }
    }
    bar.finish();
    if !json {
        println!("{run_id} {}", state_name(last_state));
    }
    let ok = last_state == proto::RunState::Succeeded as i32;
    if !is_terminal(last_state) {
        anyhow::bail!("the watch stream ended before {run_id} finished");
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn update_bar(bar: &ProgressBar, run: &proto::Run) {
    let progress = run.progress.unwrap_or_default();
    bar.set_length(progress.total_steps);
    bar.set_position(progress.step);
    let mut parts = vec![state_name(run.state).to_string()];
    if let Some(loss) = progress.loss {
        parts.push(format!("loss {loss:.4}"));
    }
    if let Some(ips) = progress.images_per_sec {
        parts.push(format!("{ips:.0} img/s"));
    }
    if !run.pending_reason.is_empty() {
        parts.push(run.pending_reason.clone());
    }
    bar.set_message(parts.join("  "));
}
