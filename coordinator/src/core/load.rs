//! Rebuilds the in-memory [`State`] from the store at start-up, and removes
//! what an interrupted upload left behind.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use jepa_common::proto;

use super::{is_terminal, RunEntry, State};
use crate::config::CoordinatorConfig;
use crate::store::records::{self, CheckpointRecord};
use crate::store::{scan_prefix, Batch, Store, StoreError};

/// Store layout this build writes; a store of another layout is refused.
const LAYOUT_VERSION: u64 = 1;

/// Reads every record, resets worker leases to start now, and deletes
/// chunks of uploads that never committed.
pub(crate) fn load(
    store: &dyn Store,
    now: i64,
    config: &CoordinatorConfig,
) -> Result<State, StoreError> {
    check_layout(store)?;
    let mut state = State::default();
    load_runs(store, &mut state)?;
    load_workers(store, &mut state, now, config)?;
    for (key, value) in scan_prefix(store, records::SWEEP_PREFIX)? {
        let sweep: proto::Sweep = records::decode(&key, &value)?;
        let seq = records::u64_at(&key, records::SWEEP_PREFIX.len()).unwrap_or(0);
        state.next.sweep = state.next.sweep.max(seq);
        state.sweeps.insert(seq, sweep);
    }
    for (key, value) in scan_prefix(store, records::REQUEST_PREFIX)? {
        let request = String::from_utf8_lossy(&key[records::REQUEST_PREFIX.len()..]).into_owned();
        state.requests.insert(request, records::decode_u64(&key, &value)?);
    }
    load_checkpoints(store, &mut state)?;
    Ok(state)
}

fn check_layout(store: &dyn Store) -> Result<(), StoreError> {
    match store.get(records::LAYOUT_KEY)? {
        Some(value) => {
            let layout = records::decode_u64(records::LAYOUT_KEY, &value)?;
            if layout != LAYOUT_VERSION {
                return Err(StoreError::Corrupt {
                    key: "meta/layout".into(),
                    message: format!("store layout {layout}; this build reads {LAYOUT_VERSION}"),
                });
            }
            Ok(())
        }
        None => {
            let mut batch = Batch::default();
            batch.put(records::LAYOUT_KEY.to_vec(), records::encode_u64(LAYOUT_VERSION));
            store.apply(batch)
        }
    }
}

fn load_runs(store: &dyn Store, state: &mut State) -> Result<(), StoreError> {
    for (key, value) in scan_prefix(store, records::RUN_PREFIX)? {
        let mut run: proto::Run = records::decode(&key, &value)?;
        let seq = records::u64_at(&key, records::RUN_PREFIX.len()).unwrap_or(0);
        let next_event = store
            .scan(
                &records::event_prefix(seq),
                &crate::store::prefix_end(&records::event_prefix(seq)),
                usize::MAX,
            )?
            .last()
            .and_then(|(k, _)| records::u64_at(k, records::EVENT_PREFIX.len() + 8))
            .map_or(1, |last| last + 1);
        // Pending reasons are recomputed by the first scheduling pass.
        run.pending_reason.clear();
        if run.state == proto::RunState::Pending as i32 {
            state.pending.insert((Reverse(run.priority), seq));
        }
        state.next.run = state.next.run.max(seq);
        state.runs.insert(seq, RunEntry { run, next_event, series: BTreeMap::new() });
    }
    for (key, value) in scan_prefix(store, records::SERIES_PREFIX)? {
        let offset = records::SERIES_PREFIX.len();
        let Some(seq) = records::u64_at(&key, offset) else { continue };
        let name = String::from_utf8_lossy(&key[offset + 8..]).into_owned();
        let top = records::decode_u64(&key, &value)?;
        if let Some(entry) = state.runs.get_mut(&seq) {
            entry.series.insert(name, top);
        }
    }
    Ok(())
}

fn load_workers(
    store: &dyn Store,
    state: &mut State,
    now: i64,
    config: &CoordinatorConfig,
) -> Result<(), StoreError> {
    let ttl = i64::try_from(config.lease_timeout_ms).unwrap_or(i64::MAX);
    for (key, value) in scan_prefix(store, records::WORKER_PREFIX)? {
        let mut worker: proto::Worker = records::decode(&key, &value)?;
        let seq = records::u64_at(&key, records::WORKER_PREFIX.len()).unwrap_or(0);
        if worker.state == proto::WorkerState::Live as i32 {
            // The coordinator was away; give every daemon a full lease to
            // find it again before its runs are taken away.
            worker.lease_expires_ms = now.saturating_add(ttl);
        }
        // Allocations of attempts that ended while no confirmation could
        // arrive stay draining; those of finished runs are kept too, until
        // the worker confirms, so a GPU is never handed out twice.
        worker.allocations.retain(|a| {
            records::parse_id("run", &a.run_id)
                .and_then(|run| state.runs.get(&run))
                .is_some_and(|e| !is_terminal(e.run.state) || a.draining)
        });
        state.next.worker = state.next.worker.max(seq);
        state.worker_names.insert(worker.name.clone(), seq);
        state.workers.insert(seq, worker);
    }
    Ok(())
}

fn load_checkpoints(store: &dyn Store, state: &mut State) -> Result<(), StoreError> {
    let mut referenced = BTreeSet::new();
    for (key, value) in scan_prefix(store, records::CHECKPOINT_PREFIX)? {
        let record: CheckpointRecord = records::decode(&key, &value)?;
        let offset = records::CHECKPOINT_PREFIX.len();
        let (Some(run), Some(step)) =
            (records::u64_at(&key, offset), records::u64_at(&key, offset + 8))
        else {
            continue;
        };
        referenced.insert(record.upload_id);
        state.next.upload = state.next.upload.max(record.upload_id);
        state.checkpoints.insert((run, step), record);
    }

    let mut orphans = Batch::default();
    let mut orphan_uploads = BTreeSet::new();
    for (key, _) in scan_prefix(store, records::CHUNK_PREFIX)? {
        let upload = records::u64_at(&key, records::CHUNK_PREFIX.len()).unwrap_or(0);
        state.next.upload = state.next.upload.max(upload);
        if !referenced.contains(&upload) {
            orphan_uploads.insert(upload);
            orphans.delete(key);
        }
    }
    if !orphans.is_empty() {
        tracing::warn!(
            uploads = orphan_uploads.len(),
            chunks = orphans.len(),
            "removing chunks of uploads that never committed"
        );
        store.apply(orphans)?;
    }
    Ok(())
}
