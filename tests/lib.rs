//! End-to-end tests of the training system. They start real coordinator and
//! worker processes on `127.0.0.1:0` and live under `tests/tests/`.
//!
//! This library holds what the tests share: finding the workspace's
//! binaries, starting and stopping the processes, gRPC clients, and polling
//! helpers. The binaries must be built first; `cargo test --workspace`
//! (and so `make test`) builds them before any test runs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use jepa_common::proto::{self, user_service_client::UserServiceClient, RunState};
use jepa_common::spec::{DatasetKind, RunSpec};
use tonic::transport::Channel;

/// Longest any test waits for one condition.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// Path of a workspace binary, beside the test executable's folder.
///
/// # Panics
///
/// When the binary has not been built.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target folder");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing; build the binaries first: cargo build --workspace --bins",
        path.display()
    );
    path
}

/// A process that is killed (SIGKILL) when dropped, so a failing test
/// leaves nothing behind.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
}

impl Proc {
    /// The operating-system pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit; returns whether
    /// it exited successfully in time.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut child) = self.child.take() else { return false };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let start = std::time::Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A coordinator process with its address.
#[derive(Debug)]
pub struct Coordinator {
    /// The process.
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
}

impl Coordinator {
    /// Starts `jepa-coordinator` on a free port with its state in `dir` and
    /// a short lease, so a lost worker is noticed within seconds.
    ///
    /// # Panics
    ///
    /// When it does not start or report its address.
    pub fn start(dir: &Path, lease: &str) -> Coordinator {
        let mut child = Command::new(bin("jepa-coordinator"))
            .args(["--listen", "127.0.0.1:0", "--log-json", "--lease-timeout", lease])
            .arg("--data-dir")
            .arg(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start jepa-coordinator");
        let stderr = child.stderr.take().expect("piped stderr");
        let (sender, receiver) = std::sync::mpsc::channel();
        // Keeps draining the log so the coordinator never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
                if let Some(addr) = event["fields"]["addr"].as_str() {
                    let _ = sender.send(addr.to_string());
                }
            }
        });
        let addr = receiver
            .recv_timeout(Duration::from_secs(30))
            .expect("the coordinator did not report its address");
        Coordinator { proc: Proc { child: Some(child) }, url: format!("http://{addr}") }
    }

    /// A client of the user API.
    ///
    /// # Panics
    ///
    /// When the coordinator cannot be reached.
    pub async fn user(&self) -> UserServiceClient<Channel> {
        UserServiceClient::connect(self.url.clone()).await.expect("connect to the coordinator")
    }
}

/// Starts `jepa-worker daemon` with one CPU slot, its work folder in `dir`
/// and its log in `dir/daemon.log`; `env` adds variables (fault injection).
///
/// # Panics
///
/// When the process cannot be started.
pub fn start_worker(url: &str, name: &str, dir: &Path, env: &[(&str, &str)]) -> Proc {
    std::fs::create_dir_all(dir).expect("worker folder");
    let log = std::fs::File::create(dir.join("daemon.log")).expect("daemon log");
    let mut command = Command::new(bin("jepa-worker"));
    command
        .args(["daemon", "--coordinator", url, "--name", name, "--cpu-slots", "1"])
        .args(["--grace", "10s", "--metrics-flush", "200ms", "--work-dir"])
        .arg(dir)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    for (key, value) in env {
        command.env(key, value);
    }
    Proc { child: Some(command.spawn().expect("failed to start jepa-worker daemon")) }
}

/// A small, fast spec on the synthetic data set: a 16 x 16 image, patch 2,
/// a 2-layer encoder of width 32, one logged step per step.
pub fn tiny_spec(name: &str, steps: u64) -> RunSpec {
    let mut spec = RunSpec { name: name.into(), seed: 5, ..Default::default() };
    spec.model.image_size = 16;
    spec.model.patch_size = 2;
    (spec.model.embed_dim, spec.model.depth, spec.model.num_heads) = (32, 2, 2);
    (spec.model.pred_depth, spec.model.pred_dim) = (1, 32);
    spec.data.dataset = DatasetKind::Synthetic;
    spec.data.num_workers = 1;
    spec.optim.batch_size = 8;
    spec.optim.warmup_steps = 2;
    spec.schedule.steps = steps;
    spec.schedule.log_every = 1;
    spec.schedule.checkpoint_every = 5;
    spec.schedule.rankme_every = 0;
    spec.eval.enabled = false;
    spec.validate().expect("the tiny spec is valid");
    spec
}

/// Submits a spec and returns the run id.
///
/// # Panics
///
/// When the coordinator refuses it.
pub async fn submit(user: &mut UserServiceClient<Channel>, spec: &RunSpec) -> String {
    let request = proto::SubmitRunRequest { spec: Some(spec.into()), ..Default::default() };
    let run = user.submit_run(request).await.expect("submit").into_inner().run.expect("run");
    run.id
}

/// The run as the coordinator has it now.
///
/// # Panics
///
/// When the call fails.
pub async fn get_run(user: &mut UserServiceClient<Channel>, run_id: &str) -> proto::Run {
    let request = proto::GetRunRequest { run_id: run_id.into() };
    user.get_run(request).await.expect("get run").into_inner().run.expect("run")
}

/// Polls the run until `done` holds for it and returns it; fails the test
/// at `within`, showing the run's state and message.
///
/// # Panics
///
/// When the condition is not met in time.
pub async fn wait_run(
    user: &mut UserServiceClient<Channel>,
    run_id: &str,
    within: Duration,
    mut done: impl FnMut(&proto::Run) -> bool,
) -> proto::Run {
    let start = tokio::time::Instant::now();
    loop {
        let run = get_run(user, run_id).await;
        if done(&run) {
            return run;
        }
        assert!(
            start.elapsed() < within,
            "run {run_id} did not reach the condition in {within:?}: state {:?}, message {:?}",
            RunState::try_from(run.state),
            run.message
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the run is in `state`.
pub fn is(run: &proto::Run, state: RunState) -> bool {
    run.state == state as i32
}

/// Points of one series of a run, ascending by step.
///
/// # Panics
///
/// When the call fails.
pub async fn series(
    user: &mut UserServiceClient<Channel>,
    run_id: &str,
    name: &str,
) -> Vec<proto::MetricPoint> {
    let request = proto::GetMetricsRequest {
        run_id: run_id.into(),
        series: vec![name.into()],
        limit: 100_000,
        ..Default::default()
    };
    let reply = user.get_metrics(request).await.expect("get metrics").into_inner();
    reply.series.into_iter().find(|s| s.series == name).map(|s| s.points).unwrap_or_default()
}

/// Pids of live processes whose command line mentions `marker` (a test's
/// unique temporary folder), other than this test process. Zombies count
/// as gone.
pub fn processes_mentioning(marker: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        let zombie = status.lines().any(|l| l.starts_with("State:") && l.contains('Z'));
        if !zombie && String::from_utf8_lossy(&cmdline).contains(marker) {
            pids.push(pid);
        }
    }
    pids
}

/// Waits until no process mentions `marker`; returns the stragglers when
/// some remain after `within`.
pub async fn wait_gone(marker: &str, within: Duration) -> Vec<u32> {
    let start = tokio::time::Instant::now();
    loop {
        let left = processes_mentioning(marker);
        if left.is_empty() || start.elapsed() >= within {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
