//! The input pipeline of the trainer: data sets (IDX, image folders,
//! synthetic), transforms, and a threaded loader that shards by rank.
//!
//! Data flow: a [`Source`] yields 8-bit images by index; the [`loader`]
//! decides which indices each rank uses at each step, transforms them on
//! worker threads and hands finished batches to the training loop.

pub mod augment;
pub mod idx;
pub mod loader;
mod sources;

use std::path::Path;
use std::sync::Arc;

pub use sources::{open_source, FolderSource, IdxSource, SyntheticSource};

/// Errors of the input pipeline.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder the data set needs is not there.
    #[error("data set file not found: {0}")]
    Missing(String),
    /// A file exists but is not in the expected format.
    #[error("malformed data set file: {0}")]
    Format(String),
    /// Reading failed.
    #[error("failed to read {path}: {message}")]
    Io {
        /// The file read.
        path: String,
        /// The error text.
        message: String,
    },
    /// An image file could not be decoded.
    #[error("failed to decode image {path}: {message}")]
    Decode {
        /// The image file.
        path: String,
        /// The decoder's message.
        message: String,
    },
}

impl DataError {
    pub(crate) fn io(path: &Path, err: impl std::fmt::Display) -> Self {
        DataError::Io { path: path.display().to_string(), message: err.to_string() }
    }
}

/// Which split of a data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// The training split.
    Train,
    /// The test (or validation) split.
    Test,
}

/// An 8-bit image, channels interleaved (HWC).
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
    /// `height * width * channels` bytes.
    pub data: Vec<u8>,
}

impl Image {
    /// Value at row `y`, column `x`, channel `c`.
    pub fn at(&self, y: usize, x: usize, c: usize) -> u8 {
        self.data[(y * self.width + x) * self.channels + c]
    }
}

/// A data set that can be read by index from several threads.
pub trait Source: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;

    /// Whether the source holds no sample.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns sample `i`: its image and class label.
    ///
    /// # Errors
    ///
    /// Fails when the sample cannot be read or decoded.
    fn get(&self, i: usize) -> Result<(Image, i64), DataError>;

    /// Number of classes, for the linear probe.
    fn num_classes(&self) -> usize;

    /// Per-channel mean and standard deviation for normalisation, for the
    /// given number of model input channels.
    fn normalisation(&self, channels: usize) -> (Vec<f32>, Vec<f32>);
}

/// Shared handle to a source.
pub type SharedSource = Arc<dyn Source>;
