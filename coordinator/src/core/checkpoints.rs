//! Checkpoint store: uploads arrive as a header and chunks, are hashed as
//! they stream in, and are committed as a record only when size and SHA-256
//! match; downloads read the chunks back in order.
//!
//! Chunks go to the store as they arrive, under a fresh upload id that no
//! record references yet; an upload that fails is deleted at once, and one
//! cut short by a crash is removed at the next start-up.
//!
//! Limitation: checkpoints live in the sled store, whose whole data set is
//! cached and compacted by one process; very large models (tens of GiB per
//! checkpoint) would be better served by a directory store on a shared
//! filesystem, which this coordinator does not offer yet.

use jepa_common::proto;
use sha2::{Digest, Sha256};

use super::{is_terminal, parse_run_id, Coordinator};
use crate::error::{CoordError, CoordResult};
use crate::store::records::{self, CheckpointRecord};
use crate::store::Batch;

/// An upload in progress.
#[derive(Debug)]
pub struct Upload {
    header: proto::CheckpointHeader,
    run: u64,
    upload_id: u64,
    hasher: Sha256,
    received: u64,
    chunks: u32,
}

/// Returns the lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Coordinator {
    /// Starts an upload after checking its header.
    ///
    /// # Errors
    ///
    /// INVALID_ARGUMENT for a bad size or checksum text, NOT_FOUND for an
    /// unknown run, FAILED_PRECONDITION when the attempt is not the run's
    /// current one.
    pub fn begin_upload(&self, header: proto::CheckpointHeader) -> CoordResult<Upload> {
        let sha_ok = header.sha256.len() == 64
            && header.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !sha_ok {
            return Err(CoordError::invalid("header.sha256", "must be 64 lowercase hex digits"));
        }
        let max = self.config.max_checkpoint_bytes;
        if header.size_bytes > max {
            return Err(CoordError::invalid(
                "header.size_bytes",
                format!("is {}; allowed: at most {max}", header.size_bytes),
            ));
        }
        let run = parse_run_id(&header.run_id)?;

        let mut state = super::lock(&self.state);
        let entry =
            state.runs.get(&run).ok_or_else(|| CoordError::not_found("run", &header.run_id))?;
        check_current(&entry.run, header.attempt)?;
        state.next.upload += 1;
        let upload_id = state.next.upload;
        drop(state);
        tracing::debug!(run_id = %header.run_id, step = header.step, upload_id, "checkpoint upload started");
        Ok(Upload { header, run, upload_id, hasher: Sha256::new(), received: 0, chunks: 0 })
    }

    /// Writes the next chunk of an upload.
    ///
    /// # Errors
    ///
    /// INVALID_ARGUMENT for a chunk over the limit or bytes beyond the
    /// announced size; a store error.
    pub fn upload_chunk(&self, upload: &mut Upload, data: &[u8]) -> CoordResult<()> {
        let limit = self.config.checkpoint_chunk_bytes;
        if data.len() > limit {
            return Err(CoordError::invalid(
                "chunk",
                format!("is {} bytes; allowed: at most {limit}", data.len()),
            ));
        }
        let received = upload.received + data.len() as u64;
        if received > upload.header.size_bytes {
            return Err(CoordError::invalid(
                "chunk",
                format!("bytes exceed header.size_bytes {}", upload.header.size_bytes),
            ));
        }
        upload.hasher.update(data);
        let mut batch = Batch::default();
        batch.put(records::chunk_key(upload.upload_id, upload.chunks), data.to_vec());
        self.store().apply(batch)?;
        upload.received = received;
        upload.chunks += 1;
        Ok(())
    }

    /// Deletes what an upload wrote; used when it fails.
    pub fn abort_upload(&self, upload: &Upload) {
        let mut batch = Batch::default();
        for index in 0..upload.chunks {
            batch.delete(records::chunk_key(upload.upload_id, index));
        }
        if let Err(err) = self.store().apply(batch) {
            tracing::warn!(upload_id = upload.upload_id, error = %err, "failed to remove chunks of a failed upload");
        }
    }

    /// Verifies a finished upload and commits its record; an earlier
    /// checkpoint of the same step is replaced.
    ///
    /// # Errors
    ///
    /// INVALID_ARGUMENT for a short upload, DATA_LOSS for a checksum
    /// mismatch, FAILED_PRECONDITION when the attempt ended meanwhile; in
    /// every case the chunks are deleted.
    pub async fn commit_upload(&self, upload: Upload) -> CoordResult<proto::CheckpointInfo> {
        let result = self.try_commit(&upload).await;
        if result.is_err() {
            self.abort_upload(&upload);
        }
        result
    }

    async fn try_commit(&self, upload: &Upload) -> CoordResult<proto::CheckpointInfo> {
        let header = &upload.header;
        if upload.received != header.size_bytes {
            return Err(CoordError::invalid(
                "chunk",
                format!("upload ended after {} of {} bytes", upload.received, header.size_bytes),
            ));
        }
        let digest = hex(&upload.hasher.clone().finalize());
        if digest != header.sha256 {
            return Err(CoordError::DataLoss(format!(
                "checkpoint sha256 is {digest} but the header says {}",
                header.sha256
            )));
        }

        self.transact(|tx| {
            let entry = tx.st.runs.get_mut(&upload.run).ok_or_else(|| CoordError::not_found("run", &header.run_id))?;
            check_current(&entry.run, header.attempt)?;
            let info = proto::CheckpointInfo {
                run_id: header.run_id.clone(),
                step: header.step,
                attempt: header.attempt,
                size_bytes: header.size_bytes,
                sha256: digest.clone(),
                committed_ms: tx.now,
                spec_hash: header.spec_hash.clone(),
            };
            let newest = entry.run.last_checkpoint_step.map_or(header.step, |s| s.max(header.step));
            entry.run.last_checkpoint_step = Some(newest);
            let record = CheckpointRecord { info: Some(info.clone()), upload_id: upload.upload_id, chunks: upload.chunks };
            tx.fx.batch.put(records::checkpoint_key(upload.run, header.step), records::encode(&record));
            if let Some(old) = tx.st.checkpoints.insert((upload.run, header.step), record) {
                for index in 0..old.chunks {
                    tx.fx.batch.delete(records::chunk_key(old.upload_id, index));
                }
            }
            tx.save_run(upload.run);
            tracing::info!(run_id = %header.run_id, step = header.step, bytes = header.size_bytes, "checkpoint committed");
            Ok(info)
        })
        .await
    }

    /// Lists a run's committed checkpoints, ascending by step.
    ///
    /// # Errors
    ///
    /// NOT_FOUND for an unknown run.
    pub fn list_checkpoints(&self, run_id: &str) -> CoordResult<Vec<proto::CheckpointInfo>> {
        let run = parse_run_id(run_id)?;
        self.with_state(|st| {
            if !st.runs.contains_key(&run) {
                return Err(CoordError::not_found("run", run_id));
            }
            Ok(st
                .checkpoints
                .range((run, 0)..=(run, u64::MAX))
                .filter_map(|(_, r)| r.info.clone())
                .collect())
        })
    }

    /// Returns the record of one checkpoint (the newest when `step` is
    /// absent).
    ///
    /// # Errors
    ///
    /// NOT_FOUND for an unknown run or step.
    pub fn checkpoint_record(
        &self,
        run_id: &str,
        step: Option<u64>,
    ) -> CoordResult<CheckpointRecord> {
        let run = parse_run_id(run_id)?;
        self.with_state(|st| {
            if !st.runs.contains_key(&run) {
                return Err(CoordError::not_found("run", run_id));
            }
            let found = match step {
                Some(step) => st.checkpoints.get(&(run, step)),
                None => {
                    st.checkpoints.range((run, 0)..=(run, u64::MAX)).next_back().map(|(_, r)| r)
                }
            };
            let what = step
                .map_or_else(|| format!("{run_id} (any step)"), |s| format!("{run_id} step {s}"));
            found.cloned().ok_or_else(|| CoordError::not_found("checkpoint", what))
        })
    }

    /// Reads one chunk of a committed checkpoint.
    ///
    /// # Errors
    ///
    /// DATA_LOSS when the chunk is gone (the checkpoint was replaced while
    /// being read); a store error.
    pub fn read_chunk(&self, record: &CheckpointRecord, index: u32) -> CoordResult<Vec<u8>> {
        self.store().get(&records::chunk_key(record.upload_id, index))?.ok_or_else(|| {
            CoordError::DataLoss("checkpoint was replaced while it was being downloaded".into())
        })
    }
}

/// Checks that `attempt` is the run's current, unfinished attempt.
fn check_current(run: &proto::Run, attempt: u32) -> CoordResult<()> {
    let current = run.attempts.last().filter(|a| a.number == attempt && a.ended_ms == 0);
    if current.is_none() || is_terminal(run.state) {
        return Err(CoordError::precondition(format!(
            "attempt {attempt} of run {} is not the current attempt",
            run.id
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_hex_matches_a_known_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
