//! Issuance policy: which SPIFFE IDs a caller may obtain from a CA. The CA itself always
//! refuses IDs outside its trust domain and IDs without a path; a policy narrows further.

use crate::spiffe_id::SpiffeId;

/// Decides whether the caller the policy was built for may obtain `id`.
pub trait IssuancePolicy: Send + Sync {
    /// `Err(reason)` refuses; the reason is shown to the caller.
    fn check(&self, id: &SpiffeId) -> Result<(), String>;
}

/// Any workload identity in the CA's trust domain (for the CA's own operator).
#[derive(Debug, Clone, Copy, Default)]
pub struct AnyWorkload;

impl IssuancePolicy for AnyWorkload {
    fn check(&self, _id: &SpiffeId) -> Result<(), String> {
        Ok(())
    }
}

/// Exactly one of the listed identities.
#[derive(Debug, Clone)]
pub struct ExactIds(pub Vec<SpiffeId>);

impl IssuancePolicy for ExactIds {
    fn check(&self, id: &SpiffeId) -> Result<(), String> {
        if self.0.iter().any(|allowed| allowed == id) {
            Ok(())
        } else {
            let list: Vec<_> = self.0.iter().map(|i| i.as_str()).collect();
            Err(format!("this caller may only obtain {}", list.join(", ")))
        }
    }
}

/// Istio-form identities of one namespace, optionally of one service account
/// (what a VM of a WorkloadGroup, or a pod of a namespace, may obtain).
#[derive(Debug, Clone)]
pub struct IstioIdentity {
    pub namespace: String,
    pub service_account: Option<String>,
}

impl IssuancePolicy for IstioIdentity {
    fn check(&self, id: &SpiffeId) -> Result<(), String> {
        let Some((ns, sa)) = id.istio_parts() else {
            return Err("not of the form /ns/<namespace>/sa/<service-account>".into());
        };
        if ns != self.namespace {
            return Err(format!(
                "namespace {ns:?} is not the caller's namespace {:?}",
                self.namespace
            ));
        }
        match &self.service_account {
            Some(want) if want != sa => Err(format!(
                "service account {sa:?} is not the caller's service account {want:?}"
            )),
            _ => Ok(()),
        }
    }
}

impl<F> IssuancePolicy for F
where
    F: Fn(&SpiffeId) -> Result<(), String> + Send + Sync,
{
    fn check(&self, id: &SpiffeId) -> Result<(), String> {
        self(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    #[test]
    fn istio_identity_policy() {
        let p = IstioIdentity {
            namespace: "shop".into(),
            service_account: Some("vm".into()),
        };
        assert!(p.check(&id("spiffe://e/ns/shop/sa/vm")).is_ok());
        let e = p.check(&id("spiffe://e/ns/shop/sa/admin")).unwrap_err();
        assert!(e.contains("\"admin\""), "{e}");
        assert!(p.check(&id("spiffe://e/ns/kube-system/sa/vm")).is_err());
        assert!(p.check(&id("spiffe://e/workload/x")).is_err());
        let exact = ExactIds(vec![id("spiffe://e/a")]);
        assert!(exact.check(&id("spiffe://e/a")).is_ok());
        assert!(exact
            .check(&id("spiffe://e/b"))
            .unwrap_err()
            .contains("spiffe://e/a"));
    }
}
