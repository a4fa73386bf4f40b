//! End-to-end tests of the coordinator: a real gRPC server on loopback, a
//! sled store in a scratch folder, scripted fake workers, and a clock moved
//! by hand so leases expire without sleeping.

mod harness;
mod invalid_specs;
mod jepactl;
mod lifecycle;
mod persistence;
mod scheduling;
mod sweeps;
mod system;
