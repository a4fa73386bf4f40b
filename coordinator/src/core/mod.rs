//! The coordinator's state machine: runs, workers, sweeps, checkpoints and
//! metrics, kept in memory for reads and written through to the store.
//!
//! Every change runs as a transaction ([`Coordinator::transact`]): under
//! one lock it validates, mutates the in-memory state and collects the
//! store writes and the notifications it causes; the writes are applied as
//! one atomic batch while the lock is held, so the store sees changes in
//! the order memory did. Then, outside the lock, the store is flushed and
//! only after that are workers and watchers told, and the caller answered.
//! A change that was acknowledged, or that anyone was told about, is
//! therefore on disk. Notifications leave through an ordered outbox, so
//! concurrent transactions never reorder a start and a stop.
//!
//! The operations live in the submodules, each adding methods to
//! [`Coordinator`] and to the transaction context [`Tx`].
//!
//! Limitation: when the store fails to apply a batch, the in-memory state
//! is already ahead of the disk; the caller gets UNAVAILABLE and the two
//! agree again only after a restart reloads the store.

pub mod checkpoints;
mod load;
pub mod metrics;
pub mod rendezvous;
pub mod runs;
pub mod sweeps;
pub mod workers;

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use jepa_common::proto::{self, watch_run_response, AssignmentEvent};
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use crate::clock::Clock;
use crate::config::CoordinatorConfig;
use crate::error::{CoordError, CoordResult};
use crate::store::records::{self, CheckpointRecord};
use crate::store::{Batch, Store, StoreError};

/// A run with what the coordinator keeps beside its record.
#[derive(Debug, Clone)]
pub(crate) struct RunEntry {
    pub run: proto::Run,
    /// Sequence number of the next history event.
    pub next_event: u64,
    /// The run's metric series with the highest step stored in each.
    pub series: BTreeMap<String, u64>,
}

/// Counters that hand out ids.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counters {
    pub run: u64,
    pub worker: u64,
    pub sweep: u64,
    pub upload: u64,
}

/// Everything the coordinator knows, in memory.
#[derive(Debug, Default)]
pub(crate) struct State {
    pub runs: BTreeMap<u64, RunEntry>,
    pub workers: BTreeMap<u64, proto::Worker>,
    pub worker_names: HashMap<String, u64>,
    pub sweeps: BTreeMap<u64, proto::Sweep>,
    pub requests: HashMap<String, u64>,
    pub checkpoints: BTreeMap<(u64, u64), CheckpointRecord>,
    /// Pending runs in scheduling order: priority descending, then FIFO.
    pub pending: BTreeSet<(Reverse<i32>, u64)>,
    /// Why pending runs of each request shape do not fit, as of the latest
    /// scheduling pass; filled into `Run.pending_reason` when a run is read.
    pub reasons: HashMap<runs::Shape, String>,
    pub next: Counters,
}

/// A change a watcher can see.
#[derive(Debug, Clone)]
pub struct WatchItem {
    /// Sequence number of the run it is about.
    pub run: u64,
    /// The event as the watch stream sends it.
    pub event: watch_run_response::Event,
}

/// What a transaction causes besides its in-memory changes.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    pub batch: Batch,
    pub worker_events: Vec<(u64, AssignmentEvent)>,
    /// Runs whose snapshot watchers should get.
    pub changed_runs: BTreeSet<u64>,
    pub metric_batches: Vec<(u64, proto::MetricBatch)>,
    /// Attempts that ended, whose rendezvous data can go.
    pub ended_attempts: Vec<(u64, u32)>,
    /// Whether capacity may have grown, so every pending run must be
    /// considered again before the commit.
    pub reschedule: bool,
    /// Runs that became pending; with capacity unchanged only they need a
    /// placement attempt.
    pub new_pending: Vec<u64>,
    /// Whether anyone watches runs; metric points are copied only then.
    pub watched: bool,
}

/// The context a transaction mutates.
pub(crate) struct Tx<'a> {
    pub st: &'a mut State,
    pub fx: Effects,
    pub now: i64,
    pub config: &'a CoordinatorConfig,
}

type WorkerSender = mpsc::Sender<Result<AssignmentEvent, Status>>;

/// Notifications waiting for their transaction's flush.
#[derive(Debug, Default)]
struct Outbox {
    next_seq: u64,
    queue: VecDeque<(u64, Delivery)>,
    workers: HashMap<u64, WorkerSender>,
}

#[derive(Debug, Default)]
struct Delivery {
    worker_events: Vec<(u64, AssignmentEvent)>,
    watch: Vec<Arc<WatchItem>>,
}

/// The coordinator's state and the operations on it, shared by the gRPC
/// services and the background tasks.
#[derive(Debug)]
pub struct Coordinator {
    state: Mutex<State>,
    outbox: Mutex<Outbox>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    config: CoordinatorConfig,
    watch: broadcast::Sender<Arc<WatchItem>>,
    rendezvous: rendezvous::Rendezvous,
    /// Highest ticket known to be flushed; also serialises flushes.
    durable: tokio::sync::Mutex<u64>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves state that every step kept
    // consistent before writing; carrying on beats taking the service down.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Coordinator {
    /// Loads the state in `store` and returns a coordinator serving it.
    ///
    /// Leases of workers known from before start anew, so that live
    /// daemons keep their runs across a coordinator restart.
    ///
    /// # Errors
    ///
    /// Fails when the store cannot be read or holds values of another
    /// format version.
    pub fn open(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: CoordinatorConfig,
    ) -> CoordResult<Arc<Self>> {
        let now = clock.now_ms();
        let mut state = load::load(store.as_ref(), now, &config)?;
        let (watch, _) = broadcast::channel(config.watch_buffer);
        let rendezvous = rendezvous::Rendezvous::default();

        let mut tx = Tx { st: &mut state, fx: Effects::default(), now, config: &config };
        tx.schedule();
        let batch = std::mem::take(&mut tx.fx.batch);
        store.apply(batch)?;
        store.flush()?;
        tracing::info!(
            runs = state.runs.len(),
            workers = state.workers.len(),
            pending = state.pending.len(),
            "coordinator state loaded"
        );
        Ok(Arc::new(Coordinator {
            state: Mutex::new(state),
            outbox: Mutex::new(Outbox::default()),
            store,
            clock,
            config,
            watch,
            rendezvous,
            durable: tokio::sync::Mutex::new(0),
        }))
    }

    /// The configuration this coordinator runs with.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// The current time of the coordinator's clock, Unix milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Runs `change` as one transaction: see the module docs. Returns after
    /// the change is durable and its notifications are sent.
    ///
    /// # Errors
    ///
    /// The error of `change` (then nothing changed), or a store error.
    pub(crate) async fn transact<T>(
        &self,
        change: impl FnOnce(&mut Tx<'_>) -> CoordResult<T>,
    ) -> CoordResult<T> {
        let (value, ticket) = self.apply(change)?;
        self.settle(ticket).await?;
        Ok(value)
    }

    fn apply<T>(
        &self,
        change: impl FnOnce(&mut Tx<'_>) -> CoordResult<T>,
    ) -> CoordResult<(T, u64)> {
        let mut state = lock(&self.state);
        let now = self.clock.now_ms();
        let watched = self.watch.receiver_count() > 0;
        let fx = Effects { watched, ..Effects::default() };
        let mut tx = Tx { st: &mut state, fx, now, config: &self.config };
        let value = change(&mut tx)?;
        if tx.fx.reschedule {
            tx.schedule();
        } else if !tx.fx.new_pending.is_empty() {
            let new = std::mem::take(&mut tx.fx.new_pending);
            tx.schedule_new(&new);
        }
        let fx = tx.fx;

        if !fx.batch.is_empty() {
            self.store.apply(fx.batch)?;
        }
        let mut delivery = Delivery { worker_events: fx.worker_events, watch: Vec::new() };
        for seq in fx.changed_runs.into_iter().filter(|_| watched) {
            if let Some(run) = state.view(seq) {
                let event = watch_run_response::Event::Run(run);
                delivery.watch.push(Arc::new(WatchItem { run: seq, event }));
            }
        }
        for (seq, batch) in fx.metric_batches {
            let event = watch_run_response::Event::Metrics(batch);
            delivery.watch.push(Arc::new(WatchItem { run: seq, event }));
        }
        for (run, attempt) in fx.ended_attempts {
            self.rendezvous.forget(run, attempt);
        }
        let mut outbox = lock(&self.outbox);
        outbox.next_seq += 1;
        let ticket = outbox.next_seq;
        outbox.queue.push_back((ticket, delivery));
        Ok((value, ticket))
    }

    /// Makes the transaction of `ticket` durable, then sends its
    /// notifications. One flush runs at a time and covers every batch
    /// applied before it started, so concurrent callers share it (group
    /// commit).
    async fn settle(&self, ticket: u64) -> CoordResult<()> {
        let flushed = {
            let mut durable = self.durable.lock().await;
            if *durable >= ticket {
                Ok(())
            } else {
                // Tickets are issued after their batch is applied, so every
                // ticket up to this one is in the store now.
                let applied = lock(&self.outbox).next_seq;
                let store = Arc::clone(&self.store);
                let result = tokio::task::spawn_blocking(move || store.flush())
                    .await
                    .map_err(|err| StoreError::Io(format!("flush task failed: {err}")))
                    .and_then(|result| result);
                if result.is_ok() {
                    *durable = applied;
                }
                result
            }
        };
        self.deliver(ticket);
        Ok(flushed?)
    }

    /// Sends every queued notification up to `ticket`, in commit order.
    fn deliver(&self, ticket: u64) {
        let mut outbox = lock(&self.outbox);
        while outbox.queue.front().is_some_and(|(seq, _)| *seq <= ticket) {
            let Some((_, delivery)) = outbox.queue.pop_front() else { break };
            for (worker, event) in delivery.worker_events {
                let Some(sender) = outbox.workers.get(&worker) else { continue };
                if sender.try_send(Ok(event)).is_err() {
                    // The worker converges on its next heartbeat instead.
                    tracing::warn!(worker, "assignment stream full or closed; dropping it");
                    outbox.workers.remove(&worker);
                }
            }
            for item in delivery.watch {
                let _ = self.watch.send(item);
            }
        }
    }

    /// Returns a run with its history.
    ///
    /// # Errors
    ///
    /// NOT_FOUND for an unknown id; a store error reading the history.
    pub fn get_run(&self, run_id: &str) -> CoordResult<(proto::Run, Vec<proto::RunEvent>)> {
        let seq = parse_run_id(run_id)?;
        let run = lock(&self.state).view(seq);
        let run = run.ok_or_else(|| CoordError::not_found("run", run_id))?;
        let prefix = records::event_prefix(seq);
        let events = crate::store::scan_prefix(self.store.as_ref(), &prefix)?
            .into_iter()
            .map(|(k, v)| records::decode::<proto::RunEvent>(&k, &v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((run, events))
    }

    /// Lists runs newest first, filtered and paged.
    ///
    /// # Errors
    ///
    /// INVALID_ARGUMENT for a bad page token or page size.
    pub fn list_runs(
        &self,
        req: &proto::ListRunsRequest,
    ) -> CoordResult<(Vec<proto::Run>, String)> {
        let page_size = match req.page_size {
            0 => 100,
            n @ 1..=1000 => n as usize,
            n => {
                return Err(CoordError::invalid("page_size", format!("is {n}; allowed: 0 to 1000")))
            }
        };
        let before = if req.page_token.is_empty() {
            u64::MAX
        } else {
            req.page_token.parse::<u64>().map_err(|_| {
                CoordError::invalid("page_token", "is not a token this coordinator issued")
            })?
        };
        let sweep = match req.sweep_id.as_str() {
            "" => None,
            id => Some(id.to_string()),
        };

        let state = lock(&self.state);
        let mut runs = Vec::new();
        let mut next = String::new();
        for (seq, entry) in state.runs.range(..before).rev() {
            let run = &entry.run;
            let state_ok = req.states.is_empty() || req.states.contains(&run.state);
            let name_ok = run.name.starts_with(&req.name_prefix);
            let sweep_ok = sweep.as_ref().is_none_or(|s| *s == run.sweep_id);
            if !(state_ok && name_ok && sweep_ok) {
                continue;
            }
            if runs.len() == page_size {
                next = (seq + 1).to_string();
                break;
            }
            runs.extend(state.view(*seq));
        }
        Ok((runs, next))
    }

    /// Lists workers by id.
    pub fn list_workers(&self, include_lost: bool) -> Vec<proto::Worker> {
        let state = lock(&self.state);
        state
            .workers
            .values()
            .filter(|w| include_lost || w.state == proto::WorkerState::Live as i32)
            .cloned()
            .collect()
    }

    /// Returns a sweep and its runs.
    ///
    /// # Errors
    ///
    /// NOT_FOUND for an unknown id.
    pub fn get_sweep(&self, sweep_id: &str) -> CoordResult<(proto::Sweep, Vec<proto::Run>)> {
        let seq = records::parse_id("swp", sweep_id)
            .ok_or_else(|| CoordError::not_found("sweep", sweep_id))?;
        let state = lock(&self.state);
        let sweep = state
            .sweeps
            .get(&seq)
            .cloned()
            .ok_or_else(|| CoordError::not_found("sweep", sweep_id))?;
        let runs = sweep
            .run_ids
            .iter()
            .filter_map(|id| records::parse_id("run", id))
            .filter_map(|seq| state.view(seq))
            .collect();
        Ok((sweep, runs))
    }

    /// Subscribes to changes of every run; see [`WatchItem`].
    pub fn subscribe_watch(&self) -> broadcast::Receiver<Arc<WatchItem>> {
        self.watch.subscribe()
    }

    /// Returns a snapshot of one run.
    ///
    /// # Errors
    ///
    /// NOT_FOUND for an unknown id.
    pub fn run_snapshot(&self, run_id: &str) -> CoordResult<(u64, proto::Run)> {
        let seq = parse_run_id(run_id)?;
        let state = lock(&self.state);
        let run = state.view(seq).ok_or_else(|| CoordError::not_found("run", run_id))?;
        Ok((seq, run))
    }

    pub(crate) fn store(&self) -> &dyn Store {
        self.store.as_ref()
    }

    pub(crate) fn with_state<T>(&self, read: impl FnOnce(&State) -> T) -> T {
        read(&lock(&self.state))
    }
}

impl State {
    /// Returns a copy of a run as the API shows it, with its pending reason.
    pub fn view(&self, seq: u64) -> Option<proto::Run> {
        let mut run = self.runs.get(&seq)?.run.clone();
        if run.state == proto::RunState::Pending as i32 {
            let reason = run.request.as_ref().and_then(|r| self.reasons.get(&runs::shape(r)));
            run.pending_reason = match self.sweep_limit_reached(&run) {
                Some((sweep_id, limit)) => sweeps::sweep_limit_reason(&sweep_id, limit),
                None => reason.cloned().unwrap_or_default(),
            };
        }
        Some(run)
    }
}

/// Parses a run id, answering NOT_FOUND for anything that is not one.
pub(crate) fn parse_run_id(run_id: &str) -> CoordResult<u64> {
    records::parse_id("run", run_id).ok_or_else(|| CoordError::not_found("run", run_id))
}

/// Whether a run state is final.
pub fn is_terminal(state: i32) -> bool {
    use proto::RunState as S;
    [S::Succeeded as i32, S::Failed as i32, S::Cancelled as i32].contains(&state)
}

/// Lowercase name of a run state, for messages.
pub fn state_name(state: i32) -> &'static str {
    match proto::RunState::try_from(state) {
        Ok(proto::RunState::Pending) => "pending",
        Ok(proto::RunState::Scheduled) => "scheduled",
        Ok(proto::RunState::Running) => "running",
        Ok(proto::RunState::Succeeded) => "succeeded",
        Ok(proto::RunState::Failed) => "failed",
        Ok(proto::RunState::Cancelled) => "cancelled",
        _ => "unspecified",
    }
}

impl Tx<'_> {
    /// Writes a run's record and tells its watchers.
    pub fn save_run(&mut self, seq: u64) {
        let Some(entry) = self.st.runs.get(&seq) else { return };
        self.fx.batch.put(records::run_key(seq), records::encode(&entry.run));
        self.fx.changed_runs.insert(seq);
    }

    /// Writes a worker's record.
    pub fn save_worker(&mut self, seq: u64) {
        let Some(worker) = self.st.workers.get(&seq) else { return };
        self.fx.batch.put(records::worker_key(seq), records::encode(worker));
    }

    /// Moves a run to `to`, recording the change in its history.
    pub fn set_run_state(&mut self, seq: u64, to: proto::RunState, message: &str) {
        let now = self.now;
        let Some(entry) = self.st.runs.get_mut(&seq) else { return };
        let from = entry.run.state;
        let attempt = u32::try_from(entry.run.attempts.len()).unwrap_or(u32::MAX);
        entry.run.state = to as i32;
        entry.run.updated_ms = now;
        if to == proto::RunState::Running && entry.run.started_ms == 0 {
            entry.run.started_ms = now;
        }
        if is_terminal(to as i32) {
            entry.run.finished_ms = now;
            entry.run.pending_reason.clear();
        }
        if matches!(to, proto::RunState::Failed | proto::RunState::Cancelled) {
            entry.run.message = message.to_string();
        }
        let event = proto::RunEvent {
            seq: entry.next_event,
            time_ms: now,
            from,
            to: to as i32,
            attempt,
            message: message.to_string(),
        };
        entry.next_event += 1;
        self.fx.batch.put(records::event_key(seq, event.seq), records::encode(&event));
        tracing::info!(
            run_id = %entry.run.id,
            from = state_name(from),
            to = state_name(to as i32),
            attempt,
            reason = message,
            "run changed state"
        );
        self.save_run(seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::{MemoryStore, SledStore};
    use jepa_common::spec::RunSpec;

    async fn life_cycle(store: Arc<dyn Store>) {
        let clock = Arc::new(ManualClock::new(1_000));
        let coord = Coordinator::open(store, clock, CoordinatorConfig::default()).unwrap();
        let spec = proto::RunSpec::from(&RunSpec::default());
        let run = coord.submit_run(Some(spec), 0, String::new()).await.unwrap();
        assert_eq!(run.pending_reason, "no live workers");

        let resources = proto::WorkerResources { cpu_slots: 1, ..Default::default() };
        let request = proto::RegisterRequest {
            name: "w".into(),
            resources: Some(resources),
            ..Default::default()
        };
        let worker = coord.register_worker(request).await.unwrap().worker_id;
        let (run, _) = coord.get_run(&run.id).unwrap();
        assert_eq!(run.state, proto::RunState::Scheduled as i32);

        let report = proto::ReportRunStateRequest {
            worker_id: worker,
            run_id: run.id.clone(),
            attempt: 1,
            state: proto::RunState::Succeeded as i32,
            ..Default::default()
        };
        coord.report_state(&report).await.unwrap();
        let (run, events) = coord.get_run(&run.id).unwrap();
        assert_eq!(run.state, proto::RunState::Succeeded as i32);
        assert_eq!(events.len(), 3);
    }

    #[tokio::test]
    async fn life_cycle_runs_the_same_on_both_backends() {
        life_cycle(Arc::new(MemoryStore::default())).await;
        let dir = tempfile::tempdir().unwrap();
        life_cycle(Arc::new(SledStore::open(dir.path()).unwrap())).await;
    }

    #[test]
    fn terminal_states_are_the_three_final_ones() {
        use proto::RunState as S;
        let terminal: Vec<S> =
            [S::Pending, S::Scheduled, S::Running, S::Succeeded, S::Failed, S::Cancelled]
                .into_iter()
                .filter(|s| is_terminal(*s as i32))
                .collect();
        assert_eq!(terminal, vec![S::Succeeded, S::Failed, S::Cancelled]);
        assert_eq!(state_name(99), "unspecified");
    }
}
