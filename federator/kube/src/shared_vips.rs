//! The service VIPs agent replicas share: the leader allocates them and keeps them in a
//! ConfigMap (`<lease>-vips`, key `vips.json`, `{"ns/name": {"v4": ..., "v6": ...}}`);
//! followers answer DNS and build xDS listeners with exactly those addresses, so a pod gets the
//! same VIP whichever replica it asks.

use anyhow::Context;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

/// The ConfigMap's one key.
pub const KEY: &str = "vips.json";

/// The ConfigMap that goes with a Lease.
pub fn name_for(lease: &str) -> String {
    format!("{lease}-vips")
}

/// The shared assignment as JSON, if the ConfigMap exists.
pub async fn read(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<Option<String>> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let cm = api
        .get_opt(name)
        .await
        .with_context(|| format!("cannot read ConfigMap {namespace}/{name}"))?;
    Ok(cm.and_then(|c| c.data).and_then(|mut d| d.remove(KEY)))
}

/// Writes the assignment (server-side apply under meshfed's field manager).
pub async fn write(
    client: kube::Client,
    namespace: &str,
    name: &str,
    assignment_json: &str,
) -> anyhow::Result<()> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let obj = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "meshfed"},
        },
        "data": {KEY: assignment_json},
    });
    api.patch(
        name,
        &PatchParams::apply(crate::types::FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .with_context(|| format!("cannot write ConfigMap {namespace}/{name}"))?;
    Ok(())
}
