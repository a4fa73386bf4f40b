//! Run operations: submit (alone or as a sweep), cancel, the scheduling
//! pass that turns pending runs into attempts, and the end of an attempt
//! with its restart rule.

use std::cmp::Reverse;

use jepa_common::proto::{self, assignment_event, AssignmentEvent};
use jepa_common::spec::RunSpec;
use jepa_common::spec_override::set_field;

use super::{is_terminal, parse_run_id, state_name, Coordinator, RunEntry, Tx};
use crate::error::{CoordError, CoordResult};
use crate::scheduler::{self, Capacity, HostPlan};
use crate::store::records;

/// What placement depends on: GPU or CPU, ranks per host, hosts, minimum
/// GPU memory. Runs of one shape fit or do not fit together.
pub type Shape = (bool, u32, u32, u64);

/// Returns the shape of a request.
pub fn shape(req: &proto::ResourceRequest) -> Shape {
    (req.gpu, req.ranks_per_host, req.hosts, req.min_gpu_memory_bytes)
}

/// Most runs one sweep may create.
pub const MAX_SWEEP_RUNS: usize = 4096;

/// Longest idempotency key of a submit.
const MAX_REQUEST_ID_LEN: usize = 128;

/// How an attempt ended, which decides the run's next state.
#[derive(Debug, Clone)]
pub(crate) enum AttemptEnd {
    /// Every worker reported success.
    Succeeded,
    /// A worker of the attempt went away; retried while restarts remain.
    Lost(String),
    /// A rank failed; retried while restarts remain if `retryable`.
    Failed { reason: String, retryable: bool },
    /// A user cancelled the run.
    Cancelled(String),
}

/// Derives the scheduler's request from a validated spec.
pub fn resource_request(spec: &RunSpec, min_gpu_memory_bytes: u64) -> proto::ResourceRequest {
    let r = &spec.resources;
    let hosts = r.hosts.max(1);
    proto::ResourceRequest {
        gpu: r.is_cuda(),
        ranks: r.ranks,
        hosts,
        ranks_per_host: r.ranks / hosts,
        min_gpu_memory_bytes: if r.is_cuda() { min_gpu_memory_bytes } else { 0 },
    }
}

impl Coordinator {
    /// Validates and stores a run and queues it; returns it after it is
    /// durable (already SCHEDULED when resources were free).
    ///
    /// # Errors
    ///
    /// INVALID_ARGUMENT naming the field of a bad spec; a store error.
    pub async fn submit_run(
        &self,
        spec: Option<proto::RunSpec>,
        min_gpu_memory_bytes: u64,
        request_id: String,
    ) -> CoordResult<proto::Run> {
        let wire = spec.ok_or_else(|| CoordError::invalid("spec", "is missing"))?;
        let spec = RunSpec::try_from(wire)?;
        if request_id.len() > MAX_REQUEST_ID_LEN {
            return Err(CoordError::invalid(
                "request_id",
                format!("is {} bytes; allowed: at most {MAX_REQUEST_ID_LEN}", request_id.len()),
            ));
        }

        let seq = self
            .transact(|tx| {
                if let Some(&seq) = tx.st.requests.get(&request_id) {
                    return Ok(seq);
                }
                let seq = tx.create_run(&spec, min_gpu_memory_bytes, "");
                if !request_id.is_empty() {
                    tx.st.requests.insert(request_id.clone(), seq);
                    let key = records::request_key(&request_id);
                    tx.fx.batch.put(key, records::encode_u64(seq));
                }
                Ok(seq)
            })
            .await?;
        Ok(self.run_snapshot(&records::run_id(seq))?.1)
    }

    /// Expands a sweep into its runs and submits them all, or none.
    ///
    /// # Errors
    ///
    /// INVALID_ARGUMENT naming the field of a bad axis or spec point; a
    /// store error.
    pub async fn submit_sweep(&self, req: proto::SubmitSweepRequest) -> CoordResult<proto::Sweep> {
        let base =
            RunSpec::try_from(req.base.ok_or_else(|| CoordError::invalid("base", "is missing"))?)?;
        let specs = expand_sweep(&req.name, &base, &req.axes)?;
        let min_memory = req.min_gpu_memory_bytes;

        self.transact(|tx| {
            tx.st.next.sweep += 1;
            let seq = tx.st.next.sweep;
            let id = records::sweep_id(seq);
            let run_ids = specs
                .iter()
                .map(|spec| records::run_id(tx.create_run(spec, min_memory, &id)))
                .collect();
            let sweep = proto::Sweep {
                id,
                name: req.name.clone(),
                base: Some(proto::RunSpec::from(&base)),
                axes: req.axes.clone(),
                run_ids,
                created_ms: tx.now,
                max_parallel: req.max_parallel,
            };
            tx.fx.batch.put(records::sweep_key(seq), records::encode(&sweep));
            tracing::info!(sweep_id = %sweep.id, runs = sweep.run_ids.len(), "sweep submitted");
            tx.st.sweeps.insert(seq, sweep.clone());
            Ok(sweep)
        })
        .await
    }

    /// Cancels an unfinished run; its workers are told to stop.
    ///
    /// # Errors
    ///
    /// NOT_FOUND for an unknown id, FAILED_PRECONDITION for a finished run.
    pub async fn cancel_run(&self, run_id: &str, reason: &str) -> CoordResult<proto::Run> {
        let seq = parse_run_id(run_id)?;
        let message = if reason.is_empty() {
            "cancelled by user".to_string()
        } else {
            format!("cancelled by user: {reason}")
        };
        self.transact(|tx| {
            let entry = tx.st.runs.get(&seq).ok_or_else(|| CoordError::not_found("run", run_id))?;
            let state = entry.run.state;
            if is_terminal(state) {
                return Err(CoordError::precondition(format!(
                    "run {run_id} already {}; only unfinished runs can be cancelled",
                    state_name(state)
                )));
            }
            if state == proto::RunState::Pending as i32 {
                let key = (Reverse(entry.run.priority), seq);
                tx.st.pending.remove(&key);
                tx.set_run_state(seq, proto::RunState::Cancelled, &message);
            } else {
                tx.end_attempt(seq, AttemptEnd::Cancelled(message.clone()));
            }
            Ok(())
        })
        .await?;
        Ok(self.run_snapshot(run_id)?.1)
    }
}

/// Returns one validated spec per point of the axes' cartesian product.
fn expand_sweep(
    name: &str,
    base: &RunSpec,
    axes: &[proto::SweepAxis],
) -> CoordResult<Vec<RunSpec>> {
    let name_ok = !name.is_empty()
        && name.len() <= 100
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !name_ok {
        return Err(CoordError::invalid(
            "name",
            "must be 1 to 100 characters of A-Z a-z 0-9 . _ -",
        ));
    }
    let mut count: usize = 1;
    for (i, axis) in axes.iter().enumerate() {
        if axis.field.is_empty() || axis.values.is_empty() {
            return Err(CoordError::invalid(
                format!("axes[{i}]"),
                "needs a field and at least one value",
            ));
        }
        if axes[..i].iter().any(|earlier| earlier.field == axis.field) {
            return Err(CoordError::invalid(
                format!("axes[{i}].field"),
                format!("{} appears in two axes; list all its values in one", axis.field),
            ));
        }
        count = count.saturating_mul(axis.values.len());
    }
    if count > MAX_SWEEP_RUNS {
        return Err(CoordError::invalid(
            "axes",
            format!("make {count} runs; allowed: at most {MAX_SWEEP_RUNS}"),
        ));
    }

    let axes: Vec<&proto::SweepAxis> = axes.iter().collect();
    (0..count)
        .map(|index| {
            let mut spec = base.clone();
            let mut point = Vec::new();
            // Innermost axis first, so an error names the point up to the bad field.
            for v in super::sweeps::axis_point(&axes, index).iter().rev() {
                point.push(format!("{}={}", v.field, v.value));
                spec = set_field(&spec, &v.field, &v.value).map_err(|e| at_point(e, &point))?;
            }
            spec.name = format!("{name}-{index}");
            spec.validate().map_err(|e| at_point(e, &point))?;
            Ok(spec)
        })
        .collect()
}

fn at_point(err: jepa_common::spec::SpecError, point: &[String]) -> CoordError {
    match CoordError::from(err) {
        CoordError::InvalidArgument { field, message } => CoordError::InvalidArgument {
            field,
            message: format!("{message} (at sweep point {})", point.join(", ")),
        },
        other => other,
    }
}

impl Tx<'_> {
    /// Creates a PENDING run; the caller has validated `spec`.
    pub fn create_run(&mut self, spec: &RunSpec, min_gpu_memory_bytes: u64, sweep_id: &str) -> u64 {
        self.st.next.run += 1;
        let seq = self.st.next.run;
        let run = proto::Run {
            id: records::run_id(seq),
            name: spec.name.clone(),
            spec: Some(proto::RunSpec::from(spec)),
            state: proto::RunState::Unspecified as i32,
            priority: spec.priority,
            submit_seq: seq,
            created_ms: self.now,
            updated_ms: self.now,
            progress: Some(proto::Progress {
                total_steps: spec.schedule.steps,
                ..Default::default()
            }),
            sweep_id: sweep_id.to_string(),
            request: Some(resource_request(spec, min_gpu_memory_bytes)),
            ..Default::default()
        };
        self.st.runs.insert(seq, RunEntry { run, next_event: 1, series: Default::default() });
        self.st.pending.insert((Reverse(spec.priority), seq));
        self.set_run_state(seq, proto::RunState::Pending, "submitted");
        self.fx.new_pending.push(seq);
        seq
    }

    /// Free resources of every live worker.
    fn capacities(&self) -> Vec<Capacity> {
        let live = proto::WorkerState::Live as i32;
        self.st
            .workers
            .iter()
            .filter(|(_, w)| w.state == live)
            .map(|(&seq, w)| {
                let resources = w.resources.clone().unwrap_or_default();
                let held: Vec<u32> =
                    w.allocations.iter().flat_map(|a| a.gpu_indices.iter().copied()).collect();
                let used_slots: u32 = w.allocations.iter().map(|a| a.cpu_slots).sum();
                Capacity {
                    worker: seq,
                    free_gpus: resources
                        .gpus
                        .iter()
                        .filter(|g| !held.contains(&g.index))
                        .map(|g| (g.index, g.memory_bytes))
                        .collect(),
                    free_cpu_slots: resources.cpu_slots.saturating_sub(used_slots),
                }
            })
            .collect()
    }

    /// Places pending runs in order (priority, then submit order); a run
    /// that does not fit leaves a reason for its shape, and later runs may
    /// still fit. Runs after capacity may have grown.
    ///
    /// Limitation: there is no reservation, so a large gang run can wait
    /// behind a steady stream of smaller runs that keep fitting first.
    pub fn schedule(&mut self) {
        self.st.reasons.clear();
        if self.st.pending.is_empty() {
            return;
        }
        let mut caps = self.capacities();
        let queue: Vec<u64> = self.st.pending.iter().map(|&(_, seq)| seq).collect();
        self.place_in_order(&queue, &mut caps);
    }

    /// Places only runs that just became pending. With capacity unchanged
    /// since the last pass, every older pending run still does not fit, so
    /// this gives the same result as a full pass without walking the queue.
    pub fn schedule_new(&mut self, new: &[u64]) {
        let mut queue: Vec<(Reverse<i32>, u64)> = new
            .iter()
            .filter_map(|&seq| self.st.runs.get(&seq).map(|e| (Reverse(e.run.priority), seq)))
            .filter(|key| self.st.pending.contains(key))
            .collect();
        if queue.is_empty() {
            return;
        }
        queue.sort_unstable();
        let mut caps = self.capacities();
        let queue: Vec<u64> = queue.into_iter().map(|(_, seq)| seq).collect();
        if self.place_in_order(&queue, &mut caps) {
            // Placements took capacity: the numbers in the other reasons moved.
            let shapes: Vec<Shape> = self.st.reasons.keys().copied().collect();
            for shape in shapes {
                let (gpu, ranks_per_host, hosts, min_gpu_memory_bytes) = shape;
                let ranks = ranks_per_host * hosts;
                let req = proto::ResourceRequest {
                    gpu,
                    ranks,
                    hosts,
                    ranks_per_host,
                    min_gpu_memory_bytes,
                };
                if let Err(reason) = scheduler::place(&req, &caps) {
                    self.st.reasons.insert(shape, reason);
                }
            }
        }
    }

    /// Tries `queue` in order; returns whether anything was placed.
    fn place_in_order(&mut self, queue: &[u64], caps: &mut [Capacity]) -> bool {
        let mut placed = false;
        for &seq in queue {
            let Some(entry) = self.st.runs.get(&seq) else { continue };
            let Some(req) = entry.run.request else { continue };
            // A trial of a sweep at its limit waits; the limit frees up when
            // a trial ends, which also frees capacity and so brings a full
            // scheduling pass.
            if self.st.sweep_limit_reached(&entry.run).is_some() {
                continue;
            }
            // Capacity only shrinks during a pass (and between a full pass
            // and the next), so a shape that did not fit will not fit now.
            if self.st.reasons.contains_key(&shape(&req)) {
                continue;
            }
            match scheduler::place(&req, caps) {
                Ok(plans) => {
                    scheduler::consume(caps, &plans);
                    self.start_attempt(seq, &plans);
                    placed = true;
                }
                Err(reason) => {
                    self.st.reasons.insert(shape(&req), reason);
                }
            }
        }
        placed
    }

    fn start_attempt(&mut self, seq: u64, plans: &[HostPlan]) {
        let Some(entry) = self.st.runs.get_mut(&seq) else { return };
        let number = u32::try_from(entry.run.attempts.len() + 1).unwrap_or(u32::MAX);
        let placements: Vec<proto::Placement> = plans
            .iter()
            .map(|p| proto::Placement {
                worker_id: records::worker_id(p.worker),
                ranks: p.ranks.clone(),
                gpu_indices: p.gpu_indices.clone(),
                cpu_slots: p.cpu_slots,
                state: proto::RunState::Scheduled as i32,
            })
            .collect();
        let where_ = placements.iter().map(|p| p.worker_id.as_str()).collect::<Vec<_>>().join(", ");
        entry.run.attempts.push(proto::Attempt {
            number,
            placements,
            started_ms: self.now,
            resume_step: entry.run.last_checkpoint_step,
            ..Default::default()
        });
        entry.run.pending_reason.clear();
        let key = (Reverse(entry.run.priority), seq);
        let run_id = entry.run.id.clone();
        self.st.pending.remove(&key);

        for plan in plans {
            let Some(worker) = self.st.workers.get_mut(&plan.worker) else { continue };
            worker.allocations.push(proto::Allocation {
                run_id: run_id.clone(),
                attempt: number,
                gpu_indices: plan.gpu_indices.clone(),
                cpu_slots: plan.cpu_slots,
                draining: false,
            });
            self.save_worker(plan.worker);
        }
        self.set_run_state(seq, proto::RunState::Scheduled, &format!("placed on {where_}"));
        for plan in plans {
            if let Some(assignment) = self.assignment(seq, number, plan.worker) {
                let event = assignment_event::Event::Start(assignment);
                self.fx.worker_events.push((plan.worker, AssignmentEvent { event: Some(event) }));
            }
        }
    }

    /// Builds what `worker` must start for one attempt of a run.
    pub fn assignment(&self, seq: u64, attempt: u32, worker: u64) -> Option<proto::Assignment> {
        let run = &self.st.runs.get(&seq)?.run;
        let current = run.attempts.iter().find(|a| a.number == attempt)?;
        let worker_id = records::worker_id(worker);
        let mine = current.placements.iter().find(|p| p.worker_id == worker_id)?;
        let rank0 = current.placements.iter().find(|p| p.ranks.contains(&0))?;
        let ranks = mine
            .ranks
            .iter()
            .enumerate()
            .map(|(i, &rank)| proto::RankSlot { rank, gpu_index: mine.gpu_indices.get(i).copied() })
            .collect();
        let resume_from = current
            .resume_step
            .and_then(|step| self.st.checkpoints.get(&(seq, step)))
            .and_then(|record| record.info.clone());
        Some(proto::Assignment {
            run_id: run.id.clone(),
            attempt,
            spec: run.spec.clone(),
            world_size: run.request.as_ref().map_or(1, |r| r.ranks),
            ranks,
            rank0_worker_id: rank0.worker_id.clone(),
            resume_from,
        })
    }

    /// Ends the current attempt of a run and moves the run on: to a final
    /// state, or back to PENDING while restarts remain.
    pub fn end_attempt(&mut self, seq: u64, end: AttemptEnd) {
        let now = self.now;
        let Some(entry) = self.st.runs.get_mut(&seq) else { return };
        let (reason, retry) = match &end {
            AttemptEnd::Succeeded => ("succeeded".to_string(), false),
            AttemptEnd::Lost(r) => (r.clone(), true),
            AttemptEnd::Failed { reason, retryable } => (reason.clone(), *retryable),
            AttemptEnd::Cancelled(r) => (r.clone(), false),
        };
        let run_id = entry.run.id.clone();
        let max_restarts = entry.run.spec.as_ref().map_or(0, |s| s.max_restarts);
        let restarts = entry.run.restarts;
        let Some(attempt) = entry.run.attempts.last_mut() else { return };
        if attempt.ended_ms == 0 {
            attempt.ended_ms = now;
            attempt.end_reason = reason.clone();
        }
        let number = attempt.number;
        let workers: Vec<String> = attempt.placements.iter().map(|p| p.worker_id.clone()).collect();
        self.fx.ended_attempts.push((seq, number));
        for worker_id in workers {
            self.drain_allocation(&worker_id, &run_id, number, &reason);
        }

        use proto::RunState as S;
        match end {
            AttemptEnd::Succeeded => self.set_run_state(seq, S::Succeeded, "every rank finished"),
            AttemptEnd::Cancelled(r) => self.set_run_state(seq, S::Cancelled, &r),
            _ if retry && restarts < max_restarts => {
                if let Some(entry) = self.st.runs.get_mut(&seq) {
                    entry.run.restarts += 1;
                    self.st.pending.insert((Reverse(entry.run.priority), seq));
                }
                self.fx.new_pending.push(seq);
                let message = format!("{reason}; restart {} of {max_restarts}", restarts + 1);
                self.set_run_state(seq, S::Pending, &message);
            }
            _ if retry => {
                let message = format!("{reason}; no restart left ({max_restarts} allowed)");
                self.set_run_state(seq, S::Failed, &message);
            }
            _ => self.set_run_state(seq, S::Failed, &reason),
        }
    }

    /// Marks a worker's allocation for an attempt as draining and tells the
    /// worker to stop; the resources stay held until it confirms.
    fn drain_allocation(&mut self, worker_id: &str, run_id: &str, attempt: u32, reason: &str) {
        let Some(wseq) = records::parse_id("wkr", worker_id) else { return };
        let Some(worker) = self.st.workers.get_mut(&wseq) else { return };
        let Some(alloc) = worker
            .allocations
            .iter_mut()
            .find(|a| a.run_id == run_id && a.attempt == attempt && !a.draining)
        else {
            return;
        };
        alloc.draining = true;
        let stop =
            proto::StopRun { run_id: run_id.to_string(), attempt, reason: reason.to_string() };
        let event = AssignmentEvent { event: Some(assignment_event::Event::Stop(stop)) };
        self.fx.worker_events.push((wseq, event));
        self.save_worker(wseq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn axis(field: &str, values: &[&str]) -> proto::SweepAxis {
        proto::SweepAxis {
            field: field.into(),
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn sweep_expands_the_cartesian_product_in_order() {
        let axes = [
            axis("mask.context_scale", &["0.4:1.0", "0.85:1.0"]),
            axis("conditioning.kind", &["none", "ec"]),
        ];
        let specs = expand_sweep("cs", &RunSpec::default(), &axes).unwrap();
        assert_eq!(specs.len(), 4);
        assert_eq!(specs[0].name, "cs-0");
        assert_eq!(specs[1].mask.context_scale, [0.4, 1.0]);
        assert_eq!(specs[1].conditioning.kind, jepa_common::spec::Conditioning::Ec);
        assert_eq!(specs[2].mask.context_scale, [0.85, 1.0]);
    }

    #[test]
    fn a_bad_sweep_point_names_the_field_and_the_point() {
        let axes = [axis("mask.context_scale", &["0.4:1.0", "0.9:0.1"])];
        let err = expand_sweep("cs", &RunSpec::default(), &axes).unwrap_err();
        let CoordError::InvalidArgument { field, message } = err else { panic!("{err}") };
        assert_eq!(field, "mask.context_scale");
        assert!(message.contains("mask.context_scale=0.9:0.1"), "{message}");
    }

    #[test]
    fn oversized_sweeps_are_refused() {
        let values: Vec<String> = (0..100).map(|i| i.to_string()).collect();
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        let axes = [axis("seed", &refs), axis("optim.batch_size", &refs)];
        let err = expand_sweep("big", &RunSpec::default(), &axes).unwrap_err();
        assert!(err.to_string().starts_with("axes: make 10000 runs"), "{err}");
    }

    #[test]
    fn requests_follow_the_resources_section() {
        let mut spec = RunSpec::default();
        spec.resources.device = "cuda".into();
        spec.resources.ranks = 8;
        spec.resources.gpus = 8;
        spec.resources.hosts = 2;
        let req = resource_request(&spec, 1 << 30);
        assert!(req.gpu);
        assert_eq!((req.ranks, req.hosts, req.ranks_per_host), (8, 2, 4));
        assert_eq!(req.min_gpu_memory_bytes, 1 << 30);
        assert_eq!(resource_request(&RunSpec::default(), 1 << 30).min_gpu_memory_bytes, 0);
    }
}
