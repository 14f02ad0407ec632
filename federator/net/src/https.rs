//! An HTTPS server for an axum router over one of meshfed's rustls configurations (HTTP/1.1,
//! handshakes beside the accept loop, drained with the process): the bundle endpoint and the
//! injection webhook.

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::Router;
use tokio_stream::StreamExt;

use crate::drain::Tasks;
use crate::TlsConn;

/// HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

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
                Some(Err(e)) => tracing::debug!(error = %e, "HTTPS accept failed"),
                // The accept loop ended (the listener is gone): accept nothing more.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Binds `addr` and serves `app` over `tls` as the server `name` of `tasks`. Returns the bound
/// address.
pub async fn serve(
    tasks: &Tasks,
    name: &'static str,
    addr: SocketAddr,
    mut tls: rustls::ServerConfig,
    app: Router,
) -> anyhow::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({name})"))?;
    let local = l.local_addr()?;
    tls.alpn_protocols = vec![ALPN_HTTP1.to_vec()];
    let listener = TlsListener {
        conns: crate::tls_incoming_with(l, tls),
        local,
    };
    tasks.spawn_server(name, move |drain| async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(drain.drained_owned())
            .await
        {
            tracing::error!(server = name, error = %e, "HTTPS server failed");
        }
    });
    Ok(local)
}
