//! Service VIPs: one IPv4 (and, when an IPv6 range is set, one IPv6) address per service, from
//! configurable ranges, stored in the agent's sled cache so a service keeps its addresses across
//! restarts. Addresses are never moved while the service exists; a range that runs out takes
//! back the addresses of services that no longer exist.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vip {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

#[derive(Debug)]
pub struct Vips {
    tree: sled::Tree,
    v4: Ipv4Net,
    v6: Option<Ipv6Net>,
    by_name: BTreeMap<String, Vip>,
    used: HashSet<IpAddr>,
    /// A range is exhausted (said once, until an address is allocated again).
    exhausted_v4: bool,
    exhausted_v6: bool,
}

/// Parses `--vip-range` values.
pub fn parse_v4(s: &str) -> Result<Ipv4Net, String> {
    let n: Ipv4Net = s
        .parse()
        .map_err(|e| format!("{s:?} is not an IPv4 CIDR range: {e}"))?;
    if n.prefix_len() > 30 {
        return Err(format!("{s}: a VIP range needs at least a /30"));
    }
    Ok(n.trunc())
}

pub fn parse_v6(s: &str) -> Result<Ipv6Net, String> {
    let n: Ipv6Net = s
        .parse()
        .map_err(|e| format!("{s:?} is not an IPv6 CIDR range: {e}"))?;
    if n.prefix_len() > 126 {
        return Err(format!("{s}: a VIP range needs at least a /126"));
    }
    Ok(n.trunc())
}

impl Vips {
    /// Opens the stored allocation. Stored addresses outside the configured ranges (the range
    /// was changed) are dropped and allocated anew.
    pub fn open(tree: sled::Tree, v4: Ipv4Net, v6: Option<Ipv6Net>) -> anyhow::Result<Self> {
        let mut me = Vips {
            tree,
            v4,
            v6,
            by_name: BTreeMap::new(),
            used: HashSet::new(),
            exhausted_v4: false,
            exhausted_v6: false,
        };
        for kv in me.tree.iter() {
            let (k, v) = kv?;
            let name = String::from_utf8_lossy(&k).into_owned();
            let Ok(mut vip) = serde_json::from_slice::<Vip>(&v) else {
                continue;
            };
            vip.v4 = vip.v4.filter(|a| me.v4.contains(a));
            vip.v6 = vip.v6.filter(|a| me.v6.is_some_and(|n| n.contains(a)));
            if let Some(a) = vip.v4 {
                me.used.insert(a.into());
            }
            if let Some(a) = vip.v6 {
                me.used.insert(a.into());
            }
            me.by_name.insert(name, vip);
        }
        Ok(me)
    }

    /// The service's VIPs, allocating (and storing) them on first use. `live` is the set of
    /// services that exist now (used to take addresses back when a range is exhausted).
    pub fn get(&mut self, key: &str, live: &BTreeSet<String>) -> Vip {
        let mut vip = self
            .by_name
            .get(key)
            .copied()
            .unwrap_or(Vip { v4: None, v6: None });
        let before = vip;
        if vip.v4.is_none() {
            vip.v4 = self.alloc_v4(live);
        }
        if vip.v6.is_none() && self.v6.is_some() {
            vip.v6 = self.alloc_v6(live);
        }
        if vip != before {
            self.by_name.insert(key.to_string(), vip);
            if let Ok(v) = serde_json::to_vec(&vip) {
                if let Err(e) = self.tree.insert(key.as_bytes(), v) {
                    tracing::warn!(error = %e, "cannot store a service VIP");
                }
            }
        }
        vip
    }

    /// Every assignment held, by service key (what a leader shares with its followers).
    pub fn all(&self) -> &BTreeMap<String, Vip> {
        &self.by_name
    }

    /// Makes this store hold exactly `assigned` (a follower takes its leader's addresses, so
    /// every replica answers a name with the same VIP); stored, so a follower that becomes the
    /// leader goes on from them. Addresses outside the configured ranges are dropped.
    pub fn adopt(&mut self, assigned: &BTreeMap<String, Vip>) {
        if &self.by_name == assigned {
            return;
        }
        for k in self.by_name.keys() {
            if !assigned.contains_key(k) {
                let _ = self.tree.remove(k.as_bytes());
            }
        }
        self.by_name.clear();
        self.used.clear();
        for (k, v) in assigned {
            let vip = Vip {
                v4: v.v4.filter(|a| self.v4.contains(a)),
                v6: v.v6.filter(|a| self.v6.is_some_and(|n| n.contains(a))),
            };
            if let Some(a) = vip.v4 {
                self.used.insert(a.into());
            }
            if let Some(a) = vip.v6 {
                self.used.insert(a.into());
            }
            if let Ok(v) = serde_json::to_vec(&vip) {
                if let Err(e) = self.tree.insert(k.as_bytes(), v) {
                    tracing::warn!(error = %e, "cannot store a service VIP");
                }
            }
            self.by_name.insert(k.clone(), vip);
        }
    }

    /// The service's VIPs if it has them (a follower never allocates).
    pub fn assigned(&self, key: &str) -> Vip {
        self.by_name
            .get(key)
            .copied()
            .unwrap_or(Vip { v4: None, v6: None })
    }

    /// Makes the allocations made so far durable.
    pub fn flush(&self) {
        if let Err(e) = self.tree.flush() {
            tracing::warn!(error = %e, "cannot flush the service VIPs");
        }
    }

    fn alloc_v4(&mut self, live: &BTreeSet<String>) -> Option<Ipv4Addr> {
        for _round in 0..2 {
            // Skip the network and broadcast addresses.
            let found = self
                .v4
                .hosts()
                .find(|a| !self.used.contains(&IpAddr::V4(*a)));
            if let Some(a) = found {
                self.used.insert(a.into());
                self.exhausted_v4 = false;
                return Some(a);
            }
            self.reclaim(live);
        }
        if !std::mem::replace(&mut self.exhausted_v4, true) {
            tracing::warn!(range = %self.v4, "the IPv4 VIP range is exhausted; services without an address get none until one is freed");
        }
        None
    }

    fn alloc_v6(&mut self, live: &BTreeSet<String>) -> Option<Ipv6Addr> {
        let net = self.v6?;
        for _round in 0..2 {
            // Bounded walk: a /48 has more addresses than services will ever exist.
            let found = net
                .hosts()
                .skip(1)
                .take(self.used.len() + 2)
                .find(|a| !self.used.contains(&IpAddr::V6(*a)));
            if let Some(a) = found {
                self.used.insert(a.into());
                self.exhausted_v6 = false;
                return Some(a);
            }
            self.reclaim(live);
        }
        if !std::mem::replace(&mut self.exhausted_v6, true) {
            tracing::warn!(range = %net, "the IPv6 VIP range is exhausted; services without an address get none until one is freed");
        }
        None
    }

    /// Frees the addresses of services that no longer exist.
    fn reclaim(&mut self, live: &BTreeSet<String>) {
        let dead: Vec<String> = self
            .by_name
            .keys()
            .filter(|k| !live.contains(*k))
            .cloned()
            .collect();
        for k in dead {
            if let Some(v) = self.by_name.remove(&k) {
                if let Some(a) = v.v4 {
                    self.used.remove(&IpAddr::V4(a));
                }
                if let Some(a) = v.v6 {
                    self.used.remove(&IpAddr::V6(a));
                }
            }
            let _ = self.tree.remove(k.as_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Exhaustion is said once (not once per service on every rebuild), and forgotten once an
    /// address is allocated again.
    #[test]
    fn exhaustion_is_reported_once_until_an_address_is_free_again() {
        let d = tempfile::tempdir().unwrap();
        let db = sled::open(d.path()).unwrap();
        let mut v = Vips::open(
            db.open_tree("v").unwrap(),
            parse_v4("10.0.0.0/30").unwrap(),
            None,
        )
        .unwrap();
        let live: BTreeSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert!(v.get("a", &live).v4.is_some());
        assert!(v.get("b", &live).v4.is_some());
        assert!(!v.exhausted_v4);
        assert!(v.get("c", &live).v4.is_none());
        assert!(v.exhausted_v4);
        assert!(v.get("c", &live).v4.is_none());
        // b is gone: its address goes to c, and the range is no longer exhausted.
        let live: BTreeSet<String> = ["a", "c"].iter().map(|s| s.to_string()).collect();
        assert!(v.get("c", &live).v4.is_some());
        assert!(!v.exhausted_v4);
    }

    #[test]
    fn a_follower_adopts_its_leaders_assignments_and_goes_on_from_them() {
        let d = tempfile::tempdir().unwrap();
        let db = sled::open(d.path()).unwrap();
        let v4 = parse_v4("240.240.0.0/24").unwrap();
        let live: BTreeSet<String> = ["shop/a", "shop/b", "shop/c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // The leader's history: a, b, c allocated, then a removed and reclaimed elsewhere.
        let leader: BTreeMap<String, Vip> = [
            ("shop/b", Ipv4Addr::new(240, 240, 0, 2)),
            ("shop/c", Ipv4Addr::new(240, 240, 0, 3)),
        ]
        .into_iter()
        .map(|(k, a)| {
            (
                k.to_string(),
                Vip {
                    v4: Some(a),
                    v6: None,
                },
            )
        })
        .collect();
        let mut f = Vips::open(db.open_tree("f").unwrap(), v4, None).unwrap();
        // A fresh replica would allocate first-fit: b would be .1.
        f.adopt(&leader);
        assert_eq!(f.assigned("shop/b"), leader["shop/b"]);
        assert_eq!(
            f.assigned("shop/a").v4,
            None,
            "a follower does not allocate"
        );
        assert_eq!(f.all(), &leader);
        // Become the leader (a restart keeps them): a new service gets a free address.
        drop(f);
        let mut f = Vips::open(db.open_tree("f").unwrap(), v4, None).unwrap();
        assert_eq!(f.get("shop/c", &live), leader["shop/c"]);
        assert_eq!(
            f.get("shop/a", &live).v4,
            Some(Ipv4Addr::new(240, 240, 0, 1))
        );
        // Adopting a smaller set forgets the rest.
        f.adopt(&BTreeMap::new());
        assert!(f.all().is_empty());
    }

    #[test]
    fn stable_across_restarts_and_reclaimed_when_exhausted() {
        let d = tempfile::tempdir().unwrap();
        let db = sled::open(d.path()).unwrap();
        let v4 = parse_v4("240.240.0.0/30").unwrap();
        let v6 = Some(parse_v6("2001:2::/48").unwrap());
        let live: BTreeSet<String> = ["shop/a", "shop/b"].iter().map(|s| s.to_string()).collect();
        let mut v = Vips::open(db.open_tree("vips").unwrap(), v4, v6).unwrap();
        let a = v.get("shop/a", &live);
        let b = v.get("shop/b", &live);
        assert_eq!(a.v4, Some(Ipv4Addr::new(240, 240, 0, 1)));
        assert_eq!(b.v4, Some(Ipv4Addr::new(240, 240, 0, 2)));
        assert_ne!(a.v6, b.v6);
        assert_eq!(v.get("shop/a", &live), a, "stable");
        v.flush();
        drop(v);
        let mut v = Vips::open(db.open_tree("vips").unwrap(), v4, v6).unwrap();
        assert_eq!(v.get("shop/b", &live), b, "kept across a restart");
        // The /30 has two host addresses: a third service takes back a dead one's.
        let live: BTreeSet<String> = ["shop/b", "shop/c"].iter().map(|s| s.to_string()).collect();
        let c = v.get("shop/c", &live);
        assert_eq!(c.v4, a.v4);
        assert_eq!(v.get("shop/b", &live), b);
        // A changed range re-allocates.
        drop(v);
        let other = parse_v4("10.96.0.0/24").unwrap();
        let mut v = Vips::open(db.open_tree("vips").unwrap(), other, None).unwrap();
        assert!(other.contains(&v.get("shop/b", &live).v4.unwrap()));
        assert!(parse_v4("nope").is_err());
        assert!(parse_v4("10.0.0.0/31").is_err());
    }
}
