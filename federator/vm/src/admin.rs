//! `meshfed.vm.v1.VmAdmin` on the agent's mTLS xDS port: VM tokens made at the running agent,
//! for `meshfed vm bootstrap --agent` (no shell on the agent's volume is needed). The caller is
//! authenticated and authorized by an [`AdminAuth`] (with the Kubernetes source: the API server
//! says who the bearer token is and whether that user may update the WorkloadGroup). Tokens
//! are made in the same store the VM API spends them from, so only the replica that serves VMs
//! answers.

use std::sync::Arc;

use proto::vm::vm_admin_server::{VmAdmin, VmAdminServer};
use proto::vm::{CreateTokenRequest, CreateTokenResponse, RevokeTokenRequest, RevokeTokenResponse};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::token::{self, VmClaims};
use meshfed_identity::token::TokenStore;
use meshfed_model::registry::Registry;

/// The longest a token made here may live.
pub const MAX_TTL_SECS: i64 = 7 * 24 * 3600;

/// Who may make tokens for a group.
#[tonic::async_trait]
pub trait AdminAuth: Send + Sync + std::fmt::Debug {
    /// The caller behind `bearer`, when it may update WorkloadGroup `namespace/group`; else
    /// the status to answer (UNAUTHENTICATED, PERMISSION_DENIED, UNAVAILABLE).
    async fn authorize(&self, bearer: &str, namespace: &str, group: &str)
        -> Result<String, Status>;
}

/// What the service reads.
#[derive(Debug, Clone)]
pub struct AdminInputs {
    pub cluster: String,
    pub trust_domain: String,
    pub network: String,
    pub gateways: Vec<String>,
    /// The cluster CA's bundle JSON (the roots a package carries).
    pub own_bundle: watch::Receiver<String>,
    /// The WorkloadGroups (the last good registry, with the Kubernetes API's groups).
    pub registry: watch::Receiver<Option<Arc<Registry>>>,
    /// Whether this replica serves VMs.
    pub leading: watch::Receiver<bool>,
    /// `None`: this agent cannot authenticate callers (no Kubernetes source).
    pub auth: Option<Arc<dyn AdminAuth>>,
}

#[derive(Debug)]
pub struct VmAdminApi {
    inputs: AdminInputs,
    tokens: TokenStore,
}

impl VmAdminApi {
    pub fn new(inputs: AdminInputs, state_dir: &std::path::Path) -> Self {
        VmAdminApi {
            inputs,
            tokens: token::token_store(state_dir),
        }
    }

    pub fn server(self) -> VmAdminServer<Self> {
        VmAdminServer::new(self)
    }

    /// The caller, authorized for the group; and the group's service account.
    async fn check<T>(
        &self,
        req: &Request<T>,
        namespace: &str,
        group: &str,
    ) -> Result<(String, String), Status> {
        if !*self.inputs.leading.borrow() {
            return Err(Status::unavailable(
                "this agent replica does not serve VMs (it is not the cluster's leader); connect \
                 again (the Service reaches the leader)",
            ));
        }
        let Some(auth) = &self.inputs.auth else {
            return Err(Status::failed_precondition(
                "this agent does not read Kubernetes, so it cannot tell who is asking: make the \
                 package where the agent's state directory is (meshfed vm bootstrap --state-dir)",
            ));
        };
        let bearer = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "no credential: send a Kubernetes bearer token as `authorization: Bearer \
                     <token>` (kubectl create token ...)",
                )
            })?;
        let who = auth.authorize(bearer, namespace, group).await?;
        let sa = crate::server::group_service_account(
            self.inputs.registry.borrow().as_deref(),
            namespace,
            group,
            &self.inputs.cluster,
        )?;
        Ok((who, sa))
    }
}

fn store_status(e: meshfed_identity::token::TokenError) -> Status {
    use meshfed_identity::token::TokenError;
    match e {
        TokenError::Store(m) => Status::internal(m),
        TokenError::Unknown(_) => Status::not_found(e.to_string()),
        other => Status::invalid_argument(other.to_string()),
    }
}

#[tonic::async_trait]
impl VmAdmin for VmAdminApi {
    async fn create_token(
        &self,
        req: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let (namespace, group, ttl) = {
            let r = req.get_ref();
            (r.namespace.clone(), r.group.clone(), r.ttl_seconds)
        };
        if !(1..=MAX_TTL_SECS).contains(&ttl) {
            return Err(Status::invalid_argument(format!(
                "ttl_seconds {ttl} is out of range (1 .. {MAX_TTL_SECS})"
            )));
        }
        let (who, sa) = self.check(&req, &namespace, &group).await?;
        let td = trust::TrustDomain::new(&self.inputs.trust_domain)
            .map_err(|e| Status::internal(e.to_string()))?;
        let own = self.inputs.own_bundle.borrow().clone();
        let bundle = trust::TrustBundle::from_json(td, &own, "the cluster's bundle")
            .map_err(|e| Status::internal(e.to_string()))?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let (rec, secret) = self
            .tokens
            .create_bound(&token::binding(&namespace, &group, &sa), ttl, now)
            .map_err(store_status)?;
        let claims = VmClaims {
            id: rec.id.clone(),
            secret,
            cluster: self.inputs.cluster.clone(),
            trust_domain: self.inputs.trust_domain.clone(),
            namespace: namespace.clone(),
            group: group.clone(),
            service_account: sa.clone(),
            expires: rec.expires,
        };
        tracing::info!(user = %who, group = %format!("{namespace}/{group}"), token = %rec.id, "VM token created");
        Ok(Response::new(CreateTokenResponse {
            token: claims.encode(),
            token_id: rec.id,
            expires: rec.expires,
            cluster: self.inputs.cluster.clone(),
            trust_domain: self.inputs.trust_domain.clone(),
            network: self.inputs.network.clone(),
            service_account: sa,
            gateways: self.inputs.gateways.clone(),
            roots_pem: trust::keys::certs_to_pem(bundle.x509_authorities.iter()),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let (namespace, group, id) = {
            let r = req.get_ref();
            (r.namespace.clone(), r.group.clone(), r.token_id.clone())
        };
        let (who, sa) = self.check(&req, &namespace, &group).await?;
        let rec = self
            .tokens
            .get(&id)
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no VM token {id}")))?;
        // A caller may revoke only tokens of the group it was authorized for.
        if rec.cluster != token::binding(&namespace, &group, &sa) {
            return Err(Status::permission_denied(format!(
                "VM token {id} is not for WorkloadGroup {namespace}/{group}"
            )));
        }
        self.tokens.revoke(&id).map_err(store_status)?;
        tracing::info!(user = %who, token = %id, "VM token revoked");
        Ok(Response::new(RevokeTokenResponse {}))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[derive(Debug)]
    struct Allow(&'static str);

    #[tonic::async_trait]
    impl AdminAuth for Allow {
        async fn authorize(&self, bearer: &str, _: &str, group: &str) -> Result<String, Status> {
            if bearer == self.0 && group == "payment-vm" {
                Ok("ops-admin".into())
            } else {
                Err(Status::permission_denied("ops-admin may not update it"))
            }
        }
    }

    fn api(dir: &std::path::Path, leading: bool, auth: bool) -> VmAdminApi {
        let ca = trust::ca::CertificateAuthority::create(
            trust::TrustDomain::new("east.mesh").unwrap(),
            trust::ca::CaOptions::default(),
        )
        .unwrap();
        let reg = Registry::parse(
            "services: []\nworkloadGroups:\n  - apiVersion: networking.istio.io/v1\n    kind: WorkloadGroup\n    metadata: {name: payment-vm, namespace: shop}\n    spec: {template: {serviceAccount: payment}}\n",
            "test",
        )
        .unwrap();
        VmAdminApi::new(
            AdminInputs {
                cluster: "east".into(),
                trust_domain: "east.mesh".into(),
                network: "net1".into(),
                gateways: vec!["gw.example:15443".into()],
                own_bundle: watch::channel(ca.bundle().to_json().unwrap()).1,
                registry: watch::channel(Some(Arc::new(reg))).1,
                leading: watch::channel(leading).1,
                auth: auth.then(|| Arc::new(Allow("secret")) as Arc<dyn AdminAuth>),
            },
            dir,
        )
    }

    fn req(bearer: Option<&str>, ttl: i64) -> Request<CreateTokenRequest> {
        let mut r = Request::new(CreateTokenRequest {
            namespace: "shop".into(),
            group: "payment-vm".into(),
            ttl_seconds: ttl,
        });
        if let Some(b) = bearer {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {b}").parse().unwrap());
        }
        r
    }

    #[tokio::test]
    async fn tokens_for_authorized_callers_of_the_leader_only() {
        let d = tempfile::tempdir().unwrap();
        let a = api(d.path(), true, true);
        let ok = a
            .create_token(req(Some("secret"), 600))
            .await
            .unwrap()
            .into_inner();
        let claims = VmClaims::decode(&ok.token).unwrap();
        assert_eq!(
            (claims.group.as_str(), ok.service_account.as_str()),
            ("payment-vm", "payment")
        );
        assert!(ok.roots_pem.contains("BEGIN CERTIFICATE"));
        let code = |r: Result<Response<CreateTokenResponse>, Status>| r.unwrap_err().code();
        assert_eq!(
            code(a.create_token(req(None, 600)).await),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(a.create_token(req(Some("guess"), 600)).await),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            code(a.create_token(req(Some("secret"), 0)).await),
            tonic::Code::InvalidArgument
        );
        // A follower, and an agent that cannot authenticate anyone.
        let follower = api(d.path(), false, true);
        assert_eq!(
            code(follower.create_token(req(Some("secret"), 600)).await),
            tonic::Code::Unavailable
        );
        let blind = api(d.path(), true, false);
        assert_eq!(
            code(blind.create_token(req(Some("secret"), 600)).await),
            tonic::Code::FailedPrecondition
        );
        // Revocation: only of the group's tokens.
        let mut r = Request::new(RevokeTokenRequest {
            namespace: "shop".into(),
            group: "payment-vm".into(),
            token_id: ok.token_id.clone(),
        });
        r.metadata_mut()
            .insert("authorization", "Bearer secret".parse().unwrap());
        a.revoke_token(r).await.unwrap();
        assert!(
            token::token_store(d.path())
                .get(&ok.token_id)
                .unwrap()
                .unwrap()
                .revoked
        );
    }
}
