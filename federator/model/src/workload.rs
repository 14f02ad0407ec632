//! WorkloadGroup and WorkloadEntry with Istio's `networking.istio.io/v1` field names, so the
//! YAML users already have works unchanged (inside the registry file's `workloadGroups:` and
//! `workloadEntries:` lists).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::registry::{Address, Label, LocalityStr, PortNumber};

/// API versions Istio serves these kinds under.
pub const API_VERSIONS: &[&str] = &[
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: Label,
    pub namespace: Label,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// `WorkloadEntry.spec` (and `WorkloadGroup.spec.template`, which has no address).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EntrySpec {
    #[serde(default)]
    pub address: Option<Address>,
    /// Port name -> the port the workload listens on.
    #[serde(default)]
    pub ports: BTreeMap<String, PortNumber>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub network: Option<Label>,
    #[serde(default)]
    pub locality: Option<LocalityStr>,
    #[serde(default)]
    pub weight: Option<u32>,
    #[serde(default)]
    pub service_account: Option<Label>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadEntry {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    pub spec: EntrySpec,
}

#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GroupMetadata {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GroupSpec {
    #[serde(default)]
    pub metadata: GroupMetadata,
    #[serde(default)]
    pub template: EntrySpec,
    #[serde(default)]
    pub probe: Option<Probe>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadGroup {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    pub metadata: ObjectMeta,
    pub spec: GroupSpec,
}

/// Istio's ReadinessProbe: periods and thresholds with Istio's defaults, and exactly one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Probe {
    #[serde(default)]
    pub initial_delay_seconds: u32,
    #[serde(default = "one")]
    pub timeout_seconds: u32,
    #[serde(default = "ten")]
    pub period_seconds: u32,
    #[serde(default = "one")]
    pub success_threshold: u32,
    #[serde(default = "three")]
    pub failure_threshold: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGet>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<Exec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcCheck>,
}

fn one() -> u32 {
    1
}
fn three() -> u32 {
    3
}
fn ten() -> u32 {
    10
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpGet {
    #[serde(default)]
    pub path: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http_headers: Vec<HttpHeader>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpSocket {
    #[serde(default)]
    pub host: Option<String>,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    pub command: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcCheck {
    pub port: u16,
    #[serde(default)]
    pub service: Option<String>,
}

impl Probe {
    /// Exactly one check, sane numbers. `Err` names the field.
    pub fn check(&self) -> Result<(), String> {
        let n = [
            self.http_get.is_some(),
            self.tcp_socket.is_some(),
            self.exec.is_some(),
            self.grpc.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if n != 1 {
            return Err(format!(
                "probe: exactly one of httpGet, tcpSocket, exec, grpc is required ({n} given)"
            ));
        }
        for (name, v) in [
            ("timeoutSeconds", self.timeout_seconds),
            ("periodSeconds", self.period_seconds),
            ("successThreshold", self.success_threshold),
            ("failureThreshold", self.failure_threshold),
        ] {
            if v == 0 {
                return Err(format!("probe.{name}: must be at least 1"));
            }
        }
        if let Some(h) = &self.http_get {
            if h.port == 0 {
                return Err("probe.httpGet.port: must be 1-65535".into());
            }
            if let Some(s) = &h.scheme {
                if !s.eq_ignore_ascii_case("http") {
                    return Err(format!(
                        "probe.httpGet.scheme: {s:?} is not supported (HTTP only; use tcpSocket or exec for TLS)"
                    ));
                }
            }
        }
        if let Some(e) = &self.exec {
            if e.command.is_empty() {
                return Err("probe.exec.command: is empty".into());
            }
        }
        if self.tcp_socket.as_ref().is_some_and(|t| t.port == 0)
            || self.grpc.as_ref().is_some_and(|g| g.port == 0)
        {
            return Err("probe: port must be 1-65535".into());
        }
        Ok(())
    }
}

fn check_type(api: &Option<String>, kind: &Option<String>, want: &str) -> Result<(), String> {
    if let Some(a) = api {
        if !API_VERSIONS.contains(&a.as_str()) {
            return Err(format!(
                "apiVersion: {a:?} is not one of {}",
                API_VERSIONS.join(", ")
            ));
        }
    }
    if let Some(k) = kind {
        if k != want {
            return Err(format!("kind: {k:?} where {want} was expected"));
        }
    }
    Ok(())
}

impl WorkloadGroup {
    pub fn check(&self) -> Result<(), String> {
        check_type(&self.api_version, &self.kind, "WorkloadGroup")?;
        if self.spec.template.address.is_some() {
            return Err(
                "spec.template.address: a group's template has no address (each VM brings its own)"
                    .into(),
            );
        }
        if let Some(p) = &self.spec.probe {
            p.check().map_err(|e| format!("spec.{e}"))?;
        }
        Ok(())
    }

    pub fn key(&self) -> String {
        crate::validate::service_key(&self.metadata.namespace.0, &self.metadata.name.0)
    }

    /// The service account its VMs run as (the template's; Kubernetes' `default` without one).
    pub fn service_account(&self) -> String {
        self.spec
            .template
            .service_account
            .as_ref()
            .map(|s| s.0.clone())
            .unwrap_or_else(|| "default".into())
    }
}

impl WorkloadEntry {
    pub fn check(&self) -> Result<(), String> {
        check_type(&self.api_version, &self.kind, "WorkloadEntry")?;
        if self.spec.address.is_none() {
            return Err("spec.address: is required".into());
        }
        Ok(())
    }
}

/// Whether `labels` has every `selector` pair (an empty selector selects nothing).
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
