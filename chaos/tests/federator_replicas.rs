//! Federator replicas on a real etcd (Debian's etcd-server, three members started by the
//! test): real `meshfed federator --store etcd` and `meshfed agent` processes on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chaos::*;
use meshfed_store::etcd::local::{Cuttable, LocalEtcd};

fn imports_from(agent_status: &serde_json::Value, source: &str) -> u64 {
    agent_status["imports"][source].as_u64().unwrap_or(0)
}

/// The first scenario: three etcd members, three replicas; the replica holding east's
/// stream is killed with -9 in the middle of an export storm. Nothing acknowledged is lost,
/// west converges, and east resumed on another replica without a full resend (on its
/// counters). Then one etcd member is killed: the federation goes on.
#[test]
fn killing_the_replica_holding_a_stream_mid_storm_loses_nothing_acknowledged() {
    let mut etcd = LocalEtcd::cluster(3).unwrap();
    let mut f = Federation::start_replicas("5s", &etcd.endpoints(), 3).unwrap();
    let mut east = f
        .add_cluster(
            "east",
            "net-east",
            "us-east1/us-east1-b",
            &registry_yaml("svc", 10, 8080, ""),
        )
        .unwrap();
    let west = f
        .add_cluster("west", "net-west", "us-west1/us-west1-a", "services: []\n")
        .unwrap();
    wait_for(Duration::from_secs(20), "initial import", || {
        Ok((imports_from(&west.status()?, "east") == 10).then_some(()))
    })
    .unwrap();
    // A token made from etcd names every replica; east was told every replica's address at
    // its join too.
    let token = f.token("probe").unwrap();
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.trim_start_matches("mft1."))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims["federators"].as_array().map(Vec::len),
        Some(3),
        "{claims}"
    );
    assert_eq!(
        east.status().unwrap()["federators"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    // Every replica knows both clusters, connected and fresh, whichever holds their streams.
    for a in f.admins() {
        let (_, s) = status(&a).unwrap();
        for c in s["clusters"].as_array().unwrap() {
            assert_eq!(c["connected"], true, "{a}: {c}");
            assert_eq!(c["lease"], "fresh", "{a}: {c}");
        }
        assert_eq!(s["store"]["backend"], "etcd");
    }
    let killed = wait_for(Duration::from_secs(10), "east's replica", || {
        Ok(holder_among(&f.admins(), "east"))
    })
    .unwrap();
    let want_n = export_storm(&east, || f.replica_proc(killed).kill9()).unwrap();
    wait_for(
        Duration::from_secs(60),
        "west to import the final set",
        || Ok((imports_from(&west.status()?, "east") == want_n as u64).then_some(())),
    )
    .unwrap();
    let survivors: Vec<String> = f
        .admins()
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != killed)
        .map(|(_, a)| a)
        .collect();
    for a in &survivors {
        wait_for(
            Duration::from_secs(30),
            "a surviving replica caught up",
            || {
                let (_, s) = status(a)?;
                let c = s["clusters"]
                    .as_array()
                    .and_then(|cs| cs.iter().find(|c| c["cluster"] == "east").cloned())
                    .unwrap_or_default();
                Ok((c["exports"] == want_n as u64 && c["connected"] == true).then_some(()))
            },
        )
        .unwrap();
    }
    // East resumed on another replica without a full resend.
    assert_ne!(
        holder_among(&survivors, "east"),
        None,
        "east is on a survivor"
    );
    assert_resumed_without_full_resend(&mut east);

    // One etcd member of three killed: exports still flow.
    etcd.kill(0);
    east.write_registry(&registry_yaml("svc", 4, 7000, ""))
        .unwrap();
    wait_for(
        Duration::from_secs(60),
        "west to import east's change with one etcd member down",
        || Ok((imports_from(&west.status()?, "east") == 4).then_some(())),
    )
    .unwrap();
}

/// Which of `admins` holds (or held) a stream of `cluster`: the replica that counted its
/// heartbeats.
fn holder_among(admins: &[String], cluster: &str) -> Option<usize> {
    admins.iter().position(|a| {
        metric(
            a,
            &format!(
                "meshfed_federation_messages_total{{cluster=\"{cluster}\",kind=\"heartbeat\"}}"
            ),
        )
        .ok()
        .flatten()
        .is_some_and(|n| n >= 1.0)
    })
}

/// A replica partitioned from etcd (its etcd connections run through a relay that is cut)
/// stops acknowledging, says so on /readyz and in its status, and ends its streams: east moves
/// to another replica and its exports flow again. Healed, the replica is ready again.
#[test]
fn a_replica_partitioned_from_etcd_stops_acknowledging_and_its_clusters_move() {
    let etcd = LocalEtcd::start().unwrap();
    let member = etcd.endpoints()[0]
        .trim_start_matches("http://")
        .to_string();
    let relays: Vec<Cuttable> = (0..3).map(|_| Cuttable::start(&member).unwrap()).collect();
    let each: Vec<Vec<String>> = relays
        .iter()
        .map(|r| vec![format!("http://{}", r.addr)])
        .collect();
    let f = Federation::start_replicas_each("5s", &each).unwrap();
    let mut east = f
        .add_cluster(
            "east",
            "net-east",
            "us-east1/us-east1-b",
            &registry_yaml("svc", 3, 8080, ""),
        )
        .unwrap();
    let west = f
        .add_cluster("west", "net-west", "us-west1/us-west1-a", "services: []\n")
        .unwrap();
    wait_for(Duration::from_secs(20), "initial import", || {
        Ok((imports_from(&west.status()?, "east") == 3).then_some(()))
    })
    .unwrap();
    let admins = f.admins();
    let p = wait_for(Duration::from_secs(10), "east's replica", || {
        Ok(holder_among(&admins, "east"))
    })
    .unwrap();
    relays[p].cut();
    let (code, body) = wait_for(Duration::from_secs(30), "the cut replica not ready", || {
        let (code, body) = http_get(&admins[p], "/readyz")?;
        Ok((code == 503).then_some((code, body)))
    })
    .unwrap();
    assert!(body.contains("state store: etcd:"), "{code} {body}");
    let (_, s) = status(&admins[p]).unwrap();
    assert!(
        s["store"]["unavailable"]
            .as_str()
            .is_some_and(|u| u.starts_with("etcd:")),
        "{s}"
    );
    // East moves to a replica that reaches etcd, and its change is acknowledged and imported.
    east.write_registry(&registry_yaml("svc", 5, 8080, ""))
        .unwrap();
    wait_for(
        Duration::from_secs(60),
        "west to import east's change through the other replicas",
        || Ok((imports_from(&west.status()?, "east") == 5).then_some(())),
    )
    .unwrap();
    let others: Vec<String> = admins
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != p)
        .map(|(_, a)| a.clone())
        .collect();
    wait_for(
        Duration::from_secs(20),
        "east heartbeating on another replica",
        || Ok(holder_among(&others, "east")),
    )
    .unwrap();
    assert!(
        east.agent()
            .unwrap()
            .log()
            .contains("cannot reach its store"),
        "east was told why its replica ended the stream"
    );
    relays[p].heal();
    wait_for(
        Duration::from_secs(30),
        "the healed replica ready again",
        || Ok((http_get(&admins[p], "/readyz")?.0 == 200).then_some(())),
    )
    .unwrap();
}
