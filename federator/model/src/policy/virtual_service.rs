//! Istio's `VirtualService` (networking.istio.io v1, v1beta1, v1alpha3) read from policy files:
//! the `http` routes meshfed's xDS serves proxyless gRPC clients, whose features gRPC's xDS
//! client implements (gRFC A28 routing and weighted clusters, A31 timeouts). Every other field
//! is refused by name with `file:line:column`, never ignored.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::routes::{
    Destination, HttpRoute, Retries, RouteMatch, Routes, StringMatch, DEFAULT_RETRY_ON,
    GRPC_RETRY_ON,
};
use super::spec::{check_host_at, duration, located, At, Doc};

/// A field of Istio's schema that meshfed does not apply; its presence is an error.
type Refused = Option<Spanned<serde_json::Value>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct VirtualServiceSpec {
    hosts: Spanned<Vec<Spanned<String>>>,
    /// Only the mesh (`mesh`, or none): meshfed's routes are for the clients of its xDS.
    #[serde(default)]
    gateways: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    http: Vec<Spanned<HttpRouteSpec>>,
    #[serde(default)]
    tls: Refused,
    #[serde(default)]
    tcp: Refused,
    #[serde(default)]
    export_to: Refused,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpRouteSpec {
    #[serde(default)]
    name: Option<String>,
    #[serde(default, rename = "match")]
    matches: Vec<Spanned<MatchSpec>>,
    #[serde(default)]
    route: Vec<Spanned<RouteDestinationSpec>>,
    #[serde(default)]
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    redirect: Refused,
    #[serde(default)]
    direct_response: Refused,
    #[serde(default)]
    delegate: Refused,
    #[serde(default)]
    rewrite: Refused,
    #[serde(default)]
    retries: Option<Spanned<RetriesSpec>>,
    #[serde(default)]
    fault: Refused,
    #[serde(default)]
    mirror: Refused,
    #[serde(default)]
    mirrors: Refused,
    #[serde(default)]
    mirror_percentage: Refused,
    #[serde(default)]
    cors_policy: Refused,
    #[serde(default)]
    headers: Refused,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RetriesSpec {
    #[serde(default)]
    attempts: Option<Spanned<u32>>,
    #[serde(default)]
    retry_on: Option<Spanned<String>>,
    #[serde(default)]
    per_try_timeout: Refused,
    #[serde(default)]
    retry_remote_localities: Refused,
    #[serde(default)]
    retry_ignore_previous_hosts: Refused,
    #[serde(default)]
    backoff: Refused,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MatchSpec {
    #[serde(default)]
    #[allow(dead_code)]
    name: Option<String>,
    #[serde(default)]
    uri: Option<Spanned<StringMatchSpec>>,
    #[serde(default)]
    headers: BTreeMap<String, Spanned<StringMatchSpec>>,
    #[serde(default)]
    without_headers: BTreeMap<String, Spanned<StringMatchSpec>>,
    #[serde(default)]
    ignore_uri_case: Option<Spanned<bool>>,
    #[serde(default)]
    port: Option<Spanned<u32>>,
    #[serde(default)]
    scheme: Refused,
    #[serde(default)]
    method: Refused,
    #[serde(default)]
    authority: Refused,
    #[serde(default)]
    query_params: Refused,
    #[serde(default)]
    source_labels: Refused,
    #[serde(default)]
    source_namespace: Refused,
    #[serde(default)]
    gateways: Refused,
    #[serde(default)]
    stat_prefix: Refused,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StringMatchSpec {
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    regex: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteDestinationSpec {
    destination: Spanned<DestinationSpec>,
    #[serde(default)]
    weight: Option<Spanned<u32>>,
    #[serde(default)]
    headers: Refused,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationSpec {
    host: Spanned<String>,
    #[serde(default)]
    subset: Option<Spanned<String>>,
    #[serde(default)]
    port: Option<PortSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PortSpec {
    number: Spanned<u32>,
}

/// The error for the first refused field present, naming it and why.
fn refused(what: &str, base: &str, fields: &[(&str, &Refused, &str)]) -> Result<(), String> {
    for (name, v, why) in fields {
        if let Some(v) = v {
            return Err(located(
                what,
                At::of(v),
                &format!("{base}.{name}"),
                format!("not applied by meshfed's routes ({why}); remove it"),
            ));
        }
    }
    Ok(())
}

const NOT_GRPC: &str = "gRPC's xDS client does not implement it";

/// `withoutHeaders` entries one match may have.
pub const MAX_WITHOUT_HEADERS: usize = 4;

/// A `VirtualService` document of a policy file, `namespace` from its metadata.
pub(super) fn routes(
    doc: Doc<VirtualServiceSpec>,
    what: &str,
    name: String,
    namespace: String,
) -> Result<(Routes, At), String> {
    let s = doc.spec;
    refused(
        what,
        "spec",
        &[
            (
                "tls",
                &s.tls,
                "TLS routes are the east-west gateways' SNI routes",
            ),
            ("tcp", &s.tcp, "a proxyless client's routes are HTTP/2"),
            (
                "exportTo",
                &s.export_to,
                "routes apply to the clients of this cluster's xDS only",
            ),
        ],
    )?;
    if let Some(g) = &s.gateways {
        if g.value.iter().any(|g| g != "mesh") {
            return Err(located(
                what,
                At::of(g),
                "spec.gateways",
                "meshfed's routes are for the mesh's clients only: leave gateways out or write [mesh]",
            ));
        }
    }
    let hosts = &s.hosts.value;
    let [h] = hosts.as_slice() else {
        return Err(located(
            what,
            At::of(&s.hosts),
            "spec.hosts",
            format!(
                "{} hosts: meshfed routes one service per VirtualService; write one host",
                hosts.len()
            ),
        ));
    };
    let host = check_host_at(what, h, &namespace, "spec.hosts[0]")?;
    if s.http.is_empty() {
        return Err(located(
            what,
            At::of(&s.hosts),
            "spec.http",
            "no http routes: every call would fail; write at least one route",
        ));
    }
    let mut http = Vec::new();
    for (i, r) in s.http.iter().enumerate() {
        http.push(http_route(
            what,
            &format!("spec.http[{i}]"),
            r,
            &host,
            &namespace,
        )?);
    }
    Ok((
        Routes {
            name,
            namespace,
            host,
            origin: String::new(),
            http,
        },
        At::of(h),
    ))
}

fn http_route(
    what: &str,
    base: &str,
    r: &Spanned<HttpRouteSpec>,
    host: &str,
    namespace: &str,
) -> Result<HttpRoute, String> {
    let v = &r.value;
    refused(
        what,
        base,
        &[
            ("redirect", &v.redirect, NOT_GRPC),
            ("directResponse", &v.direct_response, NOT_GRPC),
            ("delegate", &v.delegate, "routes are not delegated"),
            ("rewrite", &v.rewrite, NOT_GRPC),
            ("fault", &v.fault, "not served yet"),
            ("mirror", &v.mirror, NOT_GRPC),
            ("mirrors", &v.mirrors, NOT_GRPC),
            ("mirrorPercentage", &v.mirror_percentage, NOT_GRPC),
            ("corsPolicy", &v.cors_policy, NOT_GRPC),
            ("headers", &v.headers, NOT_GRPC),
        ],
    )?;
    let mut matches = Vec::new();
    for (j, m) in v.matches.iter().enumerate() {
        matches.push(route_match(what, &format!("{base}.match[{j}]"), m)?);
    }
    if v.route.is_empty() {
        return Err(located(
            what,
            At::of(r),
            &format!("{base}.route"),
            "no destination: write at least one",
        ));
    }
    let mut to = Vec::new();
    for (j, d) in v.route.iter().enumerate() {
        let f = format!("{base}.route[{j}]");
        refused(what, &f, &[("headers", &d.value.headers, NOT_GRPC)])?;
        let dest = &d.value.destination.value;
        let dh = check_host_at(
            what,
            &dest.host,
            namespace,
            &format!("{f}.destination.host"),
        )?;
        if dh != host {
            return Err(located(
                what,
                At::of(&dest.host),
                &format!("{f}.destination.host"),
                format!("{dh} is not the VirtualService's host {host}: meshfed routes a host's calls to its own subsets and ports"),
            ));
        }
        let subset = match &dest.subset {
            Some(s) if !crate::validate::is_dns_label(&s.value) => {
                return Err(located(
                    what,
                    At::of(s),
                    &format!("{f}.destination.subset"),
                    format!("{:?} is not a DNS label (subset names are)", s.value),
                ))
            }
            Some(s) => s.value.clone(),
            None => String::new(),
        };
        let port = match &dest.port {
            Some(p) if !(1..=65535).contains(&p.number.value) => {
                return Err(located(
                    what,
                    At::of(&p.number),
                    &format!("{f}.destination.port.number"),
                    format!("{} is not a port (1 to 65535)", p.number.value),
                ))
            }
            Some(p) => Some(p.number.value),
            None => None,
        };
        let weight = match &d.value.weight {
            Some(w) => w.value,
            None if v.route.len() == 1 => 100,
            None => {
                return Err(located(
                    what,
                    At::of(d),
                    &format!("{f}.weight"),
                    "with several destinations each needs a weight",
                ))
            }
        };
        to.push(Destination {
            subset,
            port,
            weight,
        });
    }
    let total: u64 = to.iter().map(|d| u64::from(d.weight)).sum();
    if total == 0 || total > u64::from(u32::MAX) {
        return Err(located(
            what,
            At::of(r),
            &format!("{base}.route"),
            format!("the weights sum to {total}: they must sum to more than 0 and fit 32 bits"),
        ));
    }
    let retries = match &v.retries {
        Some(r) => retries(what, &format!("{base}.retries"), r)?,
        None => None,
    };
    let timeout_ms = duration(what, &format!("{base}.timeout"), &v.timeout)?;
    Ok(HttpRoute {
        name: v.name.clone().unwrap_or_default(),
        matches,
        to,
        timeout_ms,
        retries,
    })
}

/// `retries`: `attempts` (0 turns retries off) and `retryOn` with gRPC status codes only.
fn retries(what: &str, base: &str, r: &Spanned<RetriesSpec>) -> Result<Option<Retries>, String> {
    let v = &r.value;
    refused(
        what,
        base,
        &[
            (
                "perTryTimeout",
                &v.per_try_timeout,
                "gRPC's client has no per-attempt timeout; the route's timeout bounds the call",
            ),
            (
                "retryRemoteLocalities",
                &v.retry_remote_localities,
                NOT_GRPC,
            ),
            (
                "retryIgnorePreviousHosts",
                &v.retry_ignore_previous_hosts,
                NOT_GRPC,
            ),
            ("backoff", &v.backoff, "not served yet"),
        ],
    )?;
    let attempts = match &v.attempts {
        Some(a) if a.value > 4 => {
            return Err(located(
                what,
                At::of(a),
                &format!("{base}.attempts"),
                format!(
                    "{}: gRPC makes at most 5 attempts in all, so at most 4 retries",
                    a.value
                ),
            ))
        }
        Some(a) => a.value,
        None => {
            return Err(located(
                what,
                At::of(r),
                &format!("{base}.attempts"),
                "missing: how many retries (0 turns them off)",
            ))
        }
    };
    if attempts == 0 {
        return Ok(None);
    }
    let on = match &v.retry_on {
        None => DEFAULT_RETRY_ON.iter().map(|s| s.to_string()).collect(),
        Some(list) => {
            let mut on: Vec<String> = Vec::new();
            for c in list
                .value
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
            {
                if !GRPC_RETRY_ON.contains(&c) {
                    return Err(located(
                        what,
                        At::of(list),
                        &format!("{base}.retryOn"),
                        format!(
                            "{c:?}: gRPC's client retries on status codes only: {}",
                            GRPC_RETRY_ON.join(", ")
                        ),
                    ));
                }
                if !on.iter().any(|x| x == c) {
                    on.push(c.to_string());
                }
            }
            if on.is_empty() {
                return Err(located(
                    what,
                    At::of(list),
                    &format!("{base}.retryOn"),
                    "empty: name the status codes to retry on",
                ));
            }
            on
        }
    };
    Ok(Some(Retries { attempts, on }))
}

fn route_match(what: &str, base: &str, m: &Spanned<MatchSpec>) -> Result<RouteMatch, String> {
    let v = &m.value;
    refused(
        what,
        base,
        &[
            ("scheme", &v.scheme, NOT_GRPC),
            ("method", &v.method, "gRPC calls are all POST"),
            ("authority", &v.authority, NOT_GRPC),
            (
                "queryParams",
                &v.query_params,
                "gRPC has no query parameters",
            ),
            (
                "sourceLabels",
                &v.source_labels,
                "a client's routes are its own; there is no source to select",
            ),
            (
                "sourceNamespace",
                &v.source_namespace,
                "a client's routes are its own; there is no source to select",
            ),
            (
                "gateways",
                &v.gateways,
                "routes are for the mesh's clients only",
            ),
            ("statPrefix", &v.stat_prefix, NOT_GRPC),
        ],
    )?;
    if let Some(i) = v.ignore_uri_case.as_ref().filter(|i| i.value) {
        return Err(located(
            what,
            At::of(i),
            &format!("{base}.ignoreUriCase"),
            "gRPC method paths are case-sensitive (gRPC's xDS client refuses case-insensitive paths); remove it",
        ));
    }
    let uri = match &v.uri {
        Some(u) => match string_match(what, &format!("{base}.uri"), u)? {
            StringMatch::Exact(p) if p.is_empty() => {
                return Err(located(
                    what,
                    At::of(u),
                    &format!("{base}.uri.exact"),
                    "an empty path matches no call: a gRPC path is /package.Service/Method",
                ))
            }
            m => Some(m),
        },
        None => None,
    };
    // Each withoutHeaders entry doubles the routes served (absent, or present and not
    // matching: see the xDS routes).
    if v.without_headers.len() > MAX_WITHOUT_HEADERS {
        return Err(located(
            what,
            At::of(m),
            &format!("{base}.withoutHeaders"),
            format!(
                "{} headers: at most {MAX_WITHOUT_HEADERS} per match",
                v.without_headers.len()
            ),
        ));
    }
    let headers = header_matches(what, &format!("{base}.headers"), &v.headers)?;
    let without_headers =
        header_matches(what, &format!("{base}.withoutHeaders"), &v.without_headers)?;
    let port = match &v.port {
        Some(p) if !(1..=65535).contains(&p.value) => {
            return Err(located(
                what,
                At::of(p),
                &format!("{base}.port"),
                format!("{} is not a port (1 to 65535)", p.value),
            ))
        }
        Some(p) => Some(p.value),
        None => None,
    };
    Ok(RouteMatch {
        uri,
        headers,
        without_headers,
        port,
    })
}

fn header_matches(
    what: &str,
    base: &str,
    hs: &BTreeMap<String, Spanned<StringMatchSpec>>,
) -> Result<Vec<(String, StringMatch)>, String> {
    let mut out = Vec::new();
    for (name, m) in hs {
        let f = format!("{base}.{name}");
        let why = if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            Some("a header name is lower case letters, digits, '-' and '_'")
        } else if name.ends_with("-bin") {
            Some("gRPC's xDS client skips matchers of binary (-bin) headers, so the route would take every call")
        } else if name.starts_with("grpc-") {
            Some("grpc- headers are gRPC's own and are not matched")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(located(what, At::of(m), &f, format!("{name:?}: {why}")));
        }
        out.push((name.clone(), string_match(what, &f, m)?));
    }
    Ok(out)
}

fn string_match(
    what: &str,
    field: &str,
    m: &Spanned<StringMatchSpec>,
) -> Result<StringMatch, String> {
    let v = &m.value;
    match (&v.exact, &v.prefix, &v.regex) {
        (Some(e), None, None) => Ok(StringMatch::Exact(e.clone())),
        (None, Some(p), None) => Ok(StringMatch::Prefix(p.clone())),
        (None, None, Some(r)) if r.is_empty() => Err(located(
            what,
            At::of(m),
            &format!("{field}.regex"),
            "an empty regular expression: write one, or use prefix: \"\" for any value",
        )),
        (None, None, Some(r)) => match regex::Regex::new(r) {
            Ok(_) => Ok(StringMatch::Regex(r.clone())),
            Err(e) => Err(located(
                what,
                At::of(m),
                &format!("{field}.regex"),
                format!(
                    "{r:?} is not a regular expression (RE2 syntax): {}",
                    e.to_string().lines().last().unwrap_or("invalid").trim()
                ),
            )),
        },
        _ => Err(located(
            what,
            At::of(m),
            field,
            "write exactly one of exact, prefix or regex",
        )),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::spec::{parse, parse_all, Parsed};
    use super::super::PolicySet;
    use super::*;

    /// The shape of istio.io's "reviews" VirtualService example (header match to a subset, then
    /// a weighted split), for a gRPC service.
    const GOOD: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ledger
  namespace: shop
spec:
  hosts:
    - ledger
  http:
    - name: canary-users
      match:
        - headers:
            x-version:
              exact: v2
        - uri:
            prefix: /shop.Ledger/Audit
          port: 9090
      route:
        - destination:
            host: ledger
            subset: v2
      timeout: 1.5s
    - route:
        - destination: {host: ledger.shop.svc.cluster.local, subset: v1, port: {number: 9090}}
          weight: 90
        - destination: {host: ledger, subset: v2}
          weight: 10
";

    fn routes(text: &str) -> Result<Routes, String> {
        let mut all = parse_all(text, "r.yaml")?;
        match all.pop() {
            Some((Parsed::Routes(r), _)) => Ok(r),
            other => panic!("{other:?}"),
        }
    }

    fn err(text: &str) -> String {
        let e = routes(text).unwrap_err();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    #[test]
    fn a_virtual_service_becomes_ordered_routes() {
        let r = routes(GOOD).unwrap();
        assert_eq!(r.host, "ledger.shop.svc.cluster.local");
        assert_eq!(r.http.len(), 2);
        let first = &r.http[0];
        assert_eq!(first.name, "canary-users");
        assert_eq!(first.timeout_ms, Some(1500));
        assert_eq!(first.retries, None);
        let with = |r: &str| {
            routes(&GOOD.replace(
                "      timeout: 1.5s",
                &format!("      timeout: 1.5s\n      retries: {r}"),
            ))
            .unwrap()
            .http[0]
                .retries
                .clone()
        };
        assert_eq!(
            with("{attempts: 3, retryOn: \"unavailable, internal,unavailable\"}"),
            Some(Retries {
                attempts: 3,
                on: vec!["unavailable".into(), "internal".into()]
            })
        );
        assert_eq!(
            with("{attempts: 2}").unwrap().on,
            ["cancelled", "unavailable"],
            "the gRPC codes of Istio's default"
        );
        assert_eq!(with("{attempts: 0, retryOn: unavailable}"), None);
        assert_eq!(
            first.matches[0].headers,
            [("x-version".to_string(), StringMatch::Exact("v2".into()))]
        );
        assert_eq!(
            first.matches[1].uri,
            Some(StringMatch::Prefix("/shop.Ledger/Audit".into()))
        );
        assert_eq!(first.matches[1].port, Some(9090));
        assert_eq!(
            first.to,
            [Destination {
                subset: "v2".into(),
                port: None,
                weight: 100
            }]
        );
        let split = &r.http[1];
        assert!(split.matches.is_empty());
        assert_eq!(
            split
                .to
                .iter()
                .map(|d| (d.subset.as_str(), d.port, d.weight))
                .collect::<Vec<_>>(),
            [("v1", Some(9090), 90), ("v2", None, 10)]
        );
        assert_eq!(r.subsets(), ["v1", "v2"]);
        // The route limited to port 9090 by its second match keeps only its first elsewhere.
        let on_80: Vec<usize> = r.for_port(80).map(|(_, ms)| ms.len()).collect();
        assert_eq!(on_80, [1, 0]);
        let on_9090: Vec<usize> = r.for_port(9090).map(|(_, ms)| ms.len()).collect();
        assert_eq!(on_9090, [2, 0]);
    }

    #[test]
    fn what_is_not_applied_is_refused_by_name_and_place() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "      timeout: 1.5s",
                "      timeout: 1.5s\n      retries: {attempts: 3, retryOn: \"unavailable,5xx\"}",
                "r.yaml:23:39: spec.http[0].retries.retryOn: \"5xx\": gRPC's client retries on status codes only",
            ),
            (
                "      timeout: 1.5s",
                "      timeout: 1.5s\n      retries: {attempts: 7}",
                "spec.http[0].retries.attempts: 7: gRPC makes at most 5 attempts in all",
            ),
            (
                "      timeout: 1.5s",
                "      timeout: 1.5s\n      retries: {attempts: 2, perTryTimeout: 1s}",
                "spec.http[0].retries.perTryTimeout: not applied by meshfed's routes (gRPC's client has no per-attempt timeout",
            ),
            (
                "      timeout: 1.5s",
                "      timeout: 1.5s\n      retries: {retryOn: unavailable}",
                "spec.http[0].retries.attempts: missing",
            ),
            (
                "            x-version:",
                "            X-Version:",
                "r.yaml:14:15: spec.http[0].match[0].headers.X-Version: \"X-Version\": a header name is lower case",
            ),
            (
                "            x-version:",
                "            trace-bin:",
                "spec.http[0].match[0].headers.trace-bin: \"trace-bin\": gRPC's xDS client skips matchers of binary (-bin) headers",
            ),
            (
                "              exact: v2",
                "              regex: \"v(2\"",
                "r.yaml:14:15: spec.http[0].match[0].headers.x-version.regex: \"v(2\" is not a regular expression (RE2 syntax)",
            ),
            (
                "              exact: v2",
                "              exact: v2\n              prefix: v",
                "spec.http[0].match[0].headers.x-version: write exactly one of exact, prefix or regex",
            ),
            (
                "    - ledger\n",
                "    - ledger\n    - payment\n",
                "r.yaml:8:5: spec.hosts: 2 hosts: meshfed routes one service per VirtualService",
            ),
            (
                "            host: ledger\n            subset: v2",
                "            host: payment\n            subset: v2",
                "r.yaml:20:19: spec.http[0].route[0].destination.host: payment.shop.svc.cluster.local is not the VirtualService's host ledger.shop.svc.cluster.local",
            ),
            (
                "            subset: v2",
                "            subset: V2",
                "spec.http[0].route[0].destination.subset: \"V2\" is not a DNS label",
            ),
            (
                "          weight: 10\n",
                "",
                "r.yaml:26:11: spec.http[1].route[1].weight: with several destinations each needs a weight",
            ),
            (
                "weight: 90\n        - destination: {host: ledger, subset: v2}\n          weight: 10",
                "weight: 0\n        - destination: {host: ledger, subset: v2}\n          weight: 0",
                "spec.http[1].route: the weights sum to 0",
            ),
            ("timeout: 1.5s", "timeout: soon", "spec.http[0].timeout: \"soon\" is not a duration"),
            (
                "          port: 9090",
                "          port: 9090\n          ignoreUriCase: true",
                "spec.http[0].match[1].ignoreUriCase: gRPC method paths are case-sensitive",
            ),
            (
                "          port: 9090",
                "          port: 9090\n          method: {exact: GET}",
                "spec.http[0].match[1].method: not applied by meshfed's routes (gRPC calls are all POST)",
            ),
            (
                "  hosts:",
                "  gateways: [istio-system/eastwest]\n  hosts:",
                "r.yaml:7:13: spec.gateways: meshfed's routes are for the mesh's clients only",
            ),
            ("  http:\n", "  tcp: []\n  http:\n", "spec.tcp: not applied by meshfed's routes"),
            ("          port: 9090", "          port: 70000", "spec.http[0].match[1].port: 70000 is not a port"),
            ("          port: 9090", "          prot: 9090", "unknown field `prot`"),
            (
                "            prefix: /shop.Ledger/Audit",
                "            exact: \"\"",
                "spec.http[0].match[1].uri.exact: an empty path matches no call",
            ),
            (
                "              exact: v2",
                "              regex: \"\"",
                "spec.http[0].match[0].headers.x-version.regex: an empty regular expression",
            ),
            (
                "          port: 9090",
                "          port: 9090\n          withoutHeaders: {a: {exact: x}, b: {exact: x}, c: {exact: x}, d: {exact: x}, e: {exact: x}}",
                "spec.http[0].match[1].withoutHeaders: 5 headers: at most 4 per match",
            ),
        ];
        for (from, to, want) in cases {
            assert!(GOOD.contains(from), "{from}");
            let e = err(&GOOD.replacen(from, to, 1));
            assert!(e.contains(want), "{to:?}:\n got  {e}\n want {want}");
            assert!(e.starts_with("r.yaml:"), "{e}");
        }
    }

    #[test]
    fn routes_sit_beside_the_hosts_policy_one_per_host() {
        let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ledger, namespace: shop}\nspec:\n  host: ledger\n  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n";
        let set = PolicySet::from_sources(&[
            ("dr.yaml".into(), dr.into()),
            ("vs.yaml".into(), GOOD.into()),
        ])
        .unwrap();
        assert_eq!(set.by_host.len(), 1);
        let r = &set.routes_by_host["ledger.shop.svc.cluster.local"];
        assert_eq!(r.origin, "vs.yaml:8:7");
        let e = PolicySet::from_sources(&[
            ("vs.yaml".into(), GOOD.into()),
            ("again.yaml".into(), GOOD.into()),
        ])
        .unwrap_err();
        assert!(
            e.starts_with("again.yaml:8:7: spec.hosts: \"ledger.shop.svc.cluster.local\" already has a VirtualService (shop/ledger at vs.yaml:8:7)"),
            "{e}"
        );
        // Where only a failover policy belongs (one published with an export), routes are not.
        let e = parse(GOOD, "published").unwrap_err();
        assert!(
            e.contains("VirtualService shop/ledger: routes are not a failover policy"),
            "{e}"
        );
    }

    /// The example in docs/failover.md ("Routes") is what it says.
    #[test]
    fn the_documented_example_parses_as_described() {
        let doc = include_str!("../../../../docs/failover.md");
        let at = doc.find("### Routes").unwrap();
        let block = doc[at..].split("```yaml\n").nth(1).unwrap();
        let yaml = block.split("```").next().unwrap();
        let r = routes(yaml).unwrap();
        assert_eq!(r.host, "payment.shop.svc.cluster.local");
        assert_eq!(r.http[0].matches.len(), 2);
        assert_eq!(r.http[0].matches[1].port, Some(18080));
        assert_eq!(r.http[0].timeout_ms, Some(1500));
        assert_eq!(
            r.http[0].retries,
            Some(Retries {
                attempts: 2,
                on: vec!["unavailable".into()]
            })
        );
        let w: Vec<(&str, u32)> = r.http[1]
            .to
            .iter()
            .map(|d| (d.subset.as_str(), d.weight))
            .collect();
        assert_eq!(w, [("v1", 90), ("v2", 10)]);
    }
}
