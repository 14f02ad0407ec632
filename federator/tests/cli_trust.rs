//! `meshfed ca` and `meshfed bundle`: what they write, and a clear one-line error with exit
//! code 2 for every kind of bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;

#[test]
fn init_issue_show_verify() {
    let d = tempfile::tempdir().unwrap();
    let ca = d.path().join("east");
    let r = ok(meshfed()
        .args(["ca", "init", "--trust-domain", "east.mesh", "--out"])
        .arg(&ca));
    assert!(
        r.stdout.contains("trust domain:  east.mesh") && r.stdout.contains("sha256:"),
        "{}",
        r.stdout
    );
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        assert!(ca.join(f).is_file(), "{f} missing");
    }
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ca.join("ca-key.pem")), 0o600);

    let out = d.path().join("pay");
    let r = ok(meshfed()
        .args(["ca", "issue", "--ca"])
        .arg(&ca)
        .args([
            "--spiffe-id",
            "spiffe://east.mesh/ns/shop/sa/payment",
            "--ttl",
            "2h",
            "--out",
        ])
        .arg(&out));
    assert!(
        r.stdout
            .contains("issued:   spiffe://east.mesh/ns/shop/sa/payment"),
        "{}",
        r.stdout
    );
    assert_eq!(mode(&out.join("key.pem")), 0o600);
    let key = std::fs::read_to_string(out.join("key.pem")).unwrap();
    assert!(
        key.starts_with("-----BEGIN PRIVATE KEY-----"),
        "key.pem must be PKCS#8"
    );
    assert!(!r.stdout.contains("PRIVATE KEY") && !r.stderr.contains("PRIVATE KEY"));
    let chain = std::fs::read_to_string(out.join("cert-chain.pem")).unwrap();
    assert_eq!(
        chain.matches("BEGIN CERTIFICATE").count(),
        2,
        "leaf then intermediate"
    );

    let bundle = d.path().join("bundle.json");
    let r = ok(meshfed().args(["bundle", "show", "--ca"]).arg(&ca));
    std::fs::write(&bundle, &r.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["keys"][0]["use"], "x509-svid");

    let r = ok(meshfed()
        .args(["bundle", "verify", "--bundle"])
        .arg(&bundle)
        .arg("--cert")
        .arg(out.join("cert-chain.pem")));
    assert!(
        r.stdout
            .starts_with("valid: spiffe://east.mesh/ns/shop/sa/payment"),
        "{}",
        r.stdout
    );

    // A bundle with no keys says so (issue 19), not that its roots carry no SPIFFE ID.
    let empty = d.path().join("empty.json");
    std::fs::write(&empty, r#"{"keys": []}"#).unwrap();
    let r = run(meshfed()
        .args(["bundle", "verify", "--bundle"])
        .arg(&empty)
        .arg("--cert")
        .arg(out.join("cert-chain.pem")));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("the bundle holds no X.509 root"),
        "{}",
        r.stderr
    );

    // A chain of another trust domain is invalid (exit 1) with the reason.
    let west = d.path().join("west");
    ca_init(&west, "west.mesh");
    let wout = d.path().join("w");
    ca_issue(&west, "spiffe://west.mesh/ns/shop/sa/order", &wout);
    let r = run(meshfed()
        .args(["bundle", "verify", "--bundle"])
        .arg(&bundle)
        .arg("--cert")
        .arg(wout.join("cert-chain.pem")));
    assert_eq!(r.code, 1);
    assert!(
        r.stdout
            .contains("no trust bundle for trust domain west.mesh"),
        "{}",
        r.stdout
    );
    // Claiming east for west's bundle: the chain leads elsewhere.
    let wb = d.path().join("west.json");
    std::fs::write(
        &wb,
        ok(meshfed().args(["bundle", "show", "--ca"]).arg(&west)).stdout,
    )
    .unwrap();
    let r = run(meshfed()
        .args([
            "bundle",
            "verify",
            "--trust-domain",
            "east.mesh",
            "--bundle",
        ])
        .arg(&wb)
        .arg("--cert")
        .arg(out.join("cert-chain.pem")));
    assert_eq!(r.code, 1);
    assert!(
        r.stdout.contains("does not lead to any root"),
        "{}",
        r.stdout
    );
}

fn bad(args: &[&str], expect: &[&str]) {
    let r = run(meshfed().args(args));
    assert_eq!(
        r.code, 2,
        "{args:?} should exit 2: {}{}",
        r.stdout, r.stderr
    );
    let line = r.stderr.lines().next().unwrap_or_default().to_string();
    for e in expect {
        assert!(
            line.contains(e),
            "{args:?}: first stderr line {line:?} should contain {e:?}"
        );
    }
}

#[test]
fn bad_input_gives_one_clear_line_and_exit_2() {
    let d = tempfile::tempdir().unwrap();
    let p = |s: &str| d.path().join(s).display().to_string();
    let ca = p("ca");
    ca_init(d.path().join("ca").as_path(), "east.mesh");

    bad(
        &[
            "ca",
            "init",
            "--trust-domain",
            "East.Mesh",
            "--out",
            &p("x"),
        ],
        &["East.Mesh", "uppercase"],
    );
    bad(
        &[
            "ca",
            "init",
            "--trust-domain",
            "east.mesh:443",
            "--out",
            &p("x"),
        ],
        &["east.mesh:443", "port"],
    );
    bad(
        &["ca", "init", "--trust-domain", "east.mesh", "--out", &ca],
        &["already holds a CA", "--force"],
    );
    bad(
        &[
            "ca",
            "issue",
            "--ca",
            &ca,
            "--spiffe-id",
            "spiffe://east.mesh/a//b",
            "--out",
            &p("o"),
        ],
        &["spiffe://east.mesh/a//b", "empty segment"],
    );
    bad(
        &[
            "ca",
            "issue",
            "--ca",
            &ca,
            "--spiffe-id",
            "http://east.mesh/a",
            "--out",
            &p("o"),
        ],
        &["spiffe://"],
    );
    bad(
        &[
            "ca",
            "issue",
            "--ca",
            &ca,
            "--spiffe-id",
            "spiffe://west.mesh/a",
            "--out",
            &p("o"),
        ],
        &["refused", "west.mesh"],
    );
    bad(
        &[
            "ca",
            "issue",
            "--ca",
            &ca,
            "--spiffe-id",
            "spiffe://east.mesh/a",
            "--ttl",
            "forever",
            "--out",
            &p("o"),
        ],
        &["forever", "duration"],
    );
    bad(
        &[
            "ca",
            "issue",
            "--ca",
            &p("missing"),
            "--spiffe-id",
            "spiffe://east.mesh/a",
            "--out",
            &p("o"),
        ],
        &["missing", "meshfed ca init"],
    );

    // Unreadable and malformed files.
    std::fs::write(p("garbage.pem"), "not pem at all").unwrap();
    std::fs::write(
        p("b.json"),
        ok(meshfed().args(["bundle", "show", "--ca", &ca])).stdout,
    )
    .unwrap();
    bad(
        &[
            "bundle",
            "verify",
            "--bundle",
            &p("b.json"),
            "--cert",
            &p("garbage.pem"),
        ],
        &["garbage.pem", "BEGIN CERTIFICATE"],
    );
    bad(
        &[
            "bundle",
            "verify",
            "--bundle",
            &p("nope.json"),
            "--cert",
            &p("garbage.pem"),
        ],
        &["nope.json", "No such file"],
    );
    std::fs::write(
        p("bad.json"),
        "{\"keys\": [\n  {\"use\": \"x509-svid\", \"kty\": \"EC\", \"x5c\": []}\n]}",
    )
    .unwrap();
    bad(
        &[
            "bundle",
            "verify",
            "--bundle",
            &p("bad.json"),
            "--cert",
            &p("garbage.pem"),
        ],
        &["bad.json", "keys[0].x5c", "exactly one"],
    );
    std::fs::write(p("trunc.json"), "{\"keys\": [").unwrap();
    bad(
        &[
            "bundle",
            "verify",
            "--bundle",
            &p("trunc.json"),
            "--cert",
            &p("garbage.pem"),
        ],
        &["trunc.json", "line 1"],
    );
    std::fs::write(
        p("corrupt.pem"),
        "-----BEGIN CERTIFICATE-----\nMIIBzzCCAXWgAwIBAgIUQ\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    bad(
        &[
            "bundle",
            "verify",
            "--bundle",
            &p("b.json"),
            "--cert",
            &p("corrupt.pem"),
        ],
        &["corrupt.pem", "certificate #1"],
    );

    // A plug-in CA whose key does not match its certificate.
    let plug = d.path().join("plug");
    std::fs::create_dir(&plug).unwrap();
    for f in ["ca-cert.pem", "cert-chain.pem", "root-cert.pem"] {
        std::fs::copy(d.path().join("ca").join(f), plug.join(f)).unwrap();
    }
    let other = d.path().join("other");
    ca_init(&other, "east.mesh");
    std::fs::copy(other.join("ca-key.pem"), plug.join("ca-key.pem")).unwrap();
    bad(
        &[
            "ca",
            "init",
            "--trust-domain",
            "east.mesh",
            "--out",
            &p("imported"),
            "--from-cacerts",
            &plug.display().to_string(),
        ],
        &["ca-key.pem", "does not match"],
    );
    std::fs::write(
        plug.join("ca-key.pem"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    bad(
        &[
            "ca",
            "init",
            "--trust-domain",
            "east.mesh",
            "--out",
            &p("imported"),
            "--from-cacerts",
            &plug.display().to_string(),
        ],
        &["ca-key.pem"],
    );
    assert!(
        !d.path().join("imported").exists(),
        "nothing is written on a refused import"
    );
}
