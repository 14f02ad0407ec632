//! `meshfed join`, `meshfed agent` and `meshfed leave`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use trust::TrustDomain;

use super::args;
use meshfed_agent::{Agent, AgentConfig};
use meshfed_identity::cluster::{self as identity, ClusterIdentity, JoinParams};

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// Join token from `meshfed federator token create`.
    #[arg(long, env = "MESHFED_JOIN_TOKEN", hide_env_values = true)]
    token: String,
    /// This cluster's state directory (its CA, identity and cache live here).
    #[arg(long)]
    state_dir: PathBuf,
    #[arg(long, value_parser = args::label)]
    cluster: String,
    #[arg(long, value_parser = args::label)]
    network: String,
    #[arg(long, value_parser = args::trust_domain)]
    trust_domain: TrustDomain,
    /// Default locality of the cluster's workloads: region/zone/subzone.
    #[arg(long, value_parser = args::locality)]
    locality: proto::Locality,
    /// East-west gateway address, HOST:PORT (repeatable).
    #[arg(long, value_parser = args::host_port)]
    gateway: Vec<String>,
    /// Use this existing meshfed CA directory as the cluster CA (default: create one).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// When the state directory already holds this cluster's identity, say so and exit 0
    /// without using the token (for init containers and configuration management). An
    /// identity of another cluster is still an error.
    #[arg(long)]
    if_not_joined: bool,
    /// Join again as the same cluster when this state directory already holds its identity
    /// (the way back after the cluster certificate expired during a long outage, or after a
    /// federation root rotation it missed): keeps the cluster CA, trust domain and cache, and
    /// replaces the cluster certificate; the token must be a new one for this cluster.
    #[arg(long)]
    rejoin: bool,
    /// Agent replicas: share the cluster's identity and CA through this Kubernetes Secret.
    /// When it exists, the state directory is restored from it and the token is not used
    /// (another replica joined); otherwise this join writes it.
    #[arg(long, value_parser = args::label)]
    state_secret: Option<String>,
    /// The Secret's namespace (the pod's, from the downward API's POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "meshfed-system", value_parser = args::label)]
    state_secret_namespace: String,
    /// With --state-secret: the kubeconfig (default: the pod's in-cluster configuration).
    #[arg(long, requires = "state_secret")]
    kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[arg(long)]
    state_dir: PathBuf,
    /// Where the cluster's services come from: `file` (the --registry YAML) or `kubernetes`
    /// (Services, EndpointSlices, Nodes, Pods and MCS ServiceExports from the API server).
    #[arg(long, value_enum, default_value = "file")]
    source: Source,
    /// The registry file (YAML): services and exports (`--source file`), WorkloadGroups and
    /// WorkloadEntries (both sources; optional with `--source kubernetes`).
    #[arg(long)]
    registry: Option<PathBuf>,
    /// `--source kubernetes`: the kubeconfig to use (default: the in-cluster configuration of
    /// the pod's service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// `--source kubernetes`: read only namespaces whose labels this selector selects
    /// (kubectl's form: `meshfed.io/federate=true`, `env in (prod,staging)`, `!legacy`, ...).
    #[arg(long, value_parser = namespace_selector)]
    namespace_selector: Option<meshfed_kube::selector::NamespaceSelector>,
    /// `--source kubernetes`: several replicas share this cluster's state (--state-secret) and
    /// elect a leader with a coordination.k8s.io Lease; only the leader writes to the API and
    /// steps the CA, only the replica that speaks for the cluster (the leader, or the last one
    /// while no other leads) holds its federation stream and serves VMs, and every replica
    /// serves xDS and DNS.
    #[arg(long, requires = "state_secret")]
    leader_election: bool,
    /// The Lease's namespace (the pod's, from the downward API's POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "meshfed-system", value_parser = args::label)]
    leader_election_namespace: String,
    /// The Lease's name.
    #[arg(long, default_value = "meshfed-agent", value_parser = args::label)]
    leader_election_lease: String,
    /// This replica's name in the Lease (the pod's, from POD_NAME).
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,
    /// How long a leader's last renewal holds the Lease (whole seconds).
    #[arg(long, default_value = "15s", value_parser = args::std_duration)]
    lease_duration: Duration,
    /// A leader that could not renew for this long stops leading (shorter than --lease-duration).
    #[arg(long, default_value = "10s", value_parser = args::std_duration)]
    lease_renew_deadline: Duration,
    /// How often the leader renews and followers look.
    #[arg(long, default_value = "2s", value_parser = args::std_duration)]
    lease_retry_period: Duration,
    /// With --leader-election: the Secret (in the Lease's namespace) the replicas share the
    /// cluster's identity and CA through (`meshfed join --state-secret` writes it); the leader
    /// writes the CA's changes into it, followers take them.
    #[arg(long, requires = "leader_election", value_parser = args::label)]
    state_secret: Option<String>,
    /// Admin HTTP address (/metrics, /healthz, /readyz, /status).
    #[arg(long, default_value = "127.0.0.1:15014", value_parser = args::socket_addr)]
    admin: std::net::SocketAddr,
    /// Bind every listener that is on (admin, probe, xDS, VM API, DNS, bundle endpoint) to this
    /// address, keeping each one's port: several agents on one host, each on its own loopback
    /// address (127.0.0.2, 127.0.0.3, ...). The admin listener moves too: keep it private.
    #[arg(long)]
    listen_address: Option<std::net::IpAddr>,
    /// A second HTTP listener with /healthz, /readyz and /metrics only (kubelet probes and
    /// Prometheus on the pod IP, without /status or /debug); `off` by default.
    #[arg(long, default_value = "off", value_parser = args::listen)]
    probe: args::Listen,
    /// How often the registry file is checked for changes.
    #[arg(long, default_value = "500ms", value_parser = args::std_duration)]
    registry_poll: Duration,
    /// Failover policy file or directory of `*.yaml` (FailoverPolicy or Istio DestinationRule);
    /// repeatable. Watched for changes.
    #[arg(long = "policy")]
    policies: Vec<PathBuf>,
    /// Plaintext xDS (ADS) address for proxies on this host; `off` disables it. It checks no
    /// identity: bind it wider only where every client that can reach it is trusted.
    #[arg(long, default_value = "127.0.0.1:15010", value_parser = args::listen)]
    xds_plaintext: args::Listen,
    /// mTLS xDS (ADS) address; clients present an SVID of this cluster; `off` disables it.
    #[arg(long, default_value = "0.0.0.0:15012", value_parser = args::listen)]
    xds_mtls: args::Listen,
    /// Changes within this window are pushed to proxies together (at most 1s).
    #[arg(long, default_value = "100ms", value_parser = args::debounce)]
    xds_debounce: Duration,
    /// The VM API (`meshfed vm agent` joins and registers here); `off` disables it.
    #[arg(long, default_value = "0.0.0.0:15018", value_parser = args::listen)]
    vm_api: args::Listen,
    /// How long a disconnected VM's WorkloadEntry is kept (Istio's PILOT_WORKLOAD_ENTRY_GRACE_PERIOD).
    #[arg(long, default_value = "10s", value_parser = args::std_duration)]
    vm_grace: Duration,
    /// Mesh DNS for the cluster's pods (svc.cluster.local and svc.clusterset.local); `off` disables it.
    #[arg(long, default_value = "127.0.0.1:15053", value_parser = args::listen)]
    dns: args::Listen,
    /// Upstream resolvers for other names (IP[:PORT], repeatable; default: /etc/resolv.conf's).
    #[arg(long, value_parser = args::dns_upstream)]
    dns_upstream: Vec<std::net::SocketAddr>,
    /// IPv4 range service VIPs are allocated from (kept across restarts).
    #[arg(long, default_value = "240.240.0.0/16", value_parser = meshfed_dns::vips::parse_v4)]
    vip_range: ipnet::Ipv4Net,
    /// IPv6 range for service VIPs (AAAA answers); `off` for IPv4 only.
    #[arg(long, default_value = "2001:2::/48", value_parser = args::v6_range)]
    vip_range_v6: args::V6Range,
    /// SPIFFE bundle endpoint (https_spiffe profile: `GET /` returns this cluster's bundle,
    /// served with the agent's SVID `spiffe://<td>/ns/meshfed-system/sa/meshfed-agent`); `off`
    /// disables it.
    #[arg(long, default_value = "off", value_parser = args::listen)]
    bundle_endpoint: args::Listen,
    /// Serve the bundle endpoint with the `https_web` profile instead: this Web PKI certificate
    /// chain (PEM; reloaded when it changes), for readers that check it as any HTTPS server
    /// (Istio's caCertificates, SPIRE's https_web federation).
    #[arg(long, requires_all = ["bundle_endpoint_key", "bundle_endpoint"])]
    bundle_endpoint_cert: Option<PathBuf>,
    /// The key of --bundle-endpoint-cert (PEM: PKCS#8, SEC1 or PKCS#1).
    #[arg(long, requires = "bundle_endpoint_cert")]
    bundle_endpoint_key: Option<PathBuf>,
    /// On SIGTERM, streams get this long to finish before they are cut.
    #[arg(long, default_value = "5s", value_parser = args::std_duration)]
    drain_timeout: Duration,
    /// Rotate the cluster CA's root when it is this old (e.g. 90d); `off`: only when
    /// `meshfed ca rotate start` asks.
    #[arg(long, default_value = "off", value_parser = args::duration_or_off)]
    ca_rotation_period: args::MaybeDuration,
    /// How long a new root is published in the bundle before it signs (it also waits until
    /// every member holds that bundle).
    #[arg(long, default_value = "20m", value_parser = args::duration)]
    ca_publish_lead: time::Duration,
    /// Lifetime of the agent's own serving certificate (xDS mTLS, VM API, bundle endpoint);
    /// a retiring root stays in the bundle until the last one it signed has expired.
    #[arg(long, default_value = "24h", value_parser = args::duration)]
    serving_cert_ttl: time::Duration,
    /// Lifetime of the workload certificates proxies get over SDS (secret `default`, issued
    /// for the SPIFFE ID a proxy authenticated with on the mTLS xDS port).
    #[arg(long, default_value = "24h", value_parser = args::duration)]
    sds_cert_ttl: time::Duration,
    /// The audience a service-account token must be for to obtain a workload certificate from
    /// the CA API on the mTLS xDS port (repeatable; Istio's clients ask for istio-ca). The
    /// token is checked with a TokenReview, so this needs --source kubernetes.
    #[arg(long = "token-audience", default_value = "istio-ca", value_parser = token_audience)]
    token_audiences: Vec<String>,
    /// A DNS name for the agent's serving certificate (xDS mTLS port, CA API, VM API), beside
    /// its SPIFFE ID, for clients that check the name they dial (repeatable; default: the
    /// names of the meshfed-agent Service in meshfed-system).
    #[arg(long = "serving-dns-name", value_parser = dns_name)]
    serving_dns_names: Vec<String>,
    /// `--source kubernetes`: serve the injection webhook here (HTTPS, `POST /inject`, the
    /// agent's serving certificate): pods labelled `meshfed.io/inject: grpc`, or created in a
    /// namespace so labelled, get `meshfed workload init` and `meshfed workload agent`.
    #[arg(long, value_parser = args::socket_addr)]
    injection_webhook: Option<std::net::SocketAddr>,
    /// The image of the injected containers (this meshfed's image).
    #[arg(long, env = "MESHFED_IMAGE", requires = "injection_webhook")]
    injection_image: Option<String>,
    /// The injected containers' imagePullPolicy (default: the cluster's).
    #[arg(long, requires = "injection_webhook", value_parser = ["Always", "IfNotPresent", "Never"])]
    injection_image_pull_policy: Option<String>,
    /// The MutatingWebhookConfiguration whose caBundle the leader keeps equal to the
    /// cluster's roots (applied by the operator; never created or deleted by the agent).
    #[arg(long, default_value = "meshfed-injector", value_parser = args::label)]
    injection_webhook_config: String,
    /// The agent's mTLS xDS address as injected pods dial it.
    #[arg(long, default_value = "meshfed-agent.meshfed-system.svc:15012", value_parser = args::host_port)]
    injection_agent_address: String,
    /// `--source kubernetes`: feed the cluster's istiod: every import as a ServiceEntry,
    /// WorkloadEntries and, where a meshfed policy applies, a DestinationRule; the peers'
    /// roots in the mesh config ConfigMap (docs/istio.md).
    #[arg(long)]
    istio: bool,
    /// With --istio: the ConfigMap (`NAMESPACE/NAME`) meshfed owns for the peers' roots
    /// (istiod reads it with SHARED_MESH_CONFIG=NAME), or `off`.
    #[arg(long, default_value = "istio-system/meshfed-mesh", requires = "istio", value_parser = object_ref_or_off)]
    istio_mesh_config: ObjectRefOrOff,
}

/// `NAMESPACE/NAME` of an object, or `off`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ObjectRefOrOff(Option<(String, String)>);

fn object_ref_or_off(s: &str) -> Result<ObjectRefOrOff, String> {
    if s == "off" {
        return Ok(ObjectRefOrOff(None));
    }
    let (ns, name) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: expected NAMESPACE/NAME or off"))?;
    args::label(ns).map_err(|e| format!("{s:?}: namespace: {e}"))?;
    if name.is_empty()
        || name.len() > 253
        || !name.split('.').all(meshfed_model::validate::is_dns_label)
    {
        return Err(format!("{s:?}: {name:?} is not an object name"));
    }
    Ok(ObjectRefOrOff(Some((ns.to_string(), name.to_string()))))
}

fn dns_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!("{s:?} is not a DNS name"))
    }
}

fn token_audience(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 253 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{s:?} is not an audience (1-253 characters, no spaces)"
        ));
    }
    Ok(s.to_string())
}

#[derive(Debug, Args)]
pub struct LeaveArgs {
    #[arg(long)]
    state_dir: PathBuf,
}

/// A state directory that exists must be a directory (a file there is a mistake to name, not
/// to fail on deep inside with "File exists").
fn state_dir_is_a_directory(dir: &std::path::Path) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!("--state-dir {}: is a file, not a directory", dir.display());
    }
    Ok(())
}

pub async fn join(a: JoinArgs) -> anyhow::Result<ExitCode> {
    state_dir_is_a_directory(&a.state_dir)?;
    let Some(secret) = a.state_secret.clone() else {
        return join_here(a).await;
    };
    let ns = a.state_secret_namespace.clone();
    let client = meshfed_kube::source::client(a.kubeconfig.as_deref()).await?;
    let joined = identity::identity_dir(&a.state_dir)
        .join("identity.json")
        .exists();
    let now = time::OffsetDateTime::now_utc();
    if !joined {
        if let Some(mut state) =
            meshfed_kube::state_secret::fetch(client.clone(), &ns, &secret).await?
        {
            // An expired identity in the Secret: a running leader writes its renewed one there
            // every few seconds (it may have just been unable to reach the API). Joining again
            // instead would end the membership every running replica speaks with, so wait for
            // it first, and join again only when nobody refreshes it.
            let deadline = tokio::time::Instant::now() + IDENTITY_REFRESH_WAIT;
            loop {
                let id = restore(
                    &a.state_dir,
                    &a.cluster,
                    &a.trust_domain,
                    &ns,
                    &secret,
                    state,
                )?;
                if id.svid.not_after > time::OffsetDateTime::now_utc() {
                    return Ok(ExitCode::SUCCESS);
                }
                if tokio::time::Instant::now() >= deadline {
                    eprintln!(
                        "the identity in Secret {ns}/{secret} expired at {} and no replica renewed it within {IDENTITY_REFRESH_WAIT:?}; joining again with the token (the cluster keeps its CA)",
                        args::rfc3339(id.svid.not_after)
                    );
                    break;
                }
                eprintln!(
                    "the identity in Secret {ns}/{secret} expired at {}; waiting for the leading replica to write its renewed one",
                    args::rfc3339(id.svid.not_after)
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
                state =
                    match meshfed_kube::state_secret::fetch(client.clone(), &ns, &secret).await? {
                        Some(s) => s,
                        None => break,
                    };
            }
        }
    } else if let Some(state) = meshfed_kube::state_secret::fetch(client.clone(), &ns, &secret)
        .await?
        .filter(|s| s.cluster == a.cluster)
    {
        // Joined, but this replica's certificate expired (it was down): the leader keeps the
        // Secret's current, so take that one rather than spend a token.
        let local = identity::ClusterIdentity::load(&a.state_dir)?;
        if local.svid.not_after <= now {
            let ids = state.only(meshfed_kube::state_secret::IDENTITY);
            let tmp = tempfile::tempdir()?;
            ids.write(tmp.path())?;
            if let Ok(theirs) = identity::ClusterIdentity::load(tmp.path()) {
                if theirs.svid.not_after > now && theirs.file.cluster == a.cluster {
                    ids.write(&a.state_dir)?;
                    println!(
                        "took the current identity of {} from Secret {ns}/{secret} (this replica's had expired); the token was not used",
                        theirs.svid.id
                    );
                    return Ok(ExitCode::SUCCESS);
                }
            }
        }
    }
    let (state_dir, cluster) = (a.state_dir.clone(), a.cluster.clone());
    let td = a.trust_domain.clone();
    match join_here(a).await {
        Ok(code) => {
            let state = meshfed_kube::state_secret::SharedState::read(
                &state_dir,
                &cluster,
                &[
                    meshfed_kube::state_secret::IDENTITY,
                    meshfed_kube::state_secret::CA,
                ],
            )?;
            if meshfed_kube::state_secret::create(client.clone(), &ns, &secret, &state).await? {
                println!("the cluster's identity and CA are in Secret {ns}/{secret} for the other replicas");
            } else if meshfed_kube::state_secret::update_dir(
                client,
                &ns,
                &secret,
                meshfed_kube::state_secret::IDENTITY,
                &state,
            )
            .await?
            {
                println!("updated the identity in Secret {ns}/{secret}");
            }
            Ok(code)
        }
        Err(e) if !joined => {
            // Another replica may be joining with the same (single-use) token right now.
            eprintln!(
                "{e:#}; waiting up to 30 s for another replica to write Secret {ns}/{secret}"
            );
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Some(state) =
                    meshfed_kube::state_secret::fetch(client.clone(), &ns, &secret).await?
                {
                    restore(&state_dir, &cluster, &td, &ns, &secret, state)?;
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Err(e)
        }
        Err(e) => Err(e),
    }
}

/// How long a joining replica waits for a running leader to refresh an expired identity in
/// the shared Secret before it joins again itself.
const IDENTITY_REFRESH_WAIT: Duration = Duration::from_secs(60);

/// Writes the Secret's identity and CA into the state directory (another replica joined),
/// once they load and are of this cluster and trust domain.
fn restore(
    state_dir: &std::path::Path,
    cluster: &str,
    trust_domain: &TrustDomain,
    ns: &str,
    secret: &str,
    state: meshfed_kube::state_secret::SharedState,
) -> anyhow::Result<ClusterIdentity> {
    if state.cluster != cluster {
        anyhow::bail!(
            "Secret {ns}/{secret} holds the state of cluster {:?}, not {cluster:?}",
            state.cluster
        );
    }
    // Checked in a scratch directory first: nothing is written unless it is usable.
    let tmp = tempfile::tempdir()?;
    state.write(tmp.path())?;
    let id = identity::ClusterIdentity::load(tmp.path())
        .with_context(|| format!("the identity in Secret {ns}/{secret}"))?;
    if id.file.trust_domain != trust_domain.as_str() {
        anyhow::bail!(
            "Secret {ns}/{secret} holds cluster {cluster} of trust domain {}, not {trust_domain}",
            id.file.trust_domain
        );
    }
    let ca = trust::CertificateAuthority::load(&identity::ca_dir(tmp.path()))
        .with_context(|| format!("the CA in Secret {ns}/{secret}"))?;
    if ca.trust_domain() != trust_domain {
        anyhow::bail!(
            "Secret {ns}/{secret} holds a CA of trust domain {}, not {trust_domain}",
            ca.trust_domain()
        );
    }
    let n = state.write(state_dir)?;
    println!(
        "restored the identity of {} and its CA from Secret {ns}/{secret} ({n} files; another replica joined); the token was not used",
        id.svid.id
    );
    Ok(id)
}

async fn join_here(a: JoinArgs) -> anyhow::Result<ExitCode> {
    if a.if_not_joined
        && identity::identity_dir(&a.state_dir)
            .join("identity.json")
            .exists()
    {
        let id = identity::ClusterIdentity::load(&a.state_dir)?;
        if id.file.cluster != a.cluster {
            anyhow::bail!(
                "{} holds the identity of cluster {:?}, not {:?}",
                a.state_dir.display(),
                id.file.cluster,
                a.cluster
            );
        }
        if id.svid.not_after <= time::OffsetDateTime::now_utc() {
            // An expired cluster certificate cannot authenticate (nor renew): join again with
            // the token given, which must be a new one.
            eprintln!(
                "the cluster certificate of {} expired at {}; joining again with the token",
                id.file.cluster,
                args::rfc3339(id.svid.not_after)
            );
            return finish_join(a, true).await;
        }
        println!(
            "already joined as {} (federation {}); the token was not used",
            id.svid.id, id.file.federation_trust_domain
        );
        return Ok(ExitCode::SUCCESS);
    }
    let rejoin = a.rejoin;
    finish_join(a, rejoin).await
}

async fn finish_join(a: JoinArgs, rejoin: bool) -> anyhow::Result<ExitCode> {
    let id = identity::join(JoinParams {
        token: a.token,
        state_dir: a.state_dir.clone(),
        cluster: a.cluster,
        network: a.network,
        trust_domain: a.trust_domain,
        locality: a.locality,
        gateways: a.gateway,
        ca: a.ca,
        rejoin,
    })
    .await?;
    println!(
        "joined as {} (federation {})",
        id.svid.id, id.file.federation_trust_domain
    );
    println!("federator: {}", id.file.federators.join(", "));
    println!("identity written to {}", id.dir.display());
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Source {
    File,
    Kubernetes,
}

pub async fn run(a: AgentArgs) -> anyhow::Result<ExitCode> {
    // Every flag was parsed and checked by clap (exit 2 naming the flag) before this point.
    let dns_upstream = if a.dns_upstream.is_empty() {
        meshfed_dns::system_upstreams()
    } else {
        a.dns_upstream
    };
    if a.kubeconfig.is_some() && a.source != Source::Kubernetes {
        anyhow::bail!("--kubeconfig is for --source kubernetes");
    }
    if a.namespace_selector.is_some() && a.source != Source::Kubernetes {
        anyhow::bail!("--namespace-selector is for --source kubernetes");
    }
    let leader_election = if a.leader_election {
        if a.source != Source::Kubernetes {
            anyhow::bail!("--leader-election is for --source kubernetes (the Lease is in the API)");
        }
        let lease = meshfed_kube::leader::LeaseConfig {
            namespace: a.leader_election_namespace.clone(),
            name: a.leader_election_lease.clone(),
            identity: a.leader_election_identity.clone().unwrap_or_default(),
            lease_duration: a.lease_duration,
            renew_deadline: a.lease_renew_deadline,
            retry_period: a.lease_retry_period,
        };
        lease
            .validate()
            .map_err(|e| anyhow::anyhow!("--leader-election: {e}"))?;
        Some(lease)
    } else {
        None
    };
    let injection = match a.injection_webhook {
        Some(listen) => {
            if a.source != Source::Kubernetes {
                anyhow::bail!("--injection-webhook is for --source kubernetes (pods and namespaces come from the API)");
            }
            let Some(image) = a.injection_image.clone() else {
                anyhow::bail!("--injection-webhook needs --injection-image (or MESHFED_IMAGE): the image of the injected containers");
            };
            Some(meshfed_agent::injection::InjectionConfig {
                listen,
                image,
                image_pull_policy: a.injection_image_pull_policy.clone(),
                webhook_config: a.injection_webhook_config.clone(),
                agent_address: a.injection_agent_address.clone(),
                agent_namespace: a.leader_election_namespace.clone(),
            })
        }
        None => None,
    };
    if a.istio && a.source != Source::Kubernetes {
        anyhow::bail!("--istio is for --source kubernetes (meshfed writes Istio's objects to the cluster's API)");
    }
    let istio = a.istio.then(|| meshfed_agent::IstioConfig {
        mesh_config: a.istio_mesh_config.0.clone(),
    });
    if a.registry.is_none() && a.source == Source::File {
        anyhow::bail!("--registry FILE is required with --source file (the default)");
    }
    // What is named must exist: a typo is refused at once rather than logged while the agent
    // runs without it (a file that exists but is broken is reported and retried instead).
    if let Some(r) = a.registry.as_ref().filter(|r| !r.is_file()) {
        anyhow::bail!("--registry {}: no such file", r.display());
    }
    if let Some(p) = a.policies.iter().find(|p| !p.exists()) {
        anyhow::bail!("--policy {}: no such file or directory", p.display());
    }
    state_dir_is_a_directory(&a.state_dir)?;
    // --listen-address moves every listener that is on to one address.
    let listen_address = a.listen_address;
    let on = |l: Option<std::net::SocketAddr>| {
        l.map(|addr| match listen_address {
            Some(ip) => std::net::SocketAddr::new(ip, addr.port()),
            None => addr,
        })
    };
    // The client is built (its kubeconfig read and checked) before anything binds.
    let kubernetes = match a.source {
        Source::Kubernetes => Some(meshfed_kube::source::KubeClient(
            meshfed_kube::source::client(a.kubeconfig.as_deref()).await?,
        )),
        Source::File => None,
    };
    let agent = Agent::start(AgentConfig {
        state_dir: a.state_dir,
        registry: a.registry,
        kubernetes,
        namespace_selector: a.namespace_selector,
        admin: on(Some(a.admin)),
        probe: on(a.probe.0),
        registry_poll: a.registry_poll,
        policies: a.policies,
        xds: Some(meshfed_xds::XdsConfig {
            plaintext: on(a.xds_plaintext.0),
            mtls: on(a.xds_mtls.0),
            debounce: a.xds_debounce,
            workload_cert_ttl: a.sds_cert_ttl,
        }),
        vm_api: on(a.vm_api.0),
        vm_grace: a.vm_grace,
        dns: on(a.dns.0).map(|listen| meshfed_dns::DnsConfig {
            listen,
            upstream: dns_upstream,
        }),
        vip_range_v4: a.vip_range,
        vip_range_v6: a.vip_range_v6.0,
        bundle_endpoint: on(a.bundle_endpoint.0),
        // Loaded (and checked: chain, key, that they match) before anything binds.
        bundle_endpoint_web: match (&a.bundle_endpoint_cert, &a.bundle_endpoint_key) {
            (Some(c), Some(k)) => Some(
                meshfed_net::bundle_endpoint::WebCert::load(c, k)
                    .map_err(|e| anyhow::anyhow!("--bundle-endpoint-cert: {e:#}"))?,
            ),
            _ => None,
        },
        ca_rotation: meshfed_identity::live_ca::RotationPolicy {
            period: a.ca_rotation_period.0,
            publish_lead: a.ca_publish_lead,
        },
        serving_cert_ttl: a.serving_cert_ttl,
        state_secret: a
            .state_secret
            .map(|name| (a.leader_election_namespace.clone(), name)),
        leader_election,
        token_audiences: a.token_audiences,
        serving_dns_names: if a.serving_dns_names.is_empty() {
            meshfed_agent::default_serving_dns_names()
        } else {
            a.serving_dns_names
        },
        injection: injection.map(|mut i| {
            i.listen = on(Some(i.listen)).unwrap_or(i.listen);
            i
        }),
        istio,
    })
    .await?;
    let show =
        |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "off".into());
    println!(
        "agent for cluster {} running (admin {}, xDS {} plaintext, {} mTLS, VM API {}, DNS {}, bundle endpoint {}, injection webhook {})",
        agent.inner.identity().file.cluster,
        show(agent.admin_addr),
        show(agent.xds_plaintext),
        show(agent.xds_mtls),
        show(agent.vm_api),
        show(agent.dns_addr),
        show(agent.bundle_endpoint),
        show(agent.injection_webhook),
    );
    let tasks = agent.tasks().clone();
    Ok(super::serve_until_signal(&tasks, a.drain_timeout, agent.drain(a.drain_timeout)).await)
}

pub async fn leave(a: LeaveArgs) -> anyhow::Result<ExitCode> {
    let id = ClusterIdentity::load(&a.state_dir)?;
    let (cfg, _) = id.client_config()?;
    let mut client = proto::federation_client::FederationClient::new(meshfed_net::channel(
        id.file.federators.clone(),
        cfg,
        "federator",
    )?);
    let resp = client
        .leave(proto::LeaveRequest {})
        .await
        .map_err(|s| identity::describe_status("the federator refused the leave", &s))?
        .into_inner();
    // The identity is kept aside (not deleted) for the record; a new join needs a new token.
    let dir = identity::identity_dir(&a.state_dir);
    let aside = a.state_dir.join(format!(
        "identity.left-{}",
        time::OffsetDateTime::now_utc().unix_timestamp()
    ));
    std::fs::rename(&dir, &aside)
        .with_context(|| format!("cannot move {} aside", dir.display()))?;
    println!(
        "cluster {} left the federation at revision {}",
        id.file.cluster, resp.revision
    );
    Ok(ExitCode::SUCCESS)
}

fn namespace_selector(s: &str) -> Result<meshfed_kube::selector::NamespaceSelector, String> {
    meshfed_kube::selector::parse(s)
}
