//! The coordinator: it serves the `jepa.v1` API to users and workers,
//! schedules runs onto workers and keeps all state in a store.
//!
//! Data flow: the gRPC services ([`service`]) parse requests and call the
//! state machine ([`core`]), which places runs with the pure
//! [`scheduler`] and persists through [`store`]. Errors of every layer are
//! [`error::CoordError`], mapped to gRPC codes in one place. [`cli`] is
//! `jepactl`; [`bench`] measures the service.
//!
//! This crate never links libtorch; it builds and runs on machines that
//! have no accelerator and no PyTorch.

pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod core;
pub mod error;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod store;
