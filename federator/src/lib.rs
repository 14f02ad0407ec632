//! meshfed's control plane: the federation service, the per-cluster agent, and the `meshfed`
//! command line that runs them.

pub mod admin;
pub mod agent;
pub mod cli;
pub mod demo;
pub mod dns;
pub mod federation;
pub mod gateway;
pub mod loadgen;
pub mod metrics;
pub mod net;
pub mod netns;
pub mod policy;
pub mod types;
pub mod vm;
pub mod xds;
