//! The worker daemon: registers this host with the coordinator, keeps its
//! lease with heartbeats, and runs one trainer process per assigned attempt
//! (see [`attempt`]).
//!
//! Assignments arrive on the coordinator's assignment stream and, as a
//! safety net, in every heartbeat answer; both lead to the same idempotent
//! start. When the coordinator is away the trainers keep running, metrics
//! are buffered and the daemon reconnects with back-off. When it comes back
//! and says the lease ended, the daemon stops its trainers (their runs were
//! requeued) and registers again.

pub mod attempt;
pub mod resources;
pub mod transfer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use jepa_common::proto::{
    self, assignment_event::Event as AssignmentEvent, user_service_client::UserServiceClient,
    worker_service_client::WorkerServiceClient,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

use attempt::StopKind;

/// Settings of one daemon.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Coordinator address, e.g. `http://127.0.0.1:50051`.
    pub coordinator: String,
    /// Unique name of this daemon (normally the host name).
    pub name: String,
    /// Address other hosts reach this daemon on; may be empty.
    pub address: String,
    /// Folder for the attempts' specs, checkpoints and logs.
    pub work_dir: PathBuf,
    /// CPU slots offered (one CPU rank each).
    pub cpu_slots: u32,
    /// CUDA devices offered.
    pub gpus: Vec<proto::GpuDevice>,
    /// Host memory in bytes.
    pub memory_bytes: u64,
    /// The `jepa-worker` executable that trains.
    pub trainer: PathBuf,
    /// libtorch threads per trainer.
    pub trainer_threads: usize,
    /// Time a stopped trainer gets to write its checkpoint before SIGKILL.
    pub grace: Duration,
    /// Interval of metric flushes to the coordinator.
    pub metrics_flush: Duration,
    /// Deadline of the trainers' collective operations.
    pub collective_timeout: Duration,
}

/// What every attempt task shares: the configuration, the worker id and
/// clients of both coordinator services.
#[derive(Debug)]
pub struct Context {
    config: DaemonConfig,
    worker_id: String,
    workers: WorkerServiceClient<Channel>,
    user: UserServiceClient<Channel>,
}

/// A running attempt: the way to stop it and its task.
struct Running {
    stop: watch::Sender<Option<StopKind>>,
    task: JoinHandle<()>,
}

type Key = (String, u32);

/// Why a session with the coordinator ended.
enum SessionEnd {
    /// The daemon was told to shut down.
    Shutdown,
    /// The coordinator no longer knows this worker's lease: register again.
    LeaseLost,
}

/// Runs the daemon until `shutdown` turns true. On shutdown every trainer
/// is stopped (with its grace period) and its attempt reported as failed
/// and retryable, so the coordinator places the run elsewhere at once.
///
/// # Errors
///
/// Fails only on a configuration the coordinator can never accept; an
/// unreachable coordinator is retried forever.
pub async fn run(config: DaemonConfig, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(&config.work_dir)
        .await
        .with_context(|| format!("cannot create the work folder {}", config.work_dir.display()))?;
    let endpoint = Endpoint::from_shared(config.coordinator.clone())
        .with_context(|| format!("--coordinator {:?} is not a URL", config.coordinator))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    // A lazy channel reconnects by itself; calls fail with UNAVAILABLE
    // while the coordinator is away.
    let channel = endpoint.connect_lazy();
    let mut attempts: HashMap<Key, Running> = HashMap::new();
    loop {
        let Some((worker_id, interval)) = register(&config, &channel, &mut shutdown).await else {
            break;
        };
        // Registering again ended every attempt of the earlier incarnation.
        stop_all(&mut attempts, &StopKind::Abandon).await;
        let ctx = Arc::new(Context {
            config: config.clone(),
            worker_id,
            workers: WorkerServiceClient::new(channel.clone()),
            user: UserServiceClient::new(channel.clone()),
        });
        match session(&ctx, interval, &mut attempts, &mut shutdown).await {
            SessionEnd::Shutdown => break,
            SessionEnd::LeaseLost => {
                tracing::warn!("the coordinator ended this worker's lease; stopping its trainers and registering again");
                stop_all(&mut attempts, &StopKind::Abandon).await;
            }
        }
    }
    tracing::info!(running = attempts.len(), "shutting down");
    stop_all(&mut attempts, &StopKind::Shutdown).await;
    Ok(())
}

/// Registers, retrying with back-off; `None` when shut down first.
async fn register(
    config: &DaemonConfig,
    channel: &Channel,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(String, Duration)> {
    let mut client = WorkerServiceClient::new(channel.clone());
    let request = proto::RegisterRequest {
        name: config.name.clone(),
        resources: Some(proto::WorkerResources {
            gpus: config.gpus.clone(),
            cpu_slots: config.cpu_slots,
            memory_bytes: config.memory_bytes,
        }),
        address: config.address.clone(),
        version: jepa_common::VERSION.to_string(),
    };
    let mut backoff = Backoff::new();
    loop {
        match client.register(request.clone()).await {
            Ok(reply) => {
                let reply = reply.into_inner();
                tracing::info!(
                    worker = %reply.worker_id,
                    coordinator = %config.coordinator,
                    cpu_slots = config.cpu_slots,
                    gpus = config.gpus.len(),
                    "registered"
                );
                let interval = Duration::from_millis(reply.heartbeat_interval_ms.max(50));
                return Some((reply.worker_id, interval));
            }
            Err(status) => {
                let delay = backoff.next();
                tracing::warn!(error = %status.message(), retry_in = ?delay, "cannot register with the coordinator");
                if wait_or_shutdown(delay, shutdown).await {
                    return None;
                }
            }
        }
    }
}

/// Heartbeats and assignment handling of one registration.
async fn session(
    ctx: &Arc<Context>,
    interval: Duration,
    attempts: &mut HashMap<Key, Running>,
    shutdown: &mut watch::Receiver<bool>,
) -> SessionEnd {
    let (events_tx, mut events) = mpsc::channel(64);
    let stream = tokio::spawn(follow_assignments(Arc::clone(ctx), events_tx));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let end = loop {
        tokio::select! {
            _ = ticker.tick() => {
                match heartbeat(ctx, attempts).await {
                    Ok(reply) => {
                        for assignment in reply.assignments {
                            start(ctx, attempts, assignment);
                        }
                        for stop in reply.stop {
                            request_stop(attempts, &stop.run_id, stop.attempt, "the coordinator no longer holds this attempt");
                        }
                    }
                    Err(status) if matches!(status.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound) => {
                        break SessionEnd::LeaseLost;
                    }
                    Err(status) => {
                        tracing::warn!(error = %status.message(), running = attempts.len(), "heartbeat failed; trainers keep running");
                    }
                }
            }
            Some(event) = events.recv() => match event {
                AssignmentEvent::Start(assignment) => start(ctx, attempts, assignment),
                AssignmentEvent::Stop(stop) => {
                    let reason = if stop.reason.is_empty() { "stopped by the coordinator".to_string() } else { stop.reason };
                    request_stop(attempts, &stop.run_id, stop.attempt, &reason);
                }
            },
            _ = shutdown.changed() => break SessionEnd::Shutdown,
        }
    };
    stream.abort();
    end
}

/// Keeps the assignment stream open, reopening it with back-off, and
/// passes its events on.
async fn follow_assignments(ctx: Arc<Context>, events: mpsc::Sender<AssignmentEvent>) {
    let mut client = ctx.workers.clone();
    let mut backoff = Backoff::new();
    loop {
        let request = proto::StreamAssignmentsRequest { worker_id: ctx.worker_id.clone() };
        match client.stream_assignments(request).await {
            Ok(stream) => {
                backoff.reset();
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(message)) => {
                            if let Some(event) = message.event {
                                if events.send(event).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(error = %status.message(), "assignment stream broke");
                            break;
                        }
                    }
                }
            }
            Err(status) => {
                tracing::debug!(error = %status.message(), "cannot open the assignment stream")
            }
        }
        tokio::time::sleep(backoff.next()).await;
    }
}

async fn heartbeat(
    ctx: &Context,
    attempts: &HashMap<Key, Running>,
) -> Result<proto::HeartbeatResponse, tonic::Status> {
    let running = attempts
        .iter()
        .filter(|(_, running)| !running.task.is_finished())
        .map(|((run_id, attempt), _)| proto::RunAttempt {
            run_id: run_id.clone(),
            attempt: *attempt,
        })
        .collect();
    let request = proto::HeartbeatRequest { worker_id: ctx.worker_id.clone(), running };
    Ok(ctx.workers.clone().heartbeat(request).await?.into_inner())
}

/// Starts an attempt unless it already runs here.
fn start(ctx: &Arc<Context>, attempts: &mut HashMap<Key, Running>, assignment: proto::Assignment) {
    let key = (assignment.run_id.clone(), assignment.attempt);
    // An attempt runs at most once here: a finished one that the
    // coordinator still lists has sent (or is sending) its final report,
    // and starting it again would train twice. Finished entries stay in
    // the map for that reason; they are a few bytes each.
    if attempts.contains_key(&key) {
        return;
    }
    tracing::info!(run = %key.0, attempt = key.1, "assignment received");
    let (stop, stop_rx) = watch::channel(None);
    let task = tokio::spawn(attempt::run(Arc::clone(ctx), assignment, stop_rx));
    attempts.insert(key, Running { stop, task });
}

fn request_stop(attempts: &HashMap<Key, Running>, run_id: &str, attempt: u32, reason: &str) {
    if let Some(running) = attempts.get(&(run_id.to_string(), attempt)) {
        let _ = running.stop.send(Some(StopKind::Requested(reason.to_string())));
    }
}

/// Stops every attempt and waits for each task (the trainers' grace
/// periods run in parallel).
async fn stop_all(attempts: &mut HashMap<Key, Running>, kind: &StopKind) {
    for running in attempts.values() {
        let _ = running.stop.send(Some(kind.clone()));
    }
    for (_, running) in attempts.drain() {
        let _ = running.task.await;
    }
}

/// Sleeps `delay`; returns true when shutdown was requested meanwhile.
async fn wait_or_shutdown(delay: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
    if *shutdown.borrow() {
        return true;
    }
    tokio::select! {
        () = tokio::time::sleep(delay) => *shutdown.borrow(),
        _ = shutdown.changed() => true,
    }
}

/// Exponential back-off from 200 ms to 10 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(10);

    fn new() -> Self {
        Backoff { next: Self::FIRST }
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }

    fn next(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let mut backoff = Backoff::new();
        let delays: Vec<u128> = (0..8).map(|_| backoff.next().as_millis()).collect();
        assert_eq!(delays, vec![200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
        backoff.reset();
        assert_eq!(backoff.next().as_millis(), 200);
    }
}
