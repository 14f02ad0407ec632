//! Root rotation under load: a client opens a new mTLS connection every few milliseconds
//! while the server's trust domain rotates its root. Make-before-break must give zero failed
//! handshakes; the break-before-make control shows the test can see failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration as StdDuration;

use common::*;
use rustls::{ClientConnection, ServerConnection, StreamOwned};
use rustls_pki_types::ServerName;
use time::{Duration, OffsetDateTime};
use trust::ca::policy::AnyWorkload;
use trust::tls::{self, Authorizer, SpiffeVerifier, SvidResolver};

struct Outcome {
    ok: usize,
    failed: usize,
    errors: Vec<String>,
}

fn run(make_before_break: bool) -> Outcome {
    let mut east = ca("east.mesh");
    let west = ca("west.mesh");
    let server_id = id("spiffe://east.mesh/ns/shop/sa/payment");
    let server_svid = east
        .issue_svid(&server_id, &AnyWorkload, Duration::seconds(3))
        .unwrap();
    let client_svid = svid(&west, "spiffe://west.mesh/ns/shop/sa/order");

    // The server trusts west; the client trusts east, through a live store it is told about.
    let server_resolver = SvidResolver::with(&server_svid).unwrap();
    let server_cfg = Arc::new(
        tls::server_config(
            server_resolver.clone(),
            SpiffeVerifier::new(store(&[&west]), Authorizer::Any),
        )
        .unwrap(),
    );
    let client_store = store(&[&east]);
    let client_cfg = Arc::new(
        tls::client_config(
            SvidResolver::with(&client_svid).unwrap(),
            SpiffeVerifier::new(
                client_store.clone(),
                Authorizer::trust_domain(td("east.mesh")),
            ),
        )
        .unwrap(),
    );

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let server_stop = stop.clone();
    let server = thread::spawn(move || {
        for conn in listener.incoming() {
            if server_stop.load(Ordering::Relaxed) {
                break;
            }
            let Ok(tcp) = conn else { continue };
            let _ = tcp.set_nodelay(true);
            let cfg = server_cfg.clone();
            thread::spawn(move || {
                let Ok(conn) = ServerConnection::new(cfg) else {
                    return;
                };
                let mut s = StreamOwned::new(conn, tcp);
                let mut b = [0u8; 1];
                if s.read_exact(&mut b).is_ok() {
                    let _ = s.write_all(&b);
                    let _ = s.flush();
                }
            });
        }
    });

    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let client_stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (stop, ok, failed, errors) = (
            client_stop.clone(),
            ok.clone(),
            failed.clone(),
            errors.clone(),
        );
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let attempt = || -> Result<(), String> {
                    let tcp = TcpStream::connect(addr).map_err(|e| e.to_string())?;
                    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
                    let conn = ClientConnection::new(
                        client_cfg.clone(),
                        ServerName::try_from("payment").unwrap(),
                    )
                    .map_err(|e| e.to_string())?;
                    let mut s = StreamOwned::new(conn, tcp);
                    s.write_all(b"x").map_err(|e| e.to_string())?;
                    let mut b = [0u8; 1];
                    s.read_exact(&mut b).map_err(|e| e.to_string())?;
                    Ok(())
                };
                match attempt() {
                    Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.lock().unwrap().push(e);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                thread::sleep(StdDuration::from_millis(3));
            }
        })
    };

    let sleep = |ms| thread::sleep(StdDuration::from_millis(ms));
    sleep(150);
    let lead = Duration::milliseconds(300);
    east.begin_rotation(OffsetDateTime::now_utc(), lead)
        .unwrap();
    if make_before_break {
        // 1. Publish the bundle holding both roots before anything is signed by the new one.
        client_store.update(east.bundle()).unwrap();
        sleep(300);
        // 2. The new root starts signing; the server renews onto it.
        assert!(east.advance(OffsetDateTime::now_utc()).signer_changed);
        let renewed = east
            .issue_svid(&server_id, &AnyWorkload, Duration::hours(1))
            .unwrap();
        server_resolver.install(&renewed).unwrap();
        sleep(200);
        // 3. After the last leaf of the old root has expired, the old root leaves the bundle.
        let GenerationState::Retiring { remove_after } = east.generations()[0].state().clone()
        else {
            panic!("old root should be retiring")
        };
        while OffsetDateTime::now_utc() < remove_after {
            sleep(50);
        }
        assert!(east.advance(OffsetDateTime::now_utc()).bundle_changed);
        client_store.update(east.bundle()).unwrap();
        assert_eq!(
            client_store
                .load()
                .get("east.mesh")
                .unwrap()
                .x509_authorities
                .len(),
            1
        );
        sleep(200);
    } else {
        // Control: the client is handed a bundle without the old root while the server still
        // presents a leaf of the old root.
        let old_root = east.roots()[0].clone();
        let mut b = east.bundle();
        b.x509_authorities.retain(|r| *r != old_root);
        client_store.update(b).unwrap();
        sleep(200);
    }
    // The client stops first and is joined, so no attempt of its own can meet a server that
    // is already stopping; only then is the server told to stop and woken by one connection.
    client_stop.store(true, Ordering::Relaxed);
    client.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    let _ = TcpStream::connect(addr);
    server.join().unwrap();
    let errors = errors.lock().unwrap().clone();
    Outcome {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        errors,
    }
}

use trust::ca::GenerationState;

#[test]
fn root_rotation_make_before_break_has_zero_failed_handshakes() {
    let o = run(true);
    println!("handshakes: {} ok, {} failed", o.ok, o.failed);
    assert!(o.ok > 50, "too few handshakes to mean anything: {}", o.ok);
    assert_eq!(
        o.failed,
        0,
        "failed handshakes during rotation: {:?}",
        &o.errors[..o.errors.len().min(3)]
    );
}

#[test]
fn break_before_make_control_fails_handshakes() {
    let o = run(false);
    println!("handshakes: {} ok, {} failed", o.ok, o.failed);
    assert!(
        o.failed > 0,
        "removing the serving root must break handshakes"
    );
    assert!(
        o.errors.iter().any(|e| e.contains("east.mesh")),
        "{:?}",
        &o.errors[..1]
    );
}
