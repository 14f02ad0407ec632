//! The WorkloadGroup's readiness probe, run on the VM with Kubernetes/Istio semantics: nothing
//! is ready until the probe has passed `successThreshold` times in a row; a ready VM becomes
//! unready after `failureThreshold` consecutive failures. Checks: httpGet (2xx/3xx), tcpSocket
//! (connect), exec (exit 0), grpc (grpc.health.v1 SERVING).

use std::time::Duration;

use http_body_util::BodyExt;
use tokio::sync::watch;

use meshfed_model::workload::Probe;

/// The outcome of one check: `Err(reason)` is a failure.
pub async fn check_once(p: &Probe) -> Result<(), String> {
    let timeout = Duration::from_secs(u64::from(p.timeout_seconds.max(1)));
    let fut = async {
        if let Some(h) = &p.http_get {
            http_get(h).await
        } else if let Some(t) = &p.tcp_socket {
            let host = t.host.as_deref().unwrap_or("127.0.0.1");
            tokio::net::TcpStream::connect(join(host, t.port))
                .await
                .map(|_| ())
                .map_err(|e| format!("tcpSocket {host}:{}: {e}", t.port))
        } else if let Some(e) = &p.exec {
            exec(&e.command).await
        } else if let Some(g) = &p.grpc {
            grpc(g.port, g.service.clone().unwrap_or_default()).await
        } else {
            Err("the probe has no check".into())
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(format!("timed out after {}s", timeout.as_secs())),
    }
}

fn join(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

async fn http_get(h: &meshfed_model::workload::HttpGet) -> Result<(), String> {
    let host = h.host.as_deref().unwrap_or("127.0.0.1");
    let path = h.path.as_deref().unwrap_or("/");
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let addr = join(host, h.port);
    let uri: hyper::Uri = format!("http://{addr}{path}")
        .parse()
        .map_err(|e| format!("httpGet: bad URL http://{addr}{path}: {e}"))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let mut req = hyper::Request::get(uri.clone()).header("user-agent", "meshfed-probe/1");
    for hd in &h.http_headers {
        req = req.header(hd.name.as_str(), hd.value.as_str());
    }
    let req = req
        .body(http_body_util::Empty::new())
        .map_err(|e| format!("httpGet: {e}"))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("httpGet {uri}: {e}"))?;
    let status = resp.status();
    // Drain (bounded) so the connection is reusable and the server sees a complete exchange.
    let _ = resp.into_body().collect().await;
    if status.is_success() || status.is_redirection() {
        Ok(())
    } else {
        Err(format!("httpGet {uri}: HTTP {}", status.as_u16()))
    }
}

async fn exec(cmd: &[String]) -> Result<(), String> {
    let (prog, args) = cmd.split_first().ok_or("exec: empty command")?;
    let out = tokio::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("exec {prog}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = err.trim();
        Err(format!(
            "exec {prog}: {}{}",
            out.status,
            if err.is_empty() {
                String::new()
            } else {
                format!(": {}", err.chars().take(200).collect::<String>())
            }
        ))
    }
}

async fn grpc(port: u16, service: String) -> Result<(), String> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("grpc 127.0.0.1:{port}: {e}"))?;
    let resp = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: service.clone(),
        })
        .await
        .map_err(|s| format!("grpc health {service:?}: {}", s.message()))?
        .into_inner();
    if resp.status == ServingStatus::Serving as i32 {
        Ok(())
    } else {
        Err(format!(
            "grpc health {service:?}: {:?}",
            ServingStatus::try_from(resp.status).unwrap_or(ServingStatus::Unknown)
        ))
    }
}

/// Readiness as the probe sees it: `(ready, last failure)`.
pub type Readiness = (bool, String);

/// Runs the probe forever, publishing readiness changes.
pub async fn run(p: Probe, tx: watch::Sender<Readiness>) {
    tokio::time::sleep(Duration::from_secs(u64::from(p.initial_delay_seconds))).await;
    let mut t = tokio::time::interval(Duration::from_secs(u64::from(p.period_seconds.max(1))));
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut ok_run, mut fail_run) = (0u32, 0u32);
    loop {
        t.tick().await;
        let r = check_once(&p).await;
        let ready = tx.borrow().0;
        match r {
            Ok(()) => {
                ok_run += 1;
                fail_run = 0;
                if !ready && ok_run >= p.success_threshold {
                    tx.send_replace((true, String::new()));
                }
            }
            Err(e) => {
                fail_run += 1;
                ok_run = 0;
                if ready && fail_run >= p.failure_threshold {
                    tracing::warn!(reason = %e, "readiness probe failed {fail_run} times: not ready");
                    tx.send_replace((false, e));
                } else if !ready {
                    tx.send_if_modified(|cur| {
                        if cur.1 == e {
                            false
                        } else {
                            cur.1 = e;
                            true
                        }
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(yaml: &str) -> Probe {
        let p: Probe = meshfed_model::policy::spec::parse_yaml(yaml, "test").unwrap();
        p.check().unwrap();
        p
    }

    #[tokio::test]
    async fn checks() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        assert!(check_once(&probe(&format!("tcpSocket: {{port: {port}}}")))
            .await
            .is_ok());
        drop(l);
        let e = check_once(&probe(&format!("tcpSocket: {{port: {port}}}")))
            .await
            .unwrap_err();
        assert!(e.contains("tcpSocket"), "{e}");
        assert!(check_once(&probe("exec: {command: [\"true\"]}"))
            .await
            .is_ok());
        let e = check_once(&probe(
            "exec: {command: [sh, -c, \"echo broken >&2; exit 3\"]}",
        ))
        .await
        .unwrap_err();
        assert!(e.contains("broken") && e.contains('3'), "{e}");
        let e = check_once(&probe(
            "{timeoutSeconds: 1, exec: {command: [sleep, \"5\"]}}",
        ))
        .await
        .unwrap_err();
        assert!(e.contains("timed out"), "{e}");
    }

    #[tokio::test]
    async fn grpc_health() {
        let (reporter, svc) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("shop.Payment", tonic_health::ServingStatus::Serving)
            .await;
        reporter
            .set_service_status("shop.Broken", tonic_health::ServingStatus::NotServing)
            .await;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
        );
        assert!(check_once(&probe(&format!(
            "grpc: {{port: {port}, service: shop.Payment}}"
        )))
        .await
        .is_ok());
        let e = check_once(&probe(&format!(
            "grpc: {{port: {port}, service: shop.Broken}}"
        )))
        .await
        .unwrap_err();
        assert!(e.contains("NotServing"), "{e}");
        let e = check_once(&probe(&format!("grpc: {{port: {port}, service: nope}}")))
            .await
            .unwrap_err();
        assert!(e.contains("nope"), "{e}");
    }

    #[tokio::test]
    async fn http_get_status_codes() {
        let app = axum::Router::new()
            .route("/ready", axum::routing::get(|| async { "ok" }))
            .route(
                "/sick",
                axum::routing::get(|| async {
                    (axum::http::StatusCode::SERVICE_UNAVAILABLE, "no")
                }),
            );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(l, app).await });
        assert!(
            check_once(&probe(&format!("httpGet: {{path: /ready, port: {port}}}")))
                .await
                .is_ok()
        );
        let e = check_once(&probe(&format!("httpGet: {{path: /sick, port: {port}}}")))
            .await
            .unwrap_err();
        assert!(e.contains("503"), "{e}");
    }

    #[tokio::test]
    async fn thresholds() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("up");
        let p = probe(&format!(
            "{{periodSeconds: 1, successThreshold: 2, failureThreshold: 2, exec: {{command: [test, -e, {}]}}}}",
            flag.display()
        ));
        let (tx, mut rx) = watch::channel((false, String::new()));
        tokio::spawn(run(p, tx));
        std::fs::write(&flag, "").unwrap();
        rx.wait_for(|r| r.0).await.unwrap();
        std::fs::remove_file(&flag).unwrap();
        rx.wait_for(|r| !r.0).await.unwrap();
        assert!(rx.borrow().1.contains("exec test"), "{:?}", rx.borrow());
    }
}
