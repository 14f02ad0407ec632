//! The data path: accept, read the ClientHello (never terminating TLS), route on its SNI,
//! connect to a local endpoint (trying the next before any byte is forwarded), forward the
//! buffered bytes, then copy both ways until both sides are done. Idle connections hold no
//! buffer: one is taken from the allocator only while bytes are moving.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
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
                            tokio::spawn(async move { gw.handle(tcp, peer, admitted).await });
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
        admitted: (tokio::sync::OwnedSemaphorePermit, SourceSlot),
    ) {
        let _admitted = admitted;
        self.open.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nodelay(true);
        let r = self.forward(client).await;
        if let Err(reason) = r {
            tracing::debug!(%peer, reason, "connection refused");
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

    async fn forward(&self, mut client: TcpStream) -> Result<(), &'static str> {
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
        counters.connections.inc();
        counters.active.inc();
        counters.istio_opened.inc();
        let last = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        // The ClientHello (and whatever came with it) was forwarded already.
        counters.upstream.add(sent_first as u64);
        let (client, up) = (Arc::new(client), Arc::new(up));
        let a = copy_one_way(
            client.clone(),
            up.clone(),
            last.clone(),
            t0,
            &counters.upstream,
        );
        let b = copy_one_way(up, client, last.clone(), t0, &counters.downstream);
        let idle = self.cfg.idle_timeout;
        let watchdog = async {
            loop {
                tokio::time::sleep(idle / 4 + Duration::from_millis(1)).await;
                let since = t0
                    .elapsed()
                    .saturating_sub(Duration::from_millis(last.load(Ordering::Relaxed)));
                if since >= idle {
                    return;
                }
            }
        };
        self.track(chosen, 1);
        tokio::select! {
            _ = async { tokio::join!(a, b) } => {}
            _ = watchdog => { self.refuse("idle_timeout"); }
        }
        self.track(chosen, -1);
        counters.active.dec();
        counters.istio_closed.inc();
        Ok(())
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

/// Copies one direction until EOF, then half-closes the other side: with splice(2) on Linux
/// (bytes go socket -> pipe -> socket inside the kernel), a userspace copy elsewhere. Idle
/// connections hold neither a buffer nor a pipe: both exist only while bytes are moving.
async fn copy_one_way(
    from: Arc<TcpStream>,
    to: Arc<TcpStream>,
    last: Arc<AtomicU64>,
    t0: Instant,
    bytes: &ByteCounters,
) {
    #[cfg(target_os = "linux")]
    let _ = splice_loop(&from, &to, &last, t0, bytes).await;
    #[cfg(not(target_os = "linux"))]
    let _ = copy_loop(&from, &to, &last, t0, bytes).await;
    let _ = socket2::SockRef::from(&*to).shutdown(std::net::Shutdown::Write);
}

/// Reads up to this much in userspace before switching to splice.
#[cfg(target_os = "linux")]
const SMALL: usize = 4096;

#[cfg(target_os = "linux")]
async fn write_all(to: &TcpStream, mut b: &[u8]) -> std::io::Result<()> {
    while !b.is_empty() {
        to.writable().await?;
        match to.try_write(b) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(m) => b = &b[m..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
async fn splice_loop(
    from: &TcpStream,
    to: &TcpStream,
    last: &AtomicU64,
    t0: Instant,
    bytes: &ByteCounters,
) -> std::io::Result<()> {
    use nix::fcntl::{splice, OFlag, SpliceFFlags};
    use tokio::io::Interest;
    const CHUNK: usize = 1 << 20;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        from.readable().await?;
        // Small reads (requests, replies, handshakes) take the cheaper userspace path: two
        // syscalls instead of a pipe's four. A full small buffer means bulk data: splice it.
        let mut small = vec![0u8; SMALL];
        let n = match from.try_read(&mut small) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        write_all(to, &small[..n]).await?;
        drop(small);
        bytes.add(n as u64);
        last.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        if n < SMALL {
            continue;
        }
        let (pr, pw) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let mut eof = false;
        loop {
            // The pipe is empty here, so EAGAIN can only mean the socket has nothing more.
            let n = match from.try_io(Interest::READABLE, || {
                splice(from, None, &pw, None, CHUNK, flags).map_err(std::io::Error::from)
            }) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            let mut left = n;
            while left > 0 {
                to.writable().await?;
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
        if eof {
            return Ok(());
        }
    }
}

#[cfg(not(target_os = "linux"))]
async fn copy_loop(
    from: &TcpStream,
    to: &TcpStream,
    last: &AtomicU64,
    t0: Instant,
    bytes: &ByteCounters,
) -> std::io::Result<()> {
    loop {
        from.readable().await?;
        let mut buf = vec![0u8; 16 * 1024];
        let n = match from.try_read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut off = 0;
        while off < n {
            to.writable().await?;
            match to.try_write(&buf[off..n]) {
                Ok(m) => off += m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        bytes.add(n as u64);
        last.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}
