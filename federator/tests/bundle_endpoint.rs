//! The SPIFFE bundle endpoint (https_spiffe profile) with third-party and meshfed clients:
//! openssl reads the bundle verifying the endpoint against the trust domain's root; `meshfed
//! bundle fetch` authenticates it by SPIFFE ID against a held bundle, and refuses an endpoint
//! with another ID or one that does not chain to the held bundle.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::Stdio;

use common::*;

const AGENT_ID: &str = "spiffe://east.mesh/ns/meshfed-system/sa/meshfed-agent";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundle_endpoint_serves_the_bundle_to_openssl_and_meshfed_and_is_authenticated() {
    let d = tempfile::tempdir().unwrap();
    let (ca, west_ca, svid) = (
        d.path().join("ca"),
        d.path().join("west-ca"),
        d.path().join("svid"),
    );
    ca_init(&ca, "east.mesh");
    ca_init(&west_ca, "west.mesh");
    ca_issue(&ca, AGENT_ID, &svid);
    let bundle = ok(meshfed().args(["bundle", "show", "--ca", ca.to_str().unwrap()])).stdout;
    let west_bundle =
        ok(meshfed().args(["bundle", "show", "--ca", west_ca.to_str().unwrap()])).stdout;
    let (held, west_held) = (d.path().join("east.json"), d.path().join("west.json"));
    std::fs::write(&held, &bundle).unwrap();
    std::fs::write(&west_held, &west_bundle).unwrap();

    let (s, _) = trust::Svid::load(&svid).unwrap();
    let tls =
        trust::tls::server_config_no_client(trust::tls::SvidResolver::with(&s).unwrap()).unwrap();
    let tasks = meshfed_net::drain::Tasks::new();
    let (_tx, rx) = tokio::sync::watch::channel(bundle.trim().to_string());
    let addr = meshfed_net::bundle_endpoint::serve(&tasks, "127.0.0.1:0".parse().unwrap(), tls, rx)
        .await
        .unwrap();
    let url = format!("https://127.0.0.1:{}/", addr.port());

    let (ca2, url2, held2, west2) = (ca.clone(), url.clone(), held.clone(), west_held.clone());
    tokio::task::spawn_blocking(move || {
        // openssl as the third-party client: chain verified against east's root.
        let mut c = openssl()
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{}", addr.port()),
                "-CAfile",
                ca2.join("root-cert.pem").to_str().unwrap(),
                "-verify_return_error",
                "-alpn",
                "http/1.1",
                "-ign_eof",
                "-quiet",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin
            .take()
            .unwrap()
            .write_all(b"GET / HTTP/1.1\r\nHost: east\r\nConnection: close\r\n\r\n")
            .unwrap();
        let o = c.wait_with_output().unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            out.starts_with("HTTP/1.1 200") && out.contains("application/json"),
            "{out}"
        );
        let body = out.split("\r\n\r\n").nth(1).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(body).unwrap(),
            serde_json::from_str::<serde_json::Value>(&bundle).unwrap()
        );

        // meshfed: authenticated by SPIFFE ID against the held bundle; prints the bundle.
        let r = ok(meshfed().args([
            "bundle",
            "fetch",
            &url2,
            "--endpoint-spiffe-id",
            AGENT_ID,
            "--trust-bundle",
            held2.to_str().unwrap(),
        ]));
        let got: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        let want: serde_json::Value = serde_json::from_str(&bundle).unwrap();
        assert_eq!(got["keys"], want["keys"]);
        assert!(r.stderr.contains("bundle of east.mesh"), "{}", r.stderr);

        // Another endpoint ID: refused, naming what was presented and expected.
        let r = run(meshfed().args([
            "bundle",
            "fetch",
            &url2,
            "--endpoint-spiffe-id",
            "spiffe://east.mesh/ns/other/sa/bundle",
            "--trust-bundle",
            held2.to_str().unwrap(),
        ]));
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(
            r.stderr.contains("TLS handshake failed") && r.stderr.contains(&url2),
            "{}",
            r.stderr
        );
        // A held bundle that the endpoint does not chain to (west's, for an east ID): refused.
        let r = run(meshfed().args([
            "bundle",
            "fetch",
            &url2,
            "--endpoint-spiffe-id",
            AGENT_ID,
            "--trust-bundle",
            west2.to_str().unwrap(),
        ]));
        assert_eq!(r.code, 2, "{}", r.stderr);
        // Not an https URL: refused before connecting.
        let r = run(meshfed().args([
            "bundle",
            "fetch",
            "http://127.0.0.1:1/",
            "--endpoint-spiffe-id",
            AGENT_ID,
            "--trust-bundle",
            held2.to_str().unwrap(),
        ]));
        assert!(r.stderr.contains("https://host"), "{}", r.stderr);
    })
    .await
    .unwrap();
    let report = tasks.drain(std::time::Duration::from_secs(5)).await;
    assert!(report.aborted.is_empty(), "{report}");
}
