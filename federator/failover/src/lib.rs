//! The per-locality priority table a proxy gets for one service: Istio's locality load
//! balancing semantics (`loadbalancer.go`: applyLocalityWeights, applyFailoverPriorities,
//! applyLocalityFailover), then meshfed's staleness ranking and split horizon. The result maps
//! one to one onto an EDS ClusterLoadAssignment and is what `meshfed policy check` prints.
//! Deliberate differences from Istio are listed in docs/failover.md.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use meshfed_model::policy::Policy;

pub const LABEL_REGION: &str = "topology.kubernetes.io/region";
pub const LABEL_ZONE: &str = "topology.kubernetes.io/zone";
pub const LABEL_SUBZONE: &str = "topology.istio.io/subzone";
pub const LABEL_CLUSTER: &str = "topology.istio.io/cluster";
pub const LABEL_NETWORK: &str = "topology.istio.io/network";

#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Loc {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

impl Loc {
    pub fn new(region: &str, zone: &str, subzone: &str) -> Loc {
        Loc {
            region: region.into(),
            zone: zone.into(),
            subzone: subzone.into(),
        }
    }

    /// `region/zone/subzone`, trailing parts optional.
    pub fn parse(s: &str) -> Result<Loc, String> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.len() > 3 || parts.iter().any(|p| p.is_empty() || p.contains('*')) {
            return Err(format!(
                "{s:?} is not a locality (region[/zone[/subzone]], no empty parts, no '*')"
            ));
        }
        Ok(Loc::new(
            parts[0],
            parts.get(1).copied().unwrap_or(""),
            parts.get(2).copied().unwrap_or(""),
        ))
    }

    /// Istio's `LocalityMatch`: pattern parts equal, `*`, or absent (zone and subzone).
    pub fn matches(&self, pattern: &str) -> bool {
        let mut it = pattern.splitn(3, '/');
        let r = it.next().unwrap_or("");
        let z = it.next().unwrap_or("");
        let s = it.next().unwrap_or("");
        (r == "*" || r == self.region)
            && (z.is_empty() || z == "*" || z == self.zone)
            && (s.is_empty() || s == "*" || s == self.subzone)
    }
}

impl std::fmt::Display for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = self.region.clone();
        if !self.zone.is_empty() || !self.subzone.is_empty() {
            s.push('/');
            s.push_str(&self.zone);
        }
        if !self.subzone.is_empty() {
            s.push('/');
            s.push_str(&self.subzone);
        }
        f.write_str(&s)
    }
}

/// One endpoint of the service as the table sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndpointIn {
    /// `ip:port`.
    pub address: String,
    pub locality: Loc,
    pub labels: BTreeMap<String, String>,
    pub weight: u32,
    pub cluster: String,
    pub network: String,
    pub healthy: bool,
    /// Its cluster's lease expired (ranked after every fresh endpoint).
    pub stale: bool,
}

/// The asking proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ProxyIn {
    pub locality: Loc,
    pub labels: BTreeMap<String, String>,
    pub cluster: String,
    /// The proxy's network; `None` turns split horizon off.
    pub network: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointOut {
    pub address: String,
    pub weight: u32,
    pub healthy: bool,
    /// Set when this address is an east-west gateway standing in for endpoints of that network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_for: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub priority: u32,
    pub locality: Loc,
    pub weight: u32,
    pub endpoints: Vec<EndpointOut>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    pub rows: Vec<Row>,
    /// Why endpoints are missing (no gateway for their network, emptied by distribute).
    pub notes: Vec<String>,
}

impl Table {
    /// Each row's share of traffic when every endpoint is healthy: all of it goes to
    /// priority 0, split by locality weight.
    pub fn healthy_shares(&self) -> Vec<f64> {
        let p0: u64 = self
            .rows
            .iter()
            .filter(|r| r.priority == 0)
            .map(|r| u64::from(r.weight))
            .sum();
        self.rows
            .iter()
            .map(|r| {
                if r.priority == 0 && p0 > 0 {
                    f64::from(r.weight) / p0 as f64
                } else {
                    0.0
                }
            })
            .collect()
    }
}

/// Istio's `AugmentLabels`: topology labels from locality and cluster (overriding), network
/// (only when absent).
pub fn augment(
    labels: &BTreeMap<String, String>,
    loc: &Loc,
    cluster: &str,
    network: &str,
) -> BTreeMap<String, String> {
    let mut out = labels.clone();
    for (k, v) in [
        (LABEL_REGION, &loc.region),
        (LABEL_ZONE, &loc.zone),
        (LABEL_SUBZONE, &loc.subzone),
    ] {
        if !v.is_empty() {
            out.insert(k.into(), v.clone());
        }
    }
    if !cluster.is_empty() {
        out.insert(LABEL_CLUSTER.into(), cluster.into());
    }
    if !network.is_empty() && !out.contains_key(LABEL_NETWORK) {
        out.insert(LABEL_NETWORK.into(), network.into());
    }
    out
}

/// Istio's `LbPriority`: 0 same subzone, 1 same zone, 2 same region, 3 elsewhere.
fn lb_priority(proxy: &Loc, ep: &Loc) -> u64 {
    if proxy.region != ep.region {
        3
    } else if proxy.zone != ep.zone {
        2
    } else if proxy.subzone != ep.subzone {
        1
    } else {
        0
    }
}

#[derive(Debug, Clone)]
struct Group {
    loc: Loc,
    prio: u64,
    weight: u32,
    /// Set by distribute; otherwise the weight is the sum of the endpoints' weights.
    fixed_weight: bool,
    eps: Vec<usize>,
}

fn sum_weights(eps: &[EndpointIn], idx: &[usize]) -> u32 {
    idx.iter()
        .fold(0u32, |a, i| a.saturating_add(eps[*i].weight.max(1)))
}

/// Renumbers priorities to 0..K in order, keeping ties together.
fn renumber(groups: &mut [Group]) {
    let keys: BTreeSet<u64> = groups.iter().map(|g| g.prio).collect();
    let index: HashMap<u64, u64> = keys
        .into_iter()
        .enumerate()
        .map(|(i, k)| (k, i as u64))
        .collect();
    for g in groups {
        g.prio = index[&g.prio];
    }
}

/// Computes the table for `proxy`. `gateways` maps a network to its east-west gateway
/// addresses (`ip:port`).
pub fn compute(
    policy: Option<&Policy>,
    proxy: &ProxyIn,
    eps: &[EndpointIn],
    gateways: &BTreeMap<String, Vec<String>>,
) -> Table {
    let mut notes = Vec::new();
    let mut by_loc: BTreeMap<&Loc, Vec<usize>> = BTreeMap::new();
    for (i, e) in eps.iter().enumerate() {
        by_loc.entry(&e.locality).or_default().push(i);
    }
    let mut groups: Vec<Group> = by_loc
        .into_iter()
        .map(|(loc, idx)| Group {
            loc: loc.clone(),
            prio: 0,
            weight: sum_weights(eps, &idx),
            fixed_weight: false,
            eps: idx,
        })
        .collect();

    if let Some(p) = policy.filter(|p| p.enabled) {
        if !p.distribute.is_empty() {
            distribute(p, proxy, &mut groups, &mut notes);
        } else if p.failover_enabled() {
            let proxy_labels = augment(
                &proxy.labels,
                &proxy.locality,
                &proxy.cluster,
                proxy.network.as_deref().unwrap_or(""),
            );
            if !p.failover_priority.is_empty() {
                groups = failover_priority(p, &proxy_labels, eps, groups);
                if !p.failover.is_empty() {
                    locality_failover(p, proxy, &mut groups);
                }
            } else {
                locality_failover(p, proxy, &mut groups);
            }
        }
    }

    // Stale endpoints go after every fresh one, keeping their relative order.
    let max = groups.iter().map(|g| g.prio).max().unwrap_or(0) + 1;
    let mut split = Vec::with_capacity(groups.len());
    for g in groups {
        let (fresh, stale): (Vec<usize>, Vec<usize>) = g.eps.iter().partition(|i| !eps[**i].stale);
        let any_stale = !stale.is_empty();
        if any_stale {
            split.push(Group {
                prio: g.prio + max,
                eps: stale,
                ..g.clone()
            });
        }
        if !fresh.is_empty() || !any_stale {
            split.push(Group { eps: fresh, ..g });
        }
    }
    let mut groups = split;
    groups.sort_by(|a, b| a.prio.cmp(&b.prio).then_with(|| a.loc.cmp(&b.loc)));

    // Split horizon, then one place per address: later occurrences add their weight to the first.
    let mut rows: Vec<(Group, Vec<EndpointOut>)> = Vec::new();
    let mut seen: HashMap<String, (usize, usize)> = HashMap::new();
    let mut no_gateway: BTreeSet<&str> = BTreeSet::new();
    for g in groups {
        let mut out: Vec<EndpointOut> = Vec::new();
        let row = rows.len();
        for &i in &g.eps {
            let e = &eps[i];
            let remote = match &proxy.network {
                Some(net) => !e.network.is_empty() && &e.network != net,
                None => false,
            };
            let candidates: Vec<EndpointOut> = if !remote {
                vec![EndpointOut {
                    address: e.address.clone(),
                    weight: e.weight.max(1),
                    healthy: e.healthy,
                    gateway_for: None,
                }]
            } else if !e.healthy {
                Vec::new()
            } else {
                match gateways.get(&e.network).filter(|g| !g.is_empty()) {
                    Some(gws) => gws
                        .iter()
                        .map(|gw| EndpointOut {
                            address: gw.clone(),
                            weight: e.weight.max(1),
                            healthy: true,
                            gateway_for: Some(e.network.clone()),
                        })
                        .collect(),
                    None => {
                        no_gateway.insert(&e.network);
                        Vec::new()
                    }
                }
            };
            for c in candidates {
                match seen.get(&c.address) {
                    Some(&(r, k)) if r < row => {
                        let t = &mut rows[r].1[k];
                        t.weight = t.weight.saturating_add(c.weight);
                    }
                    Some(&(_, k)) => {
                        out[k].weight = out[k].weight.saturating_add(c.weight);
                        out[k].healthy |= c.healthy;
                    }
                    None => {
                        seen.insert(c.address.clone(), (row, out.len()));
                        out.push(c);
                    }
                }
            }
        }
        rows.push((g, out));
    }
    for n in no_gateway {
        notes.push(format!(
            "endpoints on network {n} are left out: that network has no east-west gateway"
        ));
    }
    let mut kept: Vec<Group> = Vec::new();
    let mut outs: Vec<Vec<EndpointOut>> = Vec::new();
    for (g, out) in rows {
        if !out.is_empty() {
            kept.push(g);
            outs.push(out);
        }
    }
    renumber(&mut kept);
    let rows = kept
        .into_iter()
        .zip(outs)
        .map(|(g, out)| {
            let weight = if g.fixed_weight {
                g.weight
            } else {
                out.iter().fold(0u32, |a, e| a.saturating_add(e.weight))
            };
            Row {
                priority: g.prio as u32,
                locality: g.loc,
                weight: weight.max(1),
                endpoints: out,
            }
        })
        .collect();
    Table { rows, notes }
}

/// Istio's `applyLocalityWeights`: the first entry whose `from` matches the proxy applies;
/// a locality matched by a `to` pattern gets ceil(its weight * w / total weight of the
/// localities that pattern matched); localities no pattern matched are emptied.
fn distribute(p: &Policy, proxy: &ProxyIn, groups: &mut [Group], notes: &mut Vec<String>) {
    let Some(rule) = p
        .distribute
        .iter()
        .find(|d| proxy.locality.matches(&d.from))
    else {
        return;
    };
    let mut unmatched: BTreeSet<usize> = (0..groups.len()).collect();
    for (pattern, w) in &rule.to {
        let hit: Vec<usize> = unmatched
            .iter()
            .copied()
            .filter(|i| groups[*i].loc.matches(pattern))
            .collect();
        let total: u64 = hit.iter().map(|i| u64::from(groups[*i].weight)).sum();
        for i in hit {
            unmatched.remove(&i);
            let g = &mut groups[i];
            let nw = if total == 0 {
                0
            } else {
                (u64::from(g.weight) * u64::from(*w)).div_ceil(total)
            };
            if nw == 0 {
                notes.push(format!(
                    "locality {} is emptied by distribute (weight 0 for {pattern:?})",
                    g.loc
                ));
                g.eps.clear();
            } else {
                g.weight = nw.min(u64::from(u32::MAX)) as u32;
                g.fixed_weight = true;
            }
        }
    }
    for i in unmatched {
        let g = &mut groups[i];
        if !g.eps.is_empty() {
            notes.push(format!(
                "locality {} is emptied by distribute (no destination pattern from {:?} matches it)",
                g.loc, rule.from
            ));
        }
        g.eps.clear();
    }
}

/// Istio's `applyFailoverPriorities`: per endpoint, the first mismatching entry j of N gives
/// priority N - j (all match: 0); each locality splits into one group per priority.
fn failover_priority(
    p: &Policy,
    proxy_labels: &BTreeMap<String, String>,
    eps: &[EndpointIn],
    groups: Vec<Group>,
) -> Vec<Group> {
    if proxy_labels.is_empty() {
        return groups;
    }
    let n = p.failover_priority.len() as u64;
    let mut out = Vec::new();
    for g in groups {
        let mut by_prio: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for &i in &g.eps {
            let e = &eps[i];
            let labels = augment(&e.labels, &e.locality, &e.cluster, &e.network);
            let mut prio = 0;
            for (j, fp) in p.failover_priority.iter().enumerate() {
                let want = match &fp.value {
                    Some(v) => v.as_str(),
                    None => proxy_labels.get(&fp.key).map(String::as_str).unwrap_or(""),
                };
                let have = labels.get(&fp.key).map(String::as_str).unwrap_or("");
                if want != have {
                    prio = n - j as u64;
                    break;
                }
            }
            by_prio.entry(prio).or_default().push(i);
        }
        for (prio, idx) in by_prio {
            out.push(Group {
                loc: g.loc.clone(),
                prio,
                weight: sum_weights(eps, &idx),
                fixed_weight: false,
                eps: idx,
            });
        }
    }
    renumber(&mut out);
    out
}

/// Istio's `applyLocalityFailover`: locality priority 0-3 (4 when a failover entry from the
/// proxy's region names another region), combined as earlier * 5 + locality, renumbered.
fn locality_failover(p: &Policy, proxy: &ProxyIn, groups: &mut [Group]) {
    for g in groups.iter_mut() {
        let mut lp = lb_priority(&proxy.locality, &g.loc);
        if lp == 3 {
            if let Some(f) = p.failover.iter().find(|f| f.from == proxy.locality.region) {
                if g.loc.region != f.to {
                    lp = 4;
                }
            }
        }
        g.prio = g.prio * 5 + lp;
    }
    renumber(groups);
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshfed_model::policy::{Distribute, FailoverPair, Outlier, PriorityLabel};

    fn policy() -> Policy {
        Policy {
            name: "p".into(),
            namespace: "shop".into(),
            host: "payment.shop.svc.cluster.local".into(),
            origin: String::new(),
            enabled: true,
            failover_priority: vec![],
            failover: vec![],
            distribute: vec![],
            outlier: Some(Outlier {
                consecutive_5xx_errors: Some(5),
                consecutive_gateway_errors: None,
                interval_ms: None,
                base_ejection_time_ms: None,
                max_ejection_percent: None,
            }),
            on_expiry: None,
            allow_without_health_signal: false,
            publish: false,
            subsets: Vec::new(),
        }
    }

    fn ep(addr: &str, loc: &str, cluster: &str, network: &str) -> EndpointIn {
        EndpointIn {
            address: addr.into(),
            locality: Loc::parse(loc).unwrap(),
            labels: BTreeMap::new(),
            weight: 1,
            cluster: cluster.into(),
            network: network.into(),
            healthy: true,
            stale: false,
        }
    }

    fn proxy(loc: &str) -> ProxyIn {
        ProxyIn {
            locality: Loc::parse(loc).unwrap(),
            labels: BTreeMap::new(),
            cluster: "east".into(),
            network: None,
        }
    }

    /// (priority, locality, weight, addresses) per row.
    fn rows(t: &Table) -> Vec<(u32, String, u32, Vec<String>)> {
        t.rows
            .iter()
            .map(|r| {
                (
                    r.priority,
                    r.locality.to_string(),
                    r.weight,
                    r.endpoints.iter().map(|e| e.address.clone()).collect(),
                )
            })
            .collect()
    }

    fn three_regions() -> Vec<EndpointIn> {
        vec![
            ep("10.0.0.1:80", "us-east1/a/s1", "east", "n1"),
            ep("10.0.0.2:80", "us-east1/a/s2", "east", "n1"),
            ep("10.0.0.3:80", "us-east1/b", "east", "n1"),
            ep("10.0.1.1:80", "us-west1/a", "west", "n2"),
            ep("10.0.2.1:80", "eu-west1/a", "eu", "n3"),
        ]
    }

    #[test]
    fn no_policy_puts_everything_at_priority_zero() {
        let t = compute(
            None,
            &proxy("us-east1/a/s1"),
            &three_regions(),
            &BTreeMap::new(),
        );
        assert!(t.rows.iter().all(|r| r.priority == 0));
        assert_eq!(t.rows.len(), 5);
    }

    #[test]
    fn outlier_detection_alone_turns_on_default_locality_failover() {
        let t = compute(
            Some(&policy()),
            &proxy("us-east1/a/s1"),
            &three_regions(),
            &BTreeMap::new(),
        );
        let r = rows(&t);
        assert_eq!(
            r[0],
            (0, "us-east1/a/s1".into(), 1, vec!["10.0.0.1:80".into()])
        );
        assert_eq!(r[1].0, 1); // same zone
        assert_eq!(r[2].0, 2); // same region
        assert_eq!((r[3].0, r[4].0), (3, 3)); // other regions, renumbered without gaps
    }

    #[test]
    fn region_failover_demotes_regions_other_than_the_target() {
        let mut p = policy();
        p.failover = vec![FailoverPair {
            from: "us-east1".into(),
            to: "us-west1".into(),
        }];
        let t = compute(
            Some(&p),
            &proxy("us-east1/a/s1"),
            &three_regions(),
            &BTreeMap::new(),
        );
        let by: BTreeMap<String, u32> = t
            .rows
            .iter()
            .map(|r| (r.locality.to_string(), r.priority))
            .collect();
        assert_eq!(by["us-west1/a"], 3);
        assert_eq!(by["eu-west1/a"], 4);
        // A proxy in another region is not affected by the entry.
        let t = compute(
            Some(&p),
            &proxy("eu-west1/a"),
            &three_regions(),
            &BTreeMap::new(),
        );
        let by: BTreeMap<String, u32> = t
            .rows
            .iter()
            .map(|r| (r.locality.to_string(), r.priority))
            .collect();
        assert_eq!(by["us-west1/a"], by["us-east1/b"]);
    }

    #[test]
    fn failover_priority_walk_splits_localities_by_label() {
        let mut p = policy();
        p.failover_priority = vec![
            PriorityLabel {
                key: "version".into(),
                value: Some("v2".into()),
            },
            PriorityLabel {
                key: LABEL_NETWORK.into(),
                value: None,
            },
        ];
        let mut eps = vec![
            ep("10.0.0.1:80", "us-east1/a", "east", "n1"),
            ep("10.0.0.2:80", "us-east1/a", "east", "n1"),
            ep("10.0.1.1:80", "us-west1/a", "west", "n2"),
            ep("10.0.1.2:80", "us-west1/a", "west", "n2"),
        ];
        eps[1].labels.insert("version".into(), "v2".into());
        eps[3].labels.insert("version".into(), "v2".into());
        let mut px = proxy("us-east1/a");
        px.network = Some("n1".into());
        // No gateways needed for the priority maths; keep split horizon off for this check.
        px.network = None;
        px.labels.insert(LABEL_NETWORK.into(), "n1".into());
        let t = compute(Some(&p), &px, &eps, &BTreeMap::new());
        let r = rows(&t);
        // v2 on n1 -> 0; v2 on n2 -> 1 (N - 1); not v2 -> 2 (N - 0).
        assert_eq!(
            r[0],
            (0, "us-east1/a".into(), 1, vec!["10.0.0.2:80".into()])
        );
        assert_eq!(
            r[1],
            (1, "us-west1/a".into(), 1, vec!["10.0.1.2:80".into()])
        );
        assert_eq!(r[2].0, 2);
        assert_eq!(r[3].0, 2);
    }

    #[test]
    fn failover_priority_with_region_failover_combines_times_five() {
        let mut p = policy();
        p.failover_priority = vec![PriorityLabel {
            key: "version".into(),
            value: Some("v2".into()),
        }];
        p.failover = vec![FailoverPair {
            from: "us-east1".into(),
            to: "us-west1".into(),
        }];
        let mut eps = three_regions();
        for e in &mut eps {
            e.labels.insert("version".into(), "v2".into());
        }
        eps[0].labels.insert("version".into(), "v1".into());
        let t = compute(Some(&p), &proxy("us-east1/a/s1"), &eps, &BTreeMap::new());
        let by: BTreeMap<String, u32> = t
            .rows
            .iter()
            .map(|r| (r.locality.to_string(), r.priority))
            .collect();
        // label priority 0: s2 (loc 1), b (loc 2), west (3), eu (4) -> 0,1,2,3
        // label priority 1: s1 (loc 0) -> 5 -> renumbered 4
        assert_eq!(by["us-east1/a/s2"], 0);
        assert_eq!(by["us-east1/b"], 1);
        assert_eq!(by["us-west1/a"], 2);
        assert_eq!(by["eu-west1/a"], 3);
        assert_eq!(by["us-east1/a/s1"], 4);
    }

    #[test]
    fn distribute_uses_ceil_and_empties_unmatched_localities() {
        let mut p = policy();
        p.outlier = None;
        p.distribute = vec![Distribute {
            from: "us-east1/*".into(),
            to: vec![("us-east1/*".into(), 80), ("us-west1/*".into(), 20)],
        }];
        let mut eps = vec![
            ep("10.0.0.1:80", "us-east1/a", "east", "n1"),
            ep("10.0.0.2:80", "us-east1/b", "east", "n1"),
            ep("10.0.0.3:80", "us-east1/b", "east", "n1"),
            ep("10.0.1.1:80", "us-west1/a", "west", "n2"),
            ep("10.0.2.1:80", "eu-west1/a", "eu", "n3"),
        ];
        eps[3].weight = 3;
        let t = compute(Some(&p), &proxy("us-east1/a"), &eps, &BTreeMap::new());
        let r = rows(&t);
        assert_eq!(r.len(), 3, "eu is emptied: {r:?}");
        assert_eq!((r[0].1.as_str(), r[0].2), ("us-east1/a", 27)); // ceil(1*80/3)
        assert_eq!((r[1].1.as_str(), r[1].2), ("us-east1/b", 54)); // ceil(2*80/3)
        assert_eq!((r[2].1.as_str(), r[2].2), ("us-west1/a", 20));
        assert!(t.notes.iter().any(|n| n.contains("eu-west1/a")));
        let s = t.healthy_shares();
        assert!((s[0] - 27.0 / 101.0).abs() < 1e-9);
    }

    #[test]
    fn split_horizon_aggregates_gateway_addresses() {
        let p = policy();
        let eps = vec![
            ep("10.0.0.1:80", "us-east1/a", "east", "n1"),
            ep("10.0.1.1:80", "us-west1/a", "west", "n2"),
            ep("10.0.1.2:80", "us-west1/b", "west", "n2"),
            ep("10.0.1.3:80", "us-west1/b", "west", "n2"),
            ep("10.0.2.1:80", "eu-west1/a", "eu", "n3"),
        ];
        let mut px = proxy("us-east1/a");
        px.network = Some("n1".into());
        let gws = BTreeMap::from([("n2".to_string(), vec!["192.0.2.2:15443".to_string()])]);
        let t = compute(Some(&p), &px, &eps, &gws);
        let r = rows(&t);
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(
            r[0],
            (0, "us-east1/a".into(), 1, vec!["10.0.0.1:80".into()])
        );
        // One gateway entry standing for the three n2 endpoints, weights summed.
        assert_eq!(
            r[1],
            (1, "us-west1/a".into(), 3, vec!["192.0.2.2:15443".into()])
        );
        assert!(t.notes.iter().any(|n| n.contains("n3")));
        let mut all: Vec<&str> = t
            .rows
            .iter()
            .flat_map(|r| r.endpoints.iter().map(|e| e.address.as_str()))
            .collect();
        let n = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), n, "no address twice");
    }

    #[test]
    fn stale_endpoints_rank_after_fresh_ones() {
        let mut eps = three_regions();
        eps[0].stale = true;
        let t = compute(
            Some(&policy()),
            &proxy("us-east1/a/s1"),
            &eps,
            &BTreeMap::new(),
        );
        let last = t.rows.last().unwrap();
        assert_eq!(last.endpoints[0].address, "10.0.0.1:80");
        assert_eq!(last.priority, 3);
        assert_eq!(t.rows[0].locality.to_string(), "us-east1/a/s2");
        assert_eq!(t.rows[0].priority, 0);
    }

    #[test]
    fn disabled_policy_is_ignored() {
        let mut p = policy();
        p.enabled = false;
        let t = compute(
            Some(&p),
            &proxy("us-east1/a/s1"),
            &three_regions(),
            &BTreeMap::new(),
        );
        assert!(t.rows.iter().all(|r| r.priority == 0));
    }

    #[test]
    fn locality_patterns_match_like_istio() {
        let l = Loc::parse("us-east1/a/s1").unwrap();
        assert!(l.matches("us-east1"));
        assert!(l.matches("us-east1/*"));
        assert!(l.matches("us-east1/a/*"));
        assert!(l.matches("*"));
        assert!(!l.matches("us-east1/b"));
        assert!(!l.matches("us-west1/*"));
    }
}
