//! Durability: a restart on the same folder keeps everything, and an
//! acknowledged change survives a kill -9 of the coordinator process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use jepa_common::proto::{
    self, user_service_client::UserServiceClient, worker_service_client::WorkerServiceClient,
};
use tonic::transport::Channel;

use crate::harness::*;

#[tokio::test]
async fn restart_on_the_same_folder_keeps_everything() {
    let mut cluster = Cluster::start().await;
    let mut worker = cluster.worker("keeper", 2, 0).await;
    let running = cluster.submit(&gpu_spec("running", 1, 1)).await.unwrap();
    worker.expect_start().await;
    worker.report(&running.id, 1, S::Running, false).await.unwrap();
    worker
        .metrics(&running.id, 1, &[("train/loss", 1, 0.9), ("train/loss", 2, 0.8)])
        .await
        .unwrap();
    let bytes = vec![3u8; 9000];
    worker.upload(&running.id, 1, 2, &bytes, None).await.unwrap();
    let waiting = cluster.submit(&gpu_spec("waiting", 4, 1)).await.unwrap();
    let cancelled = cluster.submit(&cpu_spec("cancelled")).await.unwrap();
    let request = proto::CancelRunRequest { run_id: cancelled.id.clone(), reason: String::new() };
    cluster.user.cancel_run(request).await.unwrap();
    let before_events = event_count(&mut cluster.user, &running.id).await;
    let worker_id = worker.id.clone();
    drop(worker);

    let mut cluster = cluster.restart().await;
    let run = cluster.run(&running.id).await;
    assert_eq!(run.state, S::Running as i32);
    assert_eq!(run.progress.unwrap().loss, Some(0.8));
    assert_eq!(run.last_checkpoint_step, Some(2));
    assert_eq!(event_count(&mut cluster.user, &running.id).await, before_events);
    assert_eq!(cluster.run(&cancelled.id).await.state, S::Cancelled as i32);
    let waiting = cluster.run(&waiting.id).await;
    assert_eq!(waiting.state, S::Pending as i32);
    assert_eq!(waiting.pending_reason, "needs 4 GPUs on 1 host; largest free host has 1");
    assert_eq!(download(&mut cluster.user, &running.id, Some(2)).await, bytes);
    let request = proto::GetMetricsRequest { run_id: running.id.clone(), ..Default::default() };
    let series = cluster.user.get_metrics(request).await.unwrap().into_inner().series;
    assert_eq!(series[0].points.len(), 2);

    // The daemon carries on without registering again.
    let client = WorkerServiceClient::new(cluster.channel.clone());
    let mut worker = FakeWorker::connect(worker_id, client).await;
    assert_eq!(worker.expect_start().await.run_id, running.id);
    let beat = worker.heartbeat(&[(&running.id, 1)]).await.unwrap();
    assert_eq!(beat.assignments.len(), 1);
    worker.report(&running.id, 1, S::Succeeded, false).await.unwrap();

    let next = cluster.submit(&cpu_spec("after")).await.unwrap();
    assert!(next.submit_seq > cancelled.submit_seq, "ids must not be reused after a restart");
}

async fn event_count(user: &mut UserServiceClient<Channel>, run_id: &str) -> usize {
    let request = proto::GetRunRequest { run_id: run_id.into() };
    user.get_run(request).await.unwrap().into_inner().events.len()
}

/// Starts the real binary on a free port and returns it with its address.
fn spawn_coordinator(dir: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_jepa-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--log-json", "--data-dir"])
        .arg(dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start jepa-coordinator");
    let stderr = child.stderr.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if let Some(addr) = event["fields"]["addr"].as_str() {
                let _ = sender.send(addr.to_string());
            }
        }
    });
    let addr = receiver.recv_timeout(DEADLINE).expect("coordinator did not report its address");
    (child, format!("http://{addr}"))
}

#[tokio::test]
async fn acknowledged_changes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = spawn_coordinator(dir.path());
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let mut user = UserServiceClient::new(channel.clone());
    let mut workers = WorkerServiceClient::new(channel);
    let resources = proto::WorkerResources { cpu_slots: 1, ..Default::default() };
    let request = proto::RegisterRequest {
        name: "k9".into(),
        resources: Some(resources),
        ..Default::default()
    };
    workers.register(request).await.unwrap();
    let mut ids = Vec::new();
    for i in 0..20 {
        let spec = cpu_spec(&format!("k9-{i}"));
        let request = proto::SubmitRunRequest { spec: Some((&spec).into()), ..Default::default() };
        ids.push(user.submit_run(request).await.unwrap().into_inner().run.unwrap().id);
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let (mut child, url) = spawn_coordinator(dir.path());
    let mut user = UserServiceClient::connect(url).await.unwrap();
    let runs = user.list_runs(proto::ListRunsRequest::default()).await.unwrap().into_inner().runs;
    let mut listed: Vec<String> = runs.iter().map(|r| r.id.clone()).collect();
    listed.reverse();
    assert_eq!(listed, ids);
    assert_eq!(runs.last().unwrap().state, S::Scheduled as i32, "the first run held the slot");
    assert_eq!(runs.iter().filter(|r| r.state == S::Pending as i32).count(), 19);
    let workers =
        user.list_workers(proto::ListWorkersRequest { include_lost: true }).await.unwrap();
    assert_eq!(workers.into_inner().workers.len(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
}
