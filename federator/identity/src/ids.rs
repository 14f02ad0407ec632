//! The SPIFFE IDs meshfed's own parties hold: the federator and each member cluster in the
//! federation trust domain, and each cluster's agent in the cluster's trust domain.

use trust::{SpiffeId, TrustDomain};

pub fn cluster_spiffe_id(td: &TrustDomain, cluster: &str) -> anyhow::Result<SpiffeId> {
    Ok(SpiffeId::from_parts(td, &format!("/cluster/{cluster}"))?)
}

pub fn federator_spiffe_id(td: &TrustDomain) -> anyhow::Result<SpiffeId> {
    Ok(SpiffeId::from_parts(td, "/federator")?)
}

/// The cluster a federation identity names, if it is one.
pub fn cluster_of(id: &SpiffeId, td: &TrustDomain) -> Option<String> {
    if id.trust_domain_str() != td.as_str() {
        return None;
    }
    let rest = id.path().strip_prefix("/cluster/")?;
    (!rest.contains('/')).then(|| rest.to_string())
}

/// `spiffe://<td>/admin/<name>`: an operator of the federation (the admin API).
pub fn admin_spiffe_id(td: &TrustDomain, name: &str) -> anyhow::Result<SpiffeId> {
    Ok(SpiffeId::from_parts(td, &format!("/admin/{name}"))?)
}

/// The operator a federation identity names, if it is one.
pub fn admin_of(id: &SpiffeId, td: &TrustDomain) -> Option<String> {
    if id.trust_domain_str() != td.as_str() {
        return None;
    }
    let rest = id.path().strip_prefix("/admin/")?;
    (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_string())
}

/// The agent's serving identity in its cluster's trust domain (what xDS clients and VMs check).
pub fn agent_spiffe_id(td: &TrustDomain) -> anyhow::Result<trust::SpiffeId> {
    Ok(trust::SpiffeId::istio_workload(
        td,
        "meshfed-system",
        "meshfed-agent",
    )?)
}

/// `spiffe://<td>/meshfed/vm/<vm id>`.
pub fn credential_id(td: &TrustDomain, vm_id: &str) -> Result<SpiffeId, String> {
    SpiffeId::from_parts(td, &format!("/meshfed/vm/{vm_id}")).map_err(|e| e.to_string())
}

/// The VM a credential identity names, if it is one.
pub fn vm_id_of(id: &SpiffeId) -> Option<&str> {
    id.path()
        .strip_prefix("/meshfed/vm/")
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_identities() {
        let td = TrustDomain::new("fed.mesh").unwrap();
        let id = cluster_spiffe_id(&td, "east").unwrap();
        assert_eq!(id.as_str(), "spiffe://fed.mesh/cluster/east");
        assert_eq!(cluster_of(&id, &td).as_deref(), Some("east"));
        assert_eq!(cluster_of(&federator_spiffe_id(&td).unwrap(), &td), None);
        let other = TrustDomain::new("east.mesh").unwrap();
        assert_eq!(
            cluster_of(&cluster_spiffe_id(&other, "east").unwrap(), &td),
            None
        );
    }

    #[test]
    fn admin_identities_are_not_clusters_and_clusters_are_not_admins() {
        let td = TrustDomain::new("fed.mesh").unwrap();
        let ops = admin_spiffe_id(&td, "ops").unwrap();
        assert_eq!(ops.as_str(), "spiffe://fed.mesh/admin/ops");
        assert_eq!(admin_of(&ops, &td).as_deref(), Some("ops"));
        assert_eq!(cluster_of(&ops, &td), None);
        assert_eq!(admin_of(&cluster_spiffe_id(&td, "ops").unwrap(), &td), None);
        assert_eq!(admin_of(&federator_spiffe_id(&td).unwrap(), &td), None);
        let other = TrustDomain::new("east.mesh").unwrap();
        assert_eq!(
            admin_of(&admin_spiffe_id(&other, "ops").unwrap(), &td),
            None
        );
        let nested = SpiffeId::from_parts(&td, "/admin/ops/x").unwrap();
        assert_eq!(admin_of(&nested, &td), None);
    }
}
