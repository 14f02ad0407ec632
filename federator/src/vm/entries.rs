//! Auto-registered WorkloadEntries: created from a WorkloadGroup's template when a VM connects,
//! kept while it is connected, marked `disconnectedAt` when its stream ends and deleted after
//! the grace period unless it comes back. Stored in the agent's sled cache so a restarted agent
//! keeps them (their VMs get a fresh grace period to reconnect). Changes are published on a
//! watch; the registry view turns them into endpoints.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::spec::WorkloadGroup;

pub const GROUP_ANNOTATION: &str = "istio.io/autoRegistrationGroup";
pub const HEALTH_CHECKS_ANNOTATION: &str = "proxy.istio.io/health-checks-enabled";
pub const CONTROLLER_ANNOTATION: &str = "istio.io/workloadController";
pub const CONNECTED_AT_ANNOTATION: &str = "istio.io/connectedAt";
pub const DISCONNECTED_AT_ANNOTATION: &str = "istio.io/disconnectedAt";
/// Kubernetes object names are at most 253 characters.
const MAX_NAME: usize = 253;

/// One auto-registered WorkloadEntry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
            .map(|l| crate::types::locality_string(&Some(l.0.clone())))
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

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EntryError {
    #[error("WorkloadEntry {name} is held by another connected VM ({vm}); two VMs of one group and network cannot share the address {address}")]
    Taken {
        name: String,
        vm: String,
        address: String,
    },
    #[error("storing the WorkloadEntry: {0}")]
    Store(String),
}

/// The auto-registered entries of this cluster.
#[derive(Debug)]
pub struct Entries {
    tree: sled::Tree,
    state: Mutex<BTreeMap<String, AutoEntry>>,
    tx: watch::Sender<Arc<BTreeMap<String, AutoEntry>>>,
    next_conn: AtomicU64,
}

impl Entries {
    /// Opens the stored entries. Those that were connected lost their stream with the previous
    /// process: they start their grace period now.
    pub fn open(tree: sled::Tree, now: i64) -> anyhow::Result<Self> {
        let mut state = BTreeMap::new();
        for kv in tree.iter() {
            let (_, v) = kv?;
            let mut e: AutoEntry = serde_json::from_slice(&v)?;
            if e.connected {
                e.connected = false;
                e.disconnected_at_ms = Some(now);
                e.annotations.remove(CONNECTED_AT_ANNOTATION);
                e.annotations
                    .insert(DISCONNECTED_AT_ANNOTATION.into(), rfc3339(now));
            }
            state.insert(e.name.clone(), e);
        }
        let me = Entries {
            tree,
            tx: watch::Sender::new(Arc::new(state.clone())),
            state: Mutex::new(state),
            next_conn: AtomicU64::new(1),
        };
        let all: Vec<AutoEntry> = me.lock().values().cloned().collect();
        for e in &all {
            me.store(e)?;
        }
        Ok(me)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, AutoEntry>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn store(&self, e: &AutoEntry) -> Result<(), EntryError> {
        let v = serde_json::to_vec(e).map_err(|x| EntryError::Store(x.to_string()))?;
        self.tree
            .insert(e.name.as_bytes(), v)
            .map_err(|x| EntryError::Store(x.to_string()))?;
        self.tree
            .flush()
            .map_err(|x| EntryError::Store(x.to_string()))?;
        Ok(())
    }

    fn publish(&self, state: &BTreeMap<String, AutoEntry>) {
        self.tx.send_replace(Arc::new(state.clone()));
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<BTreeMap<String, AutoEntry>>> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Arc<BTreeMap<String, AutoEntry>> {
        self.tx.borrow().clone()
    }

    /// Registers (or re-registers) a VM's entry; returns the connection number that owns it.
    /// A reconnecting VM keeps its last health report until it sends a new one.
    pub fn connect(&self, mut e: AutoEntry) -> Result<u64, EntryError> {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let mut st = self.lock();
        if let Some(old) = st.get(&e.name) {
            if old.connected && old.vm_id != e.vm_id {
                return Err(EntryError::Taken {
                    name: e.name.clone(),
                    vm: old.vm_id.clone(),
                    address: e.address.clone(),
                });
            }
            if old.vm_id == e.vm_id {
                e.healthy = old.healthy;
                e.health_message = old.health_message.clone();
            }
        }
        // The same VM under another name (its address or network changed): the old one goes.
        let stale: Vec<String> = st
            .values()
            .filter(|o| o.vm_id == e.vm_id && o.name != e.name)
            .map(|o| o.name.clone())
            .collect();
        for n in stale {
            st.remove(&n);
            let _ = self.tree.remove(n.as_bytes());
        }
        e.conn = conn;
        e.connected = true;
        e.disconnected_at_ms = None;
        e.annotations.remove(DISCONNECTED_AT_ANNOTATION);
        self.store(&e)?;
        st.insert(e.name.clone(), e);
        self.publish(&st);
        Ok(conn)
    }

    /// Records a health report from the stream `conn`; `false` if that stream no longer owns
    /// the entry.
    pub fn health(&self, name: &str, conn: u64, healthy: bool, message: &str) -> bool {
        let mut st = self.lock();
        let Some(e) = st.get_mut(name).filter(|e| e.conn == conn) else {
            return false;
        };
        if e.healthy == Some(healthy) && e.health_message == message {
            return true;
        }
        e.healthy = Some(healthy);
        e.health_message = message.to_string();
        let e = e.clone();
        let _ = self.store(&e);
        self.publish(&st);
        true
    }

    /// The stream `conn` ended: the entry starts its grace period.
    pub fn disconnect(&self, name: &str, conn: u64, now: i64) {
        let mut st = self.lock();
        let Some(e) = st.get_mut(name).filter(|e| e.conn == conn && e.connected) else {
            return;
        };
        e.connected = false;
        e.disconnected_at_ms = Some(now);
        e.annotations.remove(CONNECTED_AT_ANNOTATION);
        e.annotations
            .insert(DISCONNECTED_AT_ANNOTATION.into(), rfc3339(now));
        let e = e.clone();
        let _ = self.store(&e);
        self.publish(&st);
    }

    /// Deletes entries disconnected for longer than `grace_ms`, and entries whose group no
    /// longer exists (`groups` holds `ns/name` keys). Returns the deleted names.
    pub fn sweep(
        &self,
        now: i64,
        grace_ms: i64,
        groups: Option<&std::collections::BTreeSet<String>>,
    ) -> Vec<String> {
        let mut st = self.lock();
        let gone: Vec<String> = st
            .values()
            .filter(|e| {
                e.disconnected_at_ms.is_some_and(|t| now - t >= grace_ms)
                    || groups.is_some_and(|g| {
                        !g.contains(&crate::types::service_key(&e.namespace, &e.group))
                    })
            })
            .map(|e| e.name.clone())
            .collect();
        for n in &gone {
            st.remove(n);
            let _ = self.tree.remove(n.as_bytes());
        }
        if !gone.is_empty() {
            let _ = self.tree.flush();
            self.publish(&st);
        }
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(probe: bool) -> WorkloadGroup {
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
        serde_yaml_ng::from_str(&yaml).unwrap()
    }

    fn facts(addr: &str, net: &str) -> VmFacts {
        VmFacts {
            vm_id: "vm1".into(),
            address: addr.parse().unwrap(),
            network: net.into(),
            locality: String::new(),
            labels: [("tier".to_string(), "vm-own".to_string())].into(),
        }
    }

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

    #[test]
    fn lifecycle_with_grace_and_restart() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let es = Entries::open(db.open_tree("e").unwrap(), 0).unwrap();
        let e = build(&group(true), &facts("10.9.0.2", ""), "c", 0);
        let c1 = es.connect(e.clone()).unwrap();
        assert!(es.health(&e.name, c1, true, ""));
        assert!(es.current()[&e.name].serving());
        // Another VM cannot take a connected VM's name.
        let mut other = e.clone();
        other.vm_id = "vm2".into();
        assert!(matches!(es.connect(other), Err(EntryError::Taken { .. })));
        // Reconnect: the new stream owns it; the old one's reports are ignored.
        let c2 = es.connect(e.clone()).unwrap();
        assert!(!es.health(&e.name, c1, false, "old"));
        assert!(
            es.current()[&e.name].serving(),
            "health kept across reconnects"
        );
        es.disconnect(&e.name, c1, 100);
        assert!(
            es.current()[&e.name].connected,
            "an old stream cannot disconnect"
        );
        es.disconnect(&e.name, c2, 100);
        let cur = es.current();
        assert!(!cur[&e.name].connected);
        assert!(cur[&e.name]
            .annotations
            .contains_key(DISCONNECTED_AT_ANNOTATION));
        assert!(
            es.sweep(10_099, 10_000, None).is_empty(),
            "within the grace period"
        );
        assert_eq!(es.sweep(10_100, 10_000, None), vec![e.name.clone()]);
        assert!(es.current().is_empty());

        // Stored: a restarted agent keeps the entry and gives it a grace period.
        let c3 = es.connect(e.clone()).unwrap();
        assert!(es.health(&e.name, c3, true, ""));
        drop(es);
        let es = Entries::open(db.open_tree("e").unwrap(), 5_000).unwrap();
        let got = &es.current()[&e.name];
        assert!(!got.connected && got.disconnected_at_ms == Some(5_000));
        assert_eq!(got.healthy, Some(true));
        // A group that disappears takes its entries with it.
        let groups = std::collections::BTreeSet::new();
        assert_eq!(es.sweep(5_001, 10_000, Some(&groups)).len(), 1);
    }
}
