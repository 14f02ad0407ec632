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

pub mod wire;

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

/// Istio's certificate service (`istio.v1.auth.IstioCertificateService`), from
/// `proto/istio/v1/auth/ca.proto`: the agent serves it so Istio's clients can use meshfed as
/// their CA.
#[allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]
pub mod istio_ca {
    tonic::include_proto!("istio.v1.auth");
}

/// What a pod's `meshfed workload` learns from its agent (`meshfed.workload.v1`), from
/// `proto/meshfed/workload/v1/workload.proto`.
#[allow(
    clippy::all,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]
pub mod workload {
    tonic::include_proto!("meshfed.workload.v1");
}

/// Why the federator refused a stream, as a machine-readable `meshfed-reason` metadata entry on
/// the gRPC status (the message is for people and may change).
pub mod reason {
    /// The metadata key.
    pub const KEY: &str = "meshfed-reason";
    /// The cluster has left the federation: stop syncing, clear imports.
    pub const LEFT: &str = "left";

    /// A `PERMISSION_DENIED` status that says the cluster has left.
    pub fn left(message: String) -> tonic::Status {
        let mut s = tonic::Status::permission_denied(message);
        s.metadata_mut()
            .insert(KEY, tonic::metadata::MetadataValue::from_static(LEFT));
        s
    }

    /// Another stream of the same cluster replaced this one.
    pub const SUPERSEDED: &str = "superseded";

    /// An `ABORTED` status that says a newer stream of the cluster replaced this one.
    pub fn superseded(message: &'static str) -> tonic::Status {
        let mut s = tonic::Status::aborted(message);
        s.metadata_mut()
            .insert(KEY, tonic::metadata::MetadataValue::from_static(SUPERSEDED));
        s
    }

    /// Whether `s` says a newer stream of the cluster replaced this one.
    pub fn is_superseded(s: &tonic::Status) -> bool {
        s.code() == tonic::Code::Aborted
            && s.metadata().get(KEY).and_then(|v| v.to_str().ok()) == Some(SUPERSEDED)
    }

    /// Whether `s` says the cluster has left.
    pub fn is_left(s: &tonic::Status) -> bool {
        s.code() == tonic::Code::PermissionDenied
            && s.metadata().get(KEY).and_then(|v| v.to_str().ok()) == Some(LEFT)
    }
}
