//! The agent's Prometheus metrics. Every path uses the same label names (`cluster`, `source_cluster`,
//! `destination_cluster`, `reason`, `kind`) so series can be joined.

use meshfed_net::metrics::must;
use prometheus::{
    Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

#[derive(Debug, Clone)]
pub struct AgentMetrics {
    pub registry: Registry,
    pub connected: IntGauge,
    pub imports: IntGaugeVec,
    pub export_version_acked: IntGauge,
    pub import_revision: IntGauge,
    pub sync_errors: IntCounterVec,
    pub bundle_regressions: IntCounterVec,
    pub registry_reloads: IntCounterVec,
    pub kubernetes_problems: IntGauge,
    pub import_apply_seconds: HistogramVec,
    pub export_deltas: IntCounterVec,
    pub ca_rotations: IntCounter,
    pub ca_bundle_sequence: IntGauge,
    pub leader: IntGauge,
    /// Per peer, set from the status at every scrape ([`AgentMetrics::observe_peers`]).
    pub peer_heartbeat_age: GaugeVec,
    pub peer_fresh: IntGaugeVec,
    pub peer_bundle_expiry_days: IntGaugeVec,
    pub cluster_cert_expiry: Gauge,
}

impl AgentMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        meshfed_net::metrics::register_tls_refused(&registry);
        let m = AgentMetrics {
            connected: must(IntGauge::new(
                "meshfed_agent_federator_connected",
                "1 while the Sync stream is up",
            )),
            imports: must(IntGaugeVec::new(
                Opts::new(
                    "meshfed_agent_imported_services",
                    "Imported services by source cluster",
                ),
                &["source_cluster"],
            )),
            export_version_acked: must(IntGauge::new(
                "meshfed_agent_exports_acked_version",
                "Last export version the federator acknowledged",
            )),
            import_revision: must(IntGauge::new(
                "meshfed_agent_imports_applied_revision",
                "Last import revision applied and stored",
            )),
            sync_errors: must(IntCounterVec::new(
                Opts::new("meshfed_agent_sync_errors_total", "Sync stream failures"),
                &["reason"],
            )),
            bundle_regressions: must(IntCounterVec::new(
                Opts::new(
                    "meshfed_agent_bundle_regressions_total",
                    "Peer bundles refused because their sequence was lower than the one held",
                ),
                &["trust_domain"],
            )),
            registry_reloads: must(IntCounterVec::new(
                Opts::new(
                    "meshfed_agent_registry_reloads_total",
                    "Registry file reloads by outcome",
                ),
                &["reason"],
            )),
            kubernetes_problems: must(IntGauge::new(
                "meshfed_agent_kubernetes_problems",
                "Kubernetes objects the agent cannot use (see meshfed status)",
            )),
            import_apply_seconds: must(HistogramVec::new(
                HistogramOpts::new(
                    "meshfed_agent_import_apply_seconds",
                    "Time to apply and store an import delta",
                ),
                &["kind"],
            )),
            export_deltas: must(IntCounterVec::new(
                Opts::new(
                    "meshfed_agent_export_deltas_sent_total",
                    "Export deltas sent, by kind (full or delta)",
                ),
                &["kind"],
            )),
            ca_rotations: must(IntCounter::new(
                "meshfed_agent_ca_rotations_total",
                "Times a new root of the cluster CA began signing",
            )),
            ca_bundle_sequence: must(IntGauge::new(
                "meshfed_agent_ca_bundle_sequence",
                "Sequence of the cluster CA's published trust bundle",
            )),
            leader: must(IntGauge::new(
                "meshfed_agent_leader",
                "1 while this replica holds the cluster's Lease (always 1 without leader election)",
            )),
            peer_heartbeat_age: must(GaugeVec::new(
                Opts::new(
                    "meshfed_agent_peer_heartbeat_age_seconds",
                    "Age of each peer's last heartbeat, as the federator measured it plus the time since",
                ),
                &["source_cluster"],
            )),
            peer_fresh: must(IntGaugeVec::new(
                Opts::new(
                    "meshfed_agent_peer_fresh",
                    "1 while a peer's lease is fresh, 0 while it is stale",
                ),
                &["source_cluster"],
            )),
            peer_bundle_expiry_days: must(IntGaugeVec::new(
                Opts::new(
                    "meshfed_agent_peer_bundle_expiry_days",
                    "Days until the first root of each peer's bundle expires",
                ),
                &["source_cluster"],
            )),
            cluster_cert_expiry: must(Gauge::new(
                "meshfed_agent_cluster_certificate_expiry_seconds",
                "Seconds until the cluster certificate (the Sync stream's) expires",
            )),
            registry,
        };
        for c in [
            Box::new(m.export_deltas.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.connected.clone()),
            Box::new(m.imports.clone()),
            Box::new(m.export_version_acked.clone()),
            Box::new(m.import_revision.clone()),
            Box::new(m.sync_errors.clone()),
            Box::new(m.bundle_regressions.clone()),
            Box::new(m.registry_reloads.clone()),
            Box::new(m.kubernetes_problems.clone()),
            Box::new(m.import_apply_seconds.clone()),
            Box::new(m.ca_rotations.clone()),
            Box::new(m.ca_bundle_sequence.clone()),
            Box::new(m.leader.clone()),
            Box::new(m.peer_heartbeat_age.clone()),
            Box::new(m.peer_fresh.clone()),
            Box::new(m.peer_bundle_expiry_days.clone()),
            Box::new(m.cluster_cert_expiry.clone()),
        ] {
            must(m.registry.register(c));
        }
        m
    }
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// Sets the per-peer gauges from the status (peers that left disappear).
    pub fn observe_peers(&self, r: &crate::AgentReport) {
        self.peer_heartbeat_age.reset();
        self.peer_fresh.reset();
        self.peer_bundle_expiry_days.reset();
        for p in &r.peers {
            let l = [p.cluster.as_str()];
            if let Some(ms) = p.last_heartbeat_age_ms {
                self.peer_heartbeat_age
                    .with_label_values(&l)
                    .set(ms as f64 / 1000.0);
            }
            self.peer_fresh
                .with_label_values(&l)
                .set(i64::from(p.lease == "fresh"));
            if let Some(d) = p.bundle_days_left {
                self.peer_bundle_expiry_days.with_label_values(&l).set(d);
            }
        }
        if let Some(t) = r.cluster_cert_not_after.as_deref().and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        }) {
            self.cluster_cert_expiry
                .set((t - time::OffsetDateTime::now_utc()).as_seconds_f64());
        }
    }
}
