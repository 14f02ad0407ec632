//! Mesh DNS throughput and memory: meshfed's DNS (hickory-server, the agent's handler) vs Knot
//! DNS serving the same 10,000 services (20,000 names: svc.cluster.local and
//! svc.clusterset.local), same run. Each server is pinned to core 0 with one worker; dnsperf
//! runs pinned to core 1 with a query file cycling over every name (A queries, 10% NXDOMAIN).
//! Memory per name: the DNS process's RSS growth from building the table, divided by names.
//! Writes its figures to stdout; docs/benchmarks.md records them.
//!
//! Needs `dnsperf` and `knot` (Debian packages). `cargo bench -p meshfed-federator --bench dns`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use meshfed_dns::table::{NameTable, PortName, ServiceNames};

const SERVICES: usize = 10_000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn name(i: usize) -> (String, String) {
    (format!("ns-{}", i % 100), format!("svc-{i}"))
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(240, 240, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn table() -> NameTable {
    let mut t = NameTable::default();
    for i in 0..SERVICES {
        t.services.insert(
            name(i),
            ServiceNames {
                endpoints: Vec::new(),
                headless: false,
                v4: Some(vip(i)),
                v6: None,
                ports: vec![PortName {
                    name: "http".into(),
                    port: 8080,
                    protocol: "tcp".into(),
                }],
                cluster: true,
                clusterset: true,
            },
        );
    }
    t
}

/// The server side, in its own (pinned) process.
fn serve(port: u16) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let before = rss_kib();
        let t = Arc::new(table());
        let after = rss_kib();
        let (_tx, rx) = tokio::sync::watch::channel(t.clone());
        let tasks = meshfed_net::drain::Tasks::new();
        let s = meshfed_dns::serve(
            &tasks,
            format!("127.0.0.1:{port}").parse().unwrap(),
            rx,
            vec![],
            &prometheus::Registry::new(),
        )
        .await
        .unwrap();
        println!("ready {before} {after} {}", t.name_count());
        let _ = std::io::stdout().flush();
        // Serve until stdin closes.
        tokio::task::spawn_blocking(|| {
            let mut s = String::new();
            let _ = std::io::stdin().read_line(&mut s);
        })
        .await
        .unwrap();
        let _ = s.addr;
        tasks.drain(std::time::Duration::from_secs(1)).await;
    });
}

fn free_port() -> u16 {
    loop {
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = t.local_addr().unwrap().port();
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

fn dnsperf(port: u16, queries: &std::path::Path, secs: u32) -> (f64, f64) {
    let o = Command::new("taskset")
        .args(["-c", "1", "dnsperf", "-s", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .arg("-d")
        .arg(queries)
        .args(["-l", &secs.to_string(), "-c", "4", "-q", "200", "-t", "2"])
        .output()
        .expect("dnsperf (apt install dnsperf)");
    let out = String::from_utf8_lossy(&o.stdout);
    let get = |key: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(key))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {key:?} in dnsperf output:\n{out}"))
    };
    (
        get("Queries per second"),
        get("Average Latency (s)") * 1000.0,
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("serve") {
        serve(args[2].parse().unwrap());
        return;
    }
    if Command::new("dnsperf").arg("-h").output().is_err()
        || Command::new("knotd").arg("-V").output().is_err()
    {
        eprintln!("SKIP dns bench: needs dnsperf and knotd (apt install dnsperf knot)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Queries: every name once (A), plus 10% names that do not exist.
    let qf = dir.path().join("queries.txt");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&qf).unwrap());
        for i in 0..SERVICES {
            let (ns, svc) = name(i);
            writeln!(f, "{svc}.{ns}.svc.cluster.local A").unwrap();
            writeln!(f, "{svc}.{ns}.svc.clusterset.local A").unwrap();
            if i % 5 == 0 {
                writeln!(f, "missing-{i}.{ns}.svc.cluster.local A").unwrap();
            }
        }
    }
    // Knot: the same names in two zones.
    for zone in ["cluster.local", "clusterset.local"] {
        let mut z = format!(
            "$ORIGIN {zone}.\n$TTL 5\n@ SOA ns.dns.{zone}. hostmaster.{zone}. 1 3600 600 86400 5\n@ NS ns.dns.{zone}.\nns.dns A 127.0.0.1\n"
        );
        for i in 0..SERVICES {
            let (ns, svc) = name(i);
            z.push_str(&format!("{svc}.{ns}.svc A {}\n", vip(i)));
        }
        std::fs::write(dir.path().join(format!("{zone}.zone")), z).unwrap();
    }
    let kport = free_port();
    let conf = format!(
        "server:\n  rundir: \"{d}\"\n  listen: 127.0.0.1@{kport}\n  udp-workers: 1\n  tcp-workers: 1\n  background-workers: 1\n  user: root:root\ndatabase:\n  storage: \"{d}\"\nlog:\n  - target: stderr\n    any: warning\ntemplate:\n  - id: default\n    storage: \"{d}\"\n    semantic-checks: off\nzone:\n  - domain: cluster.local\n    file: cluster.local.zone\n  - domain: clusterset.local\n    file: clusterset.local.zone\n",
        d = dir.path().display()
    );
    std::fs::write(dir.path().join("knot.conf"), conf).unwrap();
    let mut knot = Command::new("taskset")
        .args(["-c", "0", "knotd", "-c"])
        .arg(dir.path().join("knot.conf"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("knotd");
    let mport = free_port();
    let me = std::env::current_exe().unwrap();
    let mut srv = Command::new("taskset")
        .args(["-c", "0"])
        .arg(&me)
        .args(["serve", &mport.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(srv.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let (before, after, names) = (f[0], f[1], f[2]);
    std::thread::sleep(Duration::from_secs(2));
    let secs = 10;
    let (mut m, mut k) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        m.push(dnsperf(mport, &qf, secs));
        k.push(dnsperf(kport, &qf, secs));
    }
    let best = |v: &Vec<(f64, f64)>| {
        v.iter()
            .cloned()
            .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a })
    };
    let (mq, ml) = best(&m);
    let (kq, kl) = best(&k);
    let per_name = (after.saturating_sub(before) * 1024) as f64 / names as f64;
    println!("names: {names} ({SERVICES} services x cluster.local + clusterset.local), queries: A, 1 in 11 NXDOMAIN");
    for (i, (a, b)) in m.iter().zip(k.iter()).enumerate() {
        println!(
            "run {}: meshfed {:.0} qps ({:.3} ms avg), knot {:.0} qps ({:.3} ms avg)",
            i + 1,
            a.0,
            a.1,
            b.0,
            b.1
        );
    }
    println!("best of 3 x {secs}s: meshfed {mq:.0} qps ({ml:.3} ms avg), knot {kq:.0} qps ({kl:.3} ms avg), ratio {:.2}", mq / kq);
    println!("vs CoreDNS published ~17k qps/core: {:.1}x", mq / 17_000.0);
    println!(
        "memory: table {} KiB RSS for {names} names = {per_name:.0} B/name",
        after - before
    );
    drop(srv.stdin.take());
    let _ = srv.wait();
    let _ = knot.kill();
    let _ = knot.wait();
}
