//! Multi-process federation scenarios: real `meshfed federator` and `meshfed agent` processes on
//! loopback, observed through `meshfed status`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chaos::*;

const SHOP: &str = r#"
services:
  - namespace: shop
    name: payment
    ports: [{name: http, port: 8080}]
    export: true
    endpoints: [{address: 10.1.0.5, labels: {version: v1}}]
  - namespace: shop
    name: ledger
    ports: [{name: grpc, port: 9090}]
    exportTo: [eu]
    endpoints: [{address: 10.1.0.6}]
  - namespace: shop
    name: internal
    ports: [{port: 7000}]
"#;

fn imports_from(agent_status: &serde_json::Value, source: &str) -> u64 {
    agent_status["imports"][source].as_u64().unwrap_or(0)
}

/// The trust domains (and their roots PEM) in the SPIFFE validator of the agent's SDS
/// `ROOTCA`, read over SDS from its plaintext xDS port as an Envoy's `sds-grpc` cluster would.
fn sds_root_domains(xds: &str) -> Vec<(String, String)> {
    use envoy_types::pb::envoy::config::core::v3::{data_source::Specifier, Node};
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3 as tls;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use prost::Message;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let r = rt
        .block_on(async {
            let mut c = SecretDiscoveryServiceClient::connect(format!("http://{xds}")).await?;
            c.fetch_secrets(DiscoveryRequest {
                node: Some(Node {
                    id: "sidecar~10.0.0.1~probe.shop~shop.svc.cluster.local".into(),
                    ..Default::default()
                }),
                type_url: meshfed_xds::SECRET_TYPE.into(),
                resource_names: vec!["ROOTCA".into()],
                ..Default::default()
            })
            .await
            .map_err(anyhow::Error::from)
        })
        .unwrap()
        .into_inner();
    let secret = tls::Secret::decode(r.resources[0].value.as_slice()).unwrap();
    let Some(tls::secret::Type::ValidationContext(vc)) = secret.r#type else {
        panic!("ROOTCA is not a validation context")
    };
    let cfg = vc.custom_validator_config.unwrap();
    assert_eq!(cfg.name, "envoy.tls.cert_validator.spiffe");
    tls::SpiffeCertValidatorConfig::decode(cfg.typed_config.unwrap().value.as_slice())
        .unwrap()
        .trust_domains
        .into_iter()
        .map(|t| match t.trust_bundle.and_then(|b| b.specifier) {
            Some(Specifier::InlineString(p)) => (t.name, p),
            other => panic!("{}: {other:?}", t.name),
        })
        .collect()
}

fn peer<'a>(agent_status: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    agent_status["peers"]
        .as_array()?
        .iter()
        .find(|p| p["cluster"] == name)
}

#[test]
fn three_clusters_exchange_exports_and_bundles_then_leave() {
    let f = Federation::start("3s").unwrap();
    // Something that does not speak TLS on the federator's port: the refused handshake is
    // counted, not only logged.
    {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(&f.grpc).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = Vec::new();
        let _ = c.read_to_end(&mut buf);
    }
    wait_for(
        Duration::from_secs(10),
        "the refused handshake counted",
        || {
            Ok(metric(
                &f.admin,
                "meshfed_tls_handshakes_refused_total{reason=\"refused\"}",
            )?
            .filter(|n| *n >= 1.0))
        },
    )
    .unwrap();
    let east = f
        .add_cluster("east", "net-east", "us-east1/us-east1-b", SHOP)
        .unwrap();
    let west = f
        .add_cluster("west", "net-west", "us-west1/us-west1-a", "services: []\n")
        .unwrap();
    let eu = f
        .add_cluster(
            "eu",
            "net-eu",
            "europe-west1/europe-west1-b",
            "services: []\n",
        )
        .unwrap();

    // east's exports reach west and eu; `exportTo: [eu]` keeps ledger from west; `internal` is
    // not exported at all.
    wait_for(Duration::from_secs(15), "imports at west and eu", || {
        let w = west.status()?;
        let e = eu.status()?;
        Ok((imports_from(&w, "east") == 1 && imports_from(&e, "east") == 2).then_some(()))
    })
    .unwrap();
    // Bundles: every agent holds the others' trust bundles.
    for c in [&east, &west, &eu] {
        let s = c.status().unwrap();
        for p in s["peers"].as_array().unwrap() {
            assert_eq!(
                p["bundle"], true,
                "{} lacks the bundle of {}",
                c.name, p["cluster"]
            );
        }
        assert_eq!(s["peers"].as_array().unwrap().len(), 2);
    }
    // Envoy proxies of west validate each peer with that peer's roots only (SDS ROOTCA, one
    // SPIFFE validator entry per trust domain), the same roots as west's trust files.
    let domains = sds_root_domains(&west.xds);
    assert_eq!(
        domains.iter().map(|d| d.0.as_str()).collect::<Vec<_>>(),
        ["east.mesh", "eu.mesh", "west.mesh"]
    );
    for (td, pem) in &domains {
        let file = std::fs::read_to_string(west.dir.join(format!("xds/roots/{td}.pem"))).unwrap();
        assert_eq!(pem, &file, "{td}");
    }
    let fs = f.cluster_status("east").unwrap();
    assert_eq!(fs["exports"], 2);
    assert_eq!(fs["bundle_sequence"], 1);
    // east's SPIFFE bundle endpoint, read by west's operator with the east bundle west's agent
    // already holds (from its bundle map): the same bundle, authenticated by the agent's ID.
    let map: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(west.dir.join("xds/spiffe-bundle-map.json")).unwrap(),
    )
    .unwrap();
    let held = f.root.path().join("east-held.json");
    std::fs::write(&held, map["trust_domains"]["east.mesh"].to_string()).unwrap();
    let fetched = meshfed_ok(&[
        "bundle",
        "fetch",
        &format!("https://{}/", east.bundle_endpoint),
        "--endpoint-spiffe-id",
        "spiffe://east.mesh/ns/meshfed-system/sa/meshfed-agent",
        "--trust-bundle",
        held.to_str().unwrap(),
    ])
    .unwrap();
    let fetched: serde_json::Value = serde_json::from_str(&fetched).unwrap();
    assert_eq!(fetched["keys"], map["trust_domains"]["east.mesh"]["keys"]);
    let (code, _) = f.status().unwrap();
    assert_eq!(code, 0, "healthy federation exits 0");

    // east leaves: its exports and bundle disappear everywhere.
    meshfed_ok(&["leave", "--state-dir", east.dir.to_str().unwrap()]).unwrap();
    wait_for(Duration::from_secs(15), "east's removal everywhere", || {
        let w = west.status()?;
        let e = eu.status()?;
        Ok((imports_from(&w, "east") == 0
            && imports_from(&e, "east") == 0
            && peer(&w, "east").is_none()
            && peer(&e, "east").is_none())
        .then_some(()))
    })
    .unwrap();
    assert_eq!(f.cluster_status("east").unwrap()["lease"], "left");
    // The federator's table lists members; east is named as gone, without numbers, and its
    // leaving is not a problem.
    let (code, text, _) = meshfed(&["status", "--admin", &f.admin]).unwrap();
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("left the federation: east"), "{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("east ")),
        "no row for east: {text}"
    );
    // ... and from west's SDS ROOTCA.
    wait_for(
        Duration::from_secs(15),
        "east.mesh out of west's ROOTCA",
        || {
            Ok((!sds_root_domains(&west.xds)
                .iter()
                .any(|d| d.0 == "east.mesh"))
            .then_some(()))
        },
    )
    .unwrap();
    // The departed cluster's agent sees that it left (told so, not that its stream was
    // replaced) and serves no imports.
    wait_for(Duration::from_secs(15), "east's agent to notice", || {
        Ok((east.status()?["left"] == true).then_some(()))
    })
    .unwrap();
    let s = east.status().unwrap();
    assert_eq!(s["imports"], serde_json::json!({}), "{s}");
    let log = east.agent.as_ref().map(|a| a.log()).unwrap_or_default();
    assert!(!log.contains("replaced this one"), "{log}");
}

#[test]
fn silent_cluster_turns_stale_within_the_lease_ttl() {
    let f = Federation::start("2s").unwrap();
    let mut east = f
        .add_cluster("east", "net-east", "us-east1/us-east1-b", SHOP)
        .unwrap();
    let west = f
        .add_cluster("west", "net-west", "us-west1/us-west1-a", "services: []\n")
        .unwrap();
    wait_for(Duration::from_secs(15), "west imports east", || {
        Ok((imports_from(&west.status()?, "east") == 1).then_some(()))
    })
    .unwrap();

    // Freeze east's agent: no heartbeats, but its TCP connection stays open.
    east.agent().unwrap().stop().unwrap();
    let frozen = Instant::now();
    let stale_after = wait_for(Duration::from_secs(10), "east stale at west", || {
        let w = west.status()?;
        Ok(peer(&w, "east")
            .filter(|p| p["lease"] == "stale")
            .map(|_| frozen.elapsed()))
    })
    .unwrap();
    println!(
        "east turned stale at west {:.2}s after it went silent (TTL 2s)",
        stale_after.as_secs_f64()
    );
    assert!(
        stale_after <= Duration::from_secs(3),
        "stale only after {stale_after:?}; TTL + 1 s allowed"
    );
    // Both status views say so and exit 3 (they are healthy; a peer is not), and the age is
    // as of now: it grows while nothing new arrives.
    let (code, w) = status(&west.admin).unwrap();
    assert_eq!(code, 3);
    let age = |w: &serde_json::Value| {
        peer(w, "east").unwrap()["last_heartbeat_age_ms"]
            .as_u64()
            .unwrap()
    };
    let first = age(&w);
    assert!(first >= 2000, "{first}");
    let later = wait_for(Duration::from_secs(10), "the age to grow", || {
        let w = status(&west.admin)?.1;
        Ok((age(&w) > first + 200).then_some(age(&w)))
    })
    .unwrap();
    assert!(later > first);
    let (code, fs) = f.status().unwrap();
    assert_eq!(code, 3);
    let e = fs["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["cluster"] == "east")
        .unwrap()
        .clone();
    assert_eq!(e["lease"], "stale");
    // The stale peer's service is kept (default policy: deprioritize), not dropped.
    assert_eq!(imports_from(&w, "east"), 1);

    east.agent().unwrap().cont().unwrap();
    wait_for(Duration::from_secs(10), "east fresh again", || {
        Ok(peer(&west.status()?, "east")
            .filter(|p| p["lease"] == "fresh")
            .map(|_| ()))
    })
    .unwrap();
}

#[test]
fn federator_kill9_during_an_export_storm_loses_nothing_acknowledged() {
    let f = Federation::start("5s").unwrap();
    let mut f = f;
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
    wait_for(Duration::from_secs(15), "initial import", || {
        Ok((imports_from(&west.status()?, "east") == 10).then_some(()))
    })
    .unwrap();

    // A storm of registry changes; the federator is killed with -9 in the middle of it (once
    // it has acknowledged a few of the storm's versions), and restarted once east has seen it
    // go.
    let want_n = export_storm(&east, || {
        f.federator.kill9();
        wait_for(
            Duration::from_secs(20),
            "east to see the federator gone",
            || Ok((east.status()?["connected"] == false).then_some(())),
        )
        .unwrap();
        f.federator.start().unwrap();
    })
    .unwrap();

    // Everything converges to the last registry at west.
    wait_for(
        Duration::from_secs(30),
        "west to import the final set",
        || {
            let w = west.status()?;
            Ok((imports_from(&w, "east") == want_n as u64).then_some(()))
        },
    )
    .unwrap();
    let fs = wait_for(
        Duration::from_secs(30),
        "federator caught up with east",
        || {
            let c = f.cluster_status("east")?;
            Ok((c["exports"] == want_n as u64 && c["connected"] == true).then_some(c))
        },
    )
    .unwrap();
    println!(
        "after the storm: east acked export version {}",
        fs["exports_acked_version"]
    );
    // Resume without a full resend: the federator's stored version always matched what east
    // had acknowledged, so east never had to fall back to a full set after reconnecting.
    assert_resumed_without_full_resend(&mut east);
}

#[test]
fn agent_restarted_while_the_federator_is_down_serves_its_last_imports() {
    let mut f = Federation::start("5s").unwrap();
    let mut east = f
        .add_cluster("east", "net-east", "us-east1/us-east1-b", SHOP)
        .unwrap();
    let mut west = f
        .add_cluster("west", "net-west", "us-west1/us-west1-a", "services: []\n")
        .unwrap();
    wait_for(Duration::from_secs(15), "west imports east", || {
        Ok((imports_from(&west.status()?, "east") == 1).then_some(()))
    })
    .unwrap();

    let acked = f.cluster_status("east").unwrap()["exports_acked_version"].clone();
    assert!(acked.as_u64().unwrap() >= 1, "{acked}");
    f.federator.kill9();
    west.agent().unwrap().kill9();
    f.start_agent(&mut west).unwrap();
    // A restarted agent reports the version the federator acknowledged (stored), not 0, and
    // that it has not heard from the federator since it started.
    east.agent().unwrap().kill9();
    f.start_agent(&mut east).unwrap();
    let s = east.status().unwrap();
    assert_eq!(s["exports_acked_version"], acked, "{s}");
    assert!(s["federator_last_heard_ms"].is_null(), "{s}");
    // Peers restored from the cache: their heartbeat age is unknown, not a stale figure.
    assert!(
        peer(&s, "west").unwrap()["last_heartbeat_age_ms"].is_null(),
        "{s}"
    );
    let (_, text, _) = meshfed(&["status", "--admin", &east.admin]).unwrap();
    assert!(
        text.contains("the federator was last heard from never since this agent started"),
        "{text}"
    );
    // At once, with no federator: the imports come from west's cache.
    let s = west.status().unwrap();
    assert_eq!(s["connected"], false);
    assert_eq!(
        imports_from(&s, "east"),
        1,
        "static stability: last-known imports served at once"
    );
    assert!(peer(&s, "east").is_some());
    let (code, _) = status(&west.admin).unwrap();
    assert_eq!(code, 1, "not connected is a problem that status reports");

    f.federator.start().unwrap();
    wait_for(Duration::from_secs(30), "west reconnects", || {
        Ok((west.status()?["connected"] == true).then_some(()))
    })
    .unwrap();
    assert_eq!(imports_from(&west.status().unwrap(), "east"), 1);
}

#[test]
fn a_broken_registry_is_reported_with_its_location_and_the_last_good_one_kept() {
    let f = Federation::start("5s").unwrap();
    let east = f
        .add_cluster("east", "net-east", "us-east1/us-east1-b", SHOP)
        .unwrap();
    let west = f
        .add_cluster("west", "net-west", "us-west1/us-west1-a", "services: []\n")
        .unwrap();
    wait_for(Duration::from_secs(15), "west imports east", || {
        Ok((imports_from(&west.status()?, "east") == 1).then_some(()))
    })
    .unwrap();

    east.write_registry(
        "services:\n  - namespace: shop\n    name: payment\n    ports: [{port: 99999}]\n",
    )
    .unwrap();
    let err = wait_for(Duration::from_secs(10), "the registry error", || {
        Ok(east.status()?["registry_error"]
            .as_str()
            .map(str::to_string))
    })
    .unwrap();
    let file = east.registry.display().to_string();
    assert!(err.starts_with(&format!("{file}:4:")), "{err}");
    assert!(err.contains("99999"), "{err}");
    let (code, _) = status(&east.admin).unwrap();
    assert_eq!(code, 1, "a broken registry is a problem");
    // The last good registry is still exported (the error above is the agent's verdict on the
    // broken file: it refused it, so nothing of it is in flight).
    assert_eq!(imports_from(&west.status().unwrap(), "east"), 1);
    assert_eq!(f.cluster_status("east").unwrap()["exports"], 2);

    // Fixing the file clears the error and the change flows.
    east.write_registry(&registry_yaml("svc", 3, 8080, ""))
        .unwrap();
    wait_for(Duration::from_secs(10), "the fixed registry", || {
        let e = east.status()?;
        let w = west.status()?;
        Ok((e["registry_error"].is_null() && imports_from(&w, "east") == 3).then_some(()))
    })
    .unwrap();
}

/// `meshfed join --if-not-joined` (the Kubernetes init container's form) is a no-op for a
/// cluster that already joined and does not spend a token; another cluster's name is refused.
#[test]
fn join_if_not_joined_is_idempotent_and_spends_no_token() {
    let f = Federation::start("30s").unwrap();
    let east = f
        .add_cluster("east", "net1", "us-east1/us-east1-b", "services: []\n")
        .unwrap();
    let token = f.token("east").unwrap();
    let join = |cluster: &str| {
        meshfed(&[
            "join",
            "--if-not-joined",
            "--token",
            &token,
            "--state-dir",
            east.dir.to_str().unwrap(),
            "--cluster",
            cluster,
            "--network",
            "net1",
            "--trust-domain",
            "east.mesh",
            "--locality",
            "us-east1/us-east1-b",
        ])
        .unwrap()
    };
    let (code, out, err) = join("east");
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("already joined as spiffe://"), "{out}");
    let (code, _, err) = join("west");
    assert_ne!(code, 0);
    assert!(
        err.contains("holds the identity of cluster \"east\""),
        "{err}"
    );
    // The token was never used: the federator lists it as valid (east's first token as used).
    let list = meshfed_ok(&[
        "federator",
        "token",
        "list",
        "--state-dir",
        f.state_dir().to_str().unwrap(),
    ])
    .unwrap();
    let states: Vec<&str> = list
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert_eq!(states.iter().filter(|s| **s == "used").count(), 1, "{list}");
    assert_eq!(
        states.iter().filter(|s| **s == "valid").count(),
        1,
        "{list}"
    );
}

/// An operator works a running federator through its admin API with an admin identity made
/// from the state directory: a token created and listed through it, and a cluster whose agent
/// is gone (killed) evicted: its exports and peer entry leave every importer, `meshfed status`
/// names who evicted it and why, and it cannot be evicted twice. Bad uses are named.
#[test]
fn an_operator_evicts_a_dead_cluster_through_the_admin_api() {
    let f = Federation::start("3s").unwrap();
    let ops = f.root.path().join("ops");
    let state_dir = f.state_dir();
    let out = meshfed_ok(&[
        "federator",
        "admin-identity",
        "--state-dir",
        state_dir.to_str().unwrap(),
        "--name",
        "ops",
        "--ttl",
        "1h",
        "--out",
        ops.to_str().unwrap(),
    ])
    .unwrap();
    assert!(out.contains("/admin/ops in"), "{out}");
    assert!(
        out.contains(&f.grpc),
        "names the federator it was made for: {out}"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(ops.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the admin key is private");
    }
    let ops = ops.to_str().unwrap();
    let mut east = f
        .add_cluster("east", "net-east", "us-east1/us-east1-b", SHOP)
        .unwrap();
    let west = f
        .add_cluster("west", "net-west", "us-west1/us-west1-a", "services: []\n")
        .unwrap();
    wait_for(Duration::from_secs(15), "east's payment at west", || {
        Ok((imports_from(&west.status()?, "east") == 1).then_some(()))
    })
    .unwrap();

    let token = meshfed_ok(&[
        "federator",
        "token",
        "create",
        "--admin-identity",
        ops,
        "--cluster",
        "north",
    ])
    .unwrap();
    assert!(token.trim().starts_with("mft1."), "{token}");
    let list = meshfed_ok(&["federator", "token", "list", "--admin-identity", ops]).unwrap();
    assert!(
        list.lines()
            .any(|l| l.contains("north") && l.contains("valid")),
        "{list}"
    );
    assert!(
        list.lines()
            .any(|l| l.contains("east") && l.contains("used")),
        "{list}"
    );

    // East's agent dies and does not come back: it cannot leave by itself.
    east.agent().unwrap().kill9();
    let out = meshfed_ok(&[
        "federator",
        "evict",
        "east",
        "--admin-identity",
        ops,
        "--reason",
        "region decommissioned",
    ])
    .unwrap();
    assert!(out.contains("evicted cluster east"), "{out}");
    wait_for(Duration::from_secs(15), "east gone from west", || {
        let w = west.status()?;
        Ok((imports_from(&w, "east") == 0 && peer(&w, "east").is_none()).then_some(()))
    })
    .unwrap();
    let (code, text, _) = meshfed(&["status", "--admin", &f.admin]).unwrap();
    assert_eq!(code, 0, "an evicted cluster is not a problem: {text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("east: evicted by ops at ")
                && l.ends_with(": region decommissioned")),
        "{text}"
    );
    let (code, _, err) = meshfed(&["federator", "evict", "east", "--admin-identity", ops]).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("cluster east has already left"), "{err}");

    // A cluster's state directory is not an admin identity; evict needs one.
    let (code, _, err) = meshfed(&[
        "federator",
        "evict",
        "west",
        "--admin-identity",
        west.dir.to_str().unwrap(),
    ])
    .unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("admin.json not found"), "{err}");
    let (code, _, err) = meshfed(&["federator", "evict", "west"]).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("--admin-identity"), "{err}");
    assert_eq!(
        f.cluster_status("west").unwrap()["lease"],
        "fresh",
        "west untouched"
    );
}
