//! A SPIFFE bundle endpoint (SPIFFE Trust Domain and Bundle specification): `GET /` over HTTPS
//! returns the trust domain's bundle as JSON, and asks no client certificate. Two profiles:
//! `https_spiffe`, where the server presents an SVID of the trust domain and a client
//! authenticates it with the bundle it already holds and the endpoint's SPIFFE ID; and
//! `https_web`, where the server presents a Web PKI certificate ([`WebCert`], reloaded when its
//! files change) and a client checks it as any HTTPS client does (trusted roots, host name).
//! Also the client side: [`fetch`].

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;

use crate::drain::Tasks;

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
    tls: rustls::ServerConfig,
    bundle_json: watch::Receiver<String>,
) -> anyhow::Result<SocketAddr> {
    let app = Router::new()
        .route("/", get(bundle))
        .with_state(bundle_json);
    crate::https::serve(tasks, "bundle endpoint", addr, tls, app).await
}

/// The `https_web` profile's certificate: a PEM chain and key (PKCS#8, SEC1 or PKCS#1), as a
/// Web PKI issuer (an ACME client, cert-manager) writes them. [`WebCert::watch`] reloads both
/// when either file changes, so a renewed certificate is served without a restart; a pair that
/// does not load keeps the previous one in service (and says why).
#[derive(Debug)]
pub struct WebCert {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

fn load_web_cert(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> anyhow::Result<rustls::sign::CertifiedKey> {
    use rustls_pki_types::pem::PemObject;
    let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
        rustls_pki_types::CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("cannot read {}", cert.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("{}: not a PEM certificate chain", cert.display()))?;
    anyhow::ensure!(
        !chain.is_empty(),
        "{}: holds no certificate",
        cert.display()
    );
    let der = rustls_pki_types::PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{}: not a PEM private key", key.display()))?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(der)
        .with_context(|| format!("{}: unusable private key", key.display()))?;
    let ck = rustls::sign::CertifiedKey::new(chain, signing);
    ck.keys_match()
        .with_context(|| format!("{} does not match {}", key.display(), cert.display()))?;
    Ok(ck)
}

impl WebCert {
    /// Loads the pair; an error names the file and what is wrong.
    pub fn load(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Arc<WebCert>> {
        let ck = load_web_cert(cert, key)?;
        Ok(Arc::new(WebCert {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: std::sync::RwLock::new(Arc::new(ck)),
        }))
    }

    fn stamp(&self) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
        let m = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((m(&self.cert)?, m(&self.key)?))
    }

    /// Reloads the pair whenever either file's modification time changes (checked every
    /// `every`), until the drain.
    pub fn watch(self: &Arc<Self>, tasks: &Tasks, every: std::time::Duration) {
        let me = self.clone();
        tasks.spawn("bundle endpoint certificate", async move {
            let mut seen = me.stamp();
            let mut t = tokio::time::interval(every);
            loop {
                t.tick().await;
                let now = me.stamp();
                if now == seen {
                    continue;
                }
                match load_web_cert(&me.cert, &me.key) {
                    Ok(ck) => {
                        *me.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
                        seen = now;
                        tracing::info!(cert = %me.cert.display(), "bundle endpoint certificate reloaded");
                    }
                    // Half-written pairs are common while an issuer renews: try again next tick.
                    Err(e) => {
                        tracing::warn!(error = %format!("{e:#}"), "bundle endpoint certificate not reloaded; serving the previous one")
                    }
                }
            }
        });
    }

    /// A server configuration presenting this certificate, without client authentication.
    pub fn server_config(self: &Arc<Self>) -> anyhow::Result<rustls::ServerConfig> {
        Ok(rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(self.clone()))
    }
}

impl rustls::server::ResolvesServerCert for WebCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// A client configuration for the `https_web` profile: Web PKI verification (host name,
/// chain to a trusted root) against the roots in `ca_file` (PEM), or the system's roots.
pub fn web_client_config(
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(f) => {
            for c in rustls_pki_types::CertificateDer::pem_file_iter(f)
                .with_context(|| format!("cannot read {}", f.display()))?
            {
                let c = c.with_context(|| format!("{}: not a PEM certificate", f.display()))?;
                roots
                    .add(c)
                    .with_context(|| format!("{}: not a usable root", f.display()))?;
            }
            anyhow::ensure!(!roots.is_empty(), "{}: holds no certificate", f.display());
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for c in found.certs {
                let _ = roots.add(c);
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "no system root certificates found ({}); give --ca-file",
                found
                    .errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
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
    tls.alpn_protocols = vec![crate::https::ALPN_HTTP1.to_vec()];
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
