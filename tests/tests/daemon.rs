//! The worker daemon end to end: real `jepa-coordinator` and `jepa-worker`
//! processes on loopback train tiny runs, are cancelled, killed and made to
//! crash.

use std::time::Duration;

use jepa_common::proto::{self, RunState};
use jepa_common::series;
use jepa_e2e::{
    bin, get_run, is, series as points, start_worker, submit, tiny_spec, wait_gone, wait_run,
    Coordinator, DEADLINE,
};

/// A pause per step that makes a tiny run last long enough to act on it.
const SLOW: (&str, &str) = ("JEPA_FAULT_SLOW_STEP_MS", "100");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_run_completes_with_metrics_and_a_loadable_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&dir.path().join("coord"), "30s");
    let _worker = start_worker(&coord.url, "w1", &dir.path().join("w1"), &[]);
    let mut user = coord.user().await;

    let mut spec = tiny_spec("complete", 20);
    spec.schedule.checkpoint_every = 10;
    spec.eval.enabled = true;
    (spec.eval.max_train, spec.eval.max_test, spec.eval.probe_epochs) = (256, 128, 5);
    let run_id = submit(&mut user, &spec).await;
    let run = wait_run(&mut user, &run_id, DEADLINE, |r| {
        is(r, RunState::Succeeded) || is(r, RunState::Failed)
    })
    .await;
    assert!(is(&run, RunState::Succeeded), "run failed: {}", run.message);
    assert_eq!(run.progress.as_ref().map(|p| p.step), Some(20));

    let loss = points(&mut user, &run_id, series::LOSS).await;
    let steps: Vec<u64> = loss.iter().map(|p| p.step).collect();
    assert_eq!(steps, (1..=20).collect::<Vec<_>>(), "one loss point per step");
    assert!(loss.iter().all(|p| p.value.is_finite() && p.value > 0.0));
    let top1 = points(&mut user, &run_id, series::PROBE_TOP1).await;
    assert_eq!(top1.len(), 1, "one probe at the end");
    let reported = top1[0].value;
    assert!((0.0..=1.0).contains(&reported), "probe top-1 {reported}");

    let request = proto::ListCheckpointsRequest { run_id: run_id.clone() };
    let listed = user.list_checkpoints(request).await.unwrap().into_inner().checkpoints;
    let steps: Vec<u64> = listed.iter().map(|c| c.step).collect();
    assert_eq!(steps, vec![10, 20], "every checkpoint is committed");

    // Download the final checkpoint with jepactl, then probe it with the
    // same spec: the weights must give the probe result the run reported.
    let weights = dir.path().join("final.safetensors");
    let status = std::process::Command::new(bin("jepactl"))
        .args(["--coordinator", &coord.url, "checkpoints", "download", &run_id, "-f"])
        .arg(&weights)
        .status()
        .unwrap();
    assert!(status.success(), "jepactl checkpoints download failed");
    let spec_path = dir.path().join("spec.toml");
    std::fs::write(&spec_path, spec.to_toml_string()).unwrap();
    let output = std::process::Command::new(bin("jepa-worker"))
        .args(["probe", "--features", "checkpoint", "--checkpoint"])
        .arg(&weights)
        .arg("--config")
        .arg(&spec_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "probe failed: {}", String::from_utf8_lossy(&output.stderr));
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let probed = line["top1"].as_f64().unwrap();
    assert!(
        (probed - reported).abs() < 1e-6,
        "the downloaded weights probe at {probed}, the run reported {reported}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_ends_within_seconds_and_leaves_no_trainer() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&dir.path().join("coord"), "30s");
    let work = dir.path().join("w1");
    let _worker = start_worker(&coord.url, "w1", &work, &[SLOW]);
    let mut user = coord.user().await;

    let run_id = submit(&mut user, &tiny_spec("cancel", 2_000)).await;
    wait_run(&mut user, &run_id, DEADLINE, |r| r.progress.as_ref().is_some_and(|p| p.step >= 5))
        .await;
    let trainers = format!("{}/runs/", work.display());
    assert_eq!(jepa_e2e::processes_mentioning(&trainers).len(), 1, "one trainer runs");

    let request = proto::CancelRunRequest { run_id: run_id.clone(), reason: "test".into() };
    user.cancel_run(request).await.unwrap();
    let run =
        wait_run(&mut user, &run_id, Duration::from_secs(5), |r| is(r, RunState::Cancelled)).await;
    assert!(run.message.contains("test"), "{}", run.message);
    let left = wait_gone(&trainers, Duration::from_secs(15)).await;
    assert!(left.is_empty(), "trainer processes left: {left:?}");
    // The worker confirmed the stop and holds nothing any more.
    let request = proto::ListWorkersRequest { include_lost: false };
    let start = tokio::time::Instant::now();
    loop {
        let workers = user.list_workers(request).await.unwrap().into_inner().workers;
        if workers.iter().all(|w| w.allocations.is_empty()) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "the slot was not freed: {workers:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_s_run_resumes_on_another_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&dir.path().join("coord"), "3s");
    let first_dir = dir.path().join("first");
    let mut first = start_worker(&coord.url, "first", &first_dir, &[SLOW]);
    let mut user = coord.user().await;

    let steps = 60;
    let run_id = submit(&mut user, &tiny_spec("moves", steps)).await;
    let run = wait_run(&mut user, &run_id, DEADLINE, |r| is(r, RunState::Running)).await;
    let first_id = run.attempts[0].placements[0].worker_id.clone();
    let _second = start_worker(&coord.url, "second", &dir.path().join("second"), &[SLOW]);
    // Kill the first worker once two checkpoints are committed and training
    // has gone on past the newest.
    let run = wait_run(&mut user, &run_id, DEADLINE, |r| {
        r.last_checkpoint_step.unwrap_or(0) >= 10
            && r.progress.as_ref().is_some_and(|p| p.step > r.last_checkpoint_step.unwrap_or(0) + 2)
    })
    .await;
    let committed = run.last_checkpoint_step.unwrap();
    first.kill();
    let left = wait_gone(&first_dir.display().to_string(), Duration::from_secs(5)).await;
    assert!(left.is_empty(), "the killed worker's trainer outlived it: {left:?}");

    let run = wait_run(&mut user, &run_id, DEADLINE, |r| {
        is(r, RunState::Succeeded) || is(r, RunState::Failed)
    })
    .await;
    assert!(is(&run, RunState::Succeeded), "run failed: {}", run.message);
    assert_eq!(run.attempts.len(), 2, "one attempt per worker");
    let second = &run.attempts[1];
    assert_ne!(second.placements[0].worker_id, first_id, "the run moved");
    let resumed = second.resume_step.expect("the second attempt resumed");
    assert!(
        resumed >= committed && resumed % 5 == 0,
        "resumed at {resumed}, {committed} committed"
    );

    // Steps the first attempt logged after its checkpoint were trained
    // again; each step still has exactly one point.
    let loss = points(&mut user, &run_id, series::LOSS).await;
    let logged: Vec<u64> = loss.iter().map(|p| p.step).collect();
    assert_eq!(logged, (1..=steps).collect::<Vec<_>>());
    let run_after = get_run(&mut user, &run_id).await;
    assert_eq!(run_after.progress.map(|p| p.step), Some(steps));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_trainer_fails_the_run_with_its_error() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&dir.path().join("coord"), "30s");
    let fault = [("JEPA_FAULT_CRASH_AT_STEP", "7")];
    let _worker = start_worker(&coord.url, "w1", &dir.path().join("w1"), &fault);
    let mut user = coord.user().await;

    let mut spec = tiny_spec("crash", 20);
    spec.max_restarts = 0;
    let run_id = submit(&mut user, &spec).await;
    let run = wait_run(&mut user, &run_id, DEADLINE, |r| {
        is(r, RunState::Failed) || is(r, RunState::Succeeded)
    })
    .await;
    assert!(is(&run, RunState::Failed));
    assert!(run.message.contains("injected fault: crash at step 7"), "{}", run.message);
    assert!(run.message.contains("no restart left"), "{}", run.message);
    assert_eq!(run.attempts.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashing_trainer_restarts_from_its_checkpoint_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let coord = Coordinator::start(&dir.path().join("coord"), "30s");
    // Only the first attempt crashes.
    let fault = [("JEPA_FAULT_CRASH_AT_STEP", "7@1")];
    let _worker = start_worker(&coord.url, "w1", &dir.path().join("w1"), &fault);
    let mut user = coord.user().await;

    let mut spec = tiny_spec("restart", 20);
    spec.max_restarts = 1;
    let run_id = submit(&mut user, &spec).await;
    let run = wait_run(&mut user, &run_id, DEADLINE, |r| {
        is(r, RunState::Failed) || is(r, RunState::Succeeded)
    })
    .await;
    assert!(is(&run, RunState::Succeeded), "run failed: {}", run.message);
    assert_eq!(run.restarts, 1);
    assert_eq!(run.attempts.len(), 2);
    assert!(
        run.attempts[0].end_reason.contains("injected fault"),
        "{}",
        run.attempts[0].end_reason
    );
    assert_eq!(run.attempts[1].resume_step, Some(5), "the checkpoint before the crash");
    let loss = points(&mut user, &run_id, series::LOSS).await;
    assert_eq!(loss.iter().map(|p| p.step).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
}
