//! One attempt of one run on this daemon: fetch the resume checkpoint,
//! start the trainer process, forward its metrics and checkpoints, stop it
//! when asked, and report how it ended.

use std::collections::VecDeque;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use jepa_common::proto::{self, RunState};
use jepa_common::series;
use jepa_common::spec::RunSpec;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::transfer::{self, Upload};
use super::Context;
use crate::train::metrics::Event;

/// Exit status of a trainer refused because its spec is invalid; another
/// attempt would fail the same way.
pub const EXIT_INVALID_SPEC: i32 = 2;

/// Lines of the trainer's stderr kept for a failure message.
const TAIL_LINES: usize = 8;

/// Points buffered before a flush is forced; the coordinator takes 10,000
/// per call.
const FLUSH_POINTS: usize = 2_000;

/// Points kept while the coordinator is unreachable; older ones are
/// dropped beyond this.
const MAX_BUFFERED_POINTS: usize = 200_000;

/// Why an attempt is being stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopKind {
    /// The coordinator asked (a cancel, or the run moved): confirm with
    /// CANCELLED.
    Requested(String),
    /// The daemon is shutting down: report FAILED, retryable, so the run is
    /// placed elsewhere at once.
    Shutdown,
    /// The coordinator already ended the attempt (the lease was lost):
    /// report nothing.
    Abandon,
}

/// How an attempt ended, as reported to the coordinator.
#[derive(Debug, PartialEq)]
struct Outcome {
    state: RunState,
    message: String,
    retryable: bool,
}

impl Outcome {
    fn failed(message: impl Into<String>, retryable: bool) -> Self {
        Outcome { state: RunState::Failed, message: message.into(), retryable }
    }
}

/// Runs one attempt to its end and reports the final state.
pub async fn run(
    ctx: Arc<Context>,
    assignment: proto::Assignment,
    stop: watch::Receiver<Option<StopKind>>,
) {
    let run_id = assignment.run_id.clone();
    let attempt = assignment.attempt;
    let outcome = supervise(&ctx, &assignment, stop).await;
    let Some(outcome) = outcome else {
        tracing::info!(run = %run_id, attempt, "attempt abandoned");
        return;
    };
    tracing::info!(run = %run_id, attempt, state = ?outcome.state, message = %outcome.message, "attempt ended");
    ctx.report(&run_id, attempt, outcome.state, &outcome.message, outcome.retryable).await;
}

async fn supervise(
    ctx: &Arc<Context>,
    assignment: &proto::Assignment,
    mut stop: watch::Receiver<Option<StopKind>>,
) -> Option<Outcome> {
    let run_id = &assignment.run_id;
    let attempt = assignment.attempt;
    let spec = match assignment.spec.clone().map(RunSpec::try_from) {
        Some(Ok(spec)) => spec,
        Some(Err(err)) => return Some(Outcome::failed(format!("invalid spec: {err}"), false)),
        None => return Some(Outcome::failed("the assignment carries no spec", false)),
    };
    if assignment.ranks.is_empty() {
        return Some(Outcome::failed("the assignment names no rank for this worker", false));
    }
    let dir = ctx.config.work_dir.join("runs").join(run_id).join(format!("attempt-{attempt}"));
    if let Err(err) = prepare_dir(&dir, &spec).await {
        return Some(Outcome::failed(format!("cannot prepare {}: {err:#}", dir.display()), true));
    }

    let resume = match &assignment.resume_from {
        Some(info) => {
            let mut user = ctx.user.clone();
            let world = spec.resources.ranks as usize;
            let resume_dir = dir.join("resume");
            match transfer::download(&mut user, info, spec.seed, world, &resume_dir).await {
                Ok(path) => {
                    tracing::info!(run = %run_id, step = info.step, "resume checkpoint fetched");
                    Some(path)
                }
                Err(err) => {
                    return Some(Outcome::failed(
                        format!("cannot fetch the resume checkpoint: {err:#}"),
                        true,
                    ))
                }
            }
        }
        None => None,
    };

    // Rank 0 first: it publishes its address, which the others wait for.
    let mut slots = assignment.ranks.clone();
    slots.sort_by_key(|slot| slot.rank);
    let mut ranks = Ranks::default();
    let mut lines = None;
    let mut master: Option<String> = None;
    for slot in &slots {
        if slot.rank != 0 && master.is_none() {
            match ctx.rendezvous_wait(run_id, attempt, slot.rank, &mut stop).await {
                Some(address) => master = Some(address),
                None => {
                    ranks.signal(libc::SIGKILL);
                    return None;
                }
            }
        }
        let rank_dir =
            if slot.rank == 0 { dir.clone() } else { dir.join(format!("rank-{}", slot.rank)) };
        let spawned = spawn_trainer(
            ctx,
            &TrainerArgs {
                dir: &dir,
                out: &rank_dir,
                resume: resume.as_deref(),
                slot,
                world: assignment.world_size,
                master: master.as_deref(),
                token: &format!("{run_id}/{attempt}"),
            },
            attempt,
        );
        let mut child = match spawned {
            Ok(child) => child,
            Err(err) => {
                ranks.signal(libc::SIGKILL);
                return Some(Outcome::failed(format!("cannot start the trainer: {err}"), true));
            }
        };
        tracing::info!(run = %run_id, attempt, rank = slot.rank, pid = child.id(), "trainer started");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let log_name = if slot.rank == 0 {
            "trainer.log".to_string()
        } else {
            format!("trainer-rank{}.log", slot.rank)
        };
        ranks.tails.push((slot.rank, tokio::spawn(collect_stderr(stderr, dir.join(log_name)))));
        if slot.rank == 0 {
            let mut reader = BufReader::new(stdout).lines();
            if assignment.world_size > 1 {
                // The first line of a multi-rank rank 0 is its address.
                let address = read_listening(&mut reader).await;
                let Some(address) = address else {
                    ranks.add(slot.rank, child);
                    break;
                };
                if ctx.rendezvous_publish(run_id, attempt, &address).await == Reply::Stale {
                    let _ = child.start_kill();
                    ranks.signal(libc::SIGKILL);
                    return None;
                }
                master = Some(address);
            }
            lines = Some(reader);
        } else {
            // Other ranks report nothing; their stdout is drained.
            tokio::spawn(async move {
                let mut reader = BufReader::new(stdout).lines();
                while let Ok(Some(_)) = reader.next_line().await {}
            });
        }
        ranks.add(slot.rank, child);
    }
    if ctx.report_running(run_id, attempt).await == Reply::Stale {
        ranks.signal(libc::SIGKILL);
        return None;
    }

    let (upload_tx, upload_rx) = mpsc::unbounded_channel();
    let uploader = tokio::spawn(upload_loop(Arc::clone(ctx), run_id.clone(), attempt, upload_rx));

    let mut points: Vec<proto::MetricPoint> = Vec::new();
    let mut flush = tokio::time::interval(ctx.config.metrics_flush);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping: Option<StopKind> = None;
    let mut kill_at: Option<Instant> = None;
    let mut done: Option<bool> = None;
    let mut stale = false;
    let mut failed_rank: Option<(u32, ExitStatus)> = None;

    while ranks.running() > 0 {
        tokio::select! {
            line = next_line(&mut lines) => match line {
                Some(line) => {
                    take_line(&line, stopping.is_none(), &mut done, &mut points, &upload_tx);
                    if points.len() >= FLUSH_POINTS && !stale {
                        stale = ctx.send_metrics(run_id, attempt, &mut points).await == Reply::Stale;
                    }
                }
                None => lines = None,
            },
            _ = flush.tick() => {
                if !points.is_empty() && !stale {
                    stale = ctx.send_metrics(run_id, attempt, &mut points).await == Reply::Stale;
                }
                if stale && stopping.is_none() {
                    tracing::info!(run = %run_id, attempt, "the coordinator ended this attempt; stopping");
                    stopping = Some(StopKind::Abandon);
                    ranks.signal(libc::SIGTERM);
                    kill_at = Some(Instant::now() + ctx.config.grace);
                }
            },
            changed = stop.changed(), if stopping.is_none() => {
                let kind = if changed.is_ok() { stop.borrow().clone() } else { Some(StopKind::Shutdown) };
                if let Some(kind) = kind {
                    tracing::info!(run = %run_id, attempt, ?kind, "stopping the trainers");
                    stopping = Some(kind);
                    ranks.signal(libc::SIGTERM);
                    kill_at = Some(Instant::now() + ctx.config.grace);
                }
            },
            _ = sleep_until(kill_at) => {
                tracing::warn!(run = %run_id, attempt, grace = ?ctx.config.grace, "trainers outlived their grace period; killing them");
                ranks.signal(libc::SIGKILL);
                kill_at = None;
            },
            Some((rank, status)) = ranks.exits.recv() => {
                ranks.exited(rank, status);
                // A rank that fails takes the others down: without it their
                // collectives cannot complete.
                if !status.success() && failed_rank.is_none() && stopping.is_none() {
                    failed_rank = Some((rank, status));
                    ranks.signal(libc::SIGTERM);
                    kill_at = Some(Instant::now() + ctx.config.grace);
                }
            },
        }
    }
    // Lines still in rank 0's pipe after the exit (the exit may be seen
    // first): the final checkpoint, evaluation and `done` are often there.
    if let Some(reader) = lines.as_mut() {
        while let Ok(Some(line)) = reader.next_line().await {
            take_line(&line, stopping.is_none(), &mut done, &mut points, &upload_tx);
        }
    }
    let mut tails = Vec::new();
    for (rank, tail) in ranks.tails.drain(..) {
        tails.push((rank, tail.await.unwrap_or_default()));
    }

    if matches!(stopping, Some(StopKind::Abandon)) {
        uploader.abort();
        return None;
    }
    if !stale && !points.is_empty() {
        ctx.send_metrics(run_id, attempt, &mut points).await;
    }
    // Every checkpoint is committed before the final report, so a resumed
    // attempt always finds the newest one.
    drop(upload_tx);
    if stopping.is_some() {
        uploader.abort();
    } else {
        let _ = uploader.await;
    }
    let holds_rank0 = slots.iter().any(|s| s.rank == 0);
    let (rank, status) = failed_rank.unwrap_or_else(|| {
        let first = ranks.statuses.first().copied().unwrap_or((0, ExitStatus::from_raw(0)));
        ranks.statuses.iter().copied().find(|(_, s)| !s.success()).unwrap_or(first)
    });
    let tail = tails.iter().find(|(r, _)| *r == rank).map(|(_, t)| t.clone()).unwrap_or_default();
    // Ranks other than 0 report no `done` event; their clean exit is the end.
    let done = if holds_rank0 { done } else { Some(false) };
    let mut outcome = outcome_of(stopping, status, done, &tail);
    if assignment.world_size > 1 && outcome.state == RunState::Failed && failed_rank.is_some() {
        outcome.message = format!("rank {rank}: {}", outcome.message);
    }
    Some(outcome)
}

/// Takes one line of rank 0's stdout: notes `done`, queues an announced
/// checkpoint for upload (unless the attempt is stopping) and collects the
/// metric points.
fn take_line(
    line: &str,
    upload: bool,
    done: &mut Option<bool>,
    points: &mut Vec<proto::MetricPoint>,
    uploads: &mpsc::UnboundedSender<Upload>,
) {
    let Ok(event) = serde_json::from_str::<Event>(line) else {
        tracing::debug!(%line, "trainer printed a non-event line");
        return;
    };
    match &event {
        Event::Done { interrupted, .. } => *done = Some(*interrupted),
        Event::Checkpoint { path, step, .. } if upload => match Upload::open(Path::new(path)) {
            Ok(file) => {
                let _ = uploads.send(file);
            }
            Err(err) => {
                tracing::warn!(step, error = %format!("{err:#}"), "checkpoint not uploaded")
            }
        },
        _ => {}
    }
    points.extend(event_points(&event));
}

/// The trainer processes of this worker's ranks of one attempt.
#[derive(Default)]
struct Ranks {
    /// (rank, pid) of the processes not reaped yet.
    pids: Vec<(u32, u32)>,
    /// (rank, exit status) of the reaped ones.
    statuses: Vec<(u32, ExitStatus)>,
    /// Exits as their waiting tasks see them.
    exits: RankExits,
    /// Each rank's stderr collector.
    tails: Vec<(u32, tokio::task::JoinHandle<VecDeque<String>>)>,
}

/// A channel of (rank, exit status), created on first use.
struct RankExits {
    sender: mpsc::UnboundedSender<(u32, ExitStatus)>,
    receiver: mpsc::UnboundedReceiver<(u32, ExitStatus)>,
}

impl Default for RankExits {
    fn default() -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        RankExits { sender, receiver }
    }
}

impl RankExits {
    async fn recv(&mut self) -> Option<(u32, ExitStatus)> {
        self.receiver.recv().await
    }
}

impl Ranks {
    /// Takes a started process; a task reaps it and reports its exit.
    fn add(&mut self, rank: u32, mut child: Child) {
        if let Some(pid) = child.id() {
            self.pids.push((rank, pid));
        }
        let sender = self.exits.sender.clone();
        tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status,
                Err(err) => {
                    tracing::error!(rank, error = %err, "cannot wait for a trainer");
                    let _ = child.start_kill();
                    ExitStatus::from_raw(libc::SIGKILL)
                }
            };
            let _ = sender.send((rank, status));
        });
    }

    fn exited(&mut self, rank: u32, status: ExitStatus) {
        self.pids.retain(|(r, _)| *r != rank);
        self.statuses.push((rank, status));
    }

    fn running(&self) -> usize {
        self.pids.len()
    }

    /// Sends `sig` to every process not reaped yet.
    fn signal(&self, sig: libc::c_int) {
        for (_, pid) in &self.pids {
            if let Ok(pid) = libc::pid_t::try_from(*pid) {
                // SAFETY: kill(2) on a child that its task has not reaped.
                unsafe { libc::kill(pid, sig) };
            }
        }
    }
}

/// The next line of rank 0's stdout, or never when there is none to read.
async fn next_line(
    lines: &mut Option<tokio::io::Lines<BufReader<tokio::process::ChildStdout>>>,
) -> Option<String> {
    match lines {
        Some(reader) => reader.next_line().await.ok().flatten(),
        None => std::future::pending().await,
    }
}

/// Reads rank 0's first lines until its `listening` event.
async fn read_listening(
    reader: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> Option<String> {
    while let Ok(Some(line)) = reader.next_line().await {
        if let Ok(Event::Listening { address }) = serde_json::from_str::<Event>(&line) {
            return Some(address);
        }
    }
    None
}

/// Decides the final report from why the trainer stopped and how it exited.
fn outcome_of(
    stopping: Option<StopKind>,
    status: ExitStatus,
    done: Option<bool>,
    tail: &VecDeque<String>,
) -> Outcome {
    match stopping {
        Some(StopKind::Requested(reason)) => {
            Outcome { state: RunState::Cancelled, message: reason, retryable: false }
        }
        Some(StopKind::Shutdown) => Outcome::failed("the worker daemon shut down", true),
        Some(StopKind::Abandon) => Outcome::failed("abandoned", true),
        None if status.success() && done == Some(false) => {
            Outcome { state: RunState::Succeeded, message: String::new(), retryable: false }
        }
        None if status.success() => {
            Outcome::failed(format!("trainer stopped early ({status}){}", tail_text(tail)), true)
        }
        None => {
            let retryable = status.code() != Some(EXIT_INVALID_SPEC);
            Outcome::failed(format!("trainer failed ({status}){}", tail_text(tail)), retryable)
        }
    }
}

fn tail_text(tail: &VecDeque<String>) -> String {
    if tail.is_empty() {
        return String::new();
    }
    let text = tail.iter().map(String::as_str).collect::<Vec<_>>().join("\n");
    // The run's message is for people; keep its end, where the error is.
    let start = text.len().saturating_sub(2_000);
    let start = (start..text.len()).find(|&i| text.is_char_boundary(i)).unwrap_or(text.len());
    format!(": {}", &text[start..])
}

/// The metric points of one trainer event, under the names of
/// `jepa_common::series`.
pub fn event_points(event: &Event) -> Vec<proto::MetricPoint> {
    let now = now_ms();
    let point = |name: &str, step: u64, value: f64| proto::MetricPoint {
        series: name.to_string(),
        step,
        value,
        wall_time_ms: now,
    };
    match *event {
        Event::Step { step, loss, loss_avg, lr, wd, momentum, images_per_s, data_wait } => vec![
            point(series::LOSS, step, loss),
            point(series::LOSS_AVG, step, loss_avg),
            point(series::LR, step, lr),
            point(series::WEIGHT_DECAY, step, wd),
            point(series::MOMENTUM, step, momentum),
            point(series::IMAGES_PER_SEC, step, images_per_s),
            point(series::DATA_WAIT, step, data_wait),
        ],
        Event::Rankme { step, value } => vec![point(series::RANKME, step, value)],
        Event::Eval { step, top1, pooled_top1 } => {
            let mut points = vec![point(series::PROBE_TOP1, step, top1)];
            if let Some(pooled) = pooled_top1 {
                points.push(point(series::POOLED_PROBE_TOP1, step, pooled));
            }
            points
        }
        Event::Start { .. }
        | Event::Checkpoint { .. }
        | Event::Listening { .. }
        | Event::Done { .. } => Vec::new(),
    }
}

fn now_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn prepare_dir(dir: &Path, spec: &RunSpec) -> anyhow::Result<()> {
    tokio::fs::create_dir_all(dir).await?;
    tokio::fs::write(dir.join("spec.toml"), spec.to_toml_string()).await?;
    Ok(())
}

/// Where and how one rank's trainer runs.
struct TrainerArgs<'a> {
    /// The attempt's folder, holding `spec.toml`.
    dir: &'a Path,
    /// The rank's output folder (checkpoints).
    out: &'a Path,
    /// Checkpoint record to resume from.
    resume: Option<&'a Path>,
    /// The rank and its device.
    slot: &'a proto::RankSlot,
    /// Ranks of the attempt in all.
    world: u32,
    /// Rank 0's address, for the other ranks.
    master: Option<&'a str>,
    /// The attempt's token for the ring.
    token: &'a str,
}

/// Starts `jepa-worker train` for one rank. The trainer dies with the
/// daemon: it gets SIGKILL when its parent exits.
fn spawn_trainer(ctx: &Context, args: &TrainerArgs<'_>, attempt: u32) -> std::io::Result<Child> {
    // A GPU rank sees only its own device, as device 0 (NCCL and libtorch
    // then agree on it without a device call).
    let device = if args.slot.gpu_index.is_some() { "cuda:0" } else { "cpu" };
    let host = ctx.config.address.rsplit_once(':').map_or(ctx.config.address.as_str(), |(h, _)| h);
    let bind = if host.is_empty() { "127.0.0.1:0".to_string() } else { format!("{host}:0") };
    let mut command = Command::new(&ctx.config.trainer);
    command
        .arg("train")
        .arg("--config")
        .arg(args.dir.join("spec.toml"))
        .arg("--json")
        .arg("--out")
        .arg(args.out)
        .arg("--device")
        .arg(device)
        .arg("--threads")
        .arg(ctx.config.trainer_threads.to_string())
        .args(["--rank", &args.slot.rank.to_string(), "--world", &args.world.to_string()])
        .args(["--bind", &bind, "--token", args.token])
        .args(["--collective-timeout", &format!("{}s", ctx.config.collective_timeout.as_secs())])
        .env("JEPA_ATTEMPT", attempt.to_string())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(master) = args.master {
        command.args(["--master", master]);
    }
    if let Some(index) = args.slot.gpu_index {
        command.env("CUDA_VISIBLE_DEVICES", index.to_string());
    }
    if let Some(record) = args.resume {
        command.arg("--resume").arg(record);
    }
    let parent = libc::pid_t::try_from(std::process::id()).unwrap_or(0);
    // SAFETY: between fork and exec only async-signal-safe calls are made
    // (prctl, getppid, _exit); nothing allocates or locks.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The daemon may have died before prctl took effect.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Copies the trainer's stderr to `trainer.log` and keeps its last lines.
async fn collect_stderr(
    stderr: tokio::process::ChildStderr,
    log_path: PathBuf,
) -> VecDeque<String> {
    let mut log = tokio::fs::File::create(&log_path).await.ok();
    let mut tail = VecDeque::with_capacity(TAIL_LINES);
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(file) = log.as_mut() {
            let _ = file.write_all(line.as_bytes()).await;
            let _ = file.write_all(b"\n").await;
        }
        if line.trim().is_empty() {
            continue;
        }
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line);
    }
    if let Some(file) = log.as_mut() {
        let _ = file.flush().await;
    }
    tail
}

/// Uploads checkpoints one after another as the trainer writes them. A
/// failed upload is retried a few times; the coordinator keeps the last
/// committed one, so a lost upload only means a longer replay.
async fn upload_loop(
    ctx: Arc<Context>,
    run_id: String,
    attempt: u32,
    mut uploads: mpsc::UnboundedReceiver<Upload>,
) {
    let mut client = ctx.workers.clone();
    while let Some(upload) = uploads.recv().await {
        let mut delay = Duration::from_millis(200);
        for tries in 1..=5 {
            match transfer::upload(&mut client, &ctx.worker_id, &run_id, attempt, &upload).await {
                Ok(info) => {
                    tracing::info!(run = %run_id, step = info.step, bytes = info.size_bytes, "checkpoint committed");
                    break;
                }
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    tracing::info!(run = %run_id, step = upload.step, "attempt ended; checkpoint not uploaded");
                    return;
                }
                Err(status) => {
                    tracing::warn!(run = %run_id, step = upload.step, tries, error = %status.message(), "checkpoint upload failed");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }
}

/// What the coordinator said to a report.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Taken.
    Ok,
    /// The attempt is no longer current: stop it.
    Stale,
    /// Not delivered (the coordinator is away); try again later.
    Retry,
}

impl Context {
    /// Publishes rank 0's address for the attempt's other ranks.
    async fn rendezvous_publish(&self, run_id: &str, attempt: u32, address: &str) -> Reply {
        let request = proto::RendezvousRequest {
            worker_id: self.worker_id.clone(),
            run_id: run_id.to_string(),
            generation: attempt,
            rank: 0,
            payload: address.as_bytes().to_vec(),
        };
        let mut delay = Duration::from_millis(200);
        for _ in 0..10 {
            match self.workers.clone().rendezvous(request.clone()).await {
                Ok(_) => return Reply::Ok,
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    return Reply::Stale
                }
                Err(status) => {
                    tracing::warn!(run = %run_id, error = %status.message(), "rendezvous publish failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        Reply::Retry
    }

    /// Waits for rank 0's address; `None` when the attempt ended or a stop
    /// came first.
    async fn rendezvous_wait(
        &self,
        run_id: &str,
        attempt: u32,
        rank: u32,
        stop: &mut watch::Receiver<Option<StopKind>>,
    ) -> Option<String> {
        let request = proto::RendezvousRequest {
            worker_id: self.worker_id.clone(),
            run_id: run_id.to_string(),
            generation: attempt,
            rank,
            payload: Vec::new(),
        };
        let mut client = self.workers.clone();
        loop {
            let call = client.rendezvous(request.clone());
            let reply = tokio::select! {
                reply = call => reply,
                _ = stop.changed() => return None,
            };
            match reply {
                Ok(reply) => {
                    return Some(String::from_utf8_lossy(&reply.into_inner().payload).into_owned())
                }
                Err(status) if status.code() == tonic::Code::FailedPrecondition => return None,
                Err(status) => {
                    tracing::debug!(run = %run_id, rank, error = %status.message(), "waiting for rank 0");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    async fn report_running(&self, run_id: &str, attempt: u32) -> Reply {
        let request = proto::ReportRunStateRequest {
            worker_id: self.worker_id.clone(),
            run_id: run_id.to_string(),
            attempt,
            state: RunState::Running as i32,
            message: format!("training on {}", self.config.name),
            retryable: false,
        };
        match self.workers.clone().report_run_state(request).await {
            Ok(reply) if reply.get_ref().stop => Reply::Stale,
            Ok(_) => Reply::Ok,
            Err(status) if status.code() == tonic::Code::FailedPrecondition => Reply::Stale,
            Err(status) => {
                tracing::warn!(run = %run_id, error = %status.message(), "RUNNING report not delivered");
                Reply::Retry
            }
        }
    }

    /// Sends buffered points; on success the buffer is emptied. While the
    /// coordinator is away the points stay buffered (the oldest are dropped
    /// past a bound) and go with the next flush.
    async fn send_metrics(
        &self,
        run_id: &str,
        attempt: u32,
        points: &mut Vec<proto::MetricPoint>,
    ) -> Reply {
        let mut client = self.workers.clone();
        while !points.is_empty() {
            let take = points.len().min(10_000);
            let request = proto::ReportMetricsRequest {
                worker_id: self.worker_id.clone(),
                run_id: run_id.to_string(),
                attempt,
                points: points[..take].to_vec(),
            };
            match client.report_metrics(request).await {
                Ok(_) => {
                    points.drain(..take);
                }
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    points.clear();
                    return Reply::Stale;
                }
                Err(status) => {
                    tracing::warn!(run = %run_id, error = %status.message(), buffered = points.len(), "metrics not delivered; keeping them");
                    if points.len() > MAX_BUFFERED_POINTS {
                        let excess = points.len() - MAX_BUFFERED_POINTS;
                        points.drain(..excess);
                    }
                    return Reply::Retry;
                }
            }
        }
        Reply::Ok
    }

    /// Reports a final state, retrying while the coordinator is away (up to
    /// about a minute); a stale attempt needs no report.
    async fn report(
        &self,
        run_id: &str,
        attempt: u32,
        state: RunState,
        message: &str,
        retryable: bool,
    ) {
        let request = proto::ReportRunStateRequest {
            worker_id: self.worker_id.clone(),
            run_id: run_id.to_string(),
            attempt,
            state: state as i32,
            message: message.to_string(),
            retryable,
        };
        let mut delay = Duration::from_millis(250);
        for _ in 0..10 {
            match self.workers.clone().report_run_state(request.clone()).await {
                Ok(_) => return,
                Err(status) if status.code() == tonic::Code::FailedPrecondition => return,
                Err(status) => {
                    tracing::warn!(run = %run_id, error = %status.message(), "final report not delivered; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        tracing::error!(run = %run_id, attempt, "final report lost; the coordinator will requeue the run when the lease ends");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_events_become_the_coordinator_series() {
        let event = Event::Step {
            step: 20,
            loss: 0.5,
            loss_avg: 0.6,
            lr: 1e-3,
            wd: 0.04,
            momentum: 0.996,
            images_per_s: 300.0,
            data_wait: 0.1,
        };
        let points = event_points(&event);
        let loss = points.iter().find(|p| p.series == series::LOSS).unwrap();
        assert_eq!((loss.step, loss.value), (20, 0.5));
        let ips = points.iter().find(|p| p.series == series::IMAGES_PER_SEC).unwrap();
        assert_eq!(ips.value, 300.0);
        assert_eq!(points.len(), 7);
        let eval = Event::Eval { step: 40, top1: 0.7, pooled_top1: None };
        let points = event_points(&eval);
        assert_eq!(points.len(), 1);
        assert_eq!((points[0].series.as_str(), points[0].value), (series::PROBE_TOP1, 0.7));
    }

    #[test]
    fn outcomes_follow_the_exit() {
        let ok = ExitStatus::from_raw(0);
        let crashed = ExitStatus::from_raw(1 << 8);
        let bad_spec = ExitStatus::from_raw(EXIT_INVALID_SPEC << 8);
        let tail: VecDeque<String> = ["a".to_string(), "Error: injected fault".to_string()].into();
        assert_eq!(outcome_of(None, ok, Some(false), &tail).state, RunState::Succeeded);
        let failed = outcome_of(None, crashed, None, &tail);
        assert_eq!(failed.state, RunState::Failed);
        assert!(failed.retryable);
        assert!(failed.message.ends_with("a\nError: injected fault"), "{}", failed.message);
        assert!(!outcome_of(None, bad_spec, None, &tail).retryable);
        let interrupted = outcome_of(None, ok, Some(true), &tail);
        assert_eq!(interrupted.state, RunState::Failed);
        let cancelled =
            outcome_of(Some(StopKind::Requested("by user".into())), ok, Some(true), &tail);
        assert_eq!(cancelled.state, RunState::Cancelled);
        assert_eq!(cancelled.message, "by user");
        let shutdown = outcome_of(Some(StopKind::Shutdown), ok, Some(true), &tail);
        assert!(shutdown.retryable);
    }
}
