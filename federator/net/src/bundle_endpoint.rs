//! A SPIFFE bundle endpoint (SPIFFE Trust Domain and Bundle specification, `https_spiffe`
//! profile): `GET /` over HTTPS returns the trust domain's bundle as JSON. The server presents
//! an SVID of the trust domain and asks no client certificate; a client authenticates it with
//! the bundle it already holds and the endpoint's SPIFFE ID. Also the client side: [`fetch`].

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;
use tokio_stream::StreamExt;

use crate::drain::Tasks;
use crate::TlsConn;

/// HTTP/1.1, the protocol a bundle endpoint speaks.
const ALPN_HTTP1: &[u8] = b"http/1.1";

/// TLS connections accepted for axum (handshakes run beside the accept loop).
struct TlsListener {
    conns: tokio_stream::wrappers::ReceiverStream<Result<TlsConn, std::io::Error>>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.conns.next().await {
                Some(Ok(c)) => {
                    let peer = c.0.get_ref().0.peer_addr().unwrap_or(self.local);
                    return (c, peer);
                }
                Some(Err(e)) => tracing::debug!(error = %e, "bundle endpoint accept failed"),
                // The accept loop ended (the listener is gone): accept nothing more.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

async fn bundle(State(b): State<watch::Receiver<String>>) -> impl IntoResponse {
    let body = b.borrow().clone();
    if body.is_empty() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "no bundle yet\n".to_string(),
        )
            .into_response();
    }
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Binds `addr` and serves the bundle `bundle` holds (kept current by its sender) at `/`,
/// over `tls` (a server configuration presenting the trust domain's SVID), as a server of
/// `tasks`. Returns the bound address.
pub async fn serve(
    tasks: &Tasks,
    addr: SocketAddr,
    mut tls: rustls::ServerConfig,
    bundle_json: watch::Receiver<String>,
) -> anyhow::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (bundle endpoint)"))?;
    let local = l.local_addr()?;
    tls.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    let listener = TlsListener {
        conns: crate::tls_incoming_with(l, tls),
        local,
    };
    let app = Router::new()
        .route("/", get(bundle))
        .with_state(bundle_json);
    tasks.spawn_server("bundle endpoint", |drain| async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(drain.drained_owned())
            .await
        {
            tracing::error!(error = %e, "bundle endpoint failed");
        }
    });
    Ok(local)
}

/// Largest bundle document [`fetch`] reads.
pub const MAX_BUNDLE_BYTES: usize = 1 << 20;

/// `GET url` (`https://host:port[/path]`) with `tls` (a client configuration that checks the
/// server's SVID); returns the body. Errors name the URL and what failed.
pub async fn fetch(url: &str, mut tls: rustls::ClientConfig) -> anyhow::Result<String> {
    use http_body_util::BodyExt;
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("{url:?} is not a URL"))?;
    if uri.scheme_str() != Some("https") {
        anyhow::bail!("{url}: a bundle endpoint URL is https://host[:port][/path]");
    }
    let host = uri
        .host()
        .with_context(|| format!("{url}: no host"))?
        .trim_matches(['[', ']'])
        .to_string();
    let port = uri.port_u16().unwrap_or(443);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    tls.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    let tcp = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .with_context(|| format!("{url}: connecting timed out"))?
    .with_context(|| format!("{url}: cannot connect"))?;
    let name = rustls_pki_types::ServerName::try_from(host.clone())
        .with_context(|| format!("{url}: {host:?} is not a server name"))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .with_context(|| format!("{url}: TLS handshake failed"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .with_context(|| format!("{url}: HTTP handshake failed"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, format!("{host}:{port}"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .with_context(|| format!("{url}: bad request"))?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("{url}: request failed"))?;
    let status = resp.status();
    let body = http_body_util::Limited::new(resp.into_body(), MAX_BUNDLE_BYTES)
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("{url}: reading the body: {e}"))?
        .to_bytes();
    if !status.is_success() {
        anyhow::bail!(
            "{url}: HTTP {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    String::from_utf8(body.to_vec()).with_context(|| format!("{url}: the body is not UTF-8"))
}
