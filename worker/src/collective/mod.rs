//! The collective operations the training step calls on every rank. The
//! step always goes through this interface, even alone, so data-parallel
//! backends (NCCL on GPUs, TCP on CPUs) plug in without touching it.

use tch::Tensor;

pub mod bench;
pub mod nccl;
pub mod tcp;

/// Errors of a collective operation.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// A peer did not answer within the timeout.
    #[error("collective {op} timed out after {seconds} s")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The timeout that ran out.
        seconds: u64,
    },
    /// The transport failed.
    #[error("collective {op} failed: {message}")]
    Failed {
        /// The operation.
        op: &'static str,
        /// What went wrong.
        message: String,
    },
}

/// Operations across all ranks of one run.
pub trait Collective: Send {
    /// This process's rank, `0..world`.
    fn rank(&self) -> usize;

    /// Number of ranks.
    fn world(&self) -> usize;

    /// Replaces each tensor by its mean over all ranks, in place.
    ///
    /// # Errors
    ///
    /// Fails when a peer is gone or the transport breaks.
    fn all_reduce_mean(&mut self, tensors: &[&Tensor]) -> Result<(), CollectiveError>;

    /// Copies rank 0's values into each tensor on every rank.
    ///
    /// # Errors
    ///
    /// Fails when a peer is gone or the transport breaks.
    fn broadcast(&mut self, tensors: &[&Tensor]) -> Result<(), CollectiveError>;

    /// Returns once every rank has called it.
    ///
    /// # Errors
    ///
    /// Fails when a peer is gone or the transport breaks.
    fn barrier(&mut self) -> Result<(), CollectiveError>;
}

/// The collective of a run with a single rank: every operation is the
/// identity.
#[derive(Debug, Default)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn all_reduce_mean(&mut self, _tensors: &[&Tensor]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn broadcast(&mut self, _tensors: &[&Tensor]) -> Result<(), CollectiveError> {
        Ok(())
    }

    fn barrier(&mut self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// All tensors as one flat f32 tensor (a single bucket) on their device.
pub(crate) fn flatten(tensors: &[&Tensor]) -> Tensor {
    let parts: Vec<Tensor> =
        tensors.iter().map(|t| t.to_kind(tch::Kind::Float).flatten(0, -1)).collect();
    Tensor::cat(&parts, 0)
}

/// Copies consecutive slices of `flat` back into `tensors`, in their own
/// kind and on their own device.
pub(crate) fn scatter_back(flat: &Tensor, tensors: &[&Tensor]) {
    let mut offset = 0i64;
    for tensor in tensors {
        let n = tensor.numel() as i64;
        let part = flat.narrow(0, offset, n).view(tensor.size().as_slice());
        tch::no_grad(|| {
            let mut target = (*tensor).shallow_clone();
            target.copy_(&part.to_kind(tensor.kind()).to(tensor.device()));
        });
        offset += n;
    }
}
