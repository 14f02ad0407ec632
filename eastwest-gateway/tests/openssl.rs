//! The gateway between real TLS peers: `openssl s_client` through the gateway to
//! `openssl s_server`, by SNI, without the gateway holding any key; and every refusal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use eastwest_gateway::proxy::{Gateway, GatewayConfig};
use eastwest_gateway::routes::Routes;

mod common;
use common::{forwarded_bytes, gateway, gateway_to, istio_hello, HOST};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cert(dir: &Path) {
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=reviews-backend",
        ])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn s_server(dir: &Path, port: u16) -> Server {
    let c = Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-alpn",
            "istio",
            "-www",
            "-naccept",
            "100",
        ])
        .arg("-cert")
        .arg(dir.join("cert.pem"))
        .arg("-key")
        .arg(dir.join("key.pem"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Server(c)
}

/// openssl s_client through the gateway; returns (success, output).
fn s_client(gw: SocketAddr, sni: &str, alpn: &str) -> (bool, String) {
    let mut c = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &gw.to_string(),
            "-servername",
            sni,
            "-alpn",
            alpn,
            "-ign_eof",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .unwrap();
    let out = c.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (text.contains("s_server -accept"), text)
}

fn refused(reg: &prometheus::Registry, reason: &str) -> u64 {
    reg.gather()
        .iter()
        .filter(|f| f.name() == "meshfed_gateway_refused_total")
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| m.get_label().iter().any(|l| l.value() == reason))
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_through_the_gateway_and_every_refusal() {
    let dir = tempfile::tempdir().unwrap();
    cert(dir.path());
    let (p1, p2) = (free_port(), free_port());
    let _s1 = s_server(dir.path(), p1);
    let port = 9080u16;
    let backend: SocketAddr = format!("127.0.0.1:{p1}").parse().unwrap();
    // A dead endpoint first: the gateway must try the next before forwarding anything.
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let routes = Routes::from_clusters([(
        format!("outbound|{port}||{HOST}").as_str(),
        vec![dead, backend],
    )]);
    let cfg = GatewayConfig {
        hello_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let (gw, g, routes_tx, stop, reg) = gateway(routes, cfg).await;
    let sni = format!("outbound_.{port}_._.{HOST}");

    for _ in 0..2 {
        let (ok, out) = tokio::task::spawn_blocking({
            let sni = sni.clone();
            move || s_client(gw, &sni, "istio")
        })
        .await
        .unwrap();
        assert!(ok, "{out}");
        assert!(out.contains("ALPN protocol: istio"), "{out}");
        assert!(
            out.contains("CN=reviews-backend") || out.contains("CN = reviews-backend"),
            "the backend's own certificate: {out}"
        );
    }

    // The dead endpoint was tried first at least once; after three failures it is ejected.
    for _ in 0..4 {
        let (ok, out) = tokio::task::spawn_blocking({
            let sni = sni.clone();
            move || s_client(gw, &sni, "istio")
        })
        .await
        .unwrap();
        assert!(ok, "{out}");
    }
    assert!(
        g.is_ejected(&dead),
        "three connect failures eject the endpoint (ejections: {}, connects: {})",
        refused(&reg, "endpoint_ejected"),
        g.metrics.connect_seconds.get_sample_count()
    );
    assert!(!g.is_ejected(&backend));

    // Unknown SNI, no Istio ALPN, no SNI: TLS alerts, counted by reason.
    let (ok, out) = tokio::task::spawn_blocking(move || {
        s_client(gw, "outbound_.1_._.nope.shop.svc.cluster.local", "istio")
    })
    .await
    .unwrap();
    assert!(
        !ok && out.to_lowercase().contains("unrecognized name"),
        "{out}"
    );
    let (ok, out) = tokio::task::spawn_blocking({
        let sni = sni.clone();
        move || s_client(gw, &sni, "h2")
    })
    .await
    .unwrap();
    assert!(
        !ok && out.to_lowercase().contains("no application protocol"),
        "{out}"
    );
    assert_eq!(refused(&reg, "unknown_sni"), 1);
    assert_eq!(refused(&reg, "alpn"), 1);

    // Garbage: closed, no alert.
    let mut s = std::net::TcpStream::connect(gw).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut b = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.read_to_end(&mut b);
    assert!(b.is_empty(), "no bytes for a non-TLS client: {b:?}");
    assert_eq!(refused(&reg, "not_tls"), 1);

    // Slowloris: three bytes and then nothing; cut off at the hello timeout.
    let mut s = std::net::TcpStream::connect(gw).unwrap();
    s.write_all(&[22, 3, 1]).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = std::time::Instant::now();
    let _ = s.read_to_end(&mut Vec::new());
    assert!(t.elapsed() < Duration::from_secs(4));
    assert_eq!(refused(&reg, "hello_timeout"), 1);

    // An endpoint added and the old one removed, live: new connections follow.
    let _s2 = s_server(dir.path(), p2);
    let b2: SocketAddr = format!("127.0.0.1:{p2}").parse().unwrap();
    routes_tx.send_replace(Arc::new(Routes::from_clusters([(
        format!("outbound|{port}||{HOST}").as_str(),
        vec![b2],
    )])));
    drop(_s1);
    let (ok, out) = tokio::task::spawn_blocking({
        let sni = sni.clone();
        move || s_client(gw, &sni, "istio")
    })
    .await
    .unwrap();
    assert!(ok, "the new endpoint serves: {out}");

    // Drain on shutdown: an open connection may finish; new ones are refused.
    let mut open = tokio::net::TcpStream::connect(gw).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stop.send_replace(true);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        std::net::TcpStream::connect(gw).is_err(),
        "no new connections while draining"
    );
    assert_eq!(g.open_connections(), 1);
    drop(open.shutdown().await);
}

use tokio::io::AsyncWriteExt;

/// Bytes cross the gateway unchanged in both directions, half-close included (splice path).
/// A backend that sends back everything it receives (hello included) and closes after EOF.
async fn echo_backend() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let be = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let (mut r, mut w) = s.split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    be
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_bytes_both_ways_with_half_close() {
    use tokio::io::AsyncReadExt;
    let hello = istio_hello();
    let (gw, _g, _r, _stop, reg) = gateway_to(echo_backend().await, GatewayConfig::default()).await;
    let mut payload = hello.clone();
    payload.extend((0..8 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    let s = tokio::net::TcpStream::connect(gw).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let send = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&send).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "bytes changed on the way");
    let fwd = forwarded_bytes(&reg);
    assert_eq!(fwd, 2.0 * payload.len() as f64, "bytes counted both ways");
}

/// Bursts that switch a direction between its small-read path and its pipe and back: each
/// burst (sizes from one byte to over a MiB) is echoed whole before the next is sent, so the
/// sockets drain between bursts; every byte comes back unchanged and is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_every_size_cross_the_gateway_intact() {
    use tokio::io::AsyncReadExt;
    let hello = istio_hello();
    let (gw, _g, _r, _stop, reg) = gateway_to(echo_backend().await, GatewayConfig::default()).await;
    let mut s = tokio::net::TcpStream::connect(gw).await.unwrap();
    s.write_all(&hello).await.unwrap();
    let mut back = vec![0u8; hello.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, hello);
    let mut total = hello.len();
    for (i, n) in [
        1usize,
        4095,
        4096,
        4097,
        65536,
        3 << 20,
        10,
        1 << 20,
        4096,
        7,
    ]
    .into_iter()
    .enumerate()
    {
        let burst: Vec<u8> = (0..n).map(|j| (j * 31 + i * 7) as u8).collect();
        let (mut r, mut w) = s.split();
        let (sent, got) = tokio::join!(w.write_all(&burst), async {
            let mut got = vec![0u8; n];
            r.read_exact(&mut got).await.map(|_| got)
        });
        sent.unwrap();
        assert!(
            got.unwrap() == burst,
            "burst {i} of {n} bytes changed on the way"
        );
        total += n;
    }
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let fwd = forwarded_bytes(&reg);
    assert_eq!(fwd, 2.0 * total as f64, "bytes counted both ways");
}

/// A connection with no bytes either way for the idle timeout is closed by the gateway, and
/// counted; until then it stays open however long the client waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_at_the_idle_timeout() {
    use tokio::io::AsyncReadExt;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let be = l.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all).await;
        all.len()
    });
    let cfg = GatewayConfig {
        idle_timeout: Duration::from_millis(400),
        ..GatewayConfig::default()
    };
    let (gw, _g, _r, _stop, reg) = gateway_to(be, cfg).await;
    let hello = istio_hello();
    let mut s = tokio::net::TcpStream::connect(gw).await.unwrap();
    s.write_all(&hello).await.unwrap();
    let t = std::time::Instant::now();
    let mut buf = [0u8; 16];
    // The gateway closes both sides: the client reads EOF, the backend sees the hello and EOF.
    assert_eq!(s.read(&mut buf).await.unwrap(), 0);
    assert!(
        t.elapsed() >= Duration::from_millis(400),
        "closed before the idle timeout"
    );
    assert_eq!(held.await.unwrap(), hello.len());
    assert_eq!(refused(&reg, "idle_timeout"), 1);
}

/// Least connections: a new connection goes to the endpoint with the fewest open ones, where
/// round robin would have picked the busier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_picks_the_idle_endpoint() {
    use eastwest_gateway::proxy::Balance;
    let mut backends = Vec::new();
    for _ in 0..2 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        backends.push(l.local_addr().unwrap());
        // Holds each connection until the client half-closes it, then closes it too.
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
                });
            }
        });
    }
    let (a, b) = (backends[0], backends[1]);
    let routes = Routes::from_clusters([(format!("outbound|9080||{HOST}").as_str(), vec![a, b])]);
    let cfg = GatewayConfig {
        balance: Balance::LeastConnections,
        ..Default::default()
    };
    let (gw, g, _r, _stop, _reg) = gateway(routes, cfg).await;
    let hello = istio_hello();
    let open = |g: &Arc<Gateway>| (g.open_to(&a), g.open_to(&b));
    let connect = || async {
        let mut s = tokio::net::TcpStream::connect(gw).await.unwrap();
        s.write_all(&hello).await.unwrap();
        s
    };
    let wait = |want: (u32, u32)| {
        let g = g.clone();
        async move {
            for _ in 0..100 {
                if open(&g) == want {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("open connections {:?}, wanted {want:?}", open(&g));
        }
    };
    let c1 = connect().await; // round robin start 0 -> a
    wait((1, 0)).await;
    let c2 = connect().await; // start 1 -> b
    wait((1, 1)).await;
    drop(c2);
    wait((1, 0)).await;
    // Round robin would start at a again (start 2); least connections picks b.
    let _c3 = connect().await;
    wait((1, 1)).await;
    drop(c1);
}

/// Per-source and pending-hello limits refuse the excess connections, counted by reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_source_and_pending_hello_limits() {
    use tokio::io::AsyncReadExt;
    let routes = Routes::from_clusters([(format!("outbound|9080||{HOST}").as_str(), vec![])]);
    let cfg = GatewayConfig {
        max_per_source: 2,
        ..Default::default()
    };
    let (gw, _g, _r, _stop, reg) = gateway(routes.clone(), cfg).await;
    let _a = tokio::net::TcpStream::connect(gw).await.unwrap();
    let _b = tokio::net::TcpStream::connect(gw).await.unwrap();
    let mut c = tokio::net::TcpStream::connect(gw).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut [0u8; 8]))
        .await
        .unwrap();
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "the third connection from one source is closed"
    );
    assert_eq!(refused(&reg, "per_source_limit"), 1);

    let cfg = GatewayConfig {
        max_pending_hellos: 1,
        ..Default::default()
    };
    let (gw, _g, _r, _stop, reg) = gateway(routes, cfg).await;
    let _slow = tokio::net::TcpStream::connect(gw).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = tokio::net::TcpStream::connect(gw).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut [0u8; 8]))
        .await
        .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));
    assert_eq!(refused(&reg, "max_pending_hellos"), 1);
}
