//! The worker side of the EC-IJEPA training system: the trainer (model,
//! masks, data, optimisation, checkpoints, evaluation) and the daemon that
//! runs trainers for the coordinator.
//!
//! This is the only crate that links libtorch.

pub mod bench;
pub mod collective;
pub mod daemon;
pub mod data;
pub mod masks;
pub mod model;
pub mod runtime;
pub mod train;
