//! Transports shared by every meshfed server and client: gRPC over meshfed's own rustls
//! configurations (a TLS accept loop that feeds tonic, peer certificates reaching handlers
//! through `Request::peer_certs`, and a connector for clients), the admin HTTP endpoint, and
//! Prometheus helpers.

pub mod admin;
pub mod bundle_endpoint;
pub mod dashboard;
pub mod drain;
pub mod https;
pub mod metrics;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use anyhow::Context as _;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// HTTP/2, negotiated by ALPN.
pub const ALPN_H2: &[u8] = b"h2";
/// A handshake that has not finished in this time is dropped (slowloris protection).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a handler learns about the connection a request came on.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// The client's verified certificate chain, when it presented one.
    pub certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

/// A server-side TLS connection that tells tonic who the peer is (see [`PeerInfo`]).
#[derive(Debug)]
pub struct TlsConn(pub TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        let (tcp, session) = self.0.get_ref();
        PeerInfo {
            remote: tcp.peer_addr().ok(),
            certs: session
                .peer_certificates()
                .map(|c| Arc::new(c.iter().map(|d| d.clone().into_owned()).collect())),
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// How many TLS handshakes one listener runs at once. A handshake costs a signature and a chain
/// verification; when hundreds of clusters reconnect at once (a federator restart) unbounded
/// handshakes share the CPU until most time out. Beyond the bound, connections wait in the
/// kernel's accept queue and are taken in order as handshakes finish.
pub const MAX_CONCURRENT_HANDSHAKES: usize = 32;

/// A listener's handshake bound, and what it has seen (tests read the peak).
#[derive(Debug)]
pub struct Handshakes {
    permits: Arc<tokio::sync::Semaphore>,
    in_flight: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

impl Handshakes {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Handshakes {
            permits: Arc::new(tokio::sync::Semaphore::new(max.max(1))),
            in_flight: Default::default(),
            peak: Default::default(),
        })
    }

    /// The most handshakes that were under way at once.
    pub fn peak(&self) -> usize {
        self.peak.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn started(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.in_flight.fetch_add(1, Relaxed) + 1;
        self.peak.fetch_max(now, Relaxed);
        metrics::TLS_IN_PROGRESS.inc();
    }

    fn finished(&self) {
        self.in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        metrics::TLS_IN_PROGRESS.dec();
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently, at most
/// [`MAX_CONCURRENT_HANDSHAKES`] at once, yielding established streams for
/// `tonic::transport::Server::serve_with_incoming`. A failed handshake is logged and dropped; it
/// never stops the loop.
pub fn tls_incoming(
    listener: TcpListener,
    mut config: rustls::ServerConfig,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    tls_incoming_with(listener, config)
}

/// [`tls_incoming`] with the ALPN protocols `config` names (HTTP/1.1 servers).
pub fn tls_incoming_with(
    listener: TcpListener,
    config: rustls::ServerConfig,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    tls_incoming_limited(listener, config, Handshakes::new(MAX_CONCURRENT_HANDSHAKES))
}

/// [`tls_incoming_with`] with the handshake bound `limit`.
pub fn tls_incoming_limited(
    listener: TcpListener,
    config: rustls::ServerConfig,
    limit: Arc<Handshakes>,
) -> ReceiverStream<Result<TlsConn, std::io::Error>> {
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            // A permit first: at the bound, the next connection stays in the accept queue.
            let permit = tokio::select! {
                p = limit.permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                _ = tx.closed() => break,
            };
            // When the server stops (its stream is dropped) the listener is closed with it, so
            // the address can be bound again at once.
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = tx.closed() => break,
            };
            let (tcp, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                break;
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let limit = limit.clone();
            limit.started();
            tokio::spawn(async move {
                let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                limit.finished();
                drop(permit);
                match r {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsConn(tls))).await;
                    }
                    Ok(Err(e)) => {
                        metrics::TLS_REFUSED.with_label_values(&["refused"]).inc();
                        tracing::warn!(%peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => {
                        metrics::TLS_REFUSED.with_label_values(&["timeout"]).inc();
                        tracing::warn!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// A lazily connecting gRPC channel to a reachable one of `addrs` (federator replicas), over
/// `config`. Each connection tries them all, from a random one on: clusters spread over the
/// replicas, and when one goes down its clusters move to the others without piling onto one.
pub fn channel(
    addrs: Vec<String>,
    mut config: rustls::ClientConfig,
    server_name: &str,
) -> anyhow::Result<Channel> {
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    let name = ServerName::try_from(server_name.to_string()).context("invalid server name")?;
    let first = addrs.first().cloned().context("no federator address")?;
    let endpoint = Endpoint::from_shared(format!("http://{first}"))
        .context("invalid federator address")?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    let addrs = Arc::new(addrs);
    let svc = tower::service_fn(move |_uri: tonic::codegen::http::Uri| {
        let connector = connector.clone();
        let name = name.clone();
        let addrs = addrs.clone();
        async move {
            let mut last = std::io::Error::other("no address");
            let from = rand::random_range(0..addrs.len().max(1));
            for a in addrs.iter().cycle().skip(from).take(addrs.len()) {
                let tcp = match TcpStream::connect(a.as_str()).await {
                    Ok(t) => t,
                    Err(e) => {
                        last = std::io::Error::new(e.kind(), format!("{a}: {e}"));
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                match connector.connect(name.clone(), tcp).await {
                    Ok(tls) => return Ok(hyper_util::rt::TokioIo::new(tls)),
                    Err(e) => last = std::io::Error::new(e.kind(), format!("{a}: {e}")),
                }
            }
            Err(last)
        }
    });
    Ok(endpoint.connect_with_connector_lazy(svc))
}

/// Relays one local connection (plaintext, from a process on the same host or pod) to
/// `addr` over TLS with `tls` (a client certificate of the workload, h2), until either side
/// closes: how a VM's or a pod's local gRPC clients reach the agent's mTLS xDS port without
/// holding TLS settings of their own (Istio's pilot-agent does the same for Envoy).
pub async fn relay_tls<L>(
    mut local: L,
    mut tls: rustls::ClientConfig,
    addrs: &[String],
    server_name: &str,
) -> anyhow::Result<()>
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    tls.alpn_protocols = vec![ALPN_H2.to_vec()];
    let connector = TlsConnector::from(Arc::new(tls));
    let name = ServerName::try_from(server_name.to_string()).context("invalid server name")?;
    let mut last = anyhow::anyhow!("no upstream address");
    for a in addrs {
        let tcp = match TcpStream::connect(a.as_str()).await {
            Ok(t) => t,
            Err(e) => {
                last = anyhow::anyhow!("{a}: {e}");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut up = connector
            .connect(name.clone(), tcp)
            .await
            .with_context(|| format!("TLS to {a}"))?;
        tokio::io::copy_bidirectional(&mut local, &mut up).await?;
        return Ok(());
    }
    Err(last)
}

/// Resolves `host:port` to a socket address (first match).
pub async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("cannot resolve {addr}"))?
        .next()
        .with_context(|| format!("{addr} resolves to no address"))
}
