//! Names and validation shared by the federator, the agent and the registry: every check
//! returns a message naming the field that failed.

use proto::{ClusterFacts, Endpoint, Locality, ServiceExport};

/// A value that failed a check: the field's path in its message or file (`upserts[3].ports[0]`,
/// `--advertise #1`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An error whose message already starts with `field` (a YAML parser's located message).
    fn located(field: &str, message: String) -> Self {
        let reason = message
            .strip_prefix(field)
            .and_then(|r| r.strip_prefix(':'))
            .map(|r| r.trim_start().to_string())
            .unwrap_or(message);
        FieldError::new(field, reason)
    }
}

/// Servers and command lines carry the message on (gRPC statuses, `Result<_, String>`).
impl From<FieldError> for String {
    fn from(e: FieldError) -> String {
        e.to_string()
    }
}

/// Largest number of services in one export delta.
pub const MAX_SERVICES_PER_DELTA: usize = 10_000;
/// The default of the most services one cluster may export (`--max-services-per-cluster`).
pub const DEFAULT_MAX_SERVICES_PER_CLUSTER: usize = 10_000;
/// Largest trust bundle (its JSON) a cluster may publish: room for dozens of roots.
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024;

/// A published trust bundle's JSON must be at most [`MAX_BUNDLE_BYTES`].
pub fn check_bundle_size(field: &str, json: &str) -> Result<(), String> {
    if json.len() > MAX_BUNDLE_BYTES {
        return Err(format!(
            "{field}: {} bytes, at most {MAX_BUNDLE_BYTES}",
            json.len()
        ));
    }
    Ok(())
}

/// Largest number of endpoints of one service.
pub const MAX_ENDPOINTS_PER_SERVICE: usize = 5_000;
/// An import chunk is cut once it holds this many encoded bytes (or the caller's count limit),
/// so it always fits a gRPC message. A single export is limited to this size too.
pub const MAX_CHUNK_BYTES: usize = 4 << 20;
/// Largest gRPC message either side accepts.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// A DNS-1123 label: lowercase alphanumerics and '-', 1-63 characters, alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Why `s` is not a host (an IP address, `[v6]`, or a DNS name), if it is not. A name made
/// only of digits and dots is a mistyped IPv4 address, not a name; a URL is not a host.
pub fn host_problem(s: &str) -> Option<String> {
    let bare = s
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(s);
    if bare.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    if s.contains("://") || s.contains('/') {
        return Some(format!(
            "{s:?} is a URL or a path, not a host (give only the host name or IP address)"
        ));
    }
    let labels: Vec<&str> = s.split('.').collect();
    if labels
        .iter()
        .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Some(format!("{s:?} is not a valid IPv4 address"));
    }
    if s.is_empty() || s.len() > 253 || !labels.iter().all(|l| is_dns_label(l)) {
        return Some(format!("{s:?} is neither an IP address nor a host name"));
    }
    None
}

pub fn check_label(what: &str, s: &str) -> Result<(), FieldError> {
    if is_dns_label(s) {
        Ok(())
    } else {
        Err(FieldError::new(what, format!("{s:?} is not a DNS label (1-63 lowercase letters, digits or '-', starting and ending with a letter or digit)"
        )))
    }
}

/// `namespace/name`.
pub fn service_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// Parses `region/zone/subzone` (trailing parts optional).
pub fn parse_locality(s: &str) -> Result<Locality, FieldError> {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.len() > 3 || (parts.iter().any(|p| p.is_empty()) && !s.is_empty()) {
        return Err(FieldError::new(
            "locality",
            format!("{s:?} is not region/zone/subzone"),
        ));
    }
    let get = |i: usize| parts.get(i).map(|p| p.to_string()).unwrap_or_default();
    Ok(Locality {
        region: get(0),
        zone: get(1),
        subzone: get(2),
    })
}

pub fn locality_string(l: &Option<Locality>) -> String {
    match l {
        None => String::new(),
        Some(l) => {
            let mut s = l.region.clone();
            for p in [&l.zone, &l.subzone] {
                if !p.is_empty() {
                    s.push('/');
                    s.push_str(p);
                }
            }
            s
        }
    }
}

/// `host:port` with a port in 1..=65535.
pub fn check_host_port(what: &str, s: &str) -> Result<(), FieldError> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(FieldError::new(what, format!("{s:?} is not host:port")));
    };
    if host.is_empty() {
        return Err(FieldError::new(what, format!("{s:?} has no host")));
    }
    if let Some(p) = host_problem(host) {
        return Err(FieldError::new(what, format!("{s:?}: {p}")));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(FieldError::new(
            what,
            format!("{s:?} has no valid port (1-65535)"),
        )),
    }
}

pub fn check_facts(f: &ClusterFacts, at: &str) -> Result<(), FieldError> {
    check_label(&format!("{at}.cluster_id"), &f.cluster_id)?;
    check_label(&format!("{at}.network"), &f.network)?;
    trust::TrustDomain::new(&f.trust_domain)
        .map_err(|e| FieldError::new(format!("{at}.trust_domain"), e.to_string()))?;
    for (i, g) in f.gateways.iter().enumerate() {
        check_host_port(&format!("{at}.gateways[{i}]"), g)?;
    }
    Ok(())
}

fn check_endpoint(e: &Endpoint, at: &str) -> Result<(), FieldError> {
    if e.address.is_empty() || e.address.len() > 253 {
        return Err(FieldError::new(
            format!("{at}.address"),
            "must be an IP address or host name",
        ));
    }
    if e.address.parse::<std::net::IpAddr>().is_err() && !e.address.split('.').all(is_dns_label) {
        return Err(FieldError::new(
            format!("{at}.address"),
            format!("{:?} is neither an IP address nor a host name", e.address),
        ));
    }
    if e.weight > 1_000_000 {
        return Err(FieldError::new(
            format!("{at}.weight"),
            format!("{} is above 1000000", e.weight),
        ));
    }
    if !e.service_account.is_empty() {
        check_label(&format!("{at}.service_account"), &e.service_account)?;
    }
    if !e.hostname.is_empty() {
        check_label(&format!("{at}.hostname"), &e.hostname)?;
    }
    for (name, port) in &e.ports {
        // The empty key names the service's unnamed port (a Kubernetes Service with one port).
        if !name.is_empty() {
            check_label(&format!("{at}.ports key"), name)?;
        }
        if *port == 0 || *port > 65535 {
            return Err(FieldError::new(
                format!("{at}.ports[{name:?}]"),
                format!("{port} is not in 1-65535"),
            ));
        }
    }
    Ok(())
}

/// Checks one exported service; `at` is its location in the message (e.g. `upserts[3]`).
pub fn check_export(e: &ServiceExport, at: &str) -> Result<(), FieldError> {
    check_label(&format!("{at}.namespace"), &e.namespace)?;
    check_label(&format!("{at}.name"), &e.name)?;
    if e.ports.is_empty() {
        return Err(FieldError::new(
            format!("{at}.ports"),
            "a service needs at least one port",
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, p) in e.ports.iter().enumerate() {
        if p.port == 0 || p.port > 65535 {
            return Err(FieldError::new(
                format!("{at}.ports[{i}].port"),
                format!("{} is not in 1-65535", p.port),
            ));
        }
        if !matches!(p.protocol.as_str(), "TCP" | "UDP" | "SCTP") {
            return Err(FieldError::new(
                format!("{at}.ports[{i}].protocol"),
                format!("{:?} is not TCP, UDP or SCTP", p.protocol),
            ));
        }
        if !p.name.is_empty() {
            check_label(&format!("{at}.ports[{i}].name"), &p.name)?;
        }
        if !seen.insert((p.port, p.protocol.clone())) {
            return Err(FieldError::new(
                format!("{at}.ports[{i}]"),
                format!("port {}/{} is listed twice", p.port, p.protocol),
            ));
        }
    }
    if e.endpoints.len() > MAX_ENDPOINTS_PER_SERVICE {
        return Err(FieldError::new(
            format!("{at}.endpoints"),
            format!(
                "{} endpoints, at most {MAX_ENDPOINTS_PER_SERVICE}",
                e.endpoints.len()
            ),
        ));
    }
    for (i, ep) in e.endpoints.iter().enumerate() {
        check_endpoint(ep, &format!("{at}.endpoints[{i}]"))?;
    }
    for (i, c) in e.export_to.iter().enumerate() {
        check_label(&format!("{at}.export_to[{i}]"), c)?;
    }
    if !e.failover_policy.is_empty() {
        check_published_policy(e, &format!("{at}.failover_policy"))?;
    }
    let size = prost::Message::encoded_len(e);
    if size > MAX_CHUNK_BYTES {
        return Err(FieldError::new(
            at,
            format!(
                "the export encodes to {size} bytes; at most {} are allowed per service",
                MAX_CHUNK_BYTES
            ),
        ));
    }
    Ok(())
}

/// Largest published policy.
pub const MAX_PUBLISHED_POLICY_BYTES: usize = 64 * 1024;

/// A published policy must be one valid policy for the exported service's own host: a cluster
/// may set policy only for what it exports.
pub fn check_published_policy(
    e: &ServiceExport,
    at: &str,
) -> Result<crate::policy::Policy, FieldError> {
    if e.failover_policy.len() > MAX_PUBLISHED_POLICY_BYTES {
        return Err(FieldError::new(
            at,
            format!(
                "{} bytes, at most {MAX_PUBLISHED_POLICY_BYTES}",
                e.failover_policy.len()
            ),
        ));
    }
    let mut ps = crate::policy::spec::parse(&e.failover_policy, at)
        .map_err(|m| FieldError::located(at, m))?;
    if ps.len() != 1 {
        return Err(FieldError::new(
            at,
            format!("holds {} policies; exactly one is allowed", ps.len()),
        ));
    }
    let (p, _) = ps.remove(0);
    let host = format!("{}.{}.svc.cluster.local", e.name, e.namespace);
    if p.host != host {
        return Err(FieldError::new(
            at,
            format!("the policy is for {}, but this export is {host}", p.host),
        ));
    }
    Ok(p)
}

/// Whether `importer` may see an export (MCS default: the whole federation).
pub fn visible_to(export_to: &[String], importer: &str) -> bool {
    export_to.is_empty() || export_to.iter().any(|c| c == importer)
}

/// Describes a conflict between an older export of a service and a newer one (MCS: the oldest
/// export wins), if any: `TypeConflict: ...` when one is headless and the other not, else a
/// port conflict ([`port_conflict`]).
pub fn export_conflict(older: &ServiceExport, newer: &ServiceExport) -> Option<String> {
    let kind = |e: &ServiceExport| {
        if e.headless {
            "Headless"
        } else {
            "ClusterSetIP"
        }
    };
    if older.headless != newer.headless {
        return Some(format!(
            "{TYPE_CONFLICT}: the service is {} here but {} in the older export",
            kind(newer),
            kind(older)
        ));
    }
    port_conflict(older, newer)
}

/// The prefix of a type conflict's description (the MCS condition reason).
pub const TYPE_CONFLICT: &str = "TypeConflict";

/// Describes a port/protocol conflict between an older export and a newer one, if any.
pub fn port_conflict(older: &ServiceExport, newer: &ServiceExport) -> Option<String> {
    for n in &newer.ports {
        for o in &older.ports {
            if n.port == o.port && n.protocol != o.protocol {
                return Some(format!(
                    "port {} is {} here but {} in the older export",
                    n.port, n.protocol, o.protocol
                ));
            }
            if !n.name.is_empty()
                && n.name == o.name
                && (n.port != o.port || n.protocol != o.protocol)
            {
                return Some(format!(
                    "port {:?} is {}/{} here but {}/{} in the older export",
                    n.name, n.port, n.protocol, o.port, o.protocol
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::Port;

    #[test]
    fn hosts_are_ips_or_names_not_urls_nor_mistyped_addresses() {
        for ok in [
            "10.0.0.3",
            "::1",
            "[::1]",
            "gw.east.example.com",
            "eastwest",
        ] {
            assert_eq!(host_problem(ok), None, "{ok}");
        }
        assert!(host_problem("10.0.0.300")
            .unwrap()
            .contains("not a valid IPv4 address"));
        assert!(host_problem("http://127.0.60.1").unwrap().contains("URL"));
        assert!(host_problem("Gw_1").unwrap().contains("neither"));
        let e = check_host_port("--gateway", "http://127.0.60.1:15443").unwrap_err();
        assert_eq!(e.field, "--gateway");
        assert!(e.reason.contains("is a URL or a path, not a host"), "{e}");
        assert!(check_host_port("--gateway", "[::1]:15443").is_ok());
    }

    fn export(ports: &[(&str, u32, &str)]) -> ServiceExport {
        ServiceExport {
            namespace: "shop".into(),
            name: "payment".into(),
            ports: ports
                .iter()
                .map(|(n, p, proto)| Port {
                    name: n.to_string(),
                    port: *p,
                    protocol: proto.to_string(),
                    app_protocol: String::new(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn labels_and_exports() {
        assert!(is_dns_label("east-1"));
        assert!(!is_dns_label("East"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(check_export(&export(&[("http", 8080, "TCP")]), "u[0]").is_ok());
        let e = check_export(&export(&[("http", 0, "TCP")]), "upserts[2]").unwrap_err();
        assert_eq!(
            e,
            FieldError::new("upserts[2].ports[0].port", "0 is not in 1-65535")
        );
        assert_eq!(
            e.to_string(),
            "upserts[2].ports[0].port: 0 is not in 1-65535"
        );
        let e = check_export(&export(&[("http", 80, "HTTP")]), "u").unwrap_err();
        assert_eq!(e.field, "u.ports[0].protocol", "{e}");
        let e = check_export(&export(&[]), "u").unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.reason.as_str()),
            ("u.ports", "a service needs at least one port")
        );
    }

    #[test]
    fn conflicts_and_visibility() {
        let a = export(&[("http", 8080, "TCP")]);
        assert!(port_conflict(&a, &export(&[("http", 8080, "TCP")])).is_none());
        assert!(port_conflict(&a, &export(&[("http", 8080, "UDP")])).is_some());
        assert!(port_conflict(&a, &export(&[("http", 9090, "TCP")])).is_some());
        assert!(port_conflict(&a, &export(&[("grpc", 9090, "TCP")])).is_none());
        // A headless export against a ClusterSetIP one: a type conflict first.
        let mut h = a.clone();
        h.headless = true;
        let c = export_conflict(&a, &h).unwrap();
        assert!(
            c.starts_with("TypeConflict: the service is Headless here but ClusterSetIP"),
            "{c}"
        );
        assert!(export_conflict(&a, &a.clone()).is_none());
        assert!(export_conflict(&a, &export(&[("http", 8080, "UDP")])).is_some());
        let mut e = a.clone();
        assert!(visible_to(&e.export_to, "west"));
        e.export_to = vec!["eu".into()];
        assert!(!visible_to(&e.export_to, "west") && visible_to(&e.export_to, "eu"));
    }

    #[test]
    fn localities() {
        let l = parse_locality("us-east1/us-east1-b").unwrap();
        assert_eq!(
            (l.region.as_str(), l.zone.as_str(), l.subzone.as_str()),
            ("us-east1", "us-east1-b", "")
        );
        assert_eq!(locality_string(&Some(l)), "us-east1/us-east1-b");
        assert!(parse_locality("a//b").is_err());
        assert!(parse_locality("a/b/c/d").is_err());
    }
}

#[cfg(test)]
mod published_policy_tests {
    use super::*;

    fn export(policy: &str) -> ServiceExport {
        ServiceExport {
            namespace: "shop".into(),
            name: "payment".into(),
            failover_policy: policy.into(),
            ..Default::default()
        }
    }

    const P: &str = "apiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  host: HOST\n  outlierDetection: {consecutive5xxErrors: 2}\n";

    #[test]
    fn a_cluster_publishes_policy_only_for_its_own_service() {
        let ok = export(&P.replace("HOST", "payment.shop.svc.cluster.local"));
        assert!(check_published_policy(&ok, "x").is_ok());
        let other = export(&P.replace("HOST", "ledger.shop.svc.cluster.local"));
        let e = check_published_policy(&other, "upserts[0].failover_policy").unwrap_err();
        assert_eq!(e.field, "upserts[0].failover_policy");
        assert!(
            e.reason
                .starts_with("the policy is for ledger.shop.svc.cluster.local"),
            "{e}"
        );
        let two = export(&format!(
            "{}---\n{}",
            ok.failover_policy, ok.failover_policy
        ));
        assert!(check_published_policy(&two, "x")
            .unwrap_err()
            .reason
            .contains("exactly one"));
        let bad = export("kind: [");
        let e = check_published_policy(&bad, "upserts[0].failover_policy").unwrap_err();
        assert_eq!(e.field, "upserts[0].failover_policy");
        assert!(
            e.to_string().starts_with("upserts[0].failover_policy:") && !e.reason.is_empty(),
            "{e}"
        );
    }

    #[test]
    fn published_yaml_round_trips() {
        let set = crate::policy::PolicySet::from_sources(&[(
            "f.yaml".into(),
            std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../docs/examples/payment-failover.yaml"
            ))
            .unwrap(),
        )])
        .unwrap();
        let p = set.by_host.values().next().unwrap();
        let again = crate::policy::spec::parse(&p.to_yaml(), "again").unwrap();
        let mut q = again[0].0.clone();
        q.origin = p.origin.clone();
        assert_eq!(&q, p);
    }
}
