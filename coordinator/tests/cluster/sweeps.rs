//! Sweeps: the limit on trials at once, cancellation, failures that leave
//! the other trials alone, and the report built from stored metrics.

use jepa_common::proto::{self, RunState as S, SweepState};
use jepa_common::series;

use crate::harness::*;

fn axis(field: &str, values: &[&str]) -> proto::SweepAxis {
    proto::SweepAxis { field: field.into(), values: values.iter().map(|v| v.to_string()).collect() }
}

async fn submit_sweep(
    cluster: &mut Cluster,
    axes: Vec<proto::SweepAxis>,
    max_parallel: u32,
) -> proto::Sweep {
    let request = proto::SubmitSweepRequest {
        name: "ctx".into(),
        base: Some((&cpu_spec("base")).into()),
        axes,
        min_gpu_memory_bytes: 0,
        max_parallel,
    };
    cluster.user.submit_sweep(request).await.unwrap().into_inner().sweep.unwrap()
}

async fn get_sweep(cluster: &mut Cluster, sweep_id: &str) -> proto::GetSweepResponse {
    let request = proto::GetSweepRequest { sweep_id: sweep_id.into() };
    cluster.user.get_sweep(request).await.unwrap().into_inner()
}

#[tokio::test]
async fn the_limit_holds_trials_back_until_one_ends() {
    let mut cluster = Cluster::start().await;
    let mut worker = cluster.worker("w", 0, 8).await;
    let sweep = submit_sweep(&mut cluster, vec![axis("seed", &["0", "1", "2", "3"])], 2).await;
    let first = worker.expect_start().await;
    let second = worker.expect_start().await;
    assert_eq!((first.run_id.as_str(), second.run_id.as_str()), ("run-000001", "run-000002"));
    let got = get_sweep(&mut cluster, &sweep.id).await;
    assert_eq!(got.state(), SweepState::Running);
    let counts = got.counts.unwrap();
    assert_eq!((counts.scheduled, counts.pending), (2, 2));
    assert!(
        got.runs[2].pending_reason.contains("limit of 2 trials at once"),
        "{}",
        got.runs[2].pending_reason
    );

    // A failed trial frees its place and leaves the others running.
    worker.report(&first.run_id, 1, S::Failed, false).await.unwrap();
    let third = worker.expect_start().await;
    assert_eq!(third.run_id, "run-000003");
    let got = get_sweep(&mut cluster, &sweep.id).await;
    assert_eq!(got.runs[1].state, S::Scheduled as i32, "the failure stopped no other trial");
    assert_eq!(got.counts.unwrap().failed, 1);
}

#[tokio::test]
async fn cancelling_a_sweep_cancels_only_its_unfinished_trials() {
    let mut cluster = Cluster::start().await;
    let mut worker = cluster.worker("w", 0, 2).await;
    let sweep = submit_sweep(&mut cluster, vec![axis("seed", &["0", "1", "2"])], 0).await;
    let first = worker.expect_start().await;
    let second = worker.expect_start().await;
    worker.report(&first.run_id, 1, S::Succeeded, false).await.unwrap();
    // The freed slot takes the third trial.
    let third = worker.expect_start().await;

    let request = proto::CancelSweepRequest { sweep_id: sweep.id.clone(), reason: "enough".into() };
    let reply = cluster.user.cancel_sweep(request).await.unwrap().into_inner();
    assert_eq!(reply.cancelled, 2);
    assert_eq!(reply.state(), SweepState::Cancelled);
    let stops = [worker.expect_stop().await.run_id, worker.expect_stop().await.run_id];
    assert!(stops.contains(&second.run_id) && stops.contains(&third.run_id), "{stops:?}");
    let got = get_sweep(&mut cluster, &sweep.id).await;
    let states: Vec<i32> = got.runs.iter().map(|r| r.state).collect();
    assert_eq!(states, vec![S::Succeeded as i32, S::Cancelled as i32, S::Cancelled as i32]);
    assert!(got.runs[1].message.contains("enough"), "{}", got.runs[1].message);

    let missing =
        proto::CancelSweepRequest { sweep_id: "swp-000099".into(), reason: String::new() };
    let err = cluster.user.cancel_sweep(missing).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn the_report_summarises_stored_final_values() {
    let mut cluster = Cluster::start().await;
    let mut worker = cluster.worker("w", 0, 8).await;
    let axes = vec![
        axis("mask.context_scale", &["0.4:1.0", "0.85:1.0"]),
        axis("conditioning.kind", &["none", "ec"]),
        axis("seed", &["0", "1"]),
    ];
    let sweep = submit_sweep(&mut cluster, axes, 0).await;
    // Final probe top-1 per trial (scale-major, then conditioning, then
    // seed); trial 5 fails before reporting.
    let finals = [0.60, 0.64, 0.70, 0.72, 0.80, f64::NAN, 0.75, 0.77];
    for _ in 0..8 {
        let a = worker.expect_start().await;
        let index = sweep.run_ids.iter().position(|id| *id == a.run_id).unwrap();
        if finals[index].is_nan() {
            worker.report(&a.run_id, 1, S::Failed, false).await.unwrap();
            continue;
        }
        // An earlier evaluation must not be taken for the final one.
        let points = [(series::PROBE_TOP1, 50, 0.1), (series::PROBE_TOP1, 100, finals[index])];
        worker.metrics(&a.run_id, 1, &points).await.unwrap();
        worker.report(&a.run_id, 1, S::Succeeded, false).await.unwrap();
    }

    let request =
        proto::GetSweepReportRequest { sweep_id: sweep.id.clone(), metric: String::new() };
    let report = cluster.user.get_sweep_report(request).await.unwrap().into_inner();
    assert_eq!(report.metric, series::PROBE_TOP1);
    assert_eq!(report.state(), SweepState::Failed);
    let rows: Vec<(&str, &str, u32, Option<f64>)> = report
        .rows
        .iter()
        .map(|r| (r.context_scale.as_str(), r.line.as_str(), r.reported, r.mean))
        .collect();
    let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-12);
    assert_eq!(rows.len(), 4);
    assert_eq!((rows[0].0, rows[0].1), ("0.4:1.0", "conditioning.kind=none"));
    assert!(close(rows[0].3, 0.62) && close(rows[1].3, 0.71));
    assert!(close(rows[2].3, 0.80) && close(rows[3].3, 0.76));
    assert_eq!(rows[2].2, 1);
    assert_eq!(report.rows[2].missing, vec![format!("{} (failed)", sweep.run_ids[5])]);
    assert!(close(report.rows[0].drop_from_best, 0.18));
    assert!(close(report.rows[1].drop_from_best, 0.05));
    assert!(close(report.rows[3].drop_from_best, 0.0));

    let bad = proto::GetSweepReportRequest { sweep_id: sweep.id, metric: "a\u{1}b".into() };
    let err = cluster.user.get_sweep_report(bad).await.unwrap_err();
    assert!(err.message().starts_with("metric: "), "{}", err.message());
}
