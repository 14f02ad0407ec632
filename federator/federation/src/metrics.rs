//! The federator's Prometheus metrics. Every path uses the same label names (`cluster`, `source_cluster`,
//! `destination_cluster`, `reason`, `kind`) so series can be joined.

use meshfed_net::metrics::must;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct FederationMetrics {
    pub registry: Registry,
    pub messages: IntCounterVec,
    pub refused: IntCounterVec,
    pub export_apply_seconds: Histogram,
    pub import_deltas: IntCounterVec,
    pub import_nacks: IntCounterVec,
    pub clusters: IntGaugeVec,
    pub head_revision: IntGauge,
    pub joins: IntCounterVec,
}

impl FederationMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        meshfed_net::metrics::register_tls_refused(&registry);
        let m = FederationMetrics {
            messages: must(IntCounterVec::new(
                Opts::new(
                    "meshfed_federation_messages_total",
                    "Messages received on Sync streams",
                ),
                &["cluster", "kind"],
            )),
            refused: must(IntCounterVec::new(
                Opts::new(
                    "meshfed_federation_refused_total",
                    "Requests or messages refused",
                ),
                &["cluster", "reason"],
            )),
            export_apply_seconds: must(Histogram::with_opts(HistogramOpts::new(
                "meshfed_federation_export_apply_seconds",
                "Time to validate and durably store one export delta",
            ))),
            import_deltas: must(IntCounterVec::new(
                Opts::new(
                    "meshfed_federation_import_deltas_total",
                    "Import deltas sent",
                ),
                &["destination_cluster"],
            )),
            import_nacks: must(IntCounterVec::new(
                Opts::new(
                    "meshfed_federation_import_nacks_total",
                    "Import deltas refused by the importer",
                ),
                &["destination_cluster"],
            )),
            clusters: must(IntGaugeVec::new(
                Opts::new("meshfed_federation_clusters", "Member clusters by state"),
                &["state"],
            )),
            head_revision: must(IntGauge::new(
                "meshfed_federation_head_revision",
                "Head revision of the federation store",
            )),
            joins: must(IntCounterVec::new(
                Opts::new("meshfed_federation_joins_total", "Join attempts by outcome"),
                &["reason"],
            )),
            registry,
        };
        for c in [
            Box::new(m.messages.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.refused.clone()),
            Box::new(m.export_apply_seconds.clone()),
            Box::new(m.import_deltas.clone()),
            Box::new(m.import_nacks.clone()),
            Box::new(m.clusters.clone()),
            Box::new(m.head_revision.clone()),
            Box::new(m.joins.clone()),
        ] {
            must(m.registry.register(c));
        }
        m
    }
}

impl Default for FederationMetrics {
    fn default() -> Self {
        Self::new()
    }
}
