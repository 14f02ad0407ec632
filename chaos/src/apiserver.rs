//! An API-server double for process-level tests: no kube-apiserver can run on these machines.
//! It serves, over HTTP on loopback, what meshfed's Kubernetes source uses and nothing more:
//! list and watch (with `resourceVersion`, `ADDED`/`MODIFIED`/`DELETED` events, and a
//! `410 Gone` ERROR event for a version older than the last compaction, as a real API server
//! sends it: HTTP 200, then the event) for Services, EndpointSlices, Nodes, Pods and MCS
//! ServiceExports, cluster-wide and per namespace; GET, create and replace (with the
//! `resourceVersion` precondition, 409 on a stale one) for Leases, Secrets, ConfigMaps and
//! MutatingWebhookConfigurations, and `TokenReview`s of the service-account tokens a test adds ([`ApiServer::add_token`]). Tests change objects through
//! [`ApiServer::apply`] and [`ApiServer::delete`]; every object is checked against
//! k8s-openapi's type for its kind (or meshfed's ServiceExport) so fixtures follow the API's
//! JSON. [`ApiServer::compact`] expires every version seen so far (watchers must relist);
//! [`ApiServer::set_down`] answers 503 and ends open watches (an unreachable API server).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// The kinds served: (group/version prefix, plural, kind, namespaced).
const KINDS: &[(&str, &str, &str, bool)] = &[
    ("api/v1", "services", "Service", true),
    ("api/v1", "nodes", "Node", false),
    ("api/v1", "pods", "Pod", true),
    ("api/v1", "namespaces", "Namespace", false),
    (
        "apis/discovery.k8s.io/v1",
        "endpointslices",
        "EndpointSlice",
        true,
    ),
    (
        "apis/multicluster.x-k8s.io/v1alpha1",
        "serviceexports",
        "ServiceExport",
        true,
    ),
    (
        "apis/multicluster.x-k8s.io/v1alpha1",
        "serviceimports",
        "ServiceImport",
        true,
    ),
    ("apis/events.k8s.io/v1", "events", "Event", true),
    (
        "apis/meshfed.io/v1alpha1",
        "failoverpolicies",
        "FailoverPolicy",
        true,
    ),
    (
        "apis/networking.istio.io/v1",
        "destinationrules",
        "DestinationRule",
        true,
    ),
    (
        "apis/networking.istio.io/v1",
        "virtualservices",
        "VirtualService",
        true,
    ),
    (
        "apis/networking.istio.io/v1",
        "workloadentries",
        "WorkloadEntry",
        true,
    ),
    (
        "apis/networking.istio.io/v1",
        "serviceentries",
        "ServiceEntry",
        true,
    ),
    ("apis/coordination.k8s.io/v1", "leases", "Lease", true),
    (
        "apis/networking.istio.io/v1",
        "workloadgroups",
        "WorkloadGroup",
        true,
    ),
    ("api/v1", "secrets", "Secret", true),
    ("api/v1", "configmaps", "ConfigMap", true),
    (
        "apis/admissionregistration.k8s.io/v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        false,
    ),
];

fn api_version(prefix: &str) -> String {
    prefix
        .strip_prefix("apis/")
        .or_else(|| prefix.strip_prefix("api/"))
        .unwrap_or(prefix)
        .to_string()
}

/// Checks an object against its kind's Rust type (the API's JSON, exactly).
fn check(kind: &str, v: &Value) -> Result<()> {
    use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let r = match kind {
        "Service" => serde_json::from_value::<Service>(v.clone()).map(|_| ()),
        "Node" => serde_json::from_value::<Node>(v.clone()).map(|_| ()),
        "Pod" => serde_json::from_value::<Pod>(v.clone()).map(|_| ()),
        "Namespace" => serde_json::from_value::<Namespace>(v.clone()).map(|_| ()),
        "EndpointSlice" => serde_json::from_value::<EndpointSlice>(v.clone()).map(|_| ()),
        "ServiceExport" => {
            serde_json::from_value::<meshfed_kube::types::ServiceExport>(v.clone()).map(|_| ())
        }
        "ServiceImport" => {
            serde_json::from_value::<meshfed_kube::types::ServiceImport>(v.clone()).map(|_| ())
        }
        // Istio's kinds meshfed writes: Istio's schema (written from the API reference), as
        // the API server's CRD validation and istiod's webhook would check them.
        "WorkloadEntry" | "ServiceEntry" | "DestinationRule"
            if v["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "meshfed" =>
        {
            return meshfed_kube::istio_schema::check(v)
                .map_err(|e| anyhow::anyhow!("{e}"))
                .with_context(|| {
                    format!("{kind} written by meshfed does not follow Istio's schema: {v}")
                });
        }
        "WorkloadEntry" => {
            serde_json::from_value::<meshfed_kube::types::WorkloadEntry>(v.clone()).map(|_| ())
        }
        "ServiceEntry" => {
            serde_json::from_value::<meshfed_kube::types::ServiceEntry>(v.clone()).map(|_| ())
        }
        "Event" => {
            serde_json::from_value::<k8s_openapi::api::events::v1::Event>(v.clone()).map(|_| ())
        }
        "ConfigMap" => {
            serde_json::from_value::<k8s_openapi::api::core::v1::ConfigMap>(v.clone()).map(|_| ())
        }
        "Secret" => {
            serde_json::from_value::<k8s_openapi::api::core::v1::Secret>(v.clone()).map(|_| ())
        }
        "Lease" => serde_json::from_value::<k8s_openapi::api::coordination::v1::Lease>(v.clone())
            .map(|_| ()),
        "MutatingWebhookConfiguration" => serde_json::from_value::<
            k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
        >(v.clone())
        .map(|_| ()),
        // Custom resources without a Rust type here: the object shape the API server enforces.
        "FailoverPolicy" | "DestinationRule" | "VirtualService" | "WorkloadGroup" => {
            if v["metadata"]["name"].is_string() && v["spec"].is_object() {
                Ok(())
            } else {
                bail!("{kind} needs metadata.name and a spec object: {v}")
            }
        }
        other => bail!("the double does not serve {other}"),
    };
    r.with_context(|| format!("{kind} fixture does not follow the API: {v}"))
}

#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    kind: &'static str,
    namespace: String,
    kind_of_event: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Store {
    rv: u64,
    /// (kind, namespace, name) -> object
    objects: BTreeMap<(String, String, String), Value>,
    /// Every change, for watches that resume from a version.
    log: Vec<Event>,
    /// Versions below this are expired (410 Gone).
    compacted: u64,
    down: bool,
    /// Kinds answered 404 as if their CRD were not installed.
    unserved: std::collections::BTreeSet<String>,
    /// Kinds answered 403 (the client's RBAC does not grant them).
    forbidden: std::collections::BTreeSet<String>,
    /// Requests served, as `LIST path`, `WATCH path` or `METHOD path`, for the tests.
    requests: Vec<String>,
    /// Service-account tokens the double's TokenReview knows.
    tokens: BTreeMap<String, Token>,
    /// What SubjectAccessReviews allow: (user, verb, group, resource, namespace, name).
    grants: std::collections::BTreeSet<Grant>,
}

/// One permission the double's SubjectAccessReview allows (RBAC's answer for a user).
pub type Grant = (String, String, String, String, String, String);

/// A service-account token as the double's TokenReview judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub namespace: String,
    pub service_account: String,
    /// The audiences it was issued for (`aud`).
    pub audiences: Vec<String>,
    /// The pod it is bound to.
    pub pod: Option<String>,
    pub expired: bool,
}

#[derive(Debug, Clone)]
struct Shared {
    store: Arc<Mutex<Store>>,
    events: broadcast::Sender<Event>,
    /// Bumped to end every open watch (compaction, going down).
    cut: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running double.
#[derive(Debug)]
pub struct ApiServer {
    pub addr: SocketAddr,
    shared: Shared,
    rt: tokio::runtime::Runtime,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn answer(code: StatusCode, body: Value) -> Response {
    (
        code,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        // Newline-terminated, as the API server writes JSON: a watch client reads the body
        // line by line and drops an unterminated last line.
        format!("{body}\n"),
    )
        .into_response()
}

/// A parsed path: the kind, the namespace (if any), the object's name and whether it names the
/// status subresource.
struct Route {
    kind: usize,
    ns: Option<String>,
    name: Option<String>,
    status: bool,
}

fn route(path: &str) -> Option<Route> {
    let p = path.trim_start_matches('/');
    for (i, (prefix, plural, _, namespaced)) in KINDS.iter().enumerate() {
        let Some(rest) = p.strip_prefix(prefix).and_then(|r| r.strip_prefix('/')) else {
            continue;
        };
        let (ns, rest) = match rest.strip_prefix("namespaces/") {
            Some(nr) if *namespaced => match nr.split_once('/') {
                Some((ns, r)) => (Some(ns.to_string()), r),
                None => continue,
            },
            _ => (None, rest),
        };
        let mut parts = rest.split('/');
        if parts.next() != Some(*plural) {
            continue;
        }
        let name = parts.next().map(str::to_string);
        let status = match parts.next() {
            None => false,
            Some("status") => true,
            Some(_) => continue,
        };
        return Some(Route {
            kind: i,
            ns,
            name,
            status,
        });
    }
    None
}

/// The query's parameters, percent-decoded.
fn query(req: &Request) -> BTreeMap<String, String> {
    form_urlencoded::parse(req.uri().query().unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// One object: GET, server-side apply (PATCH, `application/apply-patch+yaml` with a JSON body;
/// the double keeps the applied fields as sent, without tracking field ownership), `/status`
/// apply, DELETE.
async fn item(
    sh: &Shared,
    req: Request,
    kind: &'static str,
    ns: String,
    name: String,
    status_sub: bool,
) -> Response {
    let key = (kind.to_string(), ns.clone(), name.clone());
    let not_found = || {
        answer(
            StatusCode::NOT_FOUND,
            status(404, "NotFound", &format!("{kind} {ns}/{name} not found")),
        )
    };
    match req.method().as_str() {
        "GET" => match sh.lock().objects.get(&key) {
            Some(v) => answer(StatusCode::OK, v.clone()),
            None => not_found(),
        },
        "DELETE" => {
            let gone = {
                let mut st = sh.lock();
                let gone = st.objects.remove(&key);
                if gone.is_some() {
                    st.rv += 1;
                }
                gone.map(|mut v| {
                    v["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                    (st.rv, v)
                })
            };
            match gone {
                Some((rv, v)) => {
                    record(sh, rv, kind, "DELETED", ns.clone(), v);
                    answer(
                        StatusCode::OK,
                        json!({"apiVersion": "v1", "kind": "Status", "status": "Success"}),
                    )
                }
                None => not_found(),
            }
        }
        "PATCH" => {
            let ct = req
                .headers()
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            if ct != "application/apply-patch+yaml" {
                return answer(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    status(
                        415,
                        "UnsupportedMediaType",
                        &format!("{ct}: server-side apply only"),
                    ),
                );
            }
            let applied: Value = match json_body(req).await {
                Ok(v) => v,
                Err(r) => return r,
            };
            let (rv, ev, obj) = {
                let mut st = sh.lock();
                let existing = st.objects.get(&key).cloned();
                let mut obj = match (status_sub, existing) {
                    (true, None) => return not_found(),
                    (true, Some(mut cur)) => {
                        cur["status"] = applied["status"].clone();
                        cur
                    }
                    (false, cur) => {
                        let mut v = applied.clone();
                        v["metadata"]["namespace"] = json!(ns);
                        v["metadata"]["name"] = json!(name);
                        if let Some(c) = &cur {
                            if !c["status"].is_null() {
                                v["status"] = c["status"].clone();
                            }
                        }
                        v
                    }
                };
                if let Err(e) = check(kind, &obj) {
                    return answer(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        status(422, "Invalid", &format!("{e:#}")),
                    );
                }
                st.rv += 1;
                obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                let ev = if st.objects.insert(key.clone(), obj.clone()).is_some() {
                    "MODIFIED"
                } else {
                    "ADDED"
                };
                (st.rv, ev, obj)
            };
            record(sh, rv, kind, ev, ns.clone(), obj.clone());
            answer(StatusCode::OK, obj)
        }
        // Replace, with optimistic concurrency: a resourceVersion in the body must be the
        // stored one (409 Conflict otherwise), as the API server checks it.
        "PUT" => {
            let mut obj = match object_body(req, kind).await {
                Ok(v) => v,
                Err(r) => return r,
            };
            let (rv, obj) = {
                let mut st = sh.lock();
                let Some(cur) = st.objects.get(&key) else {
                    return not_found();
                };
                let sent = obj["metadata"]["resourceVersion"].as_str().unwrap_or("");
                if !sent.is_empty() && Some(sent) != cur["metadata"]["resourceVersion"].as_str() {
                    return answer(
                        StatusCode::CONFLICT,
                        status(
                            409,
                            "Conflict",
                            &format!("Operation cannot be fulfilled on {kind} {ns}/{name}: the object has been modified; please apply your changes to the latest version and try again"),
                        ),
                    );
                }
                st.rv += 1;
                obj["metadata"]["namespace"] = json!(ns);
                obj["metadata"]["name"] = json!(name);
                obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                st.objects.insert(key.clone(), obj.clone());
                (st.rv, obj)
            };
            record(sh, rv, kind, "MODIFIED", ns.clone(), obj.clone());
            answer(StatusCode::OK, obj)
        }
        m => answer(
            StatusCode::METHOD_NOT_ALLOWED,
            status(
                405,
                "MethodNotAllowed",
                &format!("{m} is not served for objects"),
            ),
        ),
    }
}

/// The request's body as JSON of type `T`, or the 400 answer naming why it is not.
async fn json_body<T: serde::de::DeserializeOwned>(req: Request) -> Result<T, Response> {
    let bad = |e: String| answer(StatusCode::BAD_REQUEST, status(400, "BadRequest", &e));
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .map_err(|e| bad(e.to_string()))?;
    serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))
}

/// The request's body as an object of `kind`, or the 400/422 answer naming why it is not one.
async fn object_body(req: Request, kind: &str) -> Result<Value, Response> {
    let obj: Value = json_body(req).await?;
    check(kind, &obj).map_err(|e| {
        answer(
            StatusCode::UNPROCESSABLE_ENTITY,
            status(422, "Invalid", &format!("{e:#}")),
        )
    })?;
    Ok(obj)
}

/// POST on a collection: creates the object (409 if it exists).
async fn create(sh: &Shared, req: Request, kind: &'static str, ns: String) -> Response {
    let mut obj = match object_body(req, kind).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    obj["metadata"]["namespace"] = json!(ns);
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let (rv, obj) = {
        let mut st = sh.lock();
        let key = (kind.to_string(), ns.clone(), name.clone());
        if name.is_empty() || st.objects.contains_key(&key) {
            return answer(
                StatusCode::CONFLICT,
                status(
                    409,
                    "AlreadyExists",
                    &format!("{kind} {ns}/{name} exists or has no name"),
                ),
            );
        }
        st.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
        st.objects.insert(key, obj.clone());
        (st.rv, obj)
    };
    record(sh, rv, kind, "ADDED", ns, obj.clone());
    (
        StatusCode::CREATED,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        format!("{obj}\n"),
    )
        .into_response()
}

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// `POST tokenreviews`: the verdict a kube-apiserver's service-account authenticator gives:
/// unknown and expired tokens are not authenticated (with its error text), a token is
/// authenticated only for the audiences it shares with the request (the API server's own,
/// `https://kubernetes.default.svc`, when the request names none), and the user is
/// `system:serviceaccount:<namespace>:<name>` with the bound pod in `extra`.
async fn token_review(sh: &Shared, req: Request) -> Response {
    if req.method() != axum::http::Method::POST {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            status(405, "MethodNotAllowed", "tokenreviews: create only"),
        );
    }
    let review: k8s_openapi::api::authentication::v1::TokenReview = match json_body(req).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let token = review.spec.token.clone().unwrap_or_default();
    let wanted = review
        .spec
        .audiences
        .clone()
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| vec!["https://kubernetes.default.svc".into()]);
    let known = sh.lock().tokens.get(&token).cloned();
    let verdict = match known {
        None => json!({"authenticated": false,
            "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"}),
        Some(t) if t.expired => json!({"authenticated": false,
            "error": "[invalid bearer token, service account token has expired]"}),
        Some(t) => {
            let shared: Vec<&String> = wanted.iter().filter(|a| t.audiences.contains(a)).collect();
            if shared.is_empty() {
                json!({"authenticated": false, "error": format!(
                    "[invalid bearer token, token audiences {:?} is invalid for the target audiences {:?}]",
                    t.audiences, wanted)})
            } else {
                let mut extra = serde_json::Map::new();
                if let Some(p) = &t.pod {
                    extra.insert("authentication.kubernetes.io/pod-name".into(), json!([p]));
                }
                json!({"authenticated": true, "audiences": shared,
                    "user": {"username": format!("system:serviceaccount:{}:{}", t.namespace, t.service_account),
                        "uid": format!("uid-{}-{}", t.namespace, t.service_account),
                        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", t.namespace), "system:authenticated"],
                        "extra": extra}})
            }
        }
    };
    let mut out = serde_json::to_value(&review).unwrap_or_default();
    out["apiVersion"] = json!("authentication.k8s.io/v1");
    out["kind"] = json!("TokenReview");
    out["status"] = verdict;
    (
        StatusCode::CREATED,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        format!("{out}\n"),
    )
        .into_response()
}

const ACCESS_REVIEWS: &str = "/apis/authorization.k8s.io/v1/subjectaccessreviews";

/// `POST subjectaccessreviews`: allowed exactly when [`ApiServer::allow`] granted the user
/// that verb on that resource (as RBAC answers: no reason when nothing allows it).
async fn access_review(sh: &Shared, req: Request) -> Response {
    if req.method() != axum::http::Method::POST {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            status(405, "MethodNotAllowed", "subjectaccessreviews: create only"),
        );
    }
    let review: k8s_openapi::api::authorization::v1::SubjectAccessReview =
        match json_body(req).await {
            Ok(r) => r,
            Err(r) => return r,
        };
    let user = review.spec.user.clone().unwrap_or_default();
    let attrs = review.spec.resource_attributes.clone().unwrap_or_default();
    let grant = (
        user,
        attrs.verb.unwrap_or_default(),
        attrs.group.unwrap_or_default(),
        attrs.resource.unwrap_or_default(),
        attrs.namespace.unwrap_or_default(),
        attrs.name.unwrap_or_default(),
    );
    let allowed = sh.lock().grants.contains(&grant);
    let mut out = serde_json::to_value(&review).unwrap_or_default();
    out["apiVersion"] = json!("authorization.k8s.io/v1");
    out["kind"] = json!("SubjectAccessReview");
    out["status"] = if allowed {
        json!({"allowed": true, "reason": "RBAC: allowed by the test's grant"})
    } else {
        json!({"allowed": false})
    };
    (
        StatusCode::CREATED,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        format!("{out}\n"),
    )
        .into_response()
}

fn record(sh: &Shared, rv: u64, kind: &'static str, ev: &'static str, ns: String, object: Value) {
    let e = Event {
        rv,
        kind,
        namespace: ns,
        kind_of_event: ev,
        object,
    };
    sh.lock().log.push(e.clone());
    let _ = sh.events.send(e);
}

async fn handle(State(sh): State<Shared>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    let q = query(&req);
    {
        let mut st = sh.lock();
        let verb = match (req.method().as_str(), q.get("watch").map(String::as_str)) {
            ("GET", Some("true")) => "WATCH",
            ("GET", _) => "LIST",
            (m, _) => m,
        };
        st.requests.push(format!("{verb} {path}"));
        if st.down {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                status(503, "ServiceUnavailable", "the API server double is down"),
            );
        }
    }
    if path == TOKEN_REVIEWS {
        return token_review(&sh, req).await;
    }
    if path == ACCESS_REVIEWS {
        return access_review(&sh, req).await;
    }
    let Some(r) = route(&path) else {
        return answer(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                &format!("{path}: not served by the double"),
            ),
        );
    };
    let (prefix, _, kind, _) = KINDS[r.kind];
    if sh.lock().forbidden.contains(kind) {
        return answer(
            StatusCode::FORBIDDEN,
            status(
                403,
                "Forbidden",
                &format!("{path}: the client may not use {kind} (RBAC)"),
            ),
        );
    }
    if sh.lock().unserved.contains(kind) {
        return answer(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                &format!("{path}: {kind} is not served (no CRD)"),
            ),
        );
    }
    if let Some(name) = r.name.clone() {
        return item(&sh, req, kind, r.ns.unwrap_or_default(), name, r.status).await;
    }
    let ns = r.ns;
    if req.method() == axum::http::Method::POST {
        return create(&sh, req, kind, ns.unwrap_or_default()).await;
    }
    if req.method() != axum::http::Method::GET {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            status(
                405,
                "MethodNotAllowed",
                "collections: list, watch and create only",
            ),
        );
    }
    let matches = move |e_ns: &str| ns.as_deref().is_none_or(|n| n == e_ns);
    let selector: String = q.get("labelSelector").cloned().unwrap_or_default();
    // Kubernetes' selector forms meshfed uses: `key=value`, `key!=value`, `key`, `!key`.
    let selector = match meshfed_kube::selector::parse(&selector) {
        Ok(s) => s,
        Err(e) => {
            return answer(
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", &format!("labelSelector: {e}")),
            )
        }
    };
    let selected = move |v: &Value| {
        let labels: BTreeMap<String, String> = v["metadata"]["labels"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, x)| Some((k.clone(), x.as_str()?.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        selector.matches(&labels)
    };
    if q.get("watch").map(String::as_str) != Some("true") {
        let st = sh.lock();
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((k, n, _), v)| k == kind && matches(n) && selected(v))
            .map(|(_, v)| v.clone())
            .collect();
        return answer(
            StatusCode::OK,
            json!({"apiVersion": api_version(prefix), "kind": format!("{kind}List"),
                   "metadata": {"resourceVersion": st.rv.to_string()}, "items": items}),
        );
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(64);
    let mut live = sh.events.subscribe();
    let mut cut = sh.cut.subscribe();
    cut.borrow_and_update();
    let (backlog, expired) = {
        let st = sh.lock();
        // Down since the check above: this watch subscribed after the cut, so answer as down
        // (set_down sets the flag before it cuts, under this lock).
        if st.down {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                status(503, "ServiceUnavailable", "the API server double is down"),
            );
        }
        let expired = from < st.compacted;
        let backlog: Vec<Event> = st
            .log
            .iter()
            .filter(|e| {
                e.rv > from && e.kind == kind && matches(&e.namespace) && selected(&e.object)
            })
            .cloned()
            .collect();
        (backlog, expired)
    };
    let line = |e: &Event| format!("{}\n", json!({"type": e.kind_of_event, "object": e.object}));
    tokio::spawn(async move {
        if expired {
            let e = status(410, "Expired", &format!("too old resource version: {from}"));
            let _ = tx
                .send(Ok(format!("{}\n", json!({"type": "ERROR", "object": e}))))
                .await;
            return;
        }
        let mut last = from;
        for e in &backlog {
            last = e.rv;
            if tx.send(Ok(line(e))).await.is_err() {
                return;
            }
        }
        loop {
            tokio::select! {
                _ = cut.changed() => return,
                r = live.recv() => match r {
                    Ok(e) if e.rv > last && e.kind == kind && matches(&e.namespace) && selected(&e.object) => {
                        last = e.rv;
                        if tx.send(Ok(line(&e))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Fell behind: end the watch; the client resumes from its last version.
                    Err(_) => return,
                },
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap_or_else(|e| answer(StatusCode::INTERNAL_SERVER_ERROR, json!(e.to_string())))
}

impl ApiServer {
    /// Starts the double on a free loopback port, on its own runtime.
    pub fn start() -> Result<ApiServer> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let shared = Shared {
            store: Arc::new(Mutex::new(Store::default())),
            events: broadcast::channel(4096).0,
            cut: tokio::sync::watch::Sender::new(0),
        };
        let sh = shared.clone();
        let addr = rt.block_on(async move {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            let app = axum::Router::new().fallback(handle).with_state(sh);
            tokio::spawn(async move {
                let _ = axum::serve(l, app).await;
            });
            Ok::<_, anyhow::Error>(addr)
        })?;
        Ok(ApiServer { addr, shared, rt })
    }

    /// A kubeconfig naming this double, written to `path`.
    pub fn kubeconfig(&self, path: &Path) -> Result<PathBuf> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster:\n    server: http://{}\ncontexts:\n- name: double\n  context:\n    cluster: double\n    user: double\nusers:\n- name: double\n  user: {{}}\ncurrent-context: double\n",
            self.addr
        );
        std::fs::write(path, text)?;
        Ok(path.to_path_buf())
    }

    fn kind_of(v: &Value) -> Result<&'static str> {
        let k = v["kind"].as_str().context("the object has no kind")?;
        KINDS
            .iter()
            .find(|x| x.2 == k)
            .map(|x| x.2)
            .with_context(|| format!("the double does not serve {k}"))
    }

    fn record(&self, kind: &'static str, ev: &'static str, ns: String, object: Value) {
        let e = {
            let mut st = self.shared.lock();
            let e = Event {
                rv: st.rv,
                kind,
                namespace: ns,
                kind_of_event: ev,
                object,
            };
            st.log.push(e.clone());
            e
        };
        let _ = self.shared.events.send(e);
    }

    /// Creates or replaces an object (its JSON must follow the API); returns its version.
    pub fn apply(&self, mut v: Value) -> Result<u64> {
        let kind = Self::kind_of(&v)?;
        check(kind, &v)?;
        let ns = v["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = v["metadata"]["name"]
            .as_str()
            .context("the object has no metadata.name")?
            .to_string();
        let (rv, existed) = {
            let mut st = self.shared.lock();
            st.rv += 1;
            let rv = st.rv;
            v["metadata"]["resourceVersion"] = json!(rv.to_string());
            if v["metadata"]["uid"].is_null() {
                v["metadata"]["uid"] = json!(format!("uid-{kind}-{ns}-{name}"));
            }
            let existed = st
                .objects
                .insert((kind.to_string(), ns.clone(), name), v.clone())
                .is_some();
            (rv, existed)
        };
        self.record(kind, if existed { "MODIFIED" } else { "ADDED" }, ns, v);
        Ok(rv)
    }

    /// Deletes an object; `false` if there was none.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<bool> {
        let kind = KINDS
            .iter()
            .find(|x| x.2 == kind)
            .map(|x| x.2)
            .with_context(|| format!("the double does not serve {kind}"))?;
        let gone = {
            let mut st = self.shared.lock();
            let gone =
                st.objects
                    .remove(&(kind.to_string(), namespace.to_string(), name.to_string()));
            if gone.is_some() {
                st.rv += 1;
            }
            gone.map(|mut v| {
                v["metadata"]["resourceVersion"] = json!(st.rv.to_string());
                v
            })
        };
        match gone {
            Some(v) => {
                self.record(kind, "DELETED", namespace.to_string(), v);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Expires every version so far and ends open watches: they resume with a version that
    /// is now too old, get `410 Gone`, and must list again.
    pub fn compact(&self) {
        {
            let mut st = self.shared.lock();
            st.compacted = st.rv;
            st.log.clear();
        }
        self.shared.cut.send_modify(|n| *n += 1);
    }

    /// Whether `kind` is served (false: 404, as an API server without its CRD).
    pub fn set_served(&self, kind: &str, served: bool) {
        let mut st = self.shared.lock();
        if served {
            st.unserved.remove(kind);
        } else {
            st.unserved.insert(kind.to_string());
        }
    }

    /// Whether `kind` is forbidden to the client (403, as RBAC without a grant).
    pub fn set_forbidden(&self, kind: &str, forbidden: bool) {
        let mut st = self.shared.lock();
        if forbidden {
            st.forbidden.insert(kind.to_string());
        } else {
            st.forbidden.remove(kind);
        }
    }

    /// A service-account token the double's TokenReview will judge (replaces one of the same
    /// text).
    pub fn add_token(&self, token: &str, t: Token) {
        self.shared.lock().tokens.insert(token.to_string(), t);
    }

    /// Lets `user` do `verb` on `resource` (of API `group`) `namespace/name`, as far as the
    /// double's SubjectAccessReview says.
    pub fn allow(
        &self,
        user: &str,
        verb: &str,
        group: &str,
        resource: &str,
        namespace: &str,
        name: &str,
    ) {
        self.shared.lock().grants.insert((
            user.into(),
            verb.into(),
            group.into(),
            resource.into(),
            namespace.into(),
            name.into(),
        ));
    }

    /// Down: every request is answered 503 and open watches end. Up again: serves as before.
    pub fn set_down(&self, down: bool) {
        self.shared.lock().down = down;
        if down {
            self.shared.cut.send_modify(|n| *n += 1);
        }
    }

    /// The object `kind namespace/name`, if it exists.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .objects
            .get(&(kind.to_string(), namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Every object of `kind`.
    pub fn list(&self, kind: &str) -> Vec<Value> {
        self.shared
            .lock()
            .objects
            .iter()
            .filter(|((k, _, _), _)| k == kind)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// How many requests matched `LIST|WATCH|METHOD path-prefix` so far.
    pub fn requests(&self, prefix: &str) -> usize {
        self.shared
            .lock()
            .requests
            .iter()
            .filter(|r| r.starts_with(prefix))
            .count()
    }

    /// The runtime the double runs on (to run async checks beside it).
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }
}
