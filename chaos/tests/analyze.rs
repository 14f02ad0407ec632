//! `meshfed analyze` against a running federation: nothing on a clean one; then each seeded
//! problem found with its code (a stale member, an export conflict, an export to a cluster
//! that is not a member, a stale peer seen by an agent, a policy with failover and no health
//! signal), exit 1 on errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use chaos::*;

fn analyze(args: &[&str]) -> (i32, serde_json::Value, String) {
    let mut all = vec!["analyze", "-o", "json"];
    all.extend_from_slice(args);
    let (code, out, err) = meshfed(&all).unwrap();
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    (code, v, err)
}

fn codes(v: &serde_json::Value) -> Vec<(String, String)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["code"].as_str().unwrap().to_string(),
                f["object"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn analyze_finds_each_seeded_problem_and_nothing_on_a_clean_federation() {
    let f = Federation::start("3s").unwrap();
    let dir = f.root.path().to_path_buf();
    let dup = |port: u16| {
        format!("  - {{namespace: shop, name: dup, ports: [{{name: grpc, port: {port}}}], export: true, endpoints: [{{address: 10.9.0.1}}]}}\n")
    };
    let east = f
        .add_cluster(
            "east",
            "net1",
            "us-east1/us-east1-b",
            &registry_yaml("pay", 1, 8080, ""),
        )
        .unwrap();
    let mut west = f
        .add_cluster(
            "west",
            "net1",
            "us-west1/us-west1-a",
            &registry_yaml("ledger", 1, 8081, ""),
        )
        .unwrap();
    wait_for(
        Duration::from_secs(20),
        "east and west import each other",
        || {
            let s = east.status()?;
            Ok(
                (s["imports"]["west"].as_u64() == Some(1) && east.has_bundle_of("west")?)
                    .then_some(()),
            )
        },
    )
    .unwrap();
    // Clean: nothing to say, exit 0.
    let clean_policy = dir.join("clean.yaml");
    std::fs::write(
        &clean_policy,
        "apiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: pay, namespace: shop}\nspec:\n  host: pay-0.shop.svc.cluster.local\n  failover: [{from: us-east1, to: us-west1}]\n  outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 10s}\n",
    )
    .unwrap();
    let (code, v, err) = analyze(&[
        "--federator",
        &f.admin,
        "--agent",
        &east.admin,
        "--agent",
        &west.admin,
        "--policy",
        clean_policy.to_str().unwrap(),
    ]);
    assert_eq!((code, v.clone()), (0, serde_json::json!([])), "{v}{err}");

    // Seeded: west exports dup with another port than east (a conflict at west, the newer);
    // east exports to a cluster that is not a member; a policy with no health signal; then
    // west dies.
    east.write_registry(&format!(
        "{}{}",
        registry_yaml("pay", 1, 8080, ""),
        dup(9000)
    ))
    .unwrap();
    wait_for(
        Duration::from_secs(20),
        "dup from east at the federator",
        || {
            let s = east.status()?;
            Ok((s["exports_acked_version"].as_u64() >= Some(2)).then_some(()))
        },
    )
    .unwrap();
    west.write_registry(&format!(
        "{}{}",
        registry_yaml("ledger", 1, 8081, ""),
        dup(9001)
    ))
    .unwrap();
    east.write_registry(&format!(
        "{}{}  - {{namespace: shop, name: only-mars, ports: [{{name: grpc, port: 7000}}], exportTo: [mars], endpoints: [{{address: 10.9.0.2}}]}}\n",
        registry_yaml("pay", 1, 8080, ""),
        dup(9000)
    ))
    .unwrap();
    let risky = dir.join("risky.yaml");
    std::fs::write(
        &risky,
        "apiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: pay, namespace: shop}\nspec:\n  host: pay-0.shop.svc.cluster.local\n  failover: [{from: us-east1, to: us-west1}]\n  allowWithoutHealthSignal: true\n",
    )
    .unwrap();
    wait_for(
        Duration::from_secs(20),
        "the conflict and the warning",
        || {
            let (_, v, _) = analyze(&["--federator", &f.admin, "--agent", &east.admin]);
            let c = codes(&v);
            Ok(
                (c.iter().any(|(k, _)| k == "MF103") && c.iter().any(|(k, _)| k == "MF205"))
                    .then_some(c),
            )
        },
    )
    .unwrap();
    west.agent().unwrap().kill9();
    let (code, v) = wait_for(Duration::from_secs(20), "west stale everywhere", || {
        let (code, v, _) = analyze(&[
            "--federator",
            &f.admin,
            "--agent",
            &east.admin,
            "--policy",
            risky.to_str().unwrap(),
        ]);
        let c = codes(&v);
        Ok(
            (c.iter().any(|(k, _)| k == "MF101") && c.iter().any(|(k, _)| k == "MF204"))
                .then_some((code, v)),
        )
    })
    .unwrap();
    let found = codes(&v);
    println!("{found:?}");
    for (want, object) in [
        ("MF101", "cluster west".to_string()),
        ("MF103", "cluster west".to_string()),
        ("MF204", "cluster east (peer west)".to_string()),
        ("MF205", "cluster east".to_string()),
    ] {
        assert!(
            found.iter().any(|(k, o)| k == want && *o == object),
            "{want} on {object}: {v}"
        );
    }
    let risky_at = found
        .iter()
        .find(|(k, _)| k == "MF301")
        .map(|(_, o)| o.clone())
        .unwrap_or_else(|| panic!("MF301: {v}"));
    assert!(risky_at.contains("risky.yaml:"), "{risky_at}");
    assert_eq!(code, 1, "errors make the exit code 1");
    // Every finding says how to fix it.
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .all(|f| !f["fix"].as_str().unwrap().is_empty()));
    // Bad input: named, exit 2 or 1 with the reason.
    let (code, _, err) = meshfed(&["analyze"]).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("name what to analyze"), "{err}");
    let (code, _, err) = meshfed(&["analyze", "--federator", &east.admin]).unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("not a federator's status"), "{err}");
}
