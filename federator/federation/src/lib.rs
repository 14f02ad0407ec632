//! The federation service (`meshfed federator`): joins, one Sync stream per cluster, leases,
//! the federation CA, and status. Durable state is `meshfed-store`.

pub mod ca;
pub mod metrics;
pub mod server;
pub mod shared;
pub mod status;

pub use server::{Federator, FederatorConfig, StoreChoice};

/// The federation dashboard (`/ui/` on the federator's admin server): one page, embedded.
pub const FEDERATION_PAGE: &str = include_str!("../ui/federation.html");
