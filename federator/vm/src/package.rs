//! `meshfed vm bootstrap`: the VM bootstrap package, as a directory, a tar.gz, or a Debian
//! package. Everything a VM needs to join one WorkloadGroup:
//!
//! | file | installed as | what |
//! | --- | --- | --- |
//! | `meshfed` | /usr/bin/meshfed | this binary |
//! | `vm.yaml` | /etc/meshfed/vm.yaml | cluster, network, trust domain, control plane, group |
//! | `root-cert.pem` | /etc/meshfed/root-cert.pem | the cluster's root (checks the agent) |
//! | `join-token` | /etc/meshfed/join-token (0640 root:meshfed) | one-time, expiring, bound to the group |
//! | `hosts` | appended to /etc/hosts | the control plane's name -> the gateway's address |
//! | `meshfed-vm.service` | /lib/systemd/system/ | the systemd unit (runs as user meshfed) |
//! | `install.sh` | | puts the files in place, owners and modes, enables the unit |
//!
//! The package holds a secret (the token): keep it like a password until the VM has joined.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::token::VmClaims;
use meshfed_vm_agent::config::{VmConfig, VM_API_SNI, XDS_SNI};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Dir,
    Tar,
    Deb,
}

/// Where the VM's WorkloadGroup comes from.
#[derive(Debug, Clone)]
pub enum GroupFrom {
    /// The agent's registry file (`workloadGroups:`).
    Registry(PathBuf),
    /// A WorkloadGroup object the caller read (from the Kubernetes API) and checked.
    Object(Box<meshfed_model::workload::WorkloadGroup>),
}

#[derive(Debug, Clone)]
pub struct Bootstrap {
    pub agent_state_dir: PathBuf,
    pub group_from: GroupFrom,
    pub namespace: String,
    pub group: String,
    pub output: Output,
}

/// What was produced.
#[derive(Debug)]
pub struct Built {
    pub path: PathBuf,
    pub token_id: String,
    pub expires: i64,
}

/// The unit is the one under `deploy/systemd/`, so the package and the repository never differ.
const UNIT: &str = include_str!("../../../deploy/systemd/meshfed-vm.service");

const INSTALL: &str = r#"#!/bin/sh
# Installs the meshfed VM agent from this bootstrap package.
# Usage: sudo ./install.sh [--root DIR]   (--root installs into DIR, e.g. an image being built;
# no user is created and no service started there)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=""
if [ "${1:-}" = "--root" ]; then root="$2"; fi
if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then echo "install.sh: run as root" >&2; exit 1; fi
if [ -z "$root" ] && ! getent passwd meshfed >/dev/null; then
  useradd --system --no-create-home --home-dir /var/lib/meshfed --shell /usr/sbin/nologin meshfed
fi
owner=root:root
if [ -z "$root" ]; then owner=root:meshfed; fi
install -d -m 0755 "$root/usr/bin" "$root/lib/systemd/system"
install -d -m 0750 "$root/etc/meshfed"
install -m 0755 "$here/meshfed" "$root/usr/bin/meshfed"
install -m 0644 "$here/vm.yaml" "$root/etc/meshfed/vm.yaml"
install -m 0644 "$here/root-cert.pem" "$root/etc/meshfed/root-cert.pem"
install -m 0640 "$here/join-token" "$root/etc/meshfed/join-token"
install -m 0644 "$here/meshfed-vm.service" "$root/lib/systemd/system/meshfed-vm.service"
install -d -m 0700 "$root/var/lib/meshfed" "$root/etc/meshfed/certs"
if [ -z "$root" ]; then
  chown "$owner" "$root/etc/meshfed" "$root/etc/meshfed/join-token"
  chown meshfed:meshfed "$root/var/lib/meshfed" "$root/etc/meshfed/certs"
  chmod 0750 "$root/etc/meshfed/certs"
fi
touch "$root/etc/hosts"
while read -r line; do
  [ -z "$line" ] && continue
  grep -qxF "$line" "$root/etc/hosts" || echo "$line" >> "$root/etc/hosts"
done < "$here/hosts"
if [ -z "$root" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable --now meshfed-vm.service
fi
echo "meshfed VM agent installed${root:+ into $root}"
"#;

const POSTINST: &str = r#"#!/bin/sh
# dpkg postinst: the service user, owners and modes, the hosts entry, the unit.
# Honours DPKG_ROOT (dpkg --root with --force-script-chrootless).
set -e
r="${DPKG_ROOT:-}"
if [ "$1" = configure ]; then
  if [ -z "$r" ] && ! getent passwd meshfed >/dev/null; then
    useradd --system --no-create-home --home-dir /var/lib/meshfed --shell /usr/sbin/nologin meshfed
  fi
  install -d -m 0700 "$r/var/lib/meshfed" "$r/etc/meshfed/certs"
  chmod 0750 "$r/etc/meshfed"
  chmod 0640 "$r/etc/meshfed/join-token"
  if [ -z "$r" ]; then
    chown root:meshfed "$r/etc/meshfed" "$r/etc/meshfed/join-token"
    chown meshfed:meshfed "$r/var/lib/meshfed" "$r/etc/meshfed/certs"
  fi
  touch "$r/etc/hosts"
  while read -r line; do
    [ -z "$line" ] && continue
    grep -qxF "$line" "$r/etc/hosts" || echo "$line" >> "$r/etc/hosts"
  done < "$r/usr/share/meshfed-vm/hosts"
  if [ -z "$r" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now meshfed-vm.service || true
  fi
fi
exit 0
"#;

const PRERM: &str = r#"#!/bin/sh
set -e
if [ -z "${DPKG_ROOT:-}" ] && [ -d /run/systemd/system ] && [ "$1" = remove ]; then
  systemctl disable --now meshfed-vm.service || true
fi
exit 0
"#;

fn write(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    std::fs::write(path, data).with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// What a package carries besides the binary: the cluster's facts, the group and its token.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cluster: String,
    pub trust_domain: String,
    pub network: String,
    pub namespace: String,
    pub group: String,
    pub service_account: String,
    pub gateways: Vec<String>,
    pub roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// The encoded one-time token.
    pub token: String,
    pub token_id: String,
    pub expires: i64,
}

/// Checks the output and the addresses before a token exists.
fn check_output(b: &Output) -> anyhow::Result<()> {
    if let Some(n) = &b.vm_network {
        meshfed_model::validate::check_label("--vm-network", n).map_err(|e| anyhow::anyhow!(e))?;
    }
    for a in b.control_plane.iter().chain(b.xds.iter()) {
        meshfed_model::validate::check_host_port("--control-plane", a)
            .map_err(|e| anyhow::anyhow!(e))?;
    }
    if b.token_ttl.as_secs() == 0 {
        bail!("--token-ttl must be positive");
    }
    match b.format {
        Format::Dir => {
            if b.out.exists()
                && (!b.out.is_dir()
                    || std::fs::read_dir(&b.out)
                        .with_context(|| format!("cannot read {}", b.out.display()))?
                        .next()
                        .is_some())
            {
                bail!("{} exists and is not an empty directory", b.out.display());
            }
        }
        Format::Tar | Format::Deb => {
            let path = with_ext(
                &b.out,
                if b.format == Format::Tar {
                    "tar.gz"
                } else {
                    "deb"
                },
            );
            if path.exists() {
                bail!("{} exists (it must not)", path.display());
            }
        }
    }
    Ok(())
}

/// Where and how a package is written, whoever makes its token.
#[derive(Debug, Clone)]
pub struct Output {
    pub out: PathBuf,
    pub format: Format,
    pub token_ttl: std::time::Duration,
    pub vm_network: Option<String>,
    /// VM API addresses; default: the cluster's east-west gateways.
    pub control_plane: Vec<String>,
    /// mTLS xDS address; default: the first control-plane address.
    pub xds: Option<String>,
    pub binary: Option<PathBuf>,
}

/// Creates the token beside the agent's state and writes the package; a package that cannot
/// be written leaves its token revoked.
pub fn build(b: &Bootstrap) -> anyhow::Result<Built> {
    let out = &b.output;
    let id = meshfed_identity::cluster::ClusterIdentity::load(&b.agent_state_dir)?;
    let group = match &b.group_from {
        GroupFrom::Registry(path) => {
            let reg = meshfed_model::registry::load_file(path).map_err(|e| anyhow::anyhow!(e))?;
            reg.group(&b.namespace, &b.group)
                .with_context(|| {
                    format!(
                        "{}: no WorkloadGroup {}/{} (add it under workloadGroups: first)",
                        path.display(),
                        b.namespace,
                        b.group
                    )
                })?
                .clone()
        }
        GroupFrom::Object(g) => {
            if g.metadata.namespace.0 != b.namespace || g.metadata.name.0 != b.group {
                bail!(
                    "the WorkloadGroup given is {}, not {}/{}",
                    g.key(),
                    b.namespace,
                    b.group
                );
            }
            (**g).clone()
        }
    };
    let sa = group.service_account();
    let td = trust::TrustDomain::new(&id.file.trust_domain)?;
    let ca = meshfed_identity::cluster::open_cluster_ca(&b.agent_state_dir, &td, None)?;
    check_output(out)?;
    if out.control_plane.is_empty() && id.file.gateways.is_empty() {
        bail!("cluster {} has no east-west gateway; pass --control-plane HOST:PORT (the agent's VM API, port 15018 by default)", id.file.cluster);
    }
    let store = crate::token::token_store(&b.agent_state_dir);
    let binding = crate::token::binding(&b.namespace, &b.group, &sa);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let ttl = i64::try_from(out.token_ttl.as_secs()).unwrap_or(i64::MAX);
    let (rec, secret) = store.create_bound(&binding, ttl, now)?;
    let claims = VmClaims {
        id: rec.id.clone(),
        secret,
        cluster: id.file.cluster.clone(),
        trust_domain: id.file.trust_domain.clone(),
        namespace: b.namespace.clone(),
        group: b.group.clone(),
        service_account: sa.clone(),
        expires: rec.expires,
    };
    let issued = Issued {
        cluster: id.file.cluster.clone(),
        trust_domain: id.file.trust_domain.clone(),
        network: id.file.network.clone(),
        namespace: b.namespace.clone(),
        group: b.group.clone(),
        service_account: sa,
        gateways: id.file.gateways.clone(),
        roots: ca.roots(),
        token: claims.encode(),
        token_id: rec.id.clone(),
        expires: rec.expires,
    };
    match write_package(&issued, out, now) {
        Ok(path) => Ok(Built {
            path,
            token_id: rec.id,
            expires: rec.expires,
        }),
        Err(e) => {
            let revoked = match store.revoke(&rec.id) {
                Ok(_) => format!("token {} was revoked", rec.id),
                Err(r) => format!(
                    "token {} could not be revoked ({r}): revoke it with `meshfed vm revoke`",
                    rec.id
                ),
            };
            Err(e.context(format!("no package was written; {revoked}")))
        }
    }
}

/// A running agent to make the token at (`meshfed vm bootstrap --agent`).
#[derive(Debug, Clone)]
pub struct Remote {
    /// The agent's mTLS xDS address(es).
    pub agent: Vec<String>,
    pub server_name: String,
    /// The cluster's roots, to check the agent with.
    pub roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub trust_domain: trust::TrustDomain,
    /// The caller's Kubernetes bearer token.
    pub bearer: String,
    pub namespace: String,
    pub group: String,
}

fn remote_channel(r: &Remote) -> anyhow::Result<tonic::transport::Channel> {
    let mut set = trust::BundleSet::new();
    set.insert(trust::TrustBundle::new(
        r.trust_domain.clone(),
        r.roots.clone(),
    ))?;
    let verifier = trust::tls::SpiffeVerifier::new(
        trust::TrustStore::new(set),
        trust::tls::Authorizer::id(meshfed_identity::ids::agent_spiffe_id(&r.trust_domain)?),
    );
    let tls = trust::tls::client_config(trust::tls::SvidResolver::new(), verifier)?;
    meshfed_net::channel(r.agent.clone(), tls, &r.server_name)
}

fn bearer<T>(r: &Remote, msg: T) -> anyhow::Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", r.bearer.trim())
            .parse()
            .context("the bearer token holds characters a header cannot carry")?,
    );
    Ok(req)
}

/// Makes the token at the running agent (it authenticates and authorizes the caller) and
/// writes the package; a package that cannot be written has its token revoked there.
pub async fn build_at_agent(r: &Remote, out: &Output) -> anyhow::Result<Built> {
    use proto::vm::vm_admin_client::VmAdminClient;
    check_output(out)?;
    let mut client = VmAdminClient::new(remote_channel(r)?);
    let resp = client
        .create_token(bearer(
            r,
            proto::vm::CreateTokenRequest {
                namespace: r.namespace.clone(),
                group: r.group.clone(),
                ttl_seconds: i64::try_from(out.token_ttl.as_secs()).unwrap_or(i64::MAX),
            },
        )?)
        .await
        .map_err(|s| {
            meshfed_identity::cluster::describe_status("the agent did not make a VM token", &s)
        })?
        .into_inner();
    let issued = (|| -> anyhow::Result<Issued> {
        if resp.trust_domain != r.trust_domain.as_str() {
            bail!(
                "the agent's trust domain is {}, and --trust-domain says {}",
                resp.trust_domain,
                r.trust_domain
            );
        }
        let roots = trust::keys::certs_from_pem(resp.roots_pem.as_bytes(), "the agent's roots")?;
        for c in &roots {
            trust::svid::check_signer(c, &r.trust_domain)
                .map_err(|e| anyhow::anyhow!("a root from the agent is unusable: {e}"))?;
        }
        Ok(Issued {
            cluster: resp.cluster.clone(),
            trust_domain: resp.trust_domain.clone(),
            network: resp.network.clone(),
            namespace: r.namespace.clone(),
            group: r.group.clone(),
            service_account: resp.service_account.clone(),
            gateways: resp.gateways.clone(),
            roots,
            token: resp.token.clone(),
            token_id: resp.token_id.clone(),
            expires: resp.expires,
        })
    })();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    match issued.and_then(|i| write_package(&i, out, now)) {
        Ok(path) => Ok(Built {
            path,
            token_id: resp.token_id,
            expires: resp.expires,
        }),
        Err(e) => {
            let revoked = client
                .revoke_token(bearer(
                    r,
                    proto::vm::RevokeTokenRequest {
                        namespace: r.namespace.clone(),
                        group: r.group.clone(),
                        token_id: resp.token_id.clone(),
                    },
                )?)
                .await;
            let said = match revoked {
                Ok(_) => format!("token {} was revoked at the agent", resp.token_id),
                Err(s) => format!(
                    "token {} could not be revoked at the agent ({}): it expires {}",
                    resp.token_id,
                    s.message(),
                    meshfed_model::entry::rfc3339(resp.expires * 1000)
                ),
            };
            Err(e.context(format!("no package was written; {said}")))
        }
    }
}

/// Writes the package for `i` into `b.out`.
fn write_package(i: &Issued, b: &Output, now: i64) -> anyhow::Result<PathBuf> {
    let control_plane = if b.control_plane.is_empty() {
        if i.gateways.is_empty() {
            bail!("cluster {} has no east-west gateway; pass --control-plane HOST:PORT (the agent's VM API, port 15018 by default)", i.cluster);
        }
        i.gateways.clone()
    } else {
        b.control_plane.clone()
    };
    let stage = tempfile::tempdir()?;
    let dir = stage.path();
    let mut yaml = format!(
        "# meshfed VM agent configuration (meshfed vm bootstrap, {})\n\
         cluster: {}\ntrustDomain: {}\nnetwork: {}\nnamespace: {}\ngroup: {}\nserviceAccount: {}\n\
         controlPlane: [{}]\n",
        meshfed_model::entry::rfc3339(now * 1000),
        i.cluster,
        i.trust_domain,
        i.network,
        i.namespace,
        i.group,
        i.service_account,
        control_plane
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(x) = &b.xds {
        yaml.push_str(&format!("xds: \"{x}\"\n"));
    }
    if let Some(n) = &b.vm_network {
        yaml.push_str(&format!("vmNetwork: {n}\n"));
    }
    write(&dir.join("vm.yaml"), yaml.as_bytes(), 0o644)?;
    VmConfig::parse(&yaml, "vm.yaml").map_err(|e| anyhow::anyhow!(e))?;
    write(
        &dir.join("root-cert.pem"),
        trust::keys::certs_to_pem(i.roots.iter()).as_bytes(),
        0o644,
    )?;
    write(&dir.join("join-token"), i.token.as_bytes(), 0o600)?;
    // Hosts entries for the control plane's names, when it is reached by IP.
    let mut hosts = String::new();
    if let Some(ip) = control_plane
        .first()
        .and_then(|a| a.rsplit_once(':'))
        .and_then(|(h, _)| h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().ok())
    {
        hosts.push_str(&format!("{ip} {VM_API_SNI} {XDS_SNI}\n"));
    }
    write(&dir.join("hosts"), hosts.as_bytes(), 0o644)?;
    write(&dir.join("meshfed-vm.service"), UNIT.as_bytes(), 0o644)?;
    write(&dir.join("install.sh"), INSTALL.as_bytes(), 0o755)?;
    let bin = match &b.binary {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("cannot find this meshfed binary")?,
    };
    std::fs::copy(&bin, dir.join("meshfed"))
        .with_context(|| format!("cannot copy {}", bin.display()))?;
    std::fs::set_permissions(dir.join("meshfed"), std::fs::Permissions::from_mode(0o755))?;

    let path = match b.format {
        Format::Dir => {
            if b.out.exists() && std::fs::read_dir(&b.out)?.next().is_some() {
                bail!("{} exists and is not empty", b.out.display());
            }
            std::fs::create_dir_all(&b.out)
                .with_context(|| format!("cannot create {}", b.out.display()))?;
            for e in std::fs::read_dir(dir)? {
                let e = e?;
                let to = b.out.join(e.file_name());
                std::fs::copy(e.path(), &to)
                    .with_context(|| format!("cannot write {}", to.display()))?;
                std::fs::set_permissions(&to, e.metadata()?.permissions())?;
            }
            std::fs::set_permissions(&b.out, std::fs::Permissions::from_mode(0o700))?;
            b.out.clone()
        }
        Format::Tar => {
            let path = with_ext(&b.out, "tar.gz");
            let f = create_private(&path)?;
            let gz = flate2::write::GzEncoder::new(f, flate2::Compression::default());
            let mut t = tar::Builder::new(gz);
            t.mode(tar::HeaderMode::Deterministic);
            t.append_dir_all("meshfed-vm", dir)?;
            t.into_inner()?.finish()?;
            path
        }
        Format::Deb => {
            let path = with_ext(&b.out, "deb");
            deb(dir, &path)?;
            path
        }
    };
    Ok(path)
}

fn with_ext(out: &Path, ext: &str) -> PathBuf {
    if out.to_string_lossy().ends_with(&format!(".{ext}")) {
        out.to_path_buf()
    } else {
        PathBuf::from(format!("{}.{ext}", out.display()))
    }
}

fn create_private(path: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist)", path.display()))
}

fn arch() -> String {
    std::process::Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| match std::env::consts::ARCH {
            "x86_64" => "amd64".into(),
            "aarch64" => "arm64".into(),
            other => other.into(),
        })
}

fn deb(stage: &Path, out: &Path) -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let r = root.path();
    let mk = |p: &str, mode: u32| -> anyhow::Result<PathBuf> {
        let d = r.join(p);
        std::fs::create_dir_all(&d)?;
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode))?;
        Ok(d)
    };
    let debian = mk("DEBIAN", 0o755)?;
    let usr_bin = mk("usr/bin", 0o755)?;
    let etc = mk("etc/meshfed", 0o750)?;
    let unit = mk("lib/systemd/system", 0o755)?;
    let share = mk("usr/share/meshfed-vm", 0o755)?;
    let doc = mk("usr/share/doc/meshfed-vm", 0o755)?;
    let cp = |from: &str, to: &Path, mode: u32| -> anyhow::Result<()> {
        std::fs::copy(stage.join(from), to)?;
        std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    cp("meshfed", &usr_bin.join("meshfed"), 0o755)?;
    cp("vm.yaml", &etc.join("vm.yaml"), 0o644)?;
    cp("root-cert.pem", &etc.join("root-cert.pem"), 0o644)?;
    cp("join-token", &etc.join("join-token"), 0o640)?;
    cp(
        "meshfed-vm.service",
        &unit.join("meshfed-vm.service"),
        0o644,
    )?;
    cp("hosts", &share.join("hosts"), 0o644)?;
    write(
        &doc.join("copyright"),
        b"meshfed\nLicense: Apache-2.0\n",
        0o644,
    )?;
    let size_kb = dir_size(r)? / 1024 + 1;
    let control = format!(
        "Package: meshfed-vm\nVersion: {}\nSection: net\nPriority: optional\nArchitecture: {}\n\
         Maintainer: meshfed <meshfed@example.invalid>\nInstalled-Size: {size_kb}\nDepends: libc6\n\
         Homepage: https://example.invalid/meshfed\n\
         Description: meshfed VM agent and its bootstrap for one WorkloadGroup\n \
         Joins this VM to a meshfed cluster: durable identity, WorkloadEntry\n \
         auto-registration, health probes, certificate files and mesh DNS.\n",
        env!("CARGO_PKG_VERSION"),
        arch()
    );
    write(&debian.join("control"), control.as_bytes(), 0o644)?;
    write(&debian.join("conffiles"), b"/etc/meshfed/vm.yaml\n", 0o644)?;
    write(&debian.join("postinst"), POSTINST.as_bytes(), 0o755)?;
    write(&debian.join("prerm"), PRERM.as_bytes(), 0o755)?;
    if out.exists() {
        bail!("{} exists", out.display());
    }
    let o = std::process::Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(r)
        .arg(out)
        .output()
        .context("cannot run dpkg-deb (install the dpkg package)")?;
    if !o.status.success() {
        bail!(
            "dpkg-deb failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

fn dir_size(p: &Path) -> anyhow::Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(p)? {
        let e = e?;
        let m = e.metadata()?;
        n += if m.is_dir() {
            dir_size(&e.path())?
        } else {
            m.len()
        };
    }
    Ok(n)
}
