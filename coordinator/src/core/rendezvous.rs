//! Rendezvous of the ranks of one attempt: rank 0 publishes a payload (the
//! NCCL unique id, or its TCP address for the CPU backend) and every other
//! rank waits for it. The attempt number is the generation, so ranks of an
//! old attempt can never meet ranks of a new one.
//!
//! Limitation: payloads live in memory only; if the coordinator restarts
//! while ranks wait, they time out and the attempt must fail and be
//! restarted for rank 0 to publish again.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use jepa_common::proto;
use tokio::sync::watch;

use super::{lock, parse_run_id, Coordinator};
use crate::error::{CoordError, CoordResult};

/// Largest payload rank 0 may publish, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 64 << 10;

type Slot = watch::Sender<Option<Vec<u8>>>;

/// Published payloads by (run, generation).
#[derive(Debug, Default)]
pub struct Rendezvous {
    slots: Mutex<HashMap<(u64, u32), Slot>>,
}

impl Rendezvous {
    fn slot(&self, run: u64, generation: u32) -> Slot {
        let mut slots = lock(&self.slots);
        slots.entry((run, generation)).or_insert_with(|| watch::channel(None).0).clone()
    }

    /// Drops the payloads of a run up to `generation`; ranks still waiting
    /// on them are told the attempt ended.
    pub fn forget(&self, run: u64, generation: u32) {
        lock(&self.slots).retain(|&(r, g), _| !(r == run && g <= generation));
    }
}

impl Coordinator {
    /// Publishes (rank 0) or waits for (other ranks) an attempt's payload.
    ///
    /// # Errors
    ///
    /// INVALID_ARGUMENT for a bad payload or rank, NOT_FOUND for an unknown
    /// run, FAILED_PRECONDITION for a generation that is not current or a
    /// rank the worker does not hold, DEADLINE_EXCEEDED when rank 0 has not
    /// published within the rendezvous timeout.
    pub async fn rendezvous(
        &self,
        req: proto::RendezvousRequest,
    ) -> CoordResult<proto::RendezvousResponse> {
        if req.payload.len() > MAX_PAYLOAD_BYTES {
            return Err(CoordError::invalid(
                "payload",
                format!("is {} bytes; allowed: at most {MAX_PAYLOAD_BYTES}", req.payload.len()),
            ));
        }
        if req.rank == 0 && req.payload.is_empty() {
            return Err(CoordError::invalid("payload", "rank 0 must publish a payload"));
        }
        let run = parse_run_id(&req.run_id)?;
        let world_size = self.check_rank(run, &req)?;
        let slot = self.rendezvous.slot(run, req.generation);

        if req.rank == 0 {
            slot.send_replace(Some(req.payload.clone()));
            tracing::info!(run_id = %req.run_id, generation = req.generation, world_size, "rendezvous published");
            return Ok(proto::RendezvousResponse { payload: req.payload, world_size });
        }
        let mut receiver = slot.subscribe();
        drop(slot);
        let timeout = Duration::from_millis(self.config.rendezvous_timeout_ms);
        let waited = tokio::time::timeout(timeout, receiver.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(payload)) => {
                let payload = payload.clone().unwrap_or_default();
                Ok(proto::RendezvousResponse { payload, world_size })
            }
            Ok(Err(_)) => Err(CoordError::precondition(format!(
                "attempt {} of run {} ended during the rendezvous",
                req.generation, req.run_id
            ))),
            Err(_) => Err(CoordError::DeadlineExceeded(format!(
                "rank 0 of run {} attempt {} has not published yet; call again",
                req.run_id, req.generation
            ))),
        }
    }

    /// Checks that the caller's worker holds `rank` in the current attempt;
    /// returns the world size.
    fn check_rank(&self, run: u64, req: &proto::RendezvousRequest) -> CoordResult<u32> {
        self.with_state(|st| {
            let entry =
                st.runs.get(&run).ok_or_else(|| CoordError::not_found("run", &req.run_id))?;
            let current =
                entry.run.attempts.last().filter(|a| a.number == req.generation && a.ended_ms == 0);
            let Some(attempt) = current else {
                return Err(CoordError::precondition(format!(
                    "generation {} of run {} is not the current attempt",
                    req.generation, req.run_id
                )));
            };
            let world_size = entry.run.request.as_ref().map_or(1, |r| r.ranks);
            if req.rank >= world_size {
                return Err(CoordError::invalid(
                    "rank",
                    format!("is {}; allowed: 0 to {}", req.rank, world_size - 1),
                ));
            }
            let holds = attempt
                .placements
                .iter()
                .any(|p| p.worker_id == req.worker_id && p.ranks.contains(&req.rank));
            if !holds {
                return Err(CoordError::precondition(format!(
                    "worker {} does not hold rank {} of run {} attempt {}",
                    req.worker_id, req.rank, req.run_id, req.generation
                )));
            }
            Ok(world_size)
        })
    }
}
