//! `vm.yaml`: what a VM's `meshfed vm agent` needs to join its cluster. Written by
//! `meshfed vm bootstrap`; errors name `file:line:column`.
//!
//! ```yaml
//! cluster: east
//! trustDomain: east.mesh
//! network: east-net              # the cluster's network
//! namespace: shop
//! group: payment-vm
//! serviceAccount: payment
//! controlPlane: [meshfed-agent.meshfed-system.svc:15443]   # the east-west gateway, or the agent
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use meshfed_model::registry::{Label, LocalityStr};

/// The SNI of the agent's VM API (exposed through the east-west gateway).
pub const VM_API_SNI: &str = "meshfed-agent.meshfed-system.svc";
/// The SNI of the agent's mTLS xDS port (exposed through the east-west gateway).
pub const XDS_SNI: &str = "meshfed-xds.meshfed-system.svc";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VmConfig {
    pub cluster: Label,
    pub trust_domain: String,
    /// The cluster's network.
    pub network: Label,
    pub namespace: Label,
    pub group: Label,
    pub service_account: Label,
    /// The VM API, `host:port` (the east-west gateway's 15443 when the VM is on another
    /// network; the agent's 15018 otherwise). Tried in order.
    pub control_plane: Vec<String>,
    /// The mTLS xDS address (`host:port`) the local xDS relay forwards to; default: the first
    /// control-plane address (through a gateway the SNI tells the two apart).
    #[serde(default)]
    pub xds: Option<String>,
    /// SNI names sent to the control plane (what a gateway routes on).
    #[serde(default = "vm_api_sni")]
    pub control_plane_sni: String,
    #[serde(default = "xds_sni")]
    pub xds_sni: String,
    /// The cluster's root certificate (PEM): the agent's certificate is checked against it.
    #[serde(default = "root_cert")]
    pub root_cert: PathBuf,
    /// The one-time join token (used on the first start only).
    #[serde(default = "token_file")]
    pub token_file: PathBuf,
    /// Durable state: the VM credential, its key, the VM id.
    #[serde(default = "state_dir")]
    pub state_dir: PathBuf,
    /// Where `cert-chain.pem`, `key.pem` and `root-cert.pem` of the workload SVID are written
    /// (for a local Envoy or gRPC file_watcher).
    #[serde(default = "cert_dir")]
    pub cert_dir: PathBuf,
    /// The VM's address as workloads reach it; default: the local address of the route to the
    /// control plane.
    #[serde(default)]
    pub address: Option<std::net::IpAddr>,
    /// The VM's network when it is not the cluster's.
    #[serde(default)]
    pub vm_network: Option<Label>,
    #[serde(default)]
    pub locality: Option<LocalityStr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Plaintext xDS relay for local proxies (`off` disables it).
    #[serde(default = "xds_listen")]
    pub xds_listen: Listen,
    /// Mesh DNS (`off` disables it).
    #[serde(default = "dns_listen")]
    pub dns_listen: Listen,
    /// Upstream resolvers for names outside the mesh (IP or IP:PORT); default:
    /// /etc/resolv.conf's.
    #[serde(default)]
    pub dns_upstream: Vec<Upstream>,
    /// Admin HTTP: /healthz, /readyz, /status, /metrics (`off` disables it).
    #[serde(default = "admin")]
    pub admin: Listen,
    /// On SIGTERM, the Attach stream and the relay get this long to finish (humantime, e.g. 5s).
    #[serde(default = "drain_timeout", with = "humantime_serde_str")]
    pub drain_timeout: std::time::Duration,
}

/// A listen address: `IP:PORT`, or `off` (absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<std::net::SocketAddr>);

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "off" {
            return Ok(Listen(None));
        }
        s.parse()
            .map(|a| Listen(Some(a)))
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not IP:PORT or off")))
    }
}

/// A DNS upstream: `IP` (port 53) or `IP:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Upstream(pub std::net::SocketAddr);

impl<'de> Deserialize<'de> for Upstream {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(a) = s.parse() {
            return Ok(Upstream(a));
        }
        s.trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .map(|ip| Upstream(std::net::SocketAddr::new(ip, 53)))
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not IP or IP:PORT")))
    }
}

mod humantime_serde_str {
    use serde::Deserialize;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(
        d: D,
    ) -> Result<std::time::Duration, D::Error> {
        let s = String::deserialize(d)?;
        match humantime::parse_duration(&s) {
            Ok(v) if !v.is_zero() => Ok(v),
            Ok(_) => Err(serde::de::Error::custom(format!(
                "{s:?}: the duration must be positive"
            ))),
            Err(e) => Err(serde::de::Error::custom(format!(
                "{s:?} is not a duration ({e}); use e.g. 5s"
            ))),
        }
    }
}

fn vm_api_sni() -> String {
    VM_API_SNI.into()
}
fn xds_sni() -> String {
    XDS_SNI.into()
}
fn root_cert() -> PathBuf {
    "/etc/meshfed/root-cert.pem".into()
}
fn token_file() -> PathBuf {
    "/etc/meshfed/join-token".into()
}
fn state_dir() -> PathBuf {
    "/var/lib/meshfed".into()
}
fn cert_dir() -> PathBuf {
    "/etc/meshfed/certs".into()
}
fn xds_listen() -> Listen {
    Listen(Some(std::net::SocketAddr::from(([127, 0, 0, 1], 15010))))
}
fn dns_listen() -> Listen {
    Listen(Some(std::net::SocketAddr::from(([127, 0, 0, 1], 15053))))
}
fn admin() -> Listen {
    Listen(Some(std::net::SocketAddr::from(([127, 0, 0, 1], 15020))))
}
fn drain_timeout() -> std::time::Duration {
    std::time::Duration::from_secs(5)
}

impl VmConfig {
    pub fn parse(text: &str, what: &str) -> Result<Self, String> {
        let c: VmConfig = meshfed_model::policy::spec::parse_yaml(text, what)?;
        trust::TrustDomain::new(&c.trust_domain)
            .map_err(|e| format!("{what}: trustDomain: {e}"))?;
        if c.control_plane.is_empty() {
            return Err(format!(
                "{what}: controlPlane: at least one host:port is required"
            ));
        }
        for (i, a) in c.control_plane.iter().chain(c.xds.iter()).enumerate() {
            meshfed_model::validate::check_host_port(&format!("controlPlane[{i}]"), a)
                .map_err(|e| format!("{what}: {e}"))?;
        }
        Ok(c)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        let what = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| format!("{what}: {e}"))?;
        Self::parse(&text, &what)
    }

    pub fn xds_address(&self) -> &str {
        self.xds.as_deref().unwrap_or(&self.control_plane[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "cluster: east
trustDomain: east.mesh
network: east-net
namespace: shop
group: payment-vm
serviceAccount: payment
controlPlane: [\"10.0.0.1:15443\"]
";

    #[test]
    fn parses_with_defaults() {
        let c = VmConfig::parse(GOOD, "vm.yaml").unwrap();
        assert_eq!(c.cert_dir, PathBuf::from("/etc/meshfed/certs"));
        assert_eq!(
            c.dns_listen,
            Listen(Some("127.0.0.1:15053".parse().unwrap()))
        );
        assert_eq!(
            c.xds_listen,
            Listen(Some("127.0.0.1:15010".parse().unwrap()))
        );
        assert_eq!(c.admin, Listen(Some("127.0.0.1:15020".parse().unwrap())));
        assert_eq!(c.drain_timeout, std::time::Duration::from_secs(5));
        let c = VmConfig::parse(
            &format!("{GOOD}dnsListen: off\nadmin: \"[::1]:9\"\ndnsUpstream: [10.0.0.2]\ndrainTimeout: 2s\n"),
            "vm.yaml",
        )
        .unwrap();
        assert_eq!(c.dns_listen, Listen(None));
        assert_eq!(c.admin.0.unwrap().port(), 9);
        assert_eq!(
            c.dns_upstream,
            vec![Upstream("10.0.0.2:53".parse().unwrap())]
        );
        assert_eq!(c.drain_timeout, std::time::Duration::from_secs(2));
        assert_eq!(c.xds_address(), "10.0.0.1:15443");
    }

    #[test]
    fn errors_are_located() {
        let e = VmConfig::parse(
            &GOOD.replace("group: payment-vm", "group: Payment"),
            "vm.yaml",
        )
        .unwrap_err();
        assert!(e.starts_with("vm.yaml:5:"), "{e}");
        assert!(e.contains("Payment"), "{e}");
        let e = VmConfig::parse(&format!("{GOOD}colour: blue\n"), "vm.yaml").unwrap_err();
        assert!(e.starts_with("vm.yaml:8:") && e.contains("colour"), "{e}");
        let e = VmConfig::parse(&GOOD.replace("10.0.0.1:15443", "nope"), "vm.yaml").unwrap_err();
        assert!(e.contains("controlPlane[0]"), "{e}");
        let e = VmConfig::parse(&format!("{GOOD}address: 10.0.0.300\n"), "vm.yaml").unwrap_err();
        assert!(e.contains("address"), "{e}");
        for (line, what) in [
            ("xdsListen: localhost:15010", "is not IP:PORT or off"),
            ("dnsUpstream: [resolver]", "is not IP or IP:PORT"),
            ("drainTimeout: soon", "is not a duration"),
            ("drainTimeout: 0s", "must be positive"),
        ] {
            let e = VmConfig::parse(&format!("{GOOD}{line}\n"), "vm.yaml").unwrap_err();
            assert!(
                e.starts_with("vm.yaml:8:") && e.contains(what),
                "{line}: {e}"
            );
        }
        let e = VmConfig::parse("cluster: [", "vm.yaml").unwrap_err();
        assert!(e.starts_with("vm.yaml:"), "{e}");
    }
}
