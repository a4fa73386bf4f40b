//! Checkpoints: every weight and the optimiser state in one safetensors
//! file, and a JSON record beside it that holds the metadata and the
//! file's SHA-256. Both are written atomically (temporary file, fsync,
//! rename); the record is written last, so a checkpoint exists only once it
//! is complete, and a damaged weight file is refused by its checksum.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;

/// Format version of the checkpoint record.
pub const CHECKPOINT_FORMAT: u32 = 1;

/// Errors of writing or reading a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file system failed.
    #[error("checkpoint i/o on {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The error text.
        message: String,
    },
    /// The weight file does not match the checksum of its record.
    #[error("checkpoint {path} is corrupt: sha256 {actual}, record says {expected}")]
    Corrupt {
        /// The weight file.
        path: String,
        /// Checksum in the record.
        expected: String,
        /// Checksum of the file.
        actual: String,
    },
    /// The record is unreadable or of another format or run.
    #[error("checkpoint record {path}: {message}")]
    Record {
        /// The record file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// libtorch could not write or read the tensors.
    #[error("checkpoint tensors: {0}")]
    Tensor(#[from] tch::TchError),
}

fn io_err(path: &Path, err: impl std::fmt::Display) -> CheckpointError {
    CheckpointError::Io { path: path.display().to_string(), message: err.to_string() }
}

/// The metadata of one checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// [`CHECKPOINT_FORMAT`].
    pub format: u32,
    /// Optimiser steps completed.
    pub step: u64,
    /// Hash of the run spec it was trained with.
    pub spec_hash: String,
    /// Seed of the run; with `step` it determines every later random draw.
    pub seed: u64,
    /// Ranks the run trained on.
    pub world: usize,
    /// File name of the weights, beside the record.
    pub weights: String,
    /// SHA-256 of the weight file, lowercase hex.
    pub sha256: String,
    /// Size of the weight file in bytes.
    pub bytes: u64,
}

/// Paths of a checkpoint: `step-00000100.safetensors` and `.json`.
pub fn paths(dir: &Path, step: u64) -> (PathBuf, PathBuf) {
    let stem = format!("step-{step:08}");
    (dir.join(format!("{stem}.safetensors")), dir.join(format!("{stem}.json")))
}

/// Writes tensors and record atomically into `dir`; returns the record.
///
/// # Errors
///
/// Fails when a file cannot be written, synced or renamed.
pub fn write(
    dir: &Path,
    tensors: &[(String, Tensor)],
    step: u64,
    spec_hash: &str,
    seed: u64,
    world: usize,
) -> Result<(CheckpointRecord, PathBuf), CheckpointError> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let (weights, record_path) = paths(dir, step);
    let tmp = weights.with_extension("safetensors.tmp");
    let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&named, &tmp)?;
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| io_err(&tmp, e))?;
    let (sha256, bytes) = file_sha256(&tmp)?;
    std::fs::rename(&tmp, &weights).map_err(|e| io_err(&weights, e))?;

    let record = CheckpointRecord {
        format: CHECKPOINT_FORMAT,
        step,
        spec_hash: spec_hash.to_string(),
        seed,
        world,
        weights: weights.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        sha256,
        bytes,
    };
    let json = serde_json::to_vec_pretty(&record).map_err(|e| io_err(&record_path, e))?;
    write_atomic(&record_path, &json)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))?;
    Ok((record, record_path))
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
///
/// # Errors
///
/// Fails when the file cannot be written, synced or renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// SHA-256 (hex) and size of a file.
///
/// # Errors
///
/// Fails when the file cannot be read.
pub fn file_sha256(path: &Path) -> Result<(String, u64), CheckpointError> {
    let mut file = File::open(path).map_err(|e| io_err(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| io_err(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((format!("{:x}", hasher.finalize()), total))
}

/// Reads a record and its weights, refusing a file whose checksum differs.
///
/// # Errors
///
/// [`CheckpointError::Corrupt`] on a checksum mismatch; other variants
/// when a file is missing or malformed.
pub fn read(
    record_path: &Path,
) -> Result<(CheckpointRecord, HashMap<String, Tensor>), CheckpointError> {
    let text = std::fs::read(record_path).map_err(|e| io_err(record_path, e))?;
    let record: CheckpointRecord = serde_json::from_slice(&text).map_err(|e| {
        CheckpointError::Record { path: record_path.display().to_string(), message: e.to_string() }
    })?;
    if record.format != CHECKPOINT_FORMAT {
        return Err(CheckpointError::Record {
            path: record_path.display().to_string(),
            message: format!("format {} is not {CHECKPOINT_FORMAT}", record.format),
        });
    }
    let dir = record_path.parent().unwrap_or(Path::new("."));
    let weights = dir.join(&record.weights);
    let (actual, _) = file_sha256(&weights)?;
    if actual != record.sha256 {
        return Err(CheckpointError::Corrupt {
            path: weights.display().to_string(),
            expected: record.sha256.clone(),
            actual,
        });
    }
    let tensors = Tensor::read_safetensors(&weights)?.into_iter().collect();
    Ok((record, tensors))
}

/// Returns the record of the newest checkpoint in `dir`, if any.
pub fn latest(dir: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut records: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name.starts_with("step-") && name.ends_with(".json")
        })
        .collect();
    records.sort();
    records.pop()
}

/// Deletes all but the newest `keep` checkpoints in `dir`.
pub fn prune(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut records: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    records.sort();
    let excess = records.len().saturating_sub(keep);
    for record in records.into_iter().take(excess) {
        let _ = std::fs::remove_file(record.with_extension("safetensors"));
        let _ = std::fs::remove_file(&record);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors() -> Vec<(String, Tensor)> {
        vec![
            ("encoder.w".to_string(), Tensor::from_slice(&[1.0f32, 2.0, 3.0])),
            ("optim.exp_avg.encoder.w".to_string(), Tensor::from_slice(&[0.5f32, 0.25, 0.0])),
        ]
    }

    #[test]
    fn written_checkpoint_reads_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let (record, path) = write(dir.path(), &tensors(), 7, "abc", 3, 1).unwrap();
        let (back, loaded) = read(&path).unwrap();
        assert_eq!(back, record);
        assert_eq!(back.step, 7);
        let w: Vec<f32> = Vec::try_from(&loaded["encoder.w"]).unwrap();
        assert_eq!(w, vec![1.0, 2.0, 3.0]);
        assert_eq!(latest(dir.path()), Some(path));
    }

    #[test]
    fn damaged_weights_are_refused_by_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let (record, path) = write(dir.path(), &tensors(), 1, "abc", 0, 1).unwrap();
        let weights = dir.path().join(&record.weights);
        let mut bytes = std::fs::read(&weights).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        std::fs::write(&weights, bytes).unwrap();
        let err = read(&path).unwrap_err();
        assert!(matches!(err, CheckpointError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn prune_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for step in [1, 2, 3] {
            write(dir.path(), &tensors(), step, "h", 0, 1).unwrap();
        }
        prune(dir.path(), 2);
        assert!(!paths(dir.path(), 1).1.exists());
        assert!(paths(dir.path(), 2).0.exists() && paths(dir.path(), 3).1.exists());
    }
}
