//! Istio's certificate service (`istio.v1.auth.IstioCertificateService/CreateCertificate`) as
//! the agent serves it on its mTLS xDS port, so Istio's clients and `meshfed workload` obtain
//! workload certificates from the cluster CA without its keys.
//!
//! A caller proves who it is in one of two ways, and gets a certificate only for that identity:
//! - a bearer token (`authorization: Bearer <token>`): a Kubernetes service-account token that
//!   an [`Authenticator`] (the agent's is a `TokenReview`) maps to a namespace and service
//!   account; the identity is `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`;
//! - renewal: the certificate it already holds, presented on the mutual-TLS connection and
//!   verified by the port against the cluster's own bundle; the identity is that certificate's.
//!
//! The CSR's one URI SAN must be that identity; anything else is refused with the reason (a
//! gRPC status naming what was wrong), logged and counted in
//! `meshfed_ca_requests_total{result}`.

use std::sync::Arc;

use proto::istio_ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use proto::istio_ca::{IstioCertificateRequest, IstioCertificateResponse};
use time::Duration;
use tonic::{Request, Response, Status};
use trust::ca::policy::ExactIds;
use trust::{IssuedCert, SpiffeId, TrustDomain};

/// The largest request accepted (a CSR is about 1 KiB).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The shortest lifetime issued, whatever the request asks.
pub const MIN_TTL: Duration = Duration::minutes(1);

/// A Kubernetes service account, as a token review names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRefusal {
    /// The token is not valid for this service (expired, unknown, another audience, not a
    /// service account's): the reviewer's words.
    Invalid(String),
    /// The token could not be checked now (the API server is unreachable).
    Unavailable(String),
}

/// Maps a bearer token to the service account it belongs to.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn authenticate(&self, token: &str) -> Result<ServiceAccount, TokenRefusal>;
}

/// Signs a CSR for exactly the identities of the policy, with a lifetime.
pub type Signer =
    Arc<dyn Fn(&[u8], &ExactIds, Duration) -> anyhow::Result<IssuedCert> + Send + Sync>;

/// The counters of the service.
#[derive(Debug, Clone)]
pub struct CaMetrics {
    requests: prometheus::IntCounterVec,
}

impl CaMetrics {
    pub fn new(reg: &prometheus::Registry) -> CaMetrics {
        let requests = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "meshfed_ca_requests_total",
                "Certificate requests to the CA API, by result (issued, unauthenticated, \
                 denied, invalid, unavailable)",
            ),
            &["result"],
        )
        .unwrap_or_else(|e| unreachable!("constant metric definition: {e}"));
        let _ = reg.register(Box::new(requests.clone()));
        CaMetrics { requests }
    }

    /// The count for one result.
    pub fn count(&self, result: &str) -> u64 {
        self.requests.with_label_values(&[result]).get()
    }
}

/// The service: what it signs with, who it believes, the lifetimes it issues.
#[derive(Clone)]
pub struct CaApi {
    trust_domain: TrustDomain,
    signer: Signer,
    tokens: Option<Arc<dyn Authenticator>>,
    /// The lifetime given when the request asks for none, or for more.
    max_ttl: Duration,
    metrics: CaMetrics,
}

impl std::fmt::Debug for CaApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaApi")
            .field("trust_domain", &self.trust_domain)
            .field("tokens", &self.tokens.is_some())
            .field("max_ttl", &self.max_ttl)
            .finish()
    }
}

impl CaApi {
    /// `tokens`: how bearer tokens are checked (`None`: this agent reads no Kubernetes API, so
    /// only renewal with a current certificate is possible).
    pub fn new(
        trust_domain: TrustDomain,
        signer: Signer,
        tokens: Option<Arc<dyn Authenticator>>,
        max_ttl: Duration,
        metrics: CaMetrics,
    ) -> CaApi {
        CaApi {
            trust_domain,
            signer,
            tokens,
            max_ttl,
            metrics,
        }
    }

    /// The tonic service, with the request size bounded.
    pub fn server(self) -> IstioCertificateServiceServer<CaApi> {
        IstioCertificateServiceServer::new(self).max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    fn refuse(&self, result: &'static str, status: Status, caller: &str) -> Status {
        self.metrics.requests.with_label_values(&[result]).inc();
        tracing::warn!(result, caller, reason = %status.message(), "certificate request refused");
        status
    }

    /// Who the caller is: the identity its token or its certificate speaks for.
    async fn caller<T>(&self, req: &Request<T>) -> Result<(SpiffeId, String), Status> {
        let token = match req.metadata().get("authorization") {
            None => None,
            Some(v) => {
                let v = v.to_str().map_err(|_| {
                    self.refuse(
                        "unauthenticated",
                        Status::unauthenticated("the authorization metadata is not ASCII"),
                        "?",
                    )
                })?;
                let t = v
                    .strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        self.refuse(
                            "unauthenticated",
                            Status::unauthenticated(
                                "the authorization metadata must be `Bearer <token>`",
                            ),
                            "?",
                        )
                    })?;
                Some(t.to_string())
            }
        };
        if let Some(token) = token {
            let Some(tokens) = &self.tokens else {
                return Err(self.refuse(
                    "unauthenticated",
                    Status::unauthenticated(
                        "this agent reads no Kubernetes API, so it cannot review tokens; renew \
                         over mTLS with the current certificate",
                    ),
                    "token",
                ));
            };
            return match tokens.authenticate(&token).await {
                Ok(sa) => {
                    let id = SpiffeId::istio_workload(&self.trust_domain, &sa.namespace, &sa.name)
                        .map_err(|e| {
                            self.refuse(
                                "denied",
                                Status::permission_denied(format!(
                                    "service account {}/{} makes no SPIFFE ID: {e}",
                                    sa.namespace, sa.name
                                )),
                                "token",
                            )
                        })?;
                    Ok((id, format!("token of {}/{}", sa.namespace, sa.name)))
                }
                Err(TokenRefusal::Invalid(why)) => Err(self.refuse(
                    "unauthenticated",
                    Status::unauthenticated(format!("the token was not accepted: {why}")),
                    "token",
                )),
                Err(TokenRefusal::Unavailable(why)) => Err(self.refuse(
                    "unavailable",
                    Status::unavailable(format!("the token cannot be checked now: {why}")),
                    "token",
                )),
            };
        }
        let peer = req
            .extensions()
            .get::<meshfed_net::PeerInfo>()
            .and_then(|i| trust::tls::peer_id(i.certs.as_deref().map(|c| c.as_slice())));
        match peer {
            Some(id) => {
                let who = format!("certificate of {id}");
                Ok((id, who))
            }
            None => Err(self.refuse(
                "unauthenticated",
                Status::unauthenticated(
                    "no credential: send a service-account token as `authorization: Bearer \
                     <token>`, or renew over mTLS with the current certificate",
                ),
                "anonymous",
            )),
        }
    }

    /// The lifetime to issue for a request's `validity_duration` (seconds).
    pub fn ttl_for(&self, requested_secs: i64) -> Duration {
        if requested_secs <= 0 {
            return self.max_ttl;
        }
        Duration::seconds(requested_secs).clamp(MIN_TTL.min(self.max_ttl), self.max_ttl)
    }
}

/// The PEM of one certificate.
fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[tonic::async_trait]
impl IstioCertificateService for CaApi {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let (id, who) = self.caller(&req).await?;
        let r = req.into_inner();
        if r.csr.trim().is_empty() {
            return Err(self.refuse(
                "invalid",
                Status::invalid_argument("the request carries no CSR (field csr, PEM)"),
                &who,
            ));
        }
        let ttl = self.ttl_for(r.validity_duration);
        let policy = ExactIds(vec![id.clone()]);
        let issued = (self.signer)(r.csr.as_bytes(), &policy, ttl).map_err(|e| {
            let msg = format!("{e:#}");
            // The CA refuses an identity other than the caller's (its policy, or another trust
            // domain); a CSR it cannot use is the caller's mistake too, but of another kind.
            if matches!(
                e.downcast_ref::<trust::TrustError>(),
                Some(trust::TrustError::Refused { .. })
            ) {
                self.refuse(
                    "denied",
                    Status::permission_denied(format!("{who} may obtain only {id}: {msg}")),
                    &who,
                )
            } else {
                self.refuse(
                    "invalid",
                    Status::invalid_argument(format!("the CSR cannot be signed: {msg}")),
                    &who,
                )
            }
        })?;
        self.metrics.requests.with_label_values(&["issued"]).inc();
        tracing::info!(id = %issued.id, caller = %who, not_after = %issued.not_after, "certificate issued");
        let mut chain: Vec<String> = issued.chain.iter().map(|c| pem(c)).collect();
        chain.push(pem(&issued.root));
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use trust::ca::policy::AnyWorkload;
    use trust::{CaOptions, CertificateAuthority};

    struct Fixed;

    #[tonic::async_trait]
    impl Authenticator for Fixed {
        async fn authenticate(&self, token: &str) -> Result<ServiceAccount, TokenRefusal> {
            match token {
                "payment-token" => Ok(ServiceAccount {
                    namespace: "shop".into(),
                    name: "payment".into(),
                }),
                "down" => Err(TokenRefusal::Unavailable("API server unreachable".into())),
                other => Err(TokenRefusal::Invalid(format!("unknown token {other}"))),
            }
        }
    }

    fn api(tokens: bool) -> (CaApi, Arc<CertificateAuthority>) {
        let td = TrustDomain::new("east.mesh").unwrap();
        let ca = Arc::new(CertificateAuthority::create(td.clone(), CaOptions::default()).unwrap());
        let signer: Signer = {
            let ca = ca.clone();
            Arc::new(move |csr, policy, ttl| Ok(ca.sign_csr(csr, policy, ttl)?))
        };
        let tokens: Option<Arc<dyn Authenticator>> =
            if tokens { Some(Arc::new(Fixed)) } else { None };
        let api = CaApi::new(
            td,
            signer,
            tokens,
            Duration::hours(24),
            CaMetrics::new(&prometheus::Registry::new()),
        );
        (api, ca)
    }

    fn csr(id: &str) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
        p.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn request(token: Option<&str>, csr: String, secs: i64) -> Request<IstioCertificateRequest> {
        let mut r = Request::new(IstioCertificateRequest {
            csr,
            validity_duration: secs,
            metadata: None,
        });
        if let Some(t) = token {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        r
    }

    #[tokio::test]
    async fn a_token_obtains_exactly_its_service_accounts_identity() {
        let (api, ca) = api(true);
        let want = "spiffe://east.mesh/ns/shop/sa/payment";
        let r = api
            .create_certificate(request(Some("payment-token"), csr(want), 3600))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.cert_chain.len(),
            3,
            "leaf, the CA's signing certificate, root"
        );
        let leaf = rustls_pki_types::CertificateDer::from(rustls_pem_der(&r.cert_chain[0]));
        let info = trust::svid::check_leaf(&leaf).unwrap();
        assert_eq!(info.id.to_string(), want);
        let root = rustls_pem_der(&r.cert_chain[2]);
        assert_eq!(ca.roots()[0].as_ref(), root.as_slice());
        let (nb, na) = trust::svid::validity(&leaf).unwrap();
        assert!(
            na - nb <= Duration::hours(1) + Duration::minutes(5),
            "{nb} {na}"
        );
        assert_eq!(api.metrics.count("issued"), 1);

        // The same token asking for another identity.
        let e = api
            .create_certificate(request(
                Some("payment-token"),
                csr("spiffe://east.mesh/ns/shop/sa/order"),
                0,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(
            e.message().contains(
                "token of shop/payment may obtain only spiffe://east.mesh/ns/shop/sa/payment"
            ),
            "{}",
            e.message()
        );
        assert_eq!(api.metrics.count("denied"), 1);
        // Another trust domain.
        let e = api
            .create_certificate(request(
                Some("payment-token"),
                csr("spiffe://west.mesh/ns/shop/sa/payment"),
                0,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    }

    fn rustls_pem_der(pem: &str) -> Vec<u8> {
        use base64::Engine;
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap()
    }

    #[tokio::test]
    async fn refusals_name_the_reason_and_are_counted() {
        let (api, _) = api(true);
        let good = || csr("spiffe://east.mesh/ns/shop/sa/payment");
        let cases: Vec<(Request<IstioCertificateRequest>, tonic::Code, &str, &str)> = vec![
            (request(None, good(), 0), tonic::Code::Unauthenticated, "no credential", "unauthenticated"),
            (request(Some("stolen"), good(), 0), tonic::Code::Unauthenticated, "unknown token stolen", "unauthenticated"),
            (request(Some("down"), good(), 0), tonic::Code::Unavailable, "API server unreachable", "unavailable"),
            (request(Some("payment-token"), String::new(), 0), tonic::Code::InvalidArgument, "no CSR", "invalid"),
            (request(Some("payment-token"), "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(), 0), tonic::Code::InvalidArgument, "cannot be signed", "invalid"),
        ];
        for (req, code, text, result) in cases {
            let before = api.metrics.count(result);
            let e = api.create_certificate(req).await.unwrap_err();
            assert_eq!(e.code(), code, "{e:?}");
            assert!(e.message().contains(text), "{}", e.message());
            assert_eq!(api.metrics.count(result), before + 1, "{result}");
        }
        let mut r = request(None, good(), 0);
        r.metadata_mut()
            .insert("authorization", "Basic dXNlcjpwYXNz".parse().unwrap());
        let e = api.create_certificate(r).await.unwrap_err();
        assert!(e.message().contains("`Bearer <token>`"), "{}", e.message());
        // Without a token reviewer, a token is refused with what to do instead.
        let (api, _) = super::tests::api(false);
        let e = api
            .create_certificate(request(Some("payment-token"), good(), 0))
            .await
            .unwrap_err();
        assert!(
            e.message().contains("cannot review tokens"),
            "{}",
            e.message()
        );
    }

    #[tokio::test]
    async fn renewal_with_the_current_certificate_keeps_its_identity() {
        let (api, ca) = api(false);
        let id = SpiffeId::new("spiffe://east.mesh/ns/shop/sa/payment").unwrap();
        let svid = ca
            .issue_svid(&id, &AnyWorkload, Duration::hours(1))
            .unwrap();
        let with_cert = |csr: String| {
            let mut r = request(None, csr, 0);
            r.extensions_mut().insert(meshfed_net::PeerInfo {
                remote: None,
                certs: Some(Arc::new(svid.chain.clone())),
            });
            r
        };
        let ok = api
            .create_certificate(with_cert(csr(id.as_str())))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.cert_chain.len(), 3);
        let e = api
            .create_certificate(with_cert(csr("spiffe://east.mesh/ns/shop/sa/admin")))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(
            e.message()
                .contains("certificate of spiffe://east.mesh/ns/shop/sa/payment"),
            "{}",
            e.message()
        );
    }

    #[test]
    fn lifetimes_are_bounded() {
        let (api, _) = api(false);
        assert_eq!(api.ttl_for(0), Duration::hours(24));
        assert_eq!(api.ttl_for(-5), Duration::hours(24));
        assert_eq!(api.ttl_for(3600), Duration::hours(1));
        assert_eq!(api.ttl_for(5), MIN_TTL);
        assert_eq!(api.ttl_for(i64::MAX / 2), Duration::hours(24));
    }
}
