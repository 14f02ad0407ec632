//! The agent's VM API against bad input: malformed, forged, expired, reused and re-bound
//! tokens; CSRs for another namespace; registering into another group; workload SVIDs or no
//! certificate where the VM credential is required; revoked VMs; malformed Register messages.
//! A real federator and agent run in-process on loopback; clients are real gRPC clients over
//! TLS (mTLS once they hold a credential). Nothing refused leaves a trace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use meshfed_agent::{Agent, AgentConfig};
use meshfed_federation::{Federator, FederatorConfig};
use meshfed_identity::cluster::{self as identity, JoinParams};
use meshfed_identity::token::TokenStore;
use meshfed_vm::token::{self as vmtoken, VmClaims, VmStore};
use proto::vm::vm_registration_client::VmRegistrationClient;
use proto::vm::{vm_message, JoinRequest, Register, RenewRequest, VmMessage};
use rustls_pki_types::CertificateDer;
use trust::tls::{Authorizer, SpiffeVerifier, SvidResolver};
use trust::{BundleSet, SpiffeId, Svid, TrustDomain, TrustStore};

const REGISTRY: &str = r#"
services:
  - {namespace: shop, name: payment, ports: [{name: grpc, port: 8080}], selector: {app: payment}}
workloadGroups:
  - metadata: {name: payment-vm, namespace: shop}
    spec: {metadata: {labels: {app: payment}}, template: {serviceAccount: payment}}
  - metadata: {name: ledger-vm, namespace: shop}
    spec: {template: {serviceAccount: ledger}}
"#;

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

struct World {
    _fed: Federator,
    agent: Agent,
    state: std::path::PathBuf,
    addr: String,
    td: TrustDomain,
    roots: Vec<CertificateDer<'static>>,
}

async fn world(dir: &Path) -> World {
    let mut cfg = FederatorConfig::new(dir.join("fed"), "127.0.0.1:0".parse().unwrap());
    cfg.lease_ttl = Duration::from_secs(5);
    let fed = Federator::start(cfg).await.unwrap();
    let token = TokenStore::new(&dir.join("fed"))
        .create(
            "east",
            900,
            fed.advertise().to_vec(),
            fed.ca_fingerprint(),
            fed.trust_domain().to_string(),
            now(),
        )
        .unwrap()
        .1;
    let state = dir.join("east");
    identity::join(JoinParams {
        token,
        state_dir: state.clone(),
        cluster: "east".into(),
        network: "net1".into(),
        trust_domain: TrustDomain::new("east.mesh").unwrap(),
        locality: meshfed_model::validate::parse_locality("us-east1/us-east1-b").unwrap(),
        gateways: vec![],
        ca: None,
        rejoin: false,
    })
    .await
    .unwrap();
    std::fs::write(dir.join("registry.yaml"), REGISTRY).unwrap();
    let agent = Agent::start(AgentConfig {
        state_dir: state.clone(),
        registry: Some(dir.join("registry.yaml")),
        kubernetes: None,
        namespace_selector: None,
        admin: None,
        probe: None,
        registry_poll: Duration::from_millis(100),
        policies: vec![],
        xds: None,
        vm_api: Some("127.0.0.1:0".parse().unwrap()),
        vm_grace: Duration::from_secs(1),
        dns: None,
        vip_range_v4: meshfed_agent::default_vip_range_v4(),
        vip_range_v6: None,
        bundle_endpoint: None,
        bundle_endpoint_web: None,
        ca_rotation: meshfed_identity::live_ca::RotationPolicy {
            period: None,
            publish_lead: time::Duration::minutes(20),
        },
        serving_cert_ttl: meshfed_agent::SERVING_CERT_TTL,
        leader_election: None,
        state_secret: None,
        token_audiences: vec!["istio-ca".into()],
        serving_dns_names: meshfed_agent::default_serving_dns_names(),
        injection: None,
        istio: None,
    })
    .await
    .unwrap();
    let addr = agent.vm_api.unwrap().to_string();
    let td = TrustDomain::new("east.mesh").unwrap();
    let ca = identity::open_cluster_ca(&state, &td, None).unwrap();
    World {
        _fed: fed,
        agent,
        state,
        addr,
        td,
        roots: ca.roots(),
    }
}

impl World {
    fn client(&self, cert: Option<&Svid>) -> VmRegistrationClient<tonic::transport::Channel> {
        let resolver = match cert {
            Some(s) => SvidResolver::with(s).unwrap(),
            None => SvidResolver::new(),
        };
        let mut set = BundleSet::new();
        set.insert(trust::TrustBundle::new(self.td.clone(), self.roots.clone()))
            .unwrap();
        let v = SpiffeVerifier::new(
            TrustStore::new(set),
            Authorizer::id(meshfed_identity::ids::agent_spiffe_id(&self.td).unwrap()),
        );
        let tls = trust::tls::client_config(resolver, v).unwrap();
        VmRegistrationClient::new(
            meshfed_net::channel(
                vec![self.addr.clone()],
                tls,
                "meshfed-agent.meshfed-system.svc",
            )
            .unwrap(),
        )
    }

    fn token(&self, group: &str, sa: &str, ttl: i64) -> VmClaims {
        let (rec, secret) = vmtoken::token_store(&self.state)
            .create_bound(&vmtoken::binding("shop", group, sa), ttl, now())
            .unwrap();
        VmClaims {
            id: rec.id,
            secret,
            cluster: "east".into(),
            trust_domain: "east.mesh".into(),
            namespace: "shop".into(),
            group: group.into(),
            service_account: sa.into(),
            expires: rec.expires,
        }
    }

    /// Joins; returns (credential, workload SVID).
    async fn join(&self, c: &VmClaims, ns: &str, sa: &str) -> Result<(Svid, Svid), tonic::Status> {
        let cred_id = SpiffeId::new(&format!("spiffe://east.mesh/meshfed/vm/{}", c.id)).unwrap();
        let (ck, ccsr) = trust::keys::key_and_csr(&cred_id).unwrap();
        let wid = SpiffeId::new(&format!("spiffe://east.mesh/ns/{ns}/sa/{sa}")).unwrap();
        let (wk, wcsr) = trust::keys::key_and_csr(&wid).unwrap();
        let r = self
            .client(None)
            .join(JoinRequest {
                token: c.encode(),
                credential_csr_der: ccsr,
                svid_csr_der: wcsr,
            })
            .await?
            .into_inner();
        let certs = r.certificates.unwrap();
        let chain = |v: Vec<Vec<u8>>| v.into_iter().map(CertificateDer::from).collect();
        Ok((
            Svid::new(chain(certs.credential_chain_der), ck).unwrap(),
            Svid::new(chain(certs.svid_chain_der), wk).unwrap(),
        ))
    }

    fn joined(&self) -> usize {
        VmStore::new(&self.state).list().unwrap().len()
    }
}

fn register(group: &str, address: &str) -> VmMessage {
    VmMessage {
        kind: Some(vm_message::Kind::Register(Register {
            group: group.into(),
            namespace: "shop".into(),
            address: address.into(),
            ..Default::default()
        })),
    }
}

/// Opens Attach with `msgs`; returns the first error status, or Ok(first message kind).
async fn attach(
    c: &mut VmRegistrationClient<tonic::transport::Channel>,
    msgs: Vec<VmMessage>,
) -> Result<String, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for m in msgs {
        tx.send(m).await.unwrap();
    }
    let mut s = c
        .attach(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let m = s.message().await?;
    drop(tx);
    Ok(format!("{:?}", m.and_then(|m| m.kind)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_identities_are_refused_with_the_reason() {
    let d = tempfile::tempdir().unwrap();
    let w = world(d.path()).await;

    // Malformed and forged tokens.
    let mut c = w.client(None);
    let e = c
        .join(JoinRequest {
            token: "mvt1.not-json".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("malformed"), "{e}");
    let mut forged = w.token("payment-vm", "payment", 600);
    forged.secret = "00".repeat(24);
    let e = w.join(&forged, "shop", "payment").await.unwrap_err();
    assert!(e.message().contains("secret does not match"), "{e}");

    // A token of group ledger-vm re-labelled as payment-vm: refused, names both.
    let mut moved = w.token("ledger-vm", "ledger", 600);
    moved.group = "payment-vm".into();
    moved.service_account = "payment".into();
    let e = w.join(&moved, "shop", "payment").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message()
            .contains("the VM token was issued for workloadgroup shop/ledger-vm")
            && e.message().contains("shop/payment-vm"),
        "{e}"
    );

    // Another cluster's token.
    let mut other = w.token("payment-vm", "payment", 600);
    other.cluster = "west".into();
    let e = w.join(&other, "shop", "payment").await.unwrap_err();
    assert!(e.message().contains("for cluster west"), "{e}");

    // Expired.
    let old = w.token("payment-vm", "payment", -5);
    let e = w.join(&old, "shop", "payment").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(
        e.message().contains("the VM token expired")
            && e.message().contains("meshfed vm bootstrap")
            && !e.message().contains("join token"),
        "{e}"
    );

    // A CSR for another namespace's identity: refused, and the token is not used up.
    let good = w.token("payment-vm", "payment", 600);
    let e = w.join(&good, "bank", "payment").await.unwrap_err();
    assert!(e.message().contains("namespace \"bank\""), "{e}");
    let e = w.join(&good, "shop", "ledger").await.unwrap_err();
    assert!(e.message().contains("service account \"ledger\""), "{e}");
    assert_eq!(w.joined(), 0, "nothing registered by refused joins");
    let (cred, svid) = w.join(&good, "shop", "payment").await.unwrap();
    assert_eq!(svid.id.as_str(), "spiffe://east.mesh/ns/shop/sa/payment");
    assert_eq!(w.joined(), 1);
    // Single use.
    let e = w.join(&good, "shop", "payment").await.unwrap_err();
    assert!(e.message().contains("the VM token was already used"), "{e}");

    // Attach: the credential is required; a workload SVID or nothing is refused.
    let e = attach(
        &mut w.client(None),
        vec![register("payment-vm", "10.9.0.2")],
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    let e = attach(
        &mut w.client(Some(&svid)),
        vec![register("payment-vm", "10.9.0.2")],
    )
    .await
    .unwrap_err();
    assert!(e.message().contains("is not a VM credential"), "{e}");
    // Into another group, or with a bad address: refused.
    let mut vc = w.client(Some(&cred));
    let e = attach(&mut vc, vec![register("ledger-vm", "10.9.0.2")])
        .await
        .unwrap_err();
    assert!(
        e.message().contains("joined WorkloadGroup shop/payment-vm")
            && e.message().contains("cannot register into shop/ledger-vm"),
        "{e}"
    );
    for bad in ["not-an-ip", "0.0.0.0", "fe80::1%eth0", ""] {
        let e = attach(&mut vc, vec![register("payment-vm", bad)])
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}: {e}");
    }
    let e = attach(
        &mut vc,
        vec![VmMessage {
            kind: Some(vm_message::Kind::Health(proto::vm::Health::default())),
        }],
    )
    .await
    .unwrap_err();
    assert!(e.message().contains("must be Register"), "{e}");
    assert!(
        w.agent.inner.entries.current().is_empty(),
        "nothing registered"
    );

    // The right group over IPv6: registered under an IPv6-safe name.
    let ok = attach(&mut vc, vec![register("payment-vm", "2001:db8::7")])
        .await
        .unwrap();
    assert!(ok.contains("payment-vm-2001-db8-0-0-0-0-0-7"), "{ok}");

    // Renew with the credential; then revoke: refused from then on.
    let wid = SpiffeId::new("spiffe://east.mesh/ns/shop/sa/payment").unwrap();
    let (_, csr) = trust::keys::key_and_csr(&wid).unwrap();
    vc.renew(RenewRequest {
        svid_csr_der: csr.clone(),
        credential_csr_der: vec![],
    })
    .await
    .unwrap();
    // An attached VM: its stream stays open until the revocation.
    let (keep_tx, keep_rx) = tokio::sync::mpsc::channel(8);
    keep_tx
        .send(register("payment-vm", "10.9.0.3"))
        .await
        .unwrap();
    let mut stream = vc
        .attach(tokio_stream::wrappers::ReceiverStream::new(keep_rx))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(
        matches!(
            first.kind,
            Some(proto::vm::agent_message::Kind::Registered(_))
        ),
        "{first:?}"
    );
    let store = VmStore::new(&w.state);
    let id = store.list().unwrap().remove(0).vm_id;
    store.update(&id, |r| r.revoked = true).unwrap().unwrap();
    // The revocation ends the attached stream too (checked every 2 s), not only new calls.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a status"),
                Err(s) => return s,
            }
        }
    })
    .await
    .expect("the revoked VM's stream ends");
    assert_eq!(ended.code(), tonic::Code::PermissionDenied, "{ended:?}");
    assert!(ended.message().contains("was revoked"), "{ended:?}");
    drop(keep_tx);
    let e = vc
        .renew(RenewRequest {
            svid_csr_der: csr,
            credential_csr_der: vec![],
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("revoked"), "{e}");
}
