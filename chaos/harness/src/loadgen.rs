//! A mesh client that follows an xDS priority table, as a proxy does: round robin within the
//! best priority that has healthy endpoints, passive outlier ejection (three consecutive
//! failures eject an address for a second), and retries on another host (Envoy's
//! `retry_on: connect-failure,reset` with the previous-hosts predicate). Every call is a
//! fresh mTLS connection with the caller's SVID to the address the table names (for a remote
//! network, its east-west gateway), with the `outbound_` SNI, verifying the server's SPIFFE
//! ID. The demo's `order` and the chaos scenarios' clients are this.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trust::tls::{Authorizer, SpiffeVerifier, SvidResolver};
use trust::{TrustDomain, TrustStore};

use meshfed_xds::client::Tables;

/// What to call and how.
pub struct Target {
    /// The xDS cluster (EDS resource) to follow, e.g. `outbound|18080||payment.shop.svc.cluster.local`.
    pub cluster: String,
    /// The SNI to send: `outbound_.<port>_.<subset>_.<host>`.
    pub sni: String,
    /// The caller's SVID.
    pub svid: trust::Svid,
    /// The bundles to verify servers with, asked for on every call (they may change).
    pub roots: Arc<dyn Fn() -> TrustStore + Send + Sync>,
    /// The server identities accepted.
    pub expect: Authorizer,
    /// Names the destination for the counters from the server's trust domain.
    pub label: Arc<dyn Fn(&TrustDomain) -> String + Send + Sync>,
    /// Time between calls.
    pub interval: Duration,
    /// Attempts per call (1 = no retries).
    pub attempts: u32,
    /// Bound on connect, handshake and reply, per attempt.
    pub timeout: Duration,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("cluster", &self.cluster)
            .field("sni", &self.sni)
            .field("expect", &self.expect)
            .field("interval", &self.interval)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// Counters: successful calls per "<label> (P<priority>)", failed calls (every attempt
/// failed), attempts that were retried.
#[derive(Debug, Default)]
pub struct Stats {
    ok: Mutex<BTreeMap<String, u64>>,
    failed: AtomicU64,
    retried: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Stats {
    /// (successful calls per destination, failed calls).
    pub fn snapshot(&self) -> (BTreeMap<String, u64>, u64) {
        (
            self.ok.lock().map(|m| m.clone()).unwrap_or_default(),
            self.failed.load(Ordering::Relaxed),
        )
    }

    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }
}

/// Calls the target until `stop` is set.
pub async fn run(
    t: Target,
    tables: tokio::sync::watch::Receiver<Tables>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
) {
    let Ok(resolver) = SvidResolver::with(&t.svid) else {
        return;
    };
    let mut n = 0usize;
    let mut failures: BTreeMap<String, u32> = BTreeMap::new();
    let mut ejected: BTreeMap<String, Instant> = BTreeMap::new();
    let mut tick = tokio::time::interval(t.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let table = tables.borrow().get(&t.cluster).cloned();
        let Some(table) = table else { continue };
        let now = Instant::now();
        ejected.retain(|_, until| *until > now);
        let mut eps: Vec<(u32, String)> = meshfed_xds::client::endpoints(&table)
            .into_iter()
            .filter(|(_, a, healthy)| *healthy && !ejected.contains_key(a))
            .map(|(p, a, _)| (p, a))
            .collect();
        if eps.is_empty() {
            // Everything ejected or unhealthy: Envoy's panic mode uses all hosts.
            eps = meshfed_xds::client::endpoints(&table)
                .into_iter()
                .map(|(p, a, _)| (p, a))
                .collect();
        }
        if eps.is_empty() {
            continue;
        }
        eps.sort();
        // The first attempt: round robin within the best priority; retries: the other hosts,
        // best priority first.
        let best = eps[0].0;
        let pool: Vec<&(u32, String)> = eps.iter().filter(|e| e.0 == best).collect();
        let first = pool[n % pool.len()].clone();
        let mut order = vec![first.clone()];
        order.extend(eps.iter().filter(|e| **e != first).cloned());
        let mut last_err = None;
        let mut done = false;
        for (attempt, (prio, addr)) in order.iter().take(t.attempts.max(1) as usize).enumerate() {
            if attempt > 0 {
                stats.retried.fetch_add(1, Ordering::Relaxed);
            }
            match call(&t, &resolver, addr, n).await {
                Ok(td) => {
                    failures.remove(addr);
                    if let Ok(mut m) = stats.ok.lock() {
                        *m.entry(format!("{} (P{prio})", (t.label)(&td)))
                            .or_default() += 1;
                    }
                    done = true;
                    break;
                }
                Err(e) => {
                    let f = failures.entry(addr.clone()).or_default();
                    *f += 1;
                    if *f >= 3 {
                        failures.remove(addr);
                        ejected.insert(addr.clone(), Instant::now() + Duration::from_secs(1));
                    }
                    last_err = Some(format!("{addr}: {e:#}"));
                }
            }
        }
        if !done {
            stats.failed.fetch_add(1, Ordering::Relaxed);
        }
        if let (Some(e), Ok(mut l)) = (last_err, stats.last_error.lock()) {
            *l = Some(e);
        }
    }
}

/// One attempt; the server's trust domain on success.
async fn call(
    t: &Target,
    resolver: &Arc<SvidResolver>,
    addr: &str,
    n: usize,
) -> anyhow::Result<TrustDomain> {
    let mut cfg = trust::tls::client_config(
        resolver.clone(),
        SpiffeVerifier::new((t.roots)(), t.expect.clone()),
    )?;
    cfg.alpn_protocols = vec![b"istio".to_vec()];
    let work = async {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from(t.sni.clone())?, tcp)
            .await?;
        let peer = trust::tls::peer_id(tls.get_ref().1.peer_certificates())
            .ok_or_else(|| anyhow::anyhow!("the server presented no SPIFFE ID"))?;
        tls.write_all(format!("call-{n}\n").as_bytes()).await?;
        let mut reply = Vec::new();
        tls.read_to_end(&mut reply).await?;
        anyhow::ensure!(!reply.is_empty(), "empty reply");
        Ok::<_, anyhow::Error>(peer.trust_domain())
    };
    tokio::time::timeout(t.timeout, work)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {:?}", t.timeout))?
}
