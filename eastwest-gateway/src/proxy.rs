//! The data path: accept, read the ClientHello (never terminating TLS), route on its SNI,
//! connect to a local endpoint (trying the next before any byte is forwarded), forward the
//! buffered bytes, then copy both ways until both sides are done. Idle connections hold no
//! buffer: one is taken from the allocator only while bytes are moving.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::hello::{self, alert, HelloError, Progress};
use crate::routes::{NoRoute, Routes};

/// Istio's mTLS ALPN values; by default a connection must offer one, as Istio's gateway requires.
pub const ISTIO_ALPN: &[&str] = &[
    "istio",
    "istio-peer-exchange",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
];

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The cluster the gateway forwards into (`destination_cluster` of Istio's metrics; empty:
    /// `unknown`).
    pub cluster: String,
    /// A client must complete its ClientHello within this time (slowloris protection).
    pub hello_timeout: Duration,
    pub connect_timeout: Duration,
    /// A connection with no bytes either way for this long is closed.
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// Connections still sending their ClientHello.
    pub max_pending_hellos: usize,
    pub max_per_source: u32,
    /// `None` accepts any ALPN (or none).
    pub require_alpn: Option<Vec<String>>,
    /// On shutdown, open connections get this long to finish.
    pub drain_timeout: Duration,
    pub balance: Balance,
}

/// How an endpoint is chosen among the healthy ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    /// Fewest open forwarded connections (ties broken round robin).
    LeastConnections,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            cluster: String::new(),
            hello_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(3600),
            max_connections: 100_000,
            max_pending_hellos: 10_000,
            max_per_source: 10_000,
            require_alpn: Some(ISTIO_ALPN.iter().map(|s| s.to_string()).collect()),
            drain_timeout: Duration::from_secs(30),
            balance: Balance::RoundRobin,
        }
    }
}

/// The labels of Istio's standard TCP metrics that a passthrough gateway can fill:
/// `reporter` is `source` (Istio's value for gateways); the calling cluster is not visible
/// without terminating TLS (`source_cluster="unknown"`), nor is mTLS
/// (`connection_security_policy="unknown"`).
pub const ISTIO_TCP_LABELS: &[&str] = &[
    "reporter",
    "source_cluster",
    "destination_cluster",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "connection_security_policy",
];

/// Metrics: meshfed's own (`meshfed_gateway_*`), and Istio's standard TCP metrics with Istio's
/// names and labels, so Istio's and Grafana's dashboards read them.
#[derive(Debug, Clone)]
pub struct GatewayMetrics {
    pub active: IntGaugeVec,
    pub connections: IntCounterVec,
    pub bytes: IntCounterVec,
    pub istio_opened: IntCounterVec,
    pub istio_closed: IntCounterVec,
    /// Bytes from the destination back to the caller (Istio: sent during the response).
    pub istio_sent: IntCounterVec,
    /// Bytes from the caller to the destination (Istio: received during the request).
    pub istio_received: IntCounterVec,
    pub refused: IntCounterVec,
    pub connect_seconds: Histogram,
    pub pending_hellos: IntGauge,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("invalid metric definition: {e}"),
    }
}

impl GatewayMetrics {
    pub fn new(reg: &Registry) -> GatewayMetrics {
        let m = GatewayMetrics {
            active: must(IntGaugeVec::new(
                Opts::new(
                    "meshfed_gateway_active_connections",
                    "Open forwarded connections",
                ),
                &["destination_service"],
            )),
            connections: must(IntCounterVec::new(
                Opts::new("meshfed_gateway_connections_total", "Forwarded connections"),
                &["destination_service"],
            )),
            bytes: must(IntCounterVec::new(
                Opts::new("meshfed_gateway_bytes_total", "Bytes forwarded"),
                &["destination_service", "direction"],
            )),
            istio_opened: must(IntCounterVec::new(
                Opts::new(
                    "istio_tcp_connections_opened_total",
                    "TCP connections opened (Istio's standard metric)",
                ),
                ISTIO_TCP_LABELS,
            )),
            istio_closed: must(IntCounterVec::new(
                Opts::new(
                    "istio_tcp_connections_closed_total",
                    "TCP connections closed (Istio's standard metric)",
                ),
                ISTIO_TCP_LABELS,
            )),
            istio_sent: must(IntCounterVec::new(
                Opts::new(
                    "istio_tcp_sent_bytes_total",
                    "Bytes sent during the response (Istio's standard metric)",
                ),
                ISTIO_TCP_LABELS,
            )),
            istio_received: must(IntCounterVec::new(
                Opts::new(
                    "istio_tcp_received_bytes_total",
                    "Bytes received during the request (Istio's standard metric)",
                ),
                ISTIO_TCP_LABELS,
            )),
            refused: must(IntCounterVec::new(
                Opts::new(
                    "meshfed_gateway_refused_total",
                    "Connections refused, by reason",
                ),
                &["reason"],
            )),
            connect_seconds: must(Histogram::with_opts(
                HistogramOpts::new(
                    "meshfed_gateway_upstream_connect_seconds",
                    "Time to connect to the chosen endpoint",
                )
                .buckets(vec![
                    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0,
                ]),
            )),
            pending_hellos: must(IntGauge::new(
                "meshfed_gateway_pending_hellos",
                "Connections still sending their ClientHello",
            )),
        };
        for c in [
            Box::new(m.active.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.connections.clone()),
            Box::new(m.bytes.clone()),
            Box::new(m.istio_opened.clone()),
            Box::new(m.istio_closed.clone()),
            Box::new(m.istio_sent.clone()),
            Box::new(m.istio_received.clone()),
            Box::new(m.refused.clone()),
            Box::new(m.connect_seconds.clone()),
            Box::new(m.pending_hellos.clone()),
        ] {
            let _ = reg.register(c);
        }
        m
    }
}

#[derive(Debug)]
pub struct Gateway {
    cfg: GatewayConfig,
    routes: watch::Receiver<Arc<Routes>>,
    pub metrics: GatewayMetrics,
    next: AtomicUsize,
    connections: Arc<Semaphore>,
    pending: Arc<Semaphore>,
    per_source: Mutex<HashMap<IpAddr, u32>>,
    open: AtomicU64,
    /// Passive outlier detection: consecutive connect failures and ejection deadlines.
    outliers: Mutex<HashMap<SocketAddr, (u32, Option<Instant>)>>,
    /// Open forwarded connections per endpoint (least-connections balancing).
    per_endpoint: Mutex<HashMap<SocketAddr, u32>>,
    /// Each routed service's counters, looked up once per service rather than by label values
    /// on every connection.
    per_service: std::sync::RwLock<HashMap<String, Arc<ServiceCounters>>>,
}

/// The counters of one routed service (meshfed's and Istio's).
#[derive(Debug)]
struct ServiceCounters {
    connections: prometheus::IntCounter,
    active: prometheus::IntGauge,
    upstream: ByteCounters,
    downstream: ByteCounters,
    istio_opened: prometheus::IntCounter,
    istio_closed: prometheus::IntCounter,
}

/// A connection whose hello was routed and forwarded to the endpoint `chosen`.
struct Forward {
    client: TcpStream,
    up: TcpStream,
    chosen: SocketAddr,
    counters: Arc<ServiceCounters>,
}

/// Consecutive connect failures that eject an endpoint.
pub const EJECT_AFTER: u32 = 3;
/// First ejection; doubles with each further ejection of the same endpoint, up to 5 minutes.
pub const BASE_EJECTION: Duration = Duration::from_secs(10);

/// Releases a per-source slot when the connection ends.
struct SourceSlot {
    gw: Arc<Gateway>,
    ip: IpAddr,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut m = self.gw.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Gateway {
    pub fn new(
        cfg: GatewayConfig,
        routes: watch::Receiver<Arc<Routes>>,
        reg: &Registry,
    ) -> Arc<Gateway> {
        Arc::new(Gateway {
            connections: Arc::new(Semaphore::new(cfg.max_connections)),
            pending: Arc::new(Semaphore::new(cfg.max_pending_hellos)),
            cfg,
            routes,
            metrics: GatewayMetrics::new(reg),
            next: AtomicUsize::new(0),
            per_source: Mutex::new(HashMap::new()),
            open: AtomicU64::new(0),
            outliers: Mutex::new(HashMap::new()),
            per_endpoint: Mutex::new(HashMap::new()),
            per_service: std::sync::RwLock::new(HashMap::new()),
        })
    }

    /// Open connections (forwarding or still reading their ClientHello).
    pub fn open_connections(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    fn refuse(&self, reason: &str) {
        self.metrics.refused.with_label_values(&[reason]).inc();
    }

    /// Serves until `shutdown` turns true, then stops accepting and lets open connections
    /// finish for up to the drain timeout.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((tcp, peer)) => {
                        // Limits are taken here, in accept order, so a burst from one source
                        // cannot slip past them before earlier connections are counted.
                        if let Some(admitted) = self.admit(peer) {
                            let gw = self.clone();
                            tokio::spawn(gw.handle(tcp, peer, admitted));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                },
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
        drop(listener);
        let deadline = Instant::now() + self.cfg.drain_timeout;
        tracing::info!(open = self.open_connections(), "draining");
        while self.open_connections() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The connection permit and per-source slot of a new connection, or `None` (counted) when
    /// a limit refuses it; dropping the socket closes it.
    fn admit(
        self: &Arc<Self>,
        peer: SocketAddr,
    ) -> Option<(tokio::sync::OwnedSemaphorePermit, SourceSlot)> {
        let Ok(conn) = self.connections.clone().try_acquire_owned() else {
            self.refuse("max_connections");
            return None;
        };
        let mut m = self.per_source.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(peer.ip()).or_default();
        if *n >= self.cfg.max_per_source {
            drop(m);
            self.refuse("per_source_limit");
            return None;
        }
        *n += 1;
        Some((
            conn,
            SourceSlot {
                gw: self.clone(),
                ip: peer.ip(),
            },
        ))
    }

    async fn handle(
        self: Arc<Self>,
        client: TcpStream,
        peer: SocketAddr,
        _admitted: (tokio::sync::OwnedSemaphorePermit, SourceSlot),
    ) {
        self.open.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nodelay(true);
        // The set-up (hello, route, connect) runs in its own allocation, freed before the
        // relay starts: what a connection holds while it lives is the relay's state alone
        // (the unit test below bounds its size).
        match Box::pin(self.open_upstream(client)).await {
            Ok(fwd) => self.relay(&fwd).await,
            Err(reason) => tracing::debug!(%peer, reason, "connection refused"),
        }
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Endpoints in the order to try: healthy ones round robin from `start`, ejected ones last.
    fn order(&self, eps: &[SocketAddr], start: usize) -> Vec<SocketAddr> {
        let now = Instant::now();
        let o = self.outliers.lock().unwrap_or_else(|e| e.into_inner());
        let ejected =
            |ep: &SocketAddr| o.get(ep).and_then(|x| x.1).is_some_and(|until| until > now);
        let n = eps.len();
        let rotated = (0..n).map(|i| eps[(start + i) % n]);
        let (mut ok, bad): (Vec<SocketAddr>, Vec<SocketAddr>) = rotated.partition(|e| !ejected(e));
        if self.cfg.balance == Balance::LeastConnections {
            let open = self.per_endpoint.lock().unwrap_or_else(|e| e.into_inner());
            // Stable sort keeps the round-robin rotation among equals.
            ok.sort_by_key(|e| open.get(e).copied().unwrap_or(0));
        }
        ok.extend(bad);
        ok
    }

    /// Open forwarded connections to an endpoint.
    pub fn open_to(&self, ep: &SocketAddr) -> u32 {
        let m = self.per_endpoint.lock().unwrap_or_else(|e| e.into_inner());
        m.get(ep).copied().unwrap_or(0)
    }

    fn track(&self, ep: SocketAddr, delta: i32) {
        let mut m = self.per_endpoint.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(ep).or_default();
        *n = n.saturating_add_signed(delta);
        if *n == 0 {
            m.remove(&ep);
        }
    }

    fn outcome(&self, ep: SocketAddr, success: bool) {
        let mut o = self.outliers.lock().unwrap_or_else(|e| e.into_inner());
        if success {
            o.remove(&ep);
            return;
        }
        let e = o.entry(ep).or_insert((0, None));
        e.0 += 1;
        if e.0 >= EJECT_AFTER {
            let times = (e.0 / EJECT_AFTER).min(5);
            let wait = (BASE_EJECTION * 2u32.pow(times - 1)).min(Duration::from_secs(300));
            e.1 = Some(Instant::now() + wait);
            self.metrics
                .refused
                .with_label_values(&["endpoint_ejected"])
                .inc();
            tracing::info!(%ep, secs = wait.as_secs(), "endpoint ejected after consecutive connect failures");
        }
        // Bounded: forget the oldest records if endpoints churn.
        if o.len() > 10_000 {
            let now = Instant::now();
            o.retain(|_, (_, until)| until.is_some_and(|u| u > now));
        }
    }

    /// Whether an endpoint is currently ejected.
    pub fn is_ejected(&self, ep: &SocketAddr) -> bool {
        let o = self.outliers.lock().unwrap_or_else(|e| e.into_inner());
        o.get(ep)
            .and_then(|x| x.1)
            .is_some_and(|u| u > Instant::now())
    }

    /// Reads the ClientHello; on refusal sends the alert and returns the reason.
    async fn read_hello(
        &self,
        client: &mut TcpStream,
    ) -> Result<(hello::ClientHello, Vec<u8>), &'static str> {
        let Ok(_p) = self.pending.clone().try_acquire_owned() else {
            self.refuse("max_pending_hellos");
            return Err("max_pending_hellos");
        };
        self.metrics.pending_hellos.inc();
        let r = tokio::time::timeout(self.cfg.hello_timeout, async {
            let mut buf: Vec<u8> = Vec::with_capacity(1024);
            loop {
                match hello::parse(&buf) {
                    Ok(Progress::Done(h)) => return Ok((h, buf)),
                    Ok(Progress::NeedMore(n)) => {
                        buf.reserve(n.max(512));
                        let read = client.read_buf(&mut buf).await.map_err(|_| None)?;
                        if read == 0 {
                            return Err(None);
                        }
                    }
                    Err(e) => return Err(Some(e)),
                }
            }
        })
        .await;
        self.metrics.pending_hellos.dec();
        match r {
            Ok(Ok(x)) => Ok(x),
            Ok(Err(None)) => {
                self.refuse("closed_before_hello");
                Err("closed_before_hello")
            }
            Ok(Err(Some(e))) => {
                self.refuse(e.reason());
                if let Some(a) = e.alert() {
                    let _ = client.write_all(&hello::alert_record(a)).await;
                }
                Err(match e {
                    HelloError::NotTls(_) | HelloError::BadVersion(_) => "not_tls",
                    _ => "bad_hello",
                })
            }
            Err(_) => {
                self.refuse("hello_timeout");
                Err("hello_timeout")
            }
        }
    }

    /// Reads the hello, routes it and connects to an endpoint, forwarding the buffered bytes.
    async fn open_upstream(&self, mut client: TcpStream) -> Result<Forward, &'static str> {
        let (h, buf) = self.read_hello(&mut client).await?;
        let refuse = |gw: &Gateway, reason: &'static str, a: u8| {
            gw.refuse(reason);
            (reason, a)
        };
        let decision = (|| {
            let Some(sni) = h.sni.as_deref() else {
                return Err(refuse(self, "no_sni", alert::UNRECOGNIZED_NAME));
            };
            let routes = self.routes.borrow().clone();
            // Exposed control-plane names (xDS, the VM API) carry the control plane's own
            // protocol (h2), not Istio's mTLS ALPN.
            if let Some(want) = &self.cfg.require_alpn {
                if !routes.fixed.contains_key(sni) && !h.alpn.iter().any(|a| want.contains(a)) {
                    return Err(refuse(self, "alpn", alert::NO_APPLICATION_PROTOCOL));
                }
            }
            let target = crate::sni::parse(sni)
                .map_err(|_| refuse(self, "bad_sni", alert::UNRECOGNIZED_NAME))?;
            match routes.lookup(sni, &target) {
                Ok(eps) => Ok((
                    eps.to_vec(),
                    match target.port {
                        Some(p) => format!("{}:{p}", target.host),
                        None => target.host.clone(),
                    },
                )),
                Err(NoRoute::NoHealthyEndpoint(_)) => {
                    Err(refuse(self, "no_endpoint", alert::UNRECOGNIZED_NAME))
                }
                Err(_) => Err(refuse(self, "unknown_sni", alert::UNRECOGNIZED_NAME)),
            }
        })();
        let (eps, service) = match decision {
            Ok(x) => x,
            Err((reason, a)) => {
                let _ = client.write_all(&hello::alert_record(a)).await;
                return Err(reason);
            }
        };
        // Round robin over endpoints that are not ejected (all of them if every one is); on a
        // connect failure try the next, before any byte moved.
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut upstream = None;
        for ep in self.order(&eps, start) {
            let t = Instant::now();
            match tokio::time::timeout(self.cfg.connect_timeout, TcpStream::connect(ep)).await {
                Ok(Ok(s)) => {
                    self.metrics
                        .connect_seconds
                        .observe(t.elapsed().as_secs_f64());
                    self.outcome(ep, true);
                    upstream = Some((s, ep));
                    break;
                }
                _ => {
                    self.outcome(ep, false);
                    tracing::debug!(%ep, "connect failed; trying the next endpoint");
                }
            }
        }
        let Some((mut up, chosen)) = upstream else {
            self.refuse("upstream_unreachable");
            let _ = client
                .write_all(&hello::alert_record(alert::HANDSHAKE_FAILURE))
                .await;
            return Err("upstream_unreachable");
        };
        let _ = up.set_nodelay(true);
        let sent_first = buf.len();
        if up.write_all(&buf).await.is_err() {
            self.refuse("upstream_write");
            return Err("upstream_write");
        }
        drop(buf);
        let counters = self.counters(&service);
        // The ClientHello (and whatever came with it) was forwarded already.
        counters.upstream.add(sent_first as u64);
        Ok(Forward {
            client,
            up,
            chosen,
            counters,
        })
    }

    /// Copies both ways until both sides are done or the connection is idle for too long.
    async fn relay(&self, fwd: &Forward) {
        let Forward {
            client,
            up,
            chosen,
            counters,
        } = fwd;
        let chosen = *chosen;
        counters.connections.inc();
        counters.active.inc();
        counters.istio_opened.inc();
        let last = AtomicU64::new(0);
        let t0 = Instant::now();
        // Both directions and the idle check are polled here by hand, in this one state:
        // join!/select! over async functions would store each future, and each layer's
        // arguments, again (the unit test below bounds the size).
        let up_ends = Ends {
            from: client,
            to: up,
            last: &last,
            t0,
            bytes: &counters.upstream,
        };
        let down_ends = Ends {
            from: up,
            to: client,
            last: &last,
            t0,
            bytes: &counters.downstream,
        };
        let (mut a, mut b) = (Pump::default(), Pump::default());
        let idle = self.cfg.idle_timeout;
        let check = idle / 4 + Duration::from_millis(1);
        let mut tick = std::pin::pin!(tokio::time::sleep(check));
        self.track(chosen, 1);
        let timed_out = std::future::poll_fn(|cx| {
            let a_done = a.poll(cx, &up_ends, b.done).is_ready();
            let b_done = b.poll(cx, &down_ends, a.done).is_ready();
            if a_done && b_done {
                return Poll::Ready(false);
            }
            while tick.as_mut().poll(cx).is_ready() {
                let quiet = t0
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if quiet >= idle {
                    return Poll::Ready(true);
                }
                tick.as_mut().reset(tokio::time::Instant::now() + check);
            }
            Poll::Pending
        })
        .await;
        if timed_out {
            self.refuse("idle_timeout");
        }
        self.track(chosen, -1);
        counters.active.dec();
        counters.istio_closed.inc();
    }

    /// The counters of `service`, made on its first connection.
    fn counters(&self, service: &str) -> Arc<ServiceCounters> {
        if let Some(c) = self
            .per_service
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(service)
        {
            return c.clone();
        }
        let m = &self.metrics;
        let istio = self.istio_labels(service);
        let istio: Vec<&str> = istio.iter().map(String::as_str).collect();
        let c = Arc::new(ServiceCounters {
            connections: m.connections.with_label_values(&[service]),
            active: m.active.with_label_values(&[service]),
            upstream: ByteCounters([
                m.bytes.with_label_values(&[service, "upstream"]),
                m.istio_received.with_label_values(&istio),
            ]),
            downstream: ByteCounters([
                m.bytes.with_label_values(&[service, "downstream"]),
                m.istio_sent.with_label_values(&istio),
            ]),
            istio_opened: m.istio_opened.with_label_values(&istio),
            istio_closed: m.istio_closed.with_label_values(&istio),
        });
        self.per_service
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(service.to_string())
            .or_insert(c)
            .clone()
    }

    /// Istio's TCP labels for a connection to `service` (`host:port`, as routed).
    fn istio_labels(&self, service: &str) -> Vec<String> {
        let host = service.rsplit_once(':').map(|(h, _)| h).unwrap_or(service);
        let mut parts = host.splitn(3, '.');
        let name = parts.next().unwrap_or_default();
        let namespace = parts.next().unwrap_or_default();
        vec![
            "source".into(),
            "unknown".into(),
            if self.cfg.cluster.is_empty() {
                "unknown".into()
            } else {
                self.cfg.cluster.clone()
            },
            host.to_string(),
            name.to_string(),
            namespace.to_string(),
            "tcp".into(),
            "unknown".into(),
        ]
    }
}

/// The byte counters one direction of a connection adds to (meshfed's and Istio's).
#[derive(Debug, Clone)]
struct ByteCounters([prometheus::IntCounter; 2]);

impl ByteCounters {
    fn add(&self, n: u64) {
        for c in &self.0 {
            c.inc_by(n);
        }
    }
}

/// One direction of a relayed connection, polled by `Gateway::relay`: small reads (requests,
/// replies, handshakes) go through a userspace buffer, two system calls per read; a read that
/// fills the buffer means bulk data, which (on Linux) `splice_bulk` moves through a pipe in
/// its own allocation. An idle direction holds no buffer, no pipe and no waiter: its state is
/// these few words, and the task's waker sits in the socket's own reader and writer slots.
#[derive(Default)]
struct Pump<'a> {
    /// Bytes read and not yet all written: the buffer, how much of it was written, its length.
    pending: Option<(Box<[u8]>, usize, usize)>,
    /// A bulk transfer in progress; `Ok(true)` at EOF, `Ok(false)` when the socket went quiet.
    bulk: Option<BulkFuture<'a>>,
    done: bool,
}

type BulkFuture<'a> = Pin<Box<dyn Future<Output = std::io::Result<bool>> + Send + 'a>>;

/// What one direction reads and writes, and where it counts.
struct Ends<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    last: &'a AtomicU64,
    t0: Instant,
    bytes: &'a ByteCounters,
}

/// Reads up to this much in userspace; on Linux a full read switches to splice.
#[cfg(target_os = "linux")]
const SMALL: usize = 4096;
#[cfg(not(target_os = "linux"))]
const SMALL: usize = 16 * 1024;

impl<'a> Pump<'a> {
    /// Moves bytes until EOF or an error, then half-closes the other side; `Ready` once done.
    /// When the other direction is done already, both sockets are closed right after, and the
    /// close sends the FIN: the half-close is skipped (one system call per connection).
    fn poll(
        &mut self,
        cx: &mut std::task::Context<'_>,
        ends: &Ends<'a>,
        other_done: bool,
    ) -> Poll<()> {
        if self.done {
            return Poll::Ready(());
        }
        match self.step(cx, ends) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => {
                self.done = true;
                self.pending = None;
                self.bulk = None;
                if !other_done {
                    let _ = socket2::SockRef::from(ends.to).shutdown(std::net::Shutdown::Write);
                }
                Poll::Ready(())
            }
        }
    }

    fn step(
        &mut self,
        cx: &mut std::task::Context<'_>,
        ends: &Ends<'a>,
    ) -> Poll<std::io::Result<()>> {
        use std::io::ErrorKind::{WouldBlock, WriteZero};
        use std::task::ready;
        let (from, to) = (ends.from, ends.to);
        loop {
            if let Some(b) = self.bulk.as_mut() {
                match ready!(b.as_mut().poll(cx)) {
                    Ok(true) => return Poll::Ready(Ok(())),
                    Ok(false) => self.bulk = None,
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if let Some((buf, off, len)) = self.pending.as_mut() {
                while *off < *len {
                    ready!(to.poll_write_ready(cx))?;
                    match to.try_write(&buf[*off..*len]) {
                        Ok(0) => return Poll::Ready(Err(WriteZero.into())),
                        Ok(m) => *off += m,
                        Err(e) if e.kind() == WouldBlock => continue,
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                let n = *len;
                self.pending = None;
                ends.bytes.add(n as u64);
                ends.last
                    .store(ends.t0.elapsed().as_millis() as u64, Ordering::Relaxed);
                #[cfg(target_os = "linux")]
                if n == SMALL {
                    let (last, t0, bytes) = (ends.last, ends.t0, ends.bytes);
                    self.bulk = Some(Box::pin(splice_bulk(from, to, last, t0, bytes)));
                    continue;
                }
            }
            ready!(from.poll_read_ready(cx))?;
            let mut buf = vec![0u8; SMALL].into_boxed_slice();
            match from.try_read(&mut buf) {
                Ok(0) => return Poll::Ready(Ok(())),
                Ok(n) => self.pending = Some((buf, 0, n)),
                Err(e) if e.kind() == WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// The size asked for a bulk connection's pipe (the kernel's default maximum for it).
#[cfg(target_os = "linux")]
const PIPE_SIZE: i32 = 1 << 20;

/// A bulk transfer keeps its pipe across pauses shorter than this; a connection quiet for
/// longer gives it back.
#[cfg(target_os = "linux")]
const PIPE_LINGER: Duration = Duration::from_secs(1);

/// Waits until `s` may be readable, with the waker in the socket's own reader slot (each
/// socket has one reading and one writing direction, as the slot requires).
#[cfg(target_os = "linux")]
async fn read_ready(s: &TcpStream) -> std::io::Result<()> {
    std::future::poll_fn(|cx| s.poll_read_ready(cx)).await
}

/// Waits until `s` may be writable (see `read_ready`).
#[cfg(target_os = "linux")]
async fn write_ready(s: &TcpStream) -> std::io::Result<()> {
    std::future::poll_fn(|cx| s.poll_write_ready(cx)).await
}

/// Moves bulk data through a pipe until EOF (`true`) or until the socket stays quiet for
/// `PIPE_LINGER` (`false`: the pipe is closed, and the caller waits without one).
#[cfg(target_os = "linux")]
async fn splice_bulk(
    from: &TcpStream,
    to: &TcpStream,
    last: &AtomicU64,
    t0: Instant,
    bytes: &ByteCounters,
) -> std::io::Result<bool> {
    use nix::fcntl::{splice, OFlag, SpliceFFlags};
    use tokio::io::Interest;
    const CHUNK: usize = 1 << 20;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let (pr, pw) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A larger pipe moves more per splice: the default 64 KiB takes 32 splices per MiB,
    // 1 MiB (the kernel's default maximum, /proc/sys/fs/pipe-max-size) about 2. Where it is
    // refused the default stays.
    let _ = nix::fcntl::fcntl(&pw, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE));
    let linger = tokio::time::sleep(PIPE_LINGER);
    tokio::pin!(linger);
    loop {
        loop {
            // The pipe is empty here, so EAGAIN can only mean the socket has nothing more.
            let n = match from.try_io(Interest::READABLE, || {
                splice(from, None, &pw, None, CHUNK, flags).map_err(std::io::Error::from)
            }) {
                Ok(0) => return Ok(true),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            let mut left = n;
            while left > 0 {
                write_ready(to).await?;
                match to.try_io(Interest::WRITABLE, || {
                    splice(&pr, None, to, None, left, flags).map_err(std::io::Error::from)
                }) {
                    Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                    Ok(m) => left -= m,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
            }
            bytes.add(n as u64);
            last.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        linger
            .as_mut()
            .reset(tokio::time::Instant::now() + PIPE_LINGER);
        tokio::select! {
            r = read_ready(from) => r?,
            _ = &mut linger => return Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle connection keeps is its task: the `handle` future while it relays. Before
    /// the relay was polled by hand it was 2,672 bytes (join!/select! over async functions
    /// stored each direction's future up to three times); now about 1 KB. The bound keeps it
    /// from growing back unnoticed.
    #[tokio::test]
    async fn an_idle_connection_keeps_a_small_state() {
        let (_tx, rx) = watch::channel(Arc::new(Routes::default()));
        let gw = Gateway::new(GatewayConfig::default(), rx, &Registry::new());
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let conn = || TcpStream::connect(l.local_addr().unwrap());
        let c = conn().await.unwrap();
        let peer = c.local_addr().unwrap();
        let admitted = gw.admit(peer).unwrap();
        let task = std::mem::size_of_val(&gw.clone().handle(c, peer, admitted));
        let fwd = Forward {
            client: conn().await.unwrap(),
            up: conn().await.unwrap(),
            chosen: peer,
            counters: gw.counters("reviews.shop.svc.cluster.local:9080"),
        };
        let relay = std::mem::size_of_val(&gw.relay(&fwd));
        let setup = std::mem::size_of_val(&gw.open_upstream(conn().await.unwrap()));
        eprintln!("connection task {task} B, relay {relay} B, set-up (boxed, freed) {setup} B");
        assert!(
            std::mem::size_of::<Pump>() <= 64,
            "an idle direction is a few words"
        );
        assert!(relay <= 768, "relay state {relay} B");
        assert!(task <= 1280, "connection task {task} B");
    }
}
