//! Mesh DNS (hickory-dns): authoritative for `cluster.local` and `clusterset.local` from the
//! [`table::NameTable`], everything else relayed to upstream resolvers. The agent runs it for
//! its cluster's pods; the VM agent runs it on the VM with the table its agent sends.

pub mod server;
pub mod table;
pub mod vips;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;

use meshfed_model::store::Reader;
use meshfed_net::drain::Tasks;
use table::NameTable;

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// UDP and TCP address.
    pub listen: SocketAddr,
    /// Upstream resolvers for names the mesh does not own.
    pub upstream: Vec<SocketAddr>,
}

#[derive(Debug)]
pub struct Served {
    pub addr: SocketAddr,
}

/// The system's resolvers, from /etc/resolv.conf (`nameserver` lines, port 53); what the
/// agent and the VM agent forward to when no upstream is configured.
pub fn system_upstreams() -> Vec<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().trim_matches(['[', ']']).parse().ok())
        .map(|ip: std::net::IpAddr| SocketAddr::new(ip, 53))
        .collect()
}

/// UDP and TCP sockets on the same port. With port 0 the UDP socket picks the port, and when
/// that port is taken for TCP another one is tried.
async fn bind_udp_and_tcp(
    addr: SocketAddr,
) -> anyhow::Result<(tokio::net::UdpSocket, tokio::net::TcpListener)> {
    let mut attempt = 0;
    loop {
        let udp = tokio::net::UdpSocket::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}/udp (DNS)"))?;
        let bound = udp.local_addr()?;
        match tokio::net::TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e)
                if addr.port() == 0
                    && e.kind() == std::io::ErrorKind::AddrInUse
                    && attempt < 16 =>
            {
                attempt += 1;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("cannot listen on {bound}/tcp (DNS)"))
            }
        }
    }
}

/// Serves DNS on `listen` (UDP and TCP) from `names`, as a server of `tasks` (it stops at the
/// drain, answering the queries in flight).
pub async fn serve(
    tasks: &Tasks,
    addr: SocketAddr,
    names: watch::Receiver<Arc<NameTable>>,
    upstream: Vec<SocketAddr>,
    registry: &prometheus::Registry,
) -> anyhow::Result<Served> {
    let (udp, tcp) = bind_udp_and_tcp(addr).await?;
    let bound = udp.local_addr()?;
    let upstream: Vec<SocketAddr> = upstream.into_iter().filter(|u| *u != bound).collect();
    let handler = server::MeshDns::new(names, upstream, registry)?;
    let mut srv = hickory_server::Server::new(handler);
    srv.register_socket(udp);
    srv.register_listener(tcp, std::time::Duration::from_secs(10), 64);
    tasks.spawn_server("DNS server", |drain| async move {
        drain.drained().await;
        if let Err(e) = srv.shutdown_gracefully().await {
            tracing::warn!(error = %e, "DNS server did not stop cleanly");
        }
    });
    Ok(Served { addr: bound })
}

/// Rebuilds the mesh's name table whenever the model or the set of exported services changes
/// (VIPs from `vips`), and publishes it on `names` (the DNS servers and the VM API read it).
pub async fn follow_names(
    model: Reader,
    mut exports: watch::Receiver<std::sync::Arc<meshfed_model::snapshot::Services>>,
    names: watch::Sender<Arc<NameTable>>,
    mut vips: vips::Vips,
    mut pinned: watch::Receiver<Option<Pinned>>,
    assigned: watch::Sender<Arc<BTreeMap<String, vips::Vip>>>,
) {
    let mut rx = model.subscribe();
    // Without replicas nobody pins: the sender may be gone, which changes nothing.
    let mut pins_open = true;
    loop {
        let snap = rx.borrow_and_update().clone();
        let exported: BTreeSet<String> = exports.borrow_and_update().keys().cloned().collect();
        let live: BTreeSet<String> = snap.services().keys().cloned().collect();
        // A follower replica answers with its leader's addresses and allocates none.
        let pins = pinned.borrow_and_update().clone();
        if let Some(p) = &pins {
            vips.adopt(p);
        }
        let t = table::build(&snap, &exported, |k| {
            let v = match &pins {
                Some(_) => vips.assigned(k),
                None => vips.get(k, &live),
            };
            (v.v4, v.v6)
        });
        vips.flush();
        assigned.send_if_modified(|cur| {
            if **cur == *vips.all() {
                false
            } else {
                *cur = Arc::new(vips.all().clone());
                true
            }
        });
        names.send_if_modified(|cur| {
            if **cur == t {
                false
            } else {
                *cur = Arc::new(t);
                true
            }
        });
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            r = exports.changed() => if r.is_err() { return },
            r = pinned.changed(), if pins_open => if r.is_err() { pins_open = false },
        }
    }
}

/// The VIPs a follower replica must use: its leader's assignments, by service key.
pub type Pinned = Arc<BTreeMap<String, vips::Vip>>;

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_server::proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_server::proto::rr::{Name, RData, RecordType};
    use std::str::FromStr;
    use table::{PortName, ServiceNames};
    use tokio::net::UdpSocket;

    fn names() -> NameTable {
        let mut t = NameTable::default();
        t.services.insert(
            ("shop".into(), "payment".into()),
            ServiceNames {
                endpoints: Vec::new(),
                headless: false,
                v4: Some("240.240.0.9".parse().unwrap()),
                v6: Some("2001:2::9".parse().unwrap()),
                ports: vec![PortName {
                    name: "grpc".into(),
                    port: 8080,
                    protocol: "tcp".into(),
                }],
                cluster: true,
                clusterset: true,
            },
        );
        t
    }

    async fn ask(server: SocketAddr, packet: &[u8]) -> Option<Message> {
        ask_within(server, packet, std::time::Duration::from_millis(500)).await
    }

    async fn ask_within(
        server: SocketAddr,
        packet: &[u8],
        within: std::time::Duration,
    ) -> Option<Message> {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(packet, server).await.unwrap();
        let mut buf = vec![0u8; 4096];
        match tokio::time::timeout(within, s.recv(&mut buf)).await {
            Ok(Ok(n)) => Some(Message::from_vec(&buf[..n]).unwrap()),
            _ => None,
        }
    }

    fn query(id: u16, name: &str, t: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        m.to_vec().unwrap()
    }

    /// A stand-in upstream resolver: NXDOMAIN for everything, with the query's id.
    async fn upstream() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let a = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut r = Message::response(q.metadata.id, OpCode::Query);
                r.metadata.response_code = ResponseCode::NXDomain;
                r.metadata.message_type = MessageType::Response;
                for qq in q.queries {
                    r.add_query(qq);
                }
                let _ = s.send_to(&r.to_vec().unwrap(), from).await;
            }
        });
        a
    }

    /// A stand-in upstream that answers `A 192.0.2.7` (TTL 300) and counts what it is asked.
    async fn answering_upstream() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use hickory_server::proto::rr::rdata::A;
        use hickory_server::proto::rr::Record;
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let a = s.local_addr().unwrap();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = asked.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((len, from)) = s.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut r = Message::response(q.metadata.id, OpCode::Query);
                r.metadata.message_type = MessageType::Response;
                r.metadata.recursion_available = true;
                for qq in q.queries {
                    r.add_answer(Record::from_rdata(
                        qq.name().clone(),
                        300,
                        RData::A(A("192.0.2.7".parse().unwrap())),
                    ));
                    r.add_query(qq);
                }
                let _ = s.send_to(&r.to_vec().unwrap(), from).await;
            }
        });
        (a, asked)
    }

    /// Names outside the mesh go to the upstreams through hickory's resolver: its answer with
    /// our client's id, a repeat served from its cache, SERVFAIL when no upstream answers,
    /// REFUSED when there is none.
    #[tokio::test]
    async fn foreign_names_are_forwarded_cached_and_fail_cleanly() {
        let (_tx, rx) = watch::channel(Arc::new(names()));
        let (up, asked) = answering_upstream().await;
        let tasks = Tasks::new();
        let reg = prometheus::Registry::new();
        let s = serve(
            &tasks,
            "127.0.0.1:0".parse().unwrap(),
            rx.clone(),
            vec![up],
            &reg,
        )
        .await
        .unwrap();
        for id in [21, 22] {
            let r = ask(s.addr, &query(id, "www.example.org.", RecordType::A))
                .await
                .unwrap();
            assert_eq!(
                (r.metadata.id, r.metadata.response_code),
                (id, ResponseCode::NoError)
            );
            assert!(matches!(r.answers[0].data, RData::A(ref x) if x.0.to_string() == "192.0.2.7"));
        }
        assert_eq!(
            asked.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the repeat came from the cache"
        );
        // An upstream that does not answer: SERVFAIL.
        let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let s2 = serve(
            &tasks,
            "127.0.0.1:0".parse().unwrap(),
            rx.clone(),
            vec![dead.local_addr().unwrap()],
            &prometheus::Registry::new(),
        )
        .await
        .unwrap();
        // The resolver's timeouts and retries run their course before it gives up.
        let r = ask_within(
            s2.addr,
            &query(23, "www.example.org.", RecordType::A),
            std::time::Duration::from_secs(30),
        )
        .await
        .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        // No upstream at all: REFUSED.
        let s3 = serve(
            &tasks,
            "127.0.0.1:0".parse().unwrap(),
            rx,
            vec![],
            &prometheus::Registry::new(),
        )
        .await
        .unwrap();
        let r = ask(s3.addr, &query(24, "www.example.org.", RecordType::A))
            .await
            .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
        tasks.drain(std::time::Duration::from_secs(5)).await;
    }

    #[tokio::test]
    async fn answers_refuses_and_never_crashes_on_bad_packets() {
        let (_tx, rx) = watch::channel(Arc::new(names()));
        let up = upstream().await;
        let s = serve(
            &Tasks::new(),
            "127.0.0.1:0".parse().unwrap(),
            rx,
            vec![up],
            &prometheus::Registry::new(),
        )
        .await
        .unwrap();
        let a = s.addr;
        let r = ask(
            a,
            &query(7, "payment.shop.svc.cluster.local.", RecordType::A),
        )
        .await
        .unwrap();
        assert_eq!(r.metadata.id, 7);
        assert!(r.metadata.authoritative);
        assert!(matches!(r.answers[0].data, RData::A(ref x) if x.0.to_string() == "240.240.0.9"));
        let r = ask(
            a,
            &query(
                8,
                "_grpc._tcp.payment.shop.svc.clusterset.local.",
                RecordType::SRV,
            ),
        )
        .await
        .unwrap();
        assert!(matches!(r.answers[0].data, RData::SRV(ref x) if x.port == 8080));
        assert_eq!(r.additionals.len(), 2, "the target's A and AAAA");
        let r = ask(a, &query(9, "nope.shop.svc.cluster.local.", RecordType::A))
            .await
            .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(r.authorities.len(), 1, "SOA with NXDOMAIN");
        let r = ask(
            a,
            &query(10, "payment.shop.svc.cluster.local.", RecordType::MX),
        )
        .await
        .unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty(), "NODATA");
        // Forwarded: the upstream's answer, our client's id.
        let r = ask(a, &query(11, "example.com.", RecordType::A))
            .await
            .unwrap();
        assert_eq!(r.metadata.id, 11);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);

        // Malformed: FORMERR (or dropped when not even a header), never a crash.
        let mut junk = query(12, "payment.shop.svc.cluster.local.", RecordType::A);
        junk.truncate(20);
        let r = ask(a, &junk).await.unwrap();
        assert_eq!(
            (r.metadata.id, r.metadata.response_code),
            (12, ResponseCode::FormErr)
        );
        let mut garbage = vec![0x00, 0x0d, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
        garbage.extend_from_slice(&[0xc0, 0xff, 0xee, 0x3f, 0x3f]);
        let r = ask(a, &garbage).await.unwrap();
        assert_eq!(
            (r.metadata.id, r.metadata.response_code),
            (13, ResponseCode::FormErr)
        );
        assert!(
            ask(a, &[1, 2, 3]).await.is_none(),
            "shorter than a header: dropped"
        );
        let mut none = Message::query();
        none.metadata.id = 14;
        let r = ask(a, &none.to_vec().unwrap()).await.unwrap();
        assert_eq!(
            r.metadata.response_code,
            ResponseCode::FormErr,
            "no question"
        );
        let mut two = Message::query();
        two.metadata.id = 15;
        two.add_query(Query::query(
            Name::from_str("a.cluster.local.").unwrap(),
            RecordType::A,
        ));
        two.add_query(Query::query(
            Name::from_str("b.cluster.local.").unwrap(),
            RecordType::A,
        ));
        let r = ask(a, &two.to_vec().unwrap()).await.unwrap();
        assert_eq!(
            r.metadata.response_code,
            ResponseCode::FormErr,
            "two questions"
        );
        let mut notify = Message::query();
        notify.metadata.id = 16;
        notify.metadata.op_code = OpCode::Notify;
        notify.add_query(Query::query(
            Name::from_str("cluster.local.").unwrap(),
            RecordType::SOA,
        ));
        let r = ask(a, &notify.to_vec().unwrap()).await.unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
        // Random bytes: whatever happens, the server still answers afterwards.
        for i in 0..2000u32 {
            let mut b = query(17, "payment.shop.svc.cluster.local.", RecordType::A);
            let k = (i as usize * 7) % b.len();
            b[k] ^= (i % 251) as u8 + 1;
            let s2 = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            s2.send_to(&b, a).await.unwrap();
        }
        let r = ask(
            a,
            &query(18, "payment.shop.svc.cluster.local.", RecordType::AAAA),
        )
        .await
        .unwrap();
        assert!(matches!(r.answers[0].data, RData::AAAA(_)));
    }
}

#[cfg(test)]
mod headless_tests {
    use super::*;
    use hickory_server::proto::op::{Message, Query, ResponseCode};
    use hickory_server::proto::rr::{Name, RData, RecordType};
    use std::str::FromStr;
    use table::{HeadlessEndpoint, PortName, ServiceNames};
    use tokio::net::UdpSocket;

    async fn ask(server: SocketAddr, name: &str, t: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.id = 42;
        m.add_query(Query::query(Name::from_str(name).unwrap(), t));
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        s.send_to(&m.to_vec().unwrap(), server).await.unwrap();
        let mut buf = vec![0u8; 4096];
        // A bound on failure only: the answer ends the wait.
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.recv(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        Message::from_vec(&buf[..n]).unwrap()
    }

    fn ep(a: &str, host: &str, cluster: &str) -> HeadlessEndpoint {
        HeadlessEndpoint {
            address: a.parse().unwrap(),
            hostname: host.into(),
            cluster: cluster.into(),
        }
    }

    fn headless(endpoints: Vec<HeadlessEndpoint>) -> ServiceNames {
        ServiceNames {
            v4: None,
            v6: None,
            ports: vec![PortName {
                name: "pg".into(),
                port: 5432,
                protocol: "tcp".into(),
            }],
            cluster: true,
            clusterset: true,
            headless: true,
            endpoints,
        }
    }

    /// MCS DNS for headless services: the service name answers with every endpoint (by
    /// family), `<hostname>.<cluster>.<svc>.<ns>.svc.clusterset.local` with one, SRV with one
    /// record per endpoint with a hostname; a headless service without endpoints does not exist.
    #[tokio::test]
    async fn headless_services_answer_with_their_endpoints_and_hostnames() {
        let mut t = NameTable::default();
        t.services.insert(
            ("shop".into(), "db".into()),
            headless(vec![
                ep("10.2.0.5", "db-0", "east"),
                ep("10.2.0.6", "db-1", "east"),
                ep("2001:db8::7", "db-0", "west"),
                ep("10.3.0.5", "", "west"),
            ]),
        );
        t.services
            .insert(("shop".into(), "gone".into()), headless(Vec::new()));
        let (_tx, rx) = watch::channel(Arc::new(t));
        let s = serve(
            &Tasks::new(),
            "127.0.0.1:0".parse().unwrap(),
            rx,
            Vec::new(),
            &prometheus::Registry::new(),
        )
        .await
        .unwrap();
        let addrs = |m: &Message| -> Vec<String> {
            m.answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(a.0.to_string()),
                    RData::AAAA(a) => Some(a.0.to_string()),
                    _ => None,
                })
                .collect()
        };
        let r = ask(s.addr, "db.shop.svc.clusterset.local.", RecordType::A).await;
        assert_eq!(addrs(&r), ["10.2.0.5", "10.2.0.6", "10.3.0.5"]);
        let r = ask(s.addr, "db.shop.svc.cluster.local.", RecordType::AAAA).await;
        assert_eq!(addrs(&r), ["2001:db8::7"]);
        let r = ask(
            s.addr,
            "db-1.east.db.shop.svc.clusterset.local.",
            RecordType::A,
        )
        .await;
        assert_eq!(addrs(&r), ["10.2.0.6"]);
        let r = ask(
            s.addr,
            "db-0.west.db.shop.svc.clusterset.local.",
            RecordType::AAAA,
        )
        .await;
        assert_eq!(addrs(&r), ["2001:db8::7"]);
        let r = ask(
            s.addr,
            "db-2.east.db.shop.svc.clusterset.local.",
            RecordType::A,
        )
        .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        let r = ask(s.addr, "east.db.shop.svc.clusterset.local.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        let r = ask(
            s.addr,
            "_pg._tcp.db.shop.svc.clusterset.local.",
            RecordType::SRV,
        )
        .await;
        let targets: Vec<String> = r
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(x) => Some(format!("{} {}", x.target, x.port)),
                _ => None,
            })
            .collect();
        assert_eq!(
            targets,
            [
                "db-0.east.db.shop.svc.clusterset.local. 5432",
                "db-1.east.db.shop.svc.clusterset.local. 5432",
                "db-0.west.db.shop.svc.clusterset.local. 5432",
            ]
        );
        assert_eq!(r.additionals.len(), 3, "each target's address");
        let r = ask(s.addr, "gone.shop.svc.clusterset.local.", RecordType::A).await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        // Nor do the names below it (RFC 8020).
        let r = ask(
            s.addr,
            "_pg._tcp.gone.shop.svc.clusterset.local.",
            RecordType::SRV,
        )
        .await;
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        // Under cluster.local the SRV targets are the clusterset.local names (the only ones
        // per endpoint).
        let r = ask(
            s.addr,
            "_pg._tcp.db.shop.svc.cluster.local.",
            RecordType::SRV,
        )
        .await;
        assert!(
            r.answers.iter().all(|a| matches!(&a.data,
                RData::SRV(x) if x.target.to_string().ends_with(".svc.clusterset.local."))),
            "{:?}",
            r.answers
        );
        assert_eq!(r.answers.len(), 3);
    }

    /// The table of a headless service: no VIP asked for; the healthy endpoints of the cluster's
    /// own network with their hostnames; another network's endpoints left out.
    #[test]
    fn the_table_lists_reachable_healthy_endpoints_of_headless_services() {
        use meshfed_model::snapshot::Snapshot;
        use proto::{ClusterFacts, Endpoint, LeaseState, PeerCluster, ServiceExport};
        let mut s = Snapshot {
            facts: ClusterFacts {
                cluster_id: "west".into(),
                network: "net-a".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        let db = |eps: Vec<(&str, &str, bool)>| ServiceExport {
            namespace: "shop".into(),
            name: "db".into(),
            headless: true,
            endpoints: eps
                .into_iter()
                .map(|(a, h, healthy)| Endpoint {
                    address: a.into(),
                    hostname: h.into(),
                    healthy,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        for (c, net, eps) in [
            (
                "east",
                "net-a",
                vec![("10.2.0.5", "db-0", true), ("10.2.0.6", "db-1", false)],
            ),
            ("far", "net-b", vec![("10.9.0.5", "db-0", true)]),
        ] {
            s.imports
                .insert((c.into(), "shop/db".into()), Arc::new(db(eps)));
            s.peers.insert(
                c.into(),
                PeerCluster {
                    facts: Some(ClusterFacts {
                        cluster_id: c.into(),
                        network: net.into(),
                        ..Default::default()
                    }),
                    lease: LeaseState::Fresh as i32,
                    ..Default::default()
                },
            );
        }
        // This cluster's own ClusterIP Service of the same name, not exported, does not make
        // the imported headless service a ClusterSetIP one.
        s.local.insert(
            "shop/db".into(),
            Arc::new(ServiceExport {
                namespace: "shop".into(),
                name: "db".into(),
                ..Default::default()
            }),
        );
        let t = table::build(&s, &BTreeSet::new(), |k| panic!("no VIP for headless {k}"));
        let db = &t.services[&("shop".to_string(), "db".to_string())];
        assert!(db.headless);
        assert_eq!((db.v4, db.v6), (None, None));
        assert_eq!(db.endpoints, [ep("10.2.0.5", "db-0", "east")]);
        // What a VM receives says the same.
        let (back, bad) = NameTable::from_proto(&t.to_proto());
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(back, t);
    }
}
