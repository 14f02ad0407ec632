//! East-west gateway benchmark (not a test): meshfed's gateway (the release `meshfed gateway`
//! process), HAProxy (`mode tcp`, `req.ssl_sni`) with `option splice-auto` and with forced
//! splice (`option splice-request` + `option splice-response`), nginx stream (`ssl_preread`),
//! and a minimal splice relay written here (no routing, no parsing: accept, connect, splice
//! both ways in blocking threads: the kernel path alone) side by side in the same run, in
//! front of the same backend, plus a direct connection.
//!
//! `MESHFED_BENCH_ROUNDS=N` runs every proxy N times, alternating (A B C .. A B C ..), prints
//! each run, then the median and the spread (min-max) of each figure. `MESHFED_BIN_B=path`
//! adds a second meshfed build (`meshfed-b`) to the same run, for before/after comparisons.
//!
//! Each client connection sends a real rustls ClientHello with SNI
//! `outbound_.9080_._.reviews.shop.svc.cluster.local` and ALPN `istio`, then the workload:
//! - bulk throughput: 256 MiB per stream to a sink, 1 and 8 streams;
//! - connections per second: hello -> 1-byte reply -> close, 32 concurrent clients, 5 s;
//! - added latency: time from sending the hello to the backend's reply, minus direct (p50/p99);
//! - memory per idle connection: N connections held open after their hello reached the
//!   backend; the proxy's RSS growth divided by N (`MESHFED_BENCH_IDLE=N`, default 7000; the
//!   machine's 20000 file descriptors per process allow about 9000: the benchmark process
//!   holds both the clients' and the backend's sockets).
//!
//! For quicker comparisons: `MESHFED_BENCH_PROXIES=meshfed,meshfed-b,haproxy` runs only those
//! (and the direct connection); `MESHFED_BENCH_SKIP=bulk,idle` leaves those figures out (NaN).
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

/// The ClientHello the integration tests use (SNI `SNI`, ALPN `istio`).
#[path = "../tests/common/mod.rs"]
mod common;

const SNI: &str = "outbound_.9080_._.reviews.shop.svc.cluster.local";
const BULK: usize = 256 * 1024 * 1024;

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

fn start_meshfed(be: SocketAddr, dir: &Path, bin: PathBuf, name: &'static str) -> Option<Proxy> {
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
        .stdout(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    wait_port(addr).then_some(Proxy {
        name,
        addr,
        child: Some(child),
    })
}

/// HAProxy with `splice` the splice options (`option splice-auto`, or `option splice-request`
/// and `option splice-response` to splice always).
fn start_haproxy(be: SocketAddr, dir: &Path, name: &'static str, splice: &str) -> Option<Proxy> {
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let cfg = format!(
        "global\n  maxconn 7900\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n{splice}frontend fe\n  bind {addr}\n  tcp-request inspect-delay 5s\n  tcp-request content accept if {{ req.ssl_hello_type 1 }}\n  use_backend be if {{ req.ssl_sni -m end .svc.cluster.local }}\nbackend be\n  server s1 {be}\n"
    );
    let path = dir.join(format!("{name}.cfg"));
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
        name,
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

/// The ceiling: a minimal relay on the same kernel path (splice through a pipe, both ways,
/// one blocking thread per direction), with nothing else: no parsing, routing or limits.
fn start_relay(be: SocketAddr) -> Proxy {
    use std::os::fd::AsFd;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    fn pump(from: TcpStream, to: TcpStream) {
        use nix::fcntl::{splice, SpliceFFlags};
        let (pr, pw) = nix::unistd::pipe().unwrap();
        loop {
            let n = match splice(
                from.as_fd(),
                None,
                &pw,
                None,
                1 << 20,
                SpliceFFlags::SPLICE_F_MOVE,
            ) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut left = n;
            while left > 0 {
                match splice(
                    &pr,
                    None,
                    to.as_fd(),
                    None,
                    left,
                    SpliceFFlags::SPLICE_F_MOVE,
                ) {
                    Ok(0) | Err(_) => return,
                    Ok(m) => left -= m,
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Write);
    }
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            std::thread::spawn(move || {
                let Ok(b) = TcpStream::connect(be) else {
                    return;
                };
                let _ = c.set_nodelay(true);
                let _ = b.set_nodelay(true);
                let (c2, b2) = (c.try_clone().unwrap(), b.try_clone().unwrap());
                let t = std::thread::spawn(move || pump(c2, b2));
                pump(b, c);
                let _ = t.join();
            });
        }
    });
    Proxy {
        name: "relay",
        addr,
        child: None,
    }
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

/// `perf stat` on a proxy's processes while `f` runs: (system calls, context switches, CPU
/// milliseconds), or `None` without perf or a process.
fn perf_counts<T>(p: &Proxy, f: impl FnOnce() -> T) -> (T, Option<(f64, f64, f64)>) {
    let Some(c) = &p.child else {
        return (f(), None);
    };
    let out = std::env::temp_dir().join(format!("meshfed-bench-perf-{}.csv", c.id()));
    let perf = Command::new("perf")
        .args([
            "stat",
            "-x,",
            "-e",
            "raw_syscalls:sys_enter,context-switches,task-clock",
            "-o",
        ])
        .arg(&out)
        .args(["-p", &c.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut perf) = perf else {
        return (f(), None);
    };
    // perf attaches in a few milliseconds; a late start only undercounts.
    std::thread::sleep(Duration::from_millis(200));
    let r = f();
    let _ = Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    let _ = perf.wait();
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    let get = |event: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.split(',').nth(2) == Some(event))
            .and_then(|l| l.split(',').next()?.parse().ok())
    };
    let counts = match (
        get("raw_syscalls:sys_enter"),
        get("context-switches"),
        get("task-clock"),
    ) {
        (Some(a), Some(b), Some(c)) => Some((a, b, c)),
        _ => None,
    };
    (r, counts)
}

/// With `MESHFED_BENCH_PERF=1`: system calls and context switches per MiB of one stream, and
/// per connection of the connection-rate test, for each proxy process (perf stat); and, for
/// the direct connection too, the whole machine's CPU time and TCP segments sent per
/// connection of that test (/proc/stat, /proc/net/snmp).
fn profile(p: &Proxy, hello: &[u8]) {
    if p.child.is_none() && p.name != "direct" {
        return;
    }
    let (_, bulk) = perf_counts(p, || throughput(p.addr, hello, 1));
    let n = Arc::new(AtomicU64::new(0));
    // The whole machine's CPU time and TCP segments over the same test: what a proxy makes
    // the clients, the backend and the kernel do as well as what it does itself.
    let (cpu0, segs0) = (machine_cpu_secs(), tcp_out_segments());
    let (cps, conn) = perf_counts(p, || conns_per_sec(p.addr, hello));
    let (cpu1, segs1) = (machine_cpu_secs(), tcp_out_segments());
    n.store((cps * 5.0) as u64, Ordering::Relaxed);
    let mib = (BULK / (1024 * 1024)) as f64;
    let conns = (n.load(Ordering::Relaxed).max(1)) as f64;
    match (bulk, conn) {
        (Some(b), Some(c)) => println!(
            "perf {:<10} 1 stream: {:.1} syscalls/MiB, {:.2} context switches/MiB, {:.2} CPU ms/MiB | conn/s test: {:.1} syscalls/conn, {:.2} context switches/conn, {:.1} CPU us/conn",
            p.name,
            b.0 / mib,
            b.1 / mib,
            b.2 / mib,
            c.0 / conns,
            c.1 / conns,
            c.2 * 1000.0 / conns
        ),
        _ if p.child.is_none() => {}
        _ => println!("perf {:<10} no counts (perf missing or not permitted)", p.name),
    }
    if let (Some(c0), Some(c1), Some(s0), Some(s1)) = (cpu0, cpu1, segs0, segs1) {
        println!(
            "machine {:<7} conn/s test: {cps:.0} conn/s, {:.2} CPUs busy, {:.1} CPU us/conn (all processes), {:.1} TCP segments sent/conn",
            p.name,
            (c1 - c0) / 5.0,
            (c1 - c0) * 1e6 / conns,
            (s1 - s0) / conns
        );
    }
}

/// CPU seconds the machine spent busy (every CPU: user, nice, system, irq, softirq, steal),
/// from /proc/stat.
fn machine_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    Some(busy / 100.0)
}

/// TCP segments sent by the machine (/proc/net/snmp `Tcp: OutSegs`).
fn tcp_out_segments() -> Option<f64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let i = names.split_whitespace().position(|x| x == "OutSegs")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// One run of one proxy: 1 and 8 streams (Gb/s), conn/s, added p50 and p99 (us), bytes per
/// idle connection (NaN where not measured).
/// Whether `MESHFED_BENCH_SKIP` names this part of the run.
fn skipped(part: &str) -> bool {
    std::env::var("MESHFED_BENCH_SKIP")
        .unwrap_or_default()
        .split(',')
        .any(|x| x.trim() == part)
}

/// Whether `MESHFED_BENCH_PROXIES` (when set) names this proxy.
fn selected(name: &str) -> bool {
    match std::env::var("MESHFED_BENCH_PROXIES") {
        Ok(v) if !v.trim().is_empty() => name == "direct" || v.split(',').any(|x| x.trim() == name),
        _ => true,
    }
}

fn run(p: &Proxy, hello: &[u8], direct_lat: &[f64], idle_n: usize) -> [f64; 6] {
    let (t1, t8) = if skipped("bulk") {
        (f64::NAN, f64::NAN)
    } else {
        (throughput(p.addr, hello, 1), throughput(p.addr, hello, 8))
    };
    let cps = conns_per_sec(p.addr, hello);
    let lat = latency(p.addr, hello);
    let (a50, a99) = (
        pct(&lat, 0.5) - pct(direct_lat, 0.5),
        pct(&lat, 0.99) - pct(direct_lat, 0.99),
    );
    let mem = if p.child.is_some() && !skipped("idle") {
        // HAProxy asks for 2 x maxconn descriptors and more, and refuses to start above the
        // 20000 this machine allows: its maxconn 7900 holds at most about 7,800 connections.
        let n = if p.name.starts_with("haproxy") && idle_n > HAPROXY_MAX_IDLE {
            println!(
                "{}: idle memory over {HAPROXY_MAX_IDLE} connections",
                p.name
            );
            HAPROXY_MAX_IDLE
        } else {
            idle_n
        };
        idle_memory(p, hello, n)
    } else {
        f64::NAN
    };
    [t1, t8, cps, a50, a99, mem]
}

/// The most idle connections HAProxy (maxconn 7900) is asked to hold.
const HAPROXY_MAX_IDLE: usize = 7500;

fn row(name: &str, r: &[f64; 6]) -> String {
    format!(
        "{:<10} {:>9.2} Gb/s {:>7.2} Gb/s {:>10.0} {:>16.1} {:>16.1} {:>14.0}",
        name, r[0], r[1], r[2], r[3], r[4], r[5]
    )
}

fn main() {
    let hello = common::istio_hello();
    let be = backend(hello.len());
    let dir = tempfile::tempdir().unwrap();
    let idle_n: usize = std::env::var("MESHFED_BENCH_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7000);
    let rounds: usize = std::env::var("MESHFED_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let start_all = || {
        let mut proxies = vec![Proxy {
            name: "direct",
            addr: be,
            child: None,
        }];
        proxies.push(start_relay(be));
        let bin = meshfed_bin();
        if bin.exists() {
            proxies.extend(start_meshfed(be, dir.path(), bin, "meshfed"));
        } else {
            println!(
                "meshfed: skipped ({} missing; cargo build --release --bin meshfed)",
                bin.display()
            );
        }
        if let Some(b) = std::env::var_os("MESHFED_BIN_B") {
            proxies.extend(start_meshfed(be, dir.path(), b.into(), "meshfed-b"));
        }
        let auto = start_haproxy(be, dir.path(), "haproxy", "  option splice-auto\n");
        let forced = start_haproxy(
            be,
            dir.path(),
            "haproxy-fs",
            "  option splice-request\n  option splice-response\n",
        );
        if auto.is_none() && forced.is_none() {
            println!("haproxy: skipped (apt-get install haproxy)");
        }
        proxies.extend(auto);
        proxies.extend(forced);
        proxies.extend(start_nginx(be, dir.path()));
        proxies.retain(|p| selected(p.name));
        proxies
    };
    let header = format!(
        "{:<10} {:>14} {:>12} {:>10} {:>16} {:>16} {:>14}",
        "proxy",
        "1 stream",
        "8 streams",
        "conn/s",
        "added p50 (us)",
        "added p99 (us)",
        "B/idle conn"
    );
    println!("{header}");
    // Every round starts every proxy afresh (so each memory figure is a fresh process's),
    // and measures the direct connection's latency again.
    let mut names: Vec<&'static str> = Vec::new();
    let mut all: Vec<Vec<[f64; 6]>> = Vec::new();
    for round in 0..rounds {
        if rounds > 1 {
            println!("-- run {} of {rounds}", round + 1);
        }
        let proxies = start_all();
        if std::env::var_os("MESHFED_BENCH_PERF").is_some() {
            for p in &proxies {
                profile(p, &hello);
            }
        }
        let direct_lat = latency(be, &hello);
        for p in &proxies {
            let mut r = run(p, &hello, &direct_lat, idle_n);
            if p.name == "direct" {
                r[3] = f64::NAN;
                r[4] = f64::NAN;
            }
            println!("{}", row(p.name, &r));
            let _ = std::io::stdout().flush();
            match names.iter().position(|n| *n == p.name) {
                Some(i) => all[i].push(r),
                None => {
                    names.push(p.name);
                    all.push(vec![r]);
                }
            }
        }
    }
    if rounds > 1 {
        println!("\n-- median of {rounds} alternating runs (spread: min-max)");
        println!("{header}");
        let mut medians = Vec::new();
        for (name, runs) in names.iter().zip(&all) {
            let mut med = [0f64; 6];
            let mut spread = Vec::new();
            for (k, m) in med.iter_mut().enumerate() {
                let mut v: Vec<f64> = runs.iter().map(|r| r[k]).collect();
                v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
                *m = v[v.len() / 2];
                spread.push(format!("{:.2}-{:.2}", v[0], v[v.len() - 1]));
            }
            println!("{}", row(name, &med));
            println!("{:<10} spread: {}", "", spread.join(" | "));
            medians.push((*name, med));
        }
        // meshfed against the better HAProxy configuration, figure by figure.
        let get = |n: &str| medians.iter().find(|(m, _)| *m == n).map(|(_, r)| *r);
        if let Some(m) = get("meshfed") {
            let best = |k: usize, higher: bool| {
                ["haproxy", "haproxy-fs"]
                    .iter()
                    .filter_map(|n| get(n).map(|r| r[k]))
                    .fold(None, |acc: Option<f64>, x| match acc {
                        None => Some(x),
                        Some(a) => Some(if higher == (x > a) { x } else { a }),
                    })
            };
            let names = ["1 stream", "8 streams", "conn/s"];
            for (k, n) in names.iter().enumerate() {
                if let (Some(h), Some(d), Some(r)) = (best(k, true), get("direct"), get("relay")) {
                    println!(
                        "meshfed {n}: {:.2}x the better HAProxy, {:.2}x direct, {:.2}x the relay",
                        m[k] / h,
                        m[k] / d[k],
                        m[k] / r[k]
                    );
                }
            }
        }
    }
}
