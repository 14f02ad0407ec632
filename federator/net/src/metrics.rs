//! Prometheus helpers shared by every component's metrics.

use prometheus::{Encoder, Registry};

/// Unwraps a metric definition or registration. Metric definitions are static; a failure is a
/// programming error that every component's metrics test catches.
pub fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

/// The text exposition of a registry.
pub fn render(registry: &Registry) -> String {
    let mut buf = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}
