//! The injection webhook's decisions and patches (a mutating admission webhook, as Istio's
//! sidecar injector): a pod labelled `meshfed.io/inject: grpc`, or created in a namespace so
//! labelled, gets `meshfed workload init` (an init container), `meshfed workload agent` (a
//! sidecar), the volumes they share with the application, and the environment gRPC needs to
//! find its xDS bootstrap. The API server calls only for opted-in pods (the
//! MutatingWebhookConfiguration's selectors); the webhook decides again here, so a pod that
//! opted out, a pod already injected, a host-network pod or a pod of a system namespace is left
//! alone whatever the selectors say.
//!
//! The answer to a review is computed from the request alone plus the namespace's labels:
//! [`review`] never fails; a request it cannot read is answered with an error response.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, ObjectFieldSelector, Pod, ProjectedVolumeSource,
    SecurityContext, ServiceAccountTokenProjection, Volume, VolumeMount, VolumeProjection,
};
use kube_core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube_core::DynamicObject;

/// The label (on a pod or its namespace) that opts in; its value names the template.
pub const INJECT_LABEL: &str = "meshfed.io/inject";
/// The template this webhook injects.
pub const TEMPLATE_GRPC: &str = "grpc";
/// Set on every pod the webhook injected (what makes a second pass change nothing).
pub const STATUS_ANNOTATION: &str = "meshfed.io/injected";
pub const INIT_NAME: &str = "meshfed-init";
pub const SIDECAR_NAME: &str = "meshfed-agent";
pub const WORKLOAD_VOLUME: &str = "meshfed-workload";
pub const TOKEN_VOLUME: &str = "meshfed-token";
/// Where the workload files are, in every container of the pod.
pub const WORKLOAD_DIR: &str = "/var/run/meshfed";
pub const TOKEN_DIR: &str = "/var/run/secrets/tokens";
pub const TOKEN_FILE: &str = "meshfed-token";
/// Namespaces never injected.
pub const SYSTEM_NAMESPACES: &[&str] = &["kube-system", "kube-public", "kube-node-lease"];

/// What the webhook puts into a pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Injection {
    /// The meshfed image (the agent's own).
    pub image: String,
    pub image_pull_policy: Option<String>,
    pub trust_domain: String,
    /// The agent's mTLS xDS address as pods reach it (its Service).
    pub agent: String,
    pub server_name: String,
    /// The projected token's audience (one the agent's TokenReview accepts).
    pub token_audience: String,
    pub token_seconds: i64,
    /// The cluster's roots (PEM): how `meshfed workload init` checks the agent.
    pub roots_pem: String,
    /// The agent's own namespace (never injected).
    pub agent_namespace: String,
}

/// Whether to inject, and why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Inject,
    Skip(String),
}

/// The decision for `pod` in `namespace` (with that namespace's labels, when known).
pub fn decide(
    pod: &Pod,
    namespace: &str,
    namespace_labels: Option<&BTreeMap<String, String>>,
    agent_namespace: &str,
) -> Decision {
    let skip = |why: &str| Decision::Skip(why.to_string());
    if SYSTEM_NAMESPACES.contains(&namespace) || namespace == agent_namespace {
        return skip("a system namespace");
    }
    let ann = pod.metadata.annotations.as_ref();
    let spec = pod.spec.as_ref();
    let injected = ann.is_some_and(|a| a.contains_key(STATUS_ANNOTATION))
        || spec
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.name == INIT_NAME));
    if injected {
        return skip("already injected");
    }
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return skip("host network: the relay would listen on the node's loopback");
    }
    let pod_label = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_LABEL));
    let ns_label = namespace_labels.and_then(|l| l.get(INJECT_LABEL));
    match (pod_label.map(String::as_str), ns_label.map(String::as_str)) {
        (Some(TEMPLATE_GRPC), _) => Decision::Inject,
        (Some("false" | "disabled"), _) => skip("the pod opted out"),
        (Some(other), _) => Decision::Skip(format!(
            "{INJECT_LABEL}={other:?} names no template (this agent injects \"{TEMPLATE_GRPC}\")"
        )),
        (None, Some(TEMPLATE_GRPC)) => Decision::Inject,
        (None, Some(other)) => Decision::Skip(format!(
            "namespace label {INJECT_LABEL}={other:?} names no template"
        )),
        (None, None) => skip("not opted in"),
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
        value: None,
    }
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

fn meshfed_container(inj: &Injection, name: &str, command: &str) -> Container {
    Container {
        name: name.into(),
        image: Some(inj.image.clone()),
        image_pull_policy: inj.image_pull_policy.clone(),
        args: Some(vec!["workload".into(), command.into()]),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_IP", "status.podIP"),
            field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
            env("MESHFED_TRUST_DOMAIN", &inj.trust_domain),
            env("MESHFED_AGENT", &inj.agent),
            env("MESHFED_AGENT_SERVER_NAME", &inj.server_name),
            env("MESHFED_TOKEN_FILE", &format!("{TOKEN_DIR}/{TOKEN_FILE}")),
            env("MESHFED_WORKLOAD_DIR", WORKLOAD_DIR),
            env("MESHFED_ROOT_CERTS", &inj.roots_pem),
        ]),
        volume_mounts: Some(vec![
            mount(WORKLOAD_VOLUME, WORKLOAD_DIR, false),
            mount(TOKEN_VOLUME, TOKEN_DIR, true),
        ]),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(k8s_openapi::api::core::v1::Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The pod with the injection applied.
pub fn inject(pod: &Pod, inj: &Injection) -> Pod {
    let mut out = pod.clone();
    let spec = out.spec.get_or_insert_with(Default::default);
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: WORKLOAD_VOLUME.into(),
        empty_dir: Some(k8s_openapi::api::core::v1::EmptyDirVolumeSource {
            medium: Some("Memory".into()),
            size_limit: None,
        }),
        ..Default::default()
    });
    volumes.push(Volume {
        name: TOKEN_VOLUME.into(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(inj.token_audience.clone()),
                    expiration_seconds: Some(inj.token_seconds),
                    path: TOKEN_FILE.into(),
                }),
                ..Default::default()
            }]),
            default_mode: None,
        }),
        ..Default::default()
    });
    // The application's containers find the bootstrap and the bundle maps through gRPC's
    // variables; a variable or mount the user set is kept.
    for c in &mut spec.containers {
        let env = c.env.get_or_insert_with(Vec::new);
        for (k, v) in [
            (
                "GRPC_XDS_BOOTSTRAP",
                format!("{WORKLOAD_DIR}/grpc-bootstrap.json"),
            ),
            ("GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE", "true".to_string()),
        ] {
            if !env.iter().any(|e| e.name == k) {
                env.push(self::env(k, &v));
            }
        }
        let mounts = c.volume_mounts.get_or_insert_with(Vec::new);
        if !mounts.iter().any(|m| m.mount_path == WORKLOAD_DIR) {
            mounts.push(mount(WORKLOAD_VOLUME, WORKLOAD_DIR, true));
        }
    }
    spec.init_containers
        .get_or_insert_with(Vec::new)
        .insert(0, meshfed_container(inj, INIT_NAME, "init"));
    spec.containers
        .push(meshfed_container(inj, SIDECAR_NAME, "agent"));
    out.metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(STATUS_ANNOTATION.into(), TEMPLATE_GRPC.into());
    out
}

/// How a pod is named in messages: `namespace/name`, or `namespace/generateName*` for a pod a
/// controller creates (no name yet at admission).
fn pod_name(pod: &Pod, namespace: &str) -> String {
    match (&pod.metadata.name, &pod.metadata.generate_name) {
        (Some(n), _) if !n.is_empty() => format!("{namespace}/{n}"),
        (_, Some(g)) => format!("{namespace}/{g}*"),
        _ => format!("{namespace}/(unnamed)"),
    }
}

/// The answer to one webhook call: an HTTP status and the body. A body that is not an
/// AdmissionReview is answered 400 with the reason; a review whose pod cannot be read is
/// denied, naming the pod and what is wrong; anything but a Pod CREATE is allowed unchanged.
pub fn review(
    body: &[u8],
    inj: &Injection,
    namespace_labels: impl Fn(&str) -> Option<BTreeMap<String, String>>,
) -> (u16, serde_json::Value) {
    let dynamic: AdmissionReview<DynamicObject> = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => {
            return (
                400,
                serde_json::json!({"error": format!("the body is not an AdmissionReview: {e}")}),
            )
        }
    };
    let req: AdmissionRequest<DynamicObject> = match dynamic.try_into() {
        Ok(r) => r,
        Err(_) => {
            return (
                400,
                serde_json::json!({"error": "the AdmissionReview carries no request"}),
            )
        }
    };
    let answer = |r: AdmissionResponse| {
        let mut v = serde_json::to_value(r.into_review()).unwrap_or_default();
        // kube-core serializes the patch bytes as a JSON array of numbers; the API documents
        // a base64 string (Go's encoding of []byte), which is what is sent.
        if let Some(bytes) = v["response"]["patch"].as_array().map(|a| {
            a.iter()
                .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect::<Vec<u8>>()
        }) {
            use base64::Engine;
            v["response"]["patch"] =
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
        (200, v)
    };
    let base = AdmissionResponse::from(&req);
    let is_pod = req.kind.group.is_empty() && req.kind.kind == "Pod";
    if !is_pod || !matches!(req.operation, Operation::Create) {
        return answer(base);
    }
    let namespace = req.namespace.clone().unwrap_or_default();
    let Some(obj) = req.object.as_ref() else {
        return answer(base.deny("the review of a pod CREATE carries no object"));
    };
    let value = match serde_json::to_value(obj) {
        Ok(v) => v,
        Err(e) => return answer(base.deny(format!("the pod cannot be read: {e}"))),
    };
    let pod: Pod = match serde_json::from_value(value.clone()) {
        Ok(p) => p,
        Err(e) => {
            let name = format!(
                "{namespace}/{}",
                value["metadata"]["name"]
                    .as_str()
                    .or(value["metadata"]["generateName"].as_str())
                    .unwrap_or("(unnamed)")
            );
            return answer(base.deny(format!("pod {name} is not a valid Pod: {e}")));
        }
    };
    let name = pod_name(&pod, &namespace);
    let labels = namespace_labels(&namespace);
    match decide(&pod, &namespace, labels.as_ref(), &inj.agent_namespace) {
        Decision::Skip(why) => {
            tracing::debug!(pod = %name, reason = %why, "not injected");
            answer(base)
        }
        Decision::Inject => {
            let after = match serde_json::to_value(inject(&pod, inj)) {
                Ok(v) => v,
                Err(e) => return answer(base.deny(format!("pod {name}: {e}"))),
            };
            let before = match serde_json::to_value(&pod) {
                Ok(v) => v,
                Err(e) => return answer(base.deny(format!("pod {name}: {e}"))),
            };
            let patch = json_patch::diff(&before, &after);
            match base.clone().with_patch(patch) {
                Ok(r) => {
                    tracing::info!(pod = %name, "injected meshfed workload init and agent");
                    answer(r)
                }
                Err(e) => answer(base.deny(format!("pod {name}: the patch: {e}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::json;

    fn inj() -> Injection {
        Injection {
            image: "meshfed:test".into(),
            image_pull_policy: None,
            trust_domain: "east.mesh".into(),
            agent: "meshfed-agent.meshfed-system.svc:15012".into(),
            server_name: "meshfed-agent.meshfed-system.svc".into(),
            token_audience: "istio-ca".into(),
            token_seconds: 3600,
            roots_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            agent_namespace: "meshfed-system".into(),
        }
    }

    fn pod(labels: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"generateName": "client-", "namespace": "shop", "labels": labels},
            "spec": {"serviceAccountName": "client",
                     "containers": [{"name": "app", "image": "client",
                                     "env": [{"name": "GRPC_XDS_BOOTSTRAP", "value": "/mine.json"}]}]}
        }))
        .unwrap()
    }

    #[test]
    fn opt_in_by_pod_or_namespace_and_opt_out_by_pod() {
        let ns = |v: &str| Some(BTreeMap::from([(INJECT_LABEL.to_string(), v.to_string())]));
        let d = |p: &Pod, n: &str, l: Option<BTreeMap<String, String>>| {
            decide(p, n, l.as_ref(), "meshfed-system")
        };
        let opted = pod(json!({"meshfed.io/inject": "grpc"}));
        let out = pod(json!({"meshfed.io/inject": "false"}));
        let plain = pod(json!({"app": "client"}));
        assert_eq!(d(&opted, "shop", None), Decision::Inject);
        assert_eq!(d(&plain, "shop", ns("grpc")), Decision::Inject);
        assert_eq!(
            d(&out, "shop", ns("grpc")),
            Decision::Skip("the pod opted out".into())
        );
        assert_eq!(
            d(&plain, "shop", None),
            Decision::Skip("not opted in".into())
        );
        assert!(matches!(d(&opted, "kube-system", None), Decision::Skip(_)));
        assert!(matches!(
            d(&opted, "meshfed-system", None),
            Decision::Skip(_)
        ));
        let odd = pod(json!({"meshfed.io/inject": "envoy"}));
        assert!(
            matches!(d(&odd, "shop", None), Decision::Skip(w) if w.contains("names no template"))
        );
        let mut host = opted.clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert!(matches!(d(&host, "shop", None), Decision::Skip(w) if w.contains("host network")));
        // Injected once: never again.
        let twice = inject(&opted, &inj());
        assert_eq!(
            d(&twice, "shop", None),
            Decision::Skip("already injected".into())
        );
    }

    #[test]
    fn the_injected_pod_has_both_containers_the_volumes_and_keeps_the_users_settings() {
        let p = inject(&pod(json!({"meshfed.io/inject": "grpc"})), &inj());
        let spec = p.spec.unwrap();
        let init = &spec.init_containers.unwrap()[0];
        assert_eq!(init.name, INIT_NAME);
        assert_eq!(init.args.as_deref().unwrap(), ["workload", "init"]);
        let sc = init.security_context.as_ref().unwrap();
        assert_eq!(
            (sc.allow_privilege_escalation, sc.read_only_root_filesystem),
            (Some(false), Some(true))
        );
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref().unwrap(),
            ["ALL"]
        );
        let names: Vec<_> = init
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| e.name.as_str())
            .collect();
        for n in [
            "POD_NAME",
            "POD_NAMESPACE",
            "POD_IP",
            "SERVICE_ACCOUNT",
            "MESHFED_ROOT_CERTS",
        ] {
            assert!(names.contains(&n), "{n}");
        }
        let names: Vec<_> = spec.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["app", SIDECAR_NAME]);
        let app = &spec.containers[0];
        let env: BTreeMap<_, _> = app
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| (e.name.as_str(), e.value.as_deref().unwrap_or("")))
            .collect();
        assert_eq!(
            env["GRPC_XDS_BOOTSTRAP"], "/mine.json",
            "the user's value stays"
        );
        assert_eq!(env["GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE"], "true");
        let m = &app.volume_mounts.as_ref().unwrap()[0];
        assert_eq!(
            (m.mount_path.as_str(), m.read_only),
            (WORKLOAD_DIR, Some(true))
        );
        let volumes = spec.volumes.unwrap();
        let sat = volumes[1]
            .projected
            .as_ref()
            .unwrap()
            .sources
            .as_ref()
            .unwrap()[0]
            .service_account_token
            .clone()
            .unwrap();
        assert_eq!(
            (sat.audience.as_deref(), sat.expiration_seconds),
            (Some("istio-ca"), Some(3600))
        );
        let vols: Vec<_> = volumes
            .into_iter()
            .map(|v| (v.name, v.projected.is_some(), v.empty_dir.is_some()))
            .collect();
        assert_eq!(
            vols,
            [
                (WORKLOAD_VOLUME.to_string(), false, true),
                (TOKEN_VOLUME.to_string(), true, false)
            ]
        );
    }

    fn admission(object: serde_json::Value, operation: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "shop", "operation": operation,
                "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
                "object": object, "oldObject": null, "dryRun": false,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
            }
        }))
        .unwrap()
    }

    #[test]
    fn reviews_are_answered_with_a_patch_nothing_or_an_error_never_a_panic() {
        let no_labels = |_: &str| None;
        let opted = serde_json::to_value(pod(json!({"meshfed.io/inject": "grpc"}))).unwrap();
        let (code, r) = review(&admission(opted.clone(), "CREATE"), &inj(), no_labels);
        assert_eq!(code, 200);
        assert_eq!(r["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(r["response"]["allowed"], true);
        assert_eq!(r["response"]["patchType"], "JSONPatch");
        use base64::Engine;
        let patch: json_patch::Patch = serde_json::from_slice(
            &base64::engine::general_purpose::STANDARD
                .decode(r["response"]["patch"].as_str().unwrap())
                .unwrap(),
        )
        .unwrap();
        let mut applied = opted.clone();
        json_patch::patch(&mut applied, &patch).unwrap();
        let applied: Pod = serde_json::from_value(applied).unwrap();
        assert_eq!(
            applied.spec.as_ref().unwrap().containers.len(),
            2,
            "the patch applies to the object as sent"
        );
        // A second pass over the injected pod changes nothing.
        let again = serde_json::to_value(&applied).unwrap();
        let (_, r) = review(&admission(again, "CREATE"), &inj(), no_labels);
        assert_eq!(r["response"]["allowed"], true);
        assert!(r["response"].get("patch").is_none(), "{r}");
        // Not opted in: allowed, untouched.
        let plain = serde_json::to_value(pod(json!({}))).unwrap();
        let (_, r) = review(&admission(plain.clone(), "CREATE"), &inj(), no_labels);
        assert!(r["response"].get("patch").is_none());
        // The namespace opts in.
        let (_, r) = review(&admission(plain.clone(), "CREATE"), &inj(), |ns| {
            (ns == "shop").then(|| BTreeMap::from([(INJECT_LABEL.into(), "grpc".into())]))
        });
        assert!(r["response"]["patch"].is_string());
        // An UPDATE is never patched.
        let (_, r) = review(&admission(opted, "UPDATE"), &inj(), no_labels);
        assert!(r["response"].get("patch").is_none());
        // A pod that is not a Pod: denied, named.
        let bad = json!({"metadata": {"name": "broken", "namespace": "shop"}, "spec": {"containers": "app"}});
        let (code, r) = review(&admission(bad, "CREATE"), &inj(), no_labels);
        assert_eq!(code, 200);
        assert_eq!(r["response"]["allowed"], false);
        let msg = r["response"]["status"]["message"].as_str().unwrap();
        assert!(msg.contains("pod shop/broken is not a valid Pod"), "{msg}");
        // Not an AdmissionReview at all.
        for body in [
            &b"{"[..],
            b"[]",
            b"{\"kind\": \"AdmissionReview\"}",
            b"\xff\xfe",
        ] {
            let (code, r) = review(body, &inj(), no_labels);
            assert_eq!(code, 400, "{r}");
            assert!(r["error"].is_string());
        }
    }
}

/// What one pass over the MutatingWebhookConfiguration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BundleSync {
    /// This many webhooks now carry the roots.
    Updated(usize),
    Unchanged,
    /// The configuration is not installed (injection is off until it is).
    Missing,
}

/// Keeps the `caBundle` of every webhook of the MutatingWebhookConfiguration `name` equal to
/// `roots_pem` (the roots the agent's serving certificate chains to), so the API server can
/// call the webhook across root rotations. Only the caBundles are written, with the
/// resourceVersion read (a concurrent edit is a 409, retried by the caller); the configuration
/// itself is the operator's and is never created or deleted here.
pub async fn sync_ca_bundle(
    client: kube::Client,
    name: &str,
    roots_pem: &str,
) -> Result<BundleSync, kube::Error> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    let api: kube::Api<MutatingWebhookConfiguration> = kube::Api::all(client);
    let Some(mut cfg) = api.get_opt(name).await? else {
        return Ok(BundleSync::Missing);
    };
    let want = k8s_openapi::ByteString(roots_pem.as_bytes().to_vec());
    let mut changed = 0;
    for w in cfg.webhooks.iter_mut().flatten() {
        if w.client_config.ca_bundle.as_ref() != Some(&want) {
            w.client_config.ca_bundle = Some(want.clone());
            changed += 1;
        }
    }
    if changed == 0 {
        return Ok(BundleSync::Unchanged);
    }
    api.replace(name, &kube::api::PostParams::default(), &cfg)
        .await?;
    Ok(BundleSync::Updated(changed))
}
