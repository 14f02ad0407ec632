//! Make-before-break root rotation.
//!
//! Timeline for a rotation begun at `t0` with publish lead `L` (3-5 x the bundle refresh hint):
//! 1. `t0`: a new root (and its signing intermediate) is generated and enters the published
//!    bundle (sequence + 1) in state `Pending`. It signs nothing yet, so every peer can learn it.
//! 2. `t0 + L`: the new generation becomes `Active` and signs every new certificate; the old one
//!    becomes `Retiring` with `remove_after` = the latest expiry of anything it signed.
//!    Workloads renew at 50-80 % of their lifetime and so move to the new root.
//! 3. `remove_after`: the old root leaves the bundle (sequence + 1). No valid certificate
//!    chains to it any more, so no handshake can fail because of its removal.

use time::{Duration, OffsetDateTime};

use super::{CaOptions, CertificateAuthority, Generation, Signer};
use crate::error::{Result, TrustError};

/// Where a generation is in its life.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum GenerationState {
    /// Published in the bundle; starts signing at `activate_at`.
    Pending {
        #[serde(with = "time::serde::rfc3339")]
        activate_at: OffsetDateTime,
    },
    /// Signs new certificates.
    Active,
    /// No longer signs; leaves the bundle after `remove_after`.
    Retiring {
        #[serde(with = "time::serde::rfc3339")]
        remove_after: OffsetDateTime,
    },
}

/// What [`CertificateAuthority::advance`] changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RotationChange {
    /// The published bundle changed (its sequence went up): republish it.
    pub bundle_changed: bool,
    /// A different generation signs now: renew leaves when convenient.
    pub signer_changed: bool,
}

impl CertificateAuthority {
    /// The default publish lead: four times the bundle refresh hint.
    pub fn default_publish_lead(&self) -> Duration {
        self.refresh_hint * 4
    }

    /// Starts a rotation to a freshly generated root. The new root is published at once and
    /// signs from `now + publish_lead`.
    pub fn begin_rotation(&mut self, now: OffsetDateTime, publish_lead: Duration) -> Result<()> {
        let mut g = Generation::create(&self.trust_domain, &self.options, now)?;
        g.state = GenerationState::Pending {
            activate_at: now + publish_lead,
        };
        self.add_pending(g)
    }

    /// Starts a rotation to a plug-in CA (e.g. a new Istio `cacerts`): `chain` is
    /// `[signing cert, ..., root]`.
    pub fn begin_rotation_to(
        &mut self,
        chain: Vec<rustls_pki_types::CertificateDer<'static>>,
        key: rcgen::KeyPair,
        now: OffsetDateTime,
        publish_lead: Duration,
    ) -> Result<()> {
        let root = chain
            .last()
            .cloned()
            .ok_or_else(|| TrustError::Ca("new CA chain is empty".into()))?;
        crate::svid::check_signer(&chain[0], &self.trust_domain)
            .map_err(|e| TrustError::cert("new CA certificate", e.to_string()))?;
        let g = Generation {
            root,
            root_key: None,
            signer: Signer::new(chain, key)?,
            state: GenerationState::Pending {
                activate_at: now + publish_lead,
            },
            last_issued_expiry: Default::default(),
        };
        self.add_pending(g)
    }

    fn add_pending(&mut self, g: Generation) -> Result<()> {
        if self
            .generations
            .iter()
            .any(|g| matches!(g.state, GenerationState::Pending { .. }))
        {
            return Err(TrustError::Ca("a rotation is already in progress".into()));
        }
        self.generations.push(g);
        self.bundle_sequence += 1;
        tracing::info!(trust_domain = %self.trust_domain, sequence = self.bundle_sequence, "new root published; it will sign after the publish lead");
        Ok(())
    }

    /// Moves the rotation forward to `now`: activates a pending root whose time has come and
    /// drops retiring roots whose last certificate has expired.
    pub fn advance(&mut self, now: OffsetDateTime) -> RotationChange {
        self.advance_gated(now, true)
    }

    /// [`advance`](Self::advance), activating a pending root only when `may_activate` also
    /// holds (the agent passes "every importer holds the new bundle").
    pub fn advance_gated(&mut self, now: OffsetDateTime, may_activate: bool) -> RotationChange {
        self.advance_gated_with(now, may_activate, Duration::ZERO)
    }

    /// [`advance_gated`](Self::advance_gated), where others signed with this CA's active root
    /// too and their certificates may live up to `others_until` from now (agent replicas that
    /// share it): a root that stops signing stays in the bundle at least that long.
    pub fn advance_gated_with(
        &mut self,
        now: OffsetDateTime,
        may_activate: bool,
        others_until: Duration,
    ) -> RotationChange {
        let due = self.generations.iter().position(
            |g| matches!(g.state, GenerationState::Pending { activate_at } if activate_at <= now),
        );
        self.step(now, due.filter(|_| may_activate), others_until)
    }

    /// Activates the pending root now, before its publish lead has passed (`meshfed ca rotate
    /// activate`, once every importer holds it). Refused when no rotation is pending.
    pub fn activate_now(&mut self, now: OffsetDateTime) -> Result<RotationChange> {
        let pending = self
            .generations
            .iter()
            .position(|g| matches!(g.state, GenerationState::Pending { .. }))
            .ok_or_else(|| TrustError::Ca("no rotation is pending".into()))?;
        Ok(self.step(now, Some(pending), Duration::ZERO))
    }

    /// The pending generation's activation time, when a rotation is pending.
    pub fn pending_activation(&self) -> Option<OffsetDateTime> {
        self.generations.iter().find_map(|g| match g.state {
            GenerationState::Pending { activate_at } => Some(activate_at),
            _ => None,
        })
    }

    fn step(
        &mut self,
        now: OffsetDateTime,
        activate: Option<usize>,
        others_until: Duration,
    ) -> RotationChange {
        let mut change = RotationChange::default();
        if let Some(new) = activate {
            for g in &mut self.generations {
                if g.state == GenerationState::Active {
                    let remove_after = g
                        .last_issued_expiry()
                        .unwrap_or(now)
                        .max(now)
                        .max(now + others_until);
                    g.state = GenerationState::Retiring { remove_after };
                }
            }
            self.generations[new].state = GenerationState::Active;
            change.signer_changed = true;
            tracing::info!(trust_domain = %self.trust_domain, "new root now signs; the previous one is retiring");
        }
        let before = self.generations.len();
        self.generations.retain(
            |g| !matches!(g.state, GenerationState::Retiring { remove_after } if remove_after <= now),
        );
        if self.generations.len() != before {
            self.bundle_sequence += 1;
            change.bundle_changed = true;
            tracing::info!(trust_domain = %self.trust_domain, sequence = self.bundle_sequence, "retired root removed from the bundle");
        }
        change
    }

    /// The options new generations are made with.
    pub fn options(&self) -> &CaOptions {
        &self.options
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::policy::AnyWorkload;
    use crate::spiffe_id::{SpiffeId, TrustDomain};

    #[test]
    fn timeline_publishes_before_signing_and_retires_after_last_leaf() {
        let td = TrustDomain::new("east.mesh").unwrap();
        let mut ca = CertificateAuthority::create(td, CaOptions::default()).unwrap();
        let id = SpiffeId::new("spiffe://east.mesh/ns/a/sa/b").unwrap();
        let old_leaf = ca
            .issue_svid(&id, &AnyWorkload, Duration::hours(1))
            .unwrap();
        let old_root = ca.roots()[0].clone();
        let t0 = OffsetDateTime::now_utc();
        assert_eq!(ca.bundle().sequence, Some(1));

        ca.begin_rotation(t0, Duration::minutes(20)).unwrap();
        assert!(ca.begin_rotation(t0, Duration::minutes(20)).is_err());
        let b = ca.bundle();
        assert_eq!(b.sequence, Some(2));
        assert_eq!(b.x509_authorities.len(), 2);
        // Still signing with the old root until the lead has passed.
        assert_eq!(
            ca.advance(t0 + Duration::minutes(19)),
            RotationChange::default()
        );
        let leaf = ca
            .issue_svid(&id, &AnyWorkload, Duration::hours(1))
            .unwrap();
        assert_eq!(leaf.chain[1], ca.generations[0].signer.chain[0]);

        let c = ca.advance(t0 + Duration::minutes(20));
        assert!(c.signer_changed && !c.bundle_changed);
        let leaf = ca
            .issue_svid(&id, &AnyWorkload, Duration::hours(1))
            .unwrap();
        assert_eq!(leaf.chain[1], ca.generations[1].signer.chain[0]);
        let GenerationState::Retiring { remove_after } = ca.generations[0].state.clone() else {
            panic!(
                "old generation should be retiring: {:?}",
                ca.generations[0].state
            )
        };
        assert!(remove_after >= old_leaf.not_after);

        // Before the last old leaf expires the old root stays published.
        assert!(
            !ca.advance(remove_after - Duration::seconds(1))
                .bundle_changed
        );
        assert!(ca.roots().contains(&old_root));
        let c = ca.advance(remove_after);
        assert!(c.bundle_changed);
        assert_eq!(ca.bundle().sequence, Some(3));
        assert!(!ca.roots().contains(&old_root));
        assert_eq!(ca.roots().len(), 1);
    }

    /// Others signing with the same active root (agent replicas): the old root stays at least
    /// `others_until` past the activation, though this CA's own last leaf expires sooner.
    #[test]
    fn a_root_others_signed_with_stays_for_their_longest_certificate() {
        let td = TrustDomain::new("east.mesh").unwrap();
        let mut ca = CertificateAuthority::create(td, CaOptions::default()).unwrap();
        let t0 = OffsetDateTime::now_utc();
        ca.begin_rotation(t0, Duration::minutes(20)).unwrap();
        let at = t0 + Duration::minutes(20);
        let c = ca.advance_gated_with(at, true, Duration::hours(24));
        assert!(c.signer_changed);
        let GenerationState::Retiring { remove_after } = ca.generations[0].state.clone() else {
            panic!("{:?}", ca.generations[0].state)
        };
        assert_eq!(remove_after, at + Duration::hours(24));
        assert!(!ca.advance(at + Duration::hours(23)).bundle_changed);
        assert!(ca.advance(at + Duration::hours(24)).bundle_changed);
    }
}
