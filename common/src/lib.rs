//! Types every part of the system shares: the generated `jepa.v1`
//! protobuf code, the run spec with its wire form and text overrides,
//! metric series names and the tracing set-up.
//!
//! This crate never links libtorch and owns no tokio runtime, so the
//! coordinator and `jepactl` build on machines without either.

pub mod duration;
pub mod series;
pub mod spec;
pub mod spec_override;
pub mod spec_proto;
pub mod telemetry;

/// Generated protobuf and gRPC code of the `jepa.v1` package.
pub mod proto {
    #![allow(missing_docs, clippy::all, clippy::pedantic)]
    tonic::include_proto!("jepa.v1");

    /// Encoded file descriptor set of `jepa.v1`, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("jepa_v1_descriptor");
}

/// Version of this build, shared by every binary of the workspace.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Revision of the `jepa.v1` API this build serves.
pub const API_REVISION: u32 = 2;
