//! Checkpoint transfer between a daemon and the coordinator: uploads of the
//! weight files the trainer writes, and the download a resumed attempt
//! starts from. Both sides check size and SHA-256; the coordinator commits
//! an upload only when they match.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use jepa_common::proto::{
    self, download_checkpoint_response, upload_checkpoint_request::Part,
    user_service_client::UserServiceClient, worker_service_client::WorkerServiceClient,
};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tonic::transport::Channel;

use crate::train::checkpoint::{self, CheckpointRecord, CHECKPOINT_FORMAT};

/// Bytes per upload message; below the coordinator's default chunk limit.
const CHUNK_BYTES: usize = 512 * 1024;

/// One checkpoint to upload: the weight file, opened when the trainer
/// announced it so that pruning cannot remove it first.
#[derive(Debug)]
pub struct Upload {
    /// Optimiser step it holds.
    pub step: u64,
    /// The open weight file.
    pub file: std::fs::File,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// Its SHA-256, from the trainer's record.
    pub sha256: String,
    /// Hash of the spec that wrote it.
    pub spec_hash: String,
}

impl Upload {
    /// Opens the weight file of the record at `record_path`.
    ///
    /// # Errors
    ///
    /// Fails when the record or the weight file cannot be read.
    pub fn open(record_path: &Path) -> anyhow::Result<Upload> {
        let text = std::fs::read(record_path)
            .with_context(|| format!("cannot read checkpoint record {}", record_path.display()))?;
        let record: CheckpointRecord = serde_json::from_slice(&text)
            .with_context(|| format!("checkpoint record {} is malformed", record_path.display()))?;
        let weights = record_path.parent().unwrap_or(Path::new(".")).join(&record.weights);
        let file = std::fs::File::open(&weights)
            .with_context(|| format!("cannot open {}", weights.display()))?;
        Ok(Upload {
            step: record.step,
            file,
            size_bytes: record.bytes,
            sha256: record.sha256,
            spec_hash: record.spec_hash,
        })
    }
}

/// Streams one checkpoint to the coordinator for `(run_id, attempt)`.
///
/// # Errors
///
/// Returns the coordinator's status when it refuses or the stream breaks.
pub async fn upload(
    client: &mut WorkerServiceClient<Channel>,
    worker_id: &str,
    run_id: &str,
    attempt: u32,
    upload: &Upload,
) -> Result<proto::CheckpointInfo, tonic::Status> {
    let header = proto::CheckpointHeader {
        worker_id: worker_id.to_string(),
        run_id: run_id.to_string(),
        attempt,
        step: upload.step,
        size_bytes: upload.size_bytes,
        sha256: upload.sha256.clone(),
        spec_hash: upload.spec_hash.clone(),
    };
    let mut file = upload.file.try_clone().map_err(|e| tonic::Status::internal(e.to_string()))?;
    file.seek(SeekFrom::Start(0)).map_err(|e| tonic::Status::internal(e.to_string()))?;
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let first = proto::UploadCheckpointRequest { part: Some(Part::Header(header)) };
    // The reader runs on a blocking thread and feeds the request stream; it
    // stops early when the call ends and drops the receiver.
    let reader = tokio::task::spawn_blocking(move || {
        if sender.blocking_send(first).is_err() {
            return;
        }
        let mut buf = vec![0u8; CHUNK_BYTES];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let message =
                proto::UploadCheckpointRequest { part: Some(Part::Chunk(buf[..n].to_vec())) };
            if sender.blocking_send(message).is_err() {
                return;
            }
        }
    });
    let reply =
        client.upload_checkpoint(tokio_stream::wrappers::ReceiverStream::new(receiver)).await;
    let _ = reader.await;
    reply?.into_inner().checkpoint.ok_or_else(|| tonic::Status::internal("no checkpoint in reply"))
}

/// Downloads the checkpoint `info` names into `dir` and writes a trainer
/// record beside it, so `jepa-worker train --resume RECORD` can load it.
/// Returns the record's path.
///
/// # Errors
///
/// Fails when the stream breaks or the bytes do not match the size and
/// SHA-256 the coordinator committed.
pub async fn download(
    client: &mut UserServiceClient<Channel>,
    info: &proto::CheckpointInfo,
    seed: u64,
    world: usize,
    dir: &Path,
) -> anyhow::Result<PathBuf> {
    tokio::fs::create_dir_all(dir)
        .await
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let (weights, record_path) = checkpoint::paths(dir, info.step);
    let partial = weights.with_extension("safetensors.part");
    let request =
        proto::DownloadCheckpointRequest { run_id: info.run_id.clone(), step: Some(info.step) };
    let mut stream = client
        .download_checkpoint(request)
        .await
        .with_context(|| format!("download of checkpoint step {} failed", info.step))?
        .into_inner();
    let mut file = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    while let Some(message) = stream.message().await.context("checkpoint download broke off")? {
        match message.part {
            Some(download_checkpoint_response::Part::Chunk(bytes)) => {
                hasher.update(&bytes);
                received += bytes.len() as u64;
                file.write_all(&bytes).await.context("cannot write the checkpoint")?;
            }
            Some(download_checkpoint_response::Part::Info(_)) | None => {}
        }
    }
    file.sync_all().await.context("cannot sync the checkpoint")?;
    drop(file);
    let sha256 = format!("{:x}", hasher.finalize());
    if received != info.size_bytes || sha256 != info.sha256 {
        let _ = tokio::fs::remove_file(&partial).await;
        bail!(
            "checkpoint step {} arrived damaged: {received} bytes with sha256 {sha256}, \
             expected {} bytes with sha256 {}",
            info.step,
            info.size_bytes,
            info.sha256
        );
    }
    tokio::fs::rename(&partial, &weights).await.context("cannot place the checkpoint")?;
    let record = CheckpointRecord {
        format: CHECKPOINT_FORMAT,
        step: info.step,
        spec_hash: info.spec_hash.clone(),
        seed,
        world,
        weights: weights.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        sha256,
        bytes: received,
    };
    let json = serde_json::to_vec_pretty(&record)?;
    checkpoint::write_atomic(&record_path, &json)?;
    Ok(record_path)
}
