//! The gRPC services of `jepa.v1`: thin adapters that parse requests, call
//! [`crate::core::Coordinator`] and turn its errors into status codes with
//! `?` (through the one mapping in [`crate::error`]).

pub mod user;
pub mod worker;

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::Status;

pub use user::UserApi;
pub use worker::WorkerApi;

/// A boxed server stream, as the generated traits want it.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;
