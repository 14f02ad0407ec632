//! The meshfed federation gRPC API (`meshfed.federation.v1`), generated from
//! `proto/meshfed/federation/v1/federation.proto`. The protocol is described in
//! `docs/federation-protocol.md`.

#[allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]
pub mod federation {
    tonic::include_proto!("meshfed.federation.v1");
}

pub use federation::*;

/// The VM API (`meshfed.vm.v1`), from `proto/meshfed/vm/v1/vm.proto`.
#[allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]
pub mod vm {
    tonic::include_proto!("meshfed.vm.v1");
}
