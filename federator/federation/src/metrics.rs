//! The federator's Prometheus metrics. Every path uses the same label names (`cluster`, `source_cluster`,
//! `destination_cluster`, `reason`, `kind`) so series can be joined.

use meshfed_net::metrics::must;
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

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
    /// Per member cluster, set from the status at every scrape ([`FederationMetrics::observe`]).
    pub heartbeat_age: GaugeVec,
    pub fresh: IntGaugeVec,
    pub import_lag: IntGaugeVec,
    pub tombstones_compacted: prometheus::IntCounter,
    pub tombstones: IntGauge,
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
            heartbeat_age: must(GaugeVec::new(
                Opts::new(
                    "meshfed_federation_cluster_heartbeat_age_seconds",
                    "Age of each member cluster's last heartbeat",
                ),
                &["source_cluster"],
            )),
            fresh: must(IntGaugeVec::new(
                Opts::new(
                    "meshfed_federation_cluster_fresh",
                    "1 while a member cluster's lease is fresh, 0 while it is stale",
                ),
                &["source_cluster"],
            )),
            import_lag: must(IntGaugeVec::new(
                Opts::new(
                    "meshfed_federation_cluster_import_lag",
                    "Revisions a member cluster has not acknowledged yet",
                ),
                &["destination_cluster"],
            )),
            tombstones_compacted: must(prometheus::IntCounter::new(
                "meshfed_federation_tombstones_compacted_total",
                "Tombstones of removed exports dropped once every member had read them",
            )),
            tombstones: must(IntGauge::new(
                "meshfed_federation_tombstones",
                "Tombstones of removed exports held in the store",
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
            Box::new(m.heartbeat_age.clone()),
            Box::new(m.fresh.clone()),
            Box::new(m.import_lag.clone()),
            Box::new(m.tombstones_compacted.clone()),
            Box::new(m.tombstones.clone()),
        ] {
            must(m.registry.register(c));
        }
        m
    }
}

impl FederationMetrics {
    /// Sets the per-cluster gauges from the status (clusters that left disappear).
    pub fn observe(&self, r: &crate::status::FederationReport) {
        self.heartbeat_age.reset();
        self.fresh.reset();
        self.import_lag.reset();
        for c in r.clusters.iter().filter(|c| c.lease != "left") {
            let l = [c.cluster.as_str()];
            if let Some(ms) = c.last_heartbeat_age_ms {
                self.heartbeat_age
                    .with_label_values(&l)
                    .set(ms as f64 / 1000.0);
            }
            self.fresh
                .with_label_values(&l)
                .set(i64::from(c.lease == "fresh"));
            self.import_lag
                .with_label_values(&l)
                .set(i64::try_from(c.import_lag).unwrap_or(i64::MAX));
        }
    }
}

impl Default for FederationMetrics {
    fn default() -> Self {
        Self::new()
    }
}
