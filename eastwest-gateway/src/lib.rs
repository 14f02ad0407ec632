//! meshfed's east-west gateway: routes cross-network TLS on the ClientHello's SNI without
//! terminating it (Istio AUTO_PASSTHROUGH compatible).
//!
//! - [`hello`]: reads a ClientHello from the bytes a client sent so far (split across TCP
//!   segments and TLS records, up to 64 KiB), extracting SNI and ALPN, and builds TLS alerts.
//! - [`sni`]: Istio's SNI forms `outbound_.<port>_.<subset>_.<host>` and
//!   `outbound|<port>|<subset>|<host>`.
//! - [`routes`]: which local endpoints serve an SNI (from the agent's xDS) and fixed names.
//! - [`proxy`]: the data path: limits, endpoint choice and ejection, splice, drain, metrics.

pub mod hello;
pub mod proxy;
pub mod routes;
pub mod sni;
