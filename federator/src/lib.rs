//! The `meshfed` command line: one binary that runs the federator, the agent, the east-west
//! gateway, the VM agent and the demo. Each runs from its own crate (see docs/architecture.md);
//! this crate parses flags into their validated configs and owns signals.

pub mod cli;
pub mod gateway;
