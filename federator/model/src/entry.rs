//! Auto-registered WorkloadEntries: created from a WorkloadGroup's template when a VM connects,
//! kept while it is connected, marked `disconnectedAt` when its stream ends and deleted after
//! the grace period unless it comes back. Stored in the agent's sled cache so a restarted agent
//! keeps them (their VMs get a fresh grace period to reconnect). Changes are published on a
//! watch; the registry view turns them into endpoints.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::workload::WorkloadGroup;

pub const GROUP_ANNOTATION: &str = "istio.io/autoRegistrationGroup";
pub const HEALTH_CHECKS_ANNOTATION: &str = "proxy.istio.io/health-checks-enabled";
pub const CONTROLLER_ANNOTATION: &str = "istio.io/workloadController";
pub const CONNECTED_AT_ANNOTATION: &str = "istio.io/connectedAt";
pub const DISCONNECTED_AT_ANNOTATION: &str = "istio.io/disconnectedAt";
/// Kubernetes object names are at most 253 characters.
const MAX_NAME: usize = 253;

/// One auto-registered WorkloadEntry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AutoEntry {
    pub name: String,
    pub namespace: String,
    pub group: String,
    pub vm_id: String,
    pub address: String,
    /// Empty = the cluster's network.
    pub network: String,
    /// `region/zone/subzone`, empty = the cluster's default.
    pub locality: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub ports: BTreeMap<String, u32>,
    pub weight: u32,
    pub service_account: String,
    /// The group has a probe: the entry is no endpoint until the VM reports healthy.
    pub health_checks: bool,
    /// The last health report (`None` before the first).
    pub healthy: Option<bool>,
    pub health_message: String,
    pub connected: bool,
    /// Unix milliseconds of the disconnect, while in the grace period.
    pub disconnected_at_ms: Option<i64>,
    /// The stream that owns the entry; reports from older streams are ignored.
    #[serde(default)]
    pub conn: u64,
}

impl AutoEntry {
    /// Whether traffic may be sent to it.
    pub fn serving(&self) -> bool {
        !self.health_checks || self.healthy == Some(true)
    }
}

/// `<group>-<address>[-<network>]`, a valid Kubernetes name for IPv4 and IPv6 alike: an IPv6
/// address is written with all eight groups (`2001-db8-0-0-0-0-0-1`), so no name ends in '-' or
/// depends on where `::` fell (Istio's form breaks on IPv6, istio/istio#35343). The last 253
/// characters are kept, as Istio does.
pub fn entry_name(group: &str, address: IpAddr, network: &str) -> String {
    let addr = match address {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => a
            .segments()
            .iter()
            .map(|s| format!("{s:x}"))
            .collect::<Vec<_>>()
            .join("-"),
    };
    let mut name = format!("{group}-{addr}");
    if !network.is_empty() {
        name.push('-');
        name.push_str(network);
    }
    if name.len() > MAX_NAME {
        name = name[name.len() - MAX_NAME..].to_string();
    }
    name.trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// What a connecting VM says about itself.
#[derive(Debug, Clone)]
pub struct VmFacts {
    pub vm_id: String,
    pub address: IpAddr,
    pub network: String,
    pub locality: String,
    pub labels: BTreeMap<String, String>,
}

/// The entry a VM of `group` gets: the template, address, network and locality from the VM;
/// labels = template + group metadata + the VM's own (later ones win); Istio's annotations.
pub fn build(group: &WorkloadGroup, vm: &VmFacts, controller: &str, now_ms: i64) -> AutoEntry {
    let t = &group.spec.template;
    let network = if vm.network.is_empty() {
        t.network.as_ref().map(|n| n.0.clone()).unwrap_or_default()
    } else {
        vm.network.clone()
    };
    let mut labels = t.labels.clone();
    labels.extend(group.spec.metadata.labels.clone());
    labels.extend(vm.labels.clone());
    let mut annotations = group.spec.metadata.annotations.clone();
    annotations.insert(GROUP_ANNOTATION.into(), group.metadata.name.0.clone());
    annotations.insert(CONTROLLER_ANNOTATION.into(), controller.to_string());
    annotations.insert(CONNECTED_AT_ANNOTATION.into(), rfc3339(now_ms));
    let health_checks = group.spec.probe.is_some();
    if health_checks {
        annotations.insert(HEALTH_CHECKS_ANNOTATION.into(), "true".into());
    }
    let locality = if vm.locality.is_empty() {
        t.locality
            .as_ref()
            .map(|l| crate::validate::locality_string(&Some(l.0.clone())))
            .unwrap_or_default()
    } else {
        vm.locality.clone()
    };
    AutoEntry {
        name: entry_name(&group.metadata.name.0, vm.address, &network),
        namespace: group.metadata.namespace.0.clone(),
        group: group.metadata.name.0.clone(),
        vm_id: vm.vm_id.clone(),
        address: vm.address.to_string(),
        network,
        locality,
        labels,
        annotations,
        ports: t.ports.iter().map(|(k, v)| (k.clone(), v.0)).collect(),
        weight: t.weight.unwrap_or(1).max(1),
        service_account: t
            .service_account
            .as_ref()
            .map(|s| s.0.clone())
            .unwrap_or_else(|| "default".into()),
        health_checks,
        healthy: None,
        health_message: String::new(),
        connected: true,
        disconnected_at_ms: None,
        conn: 0,
    }
}

/// RFC 3339 with nanoseconds, UTC (as Istio writes connectedAt).
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// Fixtures for tests of this crate and of the crates that store entries (feature `testing`).
#[cfg(any(test, feature = "testing"))]
#[allow(clippy::unwrap_used)]
pub mod testing {
    use super::*;

    pub fn group(probe: bool) -> WorkloadGroup {
        let yaml = format!(
            r#"
metadata: {{name: payment-vm, namespace: shop}}
spec:
  metadata: {{labels: {{app: payment, tier: vm}}, annotations: {{team: pay}}}}
  template: {{serviceAccount: payment, labels: {{version: v1, tier: template}}, ports: {{http: 8080}}}}
  {}
"#,
            if probe {
                "probe: {tcpSocket: {port: 8080}}"
            } else {
                ""
            }
        );
        crate::policy::spec::parse_yaml(&yaml, "test").unwrap()
    }

    pub fn facts(addr: &str, net: &str) -> VmFacts {
        VmFacts {
            vm_id: "vm1".into(),
            address: addr.parse().unwrap(),
            network: net.into(),
            locality: String::new(),
            labels: [("tier".to_string(), "vm-own".to_string())].into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{facts, group};
    use super::*;

    #[test]
    fn names_are_valid_for_ipv4_and_ipv6() {
        let v4 = entry_name("g", "10.0.0.7".parse().unwrap(), "");
        assert_eq!(v4, "g-10.0.0.7");
        assert_eq!(
            entry_name("g", "10.0.0.7".parse().unwrap(), "vmnet"),
            "g-10.0.0.7-vmnet"
        );
        let v6 = entry_name("g", "2001:db8::".parse().unwrap(), "");
        assert_eq!(v6, "g-2001-db8-0-0-0-0-0-0");
        let v6 = entry_name("g", "::1".parse().unwrap(), "n");
        assert_eq!(v6, "g-0-0-0-0-0-0-0-1-n");
        let long = "a".repeat(250);
        let n = entry_name(&long, "10.0.0.1".parse().unwrap(), "net");
        assert!(n.len() <= 253 && n.ends_with("10.0.0.1-net"), "{n}");
        assert!(n.starts_with(|c: char| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn entry_from_template_merges_labels_as_istio_does() {
        let e = build(
            &group(true),
            &facts("10.9.0.2", ""),
            "meshfed-agent-east",
            0,
        );
        assert_eq!(e.name, "payment-vm-10.9.0.2");
        assert_eq!(e.labels["version"], "v1");
        assert_eq!(e.labels["app"], "payment");
        assert_eq!(e.labels["tier"], "vm-own", "the VM's labels win");
        assert_eq!(e.annotations[GROUP_ANNOTATION], "payment-vm");
        assert_eq!(e.annotations[HEALTH_CHECKS_ANNOTATION], "true");
        assert_eq!(e.annotations["team"], "pay");
        assert_eq!(
            e.annotations[CONNECTED_AT_ANNOTATION],
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(e.service_account, "payment");
        assert_eq!(e.ports["http"], 8080);
        assert!(!e.serving(), "no endpoint until the probe passes");
        let e = build(&group(false), &facts("10.9.0.2", ""), "c", 0);
        assert!(e.serving());
        assert!(!e.annotations.contains_key(HEALTH_CHECKS_ANNOTATION));
    }
}
