//! What the demo and the chaos scenarios share and nothing else links: network namespaces with
//! veth links behind a router ([`netns`]), and an xDS-following load generator ([`loadgen`]).

pub mod loadgen;
pub mod netns;
