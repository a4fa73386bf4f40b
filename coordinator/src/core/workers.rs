//! Worker operations: registration, leases kept by heartbeats, assignment
//! streams, state reports, and the lease reaper that takes runs away from
//! workers that went silent.

use std::collections::BTreeSet;

use jepa_common::proto::{self, assignment_event, AssignmentEvent};
use tokio::sync::mpsc;
use tonic::Status;

use super::runs::AttemptEnd;
use super::{is_terminal, lock, parse_run_id, state_name, Coordinator, Tx};
use crate::error::{CoordError, CoordResult};
use crate::store::records;

/// Events an assignment stream may hold before the worker is dropped from
/// it (it then converges through heartbeats).
const STREAM_BUFFER: usize = 256;

/// What a heartbeat answers.
#[derive(Debug, Clone, Default)]
pub struct HeartbeatReply {
    /// When the lease now expires, Unix milliseconds.
    pub lease_expires_ms: i64,
    /// Every attempt the worker should run.
    pub assignments: Vec<proto::Assignment>,
    /// Attempts the worker runs but should stop.
    pub stop: Vec<proto::RunAttempt>,
}

fn parse_worker_id(worker_id: &str) -> CoordResult<u64> {
    records::parse_id("wkr", worker_id).ok_or_else(|| CoordError::not_found("worker", worker_id))
}

fn check_resources(resources: &proto::WorkerResources) -> CoordResult<()> {
    if resources.gpus.is_empty() && resources.cpu_slots == 0 {
        return Err(CoordError::invalid("resources", "offers no GPU and no CPU slot"));
    }
    let mut seen = BTreeSet::new();
    for gpu in &resources.gpus {
        if !seen.insert(gpu.index) {
            return Err(CoordError::invalid(
                "resources.gpus",
                format!("lists GPU index {} twice", gpu.index),
            ));
        }
    }
    Ok(())
}

impl Coordinator {
    /// Registers a worker (or re-registers one by name) and grants a lease.
    ///
    /// # Errors
    ///
    /// INVALID_ARGUMENT for a bad name or resources; a store error.
    pub async fn register_worker(
        &self,
        req: proto::RegisterRequest,
    ) -> CoordResult<proto::RegisterResponse> {
        let name_ok = !req.name.is_empty()
            && req.name.len() <= 253
            && req.name.chars().all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c));
        if !name_ok {
            return Err(CoordError::invalid(
                "name",
                "must be 1 to 253 characters of A-Z a-z 0-9 . _ - :",
            ));
        }
        let resources =
            req.resources.ok_or_else(|| CoordError::invalid("resources", "is missing"))?;
        check_resources(&resources)?;

        let worker_id = self
            .transact(|tx| {
                let seq = match tx.st.worker_names.get(&req.name) {
                    Some(&seq) => {
                        tx.lose_worker(seq, &format!("worker {} registered again", req.name));
                        seq
                    }
                    None => {
                        tx.st.next.worker += 1;
                        tx.st.worker_names.insert(req.name.clone(), tx.st.next.worker);
                        tx.st.next.worker
                    }
                };
                let ttl = i64::try_from(tx.config.lease_timeout_ms).unwrap_or(i64::MAX);
                let previous = tx.st.workers.remove(&seq).unwrap_or_default();
                let worker = proto::Worker {
                    id: records::worker_id(seq),
                    name: req.name.clone(),
                    resources: Some(resources.clone()),
                    state: proto::WorkerState::Live as i32,
                    registered_ms: tx.now,
                    last_heartbeat_ms: tx.now,
                    lease_expires_ms: tx.now.saturating_add(ttl),
                    allocations: previous.allocations,
                    address: req.address.clone(),
                    version: req.version.clone(),
                };
                tracing::info!(
                    worker_id = %worker.id,
                    name = %worker.name,
                    gpus = resources.gpus.len(),
                    cpu_slots = resources.cpu_slots,
                    "worker registered"
                );
                tx.st.workers.insert(seq, worker);
                tx.save_worker(seq);
                tx.fx.reschedule = true;
                Ok(records::worker_id(seq))
            })
            .await?;
        Ok(proto::RegisterResponse {
            worker_id,
            lease_ttl_ms: self.config.lease_timeout_ms,
            heartbeat_interval_ms: self.config.heartbeat_interval_ms,
        })
    }

    /// Renews a worker's lease, frees what it confirmed stopping, and says
    /// what it should run.
    ///
    /// # Errors
    ///
    /// NOT_FOUND for an unknown worker, FAILED_PRECONDITION for a worker
    /// whose lease expired.
    pub async fn heartbeat(
        &self,
        worker_id: &str,
        running: &[proto::RunAttempt],
    ) -> CoordResult<HeartbeatReply> {
        let seq = parse_worker_id(worker_id)?;
        self.transact(|tx| {
            let ttl = i64::try_from(tx.config.lease_timeout_ms).unwrap_or(i64::MAX);
            let now = tx.now;
            let worker = tx.live_worker(seq, worker_id)?;
            worker.last_heartbeat_ms = now;
            worker.lease_expires_ms = now.saturating_add(ttl);
            let lease_expires_ms = worker.lease_expires_ms;
            let reported = |a: &proto::Allocation| {
                running.iter().any(|r| r.run_id == a.run_id && r.attempt == a.attempt)
            };
            let before = worker.allocations.len();
            worker.allocations.retain(|a| !a.draining || reported(a));
            if worker.allocations.len() != before {
                // Leases are renewed in memory only; a restart grants fresh
                // ones. Freed resources, though, must be written.
                tx.save_worker(seq);
                // Place now, so this very answer carries what the freed
                // resources were given to.
                tx.schedule();
            }
            Ok(tx.heartbeat_reply(seq, lease_expires_ms, running))
        })
        .await
    }

    /// Opens the assignment stream of a worker, replacing an earlier one.
    /// The stream first holds every attempt the worker should run.
    ///
    /// # Errors
    ///
    /// NOT_FOUND for an unknown worker, FAILED_PRECONDITION for a lost one.
    pub fn subscribe_assignments(
        &self,
        worker_id: &str,
    ) -> CoordResult<mpsc::Receiver<Result<AssignmentEvent, Status>>> {
        let seq = parse_worker_id(worker_id)?;
        let (sender, receiver) = mpsc::channel(STREAM_BUFFER);
        let mut state = lock(&self.state);
        let now = self.clock.now_ms();
        let mut tx = Tx { st: &mut state, fx: Default::default(), now, config: &self.config };
        tx.live_worker(seq, worker_id)?;
        for assignment in tx.heartbeat_reply(seq, 0, &[]).assignments {
            let event = AssignmentEvent { event: Some(assignment_event::Event::Start(assignment)) };
            let _ = sender.try_send(Ok(event));
        }
        // Registered under the state lock, so no committed change can slip
        // between this snapshot and the stream (a repeat is harmless).
        lock(&self.outbox).workers.insert(seq, sender);
        tracing::debug!(worker_id, "assignment stream opened");
        Ok(receiver)
    }

    /// Applies a worker's report on its ranks of one attempt.
    ///
    /// # Errors
    ///
    /// NOT_FOUND for an unknown run or worker; FAILED_PRECONDITION for a
    /// RUNNING report on an attempt that ended or is not the worker's;
    /// INVALID_ARGUMENT for a state a worker cannot report.
    pub async fn report_state(
        &self,
        req: &proto::ReportRunStateRequest,
    ) -> CoordResult<proto::ReportRunStateResponse> {
        use proto::RunState as S;
        let state = S::try_from(req.state).unwrap_or(S::Unspecified);
        if !matches!(state, S::Running | S::Succeeded | S::Failed | S::Cancelled) {
            return Err(CoordError::invalid(
                "state",
                format!(
                    "is {}; allowed: running, succeeded, failed, cancelled",
                    state_name(req.state)
                ),
            ));
        }
        let wseq = parse_worker_id(&req.worker_id)?;
        let rseq = parse_run_id(&req.run_id)?;
        self.transact(|tx| {
            tx.live_worker(wseq, &req.worker_id)?;
            let entry =
                tx.st.runs.get(&rseq).ok_or_else(|| CoordError::not_found("run", &req.run_id))?;
            let current =
                entry.run.attempts.last().filter(|a| a.number == req.attempt && a.ended_ms == 0);
            let placed =
                current.is_some_and(|a| a.placements.iter().any(|p| p.worker_id == req.worker_id));
            let run_state = entry.run.state;

            if state != S::Running {
                // A final report always frees what the worker held for it.
                tx.free_allocation(wseq, &req.run_id, req.attempt);
            }
            if !placed {
                if state == S::Running {
                    return Err(CoordError::precondition(format!(
                        "attempt {} of run {} is not running on {} (run is {}); stop it",
                        req.attempt,
                        req.run_id,
                        req.worker_id,
                        state_name(run_state)
                    )));
                }
                return Ok(proto::ReportRunStateResponse { run_state, stop: true });
            }
            tx.apply_report(rseq, req, state);
            let entry = tx.st.runs.get(&rseq);
            let run_state = entry.map_or(run_state, |e| e.run.state);
            Ok(proto::ReportRunStateResponse { run_state, stop: state != S::Running })
        })
        .await
    }

    /// Takes runs away from every worker whose lease has expired; the
    /// reaper calls this periodically, tests call it directly.
    ///
    /// # Errors
    ///
    /// A store error.
    pub async fn expire_leases(&self) -> CoordResult<usize> {
        self.transact(|tx| {
            let live = proto::WorkerState::Live as i32;
            let expired: Vec<u64> = tx
                .st
                .workers
                .iter()
                .filter(|(_, w)| w.state == live && w.lease_expires_ms < tx.now)
                .map(|(&seq, _)| seq)
                .collect();
            for &seq in &expired {
                let Some(worker) = tx.st.workers.get_mut(&seq) else { continue };
                worker.state = proto::WorkerState::Lost as i32;
                tracing::warn!(worker_id = %worker.id, name = %worker.name, "worker lease expired");
                let reason = format!("lease of worker {} expired", worker.id);
                tx.lose_worker(seq, &reason);
            }
            Ok(expired.len())
        })
        .await
    }
}

impl Tx<'_> {
    /// Returns a worker that holds a lease.
    fn live_worker(&mut self, seq: u64, worker_id: &str) -> CoordResult<&mut proto::Worker> {
        let worker = self
            .st
            .workers
            .get_mut(&seq)
            .ok_or_else(|| CoordError::not_found("worker", worker_id))?;
        if worker.state != proto::WorkerState::Live as i32 {
            return Err(CoordError::precondition(format!(
                "lease of worker {worker_id} expired; register again"
            )));
        }
        Ok(worker)
    }

    /// Drops every allocation of a worker and ends the attempts they held.
    fn lose_worker(&mut self, seq: u64, reason: &str) {
        let Some(worker) = self.st.workers.get_mut(&seq) else { return };
        let allocations = std::mem::take(&mut worker.allocations);
        self.save_worker(seq);
        for alloc in allocations.into_iter().filter(|a| !a.draining) {
            let Some(rseq) = records::parse_id("run", &alloc.run_id) else { continue };
            let current = self.st.runs.get(&rseq).is_some_and(|e| {
                !is_terminal(e.run.state)
                    && e.run
                        .attempts
                        .last()
                        .is_some_and(|a| a.number == alloc.attempt && a.ended_ms == 0)
            });
            if current {
                self.end_attempt(rseq, AttemptEnd::Lost(reason.to_string()));
            }
        }
        self.fx.reschedule = true;
    }

    fn free_allocation(&mut self, wseq: u64, run_id: &str, attempt: u32) {
        let Some(worker) = self.st.workers.get_mut(&wseq) else { return };
        let before = worker.allocations.len();
        worker.allocations.retain(|a| !(a.run_id == run_id && a.attempt == attempt));
        if worker.allocations.len() != before {
            self.save_worker(wseq);
            self.fx.reschedule = true;
        }
    }

    fn apply_report(
        &mut self,
        rseq: u64,
        req: &proto::ReportRunStateRequest,
        state: proto::RunState,
    ) {
        use proto::RunState as S;
        let Some(entry) = self.st.runs.get_mut(&rseq) else { return };
        let Some(attempt) = entry.run.attempts.last_mut() else { return };
        if let Some(p) = attempt.placements.iter_mut().find(|p| p.worker_id == req.worker_id) {
            p.state = state as i32;
        }
        let all_done = attempt.placements.iter().all(|p| p.state == S::Succeeded as i32);
        let run_state = entry.run.state;
        match state {
            S::Running if run_state == S::Scheduled as i32 => {
                self.set_run_state(rseq, S::Running, &format!("started on {}", req.worker_id));
            }
            S::Running => self.save_run(rseq),
            S::Succeeded if all_done => self.end_attempt(rseq, AttemptEnd::Succeeded),
            S::Succeeded => self.save_run(rseq),
            _ => {
                let detail =
                    if req.message.is_empty() { "no detail" } else { req.message.as_str() };
                let what = if state == S::Cancelled { "stopped" } else { "failed" };
                let reason = format!("ranks on {} {what}: {detail}", req.worker_id);
                self.end_attempt(rseq, AttemptEnd::Failed { reason, retryable: req.retryable });
            }
        }
    }

    fn heartbeat_reply(
        &self,
        seq: u64,
        lease_expires_ms: i64,
        running: &[proto::RunAttempt],
    ) -> HeartbeatReply {
        let Some(worker) = self.st.workers.get(&seq) else { return HeartbeatReply::default() };
        let active: Vec<&proto::Allocation> =
            worker.allocations.iter().filter(|a| !a.draining).collect();
        let assignments = active
            .iter()
            .filter_map(|a| {
                let rseq = records::parse_id("run", &a.run_id)?;
                self.assignment(rseq, a.attempt, seq)
            })
            .collect();
        let stop = running
            .iter()
            .filter(|r| !active.iter().any(|a| a.run_id == r.run_id && a.attempt == r.attempt))
            .cloned()
            .collect();
        HeartbeatReply { lease_expires_ms, assignments, stop }
    }
}
