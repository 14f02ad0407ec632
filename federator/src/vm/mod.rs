//! VMs in the mesh: WorkloadGroup templates, auto-registered WorkloadEntries, the VM API the
//! agent serves, the VM agent, its probes, and the bootstrap package. See docs/vm.md.

pub mod agent;
pub mod config;
pub mod entries;
pub mod package;
pub mod probe;
pub mod server;
pub mod spec;
pub mod token;
