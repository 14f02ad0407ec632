//! The Kubernetes types meshfed reads that k8s-openapi does not carry: the MCS `ServiceExport`
//! (multicluster.x-k8s.io/v1alpha1, KEP-1645), written by hand because upstream objects have
//! no `spec`, and meshfed's options on it, as annotations.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use serde::{Deserialize, Serialize};

/// `exportTo`: cluster ids that may import the service, comma-separated (default: all).
pub const EXPORT_TO: &str = "meshfed.io/export-to";
/// `withdraw` or `deprioritize` (default): what importers do with this cluster's endpoints
/// when its lease expires.
pub const ON_EXPIRY: &str = "meshfed.io/on-expiry";

/// The label a Service's EndpointSlices carry.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

/// `k8s_openapi::Resource` and `Metadata` for a namespaced type of ours (group, version,
/// plural; the kind is the type's name), so kube's `Api` and watchers take it.
macro_rules! namespaced_resource {
    ($ty:ident, $group:literal, $version:literal, $plural:literal) => {
        impl k8s_openapi::Resource for $ty {
            const API_VERSION: &'static str = concat!($group, "/", $version);
            const GROUP: &'static str = $group;
            const KIND: &'static str = stringify!($ty);
            const VERSION: &'static str = $version;
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = k8s_openapi::NamespaceResourceScope;
        }

        impl k8s_openapi::Metadata for $ty {
            type Ty = ObjectMeta;

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// An MCS ServiceExport: its existence exports the Service of the same namespace and name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceExport {
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ServiceExportStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ServiceExportStatus {
    /// `Valid`, `Conflict` and `Ready` (KEP-1645), set by meshfed's agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

namespaced_resource!(
    ServiceExport,
    "multicluster.x-k8s.io",
    "v1alpha1",
    "serviceexports"
);

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream ServiceExport as the API serves it (no spec) parses, annotations included.
    #[test]
    fn upstream_json_parses() {
        let v: ServiceExport = serde_json::from_str(
            r#"{"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                "metadata": {"name": "payment", "namespace": "shop", "resourceVersion": "7",
                             "annotations": {"meshfed.io/export-to": "west"}},
                "status": {"conditions": [{"type": "Valid", "status": "True", "reason": "Valid",
                   "message": "", "lastTransitionTime": "2026-12-04T10:00:00Z"}]}}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(v.metadata.name.as_deref(), Some("payment"));
        assert_eq!(v.status.map(|s| s.conditions.len()), Some(1));
    }
}

/// The label on every object meshfed writes; meshfed deletes only objects that carry it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "meshfed";
/// The field manager of meshfed's server-side applies.
pub const FIELD_MANAGER: &str = "meshfed";

/// An MCS ServiceImport (multicluster.x-k8s.io/v1alpha1): what the cluster can reach of a
/// service exported elsewhere.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceImport {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceImportSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ServiceImportStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportSpec {
    /// `ClusterSetIP` or `Headless`.
    #[serde(rename = "type", default)]
    pub type_: String,
    #[serde(default)]
    pub ports: Vec<ServiceImportPort>,
    /// The clusterset IPs (meshfed's DNS VIPs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    /// `None` or `ClientIP`, as a Service's (meshfed does not set it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<String>,
    /// As a Service's (meshfed does not set it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<k8s_openapi::api::core::v1::SessionAffinityConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceImportPort {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub port: i32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub protocol: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub app_protocol: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ServiceImportStatus {
    /// The clusters the service is imported from.
    #[serde(default)]
    pub clusters: Vec<ClusterStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ClusterStatus {
    pub cluster: String,
}

namespaced_resource!(
    ServiceImport,
    "multicluster.x-k8s.io",
    "v1alpha1",
    "serviceimports"
);

/// An Istio `WorkloadEntry` (networking.istio.io/v1): a workload outside Kubernetes (a VM),
/// selected by the labels of a Service's selector in its namespace, as Istio does. Only the
/// fields meshfed reads; the API server keeps the rest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadEntry {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: WorkloadEntrySpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<WorkloadEntryStatus>,
}

/// Istio's status of a WorkloadEntry: for auto-registered VMs, the `Healthy` condition.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadEntryStatus {
    #[serde(default)]
    pub conditions: Vec<IstioCondition>,
}

/// Istio's condition shape (istio.io/api meta/v1alpha1 `IstioCondition`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IstioCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The condition type istiod sets on health-checked WorkloadEntries.
pub const HEALTHY_CONDITION: &str = "Healthy";
/// The annotation that says a WorkloadEntry's health is checked (its VM reports it).
pub const HEALTH_CHECKS_ANNOTATION: &str = "proxy.istio.io/health-checks-enabled";

impl WorkloadEntry {
    /// As Istio decides: an entry with health checks (annotation
    /// `proxy.istio.io/health-checks-enabled: "true"`) is healthy only while its `Healthy`
    /// condition is `True`; one without is healthy unless the condition says `False`.
    pub fn healthy(&self) -> bool {
        let condition = self.status.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == HEALTHY_CONDITION)
                .map(|c| c.status.as_str())
        });
        let checked = self
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(HEALTH_CHECKS_ANNOTATION))
            .is_some_and(|v| v == "true");
        if checked {
            condition == Some("True")
        } else {
            condition != Some("False")
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEntrySpec {
    /// An IP address (a host name or unix socket is not an endpoint meshfed can route to).
    #[serde(default)]
    pub address: String,
    /// Service port name -> the port the workload listens on.
    #[serde(default)]
    pub ports: std::collections::BTreeMap<String, u32>,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub network: String,
    /// `region/zone/subzone`.
    #[serde(default)]
    pub locality: String,
    #[serde(default)]
    pub weight: u32,
    #[serde(default)]
    pub service_account: String,
}

namespaced_resource!(
    WorkloadEntry,
    "networking.istio.io",
    "v1",
    "workloadentries"
);

/// An Istio `WorkloadGroup` (networking.istio.io/v1): the template VMs join through (docs/vm.md).
/// Its spec is kept as the API sent it; the view parses it with the registry file's own type
/// (`meshfed_model::workload::WorkloadGroup`), so both sources accept exactly the same fields.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WorkloadGroup {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_json::Value,
}

namespaced_resource!(WorkloadGroup, "networking.istio.io", "v1", "workloadgroups");

/// An Istio `ServiceEntry` (networking.istio.io/v1), read for the hosts users wrote (theirs win
/// over meshfed's); the spec is kept as the API sent it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceEntry {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_json::Value,
}

namespaced_resource!(ServiceEntry, "networking.istio.io", "v1", "serviceentries");

/// An Istio `DestinationRule` (networking.istio.io/v1), read for the hosts users wrote rules
/// for; the spec is kept as the API sent it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationRule {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: serde_json::Value,
}

namespaced_resource!(
    DestinationRule,
    "networking.istio.io",
    "v1",
    "destinationrules"
);
