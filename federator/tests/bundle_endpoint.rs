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

/// Makes a Web PKI CA (`<name>-ca.pem`) and a server certificate for `san` signed by it
/// (`<name>.pem`, `<name>.key`) with openssl, as a public CA or cert-manager would issue one.
fn web_pki(dir: &std::path::Path, name: &str, san: &str) {
    let p = |f: &str| dir.join(f).to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let o = openssl().args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "1",
        "-subj",
        &format!("/CN={name} web CA"),
        "-keyout",
        &p(&format!("{name}-ca.key")),
        "-out",
        &p(&format!("{name}-ca.pem")),
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        "/CN=bundles",
        "-keyout",
        &p(&format!("{name}.key")),
        "-out",
        &p(&format!("{name}.csr")),
    ]);
    std::fs::write(
        dir.join(format!("{name}.ext")),
        format!("subjectAltName={san}\nextendedKeyUsage=serverAuth\n"),
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        &p(&format!("{name}.csr")),
        "-CA",
        &p(&format!("{name}-ca.pem")),
        "-CAkey",
        &p(&format!("{name}-ca.key")),
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        &p(&format!("{name}.ext")),
        "-out",
        &p(&format!("{name}.pem")),
    ]);
}

/// The `https_web` profile: the endpoint presents a Web PKI certificate; curl (the third-party
/// client) and `meshfed bundle fetch --ca-file` check it as any HTTPS server, by chain and host
/// name; a renewed certificate written over the files is served without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_https_web_profile_serves_a_web_pki_certificate_and_reloads_it() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("ca");
    ca_init(&ca, "east.mesh");
    let bundle = ok(meshfed().args(["bundle", "show", "--ca", ca.to_str().unwrap()])).stdout;
    web_pki(d.path(), "web", "DNS:localhost,IP:127.0.0.1");
    web_pki(d.path(), "other", "DNS:bundles.example.com");
    let (cert, key) = (d.path().join("web.pem"), d.path().join("web.key"));
    // A key that is not the certificate's is refused at load, naming both files.
    let e = meshfed_net::bundle_endpoint::WebCert::load(&cert, &d.path().join("other.key"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("other.key") && e.contains("web.pem"), "{e}");
    let web = meshfed_net::bundle_endpoint::WebCert::load(&cert, &key).unwrap();
    let tasks = meshfed_net::drain::Tasks::new();
    web.watch(&tasks, std::time::Duration::from_millis(50));
    let (_tx, rx) = tokio::sync::watch::channel(bundle.trim().to_string());
    let addr = meshfed_net::bundle_endpoint::serve(
        &tasks,
        "127.0.0.1:0".parse().unwrap(),
        web.server_config().unwrap(),
        rx,
    )
    .await
    .unwrap();
    let url = format!("https://localhost:{}/", addr.port());
    let dir = d.path().to_path_buf();
    let want: serde_json::Value = serde_json::from_str(&bundle).unwrap();
    tokio::task::spawn_blocking(move || {
        let curl = |cafile: &str, url: &str| {
            std::process::Command::new("curl")
                .args(["-sS", "--fail", "--cacert", cafile, url])
                .output()
                .expect("curl is required; scripts/test installs it")
        };
        let web_ca = dir.join("web-ca.pem").to_str().unwrap().to_string();
        let o = curl(&web_ca, &url);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(got["keys"], want["keys"]);
        // curl refuses it against another CA.
        let o = curl(dir.join("other-ca.pem").to_str().unwrap(), &url);
        assert!(!o.status.success());

        // meshfed's fetcher: accepted by the web CA and the host name.
        let out = ok(meshfed().args([
            "bundle",
            "fetch",
            &url,
            "--trust-domain",
            "east.mesh",
            "--ca-file",
            &web_ca,
        ]));
        let got: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(got["keys"], want["keys"]);
        assert!(out.stderr.contains("https_web"), "{}", out.stderr);
        // Another CA: refused, naming the URL.
        let r = run(meshfed().args([
            "bundle",
            "fetch",
            &url,
            "--trust-domain",
            "east.mesh",
            "--ca-file",
            dir.join("other-ca.pem").to_str().unwrap(),
        ]));
        assert_ne!(r.code, 0);
        assert!(r.stderr.contains(&url), "{}", r.stderr);
        // --trust-domain is needed to know what the body must be a bundle of.
        let r = run(meshfed().args(["bundle", "fetch", &url, "--ca-file", &web_ca]));
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains("--trust-domain"), "{}", r.stderr);

        // A renewed certificate (for a name this URL does not use) is written over the files:
        // the endpoint serves it without a restart, so the same fetch now fails on the name.
        std::fs::copy(dir.join("other.pem"), dir.join("web.pem")).unwrap();
        std::fs::copy(dir.join("other.key"), dir.join("web.key")).unwrap();
        let other_ca = dir.join("other-ca.pem").to_str().unwrap().to_string();
        let mut seen = String::new();
        for _ in 0..200 {
            let r = run(meshfed().args([
                "bundle",
                "fetch",
                &url,
                "--trust-domain",
                "east.mesh",
                "--ca-file",
                &other_ca,
            ]));
            seen = r.stderr.clone();
            if seen.to_lowercase().contains("notvalidforname")
                || seen.to_lowercase().contains("not valid for name")
            {
                break;
            }
            std::thread::yield_now();
        }
        assert!(
            seen.to_lowercase().contains("valid for name"),
            "the reloaded certificate (bundles.example.com) is served: {seen}"
        );
    })
    .await
    .unwrap();
}
