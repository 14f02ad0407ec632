//! Rotating the federation CA's root (issue 13): `meshfed ca rotate start --ca
//! <federator state>/ca` while two clusters are members. The new root reaches both agents (their
//! `identity/federation-bundle.json` and the live verifier of the federator) before it signs;
//! once it signs, the federator's certificate and both cluster certificates renew onto it
//! without a re-join; the old root leaves after the last certificate it signed expired (6 s
//! certificates here). Exports keep flowing throughout; a token made after the rotation joins a
//! third cluster, and one made before it, pinned to the old root, no longer does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use chaos::*;
use rustls_pki_types::CertificateDer;
use trust::tls::{Authorizer, PeerRole, SpiffeVerifier};
use trust::{BundleSet, Svid, TrustBundle, TrustDomain, TrustStore};

fn registry(services: &[&str]) -> String {
    let mut y = String::from("services:\n");
    for s in services {
        y.push_str(&format!(
            "  - namespace: shop\n    name: {s}\n    export: true\n    ports: [{{name: http, port: 8080}}]\n    endpoints: [{{address: 10.1.0.5}}]\n"
        ));
    }
    y
}

fn federation_bundle(cluster_dir: &Path) -> TrustBundle {
    let text =
        std::fs::read_to_string(cluster_dir.join("identity/federation-bundle.json")).unwrap();
    TrustBundle::from_json(
        TrustDomain::new("federation.meshfed").unwrap(),
        &text,
        "federation bundle",
    )
    .unwrap()
}

/// Whether the cluster certificate in `cluster_dir` chains to `root` alone. The agent writes
/// the chain and the key as two files, one after the other, so a read between the two sees a
/// new chain with the old key: that counts as "not yet" (callers poll), not as a failure.
fn chains_to(cluster_dir: &Path, root: &CertificateDer<'static>) -> bool {
    let Ok((svid, _)) = Svid::load(&cluster_dir.join("identity")) else {
        return false;
    };
    let mut set = BundleSet::new();
    let mut b = federation_bundle(cluster_dir);
    b.x509_authorities = vec![root.clone()];
    set.insert(b).unwrap();
    SpiffeVerifier::new(TrustStore::new(set), Authorizer::id(svid.id.clone()))
        .verify(
            &svid.chain[0],
            &svid.chain[1..],
            rustls_pki_types::UnixTime::now(),
            PeerRole::Client,
        )
        .is_ok()
}

#[test]
fn the_federation_root_rotates_without_a_rejoin() {
    let f = Federation::start_with(
        "5s",
        None,
        &["--cluster-cert-ttl", "6s", "--serving-cert-ttl", "6s"],
    )
    .unwrap();
    let east = f
        .add_cluster(
            "east",
            "net-e",
            "us-east1/us-east1-b",
            &registry(&["ledger"]),
        )
        .unwrap();
    let west = f
        .add_cluster("west", "net-w", "us-west1/us-west1-a", &registry(&[]))
        .unwrap();
    wait_for(Duration::from_secs(20), "west imports ledger", || {
        Ok((west.status()?["imports"]["east"].as_u64() == Some(1)).then_some(()))
    })
    .unwrap();
    let old = federation_bundle(&east.dir);
    assert_eq!(old.x509_authorities.len(), 1);
    let old_root = old.x509_authorities[0].clone();
    let old_token = f.token("north").unwrap();
    let identity_before = std::fs::read(east.dir.join("identity/identity.json")).unwrap();

    let ca = f.state_dir().join("ca");
    meshfed_ok(&[
        "ca",
        "rotate",
        "start",
        "--ca",
        ca.to_str().unwrap(),
        "--publish-lead",
        "1s",
    ])
    .unwrap();

    // Both members hold the new root before it signs.
    let mut new_root = None;
    wait_for(
        Duration::from_secs(20),
        "both members hold bundle 2",
        || {
            let (e, w) = (federation_bundle(&east.dir), federation_bundle(&west.dir));
            Ok(
                (e.sequence == Some(2) && w.sequence == Some(2) && e.x509_authorities.len() == 2)
                    .then_some(()),
            )
        },
    )
    .unwrap();
    let both = federation_bundle(&east.dir);
    new_root.get_or_insert_with(|| {
        both.x509_authorities
            .iter()
            .find(|r| **r != old_root)
            .unwrap()
            .clone()
    });
    let new_root = new_root.unwrap();

    // The new root signs; both cluster certificates move onto it (no join).
    wait_for(
        Duration::from_secs(30),
        "both cluster certificates chained to the new root",
        || Ok((chains_to(&east.dir, &new_root) && chains_to(&west.dir, &new_root)).then_some(())),
    )
    .unwrap();
    let (_, fs) = f.status().unwrap();
    let states: Vec<&str> = fs["federation_ca"]["generations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["state"].as_str())
        .collect();
    assert!(states.contains(&"active"), "{fs}");

    // The old root leaves once what it signed has expired: bundle 3 with the new root only.
    wait_for(
        Duration::from_secs(30),
        "both members hold bundle 3",
        || {
            let (e, w) = (federation_bundle(&east.dir), federation_bundle(&west.dir));
            Ok((e.sequence == Some(3)
                && w.sequence == Some(3)
                && e.x509_authorities == vec![new_root.clone()])
            .then_some(()))
        },
    )
    .unwrap();

    // The federation kept working: a new export reaches west; nobody re-joined.
    east.write_registry(&registry(&["ledger", "audit"]))
        .unwrap();
    wait_for(Duration::from_secs(20), "west imports audit", || {
        Ok((west.status()?["imports"]["east"].as_u64() == Some(2)).then_some(()))
    })
    .unwrap();
    assert_eq!(
        std::fs::read(east.dir.join("identity/identity.json")).unwrap(),
        identity_before
    );
    let (code, fs) = f.status().unwrap();
    assert_eq!(code, 0, "{fs}");
    assert_eq!(fs["federation_ca"]["bundle_sequence"], 3, "{fs}");

    // A token made before the rotation pins the old root, which the federator no longer
    // presents: the join is refused. A new token joins.
    let d = tempfile::tempdir().unwrap();
    let (code, _, err) = meshfed(&[
        "join",
        "--token",
        &old_token,
        "--state-dir",
        d.path().join("north").to_str().unwrap(),
        "--cluster",
        "north",
        "--network",
        "net-n",
        "--trust-domain",
        "north.mesh",
        "--locality",
        "eu-north1/eu-north1-a",
    ])
    .unwrap();
    assert_ne!(code, 0, "{err}");
    let south = f
        .add_cluster("south", "net-s", "eu-south1/eu-south1-a", &registry(&[]))
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "south imports east's services",
        || Ok((south.status()?["imports"]["east"].as_u64() == Some(2)).then_some(())),
    )
    .unwrap();
    wait_for(
        Duration::from_secs(20),
        "south's certificate chains to the new root",
        || Ok(chains_to(&south.dir, &new_root).then_some(())),
    )
    .unwrap();
}

/// The way back for a cluster whose certificate expired while its agent was down: the agent
/// says so in `meshfed status` (with the command to run), and `meshfed join --rejoin` with a
/// new token brings it back as the same cluster, keeping its CA and trust domain; the
/// Kubernetes init container's `--if-not-joined` does the same by itself.
#[test]
fn an_expired_cluster_certificate_comes_back_with_rejoin() {
    let f = Federation::start_with("5s", None, &["--cluster-cert-ttl", "4s"]).unwrap();
    let mut east = f
        .add_cluster(
            "east",
            "net-e",
            "us-east1/us-east1-b",
            &registry(&["ledger"]),
        )
        .unwrap();
    let west = f
        .add_cluster("west", "net-w", "us-west1/us-west1-a", &registry(&[]))
        .unwrap();
    wait_for(Duration::from_secs(20), "west imports ledger", || {
        Ok((west.status()?["imports"]["east"].as_u64() == Some(1)).then_some(()))
    })
    .unwrap();
    let ca_before = std::fs::read(east.dir.join("ca/root-cert.pem")).unwrap();
    // east's agent is down until its certificate has expired.
    east.agent().unwrap().kill9();
    let (svid, _) = Svid::load(&east.dir.join("identity")).unwrap();
    wait_for(
        Duration::from_secs(20),
        "east's certificate to expire",
        // Certificate times have one-second precision: wait until it is past by a margin.
        || {
            Ok(
                (svid.not_after + time::Duration::seconds(2) < time::OffsetDateTime::now_utc())
                    .then_some(()),
            )
        },
    )
    .unwrap();
    east.agent().unwrap().start().unwrap();
    let problem = wait_for(
        Duration::from_secs(20),
        "east's agent to report the expiry",
        || {
            let s = east.status()?;
            Ok((s["cluster_cert_expired"] == true && s["connected"] == false).then_some(s))
        },
    )
    .unwrap_or_else(|e| {
        let log = east.agent().map(|a| a.log()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        panic!("{e:#}\n{}", tail.join("\n"))
    });
    let (code, out, _) = meshfed(&["status", "--admin", &east.admin]).unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("meshfed join --rejoin"), "{out}\n{problem}");

    // Without --rejoin, join refuses and says how.
    let token = f.token("east").unwrap();
    let east_dir = east.dir.to_str().unwrap().to_string();
    let join = |extra: &[&str], token: &str| {
        let dir = east_dir.clone();
        let mut a = vec![
            "join",
            "--token",
            token,
            "--state-dir",
            &dir,
            "--cluster",
            "east",
            "--network",
            "net-e",
            "--trust-domain",
            "east.mesh",
            "--locality",
            "us-east1/us-east1-b",
        ];
        a.extend_from_slice(extra);
        meshfed(&a).unwrap()
    };
    let (code, _, err) = join(&[], &token);
    assert_ne!(code, 0);
    assert!(err.contains("--rejoin"), "{err}");
    east.agent().unwrap().kill9();
    let (code, out, err) = join(&["--rejoin"], &token);
    assert_eq!(code, 0, "{out}{err}");
    east.agent().unwrap().start().unwrap();
    wait_for(Duration::from_secs(20), "east connected again", || {
        let s = east.status()?;
        Ok((s["connected"] == true && s["cluster_cert_expired"] == false).then_some(()))
    })
    .unwrap();
    assert_eq!(
        std::fs::read(east.dir.join("ca/root-cert.pem")).unwrap(),
        ca_before
    );
    east.write_registry(&registry(&["ledger", "audit"]))
        .unwrap();
    wait_for(Duration::from_secs(20), "west imports audit", || {
        Ok((west.status()?["imports"]["east"].as_u64() == Some(2)).then_some(()))
    })
    .unwrap();

    // The init container's way: --if-not-joined joins again when the certificate expired.
    east.agent().unwrap().kill9();
    let (svid, _) = Svid::load(&east.dir.join("identity")).unwrap();
    wait_for(
        Duration::from_secs(20),
        "east's certificate to expire again",
        // Certificate times have one-second precision: wait until it is past by a margin.
        || {
            Ok(
                (svid.not_after + time::Duration::seconds(2) < time::OffsetDateTime::now_utc())
                    .then_some(()),
            )
        },
    )
    .unwrap();
    let token = f.token("east").unwrap();
    let (code, out, err) = join(&["--if-not-joined"], &token);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("expired"), "{err}");
    east.agent().unwrap().start().unwrap();
    wait_for(Duration::from_secs(20), "east connected once more", || {
        Ok((east.status()?["connected"] == true).then_some(()))
    })
    .unwrap();
}
