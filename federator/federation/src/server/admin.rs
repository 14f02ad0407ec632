//! `meshfed.federation.v1.FederationAdmin`: the operator's API on the federator's gRPC port.
//! Every call needs an admin certificate of this federation (`spiffe://<td>/admin/<name>`);
//! every replica serves it, as the tokens and the store it changes are shared.

use std::sync::Arc;

use proto::federation_admin_server::{FederationAdmin, FederationAdminServer};
use proto::{
    CreateJoinTokenRequest, CreateJoinTokenResponse, EvictRequest, EvictResponse, JoinToken,
    ListJoinTokensRequest, ListJoinTokensResponse, RevokeJoinTokenRequest,
};
use tonic::{Request, Response, Status};

use super::{eviction_text, now_unix, store_status, Hub};
use meshfed_identity::ids::{admin_of, cluster_of};
use meshfed_identity::token::{Record, TokenError};
use meshfed_store::{Eviction, StoreError};

/// The shortest and longest join token the API makes.
const MIN_TOKEN_TTL: i64 = 60;
const MAX_TOKEN_TTL: i64 = 7 * 24 * 3600;
/// An eviction's reason is kept in the cluster's record: bounded.
const MAX_REASON_BYTES: usize = 512;

pub(super) struct AdminService {
    hub: Arc<Hub>,
}

impl AdminService {
    pub(super) fn new(hub: Arc<Hub>) -> Self {
        AdminService { hub }
    }

    pub(super) fn server(self) -> FederationAdminServer<Self> {
        FederationAdminServer::new(self)
    }

    /// The operator a request's client certificate names. The TLS layer has verified the
    /// chain against the federation's bundle; a cluster's certificate is not an admin's.
    fn operator<T>(&self, req: &Request<T>, action: &str) -> Result<String, Status> {
        let certs = req
            .extensions()
            .get::<meshfed_net::PeerInfo>()
            .and_then(|i| i.certs.clone())
            .ok_or_else(|| {
                Status::unauthenticated(
                    "the admin API needs an admin certificate (mTLS): make one with `meshfed federator admin-identity`",
                )
            })?;
        let id = trust::tls::peer_id(Some(certs.as_slice())).ok_or_else(|| {
            Status::unauthenticated("the client certificate carries no SPIFFE ID")
        })?;
        let td = &self.hub.ca.trust_domain;
        match admin_of(&id, td) {
            Some(name) => {
                tracing::info!(admin = %name, action, "admin API call");
                Ok(name)
            }
            None => {
                let who = if cluster_of(&id, td).is_some() {
                    "a cluster identity"
                } else {
                    "not an admin identity of this federation"
                };
                tracing::warn!(%id, action, "admin API call refused");
                Err(Status::permission_denied(format!(
                    "{id} is {who}; the admin API takes spiffe://{td}/admin/<name> certificates"
                )))
            }
        }
    }
}

fn token_message(r: Record) -> JoinToken {
    JoinToken {
        id: r.id,
        cluster: r.cluster,
        created: r.created,
        expires: r.expires,
        revoked: r.revoked,
        used_by: r.used_by.unwrap_or_default(),
        used_at: r.used_at.unwrap_or(0),
    }
}

fn token_status(e: TokenError) -> Status {
    match e {
        TokenError::Unknown(_) => Status::not_found(e.to_string()),
        TokenError::Store(_) => Status::unavailable(e.to_string()),
        other => Status::failed_precondition(other.to_string()),
    }
}

#[tonic::async_trait]
impl FederationAdmin for AdminService {
    async fn create_token(
        &self,
        req: Request<CreateJoinTokenRequest>,
    ) -> Result<Response<CreateJoinTokenResponse>, Status> {
        let admin = self.operator(&req, "create token")?;
        let r = req.into_inner();
        meshfed_model::validate::check_label("cluster", &r.cluster)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if !(MIN_TOKEN_TTL..=MAX_TOKEN_TTL).contains(&r.ttl_seconds) {
            return Err(Status::invalid_argument(format!(
                "ttl_seconds {}: a join token lives {MIN_TOKEN_TTL} s to 7 days",
                r.ttl_seconds
            )));
        }
        for (i, f) in r.federators.iter().enumerate() {
            meshfed_model::validate::check_host_port(&format!("federators[{i}]"), f)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        }
        let hub = self.hub.clone();
        let (rec, token) = tokio::task::block_in_place(move || {
            let federators = if r.federators.is_empty() {
                hub.endpoints()
            } else {
                r.federators
            };
            hub.tokens.create(
                &r.cluster,
                r.ttl_seconds,
                federators,
                hub.ca.root_fingerprint(),
                hub.ca.trust_domain.to_string(),
                now_unix(),
            )
        })
        .map_err(token_status)?;
        tracing::info!(%admin, token = %rec.id, cluster = %rec.cluster, "join token created");
        Ok(Response::new(CreateJoinTokenResponse {
            token,
            record: Some(token_message(rec)),
        }))
    }

    async fn list_tokens(
        &self,
        req: Request<ListJoinTokensRequest>,
    ) -> Result<Response<ListJoinTokensResponse>, Status> {
        self.operator(&req, "list tokens")?;
        let tokens =
            tokio::task::block_in_place(|| self.hub.tokens.list()).map_err(token_status)?;
        Ok(Response::new(ListJoinTokensResponse {
            tokens: tokens.into_iter().map(token_message).collect(),
        }))
    }

    async fn revoke_token(
        &self,
        req: Request<RevokeJoinTokenRequest>,
    ) -> Result<Response<JoinToken>, Status> {
        let admin = self.operator(&req, "revoke token")?;
        let id = req.into_inner().id;
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Status::invalid_argument(format!(
                "id {id:?}: a token id is the hex string `token list` shows"
            )));
        }
        let rec =
            tokio::task::block_in_place(|| self.hub.tokens.revoke(&id)).map_err(token_status)?;
        tracing::info!(%admin, token = %rec.id, cluster = %rec.cluster, "join token revoked");
        Ok(Response::new(token_message(rec)))
    }

    async fn evict(&self, req: Request<EvictRequest>) -> Result<Response<EvictResponse>, Status> {
        let admin = self.operator(&req, "evict")?;
        let r = req.into_inner();
        meshfed_model::validate::check_label("cluster", &r.cluster)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        if r.reason.len() > MAX_REASON_BYTES || r.reason.chars().any(char::is_control) {
            return Err(Status::invalid_argument(format!(
                "reason: at most {MAX_REASON_BYTES} bytes of text on one line"
            )));
        }
        let eviction = Eviction {
            by: admin.clone(),
            reason: r.reason,
            at: now_unix(),
        };
        let text = eviction_text(&eviction);
        let rev = tokio::task::block_in_place(|| self.hub.store.evict(&r.cluster, eviction))
            .map_err(|e| match e {
                StoreError::UnknownCluster(c) => {
                    Status::not_found(format!("cluster {c} is not a member of this federation"))
                }
                StoreError::Left(c) => {
                    Status::failed_precondition(format!("cluster {c} has already left"))
                }
                other => store_status(other),
            })?;
        self.hub.removed(&r.cluster, rev);
        tracing::warn!(cluster = %r.cluster, revision = rev, "cluster {text}");
        Ok(Response::new(EvictResponse { revision: rev }))
    }
}
