//! The agent's side of the federation: one Sync stream, reconnected with jittered exponential
//! backoff. Exports are sent as versioned deltas against what the federator last acknowledged
//! (nothing is resent when nothing changed); imports are stored before they are acknowledged.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::cluster_message::Kind as Out;
use proto::federation_client::FederationClient;
use proto::federator_message::Kind as In;
use proto::{
    BundleUpdate, ClusterMessage, ExportDelta, Heartbeat, Hello, ImportAck, ImportDelta,
    ServiceExport, ServiceKey,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::Inner;
use meshfed_model::store::FederationWriter;
use meshfed_model::validate::MAX_MESSAGE_BYTES;

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How a session ended.
#[derive(Debug)]
pub enum End {
    /// The federator closed the stream (e.g. shutting down).
    Closed,
    /// This cluster is no longer a member.
    Left(String),
    Failed(anyhow::Error),
    /// This replica's role changed (leader election): connect again in the other role.
    RoleChanged,
    /// A newer stream of this cluster (another replica's) replaced this one.
    Superseded,
}

/// Whether this replica speaks for the cluster: it leads, or it was the last holder of the
/// Lease it could read and no other replica has replaced its stream since. So a leader that
/// cannot reach the API server (and has stopped writing to it) keeps the cluster's stream,
/// heartbeats and VMs until another replica leads, instead of leaving the cluster without a
/// voice during an API server outage.
pub fn speaks(l: &meshfed_kube::leader::Leadership, superseded: bool) -> bool {
    l.leader || (l.held_last && !superseded)
}

/// What of the election decides the role (not its error or timestamps).
pub type RoleKey = (bool, Option<String>, bool);

/// Recomputes whether this replica speaks for the cluster ([`speaks`]), from the election and
/// whether another replica's stream replaced this one's. Being replaced holds only for the
/// election's state it happened in: any change of that state (this replica led again, read
/// another holder, ...) clears it. Called on every change of either, so the VM API and the
/// Sync stream follow at once, also while the stream is reconnecting.
pub fn refresh_speaks(inner: &Inner) {
    let l = inner.leadership.borrow().clone();
    let key = role_key(&l);
    let replaced = {
        let mut sup = inner.superseded.lock().unwrap_or_else(|p| p.into_inner());
        if sup.as_ref().is_some_and(|k| *k != key) {
            *sup = None;
        }
        sup.is_some()
    };
    let now = speaks(&l, replaced);
    inner
        .speaks
        .send_if_modified(|s| std::mem::replace(s, now) != now);
}

fn role_key(l: &meshfed_kube::leader::Leadership) -> RoleKey {
    (l.leader, l.holder.clone(), l.held_last)
}

impl From<anyhow::Error> for End {
    fn from(e: anyhow::Error) -> Self {
        End::Failed(e)
    }
}

fn status_end(s: tonic::Status) -> End {
    if proto::reason::is_left(&s) {
        return End::Left(s.message().to_string());
    }
    if proto::reason::is_superseded(&s) {
        return End::Superseded;
    }
    End::Failed(meshfed_identity::cluster::describe_status(
        "sync stream",
        &s,
    ))
}

/// Runs Sync sessions until the cluster leaves.
pub async fn run(inner: Arc<Inner>, fed: FederationWriter) {
    let mut backoff = BACKOFF_MIN;
    let mut role = inner.speaks.subscribe();
    loop {
        let started = Instant::now();
        let end = session(&inner, &fed).await;
        set_connected(&inner, &fed, false);
        match end {
            End::Superseded if inner.elected && !inner.is_leader() => {
                tracing::info!("another replica's stream replaced this one's: observing until the Lease says more");
                // Until the election's state changes, this replica observes.
                *inner.superseded.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(role_key(&inner.leadership.borrow()));
                refresh_speaks(&inner);
                backoff = BACKOFF_MIN;
                continue;
            }
            End::Superseded => {
                let msg = "a newer stream of this cluster replaced this one (is another agent running with this cluster's identity?)";
                tracing::warn!("{msg}");
                inner.status().last_error = Some(msg.into());
            }
            End::RoleChanged => {
                tracing::info!(
                    leader = inner.is_leader(),
                    "the replica's role changed: reconnecting as the cluster's stream or as an observer"
                );
                backoff = BACKOFF_MIN;
                continue;
            }
            End::Closed => tracing::info!("federator closed the sync stream"),
            End::Left(m) => {
                tracing::warn!(message = %m, "this cluster is no longer a federation member; clearing imports and stopping sync");
                inner.status().left = true;
                if let Err(e) = inner.cache.clear() {
                    tracing::error!(error = %e, "cannot clear the cache");
                }
                fed.update(|s| {
                    s.imports.clear();
                    s.peers.clear();
                    s.bundles.clear();
                    *s.applied_revision = 0;
                });
                return;
            }
            End::Failed(e) => {
                let msg = format!("{e:#}");
                tracing::warn!(error = %msg, "sync session failed");
                inner
                    .metrics
                    .sync_errors
                    .with_label_values(&["session"])
                    .inc();
                inner.status().last_error = Some(msg);
            }
        }
        if started.elapsed() > Duration::from_secs(10) {
            backoff = BACKOFF_MIN;
        }
        // Full jitter: a fleet that lost the federator at once does not return at once. A
        // change of role ends the wait: the new role connects at once.
        let wait = backoff.mul_f64(0.5 + rand::random::<f64>() * 0.5);
        role.borrow_and_update();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = role.changed() => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn send_exports(
    inner: &Inner,
    tx: &mpsc::Sender<ClusterMessage>,
    d: ExportDelta,
) -> Result<(), End> {
    let kind = if d.full { "full" } else { "delta" };
    inner.metrics.export_deltas.with_label_values(&[kind]).inc();
    tracing::debug!(
        version = d.version,
        kind,
        upserts = d.upserts.len(),
        removals = d.removals.len(),
        "sending exports"
    );
    send(tx, Out::Exports(d)).await
}

async fn send(tx: &mpsc::Sender<ClusterMessage>, kind: Out) -> Result<(), End> {
    tx.send(ClusterMessage { kind: Some(kind) })
        .await
        .map_err(|_| End::Failed(anyhow::anyhow!("the sync stream closed")))
}

struct Exports {
    acked_version: u64,
    acked: Arc<meshfed_model::snapshot::Services>,
    in_flight: Option<(u64, Arc<meshfed_model::snapshot::Services>)>,
    need_full: bool,
    federator_version: u64,
}

impl Exports {
    /// The next delta to send, if the desired set differs from what is acknowledged.
    fn next(&mut self, desired: &Arc<meshfed_model::snapshot::Services>) -> Option<ExportDelta> {
        if self.in_flight.is_some() {
            return None;
        }
        if self.need_full {
            let version = self
                .acked_version
                .max(self.federator_version)
                .saturating_add(1);
            self.need_full = false;
            self.in_flight = Some((version, desired.clone()));
            return Some(ExportDelta {
                version,
                full: true,
                upserts: desired.values().map(|v| ServiceExport::clone(v)).collect(),
                removals: Vec::new(),
            });
        }
        if Arc::ptr_eq(desired, &self.acked) || **desired == *self.acked {
            return None;
        }
        let upserts = desired
            .iter()
            .filter(|(k, v)| self.acked.get(*k) != Some(v))
            .map(|(_, v)| ServiceExport::clone(v))
            .collect();
        let removals = self
            .acked
            .iter()
            .filter(|(k, _)| !desired.contains_key(*k))
            .map(|(_, v)| ServiceKey {
                namespace: v.namespace.clone(),
                name: v.name.clone(),
            })
            .collect();
        let version = self.acked_version.saturating_add(1);
        self.in_flight = Some((version, desired.clone()));
        Some(ExportDelta {
            version,
            full: false,
            upserts,
            removals,
        })
    }
}

fn heard(inner: &Inner) -> std::sync::MutexGuard<'_, crate::Heard> {
    inner.heard.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the federator is connected, in the status, the metrics and the model.
fn set_connected(inner: &Inner, fed: &FederationWriter, up: bool) {
    inner.status().connected = up;
    inner.metrics.connected.set(i64::from(up));
    fed.update(|s| *s.federator_connected = up);
}

fn sequence_of(td: &str, json: &str) -> Option<u64> {
    let d = trust::TrustDomain::new(td).ok()?;
    trust::TrustBundle::from_json(d, json, td).ok()?.sequence
}

/// A peer bundle whose sequence is lower than the one held for its trust domain is not
/// installed: the held one stays (it replaces the regressed one in `d`, so a full resync keeps
/// it too). Returns (trust domain, received sequence, held sequence) of each one refused.
fn keep_newer_bundles(
    held: &BTreeMap<String, String>,
    d: &mut ImportDelta,
) -> Vec<(String, u64, u64)> {
    let mut refused = Vec::new();
    for b in &mut d.bundles {
        let Some(old) = held.get(&b.trust_domain) else {
            continue;
        };
        if let (Some(h), Some(g)) = (
            sequence_of(&b.trust_domain, old),
            sequence_of(&b.trust_domain, &b.bundle_json),
        ) {
            if g < h {
                refused.push((b.trust_domain.clone(), g, h));
                b.bundle_json = old.clone();
            }
        }
    }
    refused
}

fn apply_to_model(inner: &Inner, fed: &FederationWriter, d: &ImportDelta) {
    fed.update(|s| {
        if d.full {
            s.imports.clear();
            s.bundles.clear();
        }
        for r in &d.removals {
            s.imports.remove(&(
                r.source_cluster.clone(),
                meshfed_model::validate::service_key(&r.namespace, &r.name),
            ));
        }
        for u in &d.upserts {
            if let Some(e) = &u.export {
                s.imports.insert(
                    (
                        u.source_cluster.clone(),
                        meshfed_model::validate::service_key(&e.namespace, &e.name),
                    ),
                    Arc::new(e.clone()),
                );
            }
        }
        for td in &d.bundle_removals {
            s.bundles.remove(td);
        }
        for b in &d.bundles {
            s.bundles
                .insert(b.trust_domain.clone(), b.bundle_json.clone());
        }
        *s.applied_revision = d.revision;
    });
    let snap = inner.model.current();
    let mut per_source: BTreeMap<&str, i64> = BTreeMap::new();
    for (src, _) in snap.imports.keys() {
        *per_source.entry(src.as_str()).or_default() += 1;
    }
    inner.metrics.imports.reset();
    for (src, n) in per_source {
        inner.metrics.imports.with_label_values(&[src]).set(n);
    }
    inner.metrics.import_revision.set(d.revision as i64);
}

/// Installs the federation bundle the federator sent (a federation root rotation): the file
/// `identity/federation-bundle.json` (what `meshfed status` and renewals read) and the live
/// verifier of the federator, so a new root is trusted before it signs. A lower sequence than
/// the one held is refused. When the root that signs now is not the one this cluster's
/// certificate chains to, the certificate is renewed at once (onto the new root).
fn install_federation_bundle(
    inner: &Arc<Inner>,
    b: &proto::FederationBundle,
) -> proto::FederationBundleAck {
    let refuse = |sequence: u64, error: String| {
        tracing::warn!(%error, "refused the federation bundle");
        proto::FederationBundleAck { sequence, error }
    };
    let mut id = inner.identity();
    let td = match trust::TrustDomain::new(&id.file.federation_trust_domain) {
        Ok(td) => td,
        Err(e) => return refuse(0, e.to_string()),
    };
    let bundle =
        match trust::TrustBundle::from_json(td.clone(), &b.bundle_json, "federation bundle") {
            Ok(b) if !b.x509_authorities.is_empty() => b,
            Ok(_) => return refuse(0, "the federation bundle holds no root".into()),
            Err(e) => return refuse(0, e.to_string()),
        };
    let (got, held) = (
        bundle.sequence.unwrap_or(0),
        id.federation_bundle.sequence.unwrap_or(0),
    );
    if got < held {
        inner
            .metrics
            .bundle_regressions
            .with_label_values(&[td.as_str()])
            .inc();
        return refuse(
            got,
            format!("federation bundle sequence {got} is lower than the held {held}"),
        );
    }
    if bundle != id.federation_bundle {
        let path = id.dir.join("federation-bundle.json");
        let written = bundle.to_json().map_err(anyhow::Error::from).and_then(|j| {
            trust::files::write_atomic(&path, j.as_bytes(), trust::files::PUBLIC_MODE)
                .map_err(anyhow::Error::from)
        });
        if let Err(e) = written {
            return refuse(got, format!("cannot store the federation bundle: {e:#}"));
        }
        if let Err(e) = inner.federator_verifier.store().update(bundle.clone()) {
            return refuse(got, format!("cannot install the federation bundle: {e}"));
        }
        tracing::info!(
            sequence = got,
            roots = bundle.x509_authorities.len(),
            "installed a new federation bundle"
        );
        id.federation_bundle = bundle.clone();
    }
    drop(id);
    // Renew onto the signing root when the cluster certificate chains elsewhere.
    let signer = bundle
        .x509_authorities
        .iter()
        .find(|r| trust::keys::fingerprint(r) == b.signer_root_sha256);
    if let (Some(root), Some(cert)) = (signer, inner.cluster_cert.current()) {
        let mut only = trust::BundleSet::new();
        let one = trust::TrustBundle {
            x509_authorities: vec![root.clone()],
            ..bundle.clone()
        };
        if only.insert(one).is_ok() {
            let v = trust::tls::SpiffeVerifier::new(
                trust::TrustStore::new(only),
                trust::tls::Authorizer::id(cert.id.clone()),
            );
            let chains = v
                .verify(
                    &cert.chain[0],
                    &cert.chain[1..],
                    rustls_pki_types::UnixTime::now(),
                    trust::tls::PeerRole::Client,
                )
                .is_ok();
            if !chains {
                tracing::info!(
                    "a new federation root signs: renewing the cluster certificate onto it"
                );
                inner.cluster_cert.renew_soon();
            }
        }
    }
    proto::FederationBundleAck {
        sequence: got,
        error: String::new(),
    }
}

async fn session(inner: &Arc<Inner>, fed: &FederationWriter) -> End {
    match session_inner(inner, fed).await {
        Ok(()) => End::Closed,
        Err(e) => e,
    }
}

/// One Sync stream. The stream of the replica that speaks for the cluster ([`speaks`]; the
/// only agent always does) carries the cluster's exports, bundle, heartbeats and
/// acknowledgements of the federation bundle; another replica's is an observer stream
/// (`Hello.observer`): it receives and stores imports, peers and bundles and acknowledges only
/// imports. A change of role ends the stream.
async fn session_inner(inner: &Arc<Inner>, fed: &FederationWriter) -> Result<(), End> {
    let mut role = inner.speaks.subscribe();
    let observer = !*role.borrow_and_update();
    let (cfg, facts, federators, fed_seq) = {
        let id = inner.identity();
        let cfg = trust::tls::client_config(
            inner.cluster_cert.resolver(),
            inner.federator_verifier.clone(),
        )
        .map_err(anyhow::Error::from)?;
        (
            cfg,
            id.facts(),
            id.file.federators.clone(),
            id.federation_bundle.sequence.unwrap_or(0),
        )
    };
    let channel = meshfed_net::channel(federators, cfg, "federator")?;
    let mut client = FederationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (tx, rx) = mpsc::channel(16);
    send(
        &tx,
        Out::Hello(Hello {
            observer,
            facts: Some(facts),
            imports_applied_revision: inner.cache.applied_revision(),
            federation_bundle_sequence: fed_seq,
        }),
    )
    .await?;
    let mut inbound = client
        .sync(ReceiverStream::new(rx))
        .await
        .map_err(status_end)?
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .map_err(|_| End::Failed(anyhow::anyhow!("no welcome from the federator within 10 s")))?
        .map_err(status_end)?;
    heard(inner).federator = Some(Instant::now());
    let welcome = match first.and_then(|m| m.kind) {
        Some(In::Welcome(w)) => w,
        None => return Ok(()),
        Some(_) => {
            return Err(End::Failed(anyhow::anyhow!(
                "the federator did not start with welcome"
            )))
        }
    };
    set_connected(inner, fed, true);
    {
        let mut st = inner.status();
        st.last_error = None;
        st.lease_ttl_ms = welcome.lease_ttl_ms;
    }
    tracing::info!(
        federator_acked = welcome.exports_acked_version,
        observer,
        "connected to the federator"
    );
    let mut bundle_rx = inner.bundle.subscribe();
    let bundle_json = bundle_rx.borrow_and_update().clone();
    if !observer {
        send(&tx, Out::Bundle(BundleUpdate { bundle_json })).await?;
    }

    let acked_version = inner.cache.acked_version();
    let mut ex = Exports {
        acked_version,
        acked: Arc::new(inner.cache.acked_exports()?),
        in_flight: None,
        need_full: welcome.exports_acked_version != acked_version,
        federator_version: welcome.exports_acked_version,
    };
    if ex.need_full {
        tracing::info!(
            federator = welcome.exports_acked_version,
            local = acked_version,
            "export versions differ: sending the full set"
        );
    }
    let mut exports_rx = inner.exports.subscribe();
    let desired = exports_rx.borrow_and_update().clone();
    if !observer {
        if let Some(d) = ex.next(&desired) {
            send_exports(inner, &tx, d).await?;
        }
    }
    let every = Duration::from_millis(welcome.heartbeat_interval_ms.max(100));
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            m = inbound.message() => {
                let Some(msg) = m.map_err(status_end)? else { return Ok(()) };
                heard(inner).federator = Some(Instant::now());
                match msg.kind {
                    Some(In::ExportAck(a)) => {
                        let Some((v, snap)) = ex.in_flight.take() else { continue };
                        if a.version != v {
                            ex.in_flight = Some((v, snap));
                            continue;
                        }
                        if a.error.is_empty() {
                            inner.cache.set_acked(v, &ex.acked, &snap)?;
                            ex.acked_version = v;
                            ex.acked = snap.clone();
                            inner.metrics.export_version_acked.set(v as i64);
                            let mut st = inner.status();
                            st.exports_acked_version = v;
                            inner.exports_acked.send_replace(Some(snap));
                            st.conflicts = a.conflicts.clone();
                            drop(st);
                            for c in &a.conflicts {
                                tracing::warn!(conflict = %c, "export conflict");
                            }
                        } else {
                            tracing::warn!(version = v, error = %a.error, "federator refused an export delta; sending the full set");
                            ex.need_full = true;
                            ex.federator_version = ex.federator_version.max(ex.acked_version);
                        }
                        let desired = exports_rx.borrow_and_update().clone();
                        if let Some(d) = ex.next(&desired) {
                            send_exports(inner, &tx, d).await?;
                        }
                    }
                    Some(In::Imports(mut d)) => {
                        for (td, got, held) in keep_newer_bundles(&inner.model.current().bundles, &mut d) {
                            inner.metrics.bundle_regressions.with_label_values(&[&td]).inc();
                            tracing::warn!(trust_domain = %td, got, held, "refused a peer bundle whose sequence goes back; keeping the one held");
                        }
                        let started = Instant::now();
                        let result = tokio::task::block_in_place(|| inner.cache.apply_imports(&d));
                        inner.metrics.import_apply_seconds.with_label_values(&["imports"]).observe(started.elapsed().as_secs_f64());
                        match result {
                            Ok(()) => {
                                apply_to_model(inner, fed, &d);
                                send(&tx, Out::ImportAck(ImportAck { revision: d.revision, error: String::new() })).await?;
                            }
                            Err(e) => {
                                let error = format!("{e:#}");
                                tracing::warn!(revision = d.revision, %error, "refusing an import delta (NACK)");
                                send(&tx, Out::ImportAck(ImportAck { revision: d.revision, error })).await?;
                            }
                        }
                    }
                    Some(In::Peers(p)) => {
                        {
                            let mut h = heard(inner);
                            let now = Instant::now();
                            for r in &p.removed {
                                h.peers.remove(r);
                            }
                            for peer in &p.peers {
                                if let Some(f) = &peer.facts {
                                    h.peers.insert(f.cluster_id.clone(), now);
                                }
                            }
                        }
                        inner.cache.set_peers(&p)?;
                        fed.update(|s| {
                            for r in &p.removed {
                                s.peers.remove(r);
                            }
                            for peer in &p.peers {
                                if let Some(f) = &peer.facts {
                                    s.peers.insert(f.cluster_id.clone(), peer.clone());
                                }
                            }
                        });
                    }
                    Some(In::FederationBundle(b)) => {
                        let ack = tokio::task::block_in_place(|| install_federation_bundle(inner, &b));
                        // The leader's acknowledgement speaks for the cluster; an observer's may not.
                        if !observer {
                            send(&tx, Out::FederationBundleAck(ack)).await?;
                        }
                    }
                    Some(In::Endpoints(e)) => {
                        let mut id = inner.identity();
                        match tokio::task::block_in_place(|| id.set_federators(&e.addresses)) {
                            Ok(true) => tracing::info!(addresses = ?id.file.federators, "the federation's addresses changed; dialling these from the next connection"),
                            Ok(false) => {}
                            Err(e) => tracing::warn!(error = %format!("{e:#}"), "ignored the federator addresses the federator sent"),
                        }
                    }
                    Some(In::Welcome(_)) | None => {}
                }
            }
            r = role.changed() => {
                if r.is_err() || *role.borrow_and_update() == observer {
                    return Err(End::RoleChanged);
                }
            }
            r = exports_rx.changed(), if !observer => {
                if r.is_err() { return Ok(()); }
                let desired = exports_rx.borrow_and_update().clone();
                if let Some(d) = ex.next(&desired) {
                    send_exports(inner, &tx, d).await?;
                }
            }
            r = bundle_rx.changed(), if !observer => {
                if r.is_err() { return Ok(()); }
                let bundle_json = bundle_rx.borrow_and_update().clone();
                send(&tx, Out::Bundle(BundleUpdate { bundle_json })).await?;
            }
            _ = heartbeat.tick(), if !observer => {
                send(&tx, Out::Heartbeat(Heartbeat {})).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle(ca: &trust::CertificateAuthority, seq: u64) -> String {
        let mut b = ca.bundle();
        b.sequence = Some(seq);
        b.to_json().unwrap()
    }

    #[test]
    fn a_peer_bundle_whose_sequence_goes_back_is_not_installed() {
        let td = trust::TrustDomain::new("west.mesh").unwrap();
        let ca = trust::CertificateAuthority::create(td, trust::ca::CaOptions::default()).unwrap();
        let held: BTreeMap<String, String> = [("west.mesh".to_string(), bundle(&ca, 5))].into();
        let mut d = ImportDelta {
            bundles: vec![proto::PeerBundle {
                trust_domain: "west.mesh".into(),
                bundle_json: bundle(&ca, 4),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            keep_newer_bundles(&held, &mut d),
            vec![("west.mesh".to_string(), 4, 5)]
        );
        assert_eq!(d.bundles[0].bundle_json, held["west.mesh"]);
        // A newer one, or one for a domain not held yet, goes in.
        let newer = bundle(&ca, 6);
        let mut d = ImportDelta {
            bundles: vec![
                proto::PeerBundle {
                    trust_domain: "west.mesh".into(),
                    bundle_json: newer.clone(),
                    ..Default::default()
                },
                proto::PeerBundle {
                    trust_domain: "eu.mesh".into(),
                    bundle_json: "{}".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        assert!(keep_newer_bundles(&held, &mut d).is_empty());
        assert_eq!(d.bundles[0].bundle_json, newer);
    }

    fn svc(name: &str, port: u32) -> (String, Arc<ServiceExport>) {
        (
            format!("shop/{name}"),
            Arc::new(ServiceExport {
                namespace: "shop".into(),
                name: name.into(),
                ports: vec![proto::Port {
                    name: "http".into(),
                    port,
                    protocol: "TCP".into(),
                    app_protocol: String::new(),
                }],
                ..Default::default()
            }),
        )
    }

    #[test]
    fn a_replica_speaks_while_it_leads_or_last_held_the_lease_and_was_not_replaced() {
        use meshfed_kube::leader::Leadership;
        let leader = Leadership {
            leader: true,
            held_last: true,
            ..Default::default()
        };
        assert!(speaks(&leader, false) && speaks(&leader, true));
        // Stepped down (the API is unreachable), nobody else known: still speaks...
        let stepped = Leadership {
            leader: false,
            ..leader.clone()
        };
        assert!(speaks(&stepped, false));
        // ...until another replica's stream replaced its own.
        assert!(!speaks(&stepped, true));
        // A follower that read another holder does not.
        let follower = Leadership {
            holder: Some("agent-1".into()),
            held_last: false,
            ..stepped
        };
        assert!(!speaks(&follower, false));
        assert_ne!(role_key(&leader), role_key(&follower));
    }

    #[test]
    fn deltas_against_the_acknowledged_set() {
        let acked: Arc<BTreeMap<_, _>> = Arc::new([svc("a", 1), svc("b", 2)].into_iter().collect());
        let mut ex = Exports {
            acked_version: 4,
            acked: acked.clone(),
            in_flight: None,
            need_full: false,
            federator_version: 4,
        };
        assert!(
            ex.next(&acked).is_none(),
            "nothing is sent when nothing changed"
        );
        let desired: Arc<BTreeMap<_, _>> = Arc::new(
            [svc("a", 1), svc("b", 3), svc("c", 4)]
                .into_iter()
                .collect(),
        );
        let d = ex.next(&desired).unwrap();
        assert_eq!(d.version, 5);
        assert!(!d.full);
        assert_eq!(d.upserts.len(), 2);
        assert!(ex.next(&desired).is_none(), "one delta in flight at a time");
        let mut ex = Exports {
            acked_version: 4,
            acked,
            in_flight: None,
            need_full: false,
            federator_version: 4,
        };
        let only_a: Arc<BTreeMap<_, _>> = Arc::new([svc("a", 1)].into_iter().collect());
        let d = ex.next(&only_a).unwrap();
        assert_eq!(d.removals.len(), 1);
        assert_eq!(d.removals[0].name, "b");
        let mut ex = Exports {
            acked_version: 2,
            acked: Default::default(),
            in_flight: None,
            need_full: true,
            federator_version: 7,
        };
        let d = ex.next(&only_a).unwrap();
        assert!(d.full);
        assert_eq!(d.version, 8);
    }
}
