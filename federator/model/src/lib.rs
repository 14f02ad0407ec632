//! meshfed's data model, the leaf every other crate reads: validated names and limits
//! ([`validate`]), the registry schema with its Istio WorkloadGroup/WorkloadEntry objects
//! ([`registry`], [`workload`], [`entry`]), failover policies ([`policy`]), and the service
//! [`snapshot`] with its one-writer-per-source store ([`store`]).
//!
//! Sources (the file registry, the federation sync, VM registrations, policy files) write the
//! store; generators (xDS, DNS) and the VM API, status and the gateway read and subscribe.

pub mod entry;
pub mod policy;
pub mod registry;
pub mod snapshot;
pub mod store;
pub mod validate;
pub mod workload;
