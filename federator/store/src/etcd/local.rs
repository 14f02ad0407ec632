//! A local etcd for the demo, the tests and the benchmark: Debian's `etcd` (package
//! etcd-server; `MESHFED_ETCD` names another binary), one or several members on loopback, each
//! in a temporary directory, ready when its log says it serves clients. Members are killed
//! when dropped. Not for production: there, etcd is run as the deploy manifests describe.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::EtcdConfig;

/// Flags every local etcd runs with: meshfed's whole-delta transactions need more operations
/// and bytes per request than etcd's defaults (docs/federation-protocol.md).
pub const LIMIT_FLAGS: [&str; 4] = ["--max-txn-ops", "40000", "--max-request-bytes", "33554432"];

/// One member.
#[derive(Debug)]
pub struct Member {
    pub name: String,
    pub client_url: String,
    pub peer_url: String,
    child: Option<Child>,
    args: Vec<String>,
}

/// An etcd cluster of one or more members.
#[derive(Debug)]
pub struct LocalEtcd {
    pub members: Vec<Member>,
    dir: tempfile::TempDir,
    /// With mTLS: the CA, and a client certificate it signed.
    pub tls: Option<super::EtcdTls>,
    /// A command the members run under (`ip netns exec NS`), or none.
    prefix: Vec<String>,
}

/// Runs openssl (the certificates of an mTLS etcd are made by it).
fn openssl(dir: &std::path::Path, args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// A P-256 key and a certificate for `cn` signed by `ca` (`ca.pem`, `ca.key` in `dir`), with
/// `ext` (subjectAltName, extendedKeyUsage).
fn issue(dir: &std::path::Path, name: &str, cn: &str, ext: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(format!("{name}.ext")), ext)?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            &format!("{name}.pem"),
            "-extfile",
            &format!("{name}.ext"),
        ],
    )
}

/// `n` distinct free ports: every listener is held until all are chosen (one after another,
/// the kernel may hand out the port just released, and a member got the same port for its
/// client and peer URLs). Chosen on this process's loopback, also for members that run in a
/// network namespace (the demo's), whose address does not exist here.
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let held = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// How many times a cluster is started afresh, on new ports, when a member found its port
/// taken (another test or process bound it between choosing and etcd's bind).
const PORT_ATTEMPTS: usize = 3;

/// Whether the etcd binary runs here.
pub fn installed() -> bool {
    Command::new(binary())
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The etcd binary: `MESHFED_ETCD`, or `etcd` on the PATH.
pub fn binary() -> String {
    std::env::var("MESHFED_ETCD").unwrap_or_else(|_| "etcd".into())
}

impl LocalEtcd {
    /// One member.
    pub fn start() -> std::io::Result<Self> {
        Self::cluster(1)
    }

    /// `n` members forming one cluster.
    pub fn cluster(n: usize) -> std::io::Result<Self> {
        Self::with_flags(n, &LIMIT_FLAGS)
    }

    /// `n` members with these limit flags (none: etcd's defaults).
    pub fn with_flags(n: usize, limits: &[&str]) -> std::io::Result<Self> {
        Self::build(n, limits, "127.0.0.1", Vec::new())
    }

    /// One member listening on `host`, run under `prefix` (e.g. `ip netns exec NS`: the
    /// demo's federator network).
    pub fn start_at(host: &str, prefix: Vec<String>) -> std::io::Result<Self> {
        Self::build(1, &LIMIT_FLAGS, host, prefix)
    }

    fn build(n: usize, limits: &[&str], host: &str, prefix: Vec<String>) -> std::io::Result<Self> {
        let flags: Vec<String> = limits.iter().map(|s| s.to_string()).collect();
        Self::build_in(tempfile::tempdir()?, n, &flags, host, prefix, None)
    }

    /// `n` members in `dir` with `flags` added; with `tls` their client URLs are https.
    fn build_in(
        dir: tempfile::TempDir,
        n: usize,
        flags: &[String],
        host: &str,
        prefix: Vec<String>,
        tls: Option<super::EtcdTls>,
    ) -> std::io::Result<Self> {
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut t = LocalEtcd {
            members: Vec::new(),
            dir,
            tls,
            prefix,
        };
        for attempt in 1..=PORT_ATTEMPTS {
            for i in 0..t.members.len() {
                t.kill(i);
            }
            let ports = free_ports(2 * n)?;
            let mut members: Vec<Member> = (0..n)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client_url: format!("{scheme}://{host}:{}", ports[2 * i]),
                    peer_url: format!("http://{host}:{}", ports[2 * i + 1]),
                    child: None,
                    args: Vec::new(),
                })
                .collect();
            let initial = members
                .iter()
                .map(|m| format!("{}={}", m.name, m.peer_url))
                .collect::<Vec<_>>()
                .join(",");
            for m in &mut members {
                // A data directory per attempt: a failed attempt's members may have written.
                let data = t.dir.path().join(format!("{}-{attempt}", m.name));
                m.args = [
                    "--name",
                    &m.name,
                    "--data-dir",
                    &data.to_string_lossy(),
                    "--listen-client-urls",
                    &m.client_url,
                    "--advertise-client-urls",
                    &m.client_url,
                    "--listen-peer-urls",
                    &m.peer_url,
                    "--initial-advertise-peer-urls",
                    &m.peer_url,
                    "--initial-cluster",
                    &initial,
                    "--initial-cluster-state",
                    "new",
                    "--logger",
                    "zap",
                    "--log-outputs",
                    "stderr",
                ]
                .iter()
                .map(|s| s.to_string())
                .chain(flags.iter().cloned())
                .collect();
            }
            t.members = members;
            match t.start_all() {
                Ok(()) => return Ok(t),
                Err(e)
                    if attempt < PORT_ATTEMPTS
                        && e.to_string().contains("address already in use") =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("etcd: no free ports"))
    }

    /// Starts every member (members of a new cluster wait for each other: start all, then wait
    /// for each).
    fn start_all(&mut self) -> std::io::Result<()> {
        let mut ready = Vec::new();
        for i in 0..self.members.len() {
            ready.push(self.spawn(i)?);
        }
        for r in ready {
            r.recv_timeout(Duration::from_secs(60))
                .map_err(|_| std::io::Error::other("etcd did not become ready within 60 s"))??;
        }
        Ok(())
    }

    /// Starts member `i` with its arguments; the receiver says when it serves clients.
    fn spawn(
        &mut self,
        i: usize,
    ) -> std::io::Result<std::sync::mpsc::Receiver<std::io::Result<()>>> {
        let m = &mut self.members[i];
        let mut cmd = match self.prefix.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        let mut child = cmd
            .args(&m.args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                std::io::Error::other(format!(
                    "cannot run {} (install Debian's etcd-server, or set MESHFED_ETCD): {e}",
                    binary()
                ))
            })?;
        let stderr = child.stderr.take();
        m.child = Some(child);
        let (tx, rx) = std::sync::mpsc::channel();
        let name = m.name.clone();
        std::thread::spawn(move || {
            let mut said = false;
            let mut tail = Vec::new();
            if let Some(s) = stderr {
                for line in BufReader::new(s).lines().map_while(Result::ok) {
                    // 3.4 says "serving client traffic", after the member is published
                    // through raft (so a cluster has quorum); 3.5 also "ready to serve...".
                    if !said
                        && (line.contains("serving client traffic")
                            || line.contains("ready to serve client requests"))
                    {
                        said = true;
                        let _ = tx.send(Ok(()));
                    }
                    if !said {
                        tail.push(line);
                    }
                }
            }
            if !said {
                let _ = tx.send(Err(std::io::Error::other(format!(
                    "etcd member {name} exited before serving: {}",
                    tail.join("\n")
                ))));
            }
        });
        Ok(rx)
    }

    /// One member that serves clients over TLS and requires a client certificate signed by
    /// its CA (etcd's `--client-cert-auth`); [`tls`](Self::tls) holds the CA and a client's
    /// certificate and key.
    pub fn start_mtls() -> std::io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let certs = dir.path().join("certs");
        std::fs::create_dir_all(&certs)?;
        openssl(
            &certs,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-subj",
                "/CN=test etcd CA",
                "-days",
                "2",
            ],
        )?;
        issue(
            &certs,
            "server",
            "etcd",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )?;
        issue(&certs, "client", "meshfed", "extendedKeyUsage=clientAuth\n")?;
        let p = |f: &str| certs.join(f).to_string_lossy().into_owned();
        let mut flags: Vec<String> = [
            "--cert-file",
            &p("server.pem"),
            "--key-file",
            &p("server.key"),
            "--trusted-ca-file",
            &p("ca.pem"),
            "--client-cert-auth",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        flags.extend(LIMIT_FLAGS.iter().map(|s| s.to_string()));
        let tls = super::EtcdTls {
            ca: certs.join("ca.pem"),
            cert: certs.join("client.pem"),
            key: certs.join("client.key"),
        };
        Self::build_in(dir, 1, &flags, "127.0.0.1", Vec::new(), Some(tls))
    }

    /// `etcdctl endpoint status` of the first member (Debian's etcd-client): its revision
    /// (`[0].Status.header.revision`), database size (`[0].Status.dbSize`) and more.
    pub fn status(&self) -> std::io::Result<serde_json::Value> {
        let out = Command::new("etcdctl")
            .args(["--endpoints", &self.members[0].client_url])
            .args(["endpoint", "status", "-w", "json"])
            .env("ETCDCTL_API", "3")
            .output()?;
        serde_json::from_slice(&out.stdout).map_err(std::io::Error::other)
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// A store configuration for this cluster under `prefix`.
    pub fn config(&self, prefix: &str) -> EtcdConfig {
        EtcdConfig {
            prefix: prefix.to_string(),
            tls: self.tls.clone(),
            ..EtcdConfig::new(self.endpoints())
        }
    }

    /// Kills member `i` (SIGKILL) and waits for it to exit.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts a killed member again (its data directory kept) and waits until it serves.
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        self.kill(i);
        let args = &mut self.members[i].args;
        if let Some(p) = args.iter().position(|a| a == "--initial-cluster-state") {
            args[p + 1] = "existing".into();
        }
        self.spawn(i)?
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| std::io::Error::other("etcd did not become ready within 60 s"))?
    }

    /// The directory the members keep their data in.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// A TCP relay to a target that can be cut: a network partition between whoever dials
/// `addr` and the target (connections open at the cut are reset; new ones are refused).
#[derive(Debug)]
pub struct Cuttable {
    pub addr: String,
    state: std::sync::Arc<(
        std::sync::atomic::AtomicBool,
        std::sync::Mutex<Vec<std::net::TcpStream>>,
    )>,
}

impl Cuttable {
    pub fn start(target: &str) -> std::io::Result<Cuttable> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let state: std::sync::Arc<(
            std::sync::atomic::AtomicBool,
            std::sync::Mutex<Vec<std::net::TcpStream>>,
        )> = Default::default();
        let (st, target) = (state.clone(), target.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if st.0.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let Ok(server) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                let mut open = st.1.lock().unwrap_or_else(|p| p.into_inner());
                for s in [&client, &server] {
                    if let Ok(c) = s.try_clone() {
                        open.push(c);
                    }
                }
                drop(open);
                for (mut from, mut to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ]
                .into_iter()
                .filter_map(|(a, b)| Some((a.ok()?, b.ok()?)))
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Ok(Cuttable { addr, state })
    }

    /// Resets every relayed connection and refuses new ones.
    pub fn cut(&self) {
        self.state
            .0
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for s in self
            .state
            .1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Relays again.
    pub fn heal(&self) {
        self.state
            .0
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
