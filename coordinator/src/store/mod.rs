//! The coordinator's persistent state behind one small interface: an
//! ordered key-value map with atomic batches and an explicit flush.
//!
//! Two backends implement [`Store`]: [`SledStore`] (the default, on disk)
//! and [`MemoryStore`] (tests and benchmarks). The typed layer above,
//! [`records`], decides keys and value formats; backends see only bytes.
//! The same conformance suite runs on both backends.

pub mod memory;
pub mod records;
pub mod sled_store;

use std::path::Path;
use std::sync::Arc;

pub use memory::MemoryStore;
pub use sled_store::SledStore;

use crate::config::StoreKind;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed to read, write or flush.
    #[error("store i/o failed: {0}")]
    Io(String),
    /// A value was written by another format version.
    #[error("value at {key} has format version {found}; this build reads {expected}")]
    Format {
        /// The key, printed lossily.
        key: String,
        /// Version byte found.
        found: u8,
        /// Version this build reads.
        expected: u8,
    },
    /// A value does not decode.
    #[error("value at {key} is corrupt: {message}")]
    Corrupt {
        /// The key, printed lossily.
        key: String,
        /// What the decoder said.
        message: String,
    },
}

/// One change of a [`Batch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Sets a key.
    Put(Vec<u8>, Vec<u8>),
    /// Removes a key; removing a missing key is not an error.
    Delete(Vec<u8>),
}

/// Changes applied together or not at all.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    ops: Vec<Op>,
}

impl Batch {
    /// Adds a put.
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.ops.push(Op::Put(key, value));
    }

    /// Adds a delete.
    pub fn delete(&mut self, key: Vec<u8>) {
        self.ops.push(Op::Delete(key));
    }

    /// Whether the batch holds no change.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Moves the changes of `other` to the end of this batch.
    pub fn append(&mut self, other: &mut Batch) {
        self.ops.append(&mut other.ops);
    }

    /// Returns the changes, in order.
    pub fn into_ops(self) -> Vec<Op> {
        self.ops
    }
}

/// Key-value pairs as a scan returns them.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// An ordered byte map with atomic batches.
///
/// Writes become durable only at [`Store::flush`]; the coordinator flushes
/// before it acknowledges a change.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Returns the value at `key`.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] when the backend fails.
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Returns up to `limit` pairs with `start <= key < end`, ascending.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] when the backend fails.
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<Pairs, StoreError>;

    /// Applies every change of `batch` atomically.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] when the backend fails; then no change is applied.
    fn apply(&self, batch: Batch) -> Result<(), StoreError>;

    /// Makes every change applied so far durable.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] when the backend fails.
    fn flush(&self) -> Result<(), StoreError>;
}

/// Returns the smallest key above every key that starts with `prefix`, for
/// prefix scans.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return end;
        }
    }
    vec![u8::MAX; prefix.len() + 1]
}

/// Returns every pair whose key starts with `prefix`.
///
/// # Errors
///
/// [`StoreError::Io`] when the backend fails.
pub fn scan_prefix(store: &dyn Store, prefix: &[u8]) -> Result<Pairs, StoreError> {
    store.scan(prefix, &prefix_end(prefix), usize::MAX)
}

/// Opens the configured backend; `dir` is used by sled only.
///
/// # Errors
///
/// [`StoreError::Io`] when sled cannot open `dir`.
pub fn open(kind: StoreKind, dir: &Path) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match kind {
        StoreKind::Sled => Arc::new(SledStore::open(dir)?),
        StoreKind::Memory => Arc::new(MemoryStore::default()),
    })
}

/// The behaviour every backend must show; run by each backend's tests.
#[cfg(test)]
pub(crate) fn conformance_suite(store: &dyn Store) {
    let mut batch = Batch::default();
    batch.put(b"a/1".to_vec(), b"one".to_vec());
    batch.put(b"a/2".to_vec(), b"two".to_vec());
    batch.put(b"a/3".to_vec(), b"three".to_vec());
    batch.put(b"b/1".to_vec(), b"other".to_vec());
    store.apply(batch).unwrap();
    assert_eq!(store.get(b"a/2").unwrap().as_deref(), Some(&b"two"[..]));
    assert_eq!(store.get(b"a/9").unwrap(), None);

    let all = scan_prefix(store, b"a/").unwrap();
    let keys: Vec<&[u8]> = all.iter().map(|(k, _)| k.as_slice()).collect();
    assert_eq!(keys, vec![&b"a/1"[..], b"a/2", b"a/3"]);
    let limited = store.scan(b"a/2", &prefix_end(b"a/"), 1).unwrap();
    assert_eq!(limited, vec![(b"a/2".to_vec(), b"two".to_vec())]);

    let mut batch = Batch::default();
    batch.delete(b"a/1".to_vec());
    batch.delete(b"a/missing".to_vec());
    batch.put(b"a/2".to_vec(), b"TWO".to_vec());
    store.apply(batch).unwrap();
    store.flush().unwrap();
    assert_eq!(store.get(b"a/1").unwrap(), None);
    assert_eq!(store.get(b"a/2").unwrap().as_deref(), Some(&b"TWO"[..]));
    assert_eq!(scan_prefix(store, b"a/").unwrap().len(), 2);
    assert_eq!(scan_prefix(store, b"\xff").unwrap().len(), 0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_bounds_the_prefix() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0xff, 0xff, 0xff]);
    }

    #[test]
    fn batch_counts_and_appends() {
        let mut a = Batch::default();
        a.put(b"k".to_vec(), b"v".to_vec());
        let mut b = Batch::default();
        b.delete(b"k".to_vec());
        a.append(&mut b);
        assert_eq!(a.len(), 2);
        assert!(b.is_empty());
    }
}
