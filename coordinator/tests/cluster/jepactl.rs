//! `jepactl` as a user runs it: the real binary against the test
//! coordinator.

use jepa_common::proto;

use crate::harness::*;

async fn jepactl(url: &str, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_jepactl"))
        .arg("--coordinator")
        .arg(url)
        .args(args)
        .output()
        .await
        .expect("failed to run jepactl");
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (output.status.code().unwrap_or(-1), text(output.stdout), text(output.stderr))
}

#[tokio::test]
async fn jepactl_submits_with_flags_lists_and_prints_metrics() {
    let mut cluster = Cluster::start().await;
    let url = cluster.running.url();
    let args = [
        "submit",
        "--preset",
        "tiny",
        "--context-scale",
        "0.65:1.0",
        "--conditioning",
        "none",
        "--name",
        "cli-run",
        "-o",
        "json",
    ];
    let (code, out, err) = jepactl(&url, &args).await;
    assert_eq!(code, 0, "{err}");
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["state"], "pending");
    assert_eq!(run["spec"]["mask"]["context_scale"], serde_json::json!([0.65, 1.0]));
    assert_eq!(run["spec"]["conditioning"]["kind"], "none");
    assert_eq!(run["spec"]["model"]["embed_dim"], 192);
    let run_id = run["id"].as_str().unwrap().to_string();

    let mut worker = cluster.worker("cli-host", 0, 1).await;
    worker.expect_start().await;
    worker.metrics(&run_id, 1, &[("train/loss", 10, 0.5), ("train/loss", 20, 0.25)]).await.unwrap();
    let (code, out, _) = jepactl(&url, &["metrics", &run_id, "--format", "csv"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        out.trim(),
        "series,step,value,wall_time_ms\ntrain/loss,10,0.5,1\ntrain/loss,20,0.25,1"
    );

    let (code, out, _) = jepactl(&url, &["list"]).await;
    assert_eq!(code, 0);
    assert!(out.lines().next().unwrap().starts_with("ID"), "{out}");
    assert!(out.contains("cli-run") && out.contains("scheduled"), "{out}");
    let (_, out, _) = jepactl(&url, &["workers", "-o", "json"]).await;
    let workers: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(workers["workers"][0]["allocations"][0]["run_id"], run_id.as_str());

    worker.report(&run_id, 1, S::Succeeded, false).await.unwrap();
    let (code, out, _) = jepactl(&url, &["watch", &run_id]).await;
    assert_eq!(code, 0);
    assert!(out.contains("succeeded"), "{out}");
    let (code, _, _) = jepactl(&url, &["cancel", &run_id]).await;
    assert_eq!(code, 1);
    let request = proto::GetRunRequest { run_id };
    assert_eq!(
        cluster.user.get_run(request).await.unwrap().into_inner().run.unwrap().state,
        S::Succeeded as i32
    );
}

#[tokio::test]
async fn jepactl_errors_read_as_one_line() {
    let cluster = Cluster::start().await;
    let url = cluster.running.url();
    let (code, _, err) = jepactl(&url, &["submit", "--context-scale", "0.9:0.1"]).await;
    assert_eq!(code, 1);
    assert!(err.starts_with("error: mask.context_scale: "), "{err}");
    let (code, _, err) = jepactl(&url, &["get", "run-000777"]).await;
    assert_eq!((code, err.trim()), (1, "error: not found: run run-000777 not found"));

    let (code, _, err) = jepactl("127.0.0.1:1", &["list"]).await;
    assert_eq!(code, 1);
    assert!(err.starts_with("error: cannot reach the coordinator at http://127.0.0.1:1"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
