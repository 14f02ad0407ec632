//! A harness that runs real `meshfed` processes (federator, agents) on this machine, injects
//! faults (kill -9, SIGSTOP/SIGCONT, restarts) and reads their measured state back through
//! `meshfed status --output json`, as an operator would.
//!
//! The binary is found through `MESHFED_BIN`, or next to the test executable
//! (`target/<profile>/meshfed`), which `cargo nextest run --workspace` builds.

pub mod apiserver;
pub mod browser;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
pub use meshfed_harness::netns::{Network, NsRuntime, Topology};

/// The meshfed binary under test.
pub fn meshfed_bin() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("MESHFED_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> -> target/<profile>/meshfed
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot locate the target directory")?;
    let bin = dir.join("meshfed");
    if !bin.is_file() {
        bail!(
            "{} not found: build it first (cargo build -p meshfed) or set MESHFED_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Runs `meshfed ARGS` to completion; returns (exit code, stdout, stderr).
/// A UDP port free now that is also free for TCP (for DNS).
pub fn free_udp_port() -> u16 {
    loop {
        let p = free_port();
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// A network namespace joined to the host by a veth pair (`host_ip/30` on the host side,
/// `ns_ip/30` inside, default route via the host). Deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    pub host_ip: String,
    pub ns_ip: String,
    host_if: String,
}

fn sh(args: &[&str]) -> Result<()> {
    let o = Command::new(args[0]).args(&args[1..]).output()?;
    if !o.status.success() {
        anyhow::bail!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

impl Netns {
    /// `Ok(None)` when this machine cannot make namespaces (not root, no `ip`): the caller
    /// prints a skip line.
    pub fn create(tag: &str, subnet: u8) -> Result<Option<Netns>> {
        let probe = Command::new("ip").args(["netns", "list"]).output();
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        if !root || !probe.map(|o| o.status.success()).unwrap_or(false) {
            return Ok(None);
        }
        let id = std::process::id() % 10000;
        let name = format!("mf-{tag}-{id}");
        let host_if = format!("mfh{subnet}x{id}");
        let ns_if = format!("mfn{subnet}x{id}");
        let host_ip = format!("10.213.{subnet}.1");
        let ns_ip = format!("10.213.{subnet}.2");
        let _ = sh(&["ip", "netns", "del", &name]);
        let _ = sh(&["ip", "link", "del", &host_if]);
        sh(&["ip", "netns", "add", &name])?;
        let me = Netns {
            name: name.clone(),
            host_ip: host_ip.clone(),
            ns_ip: ns_ip.clone(),
            host_if: host_if.clone(),
        };
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        sh(&["ip", "link", "set", &ns_if, "netns", &name])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &host_if,
        ])?;
        sh(&["ip", "link", "set", &host_if, "up"])?;
        let ns = |a: &[&str]| {
            let mut v = vec!["ip", "netns", "exec", &name];
            v.extend_from_slice(a);
            sh(&v)
        };
        ns(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if])?;
        ns(&["ip", "link", "set", &ns_if, "up"])?;
        ns(&["ip", "link", "set", "lo", "up"])?;
        ns(&["ip", "route", "add", "default", "via", &host_ip])?;
        Ok(Some(me))
    }

    /// Cuts (`false`) or restores (`true`) the namespace's link to the host: a partition.
    pub fn set_link(&self, up: bool) -> Result<()> {
        sh(&[
            "ip",
            "link",
            "set",
            &self.host_if,
            if up { "up" } else { "down" },
        ])
    }

    /// `ip netns exec <ns> <program> <args...>` as (program, args) for [`Proc::spawn_program`].
    pub fn wrap(&self, program: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
        let mut v = vec![
            "netns".to_string(),
            "exec".into(),
            self.name.clone(),
            program.display().to_string(),
        ];
        v.extend(args.iter().cloned());
        (PathBuf::from("ip"), v)
    }

    /// Runs a command inside the namespace and returns (exit code, stdout + stderr).
    pub fn run(&self, program: &str, args: &[&str]) -> Result<(i32, String)> {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()?;
        Ok((
            o.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
        let _ = sh(&["ip", "link", "del", &self.host_if]);
    }
}

pub fn meshfed(args: &[&str]) -> Result<(i32, String, String)> {
    let out = Command::new(meshfed_bin()?).args(args).output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Like [`meshfed`], failing unless it exits 0; returns stdout.
pub fn meshfed_ok(args: &[&str]) -> Result<String> {
    let (code, out, err) = meshfed(args)?;
    if code != 0 {
        bail!("meshfed {args:?} exited {code}: {err}{out}");
    }
    Ok(out)
}

/// `meshfed ca rotate start` on a cluster's state directory (a second root published `lead`
/// before it signs, e.g. "1s"); what it printed.
pub fn rotate_cluster_ca(state_dir: &Path, lead: &str) -> Result<String> {
    let dir = state_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("state directory {} is not UTF-8", state_dir.display()))?;
    meshfed_ok(&[
        "ca",
        "rotate",
        "start",
        "--state-dir",
        dir,
        "--publish-lead",
        lead,
    ])
}

/// A long-running meshfed process whose output goes to a log file. Killed on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn spawn(name: &str, args: &[String], log_dir: &Path) -> Result<Proc> {
        Proc::spawn_program(name, &meshfed_bin()?, args, &[], log_dir)
    }

    /// Any program (a third-party peer such as a grpcio client), same log handling.
    pub fn spawn_program(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, &str)],
        log_dir: &Path,
    ) -> Result<Proc> {
        let mut p = Proc {
            name: name.to_string(),
            program: program.to_path_buf(),
            args: args.to_vec(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: log_dir.join(format!("{name}.log")),
            child: None,
        };
        p.start()?;
        Ok(p)
    }

    /// (Re)starts the process with its original arguments, appending to its log.
    pub fn start(&mut self) -> Result<()> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("MESHFED_LOG", "info,meshfed_agent::sync=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// kill -9.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: &str) -> Result<()> {
        let pid = self.pid().context("not running")?;
        let st = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?;
        if !st.success() {
            bail!("kill {sig} {pid} failed");
        }
        Ok(())
    }

    pub fn stop(&self) -> Result<()> {
        self.signal("-STOP")
    }

    pub fn cont(&self) -> Result<()> {
        self.signal("-CONT")
    }

    /// SIGTERM (graceful shutdown).
    pub fn term(&self) -> Result<()> {
        self.signal("-TERM")
    }

    /// Whether the process has exited (reaping it if so).
    pub fn exited(&mut self) -> bool {
        matches!(
            self.child.as_mut().map(|c| c.try_wait()),
            Some(Ok(Some(_))) | None
        )
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.cont();
        self.kill9();
    }
}

/// The Python with grpcio that scripts/test installs (`MESHFED_PYTHON`, else `.venv` at the
/// workspace root).
pub fn python() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("MESHFED_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    if p.exists() {
        return Ok(p);
    }
    bail!("no Python with grpcio: run scripts/test (it creates .venv) or set MESHFED_PYTHON")
}

/// A file under `chaos/py/`.
pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// Polls `f` until it returns `Some`, or fails after `timeout` with the last reason.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what}{}",
                if last.is_empty() {
                    String::new()
                } else {
                    format!(" (last error: {last})")
                }
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `meshfed status --output json` against an admin address: (exit code, JSON).
pub fn status(admin: &str) -> Result<(i32, serde_json::Value)> {
    let (code, out, err) = meshfed(&["status", "--admin", admin, "--output", "json"])?;
    // 0 healthy, 1 this component is not, 3 a peer is not.
    if ![0, 1, 3].contains(&code) {
        bail!("meshfed status exited {code}: {err}");
    }
    let v = serde_json::from_str(&out)
        .with_context(|| format!("status output is not JSON: {out}{err}"))?;
    Ok((code, v))
}

/// `GET <path>` from `addr` over HTTP/1.1: (status code, whole response).
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let sa: std::net::SocketAddr = addr.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let code = body
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status from {addr}{path}"))?;
    Ok((code, body))
}

/// `GET <path>` from `addr` with a JSON body: (status code, the body).
pub fn http_json(addr: &str, path: &str) -> Result<(u16, serde_json::Value)> {
    let (code, whole) = http_get(addr, path)?;
    let body = whole
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .with_context(|| format!("no body from {addr}{path}"))?;
    let v = serde_json::from_str(body)
        .with_context(|| format!("{addr}{path} did not answer JSON: {body}"))?;
    Ok((code, v))
}

/// The value of one Prometheus sample (`name{labels}` exactly as exposed) from `GET /metrics`.
pub fn metric(admin: &str, series: &str) -> Result<Option<f64>> {
    let (_, body) = http_get(admin, "/metrics")?;
    Ok(body
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok()))
}

/// One cluster: its state directory, registry file and agent.
#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub dir: PathBuf,
    pub registry: PathBuf,
    pub admin: String,
    /// Plaintext and mTLS xDS addresses of the agent.
    pub xds: String,
    pub xds_mtls: String,
    /// The agent's VM API and mesh DNS addresses.
    pub vm_api: String,
    pub dns: String,
    /// The agent's SPIFFE bundle endpoint (`host:port`; `https://` + this is its URL).
    pub bundle_endpoint: String,
    /// The agent watches this directory for failover policies (`*.yaml`).
    pub policy_dir: PathBuf,
    pub agent: Option<Proc>,
    /// The network namespace the cluster's processes run in (`None`: the host's network).
    pub netns: Option<String>,
    /// Flags added to every start of the agent.
    pub agent_args: Vec<String>,
}

impl Cluster {
    pub fn write_registry(&self, yaml: &str) -> Result<()> {
        let tmp = self.registry.with_extension("tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.registry)?;
        Ok(())
    }

    pub fn status(&self) -> Result<serde_json::Value> {
        Ok(status(&self.admin)?.1)
    }

    /// Writes (atomically) a policy file into the watched directory.
    pub fn write_policy(&self, name: &str, yaml: &str) -> Result<()> {
        let tmp = self.policy_dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, self.policy_dir.join(name))?;
        Ok(())
    }

    /// Issues an X509-SVID from this cluster's CA into `out` (`meshfed ca issue`).
    pub fn issue_svid(&self, id: &str, out: &Path) -> Result<()> {
        meshfed_ok(&[
            "ca",
            "issue",
            "--ca",
            self.dir.join("ca").to_str().unwrap_or_default(),
            "--spiffe-id",
            id,
            "--out",
            out.to_str().unwrap_or_default(),
        ])?;
        Ok(())
    }

    /// Whether this cluster's agent holds `peer`'s trust bundle.
    pub fn has_bundle_of(&self, peer: &str) -> Result<bool> {
        Ok(self.status()?["peers"].as_array().is_some_and(|p| {
            p.iter()
                .any(|p| p["cluster"] == peer && p["bundle"] == true)
        }))
    }

    pub fn agent(&mut self) -> Result<&mut Proc> {
        self.agent.as_mut().context("the agent was never started")
    }

    /// The program and arguments that run `meshfed <args>` in the cluster's namespace.
    fn command(&self, args: &[String]) -> Result<(PathBuf, Vec<String>)> {
        in_netns(self.netns.as_deref(), args)
    }

    /// Starts an east-west gateway process fed by this cluster's agent, listening on
    /// `listen`, with its admin endpoint at `admin`; waits until it has routes.
    pub fn start_gateway(
        &self,
        name: &str,
        listen: &str,
        admin: &str,
        log_dir: &Path,
    ) -> Result<Proc> {
        self.start_gateway_with(name, listen, admin, log_dir, &[])
    }

    /// [`start_gateway`](Self::start_gateway) with extra flags (`--any-alpn`).
    pub fn start_gateway_with(
        &self,
        name: &str,
        listen: &str,
        admin: &str,
        log_dir: &Path,
        extra: &[&str],
    ) -> Result<Proc> {
        let mut args: Vec<String> = [
            "gateway",
            "--listen",
            listen,
            "--xds",
            &self.xds,
            "--admin",
            admin,
            "--drain-timeout",
            "1s",
            "--cluster",
            &self.name,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let (program, args) = self.command(&args)?;
        let p = Proc::spawn_program(name, &program, &args, &[], log_dir)?;
        wait_for(
            Duration::from_secs(20),
            &format!("{name} to have routes"),
            || {
                Ok(http_get(admin, "/readyz")
                    .ok()
                    .filter(|(code, _)| *code == 200)
                    .map(|_| ()))
            },
        )?;
        Ok(p)
    }
}

/// Waits until `importer` imports `n` services from `exporter` and each holds the other's
/// bundle.
pub fn wait_peered(
    importer: &Cluster,
    exporter: &Cluster,
    n: u64,
    timeout: Duration,
) -> Result<()> {
    wait_for(
        timeout,
        &format!(
            "{} imports {n} of {}'s services and both hold each other's bundle",
            importer.name, exporter.name
        ),
        || {
            let s = importer.status()?;
            Ok((s["imports"][&exporter.name].as_u64() == Some(n)
                && importer.has_bundle_of(&exporter.name)?
                && exporter.has_bundle_of(&importer.name)?)
            .then_some(()))
        },
    )
}

/// `meshfed <args>`, wrapped in `ip netns exec <ns>` when `ns` is given.
fn in_netns(ns: Option<&str>, args: &[String]) -> Result<(PathBuf, Vec<String>)> {
    Ok(meshfed_harness::netns::command_in(
        ns,
        &meshfed_bin()?,
        args,
    ))
}

/// `dig @<the cluster's mesh DNS> NAME QTYPE +short`: the answers, sorted.
pub fn dig(c: &Cluster, name: &str, qtype: &str) -> Result<Vec<String>> {
    let (host, port) = c
        .dns
        .rsplit_once(':')
        .context("the DNS address has no port")?;
    let out = std::process::Command::new("dig")
        .args([
            &format!("@{host}"),
            "-p",
            port,
            name,
            qtype,
            "+short",
            "+tries=1",
            "+time=2",
        ])
        .output()?;
    anyhow::ensure!(out.status.success(), "dig failed: {:?}", out);
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    v.sort();
    Ok(v)
}

/// `meshfed join` for `cluster` (trust domain `<cluster>.mesh`, as the harness names them)
/// into `dir`, followed by `extra` flags.
pub fn join_args(
    token: &str,
    dir: &Path,
    cluster: &str,
    network: &str,
    locality: &str,
    extra: &[&str],
) -> Vec<String> {
    let td = format!("{cluster}.mesh");
    [
        "join",
        "--token",
        token,
        "--state-dir",
        dir.to_str().unwrap_or_default(),
        "--cluster",
        cluster,
        "--network",
        network,
        "--trust-domain",
        &td,
        "--locality",
        locality,
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

/// An export storm at `c`: 60 registry writes of 10 + round % 7 services each, each written
/// once the agent has read the one before (its export count, which differs from round to
/// round); `during` runs once the federator has acknowledged three of them, while the writes
/// go on. Returns the number of services of the last write.
pub fn export_storm(c: &Cluster, during: impl FnOnce()) -> Result<usize> {
    let before = c.status()?["exports_acked_version"].as_u64().unwrap_or(0);
    std::thread::scope(|s| {
        let writer = s.spawn(|| -> Result<()> {
            for round in 0..60u16 {
                let n = 10 + usize::from(round % 7);
                c.write_registry(&registry_yaml("svc", n, 8000 + round, ""))?;
                wait_for(
                    Duration::from_secs(20),
                    "the agent to read the write",
                    || Ok((c.status()?["exports"].as_u64() == Some(n as u64)).then_some(())),
                )?;
            }
            Ok(())
        });
        wait_for(Duration::from_secs(20), "the storm to be under way", || {
            let v = c.status()?["exports_acked_version"].as_u64().unwrap_or(0);
            Ok((v >= before + 3).then_some(()))
        })?;
        during();
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("the storm's writer panicked"))?
    })?;
    Ok(10 + 59 % 7)
}

/// That cluster `c` resumed after losing its federator without a full resend: its agent never
/// found the federator's export version behind its own, its counters show no full set and the
/// storm's deltas, and it reconnected.
pub fn assert_resumed_without_full_resend(c: &mut Cluster) {
    let admin = c.admin.clone();
    let log = c.agent().map(|a| a.log()).unwrap_or_default();
    assert!(
        !log.contains("export versions differ"),
        "the cluster had to resend everything: an acknowledged export was lost\n{log}"
    );
    let full = metric(
        &admin,
        "meshfed_agent_export_deltas_sent_total{kind=\"full\"}",
    )
    .unwrap_or_default();
    let deltas = metric(
        &admin,
        "meshfed_agent_export_deltas_sent_total{kind=\"delta\"}",
    )
    .unwrap_or_default();
    println!("the cluster sent {full:?} full exports and {deltas:?} deltas across the kill");
    assert_eq!(
        full.unwrap_or(0.0),
        0.0,
        "the cluster resent its full export set"
    );
    assert!(
        deltas.unwrap_or(0.0) >= 5.0,
        "the storm produced deltas: {deltas:?}"
    );
    assert!(
        log.matches("connected to the federator").count() >= 2,
        "the cluster reconnected after the kill:\n{log}"
    );
}

/// A federator plus clusters, all in one temporary directory.
#[derive(Debug)]
pub struct Federation {
    pub root: tempfile::TempDir,
    pub grpc: String,
    pub admin: String,
    pub federator: Proc,
    lease_ttl: String,
    /// With `--store etcd`: the replicas after the first (which is `federator`, `grpc`,
    /// `admin`), and the etcd endpoints they share.
    pub replicas: Vec<Replica>,
    etcd: Option<Vec<String>>,
}

/// A federator replica beside the first.
#[derive(Debug)]
pub struct Replica {
    pub proc: Proc,
    pub grpc: String,
    pub admin: String,
}

impl Federation {
    pub fn start(lease_ttl: &str) -> Result<Federation> {
        Federation::start_in(lease_ttl, None)
    }

    /// The federator in `net`'s namespace (gRPC on :15100, admin on :15101 of its address),
    /// or on loopback with free ports.
    pub fn start_in(lease_ttl: &str, net: Option<&Network>) -> Result<Federation> {
        Federation::start_with(lease_ttl, net, &[])
    }

    /// The same with more `meshfed federator` flags.
    pub fn start_with(
        lease_ttl: &str,
        net: Option<&Network>,
        extra: &[&str],
    ) -> Result<Federation> {
        let root = tempfile::tempdir()?;
        let (grpc, admin) = match net {
            Some(n) => (format!("{}:15100", n.addr), format!("{}:15101", n.addr)),
            None => (
                format!("127.0.0.1:{}", free_port()),
                format!("127.0.0.1:{}", free_port()),
            ),
        };
        let state = root.path().join("federator");
        let args: Vec<String> = [
            "federator",
            "--state-dir",
            state.to_str().unwrap_or_default(),
            "--listen",
            &grpc,
            "--admin",
            &admin,
            "--lease-ttl",
            lease_ttl,
        ]
        .iter()
        .chain(extra)
        .map(|s| s.to_string())
        .collect();
        let (program, args) = in_netns(net.map(|n| n.ns.as_str()), &args)?;
        let federator = Proc::spawn_program("federator", &program, &args, &[], root.path())?;
        let f = Federation {
            root,
            grpc,
            admin,
            federator,
            lease_ttl: lease_ttl.to_string(),
            replicas: Vec::new(),
            etcd: None,
        };
        wait_for(Duration::from_secs(20), "the federator to serve", || {
            Ok(status(&f.admin).ok().map(|_| ()))
        })?;
        Ok(f)
    }

    /// `n` federator replicas (`--store etcd`) on the etcd at `endpoints`, each with a state
    /// directory of its own, on loopback; join tokens come from etcd and name every replica.
    pub fn start_replicas(lease_ttl: &str, endpoints: &[String], n: usize) -> Result<Federation> {
        Federation::start_replicas_each(lease_ttl, &vec![endpoints.to_vec(); n])
    }

    /// One replica per entry of `each`, which lists the etcd endpoints that replica dials (the
    /// same etcd, perhaps through a `meshfed_store::etcd::local::Cuttable` relay of its own).
    pub fn start_replicas_each(lease_ttl: &str, each: &[Vec<String>]) -> Result<Federation> {
        let root = tempfile::tempdir()?;
        let mut started = Vec::new();
        let endpoints = each.first().cloned().unwrap_or_default();
        for (i, endpoints) in each.iter().enumerate() {
            let (grpc, admin) = (
                format!("127.0.0.1:{}", free_port()),
                format!("127.0.0.1:{}", free_port()),
            );
            let state = root.path().join(format!("federator-{i}"));
            let args: Vec<String> = [
                "federator",
                "--state-dir",
                state.to_str().unwrap_or_default(),
                "--listen",
                &grpc,
                "--admin",
                &admin,
                "--lease-ttl",
                lease_ttl,
                "--store",
                "etcd",
                "--etcd-endpoints",
                &endpoints.join(","),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let proc = Proc::spawn(&format!("federator-{i}"), &args, root.path())?;
            wait_for(
                Duration::from_secs(30),
                "a federator replica to serve",
                || Ok(status(&admin).ok().map(|_| ())),
            )?;
            started.push(Replica { proc, grpc, admin });
        }
        let mut it = started.into_iter();
        let first = it.next().context("no replica")?;
        Ok(Federation {
            root,
            grpc: first.grpc,
            admin: first.admin,
            federator: first.proc,
            lease_ttl: lease_ttl.to_string(),
            replicas: it.collect(),
            etcd: Some(endpoints.to_vec()),
        })
    }

    /// The etcd endpoints the token commands use.
    pub fn etcd_endpoints(&self) -> Option<&[String]> {
        self.etcd.as_deref()
    }

    /// Every replica's admin address (the first federator's first).
    pub fn admins(&self) -> Vec<String> {
        std::iter::once(self.admin.clone())
            .chain(self.replicas.iter().map(|r| r.admin.clone()))
            .collect()
    }

    /// Replica `i` (0: `federator`).
    pub fn replica_proc(&mut self, i: usize) -> &mut Proc {
        match i {
            0 => &mut self.federator,
            i => &mut self.replicas[i - 1].proc,
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        self.root.path().join("federator")
    }

    pub fn lease_ttl(&self) -> &str {
        &self.lease_ttl
    }

    pub fn token(&self, cluster: &str) -> Result<String> {
        let state_dir = self.state_dir();
        let (flag, home) = match &self.etcd {
            Some(e) => ("--etcd-endpoints", e.join(",")),
            None => ("--state-dir", state_dir.to_string_lossy().into_owned()),
        };
        Ok(meshfed_ok(&[
            "federator",
            "token",
            "create",
            flag,
            &home,
            "--cluster",
            cluster,
        ])?
        .trim()
        .to_string())
    }

    /// Joins a cluster and starts its agent with `registry` as its registry file.
    pub fn add_cluster(
        &self,
        name: &str,
        network: &str,
        locality: &str,
        registry: &str,
    ) -> Result<Cluster> {
        self.add_cluster_in(name, network, locality, registry, None, &[])
    }

    /// Joins a cluster whose processes run in `net`'s namespace (agent admin :15014, xDS
    /// :15010/:15012, VM API :15018, DNS :15053 on its address) with east-west gateways at
    /// `gateways` (default: one free loopback port, unused).
    pub fn add_cluster_in(
        &self,
        name: &str,
        network: &str,
        locality: &str,
        registry: &str,
        net: Option<&Network>,
        gateways: &[String],
    ) -> Result<Cluster> {
        self.add_cluster_with(name, network, locality, registry, net, gateways, &[])
    }

    /// [`add_cluster_in`](Self::add_cluster_in), with extra flags for the agent.
    #[allow(clippy::too_many_arguments)]
    pub fn add_cluster_with(
        &self,
        name: &str,
        network: &str,
        locality: &str,
        registry: &str,
        net: Option<&Network>,
        gateways: &[String],
        agent_args: &[&str],
    ) -> Result<Cluster> {
        let dir = self.root.path().join(name);
        let token = self.token(name)?;
        let mut join = join_args(&token, &dir, name, network, locality, &[]);
        if gateways.is_empty() {
            join.extend(["--gateway".into(), format!("127.0.0.1:{}", free_port())]);
        }
        for g in gateways {
            join.extend(["--gateway".into(), g.clone()]);
        }
        let ns = net.map(|n| n.ns.clone());
        let (program, args) = in_netns(ns.as_deref(), &join)?;
        let out = Command::new(&program).args(&args).output()?;
        if !out.status.success() {
            bail!(
                "meshfed join failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let policy_dir = self.root.path().join(format!("{name}-policies"));
        std::fs::create_dir_all(&policy_dir)?;
        let at = |port: u16, free: u16| match net {
            Some(n) => format!("{}:{port}", n.addr),
            None => format!("127.0.0.1:{free}"),
        };
        let mut c = Cluster {
            name: name.to_string(),
            registry: self.root.path().join(format!("{name}.yaml")),
            admin: at(15014, free_port()),
            xds: at(15010, free_port()),
            xds_mtls: at(15012, free_port()),
            vm_api: at(15018, free_port()),
            dns: at(15053, free_udp_port()),
            bundle_endpoint: at(15019, free_port()),
            policy_dir,
            dir,
            agent: None,
            netns: ns,
            agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
        };
        c.write_registry(registry)?;
        self.start_agent(&mut c)?;
        Ok(c)
    }

    /// A cluster whose agent reads the Kubernetes API of `kubeconfig` (`--source kubernetes`)
    /// beside the registry file.
    pub fn add_kube_cluster(
        &self,
        name: &str,
        network: &str,
        locality: &str,
        registry: &str,
        kubeconfig: &Path,
    ) -> Result<Cluster> {
        let kc = kubeconfig
            .to_str()
            .context("kubeconfig path is not UTF-8")?;
        self.add_cluster_with(
            name,
            network,
            locality,
            registry,
            None,
            &[],
            &["--source", "kubernetes", "--kubeconfig", kc],
        )
    }

    pub fn start_agent(&self, c: &mut Cluster) -> Result<()> {
        // Ports come from `free_port`, which another test may take before the agent binds
        // them: an agent that exits because a port is taken is started again on fresh ports.
        for attempt in 0.. {
            match self.try_start_agent(c)? {
                true => return Ok(()),
                false if attempt < 3 && c.netns.is_none() => {
                    c.admin = format!("127.0.0.1:{}", free_port());
                    c.xds = format!("127.0.0.1:{}", free_port());
                    c.xds_mtls = format!("127.0.0.1:{}", free_port());
                    c.vm_api = format!("127.0.0.1:{}", free_port());
                    c.dns = format!("127.0.0.1:{}", free_udp_port());
                    c.bundle_endpoint = format!("127.0.0.1:{}", free_port());
                }
                false => {
                    let log = c.agent.as_ref().map(|a| a.log()).unwrap_or_default();
                    bail!("the agent of {} could not bind its ports:\n{log}", c.name);
                }
            }
        }
        Ok(())
    }

    /// Starts the agent; `false` when it exited because one of its ports was taken.
    fn try_start_agent(&self, c: &mut Cluster) -> Result<bool> {
        let args: Vec<String> = [
            "agent",
            "--state-dir",
            c.dir.to_str().unwrap_or_default(),
            "--registry",
            c.registry.to_str().unwrap_or_default(),
            "--admin",
            &c.admin,
            "--registry-poll",
            "100ms",
            "--policy",
            c.policy_dir.to_str().unwrap_or_default(),
            "--xds-plaintext",
            &c.xds,
            "--xds-mtls",
            &c.xds_mtls,
            "--vm-api",
            &c.vm_api,
            "--vm-grace",
            "2s",
            "--dns",
            &c.dns,
            "--bundle-endpoint",
            &c.bundle_endpoint,
            "--vip-range",
            "240.240.0.0/16",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(c.agent_args.iter().cloned())
        .collect();
        let (program, args) = c.command(&args)?;
        c.agent = Some(Proc::spawn_program(
            &format!("agent-{}", c.name),
            &program,
            &args,
            &[],
            self.root.path(),
        )?);
        let admin = c.admin.clone();
        let agent = c.agent.as_mut();
        let agent = agent.context("agent just started")?;
        let r = wait_for(Duration::from_secs(20), "the agent to serve", || {
            let e = match status(&admin) {
                Ok(_) => return Ok(Some(true)),
                Err(e) => e,
            };
            if agent.exited() && agent.log().contains("cannot listen on") {
                return Ok(Some(false));
            }
            // Kept as the last error, which a timeout reports.
            Err(e)
        });
        r.with_context(|| format!("the agent's log:\n{}", agent.log()))
    }

    pub fn status(&self) -> Result<(i32, serde_json::Value)> {
        status(&self.admin)
    }

    /// The federator's view of one cluster.
    pub fn cluster_status(&self, name: &str) -> Result<serde_json::Value> {
        let (_, v) = self.status()?;
        v["clusters"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["cluster"] == name).cloned())
            .with_context(|| format!("cluster {name} not in the federator's status"))
    }
}

/// The variable that makes gRPC C-core (grpcio) read the SPIFFE bundle map of a file_watcher
/// certificate provider (gRFC A87); without it, C-core falls back to `ca_certificate_file`.
pub const GRPC_SPIFFE_ENV: (&str, &str) = ("GRPC_EXPERIMENTAL_XDS_MTLS_SPIFFE", "true");

/// Writes a gRPC xDS bootstrap for a proxyless client in namespace shop, us-east1-b, with a
/// file_watcher certificate provider reading `certs` (cert-chain.pem, key.pem) and the trust
/// files an agent keeps in `trust` (its `<state>/xds`): the SPIFFE bundle map under both field
/// names (C-core reads `spiffe_bundle_map_file`, A87 documents `spiffe_trust_bundle_map_file`)
/// and, for a client without SPIFFE support, the agent's own trust domain's roots only.
pub fn grpc_bootstrap(
    path: &Path,
    xds: &str,
    node_id: &str,
    certs: &Path,
    trust: &Path,
) -> Result<PathBuf> {
    let map = trust.join("spiffe-bundle-map.json");
    let b = serde_json::json!({
        "xds_servers": [{"server_uri": xds, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
        "node": {
            "id": node_id,
            "locality": {"region": "us-east1", "zone": "us-east1-b"},
            "metadata": {"NAMESPACE": "shop", "LABELS": {"app": "client"}}
        },
        "certificate_providers": {"default": {"plugin_name": "file_watcher", "config": {
            "certificate_file": certs.join("cert-chain.pem"),
            "private_key_file": certs.join("key.pem"),
            "ca_certificate_file": trust.join("trust-roots.pem"),
            "spiffe_bundle_map_file": map,
            "spiffe_trust_bundle_map_file": map,
            "refresh_interval": "1s"}}}
    });
    std::fs::write(path, serde_json::to_vec_pretty(&b)?)?;
    Ok(path.to_path_buf())
}

/// A grpcio echo server (`py/xds_echo.py server`) answering as `label` on `addrs`; with `tls`
/// (a directory with `cert-chain.pem` and `key.pem`, and a roots file) it takes mTLS clients
/// whose certificates chain to those roots only. Returns once it serves.
pub fn echo_server(
    name: &str,
    label: &str,
    addrs: &[String],
    tls: Option<(&Path, &Path)>,
    dir: &Path,
) -> Result<Proc> {
    let mut args = vec![
        py_script("xds_echo.py").display().to_string(),
        "server".into(),
        "--name".into(),
        label.into(),
    ];
    for a in addrs {
        args.push("--addr".into());
        args.push(a.clone());
    }
    if let Some((certs, roots)) = tls {
        args.extend([
            "--cert".into(),
            certs.join("cert-chain.pem").display().to_string(),
            "--key".into(),
            certs.join("key.pem").display().to_string(),
            "--roots".into(),
            roots.display().to_string(),
        ]);
    }
    let p = Proc::spawn_program(name, &python()?, &args, &[], dir)?;
    wait_for(Duration::from_secs(30), &format!("server {name}"), || {
        Ok(p.log().contains("serving").then_some(()))
    })
    .with_context(|| p.log())?;
    Ok(p)
}

/// A registry YAML with `n` exported services named `<prefix>-<i>` in namespace `shop`.
pub fn registry_yaml(prefix: &str, n: usize, port: u16, extra: &str) -> String {
    let mut s = String::from("services:\n");
    for i in 0..n {
        s.push_str(&format!(
            "  - {{namespace: shop, name: {prefix}-{i}, ports: [{{name: http, port: {port}}}], export: true, endpoints: [{{address: 10.0.{}.{}}}]}}\n",
            i / 250,
            i % 250 + 1
        ));
    }
    s.push_str(extra);
    s
}
