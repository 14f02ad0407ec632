//! The DNS request handler: answers for the mesh zones from the name table, forwards the rest
//! to the upstream resolvers through hickory's resolver (UDP, TCP on truncation, a response
//! cache, retries across upstreams).
//!
//! hickory-server itself answers FORMERR to a message whose header reads but whose body does
//! not, and drops packets shorter than a header and responses (QR=1). Here: FORMERR for anything
//! but exactly one question, NOTIMP for opcodes other than QUERY, BADVERS for EDNS versions
//! above 0, REFUSED for classes other than IN in the mesh zones.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::{Resolver, TokioResolver};
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA, SRV, TXT};
use hickory_server::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use prometheus::IntCounterVec;
use tokio::sync::watch;

use super::table::{self, Lookup, NameTable};

/// TTL of mesh answers: short, since endpoints and VIPs follow the federation.
const TTL: u32 = 5;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

pub struct MeshDns {
    names: watch::Receiver<Arc<NameTable>>,
    upstream: Vec<SocketAddr>,
    /// `None` when there is no upstream (foreign names are refused).
    resolver: Option<TokioResolver>,
    soa: [Record; 2],
    queries: IntCounterVec,
}

impl std::fmt::Debug for MeshDns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshDns")
            .field("upstream", &self.upstream)
            .finish()
    }
}

fn soa(zone: &str) -> anyhow::Result<Record> {
    let z = Name::from_str(&format!("{zone}."))?;
    Ok(Record::from_rdata(
        z.clone(),
        TTL,
        RData::SOA(SOA::new(
            Name::from_str(&format!("ns.dns.{zone}."))?,
            Name::from_str(&format!("hostmaster.{zone}."))?,
            1,
            3600,
            600,
            86400,
            TTL,
        )),
    ))
}

impl MeshDns {
    pub fn new(
        names: watch::Receiver<Arc<NameTable>>,
        upstream: Vec<SocketAddr>,
        registry: &prometheus::Registry,
    ) -> anyhow::Result<Self> {
        let queries = IntCounterVec::new(
            prometheus::Opts::new(
                "meshfed_dns_queries_total",
                "DNS queries by outcome (answered, nodata, nxdomain, forwarded, formerr, refused, servfail, notimp)",
            ),
            &["result"],
        )?;
        // Several servers may share a registry in tests; the first registration wins.
        let _ = registry.register(Box::new(queries.clone()));
        let resolver = if upstream.is_empty() {
            None
        } else {
            Some(forwarder(&upstream)?)
        };
        Ok(MeshDns {
            names,
            resolver,
            upstream,
            soa: [soa(table::CLUSTER_ZONE)?, soa(table::CLUSTERSET_ZONE)?],
            queries,
        })
    }

    fn soa_of(&self, zone: &str) -> &Record {
        if zone == table::CLUSTER_ZONE {
            &self.soa[0]
        } else {
            &self.soa[1]
        }
    }

    fn zone_of(qname: &str) -> &'static str {
        if qname
            .trim_end_matches('.')
            .to_ascii_lowercase()
            .ends_with(table::CLUSTERSET_ZONE)
        {
            table::CLUSTERSET_ZONE
        } else {
            table::CLUSTER_ZONE
        }
    }
}

fn fallback(request: &Request, rcode: ResponseCode) -> ResponseInfo {
    let mut m = Metadata::response_from_request(&request.metadata);
    m.response_code = rcode;
    Header {
        metadata: m,
        counts: Default::default(),
    }
    .into()
}

fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|req| {
        let mut e = Edns::new();
        e.set_max_payload(req.max_payload().clamp(512, 4096));
        e
    })
}

async fn send_rcode<R: ResponseHandler>(
    request: &Request,
    rcode: ResponseCode,
    mut rh: R,
) -> ResponseInfo {
    let mut b = MessageResponseBuilder::from_message_request(request);
    let edns = response_edns(request);
    if let Some(e) = &edns {
        b.edns(e);
    }
    match rh
        .send_response(b.error_msg(&request.metadata, rcode))
        .await
    {
        Ok(i) => i,
        Err(_) => fallback(request, rcode),
    }
}

#[async_trait::async_trait]
impl RequestHandler for MeshDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut rh: R,
    ) -> ResponseInfo {
        if request.metadata.op_code != OpCode::Query {
            self.queries.with_label_values(&["notimp"]).inc();
            return send_rcode(request, ResponseCode::NotImp, rh).await;
        }
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            self.queries.with_label_values(&["formerr"]).inc();
            return send_rcode(request, ResponseCode::BADVERS, rh).await;
        }
        let info = match request.request_info() {
            Ok(i) => i,
            Err(_) => {
                self.queries.with_label_values(&["formerr"]).inc();
                return send_rcode(request, ResponseCode::FormErr, rh).await;
            }
        };
        let qname: Name = info.query.name().into();
        let qtype = info.query.query_type();
        let names = self.names.borrow().clone();
        let text = qname.to_ascii();
        let found = names.lookup(&text);
        if found == Lookup::Foreign {
            return self.forward(request, rh).await;
        }
        if info.query.query_class() != DNSClass::IN {
            self.queries.with_label_values(&["refused"]).inc();
            return send_rcode(request, ResponseCode::Refused, rh).await;
        }
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.authoritative = true;
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        let mut zone = Self::zone_of(&text);
        match &found {
            Lookup::Service { zone: z, svc, .. } if svc.headless => {
                zone = z;
                // A headless service answers with its endpoints; with none, the name does not
                // exist (MCS DNS specification).
                if svc.endpoints.is_empty() {
                    meta.response_code = ResponseCode::NXDomain;
                }
                let mut seen = std::collections::BTreeSet::new();
                for e in &svc.endpoints {
                    if seen.insert(e.address) {
                        if let Some(r) = address_record(&qname, qtype, e.address) {
                            answers.push(r);
                        }
                    }
                }
            }
            Lookup::Endpoint { zone: z, address } => {
                zone = z;
                if let Some(r) = address_record(&qname, qtype, *address) {
                    answers.push(r);
                }
            }
            Lookup::Port {
                zone: z,
                svc,
                namespace,
                name,
                port,
            } if svc.headless && svc.endpoints.iter().any(|e| !e.hostname.is_empty()) => {
                // One SRV per endpoint with a hostname, pointing at its own name.
                zone = z;
                if matches!(qtype, RecordType::SRV | RecordType::ANY) {
                    for e in svc.endpoints.iter().filter(|e| !e.hostname.is_empty()) {
                        // Per-endpoint names exist under clusterset.local only.
                        let Ok(target) = Name::from_str(&format!(
                            "{}.{}.{name}.{namespace}.svc.{}.",
                            e.hostname,
                            e.cluster,
                            table::CLUSTERSET_ZONE
                        )) else {
                            continue;
                        };
                        answers.push(Record::from_rdata(
                            qname.clone(),
                            TTL,
                            RData::SRV(SRV::new(0, 100, port.port, target.clone())),
                        ));
                        if let Some(r) = address_record(&target, RecordType::ANY, e.address) {
                            additionals.push(r);
                        }
                    }
                }
            }
            Lookup::Service { zone: z, svc, .. } => {
                zone = z;
                if matches!(qtype, RecordType::A | RecordType::ANY) {
                    if let Some(a) = svc.v4 {
                        answers.push(Record::from_rdata(qname.clone(), TTL, RData::A(A(a))));
                    }
                }
                if matches!(qtype, RecordType::AAAA | RecordType::ANY) {
                    if let Some(a) = svc.v6 {
                        answers.push(Record::from_rdata(qname.clone(), TTL, RData::AAAA(AAAA(a))));
                    }
                }
            }
            Lookup::Port {
                zone: z,
                svc,
                namespace,
                name,
                port,
            } => {
                zone = z;
                if matches!(qtype, RecordType::SRV | RecordType::ANY) {
                    if let Ok(target) = Name::from_str(&format!("{name}.{namespace}.svc.{z}.")) {
                        answers.push(Record::from_rdata(
                            qname.clone(),
                            TTL,
                            RData::SRV(SRV::new(0, 100, port.port, target.clone())),
                        ));
                        if let Some(a) = svc.v4 {
                            additionals.push(Record::from_rdata(
                                target.clone(),
                                TTL,
                                RData::A(A(a)),
                            ));
                        }
                        if let Some(a) = svc.v6 {
                            additionals.push(Record::from_rdata(target, TTL, RData::AAAA(AAAA(a))));
                        }
                    }
                }
            }
            Lookup::Version => {
                if matches!(qtype, RecordType::TXT | RecordType::ANY) {
                    answers.push(Record::from_rdata(
                        qname.clone(),
                        TTL,
                        RData::TXT(TXT::new(vec![table::MCS_DNS_VERSION.to_string()])),
                    ));
                }
            }
            Lookup::NxDomain => meta.response_code = ResponseCode::NXDomain,
            Lookup::Empty | Lookup::Foreign => {}
        }
        if qtype == RecordType::SOA
            && answers.is_empty()
            && text.trim_end_matches('.').eq_ignore_ascii_case(zone)
        {
            answers.push(self.soa_of(zone).clone());
        }
        let result = if meta.response_code == ResponseCode::NXDomain {
            "nxdomain"
        } else if answers.is_empty() {
            "nodata"
        } else {
            "answered"
        };
        self.queries.with_label_values(&[result]).inc();
        let soa: &[Record] = if answers.is_empty() {
            std::slice::from_ref(self.soa_of(zone))
        } else {
            &[]
        };
        let mut b = MessageResponseBuilder::from_message_request(request);
        let edns = response_edns(request);
        if let Some(e) = &edns {
            b.edns(e);
        }
        let resp = b.build(meta, answers.iter(), [], soa.iter(), additionals.iter());
        match rh.send_response(resp).await {
            Ok(i) => i,
            Err(_) => fallback(request, ResponseCode::ServFail),
        }
    }
}

/// A resolver that forwards to `upstream` only: no search domains, no hosts file, every name
/// taken as absolute.
fn forwarder(upstream: &[SocketAddr]) -> anyhow::Result<TokioResolver> {
    let servers = upstream
        .iter()
        .map(|a| {
            let mut ns = NameServerConfig::udp_and_tcp(a.ip());
            for c in &mut ns.connections {
                c.port = a.port();
            }
            ns
        })
        .collect();
    let mut opts = ResolverOpts::default();
    opts.timeout = UPSTREAM_TIMEOUT;
    opts.attempts = 1;
    opts.ndots = 0;
    opts.use_hosts_file = ResolveHosts::Never;
    opts.preserve_intermediates = true;
    Ok(Resolver::builder_with_config(
        ResolverConfig::from_name_servers(servers),
        TokioRuntimeProvider::default(),
    )
    .with_options(opts)
    .build()?)
}

impl MeshDns {
    /// Answers a query for a name outside the mesh from the upstream resolvers.
    async fn forward<R: ResponseHandler>(&self, request: &Request, mut rh: R) -> ResponseInfo {
        let Some(resolver) = &self.resolver else {
            self.queries.with_label_values(&["refused"]).inc();
            return send_rcode(request, ResponseCode::Refused, rh).await;
        };
        let Ok(info) = request.request_info() else {
            self.queries.with_label_values(&["formerr"]).inc();
            return send_rcode(request, ResponseCode::FormErr, rh).await;
        };
        if info.query.query_class() != DNSClass::IN {
            self.queries.with_label_values(&["refused"]).inc();
            return send_rcode(request, ResponseCode::Refused, rh).await;
        }
        let name: Name = info.query.name().into();
        let (rcode, answers, authorities, additionals) =
            match resolver.lookup(name, info.query.query_type()).await {
                Ok(l) => (
                    ResponseCode::NoError,
                    l.answers().to_vec(),
                    l.authorities().to_vec(),
                    l.additionals().to_vec(),
                ),
                Err(NetError::Dns(DnsError::NoRecordsFound(nr))) => {
                    let mut auth: Vec<Record> =
                        nr.authorities.map(|a| a.to_vec()).unwrap_or_default();
                    if auth.is_empty() {
                        if let Some(soa) = nr.soa {
                            auth.push(soa.into_record_of_rdata());
                        }
                    }
                    (nr.response_code, Vec::new(), auth, Vec::new())
                }
                Err(NetError::Dns(DnsError::ResponseCode(c))) => {
                    (c, Vec::new(), Vec::new(), Vec::new())
                }
                Err(e) => {
                    tracing::debug!(error = %e, "DNS upstreams failed");
                    self.queries.with_label_values(&["servfail"]).inc();
                    return send_rcode(request, ResponseCode::ServFail, rh).await;
                }
            };
        self.queries.with_label_values(&["forwarded"]).inc();
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.recursion_available = true;
        meta.response_code = rcode;
        let mut b = MessageResponseBuilder::from_message_request(request);
        let edns = response_edns(request);
        if let Some(e) = &edns {
            b.edns(e);
        }
        let resp = b.build(
            meta,
            answers.iter(),
            authorities.iter(),
            [],
            additionals.iter(),
        );
        match rh.send_response(resp).await {
            Ok(i) => i,
            Err(_) => fallback(request, ResponseCode::ServFail),
        }
    }
}

/// The A or AAAA record of `address` for `name`, if the query asks for that family.
fn address_record(name: &Name, qtype: RecordType, address: std::net::IpAddr) -> Option<Record> {
    match address {
        std::net::IpAddr::V4(a) if matches!(qtype, RecordType::A | RecordType::ANY) => {
            Some(Record::from_rdata(name.clone(), TTL, RData::A(A(a))))
        }
        std::net::IpAddr::V6(a) if matches!(qtype, RecordType::AAAA | RecordType::ANY) => {
            Some(Record::from_rdata(name.clone(), TTL, RData::AAAA(AAAA(a))))
        }
        _ => None,
    }
}
