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

/// TLS handshakes the process refused or that timed out, by `reason` (`refused`, `timeout`):
/// one counter for every mTLS listener of the process (federator, agent xDS and VM API).
/// Each component registers it in its own registry ([`register_tls_refused`]).
pub static TLS_REFUSED: std::sync::LazyLock<prometheus::IntCounterVec> = std::sync::LazyLock::new(
    || {
        must(prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "meshfed_tls_handshakes_refused_total",
                "TLS handshakes refused (bad or missing client certificate, wrong trust domain, not TLS) or timed out",
            ),
            &["reason"],
        ))
    },
);

/// TLS handshakes under way on every mTLS listener of the process; each listener runs at most
/// [`crate::MAX_CONCURRENT_HANDSHAKES`] at once and leaves further connections in the kernel's
/// accept queue.
pub static TLS_IN_PROGRESS: std::sync::LazyLock<prometheus::IntGauge> =
    std::sync::LazyLock::new(|| {
        must(prometheus::IntGauge::new(
            "meshfed_tls_handshakes_in_progress",
            "TLS handshakes under way (each listener runs a bounded number at once)",
        ))
    });

/// Adds [`TLS_REFUSED`] and [`TLS_IN_PROGRESS`] to a component's registry.
pub fn register_tls_refused(registry: &Registry) {
    if let Err(e) = registry.register(Box::new(TLS_REFUSED.clone())) {
        tracing::warn!(error = %e, "cannot register the TLS handshake counter");
    }
    if let Err(e) = registry.register(Box::new(TLS_IN_PROGRESS.clone())) {
        tracing::warn!(error = %e, "cannot register the TLS handshake gauge");
    }
}
