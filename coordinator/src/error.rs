//! The coordinator's domain errors and the one place where they become gRPC
//! status codes.
//!
//! Every layer below the gRPC services returns [`CoordError`]; the services
//! convert with `?` through `From<CoordError> for Status`, so a code is
//! chosen here and nowhere else.

use jepa_common::spec::SpecError;
use tonic::{Code, Status};

use crate::store::StoreError;

/// What went wrong in a coordinator operation, by the kind of remedy it
/// needs.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// The request holds a bad value; `field` is its dotted path.
    #[error("{field}: {message}")]
    InvalidArgument {
        /// Dotted path of the field, e.g. `mask.context_scale`.
        field: String,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// An id names nothing the coordinator knows.
    #[error("{kind} {id} not found")]
    NotFound {
        /// What was looked up: "run", "worker", "sweep", "checkpoint".
        kind: &'static str,
        /// The id as given.
        id: String,
    },
    /// The change is not allowed in the current state.
    #[error("{0}")]
    FailedPrecondition(String),
    /// Received bytes do not match their checksum.
    #[error("{0}")]
    DataLoss(String),
    /// A wait ran out of time; the caller may try again.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CoordError {
    /// Builds an [`CoordError::InvalidArgument`].
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        CoordError::InvalidArgument { field: field.into(), message: message.into() }
    }

    /// Builds a [`CoordError::NotFound`].
    pub fn not_found(kind: &'static str, id: impl Into<String>) -> Self {
        CoordError::NotFound { kind, id: id.into() }
    }

    /// Builds a [`CoordError::FailedPrecondition`].
    pub fn precondition(message: impl Into<String>) -> Self {
        CoordError::FailedPrecondition(message.into())
    }

    /// Returns the gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            CoordError::InvalidArgument { .. } => Code::InvalidArgument,
            CoordError::NotFound { .. } => Code::NotFound,
            CoordError::FailedPrecondition(_) => Code::FailedPrecondition,
            CoordError::DataLoss(_) => Code::DataLoss,
            CoordError::DeadlineExceeded(_) => Code::DeadlineExceeded,
            CoordError::Store(StoreError::Io(_)) => Code::Unavailable,
            CoordError::Store(_) => Code::Internal,
        }
    }
}

impl From<SpecError> for CoordError {
    fn from(err: SpecError) -> Self {
        match err {
            SpecError::Invalid { field, message } => CoordError::InvalidArgument { field, message },
            other => CoordError::invalid("spec", other.to_string()),
        }
    }
}

impl From<CoordError> for Status {
    fn from(err: CoordError) -> Self {
        let code = err.code();
        if matches!(code, Code::Internal | Code::Unavailable) {
            tracing::error!(error = %err, "request failed in the store");
        }
        Status::new(code, err.to_string())
    }
}

/// Shorthand for results of coordinator operations.
pub type CoordResult<T> = Result<T, CoordError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_errors_keep_their_field_and_become_invalid_argument() {
        let err = CoordError::from(SpecError::Invalid {
            field: "mask.context_scale".into(),
            message: "is [0.9, 0.1]".into(),
        });
        let status = Status::from(err);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().starts_with("mask.context_scale: "));
    }

    #[test]
    fn each_kind_has_its_code() {
        assert_eq!(Status::from(CoordError::not_found("run", "run-1")).code(), Code::NotFound);
        assert_eq!(Status::from(CoordError::precondition("done")).code(), Code::FailedPrecondition);
        assert_eq!(Status::from(CoordError::DataLoss("sha".into())).code(), Code::DataLoss);
        let io = CoordError::Store(StoreError::Io("disk".into()));
        assert_eq!(Status::from(io).code(), Code::Unavailable);
    }
}
