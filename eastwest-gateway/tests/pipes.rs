//! A bulk direction's pipe: held while bytes move, given back when the connection goes quiet
//! (its own test binary, so no other test's pipes are counted).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use eastwest_gateway::proxy::GatewayConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

mod common;
use common::{gateway_to, istio_hello};

fn pipes() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("pipe:"))
        .count()
}

/// Waits (up to a generous bound) until the process holds `want` pipes.
async fn until_pipes(want: impl Fn(usize) -> bool, what: &str) {
    let t = Instant::now();
    loop {
        let n = pipes();
        if want(n) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{what}: {n} pipes");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_pipe_is_held_while_bytes_move_and_given_back_when_quiet() {
    let base = pipes();
    let hello = istio_hello();
    let payload = 16 * 1024 * 1024;
    let total = hello.len() + payload;
    // The backend reads nothing until told, so the gateway's splice into it stalls with bytes
    // in its pipe; then it reads everything and keeps the connection open.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let be = l.local_addr().unwrap();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let (got_tx, got_rx) = oneshot::channel::<tokio::net::TcpStream>();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        go_rx.await.unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        while n < total {
            let m = s.read(&mut buf).await.unwrap();
            assert!(m > 0, "EOF after {n} of {total} bytes");
            n += m;
        }
        let _ = got_tx.send(s);
    });
    let (addr, gw, _routes, _stop, _reg) = gateway_to(be, GatewayConfig::default()).await;

    let client = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (_r, mut w) = client.into_split();
    let writer = tokio::spawn(async move {
        w.write_all(&hello).await.unwrap();
        w.write_all(&vec![7u8; payload]).await.unwrap();
        w
    });
    until_pipes(
        |n| n >= base + 2,
        "a pipe while the backend stalls the transfer",
    )
    .await;
    go_tx.send(()).unwrap();
    let _w = writer.await.unwrap();
    let _backend = got_rx.await.unwrap();
    // Both sockets stay open, quiet: the pipe goes back after the linger.
    until_pipes(
        |n| n == base,
        "the pipe given back once the connection is quiet",
    )
    .await;
    assert_eq!(gw.open_connections(), 1, "the connection itself stays open");
}
