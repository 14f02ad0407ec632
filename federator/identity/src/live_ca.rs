//! The cluster CA while the agent runs: one in-memory CA that signs, kept in step with its
//! directory (which `meshfed ca rotate` and `meshfed ca issue` change under the same lock), and
//! the make-before-break rotation driven from here.
//!
//! [`LiveCa::step`] is called on a timer by the agent. It reloads the CA when another process
//! changed it, starts a rotation when the active root is older than the rotation period, and
//! advances it: a pending root signs only once its publish lead has passed **and** the caller
//! says every importer holds the bundle that carries it; a retiring root leaves the bundle
//! once the last certificate it signed (in any process) has expired. The bundle and the
//! signing generation are published on watch channels, so the bundle reaches the federator,
//! the proxies' trust files and the TLS verifiers without a restart, and leaves renew.

use std::path::PathBuf;
use std::sync::{Mutex, RwLock};

use anyhow::Context;
use time::{Duration, OffsetDateTime};
use tokio::sync::watch;
use trust::ca::{CaDir, GenerationState, IssuancePolicy};
use trust::{CertificateAuthority, IssuedCert, SpiffeId, Svid, TrustBundle, TrustDomain};

/// When the agent starts rotations by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    /// Start a rotation when the active root is this old (`None`: only `meshfed ca rotate`).
    pub period: Option<Duration>,
    /// How long a new root is published before it may sign.
    pub publish_lead: Duration,
}

/// What one [`LiveCa::step`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stepped {
    pub reloaded: bool,
    pub began: bool,
    pub bundle_changed: bool,
    pub signer_changed: bool,
}

/// One generation, as reported on `/status` and by `meshfed ca rotate status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GenerationReport {
    /// SHA-256 of the root, first 16 hex digits.
    pub root: String,
    /// pending, active or retiring.
    pub state: String,
    pub created_at: String,
    pub root_not_after: String,
    pub signer_not_after: String,
    /// Pending: when it may sign. Retiring: when it leaves the bundle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
}

/// The CA's rotation state.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaReport {
    pub trust_domain: String,
    pub bundle_sequence: u64,
    pub generations: Vec<GenerationReport>,
    /// The active signing certificate's expiry (RFC 3339) and the whole days left.
    pub signer_not_after: String,
    pub signer_days_left: i64,
    /// Members that do not yet hold the bundle a pending root is waiting on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
}

/// The CA a running agent signs with.
#[derive(Debug)]
pub struct LiveCa {
    dir: CaDir,
    ca: RwLock<CertificateAuthority>,
    /// `meshfed-ca.json` as this process last read or wrote it.
    seen: Mutex<Vec<u8>>,
    /// Another process changed the CA: reload at the next step.
    dirty: std::sync::atomic::AtomicBool,
    bundle: watch::Sender<TrustBundle>,
    signer: watch::Sender<u64>,
    waiting_for: Mutex<Vec<String>>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl LiveCa {
    /// Opens the CA saved in `dir`.
    pub fn open(dir: PathBuf) -> anyhow::Result<LiveCa> {
        let dir = CaDir::new(dir);
        let lock = dir.lock()?;
        let ca = dir
            .load(&lock)
            .with_context(|| format!("cannot load the CA in {}", dir.path().display()))?;
        let seen = dir.metadata(&lock)?;
        drop(lock);
        Ok(LiveCa {
            bundle: watch::Sender::new(ca.bundle()),
            signer: watch::Sender::new(0),
            dir,
            ca: RwLock::new(ca),
            seen: Mutex::new(seen),
            dirty: Default::default(),
            waiting_for: Mutex::new(Vec::new()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, CertificateAuthority> {
        self.ca.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn trust_domain(&self) -> TrustDomain {
        self.read().trust_domain().clone()
    }

    /// The bundle published now.
    pub fn bundle(&self) -> TrustBundle {
        self.bundle.borrow().clone()
    }

    /// The published bundle, as it changes.
    pub fn subscribe_bundle(&self) -> watch::Receiver<TrustBundle> {
        self.bundle.subscribe()
    }

    /// Changes whenever a different generation signs (leaves should renew).
    pub fn subscribe_signer(&self) -> watch::Receiver<u64> {
        self.signer.subscribe()
    }

    /// The root of the generation that signs now.
    pub fn signing_root(&self) -> Option<rustls_pki_types::CertificateDer<'static>> {
        self.read()
            .generations()
            .iter()
            .find(|g| *g.state() == GenerationState::Active)
            .map(|g| g.root().clone())
    }

    /// Every root in the published bundle.
    pub fn roots(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.read().roots()
    }

    /// When the signing certificate expires.
    pub fn signer_not_after(&self) -> OffsetDateTime {
        self.read().signer_not_after()
    }

    /// Issues an SVID with a key made here and records the issuance in the CA directory.
    pub fn issue_svid(
        &self,
        id: &SpiffeId,
        policy: &dyn IssuancePolicy,
        ttl: Duration,
    ) -> anyhow::Result<Svid> {
        self.issue_svid_with_dns(id, &[], policy, ttl)
    }

    /// An SVID that also names `dns` (a server's names).
    pub fn issue_svid_with_dns(
        &self,
        id: &SpiffeId,
        dns: &[String],
        policy: &dyn IssuancePolicy,
        ttl: Duration,
    ) -> anyhow::Result<Svid> {
        let ca = self.read();
        let svid = ca.issue_svid_with_dns(id, dns, policy, ttl)?;
        self.record(&ca)?;
        Ok(svid)
    }

    /// Signs a CSR and records the issuance in the CA directory.
    pub fn sign_csr(
        &self,
        csr: &[u8],
        policy: &dyn IssuancePolicy,
        ttl: Duration,
    ) -> anyhow::Result<IssuedCert> {
        let ca = self.read();
        let issued = ca.sign_csr(csr, policy, ttl)?;
        self.record(&ca)?;
        Ok(issued)
    }

    fn record(&self, ca: &CertificateAuthority) -> anyhow::Result<()> {
        let (before, after) = self
            .dir
            .record_issued(ca)
            .context("cannot record the issued certificate in the CA directory")?;
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if before != *seen {
            self.dirty.store(true, std::sync::atomic::Ordering::Release);
        } else {
            *seen = after;
        }
        Ok(())
    }

    /// The sequence of the bundle a pending root waits on, when its publish lead has passed:
    /// the caller then asks whether every importer holds that bundle.
    pub fn activation_due(&self, now: OffsetDateTime) -> Option<u64> {
        let ca = self.read();
        ca.pending_activation()
            .filter(|t| *t <= now)
            .map(|_| ca.bundle_sequence())
    }

    /// Who the pending root waits on (shown in the report).
    pub fn set_waiting_for(&self, clusters: Vec<String>) {
        *self.waiting_for.lock().unwrap_or_else(|p| p.into_inner()) = clusters;
    }

    /// Reloads, starts and advances rotation; see the module documentation.
    pub fn step(
        &self,
        now: OffsetDateTime,
        policy: &RotationPolicy,
        may_activate: bool,
    ) -> anyhow::Result<Stepped> {
        self.step_with(now, policy, may_activate, Duration::ZERO)
    }

    /// [`step`](Self::step) for a CA others sign with too (agent replicas sharing it): a root
    /// that stops signing stays published at least `others_until` longer, since their
    /// certificates under it (they switch only when they take the new CA) may live that long.
    pub fn step_with(
        &self,
        now: OffsetDateTime,
        policy: &RotationPolicy,
        may_activate: bool,
        others_until: Duration,
    ) -> anyhow::Result<Stepped> {
        let mut ca = self.ca.write().unwrap_or_else(|p| p.into_inner());
        let lock = self.dir.lock()?;
        let mut out = Stepped::default();
        let meta = self.dir.metadata(&lock)?;
        let active_before = active_root(&ca);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if meta != *seen || self.dirty.swap(false, std::sync::atomic::Ordering::AcqRel) {
                *ca = self.dir.load(&lock).with_context(|| {
                    format!("cannot reload the CA in {}", self.dir.path().display())
                })?;
                *seen = meta;
                out.reloaded = true;
            }
        }
        if let Some(period) = policy.period {
            let active_age = ca
                .generations()
                .iter()
                .find(|g| *g.state() == GenerationState::Active)
                .map(|g| now - g.created_at());
            if ca.pending_activation().is_none() && active_age.is_some_and(|a| a >= period) {
                ca.begin_rotation(now, policy.publish_lead)?;
                out.began = true;
                tracing::info!(trust_domain = %ca.trust_domain(), sequence = ca.bundle_sequence(), "the active root is older than the rotation period: a new root is published");
            }
        }
        let change = ca.advance_gated_with(now, may_activate, others_until);
        if out.began || change.bundle_changed || change.signer_changed {
            self.dir.save(&lock, &ca)?;
            *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = self.dir.metadata(&lock)?;
        }
        drop(lock);
        let bundle = ca.bundle();
        out.bundle_changed = self.bundle.send_if_modified(|b| {
            if *b == bundle {
                false
            } else {
                *b = bundle;
                true
            }
        });
        if active_root(&ca) != active_before {
            out.signer_changed = true;
            self.signer.send_modify(|n| *n += 1);
        }
        Ok(out)
    }

    /// The CA's state for `/status` and the command line.
    pub fn report(&self, now: OffsetDateTime) -> CaReport {
        let ca = self.read();
        report_of(
            &ca,
            now,
            self.waiting_for
                .lock()
                .map(|w| w.clone())
                .unwrap_or_default(),
        )
    }
}

fn active_root(ca: &CertificateAuthority) -> Option<Vec<u8>> {
    ca.generations()
        .iter()
        .find(|g| *g.state() == GenerationState::Active)
        .map(|g| g.root().to_vec())
}

/// The report of a CA (also for one loaded from disk by the command line).
pub fn report_of(
    ca: &CertificateAuthority,
    now: OffsetDateTime,
    waiting_for: Vec<String>,
) -> CaReport {
    let generations = ca
        .generations()
        .iter()
        .map(|g| {
            let (state, until) = match g.state() {
                GenerationState::Pending { activate_at } => {
                    ("pending", Some(rfc3339(*activate_at)))
                }
                GenerationState::Active => ("active", None),
                GenerationState::Retiring { remove_after } => {
                    ("retiring", Some(rfc3339(*remove_after)))
                }
            };
            GenerationReport {
                root: trust::keys::fingerprint(g.root())[..16].to_string(),
                state: state.into(),
                created_at: rfc3339(g.created_at()),
                root_not_after: rfc3339(g.root_not_after()),
                signer_not_after: rfc3339(g.signer_not_after()),
                until,
            }
        })
        .collect();
    let signer = ca.signer_not_after();
    CaReport {
        trust_domain: ca.trust_domain().to_string(),
        bundle_sequence: ca.bundle_sequence(),
        generations,
        signer_not_after: rfc3339(signer),
        signer_days_left: (signer - now).whole_days(),
        waiting_for,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trust::ca::policy::AnyWorkload;
    use trust::CaOptions;

    fn setup() -> (tempfile::TempDir, LiveCa) {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("east.mesh").unwrap();
        CertificateAuthority::create(td, CaOptions::default())
            .unwrap()
            .save(dir.path())
            .unwrap();
        let live = LiveCa::open(dir.path().to_path_buf()).unwrap();
        (dir, live)
    }

    const MANUAL: RotationPolicy = RotationPolicy {
        period: None,
        publish_lead: Duration::ZERO,
    };

    /// A rotation started by another process (the command line) is picked up; the new root
    /// signs only once the caller says it has been distributed; the old root leaves after the
    /// last leaf it signed expired.
    #[test]
    fn a_rotation_begun_elsewhere_is_followed_and_gated_on_distribution() {
        let (d, live) = setup();
        let id = SpiffeId::new("spiffe://east.mesh/ns/a/sa/b").unwrap();
        let old = live
            .issue_svid(&id, &AnyWorkload, Duration::seconds(30))
            .unwrap();
        let mut bundles = live.subscribe_bundle();
        let mut signer = live.subscribe_signer();
        bundles.borrow_and_update();
        signer.borrow_and_update();
        let t0 = OffsetDateTime::now_utc();
        CaDir::new(d.path())
            .update(|ca| ca.begin_rotation(t0, Duration::ZERO))
            .unwrap();
        let s = live.step(t0, &MANUAL, false).unwrap();
        assert!(s.reloaded && s.bundle_changed && !s.signer_changed, "{s:?}");
        assert!(bundles.has_changed().unwrap());
        assert_eq!(live.bundle().sequence, Some(2));
        assert_eq!(live.bundle().x509_authorities.len(), 2);
        assert_eq!(live.activation_due(t0), Some(2));
        // Not distributed: the old root still signs.
        assert!(!live.step(t0, &MANUAL, false).unwrap().signer_changed);
        let leaf = live
            .issue_svid(&id, &AnyWorkload, Duration::seconds(10))
            .unwrap();
        assert_eq!(leaf.chain[1], old.chain[1]);
        // Distributed: the new root signs, leaves are told to renew.
        let s = live.step(t0, &MANUAL, true).unwrap();
        assert!(s.signer_changed, "{s:?}");
        assert!(signer.has_changed().unwrap());
        let new_leaf = live
            .issue_svid(&id, &AnyWorkload, Duration::seconds(10))
            .unwrap();
        assert_ne!(new_leaf.chain[1], old.chain[1]);
        // The old root stays while its last leaf (30 s) is valid, then leaves: sequence 3.
        let s = live
            .step(t0 + Duration::seconds(20), &MANUAL, true)
            .unwrap();
        assert!(!s.bundle_changed, "{s:?}");
        let s = live
            .step(old.not_after + Duration::seconds(1), &MANUAL, true)
            .unwrap();
        assert!(s.bundle_changed, "{s:?}");
        assert_eq!(live.bundle().sequence, Some(3));
        assert_eq!(live.bundle().x509_authorities.len(), 1);
        let r = live.report(OffsetDateTime::now_utc());
        assert_eq!(r.generations.len(), 1);
        assert_eq!(r.generations[0].state, "active");
    }

    /// With a rotation period the agent starts rotations by itself, once per period.
    #[test]
    fn a_rotation_period_starts_a_rotation_when_the_root_is_old() {
        let (_d, live) = setup();
        let now = OffsetDateTime::now_utc();
        let p = RotationPolicy {
            period: Some(Duration::days(30)),
            publish_lead: Duration::minutes(20),
        };
        assert!(!live.step(now, &p, true).unwrap().began);
        let later = now + Duration::days(31);
        let s = live.step(later, &p, true).unwrap();
        assert!(s.began && s.bundle_changed && !s.signer_changed, "{s:?}");
        // Only one rotation at a time.
        assert!(!live.step(later, &p, true).unwrap().began);
        let s = live.step(later + Duration::minutes(20), &p, true).unwrap();
        assert!(s.signer_changed, "{s:?}");
        // The saved CA agrees (a restarted agent continues from here).
        let back = LiveCa::open(live.dir.path().to_path_buf()).unwrap();
        assert_eq!(back.bundle(), live.bundle());
    }
}
