//! The file registry source: a YAML file listing the cluster's services, their endpoints, and
//! which are exported. Errors name `file:line:column`. A broken file never replaces the last
//! good registry.
//!
//! ```yaml
//! services:
//!   - namespace: shop
//!     name: payment
//!     ports:
//!       - {name: http, port: 8080, protocol: TCP, appProtocol: http}
//!     exportToClusters: [west]  # or `export: true` for the whole federation
//!     staleness: {onExpiry: withdraw}
//!     endpoints:
//!       - {address: 10.1.0.5, locality: us-east1/us-east1-b, labels: {version: v1}, weight: 1, healthy: true, serviceAccount: payment}
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use proto::{Endpoint, Locality, OnExpiry, Port, ServiceExport};
use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::entry::AutoEntry;
use crate::validate;
use crate::workload::{selects, WorkloadEntry, WorkloadGroup};

/// A source of the cluster's services (the file source now; Kubernetes later).
pub trait RegistrySource: Send + Sync {
    /// Reads the whole registry, or says precisely why it cannot.
    fn load(&self) -> Result<Registry, String>;
    /// A cheap token that changes when the source may have changed.
    fn version(&self) -> Option<String>;
}

/// A DNS label that reports a located error when invalid.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Label(pub String);

impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !validate::is_dns_label(&s) {
            return Err(de::Error::custom(format!(
                "{s:?} is not a DNS label (1-63 lowercase letters, digits or '-', starting and ending with a letter or digit)"
            )));
        }
        Ok(Label(s))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortNumber(pub u32);

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        if n == 0 || n > 65535 {
            return Err(de::Error::custom(format!("port {n} is not in 1-65535")));
        }
        Ok(PortNumber(n as u32))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
    #[serde(rename = "SCTP")]
    Sctp,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PortSpec {
    #[serde(default)]
    pub name: Option<Label>,
    pub port: PortNumber,
    #[serde(default = "tcp")]
    pub protocol: Protocol,
    #[serde(default)]
    pub app_protocol: Option<String>,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

#[derive(Debug, Clone, PartialEq)]
pub struct Address(pub String);

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Some(p) = validate::host_problem(&s) {
            return Err(de::Error::custom(p));
        }
        if s.starts_with('[') {
            return Err(de::Error::custom(format!(
                "{s:?}: write an IPv6 address without brackets"
            )));
        }
        Ok(Address(s))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LocalityStr(pub Locality);

impl<'de> Deserialize<'de> for LocalityStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        validate::parse_locality(&s)
            .map(LocalityStr)
            .map_err(de::Error::custom)
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EndpointSpec {
    pub address: Address,
    #[serde(default)]
    pub locality: Option<LocalityStr>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default = "yes")]
    pub healthy: bool,
    #[serde(default)]
    pub service_account: Option<Label>,
    /// Service port name -> the port this endpoint listens on (as WorkloadEntry `ports`).
    #[serde(default)]
    pub ports: BTreeMap<String, PortNumber>,
    /// Its DNS name within a headless service: `<hostname>.<cluster>.<name>.<namespace>.svc.clusterset.local`.
    #[serde(default)]
    pub hostname: Option<Label>,
}

/// Target ports as exported: only names that can name a service port (DNS labels). The
/// federator refuses an export with any other, which would hold back all of the cluster's
/// exports; a WorkloadGroup template or entry written by hand may still carry one.
fn port_map<'a>(
    ports: impl Iterator<Item = (&'a String, u32)>,
) -> std::collections::HashMap<String, u32> {
    ports
        .filter(|(k, _)| validate::is_dns_label(k))
        .map(|(k, v)| (k.clone(), v))
        .collect()
}

fn one() -> u32 {
    1
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OnExpirySpec {
    Deprioritize,
    Withdraw,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StalenessSpec {
    pub on_expiry: OnExpirySpec,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub namespace: Label,
    pub name: Label,
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub export: bool,
    /// The clusters (not namespaces, as Istio's `exportTo` means) that may import it:
    /// `exportToClusters`, or `exportTo`, its first name, still read.
    #[serde(default, rename = "exportToClusters", alias = "exportTo")]
    pub export_to: Option<Vec<Label>>,
    #[serde(default)]
    pub staleness: Option<StalenessSpec>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Like a Kubernetes Service's selector: the WorkloadEntries of the service's namespace
    /// (listed, or auto-registered by VMs) whose labels include all of these are endpoints too.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Headless (as a Kubernetes Service with `clusterIP: None`): no VIP; its name answers
    /// with its endpoints, and endpoints with a `hostname` have their own names.
    #[serde(default)]
    pub headless: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Registry {
    #[serde(default)]
    pub services: Vec<ServiceSpec>,
    /// Istio WorkloadGroups (networking.istio.io/v1 field names): templates VMs join through.
    #[serde(default)]
    pub workload_groups: Vec<WorkloadGroup>,
    /// Istio WorkloadEntries written by hand (VMs that do not run `meshfed vm agent`).
    #[serde(default)]
    pub workload_entries: Vec<WorkloadEntry>,
}

impl ServiceSpec {
    pub fn exported(&self) -> bool {
        self.export || self.export_to.is_some()
    }

    /// The service as exported to the federation.
    pub fn to_export(&self, default_locality: &Locality) -> ServiceExport {
        ServiceExport {
            headless: self.headless,
            namespace: self.namespace.0.clone(),
            name: self.name.0.clone(),
            ports: self
                .ports
                .iter()
                .map(|p| Port {
                    name: p.name.as_ref().map(|n| n.0.clone()).unwrap_or_default(),
                    port: p.port.0,
                    protocol: match p.protocol {
                        Protocol::Tcp => "TCP",
                        Protocol::Udp => "UDP",
                        Protocol::Sctp => "SCTP",
                    }
                    .to_string(),
                    app_protocol: p.app_protocol.clone().unwrap_or_default(),
                })
                .collect(),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| Endpoint {
                    hostname: e.hostname.as_ref().map(|h| h.0.clone()).unwrap_or_default(),
                    address: e.address.0.clone(),
                    locality: Some(
                        e.locality
                            .as_ref()
                            .map(|l| l.0.clone())
                            .unwrap_or_else(|| default_locality.clone()),
                    ),
                    labels: e.labels.clone().into_iter().collect(),
                    weight: e.weight.max(1),
                    healthy: e.healthy,
                    service_account: e
                        .service_account
                        .as_ref()
                        .map(|s| s.0.clone())
                        .unwrap_or_default(),
                    ports: port_map(e.ports.iter().map(|(k, v)| (k, v.0))),
                })
                .collect(),
            export_to: self
                .export_to
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|l| l.0)
                .collect(),
            on_expiry: match self.staleness.as_ref().map(|s| &s.on_expiry) {
                Some(OnExpirySpec::Withdraw) => OnExpiry::Withdraw,
                _ => OnExpiry::Deprioritize,
            } as i32,
            labels: self.labels.clone().into_iter().collect(),
            failover_policy: String::new(),
        }
    }
}

impl Registry {
    /// Parses registry YAML; errors carry `what:line:column`.
    pub fn parse(text: &str, what: &str) -> Result<Registry, String> {
        let reg: Registry = crate::policy::spec::parse_yaml(text, what)?;
        // Where an item's name is, for errors found after parsing (`what:line:column`).
        let at = |list: &str, i: usize| shadow::name_location(text, list, i, what);
        let mut seen = std::collections::HashSet::new();
        for (i, s) in reg.services.iter().enumerate() {
            let key = validate::service_key(&s.namespace.0, &s.name.0);
            if !seen.insert(key.clone()) {
                return Err(format!(
                    "{}: services[{i}]: service {key} is listed twice",
                    at("services", i)
                ));
            }
            let e = s.to_export(&Locality::default());
            validate::check_export(&e, &format!("services[{i}]"))
                .map_err(|m| format!("{what}: {m}"))?;
        }
        let mut seen = std::collections::HashSet::new();
        for (i, g) in reg.workload_groups.iter().enumerate() {
            g.check()
                .map_err(|m| format!("{what}: workloadGroups[{i}]: {m}"))?;
            if !seen.insert(g.key()) {
                return Err(format!(
                    "{}: workloadGroups[{i}]: WorkloadGroup {} is listed twice",
                    at("workloadGroups", i),
                    g.key()
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, e) in reg.workload_entries.iter().enumerate() {
            e.check()
                .map_err(|m| format!("{what}: workloadEntries[{i}]: {m}"))?;
            let key = validate::service_key(&e.metadata.namespace.0, &e.metadata.name.0);
            if !seen.insert(key.clone()) {
                return Err(format!(
                    "{}: workloadEntries[{i}]: WorkloadEntry {key} is listed twice",
                    at("workloadEntries", i)
                ));
            }
        }
        Ok(reg)
    }

    /// The WorkloadGroup `ns/name`.
    pub fn group(&self, namespace: &str, name: &str) -> Option<&WorkloadGroup> {
        self.workload_groups
            .iter()
            .find(|g| g.metadata.namespace.0 == namespace && g.metadata.name.0 == name)
    }

    /// Every service of the cluster (`local`) and the exported ones, each with the endpoints
    /// its selector picks from the listed and the auto-registered WorkloadEntries (an
    /// auto-registered entry only while it passes its group's probe).
    pub fn view(
        &self,
        default_locality: &Locality,
        auto: &BTreeMap<String, AutoEntry>,
    ) -> (crate::snapshot::Services, crate::snapshot::Services) {
        let mut local = BTreeMap::new();
        let mut exports = BTreeMap::new();
        for s in &self.services {
            let mut e = s.to_export(default_locality);
            if !s.selector.is_empty() {
                e.endpoints.extend(self.selected(s, default_locality, auto));
            }
            let key = validate::service_key(&s.namespace.0, &s.name.0);
            let e = std::sync::Arc::new(e);
            if s.exported() {
                exports.insert(key.clone(), e.clone());
            }
            local.insert(key, e);
        }
        (local, exports)
    }

    fn selected<'a>(
        &'a self,
        s: &'a ServiceSpec,
        default_locality: &'a Locality,
        auto: &'a BTreeMap<String, AutoEntry>,
    ) -> impl Iterator<Item = Endpoint> + 'a {
        let ns = &s.namespace.0;
        let listed = self
            .workload_entries
            .iter()
            .filter(move |w| &w.metadata.namespace.0 == ns && selects(&s.selector, &w.spec.labels))
            .map(move |w| Endpoint {
                hostname: String::new(),
                address: w
                    .spec
                    .address
                    .as_ref()
                    .map(|a| a.0.clone())
                    .unwrap_or_default(),
                locality: Some(
                    w.spec
                        .locality
                        .as_ref()
                        .map(|l| l.0.clone())
                        .unwrap_or_else(|| default_locality.clone()),
                ),
                labels: w.spec.labels.clone().into_iter().collect(),
                weight: w.spec.weight.unwrap_or(1).max(1),
                healthy: true,
                service_account: w
                    .spec
                    .service_account
                    .as_ref()
                    .map(|a| a.0.clone())
                    .unwrap_or_default(),
                ports: port_map(w.spec.ports.iter().map(|(k, v)| (k, v.0))),
            });
        let registered = auto
            .values()
            .filter(move |a| &a.namespace == ns && a.serving() && selects(&s.selector, &a.labels))
            .map(move |a| Endpoint {
                hostname: String::new(),
                address: a.address.clone(),
                locality: Some(
                    validate::parse_locality(&a.locality)
                        .ok()
                        .filter(|_| !a.locality.is_empty())
                        .unwrap_or_else(|| default_locality.clone()),
                ),
                labels: a.labels.clone().into_iter().collect(),
                weight: a.weight,
                healthy: true,
                service_account: a.service_account.clone(),
                ports: port_map(a.ports.iter().map(|(k, v)| (k, *v))),
            });
        listed.chain(registered)
    }

    /// The exported services, keyed by `ns/name`.
    pub fn exports(&self, default_locality: &Locality) -> BTreeMap<String, ServiceExport> {
        self.services
            .iter()
            .filter(|s| s.exported())
            .map(|s| {
                (
                    validate::service_key(&s.namespace.0, &s.name.0),
                    s.to_export(default_locality),
                )
            })
            .collect()
    }
}

/// serde_yaml appends " at line X column Y"; the location is already in front.
/// The YAML file registry.
#[derive(Debug, Clone)]
pub struct FileRegistry {
    pub path: std::path::PathBuf,
}

impl RegistrySource for FileRegistry {
    fn load(&self) -> Result<Registry, String> {
        let what = self.path.display().to_string();
        let text = std::fs::read_to_string(&self.path).map_err(|e| format!("{what}: {e}"))?;
        Registry::parse(&text, &what)
    }

    fn version(&self) -> Option<String> {
        let m = std::fs::metadata(&self.path).ok()?;
        Some(format!("{:?}:{}", m.modified().ok()?, m.len()))
    }
}

/// Loads a registry file once (for commands that only validate).
pub fn load_file(path: &Path) -> Result<Registry, String> {
    FileRegistry {
        path: path.to_path_buf(),
    }
    .load()
}

/// A second, lenient reading of a registry that only keeps where names are, to locate errors
/// found after parsing (a duplicate is valid YAML; its position is the user's only clue).
mod shadow {
    use serde::Deserialize;
    use serde_saphyr::Spanned;

    #[derive(Deserialize, Default)]
    struct Named {
        #[serde(default)]
        name: Option<Spanned<String>>,
        #[serde(default)]
        metadata: Option<Box<Named>>,
    }

    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct Lists {
        #[serde(default)]
        services: Vec<Named>,
        #[serde(default)]
        workload_groups: Vec<Named>,
        #[serde(default)]
        workload_entries: Vec<Named>,
    }

    /// `what:line:column` of item `i`'s name in `list`, or `what` when it cannot be told.
    pub(super) fn name_location(text: &str, list: &str, i: usize, what: &str) -> String {
        let Ok(l) = serde_saphyr::from_str::<Lists>(text) else {
            return what.to_string();
        };
        let items = match list {
            "services" => &l.services,
            "workloadGroups" => &l.workload_groups,
            _ => &l.workload_entries,
        };
        let Some(item) = items.get(i) else {
            return what.to_string();
        };
        let name = item
            .name
            .as_ref()
            .or_else(|| item.metadata.as_ref().and_then(|m| m.name.as_ref()));
        match name {
            Some(n) => format!("{what}:{}:{}", n.referenced.line(), n.referenced.column()),
            None => what.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
services:
  - namespace: shop
    name: payment
    ports:
      - {name: http, port: 8080, appProtocol: http}
    exportTo: [west]
    staleness: {onExpiry: withdraw}
    endpoints:
      - {address: 10.1.0.5, locality: us-east1/us-east1-b, labels: {version: v1}}
      - {address: 10.1.0.6, healthy: false, weight: 3, ports: {http: 9080}}
  - namespace: shop
    name: internal
    ports: [{port: 9000}]
  - namespace: shop
    name: db
    ports: [{name: pg, port: 5432}]
    headless: true
    export: true
    endpoints: [{address: 10.1.0.7, hostname: db-0}]
"#;

    #[test]
    fn parses_and_exports() {
        let r = Registry::parse(GOOD, "reg.yaml").unwrap();
        let def = Locality {
            region: "us-east1".into(),
            zone: "us-east1-a".into(),
            subzone: String::new(),
        };
        let ex = r.exports(&def);
        assert_eq!(ex.len(), 2, "only exported services");
        let db = &ex["shop/db"];
        assert!(db.headless && !ex["shop/payment"].headless);
        assert_eq!(db.endpoints[0].hostname, "db-0");
        let p = &ex["shop/payment"];
        assert_eq!(p.export_to, vec!["west".to_string()]);
        assert_eq!(p.on_expiry, OnExpiry::Withdraw as i32);
        assert_eq!(p.ports[0].protocol, "TCP");
        assert_eq!(p.endpoints[1].locality.as_ref().unwrap().zone, "us-east1-a");
        assert_eq!(p.endpoints[0].locality.as_ref().unwrap().zone, "us-east1-b");
        assert!(!p.endpoints[1].healthy);
        assert_eq!(p.endpoints[1].weight, 3);
        assert_eq!(p.endpoints[1].ports.get("http"), Some(&9080));
        assert!(p.endpoints[0].ports.is_empty());
        // A port name the federation would refuse never leaves the cluster.
        let m = port_map(
            [("http".to_string(), 80), ("HTTP_alt".to_string(), 81)]
                .iter()
                .map(|(k, v)| (k, *v)),
        );
        assert_eq!(m.len(), 1);
        assert_eq!(m.get("http"), Some(&80));
    }

    fn err(yaml: &str) -> String {
        Registry::parse(yaml, "reg.yaml").unwrap_err()
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let e = err("services:\n  - namespace: shop\n    name: Payment\n    ports: [{port: 80}]\n");
        // The error is located at the value itself, with its path.
        assert!(e.starts_with("reg.yaml:3:11: services[0].name:"), "{e}");
        assert!(e.contains("\"Payment\" is not a DNS label"), "{e}");
        let e = err("services:\n  - namespace: shop\n    name: db\n    ports: [{port: 80}]\n    endpoints: [{address: 10.0.0.1, hostname: DB_0}]\n");
        assert!(e.starts_with("reg.yaml:5:"), "{e}");
        assert!(e.contains("\"DB_0\" is not a DNS label"), "{e}");
        // A mistyped IPv4 address is not taken for a host name.
        let e = err("services:\n  - namespace: shop\n    name: db\n    ports: [{port: 80}]\n    endpoints: [{address: 10.0.0.300}]\n");
        assert!(e.starts_with("reg.yaml:5:"), "{e}");
        assert!(
            e.contains("\"10.0.0.300\" is not a valid IPv4 address"),
            "{e}"
        );
        let e = err("services:\n  - namespace: shop\n    name: p\n    ports: [{port: 70000}]\n");
        assert!(
            e.starts_with("reg.yaml:4:20: services[0].ports:") && e.contains("70000"),
            "{e}"
        );
        let e = err("services:\n  - namespace: shop\n    name: p\n    ports: [{port: 80, protocol: HTTP}]\n");
        assert!(
            e.starts_with("reg.yaml:4:34: services[0].ports:") && e.contains("HTTP"),
            "{e}"
        );
        let e = err("services:\n  - namespace: shop\n    name: p\n    prots: []\n");
        assert!(
            e.starts_with("reg.yaml:4:5: services[0].prots:") && e.contains("prots"),
            "{e}"
        );
        let e = err("services:\n  - namespace: shop\n    name: p\n    ports: [{port: 80}]\n    endpoints: [{address: \"not an ip\"}]\n");
        assert!(
            e.starts_with("reg.yaml:5:27:") && e.contains("not an ip"),
            "{e}"
        );
        let e = err("services:\n  - namespace: shop\n    name: p\n    ports: [{name: http, port: 80}]\n    endpoints: [{address: 10.0.0.1, ports: {http: 0}}]\n");
        assert!(
            e.starts_with("reg.yaml:5:51:") && e.contains("port 0 is not in 1-65535"),
            "{e}"
        );
        let e = err("services: [\n");
        assert!(e.starts_with("reg.yaml:1:11:"), "{e}");
        let e = err("services:\n  - {namespace: a, name: b, ports: [{port: 1}]}\n  - {namespace: a, name: b, ports: [{port: 2}]}\n");
        assert!(e.contains("a/b is listed twice"), "{e}");
        // Located at the second one's name (issue 19).
        assert!(e.starts_with("reg.yaml:3:"), "{e}");
        let e = err("workloadGroups:\n  - apiVersion: networking.istio.io/v1\n    kind: WorkloadGroup\n    metadata: {name: g, namespace: a}\n    spec: {}\n  - apiVersion: networking.istio.io/v1\n    kind: WorkloadGroup\n    metadata: {name: g, namespace: a}\n    spec: {}\n");
        assert!(e.starts_with("reg.yaml:8:"), "{e}");
        assert!(e.contains("WorkloadGroup a/g is listed twice"), "{e}");
        // exportToClusters (the name that says what it holds) and exportTo (its first name)
        // mean the same.
        let a = Registry::parse("services:\n  - {namespace: shop, name: q, ports: [{port: 80}], exportToClusters: [west]}\n", "a").unwrap();
        let b = Registry::parse(
            "services:\n  - {namespace: shop, name: q, ports: [{port: 80}], exportTo: [west]}\n",
            "b",
        )
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.services[0].export_to.as_ref().map(Vec::len), Some(1));
        // A bad exportTo item is located at the item, not the list (issue 19).
        let e = err("services:\n  - namespace: shop\n    name: q\n    ports: [{port: 80}]\n    exportTo: [west, Bad_Name]\n");
        assert!(e.starts_with("reg.yaml:5:22: services[0].exportTo:"), "{e}");
        assert!(e.contains("\"Bad_Name\" is not a DNS label"), "{e}");
        // A negative number and a duplicate key, in words (issue 19).
        let e = err("services:\n  - namespace: shop\n    name: p\n    ports: [{port: -1}]\n");
        assert!(e.starts_with("reg.yaml:4:20:"), "{e}");
        assert!(e.ends_with("expected a whole number of 0 or more"), "{e}");
        let e = err(
            "services:\n  - namespace: shop\n    name: q\n    name: r\n    ports: [{port: 80}]\n",
        );
        assert!(e.starts_with("reg.yaml:4:5:"), "{e}");
        assert!(
            e.ends_with("the key \"name\" appears twice in this mapping"),
            "{e}"
        );
    }
}
