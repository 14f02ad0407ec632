//! The deployment files under `deploy/` stay true to the binary: every meshfed command line in
//! the Kubernetes manifests and systemd units parses with meshfed's own CLI (flags, values,
//! durations, addresses), the registry and policies shipped in ConfigMaps parse with meshfed's
//! own loaders, Services select pods that exist, probes hit declared ports, and every
//! namespaced object is in meshfed-system. No Kubernetes API server runs here: the manifests
//! are checked as YAML documents, not applied.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use clap::Parser;
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn files(dir: &str, ext: &str) -> Vec<PathBuf> {
    fn walk(d: &Path, ext: &str, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, ext, out);
            } else if p.extension().and_then(|x| x.to_str()) == Some(ext) {
                out.push(p);
            }
        }
    }
    let mut v = Vec::new();
    walk(&deploy().join(dir), ext, &mut v);
    v.sort();
    assert!(!v.is_empty(), "no *.{ext} under deploy/{dir}");
    v
}

/// The documents of the component manifests under deploy/kubernetes (not the kustomizations,
/// the generated CRDs or the overlays), named by file.
fn component_docs() -> Vec<(String, Value)> {
    let root = deploy().join("kubernetes");
    files("kubernetes", "yaml")
        .into_iter()
        .filter(|f| {
            let rel = f.strip_prefix(&root).unwrap();
            !rel.starts_with("overlays")
                && !rel.starts_with("crds")
                && f.file_name().is_some_and(|n| n != "kustomization.yaml")
        })
        .flat_map(|f| {
            let name = f.strip_prefix(&root).unwrap().display().to_string();
            docs(&f).into_iter().map(move |d| (name.clone(), d))
        })
        .collect()
}

/// `kubectl kustomize deploy/<dir>`, its documents.
fn kustomize(dir: &str) -> Vec<Value> {
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(deploy().join(dir))
        .output()
        .expect("kubectl is required (scripts/test installs kubernetes-client when missing)");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_saphyr::from_multiple::<Value>(&String::from_utf8_lossy(&out.stdout))
        .unwrap()
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn kind_names(docs: &[Value]) -> std::collections::BTreeSet<String> {
    docs.iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or(""),
                d["metadata"]["name"].as_str().unwrap_or("")
            )
        })
        .collect()
}

#[test]
fn kubernetes_manifests_match_the_binary() {
    check_manifests(component_docs(), 4);
}

/// The overlays render with kubectl: the federation's cluster gets the federator alone with
/// its advertised name; a member cluster gets the CRD, its agent with its own join facts and
/// its gateway labelled with its network, and no federator. Both pass the manifest checks.
#[test]
fn overlays_render_each_clusters_part_with_its_facts() {
    let fed = kustomize("kubernetes/overlays/federation");
    let kinds = kind_names(&fed);
    assert!(kinds.contains("StatefulSet/meshfed-federator"), "{kinds:?}");
    assert!(kinds.contains("Namespace/meshfed-system"), "{kinds:?}");
    assert!(
        !kinds
            .iter()
            .any(|k| k.contains("agent") || k.contains("eastwest")),
        "{kinds:?}"
    );
    let args = fed
        .iter()
        .find(|d| d["kind"] == "StatefulSet")
        .map(|d| d["spec"]["template"]["spec"]["containers"][0]["args"].clone())
        .unwrap();
    let args: Vec<&str> = args
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let at = args.iter().position(|a| *a == "--advertise").unwrap();
    assert_eq!(args[at + 1], "federation.mesh.example.org:15100");
    check_manifests(
        fed.into_iter()
            .map(|d| ("overlays/federation".into(), d))
            .collect(),
        1,
    );

    let west = kustomize("kubernetes/overlays/cluster-west");
    let kinds = kind_names(&west);
    for want in [
        "Namespace/meshfed-system",
        "CustomResourceDefinition/failoverpolicies.meshfed.io",
        "StatefulSet/meshfed-agent",
        "ClusterRole/meshfed-agent",
        "Deployment/eastwest-gateway",
    ] {
        assert!(kinds.contains(want), "{want} not in {kinds:?}");
    }
    assert!(!kinds.iter().any(|k| k.contains("federator")), "{kinds:?}");
    let agent = west.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let join: Vec<&str> = agent["spec"]["template"]["spec"]["initContainers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for (flag, value) in [
        ("--cluster", "west"),
        ("--network", "net-west"),
        ("--trust-domain", "west.mesh"),
        ("--locality", "us-west1/us-west1-a"),
        ("--gateway", "eastwest.west.example.com:15443"),
    ] {
        let i = join.iter().position(|a| *a == flag).unwrap();
        assert_eq!(join[i + 1], value, "{flag}");
    }
    for d in west
        .iter()
        .filter(|d| d["metadata"]["name"] == "eastwest-gateway")
    {
        for labels in [
            &d["metadata"]["labels"],
            &d["spec"]["template"]["metadata"]["labels"],
        ] {
            if let Some(n) = labels.get("topology.istio.io/network") {
                assert_eq!(n, "net-west", "{}", d["kind"]);
            }
        }
        // The gateway labels Istio's metrics with west as their destination cluster.
        if d["kind"] == "Deployment" {
            let args: Vec<String> = serde_json::from_value(
                d["spec"]["template"]["spec"]["containers"][0]["args"].clone(),
            )
            .unwrap();
            let i = args.iter().position(|a| a == "--cluster").unwrap();
            assert_eq!(args[i + 1], "west");
        }
    }
    check_manifests(
        west.into_iter()
            .map(|d| ("overlays/cluster-west".into(), d))
            .collect(),
        3,
    );
}

/// The CRD files are what `meshfed crds` prints now (regenerate them with it when a type
/// changes).
#[test]
fn crd_files_match_the_types() {
    let strip = |text: &str| -> String {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect()
    };
    let fp = std::fs::read_to_string(deploy().join("kubernetes/crds/failoverpolicy.yaml")).unwrap();
    assert_eq!(
        strip(&fp),
        meshfed::cli::crds_yaml(false).unwrap(),
        "deploy/kubernetes/crds/failoverpolicy.yaml drifted: regenerate it with `meshfed crds`"
    );
    let mcs = std::fs::read_to_string(deploy().join("kubernetes/crds/mcs.yaml")).unwrap();
    let all = meshfed::cli::crds_yaml(true).unwrap();
    let without_fp = all
        .strip_prefix(&meshfed::cli::crds_yaml(false).unwrap())
        .unwrap();
    assert_eq!(
        strip(&mcs),
        without_fp,
        "deploy/kubernetes/crds/mcs.yaml drifted: regenerate it with `meshfed crds --mcs`"
    );
}

/// `meshfed <args>` must parse; Kubernetes `$(VAR)` references stand for a value.
fn parses(args: &[String], at: &str) {
    let argv = std::iter::once("meshfed".to_string()).chain(args.iter().map(|a| {
        if a.starts_with("$(") {
            "from-the-environment".to_string()
        } else {
            a.clone()
        }
    }));
    if let Err(e) = meshfed::cli::Cli::try_parse_from(argv) {
        panic!("{at}: `meshfed {}` does not parse:\n{e}", args.join(" "));
    }
}

fn docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|m| m.iter().all(|(k, v)| labels.get(k.as_str()) == Some(v)))
}

/// Checks manifest documents `(source, document)`: every meshfed command line parses, admin
/// stays on loopback, probes and scrapes hit the probe listener, selectors select, ConfigMaps
/// parse with meshfed's loaders; at least `min_commands` meshfed command lines.
fn check_manifests(manifests: Vec<(String, Value)>, min_commands: usize) {
    let mut pods: Vec<(String, Value)> = Vec::new();
    let mut services: Vec<(String, Value)> = Vec::new();
    let mut commands = 0;
    for (name, d) in manifests {
        let kind = d["kind"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: a document has no kind"));
        assert!(
            d["apiVersion"].is_string(),
            "{name}: {kind} has no apiVersion"
        );
        let obj = s(&d, &["metadata", "name"])
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{name}: a {kind} has no name"));
        let at = format!("{name}: {kind}/{obj}");
        // Cluster-scoped kinds have no namespace.
        if ![
            "Namespace",
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "MutatingWebhookConfiguration",
        ]
        .contains(&kind)
        {
            // The istio component's Role lives in istiod's namespace.
            let want = if name.starts_with("istio/") {
                "istio-system"
            } else {
                "meshfed-system"
            };
            assert_eq!(
                s(&d, &["metadata", "namespace"]).and_then(Value::as_str),
                Some(want),
                "{at}: not in {want}"
            );
        }
        match kind {
            "Service" => services.push((at.clone(), d.clone())),
            "ConfigMap" => {
                for (k, v) in d["data"].as_object().unwrap() {
                    let key = k.as_str();
                    let text = v.as_str().unwrap();
                    if key == "registry.yaml" {
                        meshfed_model::registry::Registry::parse(text, &format!("{at}/{key}"))
                            .unwrap_or_else(|e| panic!("{e}"));
                    } else {
                        meshfed_model::policy::PolicySet::from_sources(&[(
                            format!("{at}/{key}"),
                            text.to_string(),
                        )])
                        .unwrap_or_else(|e| panic!("{e}"));
                    }
                }
            }
            _ => {}
        }
        let Some(template) = s(&d, &["spec", "template"]) else {
            continue;
        };
        assert!(
            labels_match(
                &d["spec"]["selector"]["matchLabels"],
                &template["metadata"]["labels"]
            ),
            "{at}: the selector does not select its own pods"
        );
        pods.push((at.clone(), template["metadata"]["labels"].clone()));
        let spec = &template["spec"];
        for list in ["initContainers", "containers"] {
            for c in spec[list].as_array().into_iter().flatten() {
                let cname = c["name"].as_str().unwrap_or("?");
                let image = c["image"].as_str().unwrap_or_default();
                if image.starts_with("meshfed:") {
                    let args: Vec<String> = c["args"]
                        .as_array()
                        .unwrap_or_else(|| panic!("{at}/{cname}: no args"))
                        .iter()
                        .map(|a| {
                            a.as_str().map(str::to_string).unwrap_or_else(|| {
                                panic!("{at}/{cname}: args must be strings (quote numbers)")
                            })
                        })
                        .collect();
                    parses(&args, &format!("{at}/{cname}"));
                    commands += 1;
                    // Admin endpoints (/status, /debug/config_dump) stay on loopback; probes
                    // reach the probe listener, which serves health and metrics only.
                    let flag = |name: &str| {
                        args.iter()
                            .position(|a| a == name)
                            .and_then(|i| args.get(i + 1))
                            .map(|v| v.parse::<std::net::SocketAddr>().unwrap())
                    };
                    if let Some(admin) = flag("--admin") {
                        assert!(
                            admin.ip().is_loopback(),
                            "{at}/{cname}: --admin {admin} must be bound on loopback"
                        );
                    }
                    for probe in ["readinessProbe", "livenessProbe"] {
                        if let Some(port) =
                            s(c, &[probe, "httpGet", "port"]).and_then(Value::as_i64)
                        {
                            let p = flag("--probe").unwrap_or_else(|| {
                                panic!("{at}/{cname}: {probe} needs a --probe listener")
                            });
                            assert_eq!(
                                i64::from(p.port()),
                                port,
                                "{at}/{cname}: {probe} must hit the --probe listener"
                            );
                        }
                    }
                    let scraped = s(
                        &template["metadata"],
                        &["annotations", "prometheus.io/port"],
                    )
                    .and_then(Value::as_str)
                    .filter(|_| list == "containers");
                    if let Some(port) = scraped {
                        assert_eq!(
                            flag("--probe").map(|p| p.port().to_string()).as_deref(),
                            Some(port),
                            "{at}/{cname}: Prometheus scrapes the --probe listener"
                        );
                    }
                }
                let ports: Vec<i64> = c["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["containerPort"].as_i64())
                    .collect();
                for probe in ["readinessProbe", "livenessProbe"] {
                    if let Some(port) = s(c, &[probe, "httpGet", "port"]).and_then(Value::as_i64) {
                        assert!(
                            ports.contains(&port),
                            "{at}/{cname}: {probe} port {port} is not a container port"
                        );
                    }
                }
            }
        }
    }
    assert!(commands >= min_commands, "{commands} meshfed command lines");
    for (at, svc) in &services {
        let sel = &svc["spec"]["selector"];
        assert!(
            pods.iter().any(|(_, labels)| labels_match(sel, labels)),
            "{at}: selects no pods of these manifests"
        );
    }
}

#[test]
fn systemd_units_match_the_binary() {
    for f in files("systemd", "service") {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&f).unwrap();
        for section in ["[Unit]", "[Service]", "[Install]"] {
            assert!(text.lines().any(|l| l == section), "{name}: no {section}");
        }
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap_or_else(|| panic!("{name}: no ExecStart"));
        let mut argv = exec.split_whitespace();
        assert_eq!(argv.next(), Some("/usr/bin/meshfed"), "{name}");
        let args: Vec<String> = argv.map(str::to_string).collect();
        parses(&args, &name);
        assert!(
            text.lines().any(|l| l == "User=meshfed"),
            "{name}: runs as root"
        );
    }
}

/// A flag meshfed does not have is caught (the check above can fail).
#[test]
fn an_unknown_flag_is_caught() {
    let r = std::panic::catch_unwind(|| {
        parses(&["agent".into(), "--no-such-flag".into()], "test");
    });
    assert!(r.is_err());
}

type Grants = std::collections::BTreeSet<(String, String, String)>;

fn granted(role: &Value) -> Grants {
    let mut granted = Grants::new();
    for r in role["rules"].as_array().unwrap() {
        for g in r["apiGroups"].as_array().unwrap() {
            for res in r["resources"].as_array().unwrap() {
                for v in r["verbs"].as_array().unwrap() {
                    granted.insert((
                        g.as_str().unwrap().to_string(),
                        res.as_str().unwrap().to_string(),
                        v.as_str().unwrap().to_string(),
                    ));
                }
            }
        }
    }
    granted
}

fn used(rules: &[(&str, &str, &[&str])]) -> Grants {
    rules
        .iter()
        .flat_map(|(g, r, vs)| {
            vs.iter()
                .map(move |v| (g.to_string(), r.to_string(), v.to_string()))
        })
        .collect()
}

/// The agent's ClusterRole and its namespaced Role grant exactly the verbs on the resources
/// the code uses (`meshfed_kube::rbac::RULES`, `NAMESPACED_RULES`): nothing the agent would be
/// refused, nothing more; both are bound to its ServiceAccount.
#[test]
fn the_agent_roles_grant_exactly_what_the_code_uses() {
    let agent = docs(&deploy().join("kubernetes/agent/agent.yaml"));
    let find = |kind: &str| {
        agent
            .iter()
            .find(|d| d["kind"] == kind)
            .unwrap_or_else(|| panic!("agent.yaml has a {kind}"))
            .clone()
    };
    assert_eq!(
        granted(&find("ClusterRole")),
        used(meshfed_kube::rbac::RULES)
    );
    let role = find("Role");
    assert_eq!(role["metadata"]["namespace"], "meshfed-system");
    assert_eq!(granted(&role), used(meshfed_kube::rbac::NAMESPACED_RULES));
    // Reading and replacing are limited to the one Lease and the one Secret the agent's
    // manifest names.
    let sts = find("StatefulSet");
    let run: Vec<String> = sts["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    let secret = run[run.iter().position(|a| a == "--state-secret").unwrap() + 1].clone();
    for r in role["rules"].as_array().unwrap() {
        let verbs = r["verbs"].as_array().unwrap();
        if verbs
            .iter()
            .any(|v| v == "get" || v == "update" || v == "patch")
        {
            let want = match r["resources"][0].as_str().unwrap() {
                "leases" => "meshfed-agent".to_string(),
                "configmaps" => meshfed_kube::shared_vips::name_for("meshfed-agent"),
                _ => secret.clone(),
            };
            assert_eq!(r["resourceNames"], serde_json::json!([want]), "{r}");
        }
    }
    // The webhook configuration is read and replaced by name only.
    for r in find("ClusterRole")["rules"].as_array().unwrap() {
        if r["resources"][0] == "mutatingwebhookconfigurations" {
            assert_eq!(
                r["resourceNames"],
                serde_json::json!(["meshfed-injector"]),
                "{r}"
            );
        }
    }
    for binding in ["ClusterRoleBinding", "RoleBinding"] {
        let b = find(binding);
        assert_eq!(
            b["subjects"],
            serde_json::json!([{"kind": "ServiceAccount", "name": "meshfed-agent", "namespace": "meshfed-system"}]),
            "{binding}"
        );
    }
    // The agent's pod runs with that account and its token (the in-cluster configuration).
    let sa = find("ServiceAccount");
    assert_ne!(sa["automountServiceAccountToken"], false);
}

/// The agent's StatefulSet runs replicas that share their state through the Secret the
/// init container's join writes or restores, and elect a leader in their own namespace.
#[test]
fn agent_replicas_share_the_state_secret_and_elect_a_leader() {
    let agent = docs(&deploy().join("kubernetes/agent/agent.yaml"));
    let sts = agent.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    assert!(sts["spec"]["replicas"].as_u64().unwrap() >= 2);
    let pod = &sts["spec"]["template"]["spec"];
    let args = |c: &Value| -> Vec<String> {
        c["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let join = args(&pod["initContainers"][0]);
    let run = args(&pod["containers"][0]);
    let secret_of = |a: &[String]| {
        a.iter()
            .position(|x| x == "--state-secret")
            .map(|i| a[i + 1].clone())
    };
    assert_eq!(secret_of(&join), Some("meshfed-agent-state".into()));
    assert_eq!(secret_of(&join), secret_of(&run));
    assert!(run.contains(&"--leader-election".to_string()));
    for c in [&pod["initContainers"][0], &pod["containers"][0]] {
        let ns = c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "POD_NAMESPACE")
            .expect("POD_NAMESPACE from the downward API");
        assert_eq!(
            ns["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.namespace"
        );
    }
}

/// `kubectl kustomize` (the kubectl on the machines; scripts/test installs one when missing)
/// renders the base with every object of the component manifests and the FailoverPolicy CRD.
#[test]
fn kubectl_kustomize_renders_the_base() {
    let rendered = kustomize("kubernetes");
    let kinds = kind_names(&rendered);
    for want in [
        "Namespace/meshfed-system",
        "CustomResourceDefinition/failoverpolicies.meshfed.io",
        "StatefulSet/meshfed-federator",
        "StatefulSet/meshfed-agent",
        "Deployment/eastwest-gateway",
        "ClusterRole/meshfed-agent",
        "ClusterRoleBinding/meshfed-agent",
    ] {
        assert!(kinds.contains(want), "{want} not in {kinds:?}");
    }
    // The istio and etcd components are added by the overlays that want them (cluster-istio,
    // federation-ha), not the base.
    let base = component_docs()
        .iter()
        .filter(|(f, _)| !f.starts_with("istio/") && !f.starts_with("etcd/"))
        .count();
    assert_eq!(
        rendered.len(),
        base + 1,
        "every object of the component manifests, and the CRD, is rendered"
    );
}

/// The injection webhook's configuration calls the agent's Service on the port the agent
/// serves it on, only for opted-in pods (its two selectors), never for the system namespaces,
/// and carries no caBundle of its own (the agent's leader sets it).
#[test]
fn the_injector_calls_the_agents_webhook_for_opted_in_pods_only() {
    let agent = docs(&deploy().join("kubernetes/agent/agent.yaml"));
    let injector = docs(&deploy().join("kubernetes/agent/injector.yaml"));
    let cfg = &injector[0];
    assert_eq!(cfg["kind"], "MutatingWebhookConfiguration");
    let sts = agent.iter().find(|d| d["kind"] == "StatefulSet").unwrap();
    let args: Vec<String> =
        serde_json::from_value(sts["spec"]["template"]["spec"]["containers"][0]["args"].clone())
            .unwrap();
    let at = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
    let port: u64 = at("--injection-webhook")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let svc = agent.iter().find(|d| d["kind"] == "Service").unwrap();
    let webhooks = cfg["webhooks"].as_array().unwrap();
    assert_eq!(webhooks.len(), 2);
    for w in webhooks {
        let s = &w["clientConfig"]["service"];
        assert_eq!(s["name"], svc["metadata"]["name"]);
        assert_eq!(s["namespace"], svc["metadata"]["namespace"]);
        assert_eq!(s["path"], "/inject");
        assert!(
            svc["spec"]["ports"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["port"] == s["port"] && p["targetPort"].as_u64() == Some(port)),
            "the Service forwards the webhook's port to the agent's"
        );
        assert!(w["clientConfig"].get("caBundle").is_none());
        assert_eq!(w["sideEffects"], "None");
        assert_eq!(w["rules"][0]["operations"], serde_json::json!(["CREATE"]));
        assert_eq!(w["rules"][0]["resources"], serde_json::json!(["pods"]));
    }
    // Opted in by the pod's label ...
    assert_eq!(
        webhooks[0]["objectSelector"]["matchLabels"][meshfed_kube::inject::INJECT_LABEL],
        meshfed_kube::inject::TEMPLATE_GRPC
    );
    let system: Vec<String> = serde_json::from_value(
        webhooks[0]["namespaceSelector"]["matchExpressions"][1]["values"].clone(),
    )
    .unwrap();
    for ns in meshfed_kube::inject::SYSTEM_NAMESPACES {
        assert!(system.iter().any(|s| s == ns), "{ns}");
    }
    // ... or by its namespace's.
    assert_eq!(
        webhooks[1]["namespaceSelector"]["matchLabels"][meshfed_kube::inject::INJECT_LABEL],
        meshfed_kube::inject::TEMPLATE_GRPC
    );
}

/// The istio overlay: the agent runs with --istio and the mesh config ConfigMap it names, and
/// its Role in istio-system grants exactly `ISTIO_NAMESPACED_RULES`, reading and patching only
/// that one ConfigMap (never the `istio` ConfigMap), bound to the agent's ServiceAccount; the
/// flags it adds parse.
#[test]
fn the_istio_overlay_runs_the_agent_with_istio_and_grants_only_its_config_map() {
    let docs = kustomize("kubernetes/overlays/cluster-istio");
    let sts = docs
        .iter()
        .find(|d| d["kind"] == "StatefulSet" && d["metadata"]["name"] == "meshfed-agent")
        .expect("the agent");
    let args: Vec<String> = sts["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect();
    assert!(args.contains(&"--istio".to_string()), "{args:?}");
    let at = args
        .iter()
        .position(|a| a == "--istio-mesh-config")
        .unwrap();
    let (ns, name) = args[at + 1].split_once('/').unwrap();
    assert_eq!(ns, "istio-system");
    let role = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["namespace"] == ns)
        .expect("a Role in istio-system");
    assert_eq!(
        granted(role),
        used(meshfed_kube::rbac::ISTIO_NAMESPACED_RULES)
    );
    for r in role["rules"].as_array().unwrap() {
        if r["verbs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "get" || v == "patch")
        {
            assert_eq!(r["resourceNames"], serde_json::json!([name]), "{r}");
        }
    }
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "RoleBinding" && d["metadata"]["namespace"] == ns)
        .expect("a RoleBinding in istio-system");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(binding["subjects"][0]["name"], "meshfed-agent");
    assert_eq!(binding["subjects"][0]["namespace"], "meshfed-system");
}

/// The HA overlay: three federator replicas with `--store etcd` on the three-member etcd it
/// ships (mTLS to it from a mounted Secret), no volume of their own; the etcd members name
/// each other as the StatefulSet and its headless Service make them, and run with limits that
/// take meshfed's largest transaction. Every meshfed command line parses.
#[test]
fn the_ha_overlay_runs_three_federator_replicas_on_etcd() {
    let docs = kustomize("kubernetes/overlays/federation-ha");
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind}/{name}"))
            .clone()
    };
    let fed = find("StatefulSet", "meshfed-federator");
    assert_eq!(fed["spec"]["replicas"], 3);
    assert!(fed["spec"]["volumeClaimTemplates"].is_null(), "{fed}");
    let c = &fed["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let flag = |f: &str| args[args.iter().position(|a| *a == f).unwrap() + 1];
    assert_eq!(flag("--store"), "etcd");
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "etcd-client")
        .unwrap()["mountPath"]
        .as_str()
        .unwrap()
        .to_string();
    for f in ["--etcd-ca", "--etcd-cert", "--etcd-key"] {
        assert!(
            flag(f).starts_with(&mount),
            "{f} {} outside {mount}",
            flag(f)
        );
    }
    let endpoints: Vec<&str> = flag("--etcd-endpoints").split(',').collect();

    let etcd = find("StatefulSet", "meshfed-etcd");
    let svc = find("Service", "meshfed-etcd");
    assert_eq!(svc["spec"]["clusterIP"], "None");
    let n = etcd["spec"]["replicas"].as_u64().unwrap();
    let domain = format!(
        "{}.{}.svc",
        etcd["spec"]["serviceName"].as_str().unwrap(),
        etcd["metadata"]["namespace"].as_str().unwrap()
    );
    let members: Vec<String> = (0..n)
        .map(|i| format!("meshfed-etcd-{i}.{domain}"))
        .collect();
    assert_eq!(
        endpoints,
        members
            .iter()
            .map(|m| format!("https://{m}:2379"))
            .collect::<Vec<_>>()
    );
    let eargs: Vec<&str> = etcd["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let eflag = |f: &str| {
        eargs
            .iter()
            .find_map(|a| a.strip_prefix(&format!("{f}=")))
            .unwrap_or_else(|| panic!("etcd has no {f}"))
    };
    assert_eq!(
        eflag("--initial-cluster"),
        members
            .iter()
            .enumerate()
            .map(|(i, m)| format!("meshfed-etcd-{i}=https://{m}:2380"))
            .collect::<Vec<_>>()
            .join(",")
    );
    assert!(eargs.contains(&"--client-cert-auth"));
    assert!(eargs.contains(&"--peer-client-cert-auth"));
    // The largest transaction: a full delta's services, as many conflict flags of other
    // clusters' exports, the cluster record, its acknowledged revision and the head.
    let ops: usize = eflag("--max-txn-ops").parse().unwrap();
    assert!(
        ops > 2 * meshfed_model::validate::MAX_SERVICES_PER_DELTA + 3,
        "{ops}"
    );
    let bytes: usize = eflag("--max-request-bytes").parse().unwrap();
    assert!(
        bytes >= 2 * meshfed_model::validate::MAX_MESSAGE_BYTES,
        "{bytes}"
    );
    check_manifests(
        docs.into_iter()
            .map(|d| ("overlays/federation-ha".into(), d))
            .collect(),
        1,
    );
}
