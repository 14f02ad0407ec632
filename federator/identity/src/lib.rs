//! How meshfed's parties prove who they are: the SPIFFE IDs of the federator, clusters, agents
//! and VMs; a cluster's identity on disk (its federation certificate, its CA) and the join that
//! creates it; join, VM and workload tokens (single-use, expiring, stored as hashes); Istio's CA
//! API.

pub mod admin;
pub mod ca_api;
pub mod certs;
pub mod cluster;
pub mod ids;
pub mod live_ca;
pub mod token;
pub mod vm_token;
pub mod workload_token;
