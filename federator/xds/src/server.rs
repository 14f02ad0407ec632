//! The ADS service: one task per stream (SotW or Delta), woken by requests and by new
//! generations. A resource is sent only when its content hash differs from what the proxy last
//! received; ACKs and NACKs are recorded per proxy and type.

use meshfed_net::drain::Signal;
use std::collections::{BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use prometheus::{HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::generation::Generation;
use super::node::{LocalFacts, ProxyNode};
use super::resources::SharedRes;
use super::secrets::{Issued, Secrets, CERT_SECRET, ROOT_SECRET};
use super::status::{Conn, Registry, TypeState};
use super::Kind;

pub use super::transport::MAX_REQUEST_BYTES;
/// Largest number of names one request may subscribe to.
pub const MAX_NAMES: usize = 100_000;
/// Most bytes of responses one stream may have waiting for its client: several full pushes
/// of a 10,000-service mesh.
pub const MAX_QUEUED_BYTES: usize = 256 << 20;

#[derive(Debug, Clone)]
pub struct XdsMetrics {
    pub proxies: IntGauge,
    pub pushes: IntCounterVec,
    pub resources_sent: IntCounterVec,
    pub nacks: IntCounterVec,
    pub refused: IntCounterVec,
    pub build_seconds: HistogramVec,
    pub build_failures: IntCounter,
    pub generation: IntGauge,
}

use meshfed_net::metrics::must;

impl XdsMetrics {
    pub fn new(reg: &prometheus::Registry) -> XdsMetrics {
        let m = XdsMetrics {
            proxies: must(IntGauge::new(
                "meshfed_xds_connected_proxies",
                "ADS streams currently open",
            )),
            pushes: must(IntCounterVec::new(
                Opts::new("meshfed_xds_pushes_total", "xDS responses sent, by type"),
                &["kind"],
            )),
            resources_sent: must(IntCounterVec::new(
                Opts::new(
                    "meshfed_xds_resources_sent_total",
                    "Resources carried by xDS responses, by type",
                ),
                &["kind"],
            )),
            nacks: must(IntCounterVec::new(
                Opts::new(
                    "meshfed_xds_nacks_total",
                    "xDS responses a proxy rejected, by type",
                ),
                &["kind"],
            )),
            refused: must(IntCounterVec::new(
                Opts::new(
                    "meshfed_xds_refused_total",
                    "ADS streams refused, by reason",
                ),
                &["reason"],
            )),
            build_seconds: must(HistogramVec::new(
                HistogramOpts::new(
                    "meshfed_xds_generation_build_seconds",
                    "Time to compute a generation of xDS resources",
                )
                .buckets(vec![0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
                &["kind"],
            )),
            build_failures: must(IntCounter::new(
                "meshfed_xds_generation_build_failures_total",
                "Generations whose build failed; the last good generation stayed in service",
            )),
            generation: must(IntGauge::new(
                "meshfed_xds_generation",
                "The xDS generation being served",
            )),
        };
        for c in [
            Box::new(m.proxies.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.pushes.clone()),
            Box::new(m.resources_sent.clone()),
            Box::new(m.nacks.clone()),
            Box::new(m.refused.clone()),
            Box::new(m.build_seconds.clone()),
            Box::new(m.build_failures.clone()),
            Box::new(m.generation.clone()),
        ] {
            // Registering twice (several agents in one process share nothing, so this cannot
            // collide) would be a programming error.
            let _ = reg.register(c);
        }
        m
    }
}

/// Shared by every stream.
#[derive(Debug)]
pub struct XdsState {
    pub gens: watch::Sender<Arc<Generation>>,
    pub proxies: Registry,
    pub local: LocalFacts,
    pub metrics: XdsMetrics,
    /// SDS: `ROOTCA` and the workload certificates.
    pub secrets: Secrets,
}

impl XdsState {
    pub fn new(local: LocalFacts, reg: &prometheus::Registry) -> Arc<XdsState> {
        Arc::new(XdsState {
            gens: watch::Sender::new(Arc::new(Generation::empty(&local))),
            proxies: Registry::default(),
            local,
            metrics: XdsMetrics::new(reg),
            secrets: Secrets::default(),
        })
    }

    pub fn current(&self) -> Arc<Generation> {
        self.gens.borrow().clone()
    }
}

#[derive(Debug, Clone)]
pub struct Ads {
    state: Arc<XdsState>,
    /// Clients must present an SVID (the mTLS port).
    mtls: bool,
    /// Streams end with UNAVAILABLE when the process drains.
    drain: Signal,
}

impl Ads {
    /// The service to add to a tonic server (small per-stream buffers, see `transport`).
    pub fn server(
        state: Arc<XdsState>,
        mtls: bool,
        drain: Signal,
    ) -> super::transport::AdsService<Ads> {
        super::transport::AdsService::new(Ads { state, mtls, drain })
    }

    /// The same with envoy-types' generated glue and tonic's default buffers.
    pub fn generated_server(
        state: Arc<XdsState>,
        mtls: bool,
        drain: Signal,
    ) -> AggregatedDiscoveryServiceServer<Ads> {
        AggregatedDiscoveryServiceServer::new(Ads { state, mtls, drain })
            .max_decoding_message_size(MAX_REQUEST_BYTES)
            .max_encoding_message_size(256 * 1024 * 1024)
    }

    fn peer<T>(
        &self,
        req: &Request<T>,
    ) -> Result<(Option<trust::SpiffeId>, Option<std::net::SocketAddr>), Status> {
        let info = req.extensions().get::<meshfed_net::PeerInfo>();
        let remote = info.and_then(|i| i.remote).or_else(|| req.remote_addr());
        if !self.mtls {
            return Ok((None, remote));
        }
        let id = info
            .and_then(|i| trust::tls::peer_id(i.certs.as_deref().map(|c| c.as_slice())))
            .ok_or_else(|| {
                self.state
                    .metrics
                    .refused
                    .with_label_values(&["no_identity"])
                    .inc();
                Status::unauthenticated("this port serves only clients that present an SVID")
            })?;
        Ok((Some(id), remote))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Ads {
    /// Opens one stream (ADS, or SDS with `only` = secrets): the peer is checked, the stream
    /// runs in its own task.
    fn open<V: Variant + 'static>(
        &self,
        req: Request<Streaming<V::Req>>,
        only: Option<Kind>,
    ) -> Result<Response<BoxStream<V::Resp>>, Status>
    where
        V::Req: prost::Message + Default,
    {
        let (peer_id, remote) = self.peer(&req)?;
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(drive::<V>(
            self.state.clone(),
            req.into_inner(),
            tx,
            peer_id,
            remote,
            self.drain.clone(),
            only,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = BoxStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        self.open::<SotwAds>(req, None)
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        self.open::<DeltaAds>(req, None)
    }
}

/// The Secret Discovery Service (`envoy.service.secret.v3.SecretDiscoveryService`): what an
/// Envoy's `sds-grpc` cluster talks to when it points at the agent. The streams are ADS streams
/// restricted to secrets (the same subscriptions, ACKs, NACKs and renewals).
#[derive(Debug, Clone)]
pub struct Sds {
    ads: Ads,
}

impl Sds {
    pub fn server(
        state: Arc<XdsState>,
        mtls: bool,
        drain: Signal,
    ) -> SecretDiscoveryServiceServer<Sds> {
        SecretDiscoveryServiceServer::new(Sds {
            ads: Ads { state, mtls, drain },
        })
        .max_decoding_message_size(MAX_REQUEST_BYTES)
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;

    async fn stream_secrets(
        &self,
        req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        self.ads.open::<SotwAds>(req, Some(Kind::Secret))
    }

    async fn delta_secrets(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        self.ads.open::<DeltaAds>(req, Some(Kind::Secret))
    }

    /// One-shot fetch: the named secrets as they are now (same identity rules as the streams).
    async fn fetch_secrets(
        &self,
        req: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let (peer_id, _) = self.ads.peer(&req)?;
        let state = &self.ads.state;
        let r = req.into_inner();
        if r.type_url != Kind::Secret.url() {
            return Err(Status::invalid_argument(format!(
                "FetchSecrets serves {}, not {:?}",
                Kind::Secret.url(),
                r.type_url
            )));
        }
        check_names(&r.resource_names)?;
        let node = r.node.as_ref().ok_or_else(|| {
            Status::invalid_argument("a FetchSecrets request must carry the node")
        })?;
        let node = ProxyNode::from_node(node, &state.local).map_err(Status::invalid_argument)?;
        check_identity(&node, peer_id.as_ref(), &state.local)
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        let root = state.secrets.root().borrow().clone();
        let mut cert = None;
        if r.resource_names.iter().any(|n| n == CERT_SECRET) {
            let id = peer_id.as_ref().ok_or_else(|| {
                Status::permission_denied(
                    "this port checks no identity and serves no workload certificate; use the mTLS port",
                )
            })?;
            cert = Some(
                state
                    .secrets
                    .cert_for(id)
                    .map_err(Status::failed_precondition)?,
            );
        }
        let world = World {
            gen: &state.current(),
            root: root.as_ref(),
            cert: cert.as_ref().map(|c| &c.res),
        };
        let found: Vec<SharedRes> = r
            .resource_names
            .iter()
            .filter_map(|n| world.get(Kind::Secret, n, &node))
            .collect();
        Ok(Response::new(DiscoveryResponse {
            version_info: world.version(Kind::Secret, &found.iter().collect::<Vec<_>>()),
            resources: found.iter().map(|r| r.any.clone()).collect(),
            type_url: Kind::Secret.url().to_string(),
            ..Default::default()
        }))
    }
}

/// Why a client on the mTLS port may not speak for the node it names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("{id} belongs to trust domain {td}; this agent serves {serves}")]
    OtherTrustDomain {
        id: String,
        td: String,
        serves: String,
    },
    #[error("node.metadata.NAMESPACE is {node:?} but the client certificate {id} is for namespace {cert:?}")]
    OtherNamespace {
        id: String,
        node: String,
        cert: String,
    },
}

/// A client on the mTLS port may only speak for its own trust domain and namespace.
fn check_identity(
    node: &ProxyNode,
    peer_id: Option<&trust::SpiffeId>,
    local: &LocalFacts,
) -> Result<(), IdentityError> {
    let Some(id) = peer_id else { return Ok(()) };
    if id.trust_domain_str() != local.trust_domain {
        return Err(IdentityError::OtherTrustDomain {
            id: id.to_string(),
            td: id.trust_domain_str().to_string(),
            serves: local.trust_domain.clone(),
        });
    }
    let ns = id
        .path()
        .strip_prefix("/ns/")
        .and_then(|p| p.split('/').next());
    if let (Some(ns), false) = (ns, node.namespace.is_empty()) {
        if ns != node.namespace {
            return Err(IdentityError::OtherNamespace {
                id: id.to_string(),
                node: node.namespace.clone(),
                cert: ns.to_string(),
            });
        }
    }
    Ok(())
}

/// Removes the stream from the registry however the task ends.
struct Registered {
    state: Arc<XdsState>,
    conn: Arc<Conn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.state.proxies.remove(self.conn.conn_id);
        self.state.metrics.proxies.dec();
        tracing::debug!(proxy = %self.conn.node.id, "ADS stream closed");
    }
}

fn register(
    state: &Arc<XdsState>,
    node: Option<&envoy_types::pb::envoy::config::core::v3::Node>,
    peer_id: Option<trust::SpiffeId>,
    remote: Option<std::net::SocketAddr>,
    delta: bool,
) -> Result<Registered, Status> {
    let node = node.ok_or_else(|| {
        state.metrics.refused.with_label_values(&["no_node"]).inc();
        Status::invalid_argument("the first request of an ADS stream must carry the node")
    })?;
    let node = ProxyNode::from_node(node, &state.local).map_err(|e| {
        state.metrics.refused.with_label_values(&["bad_node"]).inc();
        Status::invalid_argument(e)
    })?;
    check_identity(&node, peer_id.as_ref(), &state.local).map_err(|e| {
        state.metrics.refused.with_label_values(&["identity"]).inc();
        Status::permission_denied(e.to_string())
    })?;
    tracing::info!(proxy = %node.id, flavor = ?node.flavor, locality = %node.locality, network = %node.network, delta, "ADS stream opened");
    let conn = state
        .proxies
        .add(node, peer_id.map(|i| i.to_string()), remote, delta);
    state.metrics.proxies.inc();
    Ok(Registered {
        state: state.clone(),
        conn,
    })
}

/// What one stream can be sent now: the generation every proxy shares, and the secrets of
/// this stream's identity (`ROOTCA` for everyone, `default` only for an authenticated proxy).
#[derive(Debug)]
pub struct World<'a> {
    pub gen: &'a Generation,
    pub root: Option<&'a SharedRes>,
    pub cert: Option<&'a SharedRes>,
}

impl World<'_> {
    fn get(&self, kind: Kind, name: &str, p: &ProxyNode) -> Option<SharedRes> {
        match kind {
            Kind::Secret => match name {
                ROOT_SECRET => self.root.cloned(),
                CERT_SECRET => self.cert.cloned(),
                _ => None,
            },
            _ => self.gen.get(kind, name, p),
        }
    }

    fn all(&self, kind: Kind, p: &ProxyNode) -> Vec<SharedRes> {
        self.gen.all(kind, p)
    }

    /// The version sent for a type: the generation's, or for secrets (which change between
    /// generations) a digest of what is sent.
    fn version(&self, kind: Kind, sent: &[&SharedRes]) -> String {
        if kind == Kind::Secret {
            let mut h = 0u64;
            for r in sent {
                h = h.rotate_left(7) ^ r.hash;
            }
            format!("{h:016x}")
        } else {
            self.gen.version.to_string()
        }
    }
}

/// What a proxy should hold of one type now.
fn wanted(gen: &World, kind: Kind, st: &TypeState, p: &ProxyNode) -> Vec<SharedRes> {
    let mut out = if st.wildcard {
        gen.all(kind, p)
    } else {
        Vec::new()
    };
    for n in &st.names {
        if n == "*" || (st.wildcard && out.iter().any(|r| &*r.name == n)) {
            continue;
        }
        if let Some(r) = gen.get(kind, n, p) {
            out.push(r);
        }
    }
    out
}

fn check_names(names: &[String]) -> Result<(), Status> {
    if names.len() > MAX_NAMES {
        return Err(Status::invalid_argument(format!(
            "{} resource names in one request; at most {MAX_NAMES}",
            names.len()
        )));
    }
    if let Some(n) = names.iter().find(|n| n.len() > 1024) {
        return Err(Status::invalid_argument(format!(
            "a resource name of {} bytes; at most 1024",
            n.len()
        )));
    }
    Ok(())
}

/// Builds the SotW response for one type, if one is due. `force`: the client (re)subscribed
/// and must get a response even if nothing changed.
fn sotw_response(
    gen: &World,
    kind: Kind,
    st: &mut TypeState,
    p: &ProxyNode,
    force: bool,
    nonce: &mut u64,
) -> Vec<DiscoveryResponse> {
    let want = wanted(gen, kind, st, p);
    let send: Vec<SharedRes> = if kind.wildcard_capable() {
        // State of the world: the whole set, when any member or the membership changed.
        let same = want.len() == st.sent.len()
            && want
                .iter()
                .all(|r| st.sent.get(&r.name).is_some_and(|s| s.hash == r.hash));
        if same && !force {
            return Vec::new();
        }
        st.sent = want.iter().map(|r| (r.name.clone(), r.clone())).collect();
        want
    } else {
        let names: BTreeSet<&str> = want.iter().map(|r| &*r.name).collect();
        st.sent
            .retain(|k, _| names.contains(&**k) || st.names.contains(&**k));
        let changed: Vec<SharedRes> = want
            .into_iter()
            .filter(|r| st.sent.get(&r.name).is_none_or(|s| s.hash != r.hash))
            .collect();
        if changed.is_empty() {
            return Vec::new();
        }
        for r in &changed {
            st.sent.insert(r.name.clone(), r.clone());
        }
        changed
    };
    st.version = gen.version(kind, &st.sent.values().collect::<Vec<_>>());
    st.sent_at = Some(Instant::now());
    // Routes and endpoints go in several responses (omitting one does not delete it): of
    // CHUNK_BYTES, which keeps each stream's encode buffer small, or, for a push larger than
    // MAX_CHUNKS of those, in MAX_CHUNKS responses, so that a proxy does not answer a big push
    // with thousands of ACKs that each repeat every name it subscribes to. Listeners and
    // clusters are state of the world and go in one.
    let chunks: Vec<Vec<SharedRes>> = if kind.wildcard_capable() {
        vec![send]
    } else {
        let total: usize = send.iter().map(|r| r.any.value.len()).sum();
        let limit = CHUNK_BYTES.max(total.div_ceil(MAX_CHUNKS));
        let mut chunks = vec![Vec::new()];
        let mut size = 0;
        for r in send {
            let len = r.any.value.len();
            if size + len > limit
                && chunks.len() < MAX_CHUNKS
                && chunks.last().is_some_and(|c| !c.is_empty())
            {
                chunks.push(Vec::new());
                size = 0;
            }
            size += len;
            if let Some(c) = chunks.last_mut() {
                c.push(r);
            }
        }
        chunks
    };
    chunks
        .into_iter()
        .map(|c| {
            *nonce += 1;
            st.nonce = nonce.to_string();
            DiscoveryResponse {
                version_info: st.version.clone(),
                resources: c.iter().map(|r| r.any.clone()).collect(),
                type_url: kind.url().to_string(),
                nonce: st.nonce.clone(),
                ..Default::default()
            }
        })
        .collect()
}

/// Target size of one RDS/EDS response.
pub const CHUNK_BYTES: usize = 4 * 1024;
/// Most RDS/EDS responses one push is cut into (each then larger than CHUNK_BYTES).
pub const MAX_CHUNKS: usize = 16;

fn count(state: &XdsState, kind: Kind, n: usize) {
    state
        .metrics
        .pushes
        .with_label_values(&[kind.short()])
        .inc();
    state
        .metrics
        .resources_sent
        .with_label_values(&[kind.short()])
        .inc_by(n as u64);
}

fn record_ack(
    state: &XdsState,
    conn: &Conn,
    kind: Kind,
    st: &mut TypeState,
    nonce: &str,
    version: &str,
    error: Option<String>,
) {
    match error {
        Some(e) => {
            state.metrics.nacks.with_label_values(&[kind.short()]).inc();
            tracing::warn!(proxy = %conn.node.id, kind = kind.short(), nonce, error = %e, "proxy rejected a response (NACK)");
            st.nack = Some(e);
            st.nacks += 1;
        }
        None => {
            st.acked_version = version.to_string();
            st.acked_nonce = nonce.to_string();
            st.nack = None;
        }
    }
    state.proxies.notify();
}

/// One ADS variant (SotW or Delta): how a request changes a proxy's subscriptions and what is
/// sent, for the one stream driver below.
trait Variant {
    type Req: Send + 'static;
    type Resp: prost::Message + Send + 'static;
    const DELTA: bool;
    fn node(r: &Self::Req) -> Option<&Node>;
    /// Applies a request; an error ends the stream with that status.
    fn request(
        state: &XdsState,
        conn: &Conn,
        gen: &World,
        req: Self::Req,
        nonce: &mut u64,
    ) -> Result<Vec<(Kind, Self::Resp)>, Status>;
    /// What one subscribed type needs after a new generation.
    fn push(
        gen: &World,
        kind: Kind,
        st: &mut TypeState,
        p: &ProxyNode,
        nonce: &mut u64,
    ) -> Vec<Self::Resp>;
    fn resources(r: &Self::Resp) -> usize;
    fn type_url(r: &Self::Req) -> &str;
    /// Whether the request subscribes to `name`.
    fn names(r: &Self::Req, name: &str) -> bool;
}

/// A stream's own secrets: `ROOTCA` as last published, and its workload certificate once
/// it asked for one.
struct StreamSecrets {
    root_rx: watch::Receiver<Option<SharedRes>>,
    root: Option<SharedRes>,
    epoch: watch::Receiver<u64>,
    cert: Option<Issued>,
    /// Set once the stream asked for `default` (and renewals follow).
    wants_cert: bool,
    refused: bool,
}

impl StreamSecrets {
    fn new(s: &Secrets) -> StreamSecrets {
        let mut root_rx = s.root();
        let root = root_rx.borrow_and_update().clone();
        let mut epoch = s.epoch();
        epoch.borrow_and_update();
        StreamSecrets {
            root_rx,
            root,
            epoch,
            cert: None,
            wants_cert: false,
            refused: false,
        }
    }

    /// Issues (or takes the shared) certificate for the stream's identity. The plaintext port
    /// has none, so it is never sent a certificate.
    fn ensure_cert(&mut self, state: &XdsState, conn: &Conn, peer: Option<&trust::SpiffeId>) {
        self.wants_cert = true;
        let Some(id) = peer else {
            if !std::mem::replace(&mut self.refused, true) {
                state
                    .metrics
                    .refused
                    .with_label_values(&["secret_without_identity"])
                    .inc();
                tracing::warn!(proxy = %conn.node.id, "a proxy asked for its certificate (SDS {CERT_SECRET:?}) on the plaintext port, which checks no identity; connect to the mTLS port");
            }
            return;
        };
        match state.secrets.cert_for(id) {
            Ok(c) => self.cert = Some(c),
            Err(e) => {
                self.cert = None;
                tracing::warn!(proxy = %conn.node.id, error = %e, "no workload certificate for this proxy");
            }
        }
    }

    /// When the held certificate is due for renewal.
    fn renew_at(&self) -> Option<tokio::time::Instant> {
        let c = self.cert.as_ref()?;
        let left = c.renew_at - time::OffsetDateTime::now_utc();
        let left = std::time::Duration::try_from(left).unwrap_or_default();
        Some(tokio::time::Instant::now() + left)
    }
}

/// Ends a stream with `status`, waiting at most 5 s for room in its queue: a client that
/// stopped reading gets its stream closed (without the status) rather than a task forever.
async fn final_status<T>(tx: &mpsc::Sender<Result<T, Status>>, status: Status) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tx.send(Err(status))).await;
}

/// Runs one ADS (or SDS) stream: the first request names the node; then requests, new
/// generations and new secrets are handled in turn, and the responses they produce are sent in
/// order. `only` restricts the stream to one type (SDS streams: secrets).
async fn drive<V: Variant>(
    state: Arc<XdsState>,
    mut inbound: Streaming<V::Req>,
    tx: mpsc::Sender<Result<V::Resp, Status>>,
    peer_id: Option<trust::SpiffeId>,
    remote: Option<std::net::SocketAddr>,
    drain: Signal,
    only: Option<Kind>,
) {
    let first = match inbound.message().await {
        Ok(Some(m)) => m,
        _ => return,
    };
    let reg = match register(&state, V::node(&first), peer_id.clone(), remote, V::DELTA) {
        Ok(r) => r,
        Err(s) => {
            let _ = tx.send(Err(s)).await;
            return;
        }
    };
    let conn = reg.conn.clone();
    let mut gens = state.gens.subscribe();
    let mut gen = gens.borrow_and_update().clone();
    let mut sec = StreamSecrets::new(&state.secrets);
    let mut nonce = 0u64;
    let mut pending = Some(first);
    // Responses waiting for the client to take them. Requests are read while they wait (a
    // client that ACKs every response and blocks when its send window is full would
    // otherwise deadlock with a server that only writes); new generations and secrets wait
    // until the queue is empty, so it holds at most one push plus the answers to requests.
    let mut queue: VecDeque<(Kind, V::Resp, usize)> = VecDeque::new();
    let mut queued_bytes = 0usize;
    loop {
        let renew = sec.renew_at();
        let idle = queue.is_empty();
        let req = match pending.take() {
            Some(r) => Some(r),
            None => tokio::select! {
                permit = tx.reserve(), if !idle => {
                    let Ok(permit) = permit else { return };
                    if let Some((kind, r, len)) = queue.pop_front() {
                        queued_bytes = queued_bytes.saturating_sub(len);
                        count(&state, kind, V::resources(&r));
                        permit.send(Ok(r));
                    }
                    continue;
                }
                _ = drain.drained() => {
                    final_status(&tx, Status::unavailable("the agent is shutting down")).await;
                    break;
                }
                m = inbound.message() => match m {
                    Ok(Some(r)) => Some(r),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(proxy = %conn.node.id, error = %e, "ADS stream ended");
                        break;
                    }
                },
                c = gens.changed(), if idle => {
                    if c.is_err() {
                        break;
                    }
                    gen = gens.borrow_and_update().clone();
                    None
                }
                c = sec.root_rx.changed(), if idle => {
                    if c.is_err() {
                        break;
                    }
                    sec.root = sec.root_rx.borrow_and_update().clone();
                    None
                }
                c = sec.epoch.changed(), if idle && sec.wants_cert => {
                    if c.is_err() {
                        break;
                    }
                    sec.epoch.borrow_and_update();
                    sec.ensure_cert(&state, &conn, peer_id.as_ref());
                    None
                }
                _ = tokio::time::sleep_until(renew.unwrap_or_else(tokio::time::Instant::now)), if idle && renew.is_some() => {
                    sec.ensure_cert(&state, &conn, peer_id.as_ref());
                    None
                }
            },
        };
        let out = match req {
            Some(req) => {
                let url = V::type_url(&req);
                if only.is_some_and(|k| k.url() != url) {
                    tracing::debug!(proxy = %conn.node.id, type_url = url, "ignoring a request for another type on an SDS stream");
                    continue;
                }
                if url == Kind::Secret.url() && V::names(&req, CERT_SECRET) && sec.cert.is_none() {
                    sec.ensure_cert(&state, &conn, peer_id.as_ref());
                }
                let world = World {
                    gen: &gen,
                    root: sec.root.as_ref(),
                    cert: sec.cert.as_ref().map(|c| &c.res),
                };
                match V::request(&state, &conn, &world, req, &mut nonce) {
                    Ok(out) => out,
                    Err(s) => {
                        final_status(&tx, s).await;
                        break;
                    }
                }
            }
            None => {
                let world = World {
                    gen: &gen,
                    root: sec.root.as_ref(),
                    cert: sec.cert.as_ref().map(|c| &c.res),
                };
                let mut types = conn.types();
                let mut out = Vec::new();
                for kind in Kind::ALL {
                    if let Some(st) = types.get_mut(&kind).filter(|s| s.subscribed) {
                        for r in V::push(&world, kind, st, &conn.node, &mut nonce) {
                            out.push((kind, r));
                        }
                    }
                }
                out
            }
        };
        for (kind, r) in out {
            let len = prost::Message::encoded_len(&r);
            queued_bytes += len;
            queue.push_back((kind, r, len));
        }
        if queued_bytes > MAX_QUEUED_BYTES {
            // Only a client that keeps changing its subscriptions without reading gets here.
            state
                .metrics
                .refused
                .with_label_values(&["send_queue_full"])
                .inc();
            tracing::warn!(proxy = %conn.node.id, queued_bytes, "ending an ADS stream whose client does not read its responses");
            final_status(
                &tx,
                Status::resource_exhausted(format!(
                    "more than {MAX_QUEUED_BYTES} bytes of responses wait for this stream's client to read them"
                )),
            )
            .await;
            break;
        }
    }
    drop(reg);
}

fn served_kind(conn: &Conn, type_url: &str) -> Option<Kind> {
    let k = Kind::from_url(type_url);
    if k.is_none() {
        tracing::debug!(proxy = %conn.node.id, type_url, "ignoring a request for a type meshfed does not serve");
    }
    k
}

struct SotwAds;

impl Variant for SotwAds {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    const DELTA: bool = false;

    fn node(r: &DiscoveryRequest) -> Option<&Node> {
        r.node.as_ref()
    }

    fn request(
        state: &XdsState,
        conn: &Conn,
        gen: &World,
        req: DiscoveryRequest,
        nonce: &mut u64,
    ) -> Result<Vec<(Kind, DiscoveryResponse)>, Status> {
        let Some(kind) = served_kind(conn, &req.type_url) else {
            return Ok(Vec::new());
        };
        check_names(&req.resource_names)?;
        let mut types = conn.types();
        let st = types.entry(kind).or_default();
        if !req.response_nonce.is_empty() {
            if req.response_nonce != st.nonce {
                // An answer to an older response; a newer one is on its way.
                return Ok(Vec::new());
            }
            record_ack(
                state,
                conn,
                kind,
                st,
                &req.response_nonce,
                &req.version_info,
                req.error_detail.map(|e| e.message),
            );
        }
        let names: BTreeSet<String> = req.resource_names.into_iter().collect();
        let wildcard = kind.wildcard_capable() && (names.is_empty() || names.contains("*"));
        let force = !st.subscribed || req.response_nonce.is_empty();
        let changed = force || names != st.names || wildcard != st.wildcard;
        st.subscribed = true;
        st.names = names;
        st.wildcard = wildcard;
        if !changed {
            return Ok(Vec::new());
        }
        Ok(sotw_response(gen, kind, st, &conn.node, force, nonce)
            .into_iter()
            .map(|r| (kind, r))
            .collect())
    }

    fn push(
        gen: &World,
        kind: Kind,
        st: &mut TypeState,
        p: &ProxyNode,
        nonce: &mut u64,
    ) -> Vec<DiscoveryResponse> {
        sotw_response(gen, kind, st, p, false, nonce)
    }

    fn resources(r: &DiscoveryResponse) -> usize {
        r.resources.len()
    }

    fn type_url(r: &DiscoveryRequest) -> &str {
        &r.type_url
    }

    fn names(r: &DiscoveryRequest, name: &str) -> bool {
        r.resource_names.iter().any(|n| n == name)
    }
}

struct DeltaAds;

impl Variant for DeltaAds {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    const DELTA: bool = true;

    fn node(r: &DeltaDiscoveryRequest) -> Option<&Node> {
        r.node.as_ref()
    }

    fn request(
        state: &XdsState,
        conn: &Conn,
        gen: &World,
        req: DeltaDiscoveryRequest,
        nonce: &mut u64,
    ) -> Result<Vec<(Kind, DeltaDiscoveryResponse)>, Status> {
        let Some(kind) = served_kind(conn, &req.type_url) else {
            return Ok(Vec::new());
        };
        check_names(&req.resource_names_subscribe)?;
        check_names(&req.resource_names_unsubscribe)?;
        let mut types = conn.types();
        let st = types.entry(kind).or_default();
        if !req.response_nonce.is_empty() && req.response_nonce == st.nonce {
            let version = st.version.clone();
            record_ack(
                state,
                conn,
                kind,
                st,
                &req.response_nonce,
                &version,
                req.error_detail.map(|e| e.message),
            );
        }
        let first_for_type = !st.subscribed;
        if first_for_type {
            st.subscribed = true;
            if kind.wildcard_capable() && req.resource_names_subscribe.is_empty() {
                st.wildcard = true;
            }
            // The client already holds these: do not resend unchanged ones.
            for (name, version) in &req.initial_resource_versions {
                if let Some(r) = gen.get(kind, name, &conn.node) {
                    if &r.version() == version {
                        st.sent.insert(r.name.clone(), r);
                    }
                }
            }
        }
        let mut sub_changed = first_for_type;
        for n in req.resource_names_subscribe {
            sub_changed = true;
            if n == "*" {
                st.wildcard = true;
            } else {
                st.names.insert(n);
            }
        }
        for n in req.resource_names_unsubscribe {
            sub_changed = true;
            if n == "*" {
                st.wildcard = false;
            } else {
                st.names.remove(&n);
                st.sent.remove(n.as_str());
            }
        }
        if !sub_changed {
            return Ok(Vec::new());
        }
        let force = first_for_type && st.wildcard;
        Ok(delta_response(gen, kind, st, &conn.node, force, nonce)
            .into_iter()
            .map(|r| (kind, r))
            .collect())
    }

    fn push(
        gen: &World,
        kind: Kind,
        st: &mut TypeState,
        p: &ProxyNode,
        nonce: &mut u64,
    ) -> Vec<DeltaDiscoveryResponse> {
        delta_response(gen, kind, st, p, false, nonce)
            .into_iter()
            .collect()
    }

    fn resources(r: &DeltaDiscoveryResponse) -> usize {
        r.resources.len()
    }

    fn type_url(r: &DeltaDiscoveryRequest) -> &str {
        &r.type_url
    }

    fn names(r: &DeltaDiscoveryRequest, name: &str) -> bool {
        r.resource_names_subscribe.iter().any(|n| n == name)
    }
}

fn delta_response(
    gen: &World,
    kind: Kind,
    st: &mut TypeState,
    p: &ProxyNode,
    force: bool,
    nonce: &mut u64,
) -> Option<DeltaDiscoveryResponse> {
    let want = wanted(gen, kind, st, p);
    let names: BTreeSet<&str> = want.iter().map(|r| &*r.name).collect();
    let removed: Vec<String> = st
        .sent
        .keys()
        .filter(|k| !names.contains(&***k))
        .map(|k| k.to_string())
        .collect();
    for k in &removed {
        st.sent.remove(k.as_str());
    }
    let changed: Vec<SharedRes> = want
        .into_iter()
        .filter(|r| st.sent.get(&r.name).is_none_or(|s| s.hash != r.hash))
        .collect();
    if changed.is_empty() && removed.is_empty() && !force {
        return None;
    }
    for r in &changed {
        st.sent.insert(r.name.clone(), r.clone());
    }
    *nonce += 1;
    st.version = gen.version(kind, &st.sent.values().collect::<Vec<_>>());
    st.nonce = nonce.to_string();
    st.sent_at = Some(Instant::now());
    Some(DeltaDiscoveryResponse {
        system_version_info: st.version.clone(),
        resources: changed
            .iter()
            .map(|r| Resource {
                name: r.name.to_string(),
                version: r.version(),
                resource: Some(r.any.clone()),
                ..Default::default()
            })
            .collect(),
        type_url: kind.url().to_string(),
        removed_resources: removed,
        nonce: st.nonce.clone(),
        ..Default::default()
    })
}
