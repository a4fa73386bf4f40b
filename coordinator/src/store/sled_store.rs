//! The default [`Store`]: one sled tree in the coordinator's data folder.
//!
//! All records share the default tree so that one [`Batch`] spanning runs,
//! workers and events is applied atomically.
//!
//! Limitation: sled's flush writes its log with `sync_file_range`, which
//! makes a change survive a crash or `kill -9` of the coordinator but does
//! not force the disk's own cache, so a power loss of the host can still
//! lose the last acknowledged changes.

use std::path::Path;

use super::{Batch, Op, Pairs, Store, StoreError};

/// A sled database opened in a folder.
#[derive(Debug)]
pub struct SledStore {
    db: sled::Db,
}

fn io(err: sled::Error) -> StoreError {
    StoreError::Io(err.to_string())
}

impl SledStore {
    /// Opens (or creates) the database in `dir`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] when the folder cannot be created or another
    /// process holds the database.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|err| StoreError::Io(format!("cannot create {}: {err}", dir.display())))?;
        let db = sled::Config::new().path(dir).open().map_err(io)?;
        Ok(SledStore { db })
    }
}

impl Store for SledStore {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key).map_err(io)?.map(|v| v.to_vec()))
    }

    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, StoreError> {
        if start >= end {
            return Ok(Vec::new());
        }
        self.db
            .range(start..end)
            .take(limit)
            .map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())).map_err(io))
            .collect()
    }

    fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let mut sled_batch = sled::Batch::default();
        for op in batch.into_ops() {
            match op {
                Op::Put(k, v) => sled_batch.insert(k, v),
                Op::Delete(k) => sled_batch.remove(k),
            }
        }
        self.db.apply_batch(sled_batch).map_err(io)
    }

    fn flush(&self) -> Result<(), StoreError> {
        self.db.flush().map(|_| ()).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sled_store_passes_the_conformance_suite() {
        let dir = tempfile::tempdir().unwrap();
        super::super::conformance_suite(&SledStore::open(dir.path()).unwrap());
    }

    #[test]
    fn flushed_writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(dir.path()).unwrap();
            let mut batch = Batch::default();
            batch.put(b"k".to_vec(), b"v".to_vec());
            store.apply(batch).unwrap();
            store.flush().unwrap();
        }
        let store = SledStore::open(dir.path()).unwrap();
        assert_eq!(store.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
    }
}
