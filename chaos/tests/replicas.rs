//! Agent replicas (`meshfed agent --source kubernetes --leader-election`) as real processes
//! against the API-server double: two replicas of east share its identity and CA through a
//! Secret (`meshfed join --state-secret`) and elect a leader with a coordination.k8s.io Lease. The leader
//! exports and writes to the API; the follower serves the imports it gets on an observer
//! stream. `kill -9` of the leader: the follower takes the Lease once it has seen it
//! unchanged for the lease duration, then exports and writes. A replica that drains releases
//! the Lease, and the other takes it at once. A CA rotation on the leader reaches the follower
//! through the Secret. An API server outage stops the leader's writes but not its voice: it
//! keeps the cluster's stream while no other replica leads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use chaos::apiserver::ApiServer;
use chaos::*;
use serde_json::{json, Value};

const LEASE_SECONDS: u64 = 3;

fn slice(ips: &[&str]) -> Value {
    let eps: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "payment-x1", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "payment"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps})
}

fn holder(api: &ApiServer) -> Option<String> {
    api.get("Lease", "meshfed-system", "meshfed-agent")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
        .filter(|h| !h.is_empty())
}

fn leading(c: &Cluster) -> anyhow::Result<Option<bool>> {
    Ok(c.status()?["leadership"]["leader"].as_bool())
}

/// Another replica of `like`'s cluster: its own state directory and ports, the same registry
/// and policies.
fn replica(
    like: &Cluster,
    name: &str,
    dir: std::path::PathBuf,
    agent_args: Vec<String>,
) -> Cluster {
    Cluster {
        name: name.into(),
        dir,
        registry: like.registry.clone(),
        admin: format!("127.0.0.1:{}", free_port()),
        xds: format!("127.0.0.1:{}", free_port()),
        xds_mtls: format!("127.0.0.1:{}", free_port()),
        vm_api: format!("127.0.0.1:{}", free_port()),
        dns: format!("127.0.0.1:{}", free_udp_port()),
        bundle_endpoint: format!("127.0.0.1:{}", free_port()),
        policy_dir: like.policy_dir.clone(),
        agent: None,
        netns: None,
        agent_args,
    }
}

fn west_endpoints_of_east(west: &Cluster) -> anyhow::Result<u64> {
    Ok(west.status()?["endpoints"]["shop/payment"]["east"]
        .as_u64()
        .unwrap_or(0))
}

#[test]
fn a_follower_takes_over_from_a_killed_leader_and_a_draining_leader_hands_over() {
    let api = ApiServer::start().unwrap();
    // Cluster certificates live 12 s here (renewed at 50-80 %): the test outlives them.
    let f = Federation::start_with("5s", None, &["--cluster-cert-ttl", "12s"]).unwrap();
    let kubeconfig = api.kubeconfig(&f.root.path().join("kubeconfig")).unwrap();
    api.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "payment", "namespace": "shop"},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                 "selector": {"app": "payment"}}}))
        .unwrap();
    api.apply(slice(&["10.1.0.5"])).unwrap();
    api.apply(
        json!({"apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
        "metadata": {"name": "payment", "namespace": "shop"}}),
    )
    .unwrap();
    let lease = format!("{LEASE_SECONDS}s");
    let replica_args = |id: &str| -> Vec<String> {
        [
            "--source",
            "kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--leader-election",
            "--leader-election-namespace",
            "meshfed-system",
            "--leader-election-identity",
            id,
            "--lease-duration",
            &lease,
            "--lease-renew-deadline",
            "2s",
            "--lease-retry-period",
            "250ms",
            "--state-secret",
            "meshfed-agent-state",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let args0 = replica_args("east-0");
    let mut east0 = f
        .add_cluster_with(
            "east",
            "net-e",
            "us-east1/us-east1-b",
            "services: []\n",
            None,
            &[],
            &args0.iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .unwrap();
    wait_for(Duration::from_secs(20), "east-0 to lead", || {
        Ok(
            (holder(&api).as_deref() == Some("east-0") && leading(&east0)? == Some(true))
                .then_some(()),
        )
    })
    .unwrap();
    // east-0 joined before replicas: the same join with --state-secret (as the init container
    // runs it) finds the identity and writes the Secret.
    let token = f.token("east").unwrap();
    let join = |dir: &Path| -> String {
        let args = join_args(
            &token,
            dir,
            "east",
            "net-e",
            "us-east1/us-east1-b",
            &[
                "--if-not-joined",
                "--state-secret",
                "meshfed-agent-state",
                "--state-secret-namespace",
                "meshfed-system",
                "--kubeconfig",
                kubeconfig.to_str().unwrap(),
            ],
        );
        meshfed_ok(&args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap()
    };
    let out = join(&east0.dir);
    assert!(out.contains("already joined"), "{out}");
    let secret = api
        .get("Secret", "meshfed-system", "meshfed-agent-state")
        .expect("the join wrote the Secret");
    assert_eq!(
        secret["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "meshfed"
    );
    // The second replica restores the identity and CA from it; the token is not used (the
    // federator would have refused a second use), and the cluster is not joined again.
    let dir1 = f.root.path().join("east-1");
    let out = join(&dir1);
    let joined_with = trust::Svid::load(&dir1.join("identity"))
        .unwrap()
        .0
        .not_after;
    assert!(
        out.contains("restored the identity of spiffe://federation.meshfed/cluster/east"),
        "{out}"
    );
    assert!(out.contains("the token was not used"), "{out}");
    for f in [
        "identity/identity.json",
        "identity/key.pem",
        "ca/meshfed-ca.json",
    ] {
        assert_eq!(
            std::fs::read(east0.dir.join(f)).unwrap(),
            std::fs::read(dir1.join(f)).unwrap(),
            "{f}"
        );
    }
    let mut east1 = replica(&east0, "east-1", dir1, replica_args("east-1"));
    f.start_agent(&mut east1).unwrap();

    let west = f
        .add_cluster(
            "west",
            "net-w",
            "us-west1/us-west1-a",
            &registry_yaml("orders", 1, 9090, ""),
        )
        .unwrap();
    // The leader exports; west imports east's payment.
    wait_for(Duration::from_secs(20), "west imports payment", || {
        Ok((west_endpoints_of_east(&west)? == 1).then_some(()))
    })
    .unwrap();
    // Both replicas serve west's export; only the leader writes its ServiceImport.
    for c in [&east0, &east1] {
        wait_for(
            Duration::from_secs(20),
            "west's orders at both replicas",
            || Ok((c.status()?["imports"]["west"].as_u64() == Some(1)).then_some(())),
        )
        .unwrap();
    }
    let s1 = east1.status().unwrap();
    assert_eq!(s1["leadership"]["leader"], false, "{s1}");
    assert_eq!(s1["leadership"]["holder"], "east-0", "{s1}");
    assert_eq!(
        s1["connected"], true,
        "the follower's observer stream: {s1}"
    );
    let (code, text, _) = meshfed(&["status", "--admin", &east1.admin]).unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("replica: follower since"), "{text}");
    assert!(text.contains("leader east-0"), "{text}");
    wait_for(
        Duration::from_secs(20),
        "the ServiceImport of orders",
        || Ok(api.get("ServiceImport", "shop", "orders-0")),
    )
    .unwrap();
    assert_eq!(
        metric(&east1.admin, "meshfed_agent_leader").unwrap(),
        Some(0.0)
    );
    assert_eq!(
        metric(&east0.admin, "meshfed_agent_leader").unwrap(),
        Some(1.0)
    );

    // kill -9 of the leader: the Lease is not released; the follower waits until it has seen
    // it unchanged for the lease duration (by its own clock), then leads.
    let killed = Instant::now();
    east0.agent().unwrap().kill9();
    let last = api.get("Lease", "meshfed-system", "meshfed-agent").unwrap();
    assert_eq!(last["spec"]["holderIdentity"], "east-0", "{last}");
    wait_for(Duration::from_secs(30), "east-1 to lead", || {
        Ok(
            (holder(&api).as_deref() == Some("east-1") && leading(&east1)? == Some(true))
                .then_some(()),
        )
    })
    .unwrap();
    let took_over = killed.elapsed();
    eprintln!("takeover after kill -9: {took_over:?} (lease {LEASE_SECONDS} s, retry 250 ms)");
    let l = api.get("Lease", "meshfed-system", "meshfed-agent").unwrap();
    let t = |v: &Value| {
        time::OffsetDateTime::parse(
            v.as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    // Never before the dead leader's last renewal has had its lease duration...
    let gap = t(&l["spec"]["acquireTime"]) - t(&last["spec"]["renewTime"]);
    assert!(
        gap >= time::Duration::seconds(LEASE_SECONDS as i64),
        "east-1 took the Lease {gap} after east-0's last renewal"
    );
    // ...and within about a retry period after it (bounded generously for a loaded machine).
    assert!(
        took_over <= Duration::from_secs(LEASE_SECONDS + 2),
        "{took_over:?}"
    );
    assert_eq!(l["spec"]["leaseTransitions"], 1, "{l}");

    // The new leader speaks for east: an endpoint change reaches west; and it writes: west's
    // new export becomes a ServiceImport in east.
    api.apply(slice(&["10.1.0.5", "10.1.0.6"])).unwrap();
    wait_for(Duration::from_secs(20), "two endpoints at west", || {
        Ok((west_endpoints_of_east(&west)? == 2).then_some(()))
    })
    .unwrap();
    west.write_registry(&registry_yaml("orders", 2, 9090, ""))
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "the ServiceImport of west's new export, written by east-1",
        || Ok(api.get("ServiceImport", "shop", "orders-1")),
    )
    .unwrap();
    let fs = f.cluster_status("east").unwrap();
    assert_eq!(fs["connected"], true, "{fs}");

    // east-0 comes back: it follows.
    f.start_agent(&mut east0).unwrap();
    wait_for(Duration::from_secs(20), "east-0 to follow east-1", || {
        let s = east0.status()?;
        Ok(
            (s["leadership"]["holder"] == "east-1" && s["leadership"]["leader"] == false)
                .then_some(()),
        )
    })
    .unwrap();
    // A rotation of the cluster CA on the leader's state reaches the follower through the
    // Secret: both publish the new root in their bundle.
    let out = rotate_cluster_ca(&east1.dir, "1h").unwrap();
    assert!(out.contains("bundle sequence 2"), "{out}");
    for c in [&east1, &east0] {
        wait_for(
            Duration::from_secs(30),
            &format!("{} to publish bundle sequence 2", c.name),
            || Ok((c.status()?["ca"]["bundle_sequence"].as_u64() == Some(2)).then_some(())),
        )
        .unwrap();
    }

    // east-1 drains (SIGTERM): it releases the Lease, and east-0 takes it without waiting
    // for it to expire.
    let drained = Instant::now();
    east1.agent().unwrap().term().unwrap();
    wait_for(Duration::from_secs(20), "east-0 to lead again", || {
        Ok((holder(&api).as_deref() == Some("east-0")).then_some(()))
    })
    .unwrap();
    // Released, not expired: an expired Lease could not be taken before the lease duration
    // (less the one retry period since east-1's last renewal) had passed.
    let handover = drained.elapsed();
    eprintln!("handover after SIGTERM: {handover:?}");
    assert!(
        handover < Duration::from_millis(LEASE_SECONDS * 1000 - 500),
        "{handover:?}"
    );
    let l = api.get("Lease", "meshfed-system", "meshfed-agent").unwrap();
    assert_eq!(l["spec"]["leaseTransitions"], 2, "{l}");
    wait_for(Duration::from_secs(20), "east-0 reports leading", || {
        Ok((leading(&east0)? == Some(true)).then_some(()))
    })
    .unwrap();

    // The API server goes away: east-0 cannot renew, so it stops leading (no writes to the
    // API) within the renew deadline; nobody else is known to lead, so it keeps speaking for
    // east: its heartbeats go on and east stays fresh at the federator.
    api.set_down(true);
    wait_for(Duration::from_secs(20), "east-0 to step down", || {
        let s = east0.status()?;
        Ok(
            (s["leadership"]["leader"] == false && s["leadership"]["held_last"] == true)
                .then_some(()),
        )
    })
    .unwrap();
    let heartbeats = || {
        metric(
            &f.admin,
            "meshfed_federation_messages_total{cluster=\"east\",kind=\"heartbeat\"}",
        )
        .unwrap()
        .unwrap_or(0.0)
    };
    let before = heartbeats();
    wait_for(
        Duration::from_secs(20),
        "two more heartbeats from east after the step-down",
        || Ok((heartbeats() >= before + 2.0).then_some(())),
    )
    .unwrap();
    let fs = f.cluster_status("east").unwrap();
    assert_eq!(fs["connected"], true, "{fs}");
    let (_, text, _) = meshfed(&["status", "--admin", &east0.admin]).unwrap();
    assert!(text.contains("not leading since"), "{text}");
    assert!(text.contains("still speaks for the cluster"), "{text}");
    // The API server is back: east-0 holds the Lease still, and leads again.
    api.set_down(false);
    wait_for(
        Duration::from_secs(20),
        "east-0 to lead after the outage",
        || Ok((leading(&east0)? == Some(true)).then_some(())),
    )
    .unwrap();

    // A replica that starts after the first cluster certificate expired restores a current
    // one: the leader writes its renewed identity to the Secret.
    wait_for(
        Duration::from_secs(30),
        "the first certificate to have expired",
        || Ok((joined_with < time::OffsetDateTime::now_utc()).then_some(())),
    )
    .unwrap();
    let dir2 = f.root.path().join("east-2");
    let out = join(&dir2);
    assert!(out.contains("restored the identity"), "{out}");
    let restored = trust::Svid::load(&dir2.join("identity")).unwrap().0;
    assert!(
        restored.not_after > time::OffsetDateTime::now_utc(),
        "restored a certificate that expired at {}",
        restored.not_after
    );

    // Replicas answer with the same VIPs whatever their history: west withdraws orders-0,
    // east-0 (the leader) keeps orders-1's address; east-2 starts fresh (a first-fit allocation
    // of its own would give orders-1 another one) and takes the leader's.
    west.write_registry(
        "services:\n  - {namespace: shop, name: orders-1, ports: [{name: http, port: 9090}], export: true, endpoints: [{address: 10.0.0.2}]}\n",
    )
    .unwrap();
    wait_for(Duration::from_secs(20), "east-0 to drop orders-0", || {
        Ok((east0.status()?["imports"]["west"].as_u64() == Some(1)).then_some(()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\neast-0: {:?}\nwest: {:?}\neast-0's log:\n{}",
            east0.status().ok(),
            west.status().ok(),
            east0.agent.as_ref().map(|a| a.log()).unwrap_or_default()
        )
    });
    let name = "orders-1.shop.svc.clusterset.local";
    let at_leader = dig(&east0, name, "A").unwrap();
    assert_eq!(at_leader.len(), 1, "{at_leader:?}");
    // Queries are not logged at the default level.
    let log = east0.agent.as_ref().map(|a| a.log()).unwrap_or_default();
    assert!(
        !log.contains(name),
        "a DNS query in the agent's log:\n{log}"
    );
    let mut east2 = replica(&east0, "east-2", dir2, replica_args("east-2"));
    f.start_agent(&mut east2).unwrap();
    wait_for(
        Duration::from_secs(20),
        "east-2 to answer with the leader's VIP",
        || Ok((dig(&east2, name, "A")? == at_leader).then_some(())),
    )
    .unwrap();
    assert_eq!(
        api.get("ConfigMap", "meshfed-system", "meshfed-agent-vips")
            .unwrap()["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "meshfed"
    );
}
