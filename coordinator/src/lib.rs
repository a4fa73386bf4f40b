//! The coordinator: it serves the `jepa.v1` API to users and workers.
//!
//! This crate never links libtorch; it builds and runs on machines that
//! have no accelerator and no PyTorch.

pub mod server;
