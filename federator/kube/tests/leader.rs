//! Request level (kube's tower-test mock): what the leader election sends to the API server,
//! and what it concludes from the answers. Time is tokio's paused clock: the deadlines are
//! the election's own, reached by advancing virtual time, not by waiting.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use http::{Request, Response};
use kube::client::Body;
use meshfed_kube::leader::{run, Leadership, LeaseConfig};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::Instant;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Send = tower_test::mock::SendResponse<Response<Body>>;

async fn next(h: &mut Handle) -> (Request<Body>, Send) {
    tokio::time::timeout(Duration::from_secs(60), h.next_request())
        .await
        .expect("a request")
        .expect("the client is alive")
}

fn reply(code: u16, v: Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .body(Body::from(serde_json::to_vec(&v).unwrap()))
        .unwrap()
}

fn failure(code: u16, reason: &str) -> Response<Body> {
    reply(
        code,
        json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
               "message": reason, "reason": reason, "code": code}),
    )
}

async fn body(r: Request<Body>) -> Value {
    serde_json::from_slice(&r.into_body().collect_bytes().await.unwrap()).unwrap()
}

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/meshfed-system/leases/meshfed-agent";

fn lease(holder: &str, rv: &str, transitions: i32) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "meshfed-agent", "namespace": "meshfed-system", "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                 "renewTime": "2026-12-04T10:00:00.000000Z", "acquireTime": "2026-12-04T10:00:00.000000Z",
                 "leaseTransitions": transitions}})
}

async fn until(
    rx: &mut watch::Receiver<Leadership>,
    f: impl Fn(&Leadership) -> bool,
) -> Leadership {
    rx.wait_for(|l| f(l)).await.unwrap().clone()
}

#[tokio::test(start_paused = true)]
async fn creates_the_lease_renews_it_with_its_version_and_steps_down_at_the_renew_deadline() {
    let (svc, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let (tx, mut rx) = watch::channel(Leadership::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = LeaseConfig::new("meshfed-system", "meshfed-agent", "agent-0");
    let election = tokio::spawn(run(client, cfg, tx, async {
        let _ = stop_rx.await;
    }));

    // No Lease yet: it is created with this replica as the holder.
    let (r, send) = next(&mut h).await;
    assert_eq!((r.method().as_str(), r.uri().path()), ("GET", PATH));
    send.send_response(failure(404, "NotFound"));
    let (r, send) = next(&mut h).await;
    assert_eq!(r.method(), "POST");
    let created = body(r).await;
    assert_eq!(created["spec"]["holderIdentity"], "agent-0");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    send.send_response(reply(201, lease("agent-0", "1", 0)));
    let l = until(&mut rx, |l| l.leader).await;
    assert_eq!(l.holder.as_deref(), Some("agent-0"));

    // The renewal replaces the object carrying the resourceVersion it read.
    let (r, send) = next(&mut h).await;
    assert_eq!(r.method(), "GET");
    send.send_response(reply(200, lease("agent-0", "1", 0)));
    let renewed = Instant::now();
    let (r, send) = next(&mut h).await;
    assert_eq!((r.method().as_str(), r.uri().path()), ("PUT", PATH));
    let put = body(r).await;
    assert_eq!(put["metadata"]["resourceVersion"], "1");
    assert_eq!(put["spec"]["holderIdentity"], "agent-0");
    send.send_response(reply(200, lease("agent-0", "2", 0)));

    // The API server fails from now on: the leader steps down within the renew deadline of
    // the renewal's start, not later.
    let failing = tokio::spawn(async move {
        loop {
            let Some((_, send)) = h.next_request().await else {
                return h;
            };
            send.send_response(failure(500, "InternalError"));
            if Instant::now() > renewed + Duration::from_secs(11) {
                return h;
            }
        }
    });
    let l = until(&mut rx, |l| !l.leader).await;
    let stepped_down = renewed.elapsed();
    assert!(
        stepped_down <= Duration::from_secs(10) + Duration::from_millis(1),
        "stepped down {stepped_down:?} after the last renewal"
    );
    assert!(
        l.error
            .as_deref()
            .unwrap_or_default()
            .contains("InternalError"),
        "{l:?}"
    );
    // Nobody else is known to hold it: this replica was the last holder it saw.
    assert!(l.held_last, "{l:?}");
    let mut h = failing.await.unwrap();

    // Another replica holds it now: this one stays a follower and names the holder.
    let (r, send) = next(&mut h).await;
    assert_eq!(r.method(), "GET");
    send.send_response(reply(200, lease("agent-1", "7", 1)));
    let l = until(&mut rx, |l| l.holder.as_deref() == Some("agent-1")).await;
    assert!(!l.leader && !l.held_last && l.error.is_none() && l.transitions == 1);
    stop_tx.send(()).unwrap();
    election.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_lost_race_is_a_conflict_and_a_holder_releases_on_stop() {
    let (svc, mut h) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(svc, "default");
    let (tx, mut rx) = watch::channel(Leadership::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = LeaseConfig::new("meshfed-system", "meshfed-agent", "agent-1");
    let election = tokio::spawn(run(client, cfg, tx, async {
        let _ = stop_rx.await;
    }));
    // A released Lease (no holder): taken at once, but another replica wrote first (409).
    let (_, send) = next(&mut h).await;
    send.send_response(reply(200, lease("", "4", 2)));
    let (r, send) = next(&mut h).await;
    assert_eq!(r.method(), "PUT");
    assert_eq!(body(r).await["spec"]["leaseTransitions"], 3);
    send.send_response(failure(409, "Conflict"));
    let l = until(&mut rx, |l| l.since.is_some()).await;
    assert!(!l.leader && l.error.is_none(), "{l:?}");
    // The next look finds it free again and takes it.
    let (_, send) = next(&mut h).await;
    send.send_response(reply(200, lease("", "6", 3)));
    let (_, send) = next(&mut h).await;
    send.send_response(reply(200, lease("agent-1", "7", 4)));
    until(&mut rx, |l| l.leader).await;
    // A renewal that loses a race (409) is a failed renewal, not a lost Lease: still the leader
    // (until the renew deadline), with the reason said; the next renewal clears it.
    let (_, send) = next(&mut h).await;
    send.send_response(reply(200, lease("agent-1", "7", 4)));
    let (r, send) = next(&mut h).await;
    assert_eq!(r.method(), "PUT");
    send.send_response(failure(409, "Conflict"));
    let l = until(&mut rx, |l| l.error.is_some()).await;
    assert!(l.leader, "{l:?}");
    assert!(l.error.as_deref().unwrap().contains("409"), "{l:?}");
    let (_, send) = next(&mut h).await;
    send.send_response(reply(200, lease("agent-1", "8", 4)));
    let (_, send) = next(&mut h).await;
    send.send_response(reply(200, lease("agent-1", "9", 4)));
    let l = until(&mut rx, |l| l.error.is_none()).await;
    assert!(l.leader, "{l:?}");
    // Stopping releases it: no holder, so a follower need not wait for it to expire.
    stop_tx.send(()).unwrap();
    let (r, send) = next(&mut h).await;
    assert_eq!(r.method(), "GET");
    send.send_response(reply(200, lease("agent-1", "9", 4)));
    let (r, send) = next(&mut h).await;
    assert_eq!(r.method(), "PUT");
    let put = body(r).await;
    assert!(put["spec"]["holderIdentity"].is_null(), "{put}");
    send.send_response(reply(200, lease("", "10", 4)));
    election.await.unwrap();
    assert!(!rx.borrow().leader);
}
