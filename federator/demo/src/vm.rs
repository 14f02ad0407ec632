//! The demo's VM: `stock` runs on a VM (its own network namespace, or loopback 127.0.4.1) that joins eu through eu's
//! east-west gateway with a bootstrap package, exactly as a real VM would: one-time token,
//! durable credential, auto-registered WorkloadEntry gated by the group's probe, workload
//! certificate files, mesh DNS on the VM.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trust::tls::{Authorizer, SpiffeVerifier, SvidResolver};
use trust::{BundleSet, SpiffeId, Svid, TrustBundle, TrustDomain, TrustStore};

/// The VM's address in loopback mode.
pub const LOOPBACK_ADDR: &str = "127.0.4.1";
/// stock's service port, and the port stock listens on on the VM (the group's template maps
/// the service's `tls` port to it, as WorkloadEntry `ports` does).
pub const STOCK_PORT: u16 = 8090;
pub const STOCK_VM_PORT: u16 = 9090;
pub const STOCK_CLUSTER: &str = "outbound|8090||stock.shop.svc.cluster.local";

/// eu's registry additions: the `stock` service selecting the VM group's entries.
pub fn registry(vm_addr: &str) -> String {
    format!(
        "  - namespace: shop\n    name: stock\n    ports: [{{name: tls, port: {STOCK_PORT}}}]\n    export: true\n    selector: {{app: stock}}\n    labels: {{security.istio.io/tlsMode: istio}}\n\
         workloadGroups:\n  - apiVersion: networking.istio.io/v1\n    kind: WorkloadGroup\n    metadata: {{name: stock-vm, namespace: shop}}\n    spec:\n      metadata: {{labels: {{app: stock}}}}\n      template: {{serviceAccount: stock, ports: {{tls: {STOCK_VM_PORT}}}}}\n      probe: {{periodSeconds: 1, tcpSocket: {{host: {vm_addr}, port: {STOCK_VM_PORT}}}}}\n"
    )
}

/// Builds the bootstrap package (directory form) and the VM's `vm.yaml` from it; the path of
/// that file, for `meshfed vm agent --config`.
pub fn package(
    root: &Path,
    eu_dir: &Path,
    gateway: &str,
    vm_addr: &str,
) -> anyhow::Result<PathBuf> {
    let pkg = root.join("vm-package");
    meshfed_vm::package::build(&meshfed_vm::package::Bootstrap {
        agent_state_dir: eu_dir.to_path_buf(),
        group_from: meshfed_vm::package::GroupFrom::Registry(eu_dir.join("registry.yaml")),
        namespace: "shop".into(),
        group: "stock-vm".into(),
        output: meshfed_vm::package::Output {
            out: pkg.clone(),
            format: meshfed_vm::package::Format::Dir,
            token_ttl: Duration::from_secs(3600),
            vm_network: None,
            control_plane: vec![gateway.to_string()],
            xds: None,
            binary: None,
        },
    })?;
    // The VM's filesystem is this machine's: its FHS paths move under the demo's directory.
    let vm = root.join("vm");
    let mut yaml = std::fs::read_to_string(pkg.join("vm.yaml"))?;
    yaml.push_str(&format!(
        "stateDir: {}\ncertDir: {}\nrootCert: {}\ntokenFile: {}\naddress: {vm_addr}\n\
         dnsListen: {vm_addr}:15053\nxdsListen: {vm_addr}:15010\nadmin: {vm_addr}:15020\n\
         dnsUpstream: [\"127.0.0.1:9\"]\nlabels: {{rack: r7}}\n",
        vm.join("var/lib/meshfed").display(),
        vm.join("etc/meshfed/certs").display(),
        pkg.join("root-cert.pem").display(),
        pkg.join("join-token").display(),
    ));
    let cfg_path = vm.join("vm.yaml");
    std::fs::create_dir_all(&vm)?;
    std::fs::write(&cfg_path, yaml)?;
    // Checked here so a mistake names the file before the VM agent starts.
    meshfed_vm_agent::config::VmConfig::load(&cfg_path).map_err(anyhow::Error::msg)?;
    Ok(cfg_path)
}

/// `stock` on the VM: mTLS with the VM's workload SVID (from the files its agent writes),
/// accepting order from eu.
pub async fn stock_server(
    cert_dir: PathBuf,
    vm_addr: String,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (svid, roots) = Svid::load(&cert_dir)?;
    let eu = TrustDomain::new("eu.mesh")?;
    let mut set = BundleSet::new();
    set.insert(TrustBundle::new(
        eu.clone(),
        roots
            .into_iter()
            .filter(|r| trust::svid::check_signer(r, &eu).is_ok())
            .collect(),
    ))?;
    let cfg = trust::tls::server_config(
        SvidResolver::with(&svid)?,
        SpiffeVerifier::new(
            TrustStore::new(set),
            Authorizer::id(SpiffeId::istio_workload(&eu, "shop", "order")?),
        ),
    )?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = tokio::net::TcpListener::bind((vm_addr.as_str(), STOCK_VM_PORT))
        .await
        .with_context(|| format!("cannot listen on {vm_addr}:{STOCK_VM_PORT} (stock on the VM)"))?;
    Ok(tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            // The probe connects and closes without TLS; `answer` drops it.
            tokio::spawn(super::answer(acceptor.clone(), tcp, |req| {
                format!("{req} in stock (answered by the VM)")
            }));
        }
    }))
}

/// order (eu) calls stock at `addr` over mTLS, checking the server is
/// spiffe://eu.mesh/ns/shop/sa/stock.
pub async fn call_stock(order: Svid, eu_roots: TrustStore, addr: String) -> anyhow::Result<String> {
    let want = SpiffeId::istio_workload(&TrustDomain::new("eu.mesh")?, "shop", "stock")?;
    let cfg = trust::tls::client_config(
        SvidResolver::with(&order)?,
        SpiffeVerifier::new(eu_roots, Authorizer::id(want)),
    )?;
    let tcp = tokio::time::timeout(
        Duration::from_secs(1),
        tokio::net::TcpStream::connect(&addr),
    )
    .await??;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("stock.shop.svc.cluster.local")?, tcp)
        .await?;
    tls.write_all(b"2 bags of coffee").await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(1), tls.read_to_string(&mut reply)).await??;
    Ok(reply)
}

/// Asks a DNS server for `name`'s A records.
pub async fn resolve(server: String, name: &'static str) -> anyhow::Result<Vec<IpAddr>> {
    use hickory_server::proto::op::{Message, Query};
    use hickory_server::proto::rr::{Name, RData, RecordType};
    use std::str::FromStr;
    let mut m = Message::query();
    m.metadata.id = rand::random();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name)?, RecordType::A));
    let s = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
    s.send_to(&m.to_vec()?, server.as_str()).await?;
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(1), s.recv(&mut buf)).await??;
    let r = Message::from_vec(&buf[..n])?;
    Ok(r.answers
        .iter()
        .filter_map(|a| match &a.data {
            RData::A(x) => Some(IpAddr::V4(x.0)),
            _ => None,
        })
        .collect())
}
