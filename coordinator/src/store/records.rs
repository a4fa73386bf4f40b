//! The typed layer over [`super::Store`]: key layout, identifiers and value
//! formats.
//!
//! Every value starts with a format-version byte ([`FORMAT_VERSION`]); a
//! value of another version is refused rather than misread. Records are
//! protobuf messages (forward compatible by construction); metric points
//! are fixed-width binary in blocks of consecutive steps, because they are
//! the bulk of the data.
//!
//! Key layout (big-endian numbers keep keys in numeric order):
//! `run/<seq>`, `evt/<run>/<seq>`, `wrk/<seq>`, `swp/<seq>`,
//! `met/<run><series>\0<step / 1024>`, `ser/<run><series>`, `ckp/<run>/<step>`,
//! `chk/<upload>/<index>`, `req/<request id>`, `meta/...`.

use jepa_common::proto;
use prost::Message;

use super::StoreError;

/// Version byte at the start of every value this build writes.
pub const FORMAT_VERSION: u8 = 1;

/// Key of the store's layout marker.
pub const LAYOUT_KEY: &[u8] = b"meta/layout";
/// Prefix of run records.
pub const RUN_PREFIX: &[u8] = b"run/";
/// Prefix of worker records.
pub const WORKER_PREFIX: &[u8] = b"wrk/";
/// Prefix of sweep records.
pub const SWEEP_PREFIX: &[u8] = b"swp/";
/// Prefix of run history events.
pub const EVENT_PREFIX: &[u8] = b"evt/";
/// Prefix of metric points.
pub const METRIC_PREFIX: &[u8] = b"met/";
/// Prefix of the index of series names per run.
pub const SERIES_PREFIX: &[u8] = b"ser/";
/// Prefix of committed checkpoint records.
pub const CHECKPOINT_PREFIX: &[u8] = b"ckp/";
/// Prefix of checkpoint chunks.
pub const CHUNK_PREFIX: &[u8] = b"chk/";
/// Prefix of the submit idempotency index.
pub const REQUEST_PREFIX: &[u8] = b"req/";

/// A committed checkpoint and where its bytes are.
#[derive(Clone, PartialEq, Message)]
pub struct CheckpointRecord {
    /// What users see.
    #[prost(message, optional, tag = "1")]
    pub info: Option<proto::CheckpointInfo>,
    /// Upload whose chunks hold the bytes.
    #[prost(uint64, tag = "2")]
    pub upload_id: u64,
    /// Number of chunks.
    #[prost(uint32, tag = "3")]
    pub chunks: u32,
}

/// Encodes a record with the version byte.
pub fn encode<M: Message>(message: &M) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + message.encoded_len());
    out.push(FORMAT_VERSION);
    message.encode(&mut out).expect("a Vec grows to fit any message");
    out
}

/// Decodes a record written by [`encode`].
///
/// # Errors
///
/// [`StoreError::Format`] for another version, [`StoreError::Corrupt`] for
/// bytes that do not decode.
pub fn decode<M: Message + Default>(key: &[u8], value: &[u8]) -> Result<M, StoreError> {
    let body = versioned(key, value)?;
    M::decode(body).map_err(|err| corrupt(key, err.to_string()))
}

fn versioned<'a>(key: &[u8], value: &'a [u8]) -> Result<&'a [u8], StoreError> {
    match value.split_first() {
        Some((&FORMAT_VERSION, body)) => Ok(body),
        Some((&found, _)) => Err(StoreError::Format {
            key: String::from_utf8_lossy(key).into_owned(),
            found,
            expected: FORMAT_VERSION,
        }),
        None => Err(corrupt(key, "empty value".into())),
    }
}

fn corrupt(key: &[u8], message: String) -> StoreError {
    StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), message }
}

/// Encodes a counter or index value.
pub fn encode_u64(value: u64) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    out.extend_from_slice(&value.to_be_bytes());
    out
}

/// Decodes a value written by [`encode_u64`].
///
/// # Errors
///
/// As [`decode`].
pub fn decode_u64(key: &[u8], value: &[u8]) -> Result<u64, StoreError> {
    let body = versioned(key, value)?;
    let bytes: [u8; 8] = body.try_into().map_err(|_| corrupt(key, "not 8 bytes".into()))?;
    Ok(u64::from_be_bytes(bytes))
}

/// Steps covered by one metric block: the points of a series are stored
/// in blocks of this many consecutive steps, one store value per block, so
/// a report of a thousand points is a handful of writes, not a thousand.
pub const METRIC_BLOCK_STEPS: u64 = 1024;

/// Bytes of one point in a block: step, value, wall time.
const POINT_BYTES: usize = 24;

/// One stored point: (step, value, wall time in Unix ms).
pub type StoredPoint = (u64, f64, i64);

/// Encodes a metric block; `points` must be ascending by step, one per step.
pub fn encode_block(points: &[StoredPoint]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + points.len() * POINT_BYTES);
    out.push(FORMAT_VERSION);
    for (step, value, wall) in points {
        out.extend_from_slice(&step.to_le_bytes());
        out.extend_from_slice(&value.to_le_bytes());
        out.extend_from_slice(&wall.to_le_bytes());
    }
    out
}

/// Decodes a value written by [`encode_block`].
///
/// # Errors
///
/// As [`decode`].
pub fn decode_block(key: &[u8], value: &[u8]) -> Result<Vec<StoredPoint>, StoreError> {
    let body = versioned(key, value)?;
    if body.len() % POINT_BYTES != 0 {
        return Err(corrupt(key, format!("metric block of {} bytes", body.len())));
    }
    let word = |b: &[u8]| -> [u8; 8] { b.try_into().unwrap_or([0; 8]) };
    Ok(body
        .chunks_exact(POINT_BYTES)
        .map(|p| {
            let step = u64::from_le_bytes(word(&p[..8]));
            let value = f64::from_le_bytes(word(&p[8..16]));
            let wall = i64::from_le_bytes(word(&p[16..]));
            (step, value, wall)
        })
        .collect())
}

fn key(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut out = prefix.to_vec();
    for part in parts {
        out.extend_from_slice(part);
    }
    out
}

/// Key of a run record.
pub fn run_key(run: u64) -> Vec<u8> {
    key(RUN_PREFIX, &[&run.to_be_bytes()])
}

/// Key of a worker record.
pub fn worker_key(worker: u64) -> Vec<u8> {
    key(WORKER_PREFIX, &[&worker.to_be_bytes()])
}

/// Key of a sweep record.
pub fn sweep_key(sweep: u64) -> Vec<u8> {
    key(SWEEP_PREFIX, &[&sweep.to_be_bytes()])
}

/// Prefix of a run's history events.
pub fn event_prefix(run: u64) -> Vec<u8> {
    key(EVENT_PREFIX, &[&run.to_be_bytes()])
}

/// Key of one history event.
pub fn event_key(run: u64, seq: u64) -> Vec<u8> {
    key(EVENT_PREFIX, &[&run.to_be_bytes(), &seq.to_be_bytes()])
}

/// Prefix of every block of one series of one run.
pub fn metric_series_prefix(run: u64, series: &str) -> Vec<u8> {
    key(METRIC_PREFIX, &[&run.to_be_bytes(), series.as_bytes(), b"\0"])
}

/// Key of the block holding `step` of a series.
pub fn metric_block_key(run: u64, series: &str, step: u64) -> Vec<u8> {
    let block = step / METRIC_BLOCK_STEPS;
    key(METRIC_PREFIX, &[&run.to_be_bytes(), series.as_bytes(), b"\0", &block.to_be_bytes()])
}

/// Key of a series-name index entry.
pub fn series_key(run: u64, series: &str) -> Vec<u8> {
    key(SERIES_PREFIX, &[&run.to_be_bytes(), series.as_bytes()])
}

/// Key of a committed checkpoint record.
pub fn checkpoint_key(run: u64, step: u64) -> Vec<u8> {
    key(CHECKPOINT_PREFIX, &[&run.to_be_bytes(), &step.to_be_bytes()])
}

/// Prefix of one upload's chunks.
pub fn chunk_prefix(upload: u64) -> Vec<u8> {
    key(CHUNK_PREFIX, &[&upload.to_be_bytes()])
}

/// Key of one checkpoint chunk.
pub fn chunk_key(upload: u64, index: u32) -> Vec<u8> {
    key(CHUNK_PREFIX, &[&upload.to_be_bytes(), &index.to_be_bytes()])
}

/// Key of a submit idempotency entry.
pub fn request_key(request_id: &str) -> Vec<u8> {
    key(REQUEST_PREFIX, &[request_id.as_bytes()])
}

/// Reads the big-endian u64 at `offset` of a key.
pub fn u64_at(key: &[u8], offset: usize) -> Option<u64> {
    let bytes: [u8; 8] = key.get(offset..offset + 8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

/// Formats a run id.
pub fn run_id(seq: u64) -> String {
    format!("run-{seq:06}")
}

/// Formats a worker id.
pub fn worker_id(seq: u64) -> String {
    format!("wkr-{seq:06}")
}

/// Formats a sweep id.
pub fn sweep_id(seq: u64) -> String {
    format!("swp-{seq:06}")
}

/// Parses an id of the form `<prefix>-<digits>`.
pub fn parse_id(prefix: &str, id: &str) -> Option<u64> {
    let digits = id.strip_prefix(prefix)?.strip_prefix('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_carry_their_version() {
        let run = proto::Run { id: run_id(7), name: "x".into(), ..Default::default() };
        let bytes = encode(&run);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<proto::Run>(b"run/7", &bytes).unwrap(), run);
    }

    #[test]
    fn another_version_is_refused() {
        let mut bytes = encode(&proto::Run::default());
        bytes[0] = 9;
        let err = decode::<proto::Run>(b"run/7", &bytes).unwrap_err();
        assert!(matches!(err, StoreError::Format { found: 9, expected: 1, .. }));
    }

    #[test]
    fn metric_blocks_round_trip() {
        let points = vec![(1, 0.25, 1234), (5, f64::NAN, -1)];
        let decoded = decode_block(b"m", &encode_block(&points)).unwrap();
        assert_eq!(decoded.len(), 2);
        assert_eq!((decoded[0], decoded[1].0), ((1, 0.25, 1234), 5));
        assert!(decoded[1].1.is_nan());
        assert!(decode_block(b"m", &encode_block(&points)[..5]).is_err());
    }

    #[test]
    fn metric_blocks_sort_by_step_within_a_series() {
        let a = metric_block_key(1, "train/loss", 9);
        let b = metric_block_key(1, "train/loss", METRIC_BLOCK_STEPS);
        assert_eq!(a, metric_block_key(1, "train/loss", METRIC_BLOCK_STEPS - 1));
        assert!(a < b);
        assert!(a.starts_with(&metric_series_prefix(1, "train/loss")));
        assert!(!a.starts_with(&metric_series_prefix(1, "train/los")));
    }

    #[test]
    fn ids_format_and_parse() {
        assert_eq!(run_id(42), "run-000042");
        assert_eq!(parse_id("run", "run-000042"), Some(42));
        assert_eq!(parse_id("run", "run-1234567"), Some(1_234_567));
        assert_eq!(parse_id("run", "wkr-000042"), None);
        assert_eq!(parse_id("run", "run-"), None);
        assert_eq!(parse_id("run", "run-+4"), None);
    }
}
