//! The DNS request handler: answers for the mesh zones from the name table, relays the rest.
//!
//! hickory-server itself answers FORMERR to a message whose header reads but whose body does
//! not, and drops packets shorter than a header and responses (QR=1). Here: FORMERR for anything
//! but exactly one question, NOTIMP for opcodes other than QUERY, BADVERS for EDNS versions
//! above 0, REFUSED for classes other than IN in the mesh zones.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, Message, Metadata, OpCode, ResponseCode};
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
        Ok(MeshDns {
            names,
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

impl MeshDns {
    /// Relays a query for a name outside the mesh to the first upstream that answers.
    async fn forward<R: ResponseHandler>(&self, request: &Request, mut rh: R) -> ResponseInfo {
        if self.upstream.is_empty() {
            self.queries.with_label_values(&["refused"]).inc();
            return send_rcode(request, ResponseCode::Refused, rh).await;
        }
        let mut raw = request.as_slice().to_vec();
        let mut got = None;
        for up in &self.upstream {
            match exchange(*up, &mut raw).await {
                Ok(m) => {
                    got = Some(m);
                    break;
                }
                Err(e) => tracing::debug!(upstream = %up, error = %e, "DNS upstream failed"),
            }
        }
        let Some(up) = got else {
            self.queries.with_label_values(&["servfail"]).inc();
            return send_rcode(request, ResponseCode::ServFail, rh).await;
        };
        self.queries.with_label_values(&["forwarded"]).inc();
        let mut meta = up.metadata;
        meta.id = request.metadata.id;
        meta.truncation = false;
        let mut b = MessageResponseBuilder::from_message_request(request);
        let edns = response_edns(request);
        if let Some(e) = &edns {
            b.edns(e);
        }
        let resp = b.build(
            meta,
            up.answers.iter(),
            up.authorities.iter(),
            [],
            up.additionals.iter(),
        );
        match rh.send_response(resp).await {
            Ok(i) => i,
            Err(_) => fallback(request, ResponseCode::ServFail),
        }
    }
}

/// One query to one upstream: UDP from a fresh port with a fresh id, TCP when truncated.
async fn exchange(up: SocketAddr, raw: &mut [u8]) -> anyhow::Result<Message> {
    let id: u16 = rand::random();
    raw[..2].copy_from_slice(&id.to_be_bytes());
    let bind: SocketAddr = if up.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = tokio::net::UdpSocket::bind(bind).await?;
    sock.connect(up).await?;
    sock.send(raw).await?;
    let mut buf = vec![0u8; 4096];
    let msg = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        loop {
            let n = sock.recv(&mut buf).await?;
            if n >= 2 && buf[..2] == id.to_be_bytes() {
                return anyhow::Ok(Message::from_vec(&buf[..n])?);
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("no answer within {UPSTREAM_TIMEOUT:?}"))??;
    if !msg.metadata.truncation {
        return Ok(msg);
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp =
        tokio::time::timeout(UPSTREAM_TIMEOUT, tokio::net::TcpStream::connect(up)).await??;
    let len = u16::try_from(raw.len())?;
    tcp.write_all(&len.to_be_bytes()).await?;
    tcp.write_all(raw).await?;
    let n = tokio::time::timeout(UPSTREAM_TIMEOUT, tcp.read_u16()).await?? as usize;
    let mut body = vec![0u8; n];
    tokio::time::timeout(UPSTREAM_TIMEOUT, tcp.read_exact(&mut body)).await??;
    Ok(Message::from_vec(&body)?)
}
