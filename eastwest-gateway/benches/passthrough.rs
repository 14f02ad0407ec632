//! East-west gateway benchmark (not a test): meshfed's gateway (the release `meshfed gateway`
//! process), HAProxy (`mode tcp`, `req.ssl_sni`, `option splice-auto`) and nginx stream
//! (`ssl_preread`) side by side in the same run, in front of the same backend, plus a direct
//! connection as the ceiling.
//!
//! Each client connection sends a real rustls ClientHello with SNI
//! `outbound_.9080_._.reviews.shop.svc.cluster.local` and ALPN `istio`, then the workload:
//! - bulk throughput: 256 MiB per stream to a sink, 1 and 8 streams;
//! - connections per second: hello -> 1-byte reply -> close, 32 concurrent clients, 5 s;
//! - added latency: time from sending the hello to the backend's reply, minus direct (p50/p99);
//! - memory per idle connection: N connections held open after their hello reached the
//!   backend; the proxy's RSS growth divided by N (N = 7000 here: the machine's 20000 file
//!   descriptor limit per process).
//!
//! Needs `haproxy`, `nginx` with the stream module (`libnginx-mod-stream`) and a release build
//! of meshfed (`cargo build --release --bin meshfed`); missing peers are reported and skipped.
//!
//!   cargo bench -p meshfed-eastwest-gateway --bench passthrough
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SNI: &str = "outbound_.9080_._.reviews.shop.svc.cluster.local";
const BULK: usize = 256 * 1024 * 1024;

fn hello() -> Vec<u8> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"istio".to_vec()];
    let mut c = rustls::ClientConnection::new(
        Arc::new(cfg),
        rustls_pki_types::ServerName::try_from(SNI.to_string()).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut out).unwrap();
    }
    out
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Backend: reads the hello, answers one byte, then sinks everything.
fn backend(hello_len: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let _ = s.set_nodelay(true);
                let mut got = 0;
                let mut buf = vec![0u8; 256 * 1024];
                while got < hello_len {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got += n,
                    }
                }
                if s.write_all(b"!").is_err() {
                    return;
                }
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    addr
}

struct Proxy {
    name: &'static str,
    addr: SocketAddr,
    child: Option<Child>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Proxy {
    fn rss_kib(&self) -> u64 {
        let Some(c) = &self.child else { return 0 };
        // Sum over the process and its children (nginx workers, haproxy is one process).
        let mut pids = vec![c.id()];
        if let Ok(out) = Command::new("pgrep")
            .args(["-P", &c.id().to_string()])
            .output()
        {
            pids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.trim().parse::<u32>().ok()),
            );
        }
        pids.iter()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/status")).ok())
            .filter_map(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .sum()
    }
}

fn wait_port(addr: SocketAddr) -> bool {
    for _ in 0..200 {
        if TcpStream::connect(addr).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}

fn meshfed_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESHFED_BIN") {
        return p.into();
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release/meshfed")
}

fn start_meshfed(be: SocketAddr, dir: &Path) -> Option<Proxy> {
    let bin = meshfed_bin();
    if !bin.exists() {
        println!(
            "meshfed: skipped ({} missing; cargo build --release --bin meshfed)",
            bin.display()
        );
        return None;
    }
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = Command::new(bin)
        .args([
            "gateway",
            "--listen",
            &addr.to_string(),
            "--xds",
            &format!("127.0.0.1:{}", free_port()),
            "--admin",
            &format!("127.0.0.1:{}", free_port()),
            "--expose",
            &format!("{SNI}={be}"),
        ])
        .env("MESHFED_LOG", "warn")
        .stdout(std::fs::File::create(dir.join("meshfed.log")).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_port(addr).then_some(Proxy {
        name: "meshfed",
        addr,
        child: Some(child),
    })
}

fn start_haproxy(be: SocketAddr, dir: &Path) -> Option<Proxy> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = format!(
        "global\n  maxconn 7900\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n  option splice-auto\nfrontend fe\n  bind {addr}\n  tcp-request inspect-delay 5s\n  tcp-request content accept if {{ req.ssl_hello_type 1 }}\n  use_backend be if {{ req.ssl_sni -m end .svc.cluster.local }}\nbackend be\n  server s1 {be}\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&path)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_port(addr).then_some(Proxy {
        name: "haproxy",
        addr,
        child: Some(child),
    })
}

fn start_nginx(be: SocketAddr, dir: &Path) -> Option<Proxy> {
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    if !module.exists() {
        println!("nginx: skipped (no stream module; apt-get install libnginx-mod-stream)");
        return None;
    }
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let d = dir.display();
    let cfg = format!(
        "load_module {};\nworker_processes 2;\nworker_rlimit_nofile 40000;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err;\nevents {{ worker_connections 30000; }}\nstream {{\n  map $ssl_preread_server_name $up {{ default be; }}\n  upstream be {{ server {be}; }}\n  server {{ listen {addr}; ssl_preread on; proxy_pass $up; proxy_timeout 1h; }}\n}}\n",
        module.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-g")
        .arg("daemon off;")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_port(addr).then_some(Proxy {
        name: "nginx",
        addr,
        child: Some(child),
    })
}

/// Connects, sends the hello, waits for the backend's byte; returns the time from send to reply.
fn handshake(addr: SocketAddr, hello: &[u8]) -> Option<(TcpStream, Duration)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_nodelay(true).ok()?;
    let t = Instant::now();
    s.write_all(hello).ok()?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).ok()?;
    Some((s, t.elapsed()))
}

fn throughput(addr: SocketAddr, hello: &[u8], streams: usize) -> f64 {
    let t = Instant::now();
    let hs: Vec<_> = (0..streams)
        .map(|_| {
            let hello = hello.to_vec();
            std::thread::spawn(move || {
                let (mut s, _) = handshake(addr, &hello).unwrap();
                let chunk = vec![7u8; 256 * 1024];
                let mut sent = 0;
                while sent < BULK / streams {
                    s.write_all(&chunk).unwrap();
                    sent += chunk.len();
                }
                s.shutdown(std::net::Shutdown::Write).unwrap();
                let _ = s.read(&mut [0u8; 1]);
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    (BULK as f64 * 8.0 / 1e9) / t.elapsed().as_secs_f64()
}

fn conns_per_sec(addr: SocketAddr, hello: &[u8]) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let n = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = (0..32)
        .map(|_| {
            let (stop, n, hello) = (stop.clone(), n.clone(), hello.to_vec());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if handshake(addr, &hello).is_some() {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().unwrap();
    }
    n.load(Ordering::Relaxed) as f64 / 5.0
}

fn latency(addr: SocketAddr, hello: &[u8]) -> Vec<f64> {
    let mut v: Vec<f64> = (0..2000)
        .filter_map(|_| handshake(addr, hello).map(|(_, d)| d.as_secs_f64() * 1e6))
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn idle_memory(p: &Proxy, hello: &[u8], n: usize) -> f64 {
    let before = p.rss_kib();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match handshake(p.addr, hello) {
            Some((s, _)) => held.push(s),
            None => break,
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = p.rss_kib();
    let got = held.len().max(1);
    drop(held);
    std::thread::sleep(Duration::from_millis(500));
    (after.saturating_sub(before)) as f64 * 1024.0 / got as f64
}

fn main() {
    let hello = hello();
    let be = backend(hello.len());
    let dir = tempfile::tempdir().unwrap();
    let idle_n: usize = std::env::var("MESHFED_BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7000);
    let mut proxies = vec![Proxy {
        name: "direct",
        addr: be,
        child: None,
    }];
    proxies.extend(start_meshfed(be, dir.path()));
    match start_haproxy(be, dir.path()) {
        Some(p) => proxies.push(p),
        None => println!("haproxy: skipped (apt-get install haproxy)"),
    }
    proxies.extend(start_nginx(be, dir.path()));
    let direct_lat = latency(be, &hello);
    println!(
        "{:<8} {:>12} {:>12} {:>10} {:>16} {:>16} {:>14}",
        "proxy",
        "1 stream",
        "8 streams",
        "conn/s",
        "added p50 (us)",
        "added p99 (us)",
        "B/idle conn"
    );
    for p in &proxies {
        let t1 = throughput(p.addr, &hello, 1);
        let t8 = throughput(p.addr, &hello, 8);
        let cps = conns_per_sec(p.addr, &hello);
        let lat = latency(p.addr, &hello);
        let (a50, a99) = (
            pct(&lat, 0.5) - pct(&direct_lat, 0.5),
            pct(&lat, 0.99) - pct(&direct_lat, 0.99),
        );
        let mem = if p.child.is_some() {
            format!("{:.0}", idle_memory(p, &hello, idle_n))
        } else {
            "-".into()
        };
        println!(
            "{:<8} {:>9.2} Gb/s {:>7.2} Gb/s {:>10.0} {:>16.1} {:>16.1} {:>14}",
            p.name, t1, t8, cps, a50, a99, mem
        );
        let _ = std::io::stdout().flush();
    }
}
