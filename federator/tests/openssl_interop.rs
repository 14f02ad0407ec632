//! A real third-party TLS stack against meshfed's CA and verifiers: `openssl verify` accepts
//! issued chains, openssl s_server/s_client complete mTLS with SVIDs of two trust domains, and
//! meshfed's rustls verifier accepts openssl as the peer in both directions. Istio-style plug-in
//! CAs made with openssl (SEC1 and PKCS#1 keys) are imported.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rustls_pki_types::ServerName;
use trust::tls::{self, Authorizer, SpiffeVerifier, SvidResolver};
use trust::{BundleSet, CertificateAuthority, Svid, TrustStore};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for s_server's "ACCEPT" line (a probe connection would use up `-naccept`), then
/// keeps draining its output so it never blocks on a full pipe.
fn wait_listening(child: &mut Child) {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        let mut sent = false;
        while r.read_line(&mut line).unwrap_or(0) > 0 {
            if !sent && line.contains("ACCEPT") {
                let _ = tx.send(());
                sent = true;
            }
            line.clear();
        }
    });
    if rx.recv_timeout(Duration::from_secs(10)).is_err() {
        let mut err = String::new();
        let _ = child.kill();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        panic!("openssl s_server did not start: {err}");
    }
}

struct World {
    _dir: tempfile::TempDir,
    east_ca: std::path::PathBuf,
    west_ca: std::path::PathBuf,
    east_svid: std::path::PathBuf,
    west_svid: std::path::PathBuf,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let east_ca = dir.path().join("east-ca");
    let west_ca = dir.path().join("west-ca");
    ca_init(&east_ca, "east.mesh");
    ca_init(&west_ca, "west.mesh");
    let east_svid = dir.path().join("east-payment");
    let west_svid = dir.path().join("west-order");
    ca_issue(
        &east_ca,
        "spiffe://east.mesh/ns/shop/sa/payment",
        &east_svid,
    );
    ca_issue(&west_ca, "spiffe://west.mesh/ns/shop/sa/order", &west_svid);
    World {
        _dir: dir,
        east_ca,
        west_ca,
        east_svid,
        west_svid,
    }
}

fn intermediates(svid_dir: &Path) -> std::path::PathBuf {
    let chain = std::fs::read_to_string(svid_dir.join("cert-chain.pem")).unwrap();
    let idx =
        chain.find("-----END CERTIFICATE-----").unwrap() + "-----END CERTIFICATE-----\n".len();
    let p = svid_dir.join("intermediates.pem");
    std::fs::write(&p, &chain[idx..]).unwrap();
    p
}

#[test]
fn openssl_verify_accepts_issued_chains() {
    let w = world();
    for s in [&w.east_svid, &w.west_svid] {
        let out = openssl()
            .args(["verify", "-purpose", "sslserver", "-CAfile"])
            .arg(s.join("root-cert.pem"))
            .arg("-untrusted")
            .arg(intermediates(s))
            .arg(s.join("cert-chain.pem"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(": OK"),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // And refuses an east chain against west's root.
    let out = openssl()
        .arg("verify")
        .arg("-CAfile")
        .arg(w.west_svid.join("root-cert.pem"))
        .arg("-untrusted")
        .arg(intermediates(&w.east_svid))
        .arg(w.east_svid.join("cert-chain.pem"))
        .output()
        .unwrap();
    assert!(!out.status.success());
}

fn s_server(svid: &Path, client_root: &Path, port: u16) -> Child {
    let mut child = openssl()
        .args([
            "s_server",
            "-naccept",
            "1",
            "-rev",
            "-verify_return_error",
            "-Verify",
            "1",
            "-accept",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(svid.join("cert-chain.pem"))
        .arg("-cert_chain")
        .arg(svid.join("cert-chain.pem"))
        .arg("-key")
        .arg(svid.join("key.pem"))
        .arg("-CAfile")
        .arg(client_root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_listening(&mut child);
    child
}

#[test]
fn openssl_s_server_and_s_client_complete_mtls_across_trust_domains() {
    let w = world();
    let port = free_port();
    let mut server = s_server(&w.east_svid, &w.west_svid.join("root-cert.pem"), port);
    let mut client = openssl()
        .args(["s_client", "-verify_return_error", "-ign_eof", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(w.west_svid.join("cert-chain.pem"))
        .arg("-cert_chain")
        .arg(w.west_svid.join("cert-chain.pem"))
        .arg("-key")
        .arg(w.west_svid.join("key.pem"))
        .arg("-CAfile")
        .arg(w.east_svid.join("root-cert.pem"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    client
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello\nCLOSE\n")
        .unwrap();
    let out = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Verify return code: 0 (ok)"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("olleh"),
        "server echoed reversed text: {text}"
    );
    let _ = server.kill();
    let _ = server.wait();
}

fn rustls_pieces(
    svid_dir: &Path,
    peer_ca: &Path,
    peer_td: &str,
) -> (Arc<SvidResolver>, SpiffeVerifier) {
    let (svid, _) = Svid::load(svid_dir).unwrap();
    let peer = CertificateAuthority::load(peer_ca).unwrap();
    let mut set = BundleSet::new();
    set.insert(peer.bundle()).unwrap();
    let verifier = SpiffeVerifier::new(
        TrustStore::new(set),
        Authorizer::trust_domain(trust::TrustDomain::new(peer_td).unwrap()),
    );
    (SvidResolver::with(&svid).unwrap(), verifier)
}

#[test]
fn rustls_client_accepts_openssl_server() {
    let w = world();
    let port = free_port();
    let mut server = s_server(&w.east_svid, &w.west_svid.join("root-cert.pem"), port);
    let (resolver, verifier) = rustls_pieces(&w.west_svid, &w.east_ca, "east.mesh");
    let cfg = Arc::new(tls::client_config(resolver, verifier).unwrap());
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let conn =
        rustls::ClientConnection::new(cfg, ServerName::try_from("payment").unwrap()).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(b"abc\n").unwrap();
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "cba");
    let peer = tls::peer_id(s.conn.peer_certificates()).unwrap();
    assert_eq!(peer.as_str(), "spiffe://east.mesh/ns/shop/sa/payment");
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn rustls_server_accepts_openssl_client_and_refuses_a_wrong_one() {
    let w = world();
    let (resolver, verifier) = rustls_pieces(&w.east_svid, &w.west_ca, "west.mesh");
    let cfg = Arc::new(tls::server_config(resolver, verifier).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let mut results = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(cfg.clone()).unwrap();
            let mut s = rustls::StreamOwned::new(conn, tcp);
            let mut b = [0u8; 6];
            match s.read_exact(&mut b) {
                Ok(()) => {
                    s.write_all(b"pong\n").unwrap();
                    s.conn.send_close_notify();
                    let _ = s.flush();
                    results.push(Ok(tls::peer_id(s.conn.peer_certificates())
                        .unwrap()
                        .to_string()));
                }
                Err(e) => results.push(Err(e.to_string())),
            }
        }
        results
    });
    let client = |svid: &Path| {
        let mut c = openssl()
            .args(["s_client", "-ign_eof", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(svid.join("cert-chain.pem"))
            .arg("-cert_chain")
            .arg(svid.join("cert-chain.pem"))
            .arg("-key")
            .arg(svid.join("key.pem"))
            .arg("-CAfile")
            .arg(w.east_svid.join("root-cert.pem"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(b"hello\n").unwrap();
        c.wait_with_output().unwrap()
    };
    let good = client(&w.west_svid);
    let text = String::from_utf8_lossy(&good.stdout);
    assert!(text.contains("pong"), "{text}");
    // An east workload is not accepted by a server that authorizes only west.mesh.
    let _bad = client(&w.east_svid);
    let results = server.join().unwrap();
    assert_eq!(
        results[0].as_deref(),
        Ok("spiffe://west.mesh/ns/shop/sa/order")
    );
    let err = results[1].as_ref().unwrap_err();
    assert!(
        err.contains("not authorized") || err.contains("no trust bundle"),
        "{err}"
    );
}

/// An Istio-style plug-in CA made by openssl, the way istio's tools/certs Makefile does.
fn openssl_cacerts(dir: &Path, key_cmd: &[&str]) {
    std::fs::create_dir_all(dir).unwrap();
    let sh = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "[root]\nbasicConstraints=critical,CA:true\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n\
         [inter]\nbasicConstraints=critical,CA:true,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n\
         subjectAltName=URI:spiffe://istio.mesh\n",
    )
    .unwrap();
    let with_out = |out: &'static str| -> Vec<&str> {
        key_cmd
            .iter()
            .map(|a| if *a == "OUT" { out } else { a })
            .collect()
    };
    sh(&with_out("root-key.pem"));
    sh(&[
        "req",
        "-new",
        "-x509",
        "-key",
        "root-key.pem",
        "-subj",
        "/O=Istio/CN=Root CA",
        "-days",
        "30",
        "-extensions",
        "root",
        "-config",
        "ext.cnf",
        "-out",
        "root-cert.pem",
    ]);
    sh(&with_out("ca-key.pem"));
    sh(&[
        "req",
        "-new",
        "-key",
        "ca-key.pem",
        "-subj",
        "/O=Istio/CN=Intermediate CA",
        "-config",
        "ext.cnf",
        "-out",
        "ca.csr",
    ]);
    sh(&[
        "x509",
        "-req",
        "-in",
        "ca.csr",
        "-CA",
        "root-cert.pem",
        "-CAkey",
        "root-key.pem",
        "-CAcreateserial",
        "-days",
        "10",
        "-extfile",
        "ext.cnf",
        "-extensions",
        "inter",
        "-out",
        "ca-cert.pem",
    ]);
    let chain = std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap()
        + &std::fs::read_to_string(dir.join("root-cert.pem")).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), chain).unwrap();
    std::fs::remove_file(dir.join("root-key.pem")).unwrap();
}

#[test]
fn istio_plugin_ca_made_by_openssl_is_imported_and_keeps_its_root() {
    let d = tempfile::tempdir().unwrap();
    for (name, key_cmd) in [
        (
            "ec-sec1",
            vec![
                "ecparam",
                "-genkey",
                "-name",
                "prime256v1",
                "-noout",
                "-out",
                "OUT",
            ],
        ),
        (
            "rsa-pkcs1",
            vec!["genrsa", "-traditional", "-out", "OUT", "2048"],
        ),
    ] {
        let plug = d.path().join(name);
        openssl_cacerts(&plug, &key_cmd);
        let key = std::fs::read_to_string(plug.join("ca-key.pem")).unwrap();
        assert!(
            key.contains("EC PRIVATE KEY") || key.contains("RSA PRIVATE KEY"),
            "{name}: {key}"
        );
        let out = d.path().join(format!("{name}-meshfed"));
        ok(meshfed()
            .args(["ca", "init", "--trust-domain", "istio.mesh", "--out"])
            .arg(&out)
            .arg("--from-cacerts")
            .arg(&plug));
        assert_eq!(
            std::fs::read(out.join("root-cert.pem")).unwrap(),
            std::fs::read(plug.join("root-cert.pem")).unwrap(),
            "{name}: the root is kept"
        );
        let s = d.path().join(format!("{name}-svid"));
        ca_issue(&out, "spiffe://istio.mesh/ns/default/sa/sleep", &s);
        let v = openssl()
            .args(["verify", "-CAfile"])
            .arg(plug.join("root-cert.pem"))
            .arg("-untrusted")
            .arg(intermediates(&s))
            .arg(s.join("cert-chain.pem"))
            .output()
            .unwrap();
        assert!(
            v.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&v.stderr)
        );
    }
}
