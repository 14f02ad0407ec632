//! The agent's VM API (`meshfed.vm.v1.VmRegistration`): token join, credential renewal, and the
//! Attach stream that keeps a VM's auto-registered WorkloadEntry alive and carries its health.
//!
//! Identities (all from the cluster CA):
//! - the VM credential `spiffe://<td>/meshfed/vm/<vm id>` (90 days, renewed by the VM past half
//!   its life): what the VM presents to this API; revocable (`meshfed vm revoke`);
//! - the workload SVID `spiffe://<td>/ns/<namespace>/sa/<service account>` of the group
//!   (24 h): what the VM's workloads present to each other.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use meshfed_identity::live_ca::LiveCa;
use meshfed_net::drain::Signal;
use proto::vm::vm_registration_server::{VmRegistration, VmRegistrationServer};
use proto::vm::{
    agent_message, vm_message, AgentMessage, Certificates, JoinRequest, JoinResponse, Registered,
    RenewRequest, RenewResponse, Roots, VmMessage,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use trust::ca::policy::{ExactIds, IstioIdentity};

use crate::entries;
use crate::token::{self, VmClaims, VmRecord, VmStore};
use meshfed_dns::table::NameTable;
use meshfed_identity::ids::{credential_id, vm_id_of};
use meshfed_identity::token::{TokenError, TokenStore};
use meshfed_model::entry::{self as entry, VmFacts};
use meshfed_model::registry::Registry;
use meshfed_model::store::Reader;
use tokio::sync::watch;

pub const SVID_TTL: time::Duration = time::Duration::hours(24);
pub const CREDENTIAL_TTL: time::Duration = time::Duration::days(90);
/// The first message of an Attach stream must arrive within this.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// (the cluster's own roots, the federated trust domains' roots), DER each.
fn split_roots(
    td: &str,
    own_json: &str,
    snap: &meshfed_model::snapshot::Snapshot,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (mut own, mut peers) = (Vec::new(), Vec::new());
    for (d, roots) in meshfed_model::snapshot::trust_roots(td, own_json, snap) {
        let der = roots.into_iter().map(|r| r.to_vec());
        if d == td {
            own.extend(der);
        } else {
            peers.extend(der);
        }
    }
    (own, peers)
}

/// The service account of WorkloadGroup `namespace/group` in the last good registry, or why
/// there is none.
pub(crate) fn group_service_account(
    reg: Option<&Registry>,
    namespace: &str,
    group: &str,
    cluster: &str,
) -> Result<String, Status> {
    let reg =
        reg.ok_or_else(|| Status::unavailable("the cluster's registry has not loaded; try again"))?;
    let g = reg.group(namespace, group).ok_or_else(|| {
        Status::failed_precondition(format!(
            "WorkloadGroup {namespace}/{group} does not exist in cluster {cluster}"
        ))
    })?;
    Ok(g.service_account())
}

/// How often an attached VM's record is read for a revocation.
const REVOCATION_CHECK: Duration = Duration::from_secs(2);

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// What the VM API reads: the agent's state, each as a read-only handle.
#[derive(Debug, Clone)]
pub struct VmApiInputs {
    /// This cluster's id and trust domain.
    pub cluster: String,
    pub trust_domain: String,
    /// The service model (peer bundles for the VMs' roots).
    pub model: Reader,
    /// The cluster CA's bundle JSON.
    pub own_bundle: watch::Receiver<String>,
    /// The mesh's names, sent to every attached VM.
    pub names: watch::Receiver<Arc<NameTable>>,
    /// The last good registry (WorkloadGroups); `None` until one loaded.
    pub registry: watch::Receiver<Option<Arc<Registry>>>,
    /// Where auto-registered WorkloadEntries are kept (the VM registration source).
    pub entries: Arc<entries::Entries>,
    /// Register streams end with UNAVAILABLE when the agent drains (the VM reconnects within
    /// its entry's grace period).
    pub drain: Signal,
    /// Whether this agent speaks for the cluster: with replicas, only the one that does (the
    /// leader, or the last one that held the Lease while nobody else leads) serves VMs, whose
    /// entries are its exports; another refuses them with UNAVAILABLE, so the VM reconnects,
    /// through the Service, until it reaches that one. Always `true` for a lone agent.
    pub leading: watch::Receiver<bool>,
}

/// Resolves when this agent stops leading (never, while it leads).
async fn stops_leading(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|l| !*l).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn not_leading() -> Status {
    Status::unavailable(
        "this agent replica is not the cluster's leader; connect again (the Service reaches the leader)",
    )
}

#[derive(Debug)]
pub struct VmApi {
    inputs: VmApiInputs,
    ca: Arc<LiveCa>,
    tokens: TokenStore,
    vms: VmStore,
    join_lock: tokio::sync::Mutex<()>,
    controller: String,
}

impl VmApi {
    pub fn new(inputs: VmApiInputs, ca: Arc<LiveCa>, state_dir: &std::path::Path) -> Self {
        let controller = format!("meshfed-agent-{}", inputs.cluster);
        VmApi {
            inputs,
            ca,
            tokens: token::token_store(state_dir),
            vms: VmStore::new(state_dir),
            join_lock: tokio::sync::Mutex::new(()),
            controller,
        }
    }

    pub fn server(self) -> VmRegistrationServer<Self> {
        VmRegistrationServer::new(self)
    }

    fn roots(&self) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let own = self.inputs.own_bundle.borrow().clone();
        split_roots(
            self.ca.trust_domain().as_str(),
            &own,
            &self.inputs.model.current(),
        )
    }

    fn sign(
        &self,
        csr: &[u8],
        policy: &dyn trust::ca::policy::IssuancePolicy,
        ttl: time::Duration,
        what: &str,
    ) -> Result<Vec<Vec<u8>>, Status> {
        self.ca
            .sign_csr(csr, policy, ttl)
            .map(|c| c.chain.into_iter().map(|d| d.to_vec()).collect())
            .map_err(|e| Status::permission_denied(format!("the {what} CSR was refused: {e:#}")))
    }

    fn group_sa(&self, namespace: &str, group: &str) -> Result<String, Status> {
        group_service_account(
            self.registry().as_deref(),
            namespace,
            group,
            &self.inputs.cluster,
        )
    }

    fn registry(&self) -> Option<Arc<Registry>> {
        self.inputs.registry.borrow().clone()
    }

    /// The VM behind a request's client certificate (its credential), if it may still act.
    fn peer_vm<T>(&self, req: &Request<T>) -> Result<VmRecord, Status> {
        let peer = req.extensions().get::<meshfed_net::PeerInfo>();
        let id = trust::tls::peer_id(peer.and_then(|p| p.certs.as_deref().map(|c| c.as_slice())))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "present the VM credential (from `meshfed vm agent`'s first join) as the client certificate",
                )
            })?;
        let vm_id = vm_id_of(&id).ok_or_else(|| {
            Status::permission_denied(format!(
                "{id} is not a VM credential (spiffe://<trust domain>/meshfed/vm/<id>); workload SVIDs cannot register VMs"
            ))
        })?;
        let rec = self
            .vms
            .get(vm_id)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::permission_denied(format!("VM {vm_id} is not known here")))?;
        if rec.revoked {
            return Err(Status::permission_denied(format!(
                "VM {vm_id} was revoked; bootstrap it again with a new token"
            )));
        }
        Ok(rec)
    }
}

fn token_status(e: TokenError) -> Status {
    match e {
        TokenError::WrongBinding { .. } | TokenError::Used(..) | TokenError::Revoked(_) => {
            Status::permission_denied(e.to_string())
        }
        TokenError::Store(m) => Status::internal(m),
        other => Status::unauthenticated(other.to_string()),
    }
}

#[tonic::async_trait]
impl VmRegistration for VmApi {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        if !*self.inputs.leading.borrow() {
            return Err(not_leading());
        }
        let req = req.into_inner();
        let claims =
            VmClaims::decode(&req.token).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (cluster, td) = (
            self.inputs.cluster.clone(),
            self.inputs.trust_domain.clone(),
        );
        if claims.cluster != cluster || claims.trust_domain != td {
            return Err(Status::permission_denied(format!(
                "the token is for cluster {} ({}), and this is cluster {cluster} ({td})",
                claims.cluster, claims.trust_domain
            )));
        }
        let sa = self.group_sa(&claims.namespace, &claims.group)?;
        if sa != claims.service_account {
            return Err(Status::permission_denied(format!(
                "the token names service account {:?}, and WorkloadGroup {}/{} runs as {sa:?}",
                claims.service_account, claims.namespace, claims.group
            )));
        }
        let _g = self.join_lock.lock().await;
        let now = unix_now();
        let rec = self
            .tokens
            .check_secret(&claims.id, &claims.secret, &claims.binding(), now)
            .map_err(token_status)?;
        let tdomain = self.ca.trust_domain().clone();
        let cred_id = credential_id(&tdomain, &claims.id).map_err(Status::invalid_argument)?;
        let credential = self.sign(
            &req.credential_csr_der,
            &ExactIds(vec![cred_id]),
            CREDENTIAL_TTL,
            "credential",
        )?;
        let svid = self.sign(
            &req.svid_csr_der,
            &IstioIdentity {
                namespace: claims.namespace.clone(),
                service_account: Some(sa.clone()),
            },
            SVID_TTL,
            "workload SVID",
        )?;
        self.tokens
            .consume(rec, &format!("VM {}", claims.id), now)
            .map_err(token_status)?;
        self.vms
            .put(&VmRecord {
                vm_id: claims.id.clone(),
                namespace: claims.namespace.clone(),
                group: claims.group.clone(),
                service_account: sa,
                joined: now,
                last_seen: now,
                revoked: false,
            })
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(vm = %claims.id, group = %format!("{}/{}", claims.namespace, claims.group), "VM joined");
        let roots = self.roots();
        Ok(Response::new(JoinResponse {
            vm_id: claims.id,
            certificates: Some(Certificates {
                credential_chain_der: credential,
                svid_chain_der: svid,
                roots_der: roots.0,
                federated_roots_der: roots.1,
            }),
        }))
    }

    async fn renew(&self, req: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        if !*self.inputs.leading.borrow() {
            return Err(not_leading());
        }
        let rec = self.peer_vm(&req)?;
        let req = req.into_inner();
        // The group's service account may have changed; the VM follows it.
        let sa = self.group_sa(&rec.namespace, &rec.group)?;
        let svid = self.sign(
            &req.svid_csr_der,
            &IstioIdentity {
                namespace: rec.namespace.clone(),
                service_account: Some(sa.clone()),
            },
            SVID_TTL,
            "workload SVID",
        )?;
        let credential = if req.credential_csr_der.is_empty() {
            Vec::new()
        } else {
            let id = credential_id(&self.ca.trust_domain(), &rec.vm_id)
                .map_err(Status::invalid_argument)?;
            self.sign(
                &req.credential_csr_der,
                &ExactIds(vec![id]),
                CREDENTIAL_TTL,
                "credential",
            )?
        };
        let _ = self.vms.update(&rec.vm_id, |r| {
            r.last_seen = unix_now();
            r.service_account = sa;
        });
        let roots = self.roots();
        Ok(Response::new(RenewResponse {
            certificates: Some(Certificates {
                credential_chain_der: credential,
                svid_chain_der: svid,
                roots_der: roots.0,
                federated_roots_der: roots.1,
            }),
        }))
    }

    type AttachStream = ReceiverStream<Result<AgentMessage, Status>>;

    async fn attach(
        &self,
        req: Request<Streaming<VmMessage>>,
    ) -> Result<Response<Self::AttachStream>, Status> {
        if !*self.inputs.leading.borrow() {
            return Err(not_leading());
        }
        let rec = self.peer_vm(&req)?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register message within 10 s"))??;
        let Some(VmMessage {
            kind: Some(vm_message::Kind::Register(reg)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message of Attach must be Register",
            ));
        };
        if reg.group != rec.group || reg.namespace != rec.namespace {
            return Err(Status::permission_denied(format!(
                "this VM joined WorkloadGroup {}/{}; it cannot register into {}/{}",
                rec.namespace, rec.group, reg.namespace, reg.group
            )));
        }
        let address: IpAddr = reg.address.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "Register.address {:?} is not an IPv4 or IPv6 address",
                reg.address
            ))
        })?;
        if address.is_unspecified() || address.is_multicast() {
            return Err(Status::invalid_argument(format!(
                "Register.address {address} cannot receive traffic"
            )));
        }
        if !reg.network.is_empty() && !meshfed_model::validate::is_dns_label(&reg.network) {
            return Err(Status::invalid_argument(format!(
                "Register.network {:?} is not a DNS label",
                reg.network
            )));
        }
        for (k, v) in &reg.labels {
            if k.is_empty() || k.len() > 317 || v.len() > 63 {
                return Err(Status::invalid_argument(format!(
                    "Register.labels: {k:?}={v:?} is not a Kubernetes label"
                )));
            }
        }
        let locality = match &reg.locality {
            Some(l) if !l.region.is_empty() => {
                let s = [&l.region, &l.zone, &l.subzone]
                    .iter()
                    .filter(|p| !p.is_empty())
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join("/");
                meshfed_model::validate::parse_locality(&s)
                    .map_err(|e| Status::invalid_argument(format!("Register.locality: {e}")))?;
                s
            }
            _ => String::new(),
        };
        let registry = self
            .registry()
            .ok_or_else(|| Status::unavailable("the cluster's registry has not loaded"))?;
        let group = registry.group(&rec.namespace, &rec.group).ok_or_else(|| {
            Status::failed_precondition(format!(
                "WorkloadGroup {}/{} no longer exists",
                rec.namespace, rec.group
            ))
        })?;
        let entry = entry::build(
            group,
            &VmFacts {
                vm_id: rec.vm_id.clone(),
                address,
                network: reg.network.clone(),
                locality,
                labels: reg.labels.clone().into_iter().collect(),
            },
            &self.controller,
            entry::now_ms(),
        );
        let probe_yaml = group
            .spec
            .probe
            .as_ref()
            // JSON is YAML: the VM agent reads it with the one YAML parser.
            .map(|p| serde_json::to_string(p).unwrap_or_default())
            .unwrap_or_default();
        let name = entry.name.clone();
        let conn = self
            .inputs
            .entries
            .connect(entry)
            .map_err(|e| Status::already_exists(e.to_string()))?;
        tracing::info!(vm = %rec.vm_id, entry = %name, "VM connected; WorkloadEntry registered");
        let (tx, rx) = mpsc::channel(8);
        let _ = tx
            .send(Ok(AgentMessage {
                kind: Some(agent_message::Kind::Registered(Registered {
                    entry: name.clone(),
                    probe_yaml,
                })),
            }))
            .await;
        let mut inputs = self.inputs.clone();
        let vms = self.vms.clone();
        let td = self.ca.trust_domain().as_str().to_string();
        tokio::spawn(async move {
            let mut snaps = inputs.model.subscribe();
            let mut own = inputs.own_bundle.clone();
            let mut names = inputs.names.clone();
            let mut sent_names = Arc::new(NameTable::default());
            let mut sent_roots = (Vec::new(), Vec::new());
            let mut sent_bundles = std::collections::BTreeMap::new();
            // `meshfed vm revoke` writes the VM's record; an attached VM is cut off within one
            // check interval, as its credential is refused for every new call at once.
            let mut revocation = tokio::time::interval(REVOCATION_CHECK);
            revocation.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let own_json = own.borrow_and_update().clone();
                let snap = snaps.borrow_and_update().clone();
                let roots = split_roots(&td, &own_json, &snap);
                let bundles =
                    meshfed_model::snapshot::bundles_by_trust_domain(&td, &own_json, &snap);
                let table = names.borrow_and_update().clone();
                if !Arc::ptr_eq(&table, &sent_names) {
                    let msg = AgentMessage {
                        kind: Some(agent_message::Kind::Names(table.to_proto())),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        break;
                    }
                    sent_names = table;
                }
                if roots != sent_roots || bundles != sent_bundles {
                    let msg = AgentMessage {
                        kind: Some(agent_message::Kind::Roots(Roots {
                            roots_der: roots.0.clone(),
                            federated_roots_der: roots.1.clone(),
                            bundles: bundles.clone().into_iter().collect(),
                        })),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        break;
                    }
                    sent_roots = roots;
                    sent_bundles = bundles;
                }
                tokio::select! {
                    _ = revocation.tick() => {
                        if vms.get(&rec.vm_id).ok().flatten().is_none_or(|r| r.revoked) {
                            tracing::info!(vm = %rec.vm_id, entry = %name, "VM revoked; ending its stream");
                            let _ = tx
                                .send(Err(Status::permission_denied(format!(
                                    "VM {} was revoked; bootstrap it again with a new token",
                                    rec.vm_id
                                ))))
                                .await;
                            break;
                        }
                    }
                    _ = inputs.drain.drained() => {
                        let _ = tx.send(Err(Status::unavailable("the agent is shutting down"))).await;
                        break;
                    }
                    _ = stops_leading(&mut inputs.leading) => {
                        let _ = tx.send(Err(not_leading())).await;
                        break;
                    }
                    m = inbound.message() => match m {
                        Ok(Some(VmMessage { kind: Some(vm_message::Kind::Health(h)) })) => {
                            if !inputs.entries.health(&name, conn, h.healthy, &h.message) {
                                break;
                            }
                            if !h.healthy {
                                tracing::info!(entry = %name, reason = %h.message, "VM reports unhealthy");
                            }
                        }
                        Ok(Some(_)) => {
                            let _ = tx.send(Err(Status::invalid_argument("Register may be sent once per stream"))).await;
                            break;
                        }
                        Ok(None) | Err(_) => break,
                    },
                    r = snaps.changed() => if r.is_err() { break },
                    r = own.changed() => if r.is_err() { break },
                    r = names.changed() => if r.is_err() { break },
                    _ = tx.closed() => break,
                }
            }
            inputs.entries.disconnect(&name, conn, entry::now_ms());
            let _ = vms.update(&rec.vm_id, |r| r.last_seen = unix_now());
            tracing::info!(entry = %name, "VM disconnected; WorkloadEntry in its grace period");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
