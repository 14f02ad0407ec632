//! VMs in the mesh, the agent's side: the VM API the agent serves (join, renewal, the Attach
//! stream that keeps a VM's WorkloadEntry registered), the store of auto-registered
//! WorkloadEntries, VM tokens and records, and the bootstrap package. The VM's own side is
//! `meshfed-vm-agent`. See docs/vm.md.

pub mod admin;
pub mod entries;
pub mod package;
pub mod server;
pub mod token;
