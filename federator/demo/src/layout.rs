//! Where the demo runs: a network namespace per cluster, the VM and the federator behind a
//! router namespace (root with `ip`), or distinct loopback addresses on the host.

use std::collections::BTreeMap;

use anyhow::{bail, Context};

use super::{vm, CLUSTERS};
use meshfed_harness::netns::{NsRuntime, Topology};

/// Where the demo's networks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkMode {
    /// Network namespaces when running as root with `ip`, loopback otherwise.
    Auto,
    /// Network namespaces, or fail.
    Netns,
    /// Loopback addresses (127.0.x.1) in the host's network.
    Loopback,
}

/// One network: its address and the runtime whose sockets live there.
pub(super) struct Site {
    pub(super) addr: String,
    pub(super) rt: NsRuntime,
}

impl Site {
    /// The namespace processes of this site run in (`None`: the host's network).
    pub(super) fn ns(&self) -> Option<&str> {
        self.rt.ns()
    }
}

/// The demo's networks: the federator's, one per cluster, the VM's. The runtimes are
/// shut down before the topology (and its namespaces) goes: fields drop in order.
pub(super) struct Layout {
    pub(super) fed: Site,
    pub(super) clusters: BTreeMap<&'static str, Site>,
    pub(super) vm: Site,
    pub(super) description: String,
    topology: Option<Topology>,
}

const DEMO_NS_STEM: &str = "mfd";
const DEMO_OCTET: u8 = 215;

impl Layout {
    fn loopback(why: Option<String>) -> anyhow::Result<Layout> {
        for c in &CLUSTERS {
            std::net::TcpListener::bind((c.loopback, 0)).with_context(|| {
                format!(
                    "cannot bind {} (loopback mode needs the 127.0.0.0/8 range)",
                    c.loopback
                )
            })?;
        }
        let site = |a: &str| Site {
            addr: a.into(),
            rt: NsRuntime::current(),
        };
        Ok(Layout {
            fed: site("127.0.0.1"),
            clusters: CLUSTERS
                .iter()
                .map(|c| (c.name, site(c.loopback)))
                .collect(),
            vm: site(vm::LOOPBACK_ADDR),
            description: format!(
                "loopback: one network, each cluster's workloads on their own 127.0.x.1 address{}",
                why.map(|w| format!(" (no network namespaces: {w})"))
                    .unwrap_or_default()
            ),
            topology: None,
        })
    }

    fn namespaces() -> anyhow::Result<Layout> {
        meshfed_harness::netns::remove_stale(DEMO_NS_STEM);
        // The whole pid (at most 7 digits on Linux): the next run's `remove_stale` checks it.
        let prefix = format!("{DEMO_NS_STEM}{}", std::process::id());
        let mut t = Topology::new(&prefix, DEMO_OCTET)?;
        let mut site = |name: &str, index: u8| -> anyhow::Result<Site> {
            let n = t.add(name, index)?;
            Ok(Site {
                rt: NsRuntime::new(&n.ns, 1)?,
                addr: n.addr,
            })
        };
        let mut clusters = BTreeMap::new();
        for c in &CLUSTERS {
            clusters.insert(c.name, site(c.name, c.index)?);
        }
        let vm = site("vm", 4)?;
        let fed = site("fed", 5)?;
        let description = format!(
            "network namespaces: {} joined through router namespace {} (veth pairs; the host reaches them via 10.{DEMO_OCTET}.255.2)",
            t.networks()
                .iter()
                .map(|n| format!("{} {} ({})", n.name, n.addr, n.ns))
                .collect::<Vec<_>>()
                .join(", "),
            t.router()
        );
        Ok(Layout {
            fed,
            clusters,
            vm,
            description,
            topology: Some(t),
        })
    }

    pub(super) fn new(mode: NetworkMode) -> anyhow::Result<Layout> {
        match mode {
            NetworkMode::Loopback => Layout::loopback(None),
            NetworkMode::Netns => {
                if let Some(why) = meshfed_harness::netns::unavailable() {
                    bail!("--network netns: cannot make network namespaces here: {why}");
                }
                Layout::namespaces()
            }
            NetworkMode::Auto => match meshfed_harness::netns::unavailable() {
                Some(why) => Layout::loopback(Some(why)),
                None => match Layout::namespaces() {
                    Ok(l) => Ok(l),
                    Err(e) => Layout::loopback(Some(format!("{e:#}"))),
                },
            },
        }
    }

    pub(super) fn cluster(&self, name: &str) -> anyhow::Result<&Site> {
        self.clusters
            .get(name)
            .with_context(|| format!("no network for {name}"))
    }

    pub(super) fn addr(&self, name: &str) -> String {
        self.clusters
            .get(name)
            .map(|s| s.addr.clone())
            .unwrap_or_default()
    }

    pub(super) fn netns(&self) -> bool {
        self.topology.is_some()
    }
}
