//! The federation service (`meshfed federator`): joins, one Sync stream per cluster, leases,
//! durable state, and status.

pub mod identity;
pub mod server;
pub mod status;
pub mod store;
pub mod token;

pub use server::{Federator, FederatorConfig};
