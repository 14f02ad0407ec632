//! Policy YAML: meshfed's `FailoverPolicy` and Istio's `DestinationRule`, several documents per
//! file. Every error names `file:line:column` and the field path.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{Distribute, FailoverPair, OnExpiryPolicy, Outlier, Policy, PriorityLabel};

/// Where a value sits in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    pub line: u64,
    pub column: u64,
}

impl At {
    pub(super) fn of<T>(s: &Spanned<T>) -> At {
        At {
            line: s.referenced.line(),
            column: s.referenced.column(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Document {
    api_version: Spanned<String>,
    kind: Spanned<String>,
    metadata: Metadata,
    #[allow(dead_code)]
    spec: serde::de::IgnoredAny,
}

/// Kubernetes object metadata. Fields meshfed does not use (uid, resourceVersion, ...) are
/// accepted so that `kubectl get -o yaml` output can be used as is.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Metadata {
    name: Spanned<String>,
    #[serde(default)]
    namespace: Option<Spanned<String>>,
}

/// One typed document: the kind's `spec`, the rest checked by [`Document`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct Doc<S> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[allow(dead_code)]
    metadata: serde::de::IgnoredAny,
    pub(super) spec: S,
}

/// The spec of a meshfed `FailoverPolicy` (meshfed.io/v1alpha1): how proxies of this
/// cluster order and weigh the endpoints of one host across localities, networks and
/// clusters. Its JSON schema is the CRD's (`meshfed crds`).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FailoverPolicySpec {
    /// The service's host, `<name>.<namespace>.svc.cluster.local` (a short name is completed
    /// with the namespace).
    #[schemars(with = "String")]
    host: Spanned<String>,
    /// Istio's `failoverPriority`: labels, or `label=value`, in order.
    #[serde(default)]
    #[schemars(with = "Option<Vec<String>>")]
    failover_priority: Option<Spanned<Vec<Spanned<String>>>>,
    /// Region pairs, as Istio's `localityLbSetting.failover`.
    #[serde(default)]
    #[schemars(with = "Option<Vec<FailoverSpec>>")]
    failover: Option<Spanned<Vec<Spanned<FailoverSpec>>>>,
    /// Weighted traffic from a locality to localities, as Istio's
    /// `localityLbSetting.distribute`.
    #[serde(default)]
    #[schemars(with = "Option<Vec<DistributeSpec>>")]
    distribute: Option<Spanned<Vec<Spanned<DistributeSpec>>>>,
    /// The health signal, as Istio's `outlierDetection` (required with failover).
    #[serde(default)]
    #[schemars(with = "Option<OutlierSpec>")]
    outlier_detection: Option<Spanned<OutlierSpec>>,
    /// What proxies do with the endpoints of a cluster whose lease expired; overrides the
    /// exporter's setting.
    #[serde(default)]
    staleness: Option<StalenessSpec>,
    /// Accept failover without `outlierDetection`.
    #[serde(default)]
    allow_without_health_signal: bool,
    /// Attach the policy to this cluster's export of `host`, so every importer applies it.
    #[serde(default)]
    publish: bool,
    /// Named groups of the host's endpoints by label, as Istio's DestinationRule `subsets`:
    /// each has its own clusters (`outbound|<port>|<subset>|<host>`) and failover tables.
    #[serde(default)]
    #[schemars(with = "Option<Vec<SubsetSpec>>")]
    subsets: Option<Vec<Spanned<SubsetSpec>>>,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SubsetSpec {
    /// A DNS label (it is part of cluster names and SNI).
    #[schemars(with = "String")]
    name: Spanned<String>,
    /// The labels an endpoint must carry to be in the subset.
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct StalenessSpec {
    /// `deprioritize` (rank last) or `withdraw` (leave out).
    on_expiry: OnExpirySpec,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
enum OnExpirySpec {
    Deprioritize,
    Withdraw,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct FailoverSpec {
    /// A region.
    #[schemars(with = "String")]
    from: Spanned<String>,
    /// The region to fail over to.
    #[schemars(with = "String")]
    to: Spanned<String>,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct DistributeSpec {
    /// A locality, `region/zone/subzone`, `*` as a wildcard.
    #[schemars(with = "String")]
    from: Spanned<String>,
    /// Localities and their weights.
    #[schemars(with = "BTreeMap<String, u32>")]
    to: Spanned<BTreeMap<String, Spanned<u32>>>,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct OutlierSpec {
    #[serde(default)]
    consecutive_5xx_errors: Option<u32>,
    #[serde(default)]
    consecutive_gateway_errors: Option<u32>,
    /// A duration (`10s`, `1m`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    interval: Option<Spanned<String>>,
    /// A duration (`30s`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    base_ejection_time: Option<Spanned<String>>,
    #[serde(default)]
    #[schemars(with = "Option<u32>")]
    max_ejection_percent: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct DestinationRuleSpec {
    host: Spanned<String>,
    #[serde(default)]
    traffic_policy: Option<TrafficPolicySpec>,
    #[serde(default)]
    subsets: Option<Vec<Spanned<SubsetSpec>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TrafficPolicySpec {
    #[serde(default)]
    load_balancer: Option<LoadBalancerSpec>,
    #[serde(default)]
    outlier_detection: Option<Spanned<OutlierSpec>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LoadBalancerSpec {
    /// meshfed's clusters are ROUND_ROBIN: that (or UNSPECIFIED) is accepted, anything else
    /// refused by name rather than ignored.
    #[serde(default)]
    simple: Option<Spanned<SimpleLb>>,
    #[serde(default)]
    locality_lb_setting: Option<LocalityLbSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum SimpleLb {
    Unspecified,
    RoundRobin,
    LeastRequest,
    LeastConn,
    Random,
    Passthrough,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LocalityLbSpec {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    failover_priority: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    failover: Option<Spanned<Vec<Spanned<FailoverSpec>>>>,
    #[serde(default)]
    distribute: Option<Spanned<Vec<Spanned<DistributeSpec>>>>,
}

/// A located error: `what:line:column: field: message`.
pub(super) fn located(what: &str, at: At, field: &str, msg: impl std::fmt::Display) -> String {
    if field.is_empty() {
        format!("{what}:{}:{}: {msg}", at.line, at.column)
    } else {
        format!("{what}:{}:{}: {field}: {msg}", at.line, at.column)
    }
}

/// serde-saphyr's message without its own location suffix or snippet.
pub(super) fn saphyr_error(what: &str, doc: &str, e: &serde_saphyr::Error) -> String {
    let full = e.to_string();
    let first = full.lines().next().unwrap_or("invalid YAML").trim();
    let msg = match first.find(" at line ") {
        Some(i) => &first[..i],
        None => first,
    };
    let msg = msg.strip_prefix("error: ").unwrap_or(msg);
    // "line N column M: " repeats the location (relative to the document).
    let msg = match msg.strip_prefix("line ").and_then(|r| r.split_once(": ")) {
        Some((pos, rest)) if pos.contains(" column ") => rest,
        _ => msg,
    };
    let msg = plain_message(msg);
    let msg = msg.as_str();
    match e.location() {
        Some(l) if l.line() > 0 => {
            let path = path_at(doc, l.line() as usize);
            let path = if path.is_empty() {
                String::new()
            } else {
                format!("{path}: ")
            };
            format!("{what}:{}:{}: {path}{msg}", l.line(), l.column())
        }
        _ => format!("{what}: {msg}"),
    }
}

/// The parser's wording in a user's terms: a number type is "a whole number", a duplicate key
/// is said without the parser's option names.
fn plain_message(msg: &str) -> String {
    if let Some(t) = msg.strip_prefix("invalid ") {
        if ["u8", "u16", "u32", "u64"].contains(&t) {
            return "expected a whole number of 0 or more".into();
        }
        if ["i8", "i16", "i32", "i64"].contains(&t) {
            return "expected a whole number".into();
        }
    }
    if let Some(rest) = msg.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(',').next().unwrap_or(rest).trim();
        return format!("the key {key:?} appears twice in this mapping");
    }
    msg.to_string()
}

/// The block-style key path of `line` (1-based) in `doc`: `spec.failover[0].to`. Flow-style
/// parts of the line itself are not descended into.
pub fn path_at(doc: &str, line: usize) -> String {
    let lines: Vec<&str> = doc.lines().collect();
    if line == 0 || line > lines.len() {
        return String::new();
    }
    // (indent, segment) from the line upwards, each parent strictly less indented.
    let mut parts: Vec<String> = Vec::new();
    let mut limit = usize::MAX;
    let mut i = line;
    while i > 0 {
        let l = lines[i - 1];
        i -= 1;
        let t = l.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let indent = l.len() - t.len();
        if indent >= limit {
            continue;
        }
        if let Some(item) = t
            .strip_prefix("- ")
            .or(if t == "-" { Some("") } else { None })
        {
            // A sequence item: count earlier items at this indent under the same parent.
            let mut n = 0;
            for p in lines[..i].iter().rev() {
                let pt = p.trim_start();
                if pt.is_empty() || pt.starts_with('#') {
                    continue;
                }
                let pi = p.len() - pt.len();
                if pi < indent || (pi == indent && !pt.starts_with('-')) {
                    break;
                }
                if pi == indent {
                    n += 1;
                }
            }
            if let Some(k) = key_of(item) {
                if i + 1 == line {
                    parts.push(k);
                }
            }
            parts.push(format!("[{n}]"));
            // The key inside `- key:` is one level deeper than the dash.
            limit = indent;
            continue;
        }
        if let Some(k) = key_of(t) {
            parts.push(k);
        }
        limit = indent;
    }
    parts.reverse();
    let mut out = String::new();
    for p in parts {
        if !p.starts_with('[') && !out.is_empty() {
            out.push('.');
        }
        out.push_str(&p);
    }
    out
}

fn key_of(t: &str) -> Option<String> {
    let (k, _) = t.split_once(':')?;
    let k = k.trim().trim_matches('"').trim_matches('\'');
    if k.is_empty() || k.contains(' ') || k.starts_with('{') || k.starts_with('[') {
        return None;
    }
    Some(k.to_string())
}

pub(super) fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_anchors: 100,
            max_depth: 64,
        },
    }
}

/// Parses one YAML document of any type with located errors (`what:line:column: path: msg`).
pub fn parse_yaml<T: serde::de::DeserializeOwned>(text: &str, what: &str) -> Result<T, String> {
    serde_saphyr::from_str_with_options(text, options()).map_err(|e| saphyr_error(what, text, &e))
}

/// Splits a multi-document stream into (first line number, text) per document, so that each
/// document can be typed by its own `kind` and errors keep file line numbers.
fn documents(text: &str) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut start = 1u64;
    for (i, line) in text.lines().enumerate() {
        let is_marker = line == "---" || line.starts_with("--- ") || line.starts_with("---\t");
        if is_marker {
            out.push((start, std::mem::take(&mut cur)));
            start = i as u64 + 2;
            // Content after the marker on the same line belongs to the new document; keep the
            // columns by blanking the marker.
            let rest = &line[3..];
            if !rest.trim().is_empty() && !rest.trim_start().starts_with('#') {
                cur.push_str("   ");
                cur.push_str(rest);
                cur.push('\n');
                start = i as u64 + 1;
            }
            continue;
        }
        if line == "..." {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    out.push((start, cur));
    out.into_iter()
        .filter(|(_, d)| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// Shifts a located error from document-relative to file lines.
fn shift(e: String, what: &str, offset: u64) -> String {
    let prefix = format!("{what}:");
    let Some(rest) = e.strip_prefix(&prefix) else {
        return e;
    };
    let Some((line, tail)) = rest.split_once(':') else {
        return e;
    };
    match line.parse::<u64>() {
        Ok(n) => format!("{what}:{}:{tail}", n + offset),
        Err(_) => e,
    }
}

/// One document of a policy file.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// A `FailoverPolicy` or `DestinationRule`.
    Policy(Policy),
    /// A `VirtualService`.
    Routes(super::routes::Routes),
}

/// Parses every failover policy in `text`; `what` names the source in errors (a file path).
/// A `VirtualService` is refused (where only policies belong: a published policy). Returns all
/// the errors found, one per line, or the policies.
pub fn parse(text: &str, what: &str) -> Result<Vec<(Policy, At)>, String> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (p, at) in parse_all(text, what)? {
        match p {
            Parsed::Policy(p) => out.push((p, at)),
            Parsed::Routes(r) => errors.push(format!(
                "{what}:{}:{}: VirtualService {}/{}: routes are not a failover policy (they are the importing cluster's own, never published)",
                at.line, at.column, r.namespace, r.name
            )),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors.join("\n"))
    }
}

/// Parses every document in `text`: policies and routes.
pub fn parse_all(text: &str, what: &str) -> Result<Vec<(Parsed, At)>, String> {
    if text.len() > super::MAX_POLICY_FILE_BYTES {
        return Err(format!(
            "{what}: {} bytes is more than the {} bytes a policy file may have",
            text.len(),
            super::MAX_POLICY_FILE_BYTES
        ));
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (start, doc) in documents(text) {
        match parse_document(&doc, what) {
            Ok((p, mut at)) => {
                at.line += start - 1;
                out.push((p, at));
            }
            Err(e) => errors.push(shift(e, what, start - 1)),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors.join("\n"))
    }
}

fn parse_document(doc: &str, what: &str) -> Result<(Parsed, At), String> {
    let head: Document = serde_saphyr::from_str_with_options(doc, options())
        .map_err(|e| saphyr_error(what, doc, &e))?;
    let kind = head.kind.value.as_str();
    let api = head.api_version.value.as_str();
    let name = head.metadata.name.value.clone();
    let namespace = head
        .metadata
        .namespace
        .as_ref()
        .map(|n| n.value.clone())
        .unwrap_or_else(|| "default".into());
    crate::validate::check_label("metadata.name", &name)
        .map_err(|e| located(what, At::of(&head.metadata.name), "", e))?;
    crate::validate::check_label("metadata.namespace", &namespace).map_err(|e| {
        located(
            what,
            head.metadata
                .namespace
                .as_ref()
                .map(At::of)
                .unwrap_or(At::of(&head.metadata.name)),
            "",
            e,
        )
    })?;
    match (api, kind) {
        ("meshfed.io/v1alpha1", "FailoverPolicy") => {
            let d: Doc<FailoverPolicySpec> = serde_saphyr::from_str_with_options(doc, options())
                .map_err(|e| saphyr_error(what, doc, &e))?;
            let s = d.spec;
            let host = check_host(what, &s.host, &namespace)?;
            let mut p = Policy {
                name,
                namespace,
                host,
                origin: String::new(),
                enabled: true,
                failover_priority: priorities(what, "spec.failoverPriority", &s.failover_priority)?,
                failover: failovers(what, "spec.failover", &s.failover)?,
                distribute: distributes(what, "spec.distribute", &s.distribute)?,
                outlier: outlier(what, "spec.outlierDetection", &s.outlier_detection)?,
                on_expiry: s.staleness.map(|st| match st.on_expiry {
                    OnExpirySpec::Deprioritize => OnExpiryPolicy::Deprioritize,
                    OnExpirySpec::Withdraw => OnExpiryPolicy::Withdraw,
                }),
                allow_without_health_signal: s.allow_without_health_signal,
                publish: s.publish,
                subsets: subsets(what, "spec.subsets", &s.subsets)?,
            };
            check_combination(
                what,
                "spec",
                &mut p,
                s.failover_priority.as_ref().map(At::of),
                s.failover.as_ref().map(At::of),
                s.distribute.as_ref().map(At::of),
            )?;
            Ok((Parsed::Policy(p), At::of(&s.host)))
        }
        (
            "networking.istio.io/v1" | "networking.istio.io/v1beta1"
            | "networking.istio.io/v1alpha3",
            "DestinationRule",
        ) => {
            let d: Doc<DestinationRuleSpec> = serde_saphyr::from_str_with_options(doc, options())
                .map_err(|e| saphyr_error(what, doc, &e))?;
            let s = d.spec;
            let host = check_host(what, &s.host, &namespace)?;
            let tp = s.traffic_policy;
            let lb = tp
                .as_ref()
                .and_then(|t| t.load_balancer.as_ref())
                .and_then(|l| l.locality_lb_setting.as_ref());
            let base = "spec.trafficPolicy.loadBalancer.localityLbSetting";
            if let Some(simple) = tp
                .as_ref()
                .and_then(|t| t.load_balancer.as_ref())
                .and_then(|l| l.simple.as_ref())
                .filter(|v| !matches!(v.value, SimpleLb::RoundRobin | SimpleLb::Unspecified))
            {
                return Err(located(
                    what,
                    At::of(simple),
                    "spec.trafficPolicy.loadBalancer.simple",
                    format!(
                        "{:?} is not applied by meshfed, whose clusters are ROUND_ROBIN: use ROUND_ROBIN or leave it out",
                        simple.value
                    ),
                ));
            }
            let od = tp.as_ref().and_then(|t| t.outlier_detection.as_ref());
            let mut p = Policy {
                name,
                namespace,
                host,
                origin: String::new(),
                enabled: lb.and_then(|l| l.enabled).unwrap_or(true),
                failover_priority: priorities(
                    what,
                    &format!("{base}.failoverPriority"),
                    &lb.and_then(|l| l.failover_priority.clone()),
                )?,
                failover: failovers(what, &format!("{base}.failover"), &lb.and_then(|l| l.failover.clone()))?,
                distribute: distributes(what, &format!("{base}.distribute"), &lb.and_then(|l| l.distribute.clone()))?,
                outlier: outlier(what, "spec.trafficPolicy.outlierDetection", &od.cloned())?,
                on_expiry: None,
                allow_without_health_signal: false,
                publish: false,
                subsets: subsets(what, "spec.subsets", &s.subsets)?,
            };
            check_combination(
                what,
                base,
                &mut p,
                lb.and_then(|l| l.failover_priority.as_ref()).map(At::of),
                lb.and_then(|l| l.failover.as_ref()).map(At::of),
                lb.and_then(|l| l.distribute.as_ref()).map(At::of),
            )?;
            Ok((Parsed::Policy(p), At::of(&s.host)))
        }
        (
            "networking.istio.io/v1" | "networking.istio.io/v1beta1"
            | "networking.istio.io/v1alpha3",
            "VirtualService",
        ) => {
            let d: Doc<super::virtual_service::VirtualServiceSpec> =
                serde_saphyr::from_str_with_options(doc, options())
                    .map_err(|e| saphyr_error(what, doc, &e))?;
            let (r, at) = super::virtual_service::routes(d, what, name, namespace)?;
            Ok((Parsed::Routes(r), at))
        }
        ("meshfed.io/v1alpha1", _)
        | (_, "FailoverPolicy")
        | (_, "DestinationRule")
        | (_, "VirtualService") => Err(located(
            what,
            At::of(&head.kind),
            "",
            format!(
                "apiVersion {api:?} with kind {kind:?} is not a policy (expected meshfed.io/v1alpha1 FailoverPolicy, or networking.istio.io/v1 DestinationRule or VirtualService)"
            ),
        )),
        _ => Err(located(
            what,
            At::of(&head.kind),
            "kind",
            format!("{kind:?} is not a policy kind (FailoverPolicy, DestinationRule or VirtualService)"),
        )),
    }
}

/// Subsets: each name a DNS label, given once; label keys and values as Kubernetes labels.
fn subsets(
    what: &str,
    field: &str,
    v: &Option<Vec<Spanned<SubsetSpec>>>,
) -> Result<Vec<crate::policy::Subset>, String> {
    let mut out: Vec<crate::policy::Subset> = Vec::new();
    for (i, s) in v.iter().flatten().enumerate() {
        let name = &s.value.name;
        if !crate::validate::is_dns_label(&name.value) {
            return Err(located(
                what,
                At::of(name),
                &format!("{field}[{i}].name"),
                format!(
                    "{:?} is not a DNS label (a subset name is part of cluster names and SNI)",
                    name.value
                ),
            ));
        }
        if out.iter().any(|o| o.name == name.value) {
            return Err(located(
                what,
                At::of(name),
                &format!("{field}[{i}].name"),
                format!("subset {:?} is given twice", name.value),
            ));
        }
        for (k, val) in &s.value.labels {
            if !is_label_key(k) || !is_label_value(val) {
                return Err(located(
                    what,
                    At::of(s),
                    &format!("{field}[{i}].labels"),
                    format!("{k}={val:?} is not a Kubernetes label"),
                ));
            }
        }
        out.push(crate::policy::Subset {
            name: name.value.clone(),
            labels: s.value.labels.clone(),
        });
    }
    Ok(out)
}

/// A short host (`reviews`) is completed with the policy's namespace, as Istio does.
fn check_host(what: &str, h: &Spanned<String>, namespace: &str) -> Result<String, String> {
    check_host_at(what, h, namespace, "spec.host")
}

/// A service host: a short name (completed with `namespace`) or a DNS name, no wildcard.
pub(super) fn check_host_at(
    what: &str,
    h: &Spanned<String>,
    namespace: &str,
    field: &str,
) -> Result<String, String> {
    let v = h.value.trim_end_matches('.');
    if v.contains('*') {
        return Err(located(
            what,
            At::of(h),
            field,
            format!("{v:?}: wildcard hosts are not supported; name one service"),
        ));
    }
    let full = if v.contains('.') {
        v.to_string()
    } else {
        format!("{v}.{namespace}.svc.cluster.local")
    };
    if full.len() > 253 || !full.split('.').all(crate::validate::is_dns_label) {
        return Err(located(
            what,
            At::of(h),
            field,
            format!("{:?} is not a DNS name", h.value),
        ));
    }
    Ok(full)
}

fn priorities(
    what: &str,
    field: &str,
    v: &Option<Spanned<Vec<Spanned<String>>>>,
) -> Result<Vec<PriorityLabel>, String> {
    let mut out = Vec::new();
    for (i, e) in v.iter().flat_map(|v| v.value.iter()).enumerate() {
        let (k, val) = match e.value.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (e.value.as_str(), None),
        };
        if !is_label_key(k) {
            return Err(located(
                what,
                At::of(e),
                &format!("{field}[{i}]"),
                format!("{k:?} is not a label key"),
            ));
        }
        if out.iter().any(|p: &PriorityLabel| p.key == k) {
            return Err(located(
                what,
                At::of(e),
                &format!("{field}[{i}]"),
                format!("label {k:?} is listed twice"),
            ));
        }
        out.push(PriorityLabel {
            key: k.to_string(),
            value: val,
        });
    }
    Ok(out)
}

/// A Kubernetes label value: empty, or up to 63 alphanumerics, `-`, `_` and `.`, beginning
/// and ending with an alphanumeric.
fn is_label_value(v: &str) -> bool {
    v.is_empty()
        || (v.len() <= 63
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric())
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
}

fn is_label_key(k: &str) -> bool {
    let name = k.rsplit('/').next().unwrap_or(k);
    !k.is_empty()
        && k.len() <= 317
        && !name.is_empty()
        && name.len() <= 63
        && k.matches('/').count() <= 1
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn failovers(
    what: &str,
    field: &str,
    v: &Option<Spanned<Vec<Spanned<FailoverSpec>>>>,
) -> Result<Vec<FailoverPair>, String> {
    let mut out: Vec<FailoverPair> = Vec::new();
    for (i, e) in v.iter().flat_map(|v| v.value.iter()).enumerate() {
        let f = format!("{field}[{i}]");
        for (which, s) in [("from", &e.value.from), ("to", &e.value.to)] {
            if s.value.is_empty() || s.value.contains('*') || s.value.contains('/') {
                return Err(located(
                    what,
                    At::of(s),
                    &format!("{f}.{which}"),
                    format!(
                        "{:?} is not a region (failover is between regions: no '/', no '*')",
                        s.value
                    ),
                ));
            }
        }
        if e.value.from.value == e.value.to.value {
            return Err(located(
                what,
                At::of(&e.value.to),
                &format!("{f}.to"),
                format!(
                    "failover from {0:?} to {0:?}: from and to must be different regions",
                    e.value.to.value
                ),
            ));
        }
        if out.iter().any(|p| p.from == e.value.from.value) {
            return Err(located(
                what,
                At::of(&e.value.from),
                &format!("{f}.from"),
                format!(
                    "region {:?} already has a failover entry",
                    e.value.from.value
                ),
            ));
        }
        out.push(FailoverPair {
            from: e.value.from.value.clone(),
            to: e.value.to.value.clone(),
        });
    }
    Ok(out)
}

/// Istio's locality pattern rules: `region[/zone[/subzone]]`, no empty part, one `*` allowed
/// only as the last character.
pub fn check_locality_pattern(p: &str) -> Result<(), String> {
    if p == "*" {
        return Ok(());
    }
    if p.is_empty() {
        return Err("empty locality".into());
    }
    let parts: Vec<&str> = p.split('/').collect();
    if parts.len() > 3 {
        return Err(format!("{p:?} has more than region/zone/subzone"));
    }
    if parts.iter().any(|x| x.is_empty()) {
        return Err(format!("{p:?} has an empty region, zone or subzone"));
    }
    if p.contains('*') && (p.matches('*').count() > 1 || !p.ends_with("/*")) {
        return Err(format!(
            "{p:?}: a wildcard is allowed only as a whole last part (\"region/*\")"
        ));
    }
    Ok(())
}

fn distributes(
    what: &str,
    field: &str,
    v: &Option<Spanned<Vec<Spanned<DistributeSpec>>>>,
) -> Result<Vec<Distribute>, String> {
    let mut out: Vec<Distribute> = Vec::new();
    for (i, e) in v.iter().flat_map(|v| v.value.iter()).enumerate() {
        let f = format!("{field}[{i}]");
        check_locality_pattern(&e.value.from.value)
            .map_err(|m| located(what, At::of(&e.value.from), &format!("{f}.from"), m))?;
        if out.iter().any(|d| d.from == e.value.from.value) {
            return Err(located(
                what,
                At::of(&e.value.from),
                &format!("{f}.from"),
                format!("{:?} already has a distribute entry", e.value.from.value),
            ));
        }
        if e.value.to.value.is_empty() {
            return Err(located(
                what,
                At::of(&e.value.to),
                &format!("{f}.to"),
                "no destination localities",
            ));
        }
        let mut total: u64 = 0;
        let mut to = Vec::new();
        for (pat, w) in &e.value.to.value {
            check_locality_pattern(pat)
                .map_err(|m| located(what, At::of(w), &format!("{f}.to[{pat:?}]"), m))?;
            if w.value > 100 {
                return Err(located(
                    what,
                    At::of(w),
                    &format!("{f}.to[{pat:?}]"),
                    format!("weight {} is more than 100", w.value),
                ));
            }
            total += u64::from(w.value);
            to.push((pat.clone(), w.value));
        }
        if total != 100 {
            return Err(located(
                what,
                At::of(&e.value.to),
                &format!("{f}.to"),
                format!("weights sum to {total}, not 100"),
            ));
        }
        // Most specific pattern first: a locality matched by several patterns counts for the
        // most specific one (Istio's Go map order makes this random).
        to.sort_by(|a, b| {
            specificity(&b.0)
                .cmp(&specificity(&a.0))
                .then(a.0.cmp(&b.0))
        });
        out.push(Distribute {
            from: e.value.from.value.clone(),
            to,
        });
    }
    Ok(out)
}

fn specificity(p: &str) -> (usize, bool) {
    (p.split('/').filter(|x| *x != "*").count(), !p.contains('*'))
}

/// A duration in milliseconds, at least 1 ms: Go's form (`100ms`, `1m30s`) or protobuf
/// JSON's (`1.5s`), both of which Istio's objects carry.
pub(super) fn duration(
    what: &str,
    field: &str,
    v: &Option<Spanned<String>>,
) -> Result<Option<u64>, String> {
    let Some(v) = v else { return Ok(None) };
    let text = v.value.trim();
    let fractional_secs = text
        .strip_suffix('s')
        .filter(|n| !n.ends_with('m') && n.contains('.'))
        .and_then(|n| n.parse::<f64>().ok())
        .filter(|secs| secs.is_finite() && *secs >= 0.0);
    let ms = match fractional_secs {
        Some(secs) => (secs * 1000.0).round() as u64,
        None => {
            let d = humantime::parse_duration(text).map_err(|e| {
                located(
                    what,
                    At::of(v),
                    field,
                    format!(
                        "{:?} is not a duration ({e}); write e.g. 10s, 1.5s or 500ms",
                        v.value
                    ),
                )
            })?;
            d.as_millis().min(u128::from(u64::MAX)) as u64
        }
    };
    if ms == 0 {
        return Err(located(what, At::of(v), field, "must be at least 1ms"));
    }
    Ok(Some(ms))
}

fn outlier(
    what: &str,
    field: &str,
    v: &Option<Spanned<OutlierSpec>>,
) -> Result<Option<Outlier>, String> {
    let Some(o) = v else { return Ok(None) };
    if let Some(m) = &o.value.max_ejection_percent {
        if m.value > 100 {
            return Err(located(
                what,
                At::of(m),
                &format!("{field}.maxEjectionPercent"),
                format!("{} is more than 100", m.value),
            ));
        }
    }
    Ok(Some(Outlier {
        consecutive_5xx_errors: o.value.consecutive_5xx_errors,
        consecutive_gateway_errors: o.value.consecutive_gateway_errors,
        interval_ms: duration(what, &format!("{field}.interval"), &o.value.interval)?,
        base_ejection_time_ms: duration(
            what,
            &format!("{field}.baseEjectionTime"),
            &o.value.base_ejection_time,
        )?,
        max_ejection_percent: o.value.max_ejection_percent.as_ref().map(|m| m.value),
    }))
}

fn check_combination(
    what: &str,
    base: &str,
    p: &mut Policy,
    fp_at: Option<At>,
    fo_at: Option<At>,
    di_at: Option<At>,
) -> Result<(), String> {
    if let Some(at) = di_at {
        if !p.distribute.is_empty() && (!p.failover.is_empty() || !p.failover_priority.is_empty()) {
            return Err(located(
                what,
                at,
                &format!("{base}.distribute"),
                "distribute cannot be combined with failover or failoverPriority (Istio would silently apply only distribute)",
            ));
        }
    }
    let failover_at = fp_at
        .filter(|_| !p.failover_priority.is_empty())
        .or(fo_at.filter(|_| !p.failover.is_empty()));
    if let Some(at) = failover_at {
        if p.enabled && p.outlier.is_none() && !p.allow_without_health_signal {
            let which = if p.failover_priority.is_empty() {
                "failover"
            } else {
                "failoverPriority"
            };
            return Err(located(
                what,
                at,
                &format!("{base}.{which}"),
                format!(
                    "{which} needs a health signal but outlierDetection is missing: without it Envoy never moves traffic to a lower priority (Istio silently ignores the setting). Add outlierDetection{}",
                    if base == "spec" { ", or set allowWithoutHealthSignal: true" } else { "" }
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::PolicySet;
    use super::*;

    pub const GOOD: &str = "\
apiVersion: meshfed.io/v1alpha1
kind: FailoverPolicy
metadata:
  name: payment
  namespace: shop
spec:
  host: payment.shop.svc.cluster.local
  failoverPriority:
    - topology.istio.io/network
    - topology.kubernetes.io/region
  failover:
    - {from: us-east1, to: us-west1}
  outlierDetection:
    consecutive5xxErrors: 3
    interval: 1s
    baseEjectionTime: 30s
    maxEjectionPercent: 100
  staleness: {onExpiry: withdraw}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: shop
  resourceVersion: \"12\"
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        distribute:
          - from: us-east1/*
            to:
              \"us-east1/*\": 80
              \"us-west1/*\": 20
";

    fn err(yaml: &str) -> String {
        let e = parse(yaml, "p.yaml").unwrap_err();
        assert!(!e.contains('\n'), "one line per error: {e}");
        e
    }

    #[test]
    fn parses_both_kinds_in_one_file() {
        let ps = parse(GOOD, "p.yaml").unwrap();
        assert_eq!(ps.len(), 2);
        let (fp, at) = &ps[0];
        assert_eq!(at.line, 7);
        assert_eq!(fp.failover_priority.len(), 2);
        assert_eq!(fp.outlier.as_ref().unwrap().interval_ms, Some(1000));
        assert_eq!(fp.on_expiry, Some(OnExpiryPolicy::Withdraw));
        let (dr, at) = &ps[1];
        assert_eq!(dr.host, "reviews.shop.svc.cluster.local");
        assert_eq!(at.line, 27, "lines count from the top of the file");
        assert_eq!(dr.distribute[0].to[0], ("us-east1/*".to_string(), 80));
        assert!(!dr.failover_enabled());
    }

    #[test]
    fn durations_are_read_in_gos_and_protobufs_forms() {
        for (v, ms) in [
            ("1.5s", 1500),
            ("0.25s", 250),
            ("1m30s", 90_000),
            ("500ms", 500),
        ] {
            let y = GOOD.replace("interval: 1s", &format!("interval: {v}"));
            let ps = parse(&y, "p.yaml").unwrap();
            assert_eq!(
                ps[0].0.outlier.as_ref().unwrap().interval_ms,
                Some(ms),
                "{v}"
            );
        }
        let e = err(&GOOD.replace("interval: 1s", "interval: 0.0001s"));
        assert!(
            e.contains("spec.outlierDetection.interval: must be at least 1ms"),
            "{e}"
        );
        let e = err(&GOOD.replace("interval: 1s", "interval: 1.5.s"));
        assert!(e.contains("\"1.5.s\" is not a duration"), "{e}");
    }

    #[test]
    fn distribute_weights_must_sum_to_100() {
        let y = GOOD.replace("\"us-west1/*\": 20", "\"us-west1/*\": 10");
        let e = err(&y);
        assert!(e.starts_with("p.yaml:35:"), "{e}");
        assert!(
            e.contains("spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to: weights sum to 90, not 100"),
            "{e}"
        );
    }

    #[test]
    fn failover_from_equal_to_is_refused() {
        let y = GOOD.replace(
            "{from: us-east1, to: us-west1}",
            "{from: us-east1, to: us-east1}",
        );
        let e = err(&y);
        assert!(e.starts_with("p.yaml:12:"), "{e}");
        assert!(e.contains("spec.failover[0].to"), "{e}");
    }

    #[test]
    fn malformed_locality_patterns_are_refused() {
        for bad in ["us-east1/*/a", "us-*", "a//b", "a/b/c/d"] {
            let y = GOOD.replace("- from: us-east1/*", &format!("- from: \"{bad}\""));
            let e = err(&y);
            assert!(e.starts_with("p.yaml:33:"), "{bad}: {e}");
            assert!(e.contains("distribute[0].from"), "{e}");
        }
    }

    #[test]
    fn unknown_fields_are_named_with_their_place() {
        let y = GOOD.replace("    interval: 1s", "    intervall: 1s");
        let e = err(&y);
        assert!(
            e.starts_with("p.yaml:15:5: spec.outlierDetection.intervall: unknown field"),
            "{e}"
        );
        let y = GOOD.replace("      simple: ROUND_ROBIN", "      connectionPool: {}");
        let e = err(&y);
        assert!(e.contains("connectionPool"), "{e}");
        // A load-balancing algorithm meshfed does not apply is refused by name, not ignored;
        // the one it applies is accepted.
        for other in ["LEAST_REQUEST", "RANDOM", "PASSTHROUGH", "LEAST_CONN"] {
            let y = GOOD.replace(
                "      simple: ROUND_ROBIN",
                &format!("      simple: {other}"),
            );
            let e = err(&y);
            assert!(
                e.contains("spec.trafficPolicy.loadBalancer.simple: ")
                    && e.contains("is not applied by meshfed"),
                "{other}: {e}"
            );
            assert!(e.starts_with("p.yaml:"), "{e}");
        }
    }

    #[test]
    fn failover_without_a_health_signal_is_refused_unless_allowed() {
        let start = GOOD.find("  outlierDetection:").unwrap();
        let end = GOOD.find("  staleness").unwrap();
        let y = format!("{}{}", &GOOD[..start], &GOOD[end..]);
        let e = err(&y);
        assert!(e.starts_with("p.yaml:9:"), "{e}");
        assert!(
            e.contains("spec.failoverPriority") && e.contains("outlierDetection is missing"),
            "{e}"
        );
        let y = y.replace(
            "  staleness",
            "  allowWithoutHealthSignal: true\n  staleness",
        );
        let ps = parse(&y, "p.yaml").unwrap();
        assert!(ps[0].0.failover_enabled());
    }

    #[test]
    fn two_policies_for_one_host_are_refused() {
        let second = GOOD.split("---\n").next().unwrap();
        let e = PolicySet::from_sources(&[
            ("a.yaml".into(), GOOD.into()),
            ("b.yaml".into(), second.into()),
        ])
        .unwrap_err();
        assert!(e.starts_with("b.yaml:7:9: spec.host"), "{e}");
        assert!(e.contains("a.yaml:7:9"), "{e}");
    }

    #[test]
    fn syntax_and_type_errors_are_located() {
        let e = err("apiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: x}\nspec:\n  host: [a\n");
        assert!(e.starts_with("p.yaml:"), "{e}");
        let y = GOOD.replace("consecutive5xxErrors: 3", "consecutive5xxErrors: many");
        let e = err(&y);
        assert!(
            e.starts_with("p.yaml:14:27: spec.outlierDetection.consecutive5xxErrors: "),
            "{e}"
        );
        let e = err("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {}\n");
        assert!(e.contains("\"Service\" is not a policy kind"), "{e}");
    }
}

#[cfg(test)]
#[test]
fn paths_follow_block_structure() {
    let d =
        "spec:\n  failover:\n    - from: a\n      to: b\n    - from: c\n      to: d\n  host: x\n";
    assert_eq!(path_at(d, 6), "spec.failover[1].to");
    assert_eq!(path_at(d, 5), "spec.failover[1].from");
    assert_eq!(path_at(d, 3), "spec.failover[0].from");
    assert_eq!(path_at(d, 7), "spec.host");
}

#[cfg(test)]
#[test]
fn mutated_policies_never_panic() {
    // Deterministic mutations of a valid file: byte flips, truncations, duplications. Every
    // outcome must be a policy or a located error.
    // With a VirtualService too: its routes are parsed by the same rules.
    let text = format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: p, namespace: shop}}\nspec:\n  hosts: [payment]\n  http:\n    - match: [{{headers: {{x-v: {{regex: \"v[12]\"}}}}, uri: {{prefix: /a}}, port: 80}}]\n      route:\n        - {{destination: {{host: payment, subset: v2, port: {{number: 80}}}}, weight: 5}}\n        - {{destination: {{host: payment}}, weight: 95}}\n      timeout: 2s\n",
        tests::GOOD
    );
    assert!(parse_all(&text, "m.yaml").is_ok());
    let base = text.as_bytes();
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..3000 {
        let mut b = base.to_vec();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() as usize) % b.len();
            match next() % 4 {
                0 => b[i] = (next() % 128) as u8,
                1 => b.truncate(i.max(1)),
                2 => {
                    let j = (next() as usize) % b.len();
                    let chunk: Vec<u8> = b[i.min(j)..i.max(j)].to_vec();
                    b.splice(i..i, chunk);
                }
                _ => {
                    b.remove(i);
                }
            }
            if b.is_empty() {
                b.push(b'a');
            }
        }
        let text = String::from_utf8_lossy(&b);
        if let Err(e) = parse_all(&text, "m.yaml") {
            assert!(e.starts_with("m.yaml"), "{e}");
        }
    }
}
