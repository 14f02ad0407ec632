//! Network namespaces for running a whole multi-network federation on one machine.
//!
//! A [`Topology`] is a router namespace plus one namespace per network, each joined to the
//! router by a veth pair (`10.<net>.<i>.2/24` inside, `.1` on the router, default route via the
//! router, IPv4 forwarding on in the router), and a veth from the host to the router so the
//! host's shell can reach every network (`curl`, `meshfed status`). Links can be cut and
//! restored (a partition) and given latency and loss with `tc netem`.
//!
//! Code runs "in" a namespace on a [`NsRuntime`]: a tokio runtime whose threads entered the
//! namespace with setns(2) before the runtime was built, so every socket its tasks create
//! (listeners, outgoing connections) belongs to that network. A namespace outlives nothing:
//! dropping the topology (normal end, error, Ctrl-C or SIGTERM) deletes the namespaces, and
//! with them their veth links and routes.

use std::process::Command;

use anyhow::{bail, Context};

/// Why namespaces cannot be used here, if they cannot (not root, no `ip`).
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not running as root".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`ip netns list` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run `ip` (iproute2): {e}")),
    }
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !o.status.success() {
        bail!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut v = vec!["ip", "netns", "exec", ns];
    v.extend_from_slice(args);
    sh(&v)
}

/// `program args...` as run inside namespace `ns` (`ip netns exec <ns> program args...`), or
/// as is when `ns` is `None`: the (program, arguments) to hand to a process spawner.
pub fn command_in(
    ns: Option<&str>,
    program: &std::path::Path,
    args: &[String],
) -> (std::path::PathBuf, Vec<String>) {
    match ns {
        None => (program.to_path_buf(), args.to_vec()),
        Some(ns) => {
            let mut v = vec![
                "netns".to_string(),
                "exec".into(),
                ns.to_string(),
                program.display().to_string(),
            ];
            v.extend(args.iter().cloned());
            ("ip".into(), v)
        }
    }
}

/// One network of a topology.
#[derive(Debug, Clone)]
pub struct Network {
    pub name: String,
    /// The namespace's name (`ip netns exec <ns> ...`).
    pub ns: String,
    /// The namespace's address; the router is `.1` of the same /24.
    pub addr: String,
    /// The router's end of this network's veth pair.
    router_if: String,
}

/// A router namespace and the networks attached to it. Deleted on drop.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    octet: u8,
    router: String,
    host_if: String,
    networks: Vec<Network>,
}

impl Topology {
    /// Creates the router namespace `<prefix>-router` and its link to the host
    /// (10.`octet`.255.1 on the host, .2 on the router; route to 10.`octet`.0.0/16 via it).
    /// `prefix` should be unique per run (it names namespaces and interfaces).
    pub fn new(prefix: &str, octet: u8) -> anyhow::Result<Topology> {
        // Interface names (at most 15 bytes) are the prefix plus up to 4 characters.
        if prefix.len() > 10 {
            bail!("namespace prefix {prefix:?} is longer than 10 characters (interface names)");
        }
        let router = format!("{prefix}-router");
        let host_if = format!("{prefix}h");
        let _ = sh(&["ip", "netns", "del", &router]);
        let _ = sh(&["ip", "link", "del", &host_if]);
        sh(&["ip", "netns", "add", &router])?;
        let mut t = Topology {
            prefix: prefix.into(),
            octet,
            router: router.clone(),
            host_if: host_if.clone(),
            networks: Vec::new(),
        };
        let peer = format!("{prefix}hr");
        sh(&[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", &peer,
        ])?;
        sh(&["ip", "link", "set", &peer, "netns", &router])?;
        sh(&[
            "ip",
            "addr",
            "add",
            &format!("10.{octet}.255.1/24"),
            "dev",
            &host_if,
        ])?;
        sh(&["ip", "link", "set", &host_if, "up"])?;
        sh(&[
            "ip",
            "route",
            // replace: a run killed with SIGKILL may have left its route behind.
            "replace",
            &format!("10.{octet}.0.0/16"),
            "via",
            &format!("10.{octet}.255.2"),
        ])?;
        in_ns(
            &router,
            &[
                "ip",
                "addr",
                "add",
                &format!("10.{octet}.255.2/24"),
                "dev",
                &peer,
            ],
        )?;
        in_ns(&router, &["ip", "link", "set", &peer, "up"])?;
        in_ns(&router, &["ip", "link", "set", "lo", "up"])?;
        in_ns(
            &router,
            &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
        )?;
        t.router = router;
        Ok(t)
    }

    /// Adds network number `index` (1..=250) named `name`: namespace `<prefix>-<name>` at
    /// 10.`octet`.`index`.2.
    pub fn add(&mut self, name: &str, index: u8) -> anyhow::Result<Network> {
        if !(1..=250).contains(&index) {
            bail!("network index {index} is outside 1..=250");
        }
        let ns = format!("{}-{name}", self.prefix);
        let router_if = format!("{}r{index}", self.prefix);
        let inner_if = format!("{}n{index}", self.prefix);
        let o = self.octet;
        let _ = sh(&["ip", "netns", "del", &ns]);
        sh(&["ip", "netns", "add", &ns])?;
        let net = Network {
            name: name.into(),
            ns: ns.clone(),
            addr: format!("10.{o}.{index}.2"),
            router_if: router_if.clone(),
        };
        self.networks.push(net.clone());
        in_ns(
            &self.router,
            &[
                "ip", "link", "add", &router_if, "type", "veth", "peer", "name", &inner_if,
            ],
        )?;
        in_ns(
            &self.router,
            &["ip", "link", "set", &inner_if, "netns", &ns],
        )?;
        in_ns(
            &self.router,
            &[
                "ip",
                "addr",
                "add",
                &format!("10.{o}.{index}.1/24"),
                "dev",
                &router_if,
            ],
        )?;
        in_ns(&self.router, &["ip", "link", "set", &router_if, "up"])?;
        in_ns(
            &ns,
            &[
                "ip",
                "addr",
                "add",
                &format!("10.{o}.{index}.2/24"),
                "dev",
                &inner_if,
            ],
        )?;
        in_ns(&ns, &["ip", "link", "set", &inner_if, "up"])?;
        in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
        in_ns(
            &ns,
            &[
                "ip",
                "route",
                "add",
                "default",
                "via",
                &format!("10.{o}.{index}.1"),
            ],
        )?;
        Ok(net)
    }

    pub fn networks(&self) -> &[Network] {
        &self.networks
    }

    pub fn router(&self) -> &str {
        &self.router
    }

    /// Cuts (`false`) or restores (`true`) a network's link to the router: a partition.
    pub fn set_link(&self, net: &Network, up: bool) -> anyhow::Result<()> {
        in_ns(
            &self.router,
            &[
                "ip",
                "link",
                "set",
                &net.router_if,
                if up { "up" } else { "down" },
            ],
        )
    }

    /// Adds `delay` of latency and `loss_pct` % loss to traffic leaving the router towards
    /// `net` (`tc qdisc ... netem`). Errors when `tc` or the netem module is missing.
    pub fn netem(&self, net: &Network, delay: &str, loss_pct: f64) -> anyhow::Result<()> {
        in_ns(
            &self.router,
            &[
                "tc",
                "qdisc",
                "replace",
                "dev",
                &net.router_if,
                "root",
                "netem",
                "delay",
                delay,
                "loss",
                &format!("{loss_pct}%"),
            ],
        )
    }

    /// Removes the netem discipline set by [`Topology::netem`].
    pub fn clear_netem(&self, net: &Network) -> anyhow::Result<()> {
        in_ns(
            &self.router,
            &["tc", "qdisc", "del", "dev", &net.router_if, "root"],
        )
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for n in &self.networks {
            let _ = sh(&["ip", "netns", "del", &n.ns]);
        }
        let _ = sh(&["ip", "netns", "del", &self.router]);
        // Deleting the router deletes the host's veth peer and the route through it; this
        // covers a router that never got its end.
        let _ = sh(&["ip", "link", "del", &self.host_if]);
    }
}

/// Deletes namespaces left by runs of `prefix_stem<pid>` whose process is gone (a run
/// killed with SIGKILL cannot clean up after itself).
pub fn remove_stale(prefix_stem: &str) {
    let Ok(o) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&o.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(prefix_stem) else {
            continue;
        };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = sh(&["ip", "netns", "del", name]);
            if name.ends_with("-router") {
                let _ = sh(&["ip", "link", "del", &format!("{prefix_stem}{pid}h")]);
            }
        }
    }
}

/// A tokio runtime whose threads live in one network namespace. Shut down (in the
/// background, so it may be dropped from async code) on drop.
#[derive(Debug)]
pub struct NsRuntime {
    ns: Option<String>,
    rt: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
}

impl NsRuntime {
    /// A runtime with `workers` threads in namespace `ns` (`/run/netns/<ns>`).
    pub fn new(ns: &str, workers: usize) -> anyhow::Result<NsRuntime> {
        let name = ns.to_string();
        let rt = std::thread::Builder::new()
            .name(format!("setns-{ns}"))
            .spawn(move || -> anyhow::Result<tokio::runtime::Runtime> {
                let path = format!("/run/netns/{name}");
                let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("entering network namespace {name}"))?;
                // Threads inherit the namespace of the thread that creates them: the workers
                // are created here, and the blocking pool's threads by the workers.
                Ok(tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(workers.max(1))
                    .thread_name(format!("ns-{name}"))
                    .enable_all()
                    .build()?)
            })?
            .join()
            .map_err(|_| anyhow::anyhow!("the thread entering {ns} panicked"))??;
        Ok(NsRuntime {
            ns: Some(ns.into()),
            handle: rt.handle().clone(),
            rt: Some(rt),
        })
    }

    /// The calling runtime, for code that runs where the caller is (loopback mode).
    pub fn current() -> NsRuntime {
        NsRuntime {
            ns: None,
            rt: None,
            handle: tokio::runtime::Handle::current(),
        }
    }

    /// The namespace, `None` for [`NsRuntime::current`].
    pub fn ns(&self) -> Option<&str> {
        self.ns.as_deref()
    }

    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Runs `f` on this runtime (in its namespace) and waits for its result.
    pub async fn run<F>(&self, f: F) -> anyhow::Result<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle
            .spawn(f)
            .await
            .map_err(|e| anyhow::anyhow!("task in {}: {e}", self.ns().unwrap_or("this process")))
    }

    /// Starts `f` on this runtime (in its namespace).
    pub fn spawn<F>(&self, f: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(f)
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root and `ip` only: a listener made on a namespace's runtime is reachable at the
    /// namespace's address from another namespace through the router, and not from
    /// the namespace itself on the host's loopback; a cut link stops it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn runtimes_live_in_their_namespaces() {
        if let Some(why) = unavailable() {
            println!("SKIP runtimes_live_in_their_namespaces: {why}");
            return;
        }
        let prefix = format!("mft{}", std::process::id() % 100_000);
        let mut t = Topology::new(&prefix, 216).unwrap();
        let a = t.add("a", 1).unwrap();
        let b = t.add("b", 2).unwrap();
        let ra = NsRuntime::new(&a.ns, 1).unwrap();
        let rb = NsRuntime::new(&b.ns, 1).unwrap();
        let addr = format!("{}:7000", a.addr);
        let l = ra
            .run({
                let addr = addr.clone();
                async move { tokio::net::TcpListener::bind(addr).await }
            })
            .await
            .unwrap()
            .unwrap();
        // The host cannot bind a's address: it is not on the host.
        assert!(std::net::TcpListener::bind(&addr).is_err());
        let (tx, mut peers) = tokio::sync::mpsc::unbounded_channel();
        ra.spawn(async move {
            while let Ok((_, p)) = l.accept().await {
                let _ = tx.send(p.ip().to_string());
            }
        });
        let from = rb
            .run({
                let addr = addr.clone();
                async move {
                    tokio::net::TcpStream::connect(addr)
                        .await
                        .and_then(|s| s.local_addr())
                }
            })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(from.ip().to_string(), b.addr);
        assert_eq!(peers.recv().await.unwrap(), b.addr);
        // From the host, through the host's veth to the router.
        tokio::net::TcpStream::connect(&addr).await.unwrap();
        assert_eq!(peers.recv().await.unwrap(), "10.216.255.1");
        t.set_link(&a, false).unwrap();
        let cut = rb
            .run(async move {
                tokio::time::timeout(
                    std::time::Duration::from_millis(300),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
            })
            .await
            .unwrap();
        assert!(!matches!(cut, Ok(Ok(_))), "connected across a cut link");
        let names: Vec<String> = t.networks().iter().map(|n| n.ns.clone()).collect();
        drop((ra, rb));
        drop(t);
        let list = Command::new("ip").args(["netns", "list"]).output().unwrap();
        let list = String::from_utf8_lossy(&list.stdout);
        for n in names {
            assert!(!list.contains(&n), "{n} left behind");
        }
    }
}
