//! Envoy v3 resources for one service port: an `api_listener` Listener and a
//! RouteConfiguration for proxyless gRPC, an EDS Cluster (plain, or with mTLS in the gRPC A29
//! or Istio SDS form) and the ClusterLoadAssignment built from a priority table.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3 as cluster;
use envoy_types::pb::envoy::config::core::v3 as core;
use envoy_types::pb::envoy::config::endpoint::v3 as endpoint;
use envoy_types::pb::envoy::config::listener::v3 as listener;
use envoy_types::pb::envoy::config::route::v3 as route;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3 as hcm;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
use envoy_types::pb::envoy::r#type::matcher::v3 as matcher;
use envoy_types::pb::google::protobuf::{Any, Duration, UInt32Value};
use prost::{Message, Name};

use meshfed_failover::Table;
use meshfed_model::policy::routes::{Destination, HttpRoute, RouteMatch, Routes, StringMatch};
use meshfed_model::policy::Policy;

/// One encoded resource, shared by every proxy it is sent to.
#[derive(Debug, PartialEq)]
pub struct Res {
    pub name: Arc<str>,
    pub any: Any,
    /// Content hash: a proxy is sent a resource only when this differs from what it has.
    pub hash: u64,
}

pub type SharedRes = Arc<Res>;

impl Res {
    pub fn new<M: Message + Name>(name: &str, m: &M) -> SharedRes {
        let value = m.encode_to_vec();
        let mut h = std::hash::DefaultHasher::new();
        value.hash(&mut h);
        Arc::new(Res {
            name: name.into(),
            any: Any {
                type_url: M::type_url(),
                value,
            },
            hash: h.finish(),
        })
    }

    /// The per-resource version used by Delta xDS.
    pub fn version(&self) -> String {
        format!("{:016x}", self.hash)
    }
}

pub fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn ads() -> core::ConfigSource {
    core::ConfigSource {
        config_source_specifier: Some(core::config_source::ConfigSourceSpecifier::Ads(
            core::AggregatedConfigSource {},
        )),
        resource_api_version: core::ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// `outbound|<port>|<subset>|<host>`, Istio's cluster name.
pub fn cluster_name(host: &str, port: u32, subset: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// `outbound_.<port>_.<subset>_.<host>` (`outbound_.<port>_._.<host>` without a subset), the
/// SNI Istio's east-west gateways route on.
pub fn sni(host: &str, port: u32, subset: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{host}")
}

/// The listener (and route configuration) name a proxyless gRPC client asks for: `host:port`.
pub fn listener_name(host: &str, port: u32) -> String {
    format!("{host}:{port}")
}

pub fn listener(host: &str, port: u32) -> listener::Listener {
    let name = listener_name(host, port);
    let manager = hcm::HttpConnectionManager {
        stat_prefix: name.clone(),
        codec_type: hcm::http_connection_manager::CodecType::Auto as i32,
        route_specifier: Some(hcm::http_connection_manager::RouteSpecifier::Rds(
            hcm::Rds {
                config_source: Some(ads()),
                route_config_name: name.clone(),
            },
        )),
        http_filters: vec![hcm::HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(hcm::http_filter::ConfigType::TypedConfig(any(
                &Router::default(),
            ))),
            ..Default::default()
        }],
        ..Default::default()
    };
    listener::Listener {
        name,
        api_listener: Some(listener::ApiListener {
            api_listener: Some(any(&manager)),
        }),
        ..Default::default()
    }
}

/// The route configuration of `host:port`: one route to the service's cluster, or, with a
/// `VirtualService` for the host, its routes for this port in order (one Envoy route per
/// match, as Istio builds them), each to its destinations' clusters
/// (`outbound|<port>|<subset>|<host>`), weighted when there are several. A call that meets no
/// route fails, as with Istio.
pub fn route_configuration(
    host: &str,
    port: u32,
    routes: Option<&Routes>,
) -> route::RouteConfiguration {
    let name = listener_name(host, port);
    // Without a VirtualService: one route, every call to the whole service.
    let whole = HttpRoute {
        name: String::new(),
        matches: Vec::new(),
        to: vec![Destination {
            subset: String::new(),
            port: None,
            weight: 100,
        }],
        timeout_ms: None,
        retries: None,
    };
    let http: Vec<(&HttpRoute, Vec<&RouteMatch>)> = match routes {
        Some(rs) => rs.for_port(port).collect(),
        None => vec![(&whole, Vec::new())],
    };
    let every_call = RouteMatch::default();
    let mut routes = Vec::new();
    for (r, matches) in http {
        let action = route_action(host, port, r);
        let matches = if matches.is_empty() {
            vec![&every_call]
        } else {
            matches
        };
        for m in matches {
            routes.extend(envoy_routes(&r.name, m, &action));
        }
    }
    route::RouteConfiguration {
        name: name.clone(),
        virtual_hosts: vec![route::VirtualHost {
            name: name.clone(),
            domains: vec![host.to_string(), name],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn route_action(host: &str, port: u32, r: &HttpRoute) -> route::RouteAction {
    use route::route_action::ClusterSpecifier;
    let cluster = |d: &Destination| cluster_name(host, d.port.unwrap_or(port), &d.subset);
    let cluster_specifier = match r.to.as_slice() {
        [one] => ClusterSpecifier::Cluster(cluster(one)),
        many => ClusterSpecifier::WeightedClusters(route::WeightedCluster {
            clusters: many
                .iter()
                .filter(|d| d.weight > 0)
                .map(|d| route::weighted_cluster::ClusterWeight {
                    name: cluster(d),
                    weight: Some(UInt32Value { value: d.weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    };
    route::RouteAction {
        cluster_specifier: Some(cluster_specifier),
        // gRFC A44: retries on status codes.
        retry_policy: r.retries.as_ref().map(|x| route::RetryPolicy {
            retry_on: x.on.join(","),
            num_retries: Some(UInt32Value { value: x.attempts }),
            ..Default::default()
        }),
        // gRFC A31: the call's deadline is at most this.
        max_stream_duration: r
            .timeout_ms
            .map(|ms| route::route_action::MaxStreamDuration {
                max_stream_duration: Some(duration_ms(ms)),
                grpc_timeout_header_max: Some(duration_ms(ms)),
                ..Default::default()
            }),
        ..Default::default()
    }
}

fn string_matcher(m: &StringMatch) -> matcher::StringMatcher {
    use matcher::string_matcher::MatchPattern;
    matcher::StringMatcher {
        match_pattern: Some(match m {
            StringMatch::Exact(v) => MatchPattern::Exact(v.clone()),
            StringMatch::Prefix(v) => MatchPattern::Prefix(v.clone()),
            StringMatch::Regex(v) => MatchPattern::SafeRegex(regex_matcher(v)),
        }),
        ..Default::default()
    }
}

fn regex_matcher(re: &str) -> matcher::RegexMatcher {
    matcher::RegexMatcher {
        regex: re.to_string(),
        ..Default::default()
    }
}

/// The Envoy routes of one match. A `withoutHeaders` entry holds when the header is absent or
/// does not match; Envoy's and gRPC's inverted matchers fail on an absent header, so each such
/// entry becomes two alternatives (absent; present and not matching), one route per
/// combination, in order.
fn envoy_routes(name: &str, m: &RouteMatch, action: &route::RouteAction) -> Vec<route::Route> {
    use route::route_match::PathSpecifier;
    let path = match &m.uri {
        None => PathSpecifier::Prefix(String::new()),
        Some(StringMatch::Exact(p)) => PathSpecifier::Path(p.clone()),
        Some(StringMatch::Prefix(p)) => PathSpecifier::Prefix(p.clone()),
        Some(StringMatch::Regex(r)) => PathSpecifier::SafeRegex(regex_matcher(r)),
    };
    // Istio reads `prefix: ""` as "any value": the header present (an empty prefix is not a
    // valid StringMatcher).
    let header = |(name, sm): &(String, StringMatch), invert: bool| route::HeaderMatcher {
        name: name.clone(),
        invert_match: invert,
        header_match_specifier: Some(match sm {
            StringMatch::Prefix(p) if p.is_empty() => {
                route::header_matcher::HeaderMatchSpecifier::PresentMatch(true)
            }
            sm => route::header_matcher::HeaderMatchSpecifier::StringMatch(string_matcher(sm)),
        }),
        ..Default::default()
    };
    // "Present", inverted: absent. (gRPC releases differ on `present_match: false` alone.)
    let absent = |name: &str| route::HeaderMatcher {
        name: name.to_string(),
        invert_match: true,
        header_match_specifier: Some(route::header_matcher::HeaderMatchSpecifier::PresentMatch(
            true,
        )),
        ..Default::default()
    };
    let n = m.without_headers.len();
    (0..1u32 << n)
        .map(|mask| {
            let headers = m
                .headers
                .iter()
                .map(|h| header(h, false))
                .chain(m.without_headers.iter().enumerate().map(|(i, h)| {
                    if mask & (1 << i) == 0 {
                        header(h, true)
                    } else {
                        absent(&h.0)
                    }
                }))
                .collect();
            route::Route {
                name: name.to_string(),
                r#match: Some(route::RouteMatch {
                    path_specifier: Some(path.clone()),
                    headers,
                    ..Default::default()
                }),
                action: Some(route::route::Action::Route(action.clone())),
                ..Default::default()
            }
        })
        .collect()
}

/// Which TLS form a cluster carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsForm {
    /// gRPC A29: certificate provider instances named in the client's bootstrap.
    Grpc,
    /// Istio's Envoy form: SDS secrets `default` and `ROOTCA`, SNI, ALPN `istio`.
    Envoy,
}

/// The certificate provider instance proxyless clients must define in their bootstrap.
pub const GRPC_CERT_PROVIDER: &str = "default";

fn duration_ms(ms: u64) -> Duration {
    Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

fn sds(name: &str) -> tls::SdsSecretConfig {
    tls::SdsSecretConfig {
        name: name.into(),
        sds_config: Some(core::ConfigSource {
            config_source_specifier: Some(
                core::config_source::ConfigSourceSpecifier::ApiConfigSource(
                    core::ApiConfigSource {
                        api_type: core::api_config_source::ApiType::Grpc as i32,
                        set_node_on_first_message_only: true,
                        transport_api_version: core::ApiVersion::V3 as i32,
                        grpc_services: vec![core::GrpcService {
                            target_specifier: Some(core::grpc_service::TargetSpecifier::EnvoyGrpc(
                                core::grpc_service::EnvoyGrpc {
                                    cluster_name: "sds-grpc".into(),
                                    ..Default::default()
                                },
                            )),
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                ),
            ),
            initial_fetch_timeout: Some(Duration::default()),
            resource_api_version: core::ApiVersion::V3 as i32,
            ..Default::default()
        }),
    }
}

#[allow(deprecated)]
fn upstream_tls(
    host: &str,
    port: u32,
    subset: &str,
    sans: &[String],
    form: TlsForm,
) -> tls::UpstreamTlsContext {
    let matchers: Vec<matcher::StringMatcher> = sans
        .iter()
        .map(|s| matcher::StringMatcher {
            match_pattern: Some(matcher::string_matcher::MatchPattern::Exact(s.clone())),
            ..Default::default()
        })
        .collect();
    let common = match form {
        TlsForm::Grpc => tls::CommonTlsContext {
            tls_certificate_provider_instance: Some(tls::CertificateProviderPluginInstance {
                instance_name: GRPC_CERT_PROVIDER.into(),
                certificate_name: String::new(),
            }),
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                    tls::common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(tls::CertificateValidationContext {
                            ca_certificate_provider_instance: Some(
                                tls::CertificateProviderPluginInstance {
                                    instance_name: GRPC_CERT_PROVIDER.into(),
                                    certificate_name: String::new(),
                                },
                            ),
                            match_subject_alt_names: matchers,
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        },
        // The SDS secret `ROOTCA` brings Envoy's SPIFFE validator (one bundle per trust
        // domain, `secrets::root_secret`); Envoy merges it into this default context, whose
        // typed URI matchers the validator applies after verifying the chain.
        TlsForm::Envoy => tls::CommonTlsContext {
            alpn_protocols: vec!["istio-peer-exchange".into(), "istio".into()],
            tls_certificate_sds_secret_configs: vec![sds(super::secrets::CERT_SECRET)],
            validation_context_type: Some(
                tls::common_tls_context::ValidationContextType::CombinedValidationContext(
                    tls::common_tls_context::CombinedCertificateValidationContext {
                        default_validation_context: Some(tls::CertificateValidationContext {
                            match_typed_subject_alt_names: matchers
                                .into_iter()
                                .map(|m| tls::SubjectAltNameMatcher {
                                    san_type: tls::subject_alt_name_matcher::SanType::Uri as i32,
                                    matcher: Some(m),
                                    ..Default::default()
                                })
                                .collect(),
                            ..Default::default()
                        }),
                        validation_context_sds_secret_config: Some(sds(
                            super::secrets::ROOT_SECRET,
                        )),
                        ..Default::default()
                    },
                ),
            ),
            ..Default::default()
        },
    };
    tls::UpstreamTlsContext {
        common_tls_context: Some(common),
        // Both forms name the SNI east-west gateways route on: Envoy sends it; gRPC clients
        // send it under gRFC A101 (GRPC_EXPERIMENTAL_XDS_SNI=true) and ignore it otherwise
        // (A29).
        sni: sni(host, port, subset),
        ..Default::default()
    }
}

/// An EDS cluster. `sans` non-empty turns mTLS on, accepting exactly those SPIFFE IDs.
pub fn cluster(
    host: &str,
    port: u32,
    subset: &str,
    policy: Option<&Policy>,
    sans: &[String],
    form: TlsForm,
) -> cluster::Cluster {
    let name = cluster_name(host, port, subset);
    let outlier = policy
        .and_then(|p| p.outlier.as_ref())
        .map(|o| cluster::OutlierDetection {
            consecutive_5xx: o.consecutive_5xx_errors.map(|value| UInt32Value { value }),
            consecutive_gateway_failure: o
                .consecutive_gateway_errors
                .map(|value| UInt32Value { value }),
            enforcing_consecutive_gateway_failure: o
                .consecutive_gateway_errors
                .map(|_| UInt32Value { value: 100 }),
            interval: o.interval_ms.map(duration_ms),
            base_ejection_time: o.base_ejection_time_ms.map(duration_ms),
            max_ejection_percent: o.max_ejection_percent.map(|value| UInt32Value { value }),
            ..Default::default()
        });
    cluster::Cluster {
        name: name.clone(),
        alt_stat_name: name,
        cluster_discovery_type: Some(cluster::cluster::ClusterDiscoveryType::Type(
            cluster::cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(duration_ms(10_000)),
        lb_policy: cluster::cluster::LbPolicy::RoundRobin as i32,
        // EDS always carries locality weights; Envoy honours them only with this set.
        common_lb_config: Some(cluster::cluster::CommonLbConfig {
            locality_config_specifier: Some(
                cluster::cluster::common_lb_config::LocalityConfigSpecifier::LocalityWeightedLbConfig(
                    cluster::cluster::common_lb_config::LocalityWeightedLbConfig {},
                ),
            ),
            ..Default::default()
        }),
        outlier_detection: outlier,
        transport_socket: if sans.is_empty() {
            None
        } else {
            Some(core::TransportSocket {
                name: "envoy.transport_sockets.tls".into(),
                config_type: Some(core::transport_socket::ConfigType::TypedConfig(any(
                    &upstream_tls(host, port, subset, sans, form),
                ))),
            })
        },
        ..Default::default()
    }
}

fn socket_address(addr: &str) -> core::Address {
    let (ip, port) = match addr.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_start_matches('[').trim_end_matches(']'),
            p.parse().unwrap_or(0),
        ),
        None => (addr, 0),
    };
    core::Address {
        address: Some(core::address::Address::SocketAddress(core::SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(core::socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

/// The ClusterLoadAssignment for a table: one LocalityLbEndpoints per row.
pub fn load_assignment(name: &str, table: &Table) -> endpoint::ClusterLoadAssignment {
    endpoint::ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: table
            .rows
            .iter()
            .map(|r| endpoint::LocalityLbEndpoints {
                locality: Some(core::Locality {
                    region: r.locality.region.clone(),
                    zone: r.locality.zone.clone(),
                    sub_zone: r.locality.subzone.clone(),
                }),
                lb_endpoints: r
                    .endpoints
                    .iter()
                    .map(|e| endpoint::LbEndpoint {
                        host_identifier: Some(endpoint::lb_endpoint::HostIdentifier::Endpoint(
                            endpoint::Endpoint {
                                address: Some(socket_address(&e.address)),
                                ..Default::default()
                            },
                        )),
                        health_status: if e.healthy {
                            core::HealthStatus::Healthy as i32
                        } else {
                            core::HealthStatus::Unhealthy as i32
                        },
                        load_balancing_weight: Some(UInt32Value {
                            value: e.weight.max(1),
                        }),
                        ..Default::default()
                    })
                    .collect(),
                load_balancing_weight: Some(UInt32Value {
                    value: r.weight.max(1),
                }),
                priority: r.priority,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use meshfed_model::policy::PolicySet;

    /// A VirtualService's routes in Envoy's terms (the fields gRPC's xDS client reads: path
    /// and header matchers, inverted for withoutHeaders, weighted clusters, max stream
    /// duration), one route per match, in order.
    #[test]
    fn a_virtual_service_becomes_envoy_routes() {
        let text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: l, namespace: shop}\nspec:\n  hosts: [l]\n  http:\n    - name: canary\n      match:\n        - headers: {x-version: {exact: v2}}\n          withoutHeaders: {x-debug: {regex: \"on|yes\"}}\n        - uri: {exact: /shop.L/Get}\n      route: [{destination: {host: l, subset: v2}}]\n      timeout: 250ms\n      retries: {attempts: 2, retryOn: \"unavailable,internal\"}\n    - match: [{uri: {regex: \"/shop.L/.*\"}, port: 8080}]\n      route: [{destination: {host: l, subset: v9}}]\n    - route:\n        - {destination: {host: l, subset: v1}, weight: 75}\n        - {destination: {host: l, subset: v2, port: {number: 9091}}, weight: 25}\n";
        let set = PolicySet::from_sources(&[("r.yaml".into(), text.into())]).unwrap();
        let host = "l.shop.svc.cluster.local";
        let rc = route_configuration(host, 9090, set.routes_by_host.get(host));
        let vh = &rc.virtual_hosts[0];
        assert_eq!(vh.domains, [host.to_string(), format!("{host}:9090")]);
        // The route limited to port 8080 is left out of port 9090's configuration; the first
        // match's withoutHeaders makes two routes (x-debug present and not matching; absent).
        assert_eq!(vh.routes.len(), 4);
        let (a, a2, b, c) = (&vh.routes[0], &vh.routes[1], &vh.routes[2], &vh.routes[3]);
        let m2 = a2.r#match.as_ref().unwrap();
        assert_eq!(
            (
                m2.headers[1].name.as_str(),
                m2.headers[1].invert_match,
                &m2.headers[1].header_match_specifier
            ),
            (
                "x-debug",
                true,
                &Some(route::header_matcher::HeaderMatchSpecifier::PresentMatch(
                    true
                ))
            ),
            "the alternative: x-debug absent"
        );
        assert_eq!(a.action, a2.action);
        assert_eq!(a.name, "canary");
        let m = a.r#match.as_ref().unwrap();
        assert_eq!(
            m.path_specifier,
            Some(route::route_match::PathSpecifier::Prefix(String::new()))
        );
        assert_eq!(m.headers.len(), 2);
        assert_eq!(
            (m.headers[0].name.as_str(), m.headers[0].invert_match),
            ("x-version", false)
        );
        assert_eq!(
            (m.headers[1].name.as_str(), m.headers[1].invert_match),
            ("x-debug", true)
        );
        let Some(route::header_matcher::HeaderMatchSpecifier::StringMatch(sm)) =
            &m.headers[1].header_match_specifier
        else {
            panic!("{:?}", m.headers[1])
        };
        assert_eq!(
            sm.match_pattern,
            Some(matcher::string_matcher::MatchPattern::SafeRegex(
                regex_matcher("on|yes")
            ))
        );
        assert_eq!(
            b.r#match.as_ref().unwrap().path_specifier,
            Some(route::route_match::PathSpecifier::Path(
                "/shop.L/Get".into()
            ))
        );
        assert_eq!(
            a.action, b.action,
            "both matches of one route share its action"
        );
        let Some(route::route::Action::Route(act)) = &a.action else {
            panic!()
        };
        assert_eq!(
            act.cluster_specifier,
            Some(route::route_action::ClusterSpecifier::Cluster(format!(
                "outbound|9090|v2|{host}"
            )))
        );
        let retry = act.retry_policy.as_ref().unwrap();
        assert_eq!(retry.retry_on, "unavailable,internal");
        assert_eq!(retry.num_retries, Some(UInt32Value { value: 2 }));
        let msd = act.max_stream_duration.as_ref().unwrap();
        assert_eq!(msd.max_stream_duration, Some(duration_ms(250)));
        assert_eq!(msd.grpc_timeout_header_max, Some(duration_ms(250)));
        let Some(route::route::Action::Route(split)) = &c.action else {
            panic!()
        };
        let Some(route::route_action::ClusterSpecifier::WeightedClusters(w)) =
            &split.cluster_specifier
        else {
            panic!("{split:?}")
        };
        let ws: Vec<(&str, u32)> = w
            .clusters
            .iter()
            .map(|c| (c.name.as_str(), c.weight.unwrap().value))
            .collect();
        let (v1, v2) = (
            format!("outbound|9090|v1|{host}"),
            format!("outbound|9091|v2|{host}"),
        );
        assert_eq!(ws, [(v1.as_str(), 75), (v2.as_str(), 25)]);
        // An empty header prefix is "present".
        let any = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: l, namespace: shop}\nspec:\n  hosts: [l]\n  http:\n    - match: [{headers: {x-canary: {prefix: \"\"}}}]\n      route: [{destination: {host: l, subset: v2}}]\n";
        let set2 = PolicySet::from_sources(&[("a.yaml".into(), any.into())]).unwrap();
        let rc2 = route_configuration(host, 9090, set2.routes_by_host.get(host));
        let h = &rc2.virtual_hosts[0].routes[0]
            .r#match
            .as_ref()
            .unwrap()
            .headers[0];
        assert_eq!(
            (h.invert_match, &h.header_match_specifier),
            (
                false,
                &Some(route::header_matcher::HeaderMatchSpecifier::PresentMatch(
                    true
                ))
            )
        );
        // Port 8080 gets the regex route too.
        let rc = route_configuration(host, 8080, set.routes_by_host.get(host));
        assert_eq!(rc.virtual_hosts[0].routes.len(), 5);
    }
}
