//! The API access the agent's Kubernetes source and sink use: exactly these verbs on these
//! resources. The ClusterRole in `deploy/kubernetes/agent/agent.yaml` must grant exactly this
//! (`federator/tests/deploy.rs` compares them).

/// `(API group, resource, verbs)`.
pub const RULES: &[(&str, &str, &[&str])] = &[
    // The source's watchers (list, then watch).
    ("", "services", &["list", "watch"]),
    ("", "nodes", &["list", "watch"]),
    ("", "pods", &["list", "watch"]),
    // Their labels: --namespace-selector and topology.istio.io/network.
    ("", "namespaces", &["list", "watch"]),
    // Watched as the cluster's own; the slices of imported services are written.
    (
        "discovery.k8s.io",
        "endpointslices",
        &["delete", "get", "list", "patch", "watch"],
    ),
    (
        "multicluster.x-k8s.io",
        "serviceexports",
        &["list", "watch"],
    ),
    ("multicluster.x-k8s.io", "serviceexports/status", &["patch"]),
    (
        "multicluster.x-k8s.io",
        "serviceimports",
        &["delete", "get", "list", "patch"],
    ),
    ("multicluster.x-k8s.io", "serviceimports/status", &["patch"]),
    // Failover policies: meshfed's FailoverPolicy and opted-in Istio DestinationRules; with
    // --istio, the DestinationRules of imported hosts are written (users' are only read).
    ("meshfed.io", "failoverpolicies", &["list", "watch"]),
    (
        "networking.istio.io",
        "destinationrules",
        &["delete", "get", "list", "patch", "watch"],
    ),
    // Istio VirtualServices opted in: their routes for meshfed's proxyless clients (read only).
    ("networking.istio.io", "virtualservices", &["list", "watch"]),
    // Istio ServiceEntries: users' are read (theirs win); with --istio, imports are written.
    (
        "networking.istio.io",
        "serviceentries",
        &["delete", "get", "list", "patch", "watch"],
    ),
    // Istio WorkloadEntries: read (VMs that Services select), and written for the VMs
    // registered with this agent (with their Healthy condition).
    (
        "networking.istio.io",
        "workloadentries",
        &["delete", "get", "list", "patch", "watch"],
    ),
    ("networking.istio.io", "workloadentries/status", &["patch"]),
    // Istio WorkloadGroups: the templates VMs join through (beside the registry file's).
    ("networking.istio.io", "workloadgroups", &["list", "watch"]),
    // The CA API authenticates pods by their service-account tokens.
    ("authentication.k8s.io", "tokenreviews", &["create"]),
    // `meshfed vm bootstrap --agent`: may the caller update the WorkloadGroup?
    ("authorization.k8s.io", "subjectaccessreviews", &["create"]),
    // Warnings on objects the source cannot use (kube-runtime's recorder: create, then patch
    // a series).
    ("events.k8s.io", "events", &["create", "patch"]),
    // The injection webhook's caBundle (only the named MutatingWebhookConfiguration).
    (
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        &["get", "update"],
    ),
];

/// In the agent's own namespace (a Role, not the ClusterRole): the leader election's Lease
/// (read, created by the first replica, replaced to take or renew it) and the Secret the
/// replicas share the cluster's identity and CA through (read, created by the joining replica,
/// replaced when the leader's CA changes).
pub const NAMESPACED_RULES: &[(&str, &str, &[&str])] = &[
    (
        "coordination.k8s.io",
        "leases",
        &["create", "get", "update"],
    ),
    ("", "secrets", &["create", "get", "update"]),
    // The service VIPs the leader shares (server-side apply, which may create it).
    ("", "configmaps", &["create", "get", "patch"]),
];

/// With `--istio`, in istiod's namespace (a Role in `deploy/kubernetes/istio`): the mesh config
/// ConfigMap meshfed owns (created with server-side apply, then read and patched by name).
pub const ISTIO_NAMESPACED_RULES: &[(&str, &str, &[&str])] =
    &[("", "configmaps", &["create", "get", "patch"])];
