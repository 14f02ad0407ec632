//! Istio's published schemas for the objects meshfed writes (networking.istio.io/v1
//! `ServiceEntry`, `WorkloadEntry`, `DestinationRule`), written from the Istio API reference
//! (istio.io/latest/docs/reference/config/networking/) and the validation rules of the CRDs
//! (`x-kubernetes-validations`) and of istiod's admission webhook, as docs/istio.md lists them:
//! field names, types, enums, required fields and limits. An unknown field is an error here
//! (the API server would prune it silently, and the object would not mean what meshfed meant).
//! The agent checks every object before writing it, and the Kubernetes API double checks every
//! object written to it.

use serde_json::{Map, Value};

type R = Result<(), String>;

fn obj<'a>(v: &'a Value, at: &str) -> Result<&'a Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("{at}: expected an object"))
}

fn only(m: &Map<String, Value>, at: &str, allowed: &[&str]) -> R {
    for k in m.keys() {
        if !allowed.contains(&k.as_str()) {
            return Err(format!(
                "{at}.{k}: unknown field (allowed: {})",
                allowed.join(", ")
            ));
        }
    }
    Ok(())
}

fn string<'a>(v: &'a Value, at: &str, max: usize) -> Result<&'a str, String> {
    let s = v
        .as_str()
        .ok_or_else(|| format!("{at}: expected a string"))?;
    if s.len() > max {
        return Err(format!("{at}: longer than {max} characters"));
    }
    Ok(s)
}

fn uint(v: &Value, at: &str, lo: u64, hi: u64) -> Result<u64, String> {
    let n = v
        .as_u64()
        .ok_or_else(|| format!("{at}: expected an unsigned integer"))?;
    if n < lo || n > hi {
        return Err(format!("{at}: {n} is outside {lo}..={hi}"));
    }
    Ok(n)
}

fn strings<'a>(
    v: &'a Value,
    at: &str,
    max_items: usize,
    max_len: usize,
) -> Result<Vec<&'a str>, String> {
    let a = v
        .as_array()
        .ok_or_else(|| format!("{at}: expected a list"))?;
    if a.len() > max_items {
        return Err(format!("{at}: more than {max_items} items"));
    }
    a.iter()
        .enumerate()
        .map(|(i, x)| string(x, &format!("{at}[{i}]"), max_len))
        .collect()
}

fn string_map(v: &Value, at: &str, max: usize) -> R {
    let m = obj(v, at)?;
    if m.len() > max {
        return Err(format!("{at}: more than {max} entries"));
    }
    for (k, x) in m {
        string(x, &format!("{at}.{k}"), 63)?;
    }
    Ok(())
}

use meshfed_model::validate::is_dns_label as dns_label;

/// A protobuf Duration in its JSON form as Istio reads it (`10s`, `0.5s`, `1m`, `100ms`), at
/// least 1 ms.
fn duration(v: &Value, at: &str) -> R {
    let s = string(v, at, 64)?;
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .ok_or_else(|| format!("{at}: {s:?} is not a duration (e.g. 10s)"))?;
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{at}: {s:?} is not a duration (e.g. 10s)"))?;
    let ms = match unit {
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 6e4,
        "h" => n * 3.6e6,
        _ => return Err(format!("{at}: {s:?}: unit must be ms, s, m or h")),
    };
    if ms < 1.0 {
        return Err(format!("{at}: {s:?}: must be at least 1ms"));
    }
    Ok(())
}

/// Istio's port protocols (istiod's `protocol.Parse`, case-insensitive).
const PROTOCOLS: &[&str] = &[
    "HTTP",
    "HTTPS",
    "GRPC",
    "GRPC-WEB",
    "HTTP2",
    "HTTP_PROXY",
    "TCP",
    "TLS",
    "UDP",
    "MONGO",
    "REDIS",
    "MYSQL",
];

fn metadata(v: &Value) -> R {
    let m = obj(v, "metadata")?;
    let name = m.get("name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() || name.len() > 253 || !name.split('.').all(dns_label) {
        return Err(format!("metadata.name: {name:?} is not a DNS subdomain"));
    }
    if !m
        .get("namespace")
        .and_then(Value::as_str)
        .is_some_and(dns_label)
    {
        return Err("metadata.namespace: missing or not a DNS label".into());
    }
    Ok(())
}

/// A `WorkloadEntry` spec (also the shape of a ServiceEntry's `endpoints`).
fn workload_entry_spec(v: &Value, at: &str, port_names: Option<&[&str]>) -> R {
    let m = obj(v, at)?;
    only(
        m,
        at,
        &[
            "address",
            "ports",
            "labels",
            "network",
            "locality",
            "weight",
            "serviceAccount",
        ],
    )?;
    let address = m
        .get("address")
        .map(|a| string(a, &format!("{at}.address"), 256))
        .transpose()?;
    if address.is_none() && !m.contains_key("network") {
        return Err(format!("{at}: Address is required"));
    }
    if let Some(a) = address {
        if a.parse::<std::net::IpAddr>().is_err() && !a.starts_with("unix://") {
            return Err(format!(
                "{at}.address: {a:?} is not an IP address (required with STATIC resolution)"
            ));
        }
    }
    if let Some(p) = m.get("ports") {
        let pm = obj(p, &format!("{at}.ports"))?;
        if pm.len() > 128 {
            return Err(format!("{at}.ports: more than 128 entries"));
        }
        for (k, n) in pm {
            let ok = !k.is_empty()
                && k.len() < 63
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !k.starts_with('-')
                && !k.ends_with('-');
            if !ok {
                return Err(format!("{at}.ports: {k:?} is not a port name"));
            }
            if let Some(names) = port_names {
                if !names.contains(&k.as_str()) {
                    return Err(format!("{at}.ports.{k}: names no port of the ServiceEntry"));
                }
            }
            uint(n, &format!("{at}.ports.{k}"), 1, 65535)?;
        }
    }
    if let Some(l) = m.get("labels") {
        string_map(l, &format!("{at}.labels"), 256)?;
    }
    for (k, max) in [
        ("network", 2048),
        ("locality", 2048),
        ("serviceAccount", 253),
    ] {
        if let Some(x) = m.get(k) {
            string(x, &format!("{at}.{k}"), max)?;
        }
    }
    if let Some(w) = m.get("weight") {
        uint(w, &format!("{at}.weight"), 0, u64::from(u32::MAX))?;
    }
    Ok(())
}

fn service_entry_spec(v: &Value) -> R {
    let m = obj(v, "spec")?;
    only(
        m,
        "spec",
        &[
            "hosts",
            "addresses",
            "ports",
            "location",
            "resolution",
            "endpoints",
            "workloadSelector",
            "exportTo",
            "subjectAltNames",
        ],
    )?;
    let hosts = strings(
        m.get("hosts").ok_or("spec.hosts: required")?,
        "spec.hosts",
        256,
        255,
    )?;
    if hosts.is_empty() {
        return Err("spec.hosts: at least one host".into());
    }
    if hosts.contains(&"*") {
        return Err("spec.hosts: hostname cannot be wildcard".into());
    }
    if let Some(a) = m.get("addresses") {
        for (i, x) in strings(a, "spec.addresses", 256, 64)?.iter().enumerate() {
            let ip = x.split('/').next().unwrap_or("");
            if ip.parse::<std::net::IpAddr>().is_err() {
                return Err(format!("spec.addresses[{i}]: {x:?} is not an IP or CIDR"));
            }
        }
    }
    let mut names: Vec<&str> = Vec::new();
    let mut numbers: Vec<u64> = Vec::new();
    if let Some(p) = m.get("ports") {
        let ports = p.as_array().ok_or("spec.ports: expected a list")?;
        if ports.len() > 256 {
            return Err("spec.ports: more than 256 ports".into());
        }
        for (i, port) in ports.iter().enumerate() {
            let at = format!("spec.ports[{i}]");
            let pm = obj(port, &at)?;
            only(pm, &at, &["number", "protocol", "name", "targetPort"])?;
            let n = uint(
                pm.get("number").ok_or(format!("{at}.number: required"))?,
                &format!("{at}.number"),
                1,
                65535,
            )?;
            let name = string(
                pm.get("name").ok_or(format!("{at}.name: required"))?,
                &format!("{at}.name"),
                256,
            )?;
            if !dns_label(name) {
                return Err(format!("{at}.name: {name:?} is not a DNS label"));
            }
            if let Some(t) = pm.get("targetPort") {
                uint(t, &format!("{at}.targetPort"), 1, 65535)?;
            }
            if let Some(pr) = pm.get("protocol") {
                let pr = string(pr, &format!("{at}.protocol"), 256)?;
                if !PROTOCOLS.contains(&pr.to_ascii_uppercase().as_str()) {
                    return Err(format!(
                        "{at}.protocol: {pr:?} is not one of {}",
                        PROTOCOLS.join(", ")
                    ));
                }
            }
            if names.contains(&name) {
                return Err(format!("{at}.name: port name {name:?} is given twice"));
            }
            if numbers.contains(&n) {
                return Err(format!(
                    "{at}.number: port number cannot be duplicated ({n})"
                ));
            }
            names.push(name);
            numbers.push(n);
        }
    }
    let location = m
        .get("location")
        .map(|l| string(l, "spec.location", 32))
        .transpose()?;
    if let Some(l) = location {
        if !["MESH_EXTERNAL", "MESH_INTERNAL"].contains(&l) {
            return Err(format!(
                "spec.location: {l:?} is not MESH_EXTERNAL or MESH_INTERNAL"
            ));
        }
    }
    let resolution = m
        .get("resolution")
        .map(|r| string(r, "spec.resolution", 32))
        .transpose()?
        .unwrap_or("NONE");
    if !["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"].contains(&resolution) {
        return Err(format!(
            "spec.resolution: {resolution:?} is not NONE, STATIC, DNS or DNS_ROUND_ROBIN"
        ));
    }
    if m.contains_key("workloadSelector") && m.contains_key("endpoints") {
        return Err("spec: only one of WorkloadSelector or Endpoints can be set".into());
    }
    if let Some(ws) = m.get("workloadSelector") {
        let wm = obj(ws, "spec.workloadSelector")?;
        only(wm, "spec.workloadSelector", &["labels"])?;
        let labels = obj(
            wm.get("labels").unwrap_or(&Value::Null),
            "spec.workloadSelector.labels",
        )?;
        if labels.len() > 256 {
            return Err("spec.workloadSelector.labels: more than 256".into());
        }
        for (k, v) in labels {
            let v = string(v, &format!("spec.workloadSelector.labels.{k}"), 63)?;
            if v.contains('*') {
                return Err(format!(
                    "spec.workloadSelector.labels.{k}: wildcard not allowed"
                ));
            }
        }
    }
    if let Some(e) = m.get("endpoints") {
        if resolution == "NONE" {
            return Err("spec: NONE mode cannot set endpoints".into());
        }
        let eps = e.as_array().ok_or("spec.endpoints: expected a list")?;
        if eps.len() > 4096 {
            return Err("spec.endpoints: more than 4096".into());
        }
        for (i, ep) in eps.iter().enumerate() {
            workload_entry_spec(ep, &format!("spec.endpoints[{i}]"), Some(&names))?;
        }
    }
    for k in ["exportTo", "subjectAltNames"] {
        if let Some(x) = m.get(k) {
            strings(x, &format!("spec.{k}"), 256, 2048)?;
        }
    }
    Ok(())
}

fn outlier_detection(v: &Value, at: &str) -> R {
    let m = obj(v, at)?;
    only(
        m,
        at,
        &[
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
            "minHealthPercent",
            "splitExternalLocalOriginErrors",
            "consecutiveLocalOriginFailures",
        ],
    )?;
    for k in [
        "consecutive5xxErrors",
        "consecutiveGatewayErrors",
        "consecutiveLocalOriginFailures",
    ] {
        if let Some(x) = m.get(k) {
            uint(x, &format!("{at}.{k}"), 0, u64::from(u32::MAX))?;
        }
    }
    for k in ["interval", "baseEjectionTime"] {
        if let Some(x) = m.get(k) {
            duration(x, &format!("{at}.{k}"))?;
        }
    }
    for k in ["maxEjectionPercent", "minHealthPercent"] {
        if let Some(x) = m.get(k) {
            uint(x, &format!("{at}.{k}"), 0, 100)?;
        }
    }
    Ok(())
}

fn locality_lb(v: &Value, at: &str) -> R {
    let m = obj(v, at)?;
    only(
        m,
        at,
        &["enabled", "failoverPriority", "failover", "distribute"],
    )?;
    if let Some(e) = m.get("enabled") {
        e.as_bool()
            .ok_or(format!("{at}.enabled: expected a boolean"))?;
    }
    if let Some(fp) = m.get("failoverPriority") {
        strings(fp, &format!("{at}.failoverPriority"), 256, 1024)?;
    }
    if m.contains_key("distribute") && m.contains_key("failover") {
        return Err(format!(
            "{at}: can not simultaneously specify 'distribute' and 'failover'"
        ));
    }
    if let Some(f) = m.get("failover") {
        for (i, x) in f
            .as_array()
            .ok_or(format!("{at}.failover: expected a list"))?
            .iter()
            .enumerate()
        {
            let a = format!("{at}.failover[{i}]");
            let fm = obj(x, &a)?;
            only(fm, &a, &["from", "to"])?;
            let from = string(
                fm.get("from").unwrap_or(&Value::Null),
                &format!("{a}.from"),
                1024,
            )?;
            let to = string(
                fm.get("to").unwrap_or(&Value::Null),
                &format!("{a}.to"),
                1024,
            )?;
            if from == to {
                return Err(format!(
                    "{a}: locality lb failover settings must specify different regions"
                ));
            }
            if [from, to]
                .iter()
                .any(|r| r.contains('/') || r.contains('*'))
            {
                return Err(format!(
                    "{a}: failover only specifies regions (no '/' or '*')"
                ));
            }
        }
    }
    if let Some(d) = m.get("distribute") {
        for (i, x) in d
            .as_array()
            .ok_or(format!("{at}.distribute: expected a list"))?
            .iter()
            .enumerate()
        {
            let a = format!("{at}.distribute[{i}]");
            let dm = obj(x, &a)?;
            only(dm, &a, &["from", "to"])?;
            string(
                dm.get("from").unwrap_or(&Value::Null),
                &format!("{a}.from"),
                1024,
            )?;
            let to = obj(dm.get("to").unwrap_or(&Value::Null), &format!("{a}.to"))?;
            let mut sum = 0;
            for (k, w) in to {
                sum += uint(w, &format!("{a}.to.{k}"), 1, 100)?;
            }
            if sum != 100 {
                return Err(format!(
                    "{a}.to: weights must sum to 100 (they sum to {sum})"
                ));
            }
        }
    }
    Ok(())
}

fn traffic_policy(v: &Value, at: &str) -> R {
    let m = obj(v, at)?;
    only(m, at, &["loadBalancer", "outlierDetection"])?;
    if let Some(lb) = m.get("loadBalancer") {
        let a = format!("{at}.loadBalancer");
        let lm = obj(lb, &a)?;
        only(lm, &a, &["simple", "localityLbSetting"])?;
        if let Some(s) = lm.get("simple") {
            let s = string(s, &format!("{a}.simple"), 32)?;
            if ![
                "UNSPECIFIED",
                "RANDOM",
                "PASSTHROUGH",
                "ROUND_ROBIN",
                "LEAST_REQUEST",
                "LEAST_CONN",
            ]
            .contains(&s)
            {
                return Err(format!("{a}.simple: {s:?} is not a load balancer"));
            }
        }
        if let Some(l) = lm.get("localityLbSetting") {
            locality_lb(l, &format!("{a}.localityLbSetting"))?;
        }
    }
    if let Some(o) = m.get("outlierDetection") {
        outlier_detection(o, &format!("{at}.outlierDetection"))?;
    }
    Ok(())
}

fn destination_rule_spec(v: &Value) -> R {
    let m = obj(v, "spec")?;
    only(
        m,
        "spec",
        &[
            "host",
            "trafficPolicy",
            "subsets",
            "exportTo",
            "workloadSelector",
        ],
    )?;
    let host = string(
        m.get("host").ok_or("spec.host: required")?,
        "spec.host",
        253,
    )?;
    if host.is_empty() {
        return Err("spec.host: required".into());
    }
    if let Some(tp) = m.get("trafficPolicy") {
        traffic_policy(tp, "spec.trafficPolicy")?;
    }
    if let Some(s) = m.get("subsets") {
        let mut seen = Vec::new();
        for (i, x) in s
            .as_array()
            .ok_or("spec.subsets: expected a list")?
            .iter()
            .enumerate()
        {
            let a = format!("spec.subsets[{i}]");
            let sm = obj(x, &a)?;
            only(sm, &a, &["name", "labels", "trafficPolicy"])?;
            let name = string(
                sm.get("name").ok_or(format!("{a}.name: required"))?,
                &format!("{a}.name"),
                63,
            )?;
            if !dns_label(name) {
                return Err(format!("{a}.name: {name:?} is not a DNS label"));
            }
            if seen.contains(&name) {
                return Err(format!("{a}.name: subset {name:?} is given twice"));
            }
            seen.push(name);
            if let Some(l) = sm.get("labels") {
                string_map(l, &format!("{a}.labels"), 256)?;
            }
            if let Some(tp) = sm.get("trafficPolicy") {
                traffic_policy(tp, &format!("{a}.trafficPolicy"))?;
            }
        }
    }
    if let Some(x) = m.get("exportTo") {
        strings(x, "spec.exportTo", 256, 253)?;
    }
    Ok(())
}

/// Checks an object of one of these kinds against Istio's schema: `apiVersion`
/// `networking.istio.io/v1`, metadata, and the spec. The error names the field.
pub fn check(v: &Value) -> R {
    let m = obj(v, "object")?;
    let kind = m.get("kind").and_then(Value::as_str).unwrap_or("");
    let at = |e: String| format!("{kind}: {e}");
    if m.get("apiVersion").and_then(Value::as_str) != Some("networking.istio.io/v1") {
        return Err(at("apiVersion: expected networking.istio.io/v1".into()));
    }
    metadata(m.get("metadata").unwrap_or(&Value::Null)).map_err(at)?;
    let spec = m.get("spec").ok_or_else(|| at("spec: required".into()))?;
    match kind {
        "ServiceEntry" => service_entry_spec(spec),
        "WorkloadEntry" => workload_entry_spec(spec, "spec", None),
        "DestinationRule" => destination_rule_spec(spec),
        _ => Err(format!(
            "{kind:?} is not ServiceEntry, WorkloadEntry or DestinationRule"
        )),
    }
    .map_err(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The examples of the Istio reference pages (istio.io/latest/docs/reference/config/
    /// networking/service-entry, workload-entry, destination-rule), as JSON: each passes.
    #[test]
    fn the_reference_examples_pass() {
        let examples = [
            json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": "external-svc-mongocluster", "namespace": "egress"},
                "spec": {"hosts": ["mymongodb.somedomain"], "addresses": ["192.192.192.192/24"],
                         "ports": [{"number": 27018, "name": "mongodb", "protocol": "MONGO"}],
                         "location": "MESH_INTERNAL", "resolution": "STATIC",
                         "endpoints": [{"address": "2.2.2.2"}, {"address": "3.3.3.3"}]}}),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                "metadata": {"name": "details-svc", "namespace": "bookinfo"},
                "spec": {"hosts": ["details.bookinfo.com"], "location": "MESH_INTERNAL",
                         "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                         "resolution": "STATIC",
                         "workloadSelector": {"labels": {"app": "details-legacy"}}}}),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                "metadata": {"name": "details-svc", "namespace": "bookinfo"},
                "spec": {"serviceAccount": "details-legacy", "address": "2.2.2.2",
                         "labels": {"app": "details-legacy", "instance-id": "vm1"}}}),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                "metadata": {"name": "details-svc", "namespace": "bookinfo"},
                "spec": {"address": "1.1.1.1", "network": "vm-us-east", "locality": "us-east1/us-east1-b",
                         "ports": {"http": 8080}, "weight": 3}}),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                "metadata": {"name": "bookinfo-ratings", "namespace": "bookinfo"},
                "spec": {"host": "ratings.prod.svc.cluster.local",
                         "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
                         "subsets": [{"name": "testversion", "labels": {"version": "v3"},
                                      "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}}}]}}),
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                "metadata": {"name": "helloworld", "namespace": "sample"},
                "spec": {"host": "helloworld.sample.svc.cluster.local",
                         "trafficPolicy": {"loadBalancer": {"localityLbSetting": {"enabled": true,
                                 "failover": [{"from": "region1", "to": "region2"}]}},
                             "outlierDetection": {"consecutive5xxErrors": 1, "interval": "1s",
                                                  "baseEjectionTime": "1m"}}}}),
        ];
        for e in examples {
            check(&e).unwrap_or_else(|err| panic!("{err}: {e}"));
        }
    }

    #[test]
    fn each_rule_is_enforced_naming_the_field() {
        let se = json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"name": "a", "namespace": "b"},
            "spec": {"hosts": ["a.b"], "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                     "resolution": "STATIC", "workloadSelector": {"labels": {"x": "y"}}}});
        let bad = |path: &[&str], v: Value, want: &str| {
            let mut o = se.clone();
            let mut cur = &mut o;
            for p in &path[..path.len() - 1] {
                cur = if let Ok(i) = p.parse::<usize>() {
                    &mut cur[i]
                } else {
                    &mut cur[*p]
                };
            }
            cur[path[path.len() - 1]] = v;
            let e = check(&o).unwrap_err();
            assert!(e.contains(want), "{path:?}: {e}");
        };
        bad(&["spec", "hosts"], json!(["*"]), "cannot be wildcard");
        bad(&["spec", "hosts"], json!([]), "at least one host");
        bad(&["spec", "location"], json!("MESH_INSIDE"), "spec.location");
        bad(&["spec", "resolution"], json!("STATICS"), "spec.resolution");
        bad(
            &["spec", "ports", "0", "number"],
            json!(0),
            "spec.ports[0].number",
        );
        bad(
            &["spec", "ports", "0", "number"],
            json!(70000),
            "spec.ports[0].number",
        );
        bad(
            &["spec", "ports", "0", "protocol"],
            json!("QUIC"),
            "spec.ports[0].protocol",
        );
        bad(
            &["spec", "ports", "0", "name"],
            json!("Http_1"),
            "spec.ports[0].name",
        );
        bad(
            &["spec", "endpoints"],
            json!([{"address": "1.2.3.4"}]),
            "only one of WorkloadSelector or Endpoints",
        );
        bad(
            &["spec", "addresses"],
            json!(["not-an-ip"]),
            "spec.addresses[0]",
        );
        bad(
            &["spec", "hostz"],
            json!(["x"]),
            "spec.hostz: unknown field",
        );
        bad(
            &["apiVersion"],
            json!("networking.istio.io/v1alpha3"),
            "apiVersion",
        );
        bad(&["metadata", "name"], json!("Bad_Name"), "metadata.name");
        let we = json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {"name": "a", "namespace": "b"}, "spec": {"address": "example.com"}});
        assert!(check(&we).unwrap_err().contains("spec.address"));
        let we = json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {"name": "a", "namespace": "b"}, "spec": {"address": "1.2.3.4", "ports": {"http": 0}}});
        assert!(check(&we).unwrap_err().contains("spec.ports.http"));
        let we = json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
            "metadata": {"name": "a", "namespace": "b"}, "spec": {"address": "1.2.3.4", "weight": -1}});
        assert!(check(&we).unwrap_err().contains("spec.weight"));
        let dr = |tp: Value| {
            json!({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": {"name": "a", "namespace": "b"}, "spec": {"host": "a", "trafficPolicy": tp}})
        };
        for (tp, want) in [
            (
                json!({"outlierDetection": {"interval": "10"}}),
                "outlierDetection.interval",
            ),
            (
                json!({"outlierDetection": {"interval": "0.0001s"}}),
                "at least 1ms",
            ),
            (
                json!({"outlierDetection": {"maxEjectionPercent": 101}}),
                "maxEjectionPercent",
            ),
            (
                json!({"loadBalancer": {"localityLbSetting": {"failover": [{"from": "a", "to": "a"}]}}}),
                "different regions",
            ),
            (
                json!({"loadBalancer": {"localityLbSetting": {"distribute": [{"from": "a/*", "to": {"b/*": 60}}]}}}),
                "sum to 100",
            ),
            (
                json!({"loadBalancer": {"localityLbSetting": {"distribute": [], "failover": []}}}),
                "simultaneously",
            ),
            (json!({"loadBalancer": {"simple": "FASTEST"}}), "simple"),
        ] {
            let e = check(&dr(tp.clone())).unwrap_err();
            assert!(e.contains(want), "{tp}: {e}");
        }
        let mut d = dr(json!({}));
        d["spec"]["subsets"] = json!([{"name": "v1"}, {"name": "v1"}]);
        assert!(check(&d).unwrap_err().contains("given twice"));
    }
}
