//! Which authenticated peers a listener or client accepts, by SPIFFE ID.

use crate::spiffe_id::{SpiffeId, TrustDomain};

/// An authorization rule applied after the peer's chain has been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authorizer {
    /// Any peer whose SVID verifies against its own trust domain's bundle.
    Any,
    /// Any peer of one of these trust domains.
    TrustDomains(Vec<TrustDomain>),
    /// Exactly one of these identities.
    Ids(Vec<SpiffeId>),
}

impl Authorizer {
    pub fn trust_domain(td: TrustDomain) -> Self {
        Authorizer::TrustDomains(vec![td])
    }

    pub fn id(id: SpiffeId) -> Self {
        Authorizer::Ids(vec![id])
    }

    /// `Err(reason)` when `id` is not accepted.
    pub fn check(&self, id: &SpiffeId) -> Result<(), String> {
        match self {
            Authorizer::Any => Ok(()),
            Authorizer::TrustDomains(tds) => {
                if tds.iter().any(|td| td.as_str() == id.trust_domain_str()) {
                    Ok(())
                } else {
                    let list: Vec<_> = tds.iter().map(|t| t.as_str()).collect();
                    Err(format!(
                        "trust domain {} is not one of the accepted [{}]",
                        id.trust_domain_str(),
                        list.join(", ")
                    ))
                }
            }
            Authorizer::Ids(ids) => {
                if ids.iter().any(|i| i == id) {
                    Ok(())
                } else {
                    let list: Vec<_> = ids.iter().map(|t| t.as_str()).collect();
                    Err(format!(
                        "identity is not one of the accepted [{}]",
                        list.join(", ")
                    ))
                }
            }
        }
    }
}
