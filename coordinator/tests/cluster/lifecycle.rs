//! A run's life: placement, reports, metrics, checkpoints, lease expiry and
//! restarts, failures, cancel and watch.

use jepa_common::proto::{self, watch_run_response::Event};
use tonic::Code;

use crate::harness::*;

#[tokio::test]
async fn run_goes_from_submit_to_success_and_frees_its_slot() {
    let mut cluster = Cluster::start().await;
    let mut worker = cluster.worker("cpu-host", 0, 2).await;

    let run = cluster.submit(&cpu_spec("life")).await.unwrap();
    assert_eq!(run.state, S::Scheduled as i32);
    let start = worker.expect_start().await;
    assert_eq!((start.run_id.as_str(), start.attempt, start.world_size), (run.id.as_str(), 1, 1));
    assert_eq!(start.ranks[0].rank, 0);
    assert_eq!(start.ranks[0].gpu_index, None);
    assert_eq!(start.rank0_worker_id, worker.id);
    assert!(start.resume_from.is_none());

    worker.report(&run.id, 1, S::Running, false).await.unwrap();
    assert_eq!(cluster.run(&run.id).await.state, S::Running as i32);
    worker
        .metrics(&run.id, 1, &[("train/loss", 10, 0.7), ("train/images_per_sec", 10, 900.0)])
        .await
        .unwrap();
    let reply = worker.report(&run.id, 1, S::Succeeded, false).await.unwrap();
    assert_eq!(reply.run_state, S::Succeeded as i32);

    let done = cluster.run(&run.id).await;
    assert_eq!(done.state, S::Succeeded as i32);
    let progress = done.progress.unwrap();
    assert_eq!(
        (progress.step, progress.loss, progress.images_per_sec),
        (10, Some(0.7), Some(900.0))
    );
    assert!(done.finished_ms > 0 && done.started_ms > 0);
    let workers = cluster.workers().await;
    assert!(workers[0].allocations.is_empty(), "slot not freed: {:?}", workers[0].allocations);

    let request = proto::GetRunRequest { run_id: run.id.clone() };
    let events = cluster.user.get_run(request).await.unwrap().into_inner().events;
    let states: Vec<i32> = events.iter().map(|e| e.to).collect();
    let expected = [S::Pending, S::Scheduled, S::Running, S::Succeeded].map(|s| s as i32);
    assert_eq!(states, expected);
}

#[tokio::test]
async fn lease_expiry_requeues_and_resumes_from_the_last_checkpoint() {
    let mut cluster = Cluster::start().await;
    let mut first = cluster.worker("gpu-a", 1, 0).await;
    let mut spec = gpu_spec("resume", 1, 1);
    spec.max_restarts = 1;
    let run = cluster.submit(&spec).await.unwrap();
    first.expect_start().await;
    first.report(&run.id, 1, S::Running, false).await.unwrap();
    let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    first.upload(&run.id, 1, 100, &bytes, None).await.unwrap();

    assert_eq!(cluster.expire_leases().await, 1);
    let requeued = cluster.run(&run.id).await;
    assert_eq!(requeued.state, S::Pending as i32);
    assert_eq!(requeued.restarts, 1);
    assert_eq!(requeued.attempts[0].end_reason, format!("lease of worker {} expired", first.id));
    assert_eq!(requeued.pending_reason, "no live workers");
    let err = first.heartbeat(&[(&run.id, 1)]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = first.report(&run.id, 1, S::Running, false).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    let mut second = cluster.worker("gpu-b", 1, 0).await;
    let start = second.expect_start().await;
    assert_eq!(start.attempt, 2);
    let resume = start.resume_from.expect("second attempt resumes");
    assert_eq!((resume.step, resume.size_bytes), (100, bytes.len() as u64));
    assert_eq!(download(&mut cluster.user, &run.id, Some(resume.step)).await, bytes);
    assert_eq!(cluster.run(&run.id).await.attempts[1].resume_step, Some(100));

    // The second loss uses the last restart: the run fails for good.
    let beat = second.heartbeat(&[(&run.id, 2)]).await.unwrap();
    assert_eq!(beat.assignments.len(), 1);
    cluster.clock.advance(LEASE_MS + 1);
    cluster.coord().expire_leases().await.unwrap();
    let failed = cluster.run(&run.id).await;
    assert_eq!(failed.state, S::Failed as i32);
    assert!(failed.message.contains("no restart left"), "{}", failed.message);
}

#[tokio::test]
async fn heartbeats_keep_the_lease() {
    let mut cluster = Cluster::start().await;
    let mut worker = cluster.worker("steady", 1, 0).await;
    let run = cluster.submit(&gpu_spec("steady", 1, 1)).await.unwrap();
    worker.expect_start().await;
    for _ in 0..5 {
        cluster.clock.advance(LEASE_MS / 2);
        let beat = worker.heartbeat(&[(&run.id, 1)]).await.unwrap();
        assert_eq!(beat.assignments.len(), 1);
        assert!(beat.stop.is_empty());
        assert_eq!(cluster.coord().expire_leases().await.unwrap(), 0);
    }
    assert_eq!(cluster.run(&run.id).await.state, S::Scheduled as i32);
}

#[tokio::test]
async fn failures_restart_only_when_retryable() {
    let mut cluster = Cluster::start().await;
    let mut worker = cluster.worker("flaky", 1, 0).await;
    let run = cluster.submit(&gpu_spec("flaky", 1, 1)).await.unwrap();
    worker.expect_start().await;
    let reply = worker.report(&run.id, 1, S::Failed, true).await.unwrap();
    assert!(reply.stop);
    // The GPU was freed by the report, so attempt 2 starts at once.
    let start = worker.expect_start().await;
    assert_eq!(start.attempt, 2);
    worker.report(&run.id, 2, S::Failed, false).await.unwrap();
    let failed = cluster.run(&run.id).await;
    assert_eq!(failed.state, S::Failed as i32);
    assert_eq!(failed.restarts, 1);
    assert!(failed.message.contains("failed"), "{}", failed.message);
}

#[tokio::test]
async fn cancel_stops_workers_and_frees_the_gpu_only_after_they_confirm() {
    let mut cluster = Cluster::start().await;
    let mut worker = cluster.worker("one-gpu", 1, 0).await;
    let first = cluster.submit(&gpu_spec("first", 1, 1)).await.unwrap();
    worker.expect_start().await;
    worker.report(&first.id, 1, S::Running, false).await.unwrap();
    let second = cluster.submit(&gpu_spec("second", 1, 1)).await.unwrap();
    assert_eq!(second.state, S::Pending as i32);

    let request = proto::CancelRunRequest { run_id: first.id.clone(), reason: "wrong lr".into() };
    let cancelled = cluster.user.cancel_run(request).await.unwrap().into_inner().run.unwrap();
    assert_eq!(cancelled.state, S::Cancelled as i32);
    assert_eq!(cancelled.message, "cancelled by user: wrong lr");
    let stop = worker.expect_stop().await;
    assert_eq!((stop.run_id.as_str(), stop.attempt), (first.id.as_str(), 1));
    // The GPU is still draining: the second run must wait.
    assert_eq!(cluster.run(&second.id).await.state, S::Pending as i32);
    let err = worker.report(&first.id, 1, S::Running, false).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    worker.report(&first.id, 1, S::Cancelled, false).await.unwrap();
    assert_eq!(worker.expect_start().await.run_id, second.id);
    assert_eq!(cluster.run(&first.id).await.state, S::Cancelled as i32);

    let again = proto::CancelRunRequest { run_id: first.id.clone(), reason: String::new() };
    assert_eq!(cluster.user.cancel_run(again).await.unwrap_err().code(), Code::FailedPrecondition);
    let unknown = proto::CancelRunRequest { run_id: "run-999999".into(), reason: String::new() };
    assert_eq!(cluster.user.cancel_run(unknown).await.unwrap_err().code(), Code::NotFound);
}

#[tokio::test]
async fn heartbeat_frees_a_stopped_attempt_the_worker_no_longer_runs() {
    let mut cluster = Cluster::start().await;
    let mut worker = cluster.worker("quiet", 1, 0).await;
    let first = cluster.submit(&gpu_spec("first", 1, 1)).await.unwrap();
    worker.expect_start().await;
    let request = proto::CancelRunRequest { run_id: first.id.clone(), reason: String::new() };
    cluster.user.cancel_run(request).await.unwrap();
    worker.expect_stop().await;
    let second = cluster.submit(&gpu_spec("second", 1, 1)).await.unwrap();
    assert_eq!(second.state, S::Pending as i32);

    let beat = worker.heartbeat(&[(&first.id, 1)]).await.unwrap();
    assert_eq!(beat.stop.len(), 1, "the cancelled attempt must be listed to stop");
    let beat = worker.heartbeat(&[]).await.unwrap();
    assert_eq!(beat.assignments.len(), 1);
    assert_eq!(beat.assignments[0].run_id, second.id);
}

#[tokio::test]
async fn pending_runs_cancel_at_once() {
    let mut cluster = Cluster::start().await;
    let run = cluster.submit(&cpu_spec("nowhere")).await.unwrap();
    assert_eq!(run.pending_reason, "no live workers");
    let request = proto::CancelRunRequest { run_id: run.id.clone(), reason: String::new() };
    let cancelled = cluster.user.cancel_run(request).await.unwrap().into_inner().run.unwrap();
    assert_eq!(cancelled.state, S::Cancelled as i32);
    // A worker arriving later gets nothing.
    let mut worker = cluster.worker("late", 0, 1).await;
    assert!(worker.heartbeat(&[]).await.unwrap().assignments.is_empty());
}

#[tokio::test]
async fn metric_reports_are_idempotent() {
    let mut cluster = Cluster::start().await;
    let mut worker = cluster.worker("metrics", 0, 1).await;
    let run = cluster.submit(&cpu_spec("metrics")).await.unwrap();
    worker.expect_start().await;

    let points: Vec<(&str, u64, f64)> =
        (0..100).map(|s| ("train/loss", s * 10, 1.0 / (s + 1) as f64)).collect();
    let first = worker.metrics(&run.id, 1, &points).await.unwrap();
    assert_eq!((first.accepted, first.duplicates), (100, 0));
    let replay = worker.metrics(&run.id, 1, &points).await.unwrap();
    assert_eq!((replay.accepted, replay.duplicates), (0, 100));
    let doubled =
        worker.metrics(&run.id, 1, &[("eval/top1", 5, 0.5), ("eval/top1", 5, 0.5)]).await.unwrap();
    assert_eq!((doubled.accepted, doubled.duplicates), (1, 1));

    let query = |series: Vec<String>, from, to| proto::GetMetricsRequest {
        run_id: run.id.clone(),
        series,
        step_from: from,
        step_to: to,
        limit: 0,
    };
    let all = cluster.user.get_metrics(query(vec![], 0, None)).await.unwrap().into_inner().series;
    let names: Vec<&str> = all.iter().map(|s| s.series.as_str()).collect();
    assert_eq!(names, vec!["eval/top1", "train/loss"]);
    assert_eq!(all[1].points.len(), 100);
    let range = cluster
        .user
        .get_metrics(query(vec!["train/loss".into()], 100, Some(190)))
        .await
        .unwrap()
        .into_inner()
        .series;
    let steps: Vec<u64> = range[0].points.iter().map(|p| p.step).collect();
    assert_eq!(steps, (10..20).map(|s| s * 10).collect::<Vec<_>>());
    assert_eq!(range[0].points[0].value, 1.0 / 11.0);

    // A series across several storage blocks, queried by range and limit.
    let long: Vec<(&str, u64, f64)> = (0..100).map(|i| ("train/lr", i * 50, i as f64)).collect();
    assert_eq!(worker.metrics(&run.id, 1, &long).await.unwrap().accepted, 100);
    let mixed = worker
        .metrics(&run.id, 1, &[("train/lr", 2500, -1.0), ("train/lr", 9999, 0.0)])
        .await
        .unwrap();
    assert_eq!((mixed.accepted, mixed.duplicates), (1, 1));
    let mut request = query(vec!["train/lr".into()], 1000, Some(3000));
    let window = cluster.user.get_metrics(request.clone()).await.unwrap().into_inner().series;
    assert_eq!(window[0].points.len(), 41);
    assert_eq!(window[0].points[30].value, -1.0, "a replayed point keeps the newest value");
    request.limit = 5;
    let limited = cluster.user.get_metrics(request).await.unwrap().into_inner().series;
    let steps: Vec<u64> = limited[0].points.iter().map(|p| p.step).collect();
    assert_eq!(steps, vec![1000, 1050, 1100, 1150, 1200]);

    let bad = worker.metrics(&run.id, 1, &[("", 1, 1.0)]).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("points[0].series"), "{}", bad.message());
    let unknown = worker.metrics("run-424242", 1, &[("x", 1, 1.0)]).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let future = worker.metrics(&run.id, 9, &[("x", 1, 1.0)]).await.unwrap_err();
    assert_eq!(future.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn bad_checkpoints_are_never_committed() {
    let mut cluster = Cluster::start().await;
    let mut worker = cluster.worker("ckpt", 0, 1).await;
    let run = cluster.submit(&cpu_spec("ckpt")).await.unwrap();
    worker.expect_start().await;
    let bytes = vec![7u8; 5000];

    let wrong = worker.upload(&run.id, 1, 10, &bytes, Some("0".repeat(64))).await.unwrap_err();
    assert_eq!(wrong.code(), Code::DataLoss);
    let malformed = worker.upload(&run.id, 1, 10, &bytes, Some("xyz".into())).await.unwrap_err();
    assert_eq!(malformed.code(), Code::InvalidArgument);
    let stale = worker.upload(&run.id, 2, 10, &bytes, None).await.unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let request = proto::ListCheckpointsRequest { run_id: run.id.clone() };
    assert!(cluster
        .user
        .list_checkpoints(request.clone())
        .await
        .unwrap()
        .into_inner()
        .checkpoints
        .is_empty());

    let info = worker.upload(&run.id, 1, 10, &bytes, None).await.unwrap();
    assert_eq!(info.size_bytes, 5000);
    let replaced = vec![9u8; 3000];
    worker.upload(&run.id, 1, 10, &replaced, None).await.unwrap();
    let list = cluster.user.list_checkpoints(request).await.unwrap().into_inner().checkpoints;
    assert_eq!(list.len(), 1);
    assert_eq!(download(&mut cluster.user, &run.id, None).await, replaced);
    assert_eq!(cluster.run(&run.id).await.last_checkpoint_step, Some(10));
}

#[tokio::test]
async fn watch_streams_state_changes_and_metrics_until_the_end() {
    let mut cluster = Cluster::start().await;
    let run = cluster.submit(&cpu_spec("watched")).await.unwrap();
    let request = proto::WatchRunRequest { run_id: run.id.clone(), metrics: true, series: vec![] };
    let mut stream = cluster.user.watch_run(request).await.unwrap().into_inner();
    let mut worker = cluster.worker("watch-host", 0, 1).await;
    worker.expect_start().await;
    worker.report(&run.id, 1, S::Running, false).await.unwrap();
    worker.metrics(&run.id, 1, &[("train/loss", 1, 0.5)]).await.unwrap();
    worker.report(&run.id, 1, S::Succeeded, false).await.unwrap();

    let mut states = Vec::new();
    let mut metric_points = 0;
    while let Some(message) =
        tokio::time::timeout(DEADLINE, stream.message()).await.unwrap().unwrap()
    {
        match message.event.unwrap() {
            Event::Run(r) => {
                if states.last() != Some(&r.state) {
                    states.push(r.state);
                }
            }
            Event::Metrics(batch) => metric_points += batch.points.len(),
        }
    }
    let expected = [S::Pending, S::Scheduled, S::Running, S::Succeeded].map(|s| s as i32);
    assert_eq!(states, expected);
    assert_eq!(metric_points, 1);
}
