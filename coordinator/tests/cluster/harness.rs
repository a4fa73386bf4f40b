//! The test harness: an in-process coordinator on `127.0.0.1:0` over a sled
//! store in a scratch folder, a hand-moved clock, and scripted fake workers
//! that speak the worker API like a daemon would.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jepa_common::proto::{
    self, assignment_event::Event, user_service_client::UserServiceClient,
    worker_service_client::WorkerServiceClient,
};
use jepa_common::spec::RunSpec;
use jepa_coordinator::clock::ManualClock;
use jepa_coordinator::config::CoordinatorConfig;
use jepa_coordinator::core::Coordinator;
use jepa_coordinator::server::{self, Running};
use jepa_coordinator::store::SledStore;
use tonic::transport::Channel;
use tonic::Streaming;

/// How long any wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Lease timeout of the test coordinator, in ms of the manual clock.
pub const LEASE_MS: i64 = 10_000;

/// A coordinator serving on loopback, with clients.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub clock: Arc<ManualClock>,
    pub running: Running,
    pub user: UserServiceClient<Channel>,
    pub channel: Channel,
}

fn config(dir: &std::path::Path) -> CoordinatorConfig {
    CoordinatorConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: dir.to_path_buf(),
        lease_timeout_ms: LEASE_MS as u64,
        heartbeat_interval_ms: 1_000,
        // Leases expire only when a test calls expire_leases.
        reap_interval_ms: 3_600_000,
        rendezvous_timeout_ms: 2_000,
        checkpoint_chunk_bytes: 4096,
        ..CoordinatorConfig::default()
    }
}

impl Cluster {
    /// Starts a coordinator on a fresh folder.
    pub async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        Self::start_on(dir, clock).await
    }

    async fn start_on(dir: tempfile::TempDir, clock: Arc<ManualClock>) -> Cluster {
        let store = Arc::new(open_store(dir.path()).await);
        let coord = Coordinator::open(store, clock.clone(), config(dir.path())).unwrap();
        let running = server::spawn(coord, SocketAddr::from(([127, 0, 0, 1], 0))).await.unwrap();
        let channel = Channel::from_shared(running.url()).unwrap().connect().await.unwrap();
        let user = UserServiceClient::new(channel.clone());
        Cluster { dir, clock, running, user, channel }
    }

    /// Stops the server, drops every handle on the store and starts a new
    /// coordinator on the same folder.
    pub async fn restart(self) -> Cluster {
        let Cluster { dir, clock, running, user, channel } = self;
        drop((user, channel));
        let coord = Arc::downgrade(&running.coord);
        running.stop().await.unwrap();
        wait_until(|| coord.strong_count() == 0).await;
        Self::start_on(dir, clock).await
    }

    /// The coordinator behind the server.
    pub fn coord(&self) -> &Arc<Coordinator> {
        &self.running.coord
    }

    /// Registers a fake worker and opens its assignment stream.
    pub async fn worker(&self, name: &str, gpus: u32, cpu_slots: u32) -> FakeWorker {
        let mut client = WorkerServiceClient::new(self.channel.clone());
        let resources = proto::WorkerResources {
            gpus: (0..gpus)
                .map(|i| proto::GpuDevice { index: i, name: "fake".into(), memory_bytes: 80 << 30 })
                .collect(),
            cpu_slots,
            memory_bytes: 64 << 30,
        };
        let request = proto::RegisterRequest {
            name: name.into(),
            resources: Some(resources),
            address: "127.0.0.1".into(),
            version: "test".into(),
        };
        let id = client.register(request).await.unwrap().into_inner().worker_id;
        FakeWorker::connect(id, client).await
    }

    /// Submits a spec; returns the run or the error status.
    pub async fn submit(&mut self, spec: &RunSpec) -> Result<proto::Run, tonic::Status> {
        let request = proto::SubmitRunRequest { spec: Some(spec.into()), ..Default::default() };
        Ok(self.user.submit_run(request).await?.into_inner().run.unwrap())
    }

    /// Returns a run.
    pub async fn run(&mut self, run_id: &str) -> proto::Run {
        let request = proto::GetRunRequest { run_id: run_id.into() };
        self.user.get_run(request).await.unwrap().into_inner().run.unwrap()
    }

    /// Moves the clock past the lease timeout and runs the reaper once.
    pub async fn expire_leases(&self) -> usize {
        self.clock.advance(LEASE_MS + 1);
        self.coord().expire_leases().await.unwrap()
    }

    /// Lists workers, lost ones included.
    pub async fn workers(&mut self) -> Vec<proto::Worker> {
        let request = proto::ListWorkersRequest { include_lost: true };
        self.user.list_workers(request).await.unwrap().into_inner().workers
    }
}

/// A scripted worker daemon.
pub struct FakeWorker {
    pub id: String,
    pub client: WorkerServiceClient<Channel>,
    events: Streaming<proto::AssignmentEvent>,
}

impl FakeWorker {
    /// Opens the assignment stream of a registered worker.
    pub async fn connect(id: String, mut client: WorkerServiceClient<Channel>) -> FakeWorker {
        let request = proto::StreamAssignmentsRequest { worker_id: id.clone() };
        let events = client.stream_assignments(request).await.unwrap().into_inner();
        FakeWorker { id, client, events }
    }

    /// Waits for the next assignment event.
    pub async fn next_event(&mut self) -> Event {
        let message = tokio::time::timeout(DEADLINE, self.events.message())
            .await
            .expect("no assignment event before the deadline")
            .unwrap()
            .expect("assignment stream ended");
        message.event.unwrap()
    }

    /// Waits for a start and returns it.
    pub async fn expect_start(&mut self) -> proto::Assignment {
        match self.next_event().await {
            Event::Start(a) => a,
            Event::Stop(s) => panic!("expected a start, got a stop of {}", s.run_id),
        }
    }

    /// Waits for a stop and returns it.
    pub async fn expect_stop(&mut self) -> proto::StopRun {
        match self.next_event().await {
            Event::Stop(s) => s,
            Event::Start(a) => panic!("expected a stop, got a start of {}", a.run_id),
        }
    }

    /// Reports the state of an attempt.
    pub async fn report(
        &mut self,
        run_id: &str,
        attempt: u32,
        state: proto::RunState,
        retryable: bool,
    ) -> Result<proto::ReportRunStateResponse, tonic::Status> {
        let request = proto::ReportRunStateRequest {
            worker_id: self.id.clone(),
            run_id: run_id.into(),
            attempt,
            state: state as i32,
            message: format!("{state:?} from test"),
            retryable,
        };
        Ok(self.client.report_run_state(request).await?.into_inner())
    }

    /// Sends a heartbeat listing what the worker runs.
    pub async fn heartbeat(
        &mut self,
        running: &[(&str, u32)],
    ) -> Result<proto::HeartbeatResponse, tonic::Status> {
        let running = running
            .iter()
            .map(|(run_id, attempt)| proto::RunAttempt {
                run_id: run_id.to_string(),
                attempt: *attempt,
            })
            .collect();
        let request = proto::HeartbeatRequest { worker_id: self.id.clone(), running };
        Ok(self.client.heartbeat(request).await?.into_inner())
    }

    /// Reports metric points `(series, step, value)`.
    pub async fn metrics(
        &mut self,
        run_id: &str,
        attempt: u32,
        points: &[(&str, u64, f64)],
    ) -> Result<proto::ReportMetricsResponse, tonic::Status> {
        let points = points
            .iter()
            .map(|(series, step, value)| proto::MetricPoint {
                series: series.to_string(),
                step: *step,
                value: *value,
                wall_time_ms: 1,
            })
            .collect();
        let request = proto::ReportMetricsRequest {
            worker_id: self.id.clone(),
            run_id: run_id.into(),
            attempt,
            points,
        };
        Ok(self.client.report_metrics(request).await?.into_inner())
    }

    /// Uploads a checkpoint in chunks; `sha256` overrides the true digest.
    pub async fn upload(
        &mut self,
        run_id: &str,
        attempt: u32,
        step: u64,
        bytes: &[u8],
        sha256: Option<String>,
    ) -> Result<proto::CheckpointInfo, tonic::Status> {
        use proto::upload_checkpoint_request::Part;
        let header = proto::CheckpointHeader {
            worker_id: self.id.clone(),
            run_id: run_id.into(),
            attempt,
            step,
            size_bytes: bytes.len() as u64,
            sha256: sha256
                .unwrap_or_else(|| jepa_coordinator::core::checkpoints::sha256_hex(bytes)),
            spec_hash: "test".into(),
        };
        let mut messages =
            vec![proto::UploadCheckpointRequest { part: Some(Part::Header(header)) }];
        for chunk in bytes.chunks(1000) {
            messages
                .push(proto::UploadCheckpointRequest { part: Some(Part::Chunk(chunk.to_vec())) });
        }
        let reply = self.client.upload_checkpoint(tokio_stream::iter(messages)).await?;
        Ok(reply.into_inner().checkpoint.unwrap())
    }
}

/// A small CPU spec.
pub fn cpu_spec(name: &str) -> RunSpec {
    RunSpec { name: name.into(), ..RunSpec::default() }
}

/// A CUDA spec with `ranks` ranks over `hosts` hosts.
pub fn gpu_spec(name: &str, ranks: u32, hosts: u32) -> RunSpec {
    let mut spec = cpu_spec(name);
    spec.resources.device = "cuda".into();
    spec.resources.ranks = ranks;
    spec.resources.gpus = ranks;
    spec.resources.hosts = hosts;
    spec
}

/// Opens the sled store, waiting while a coordinator that was just dropped
/// still holds its lock (sled's flusher thread lets go a little later).
async fn open_store(dir: &std::path::Path) -> SledStore {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match SledStore::open(dir) {
            Ok(store) => return store,
            Err(err) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %err, "store still locked; retrying");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(err) => panic!("cannot reopen the store: {err}"),
        }
    }
}

/// Polls `done` until it holds, failing the test at the deadline.
pub async fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "condition not met before the deadline");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Downloads a checkpoint's bytes.
pub async fn download(
    user: &mut UserServiceClient<Channel>,
    run_id: &str,
    step: Option<u64>,
) -> Vec<u8> {
    use proto::download_checkpoint_response::Part;
    let request = proto::DownloadCheckpointRequest { run_id: run_id.into(), step };
    let mut stream = user.download_checkpoint(request).await.unwrap().into_inner();
    let mut bytes = Vec::new();
    let mut first = true;
    while let Some(message) = stream.message().await.unwrap() {
        match message.part.unwrap() {
            Part::Info(_) => assert!(first, "info must come first"),
            Part::Chunk(chunk) => bytes.extend_from_slice(&chunk),
        }
        first = false;
    }
    bytes
}

/// Shorthand for run states.
pub use proto::RunState as S;
