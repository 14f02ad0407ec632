//! One place for the certificates a process holds and renews (the shape of ztunnel's
//! `SecretManager`). A [`Managed`] certificate lives in a watch channel and in the rustls
//! resolver that serves it; [`Managed::run`] renews it at a jittered 50-80 % of its lifetime
//! with the process's own issue function (a local CA, the federator's Renew RPC, the agent's VM
//! API), retries a failed renewal with exponential backoff that never waits past expiry, and
//! publishes every renewal. The federator's serving certificate, the agent's serving and
//! cluster certificates and the VM's workload certificate are all managed here.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use trust::tls::SvidResolver;
use trust::Svid;

/// Issues a fresh certificate (and stores it where the process keeps it, if anywhere).
pub type IssueFn =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = anyhow::Result<Svid>> + Send>> + Send + Sync>;

/// Wraps an async closure as an [`IssueFn`].
pub fn issue_fn<F, Fut>(f: F) -> IssueFn
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<Svid>> + Send + 'static,
{
    Arc::new(move || Box::pin(f()))
}

/// Retry timing after a failed renewal.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

/// One certificate: what is served now, and who is told when it changes.
#[derive(Debug)]
pub struct Managed {
    name: String,
    resolver: Arc<SvidResolver>,
    tx: watch::Sender<Option<Arc<Svid>>>,
    renew: tokio::sync::Notify,
}

impl Managed {
    /// A certificate that starts as `initial` (`None`: renew at once, serve nothing until then).
    pub fn new(name: &str, initial: Option<Svid>) -> anyhow::Result<Arc<Managed>> {
        Self::with_resolver(name, initial, SvidResolver::new())
    }

    /// The same, serving from an existing resolver.
    pub fn with_resolver(
        name: &str,
        initial: Option<Svid>,
        resolver: Arc<SvidResolver>,
    ) -> anyhow::Result<Arc<Managed>> {
        if let Some(s) = &initial {
            resolver.install(s)?;
        }
        Ok(Arc::new(Managed {
            name: name.to_string(),
            resolver,
            tx: watch::Sender::new(initial.map(Arc::new)),
            renew: tokio::sync::Notify::new(),
        }))
    }

    /// The resolver TLS configurations serve this certificate from (renewals are live).
    pub fn resolver(&self) -> Arc<SvidResolver> {
        self.resolver.clone()
    }

    pub fn current(&self) -> Option<Arc<Svid>> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Option<Arc<Svid>>> {
        self.tx.subscribe()
    }

    /// Installs a certificate obtained elsewhere (e.g. the first one of a join).
    pub fn install(&self, svid: Svid) -> anyhow::Result<()> {
        self.resolver.install(&svid)?;
        self.tx.send_replace(Some(Arc::new(svid)));
        Ok(())
    }

    /// Renews now instead of at the scheduled time (a new CA root signs).
    pub fn renew_soon(&self) {
        self.renew.notify_one();
    }

    /// Renews for as long as the task runs.
    pub async fn run(self: Arc<Self>, issue: IssueFn, backoff: Backoff) {
        let mut retry = backoff.min;
        // A failed renewal is tried again after its backoff, also when it was asked for early
        // (renew_soon: a new root signs) and the schedule is still far.
        let mut failed = false;
        loop {
            let wait = match self.current() {
                Some(_) if failed => Duration::ZERO,
                Some(s) => until(s.renew_at()),
                None => Duration::ZERO,
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.renew.notified() => {}
            }
            match issue().await.and_then(|s| self.install(s)) {
                Ok(()) => {
                    retry = backoff.min;
                    failed = false;
                    tracing::info!(certificate = %self.name, "renewed");
                }
                Err(e) => {
                    // Never sleep past the current certificate's expiry.
                    let left = self
                        .current()
                        .map(|s| until(s.not_after))
                        .unwrap_or(backoff.max);
                    let wait = retry.min(left.max(backoff.min));
                    tracing::warn!(certificate = %self.name, error = %format!("{e:#}"), retry_in = ?wait, "cannot renew");
                    tokio::time::sleep(wait).await;
                    retry = (retry * 2).min(backoff.max);
                    failed = true;
                }
            }
        }
    }
}

/// How long until `t` (zero if it has passed).
fn until(t: time::OffsetDateTime) -> Duration {
    let d = t - time::OffsetDateTime::now_utc();
    Duration::try_from(d).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use trust::{CaOptions, CertificateAuthority, SpiffeId, TrustDomain};

    fn ca() -> Arc<CertificateAuthority> {
        let td = TrustDomain::new("test.mesh").unwrap();
        Arc::new(CertificateAuthority::create(td, CaOptions::default()).unwrap())
    }

    fn issue(ca: &CertificateAuthority, ttl: time::Duration) -> Svid {
        let id = SpiffeId::new("spiffe://test.mesh/ns/a/sa/b").unwrap();
        ca.issue_svid(&id, &trust::ca::policy::AnyWorkload, ttl)
            .unwrap()
    }

    /// Renewals that fail are retried with backoff until one succeeds, which is installed in the
    /// resolver and published; nothing waits on wall-clock sleeps (tokio's clock is paused and
    /// advances only when every task waits).
    #[tokio::test(start_paused = true)]
    async fn failed_renewals_back_off_then_the_renewal_is_installed_and_published() {
        let ca = ca();
        let m = Managed::new("test", None).unwrap();
        assert!(m.resolver().current().is_none());
        let attempts = Arc::new(AtomicU32::new(0));
        let (a, c) = (attempts.clone(), ca.clone());
        let f = issue_fn(move || {
            let (a, c) = (a.clone(), c.clone());
            async move {
                if a.fetch_add(1, Ordering::SeqCst) < 3 {
                    anyhow::bail!("the issuer is down");
                }
                Ok(issue(&c, time::Duration::hours(1)))
            }
        });
        let mut rx = m.subscribe();
        tokio::spawn(m.clone().run(f, Backoff::default()));
        rx.wait_for(|s| s.is_some()).await.unwrap();
        assert_eq!(attempts.load(Ordering::SeqCst), 4);
        assert!(m.resolver().current().is_some());
    }

    /// A certificate is renewed before it expires, again and again.
    #[tokio::test(start_paused = true)]
    async fn certificates_are_renewed_within_their_lifetime() {
        let ca = ca();
        let first = issue(&ca, time::Duration::hours(1));
        let m = Managed::new("test", Some(first.clone())).unwrap();
        let c = ca.clone();
        let f = issue_fn(move || {
            let c = c.clone();
            async move { Ok(issue(&c, time::Duration::hours(1))) }
        });
        let mut rx = m.subscribe();
        rx.borrow_and_update();
        tokio::spawn(m.clone().run(f, Backoff::default()));
        rx.changed().await.unwrap();
        let renewed = m.current().unwrap();
        assert_ne!(renewed.chain[0], first.chain[0]);
    }

    /// A renewal asked for early (a new root signs) that fails is tried again after its
    /// backoff, not at the certificate's far schedule (a federator replica still taking the
    /// new CA refuses the first attempt).
    #[tokio::test(start_paused = true)]
    async fn an_early_renewal_that_fails_is_tried_again() {
        let ca = ca();
        let first = issue(&ca, time::Duration::days(7));
        let m = Managed::new("test", Some(first.clone())).unwrap();
        let attempts = Arc::new(AtomicU32::new(0));
        let (a, c) = (attempts.clone(), ca.clone());
        let f = issue_fn(move || {
            let (a, c) = (a.clone(), c.clone());
            async move {
                if a.fetch_add(1, Ordering::SeqCst) < 2 {
                    anyhow::bail!("this replica is taking a newer federation CA");
                }
                Ok(issue(&c, time::Duration::days(7)))
            }
        });
        let mut rx = m.subscribe();
        rx.borrow_and_update();
        tokio::spawn(m.clone().run(f, Backoff::default()));
        m.renew_soon();
        let t0 = tokio::time::Instant::now();
        rx.changed().await.unwrap();
        assert_eq!(attempts.load(Ordering::SeqCst), 3);
        assert_ne!(m.current().unwrap().chain[0], first.chain[0]);
        // Two backoffs (1 s, 2 s), not the days until the scheduled renewal.
        assert!(t0.elapsed() < Duration::from_secs(60), "{:?}", t0.elapsed());
    }
}
