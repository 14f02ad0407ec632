//! The federation dashboard in a real browser (headless Chromium through Selenium WebDriver):
//! the graph shows the clusters and their import edges, a killed cluster turns stale on the
//! open page without a reload, and fresh again when it returns; no console errors; bad URLs
//! get a clear page; east's own page lists its peers, services (filtered) and proxies.
//! Screenshots of each state go to the test's directory (with MESHFED_DASHBOARD_SCREENSHOTS=DIR,
//! the federation's and east's pages are copied there: the README's pictures, docs/images).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use chaos::browser::Browser;
use chaos::*;

fn lease_of(b: &mut Browser, cluster: &str) -> String {
    b.eval(&format!(
        "const n = document.querySelector('.cluster[data-cluster=\"{cluster}\"]'); return n ? n.dataset.lease : null;"
    ))
    .unwrap()
    .as_str()
    .unwrap_or("")
    .to_string()
}

/// `echo` in namespace shop, exported, one endpoint.
fn echo(ip: &str, locality: &str) -> String {
    format!(
        "  - namespace: shop\n    name: echo\n    ports: [{{name: grpc, port: 9090}}]\n    export: true\n    endpoints: [{{address: {ip}, locality: {locality}}}]\n"
    )
}

const ECHO_POLICY: &str = "apiVersion: meshfed.io/v1alpha1\nkind: FailoverPolicy\nmetadata: {name: echo, namespace: shop}\nspec:\n  host: echo.shop.svc.cluster.local\n  outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 10s}\n";

/// The what-if table east's agent serves, and `meshfed policy check` on the same inputs.
fn what_if_matches_policy_check(
    c: &Cluster,
    dir: &std::path::Path,
    query: &str,
) -> serde_json::Value {
    let (code, json) = http_json(&c.admin, &format!("/ui/failover?{query}")).unwrap();
    assert_eq!(code, 200, "{json}");
    let inputs = dir.join("what-if-endpoints.yaml");
    std::fs::write(&inputs, json["inputs"].to_string()).unwrap();
    let policy = dir.join("echo-policy.yaml");
    std::fs::write(&policy, ECHO_POLICY).unwrap();
    let out = meshfed_ok(&[
        "policy",
        "check",
        "-f",
        policy.to_str().unwrap(),
        "--endpoints",
        inputs.to_str().unwrap(),
        "--proxy-locality",
        json["proxy"]["locality"].as_str().unwrap(),
        "--proxy-network",
        json["proxy"]["network"].as_str().unwrap(),
        "--proxy-cluster",
        json["proxy"]["cluster"].as_str().unwrap(),
        "-o",
        "json",
    ])
    .unwrap();
    let check: serde_json::Value = serde_json::from_str(&out).unwrap();
    // (priority, locality, endpoint addresses): the API lists endpoint objects, the command
    // addresses.
    let rows = |t: &serde_json::Value| -> Vec<(u64, String, Vec<String>)> {
        t.as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let eps = r["endpoints"].as_array().unwrap().iter();
                (
                    r["priority"].as_u64().unwrap(),
                    r["locality"].as_str().unwrap().to_string(),
                    eps.map(|e| e["address"].as_str().or(e.as_str()).unwrap().to_string())
                        .collect(),
                )
            })
            .collect()
    };
    let (ours, theirs) = (rows(&json["rows"]), rows(&check["table"]));
    assert_eq!(
        ours, theirs,
        "what-if {query}: {json}\npolicy check: {check}"
    );
    json
}

#[test]
fn the_dashboard_shows_the_federation_live_in_a_browser() {
    let ttl = 3.0;
    let f = Federation::start("3s").unwrap();
    let dir = f.root.path().to_path_buf();
    let east = f
        .add_cluster(
            "east",
            "net-e",
            "us-east1/us-east1-b",
            &registry_yaml("pay", 2, 8080, &echo("127.0.0.61", "us-east1/us-east1-b")),
        )
        .unwrap();
    let mut west = f
        .add_cluster(
            "west",
            "net-w",
            "us-west1/us-west1-a",
            &registry_yaml(
                "ledger",
                3,
                8081,
                &echo("127.0.0.62", "us-west1/us-west1-a"),
            ),
        )
        .unwrap();
    let _eu = f
        .add_cluster(
            "eu",
            "net-e",
            "europe-west1/europe-west1-b",
            "services: []\n",
        )
        .unwrap();
    wait_for(Duration::from_secs(20), "imports everywhere", || {
        let (_, s) = status(&f.admin)?;
        let eu = s["clusters"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["cluster"] == "eu").cloned())
            .unwrap_or_default();
        Ok((eu["imports"] == 7).then_some(()))
    })
    .unwrap();

    // `meshfed dashboard` checks the dashboard answers and prints where it is.
    let said = meshfed_ok(&["dashboard", "--admin", &f.admin, "--no-open"]).unwrap();
    assert!(
        said.starts_with(&format!("http://{}/ui/  (3 clusters", f.admin)),
        "{said}"
    );
    let (code, _, err) = meshfed(&[
        "dashboard",
        "--admin",
        &format!("127.0.0.1:{}", free_port()),
    ])
    .unwrap();
    assert_ne!(code, 0);
    assert!(err.contains("no dashboard at 127.0.0.1:"), "{err}");

    let mut b = Browser::start().unwrap();
    b.open(&format!("http://{}/ui/", f.admin)).unwrap();
    // Three clusters, two networks, and the import edges with their service counts.
    let (_, _) = b
        .wait(
            "return document.querySelectorAll('.cluster').length === 3 && \
             document.querySelectorAll('.network').length === 2",
            20.0,
        )
        .unwrap();
    let edges = b
        .eval(
            "return [...document.querySelectorAll('.import')].map(e => e.dataset.from + '>' + e.dataset.to + ':' + e.dataset.count).sort()",
        )
        .unwrap();
    assert_eq!(
        edges,
        serde_json::json!(["east>eu:3", "east>west:3", "west>east:4", "west>eu:4"]),
        "{edges}"
    );
    assert_eq!(lease_of(&mut b, "west"), "fresh");
    let live = b
        .eval("return document.getElementById('feed').textContent")
        .unwrap();
    assert_eq!(live, "live");
    let shot1 = dir.join("dashboard-1-fresh.png");
    b.screenshot(&shot1).unwrap();
    let publish = |shot: &std::path::Path, name: &str| {
        if let Ok(d) = std::env::var("MESHFED_DASHBOARD_SCREENSHOTS") {
            std::fs::copy(shot, std::path::Path::new(&d).join(name)).unwrap();
        }
    };
    publish(&shot1, "dashboard.png");

    // Fifty clusters in eight networks stay readable: the page's own drawing code, given such
    // a report, places every cluster box apart from every other, inside the graph's width.
    let big = b
        .eval(
            "const cs = []; for (let i = 0; i < 50; i++) { cs.push({cluster: 'c' + i, network: 'n' + (i % 8), \
               trust_domain: 'c' + i + '.mesh', locality: 'r/z', gateways: ['10.0.0.' + i + ':15443'], \
               connected: true, lease: i % 7 ? 'fresh' : 'stale', last_heartbeat_age_ms: 1000 * i, exports: 1, \
               imports: 49, imports_from: i ? {c0: 1} : {}, exports_acked_version: 1, imports_acked_revision: 1, \
               import_lag: 0, bundle_sequence: 1, conflicts: []}); } \
             drawGraph(cs); \
             const svg = document.getElementById('graph'); const w = svg.getBoundingClientRect().width; \
             const boxes = [...document.querySelectorAll('.cluster rect')].map(r => r.getBBox()); \
             let overlaps = 0; for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) { \
               const a = boxes[i], b = boxes[j]; \
               if (a.x < b.x + b.width && b.x < a.x + a.width && a.y < b.y + b.height && b.y < a.y + a.height) overlaps++; } \
             const outside = boxes.filter(r => r.x < 0 || r.x + r.width > w).length; \
             return {boxes: boxes.length, overlaps, outside, stale: document.querySelectorAll('.cluster[data-lease=\"stale\"]').length, \
                     edges: document.querySelectorAll('.import').length};",
        )
        .unwrap();
    assert_eq!(
        big,
        serde_json::json!({"boxes": 50, "overlaps": 0, "outside": 0, "stale": 8, "edges": 49}),
        "{big}"
    );
    b.screenshot(&dir.join("dashboard-0-fifty-clusters.png"))
        .unwrap();

    // west dies: the open page shows it stale, with its heartbeat age, without a reload.
    west.agent().unwrap().kill9();
    let killed = Instant::now();
    let (_, waited) = b
        .wait(
            "const n = document.querySelector('.cluster[data-cluster=\"west\"]'); \
             return n && n.dataset.lease === 'stale' && n.querySelector('.state').textContent",
            ttl + 10.0,
        )
        .unwrap();
    let took = killed.elapsed().as_secs_f64();
    println!(
        "west shown stale {took:.2} s after kill -9 (lease TTL {ttl} s; waited {waited:.2} s)"
    );
    assert!(
        took <= ttl + 1.0 + 1.0,
        "stale shown {took:.2} s after the kill: the lease TTL is {ttl} s and the page is pushed every second"
    );
    let state = b
        .eval("return document.querySelector('.cluster[data-cluster=\"west\"] .state').textContent")
        .unwrap();
    assert!(state.as_str().unwrap().starts_with("stale · "), "{state}");
    let row = b
        .eval("return document.querySelector('tr[data-cluster=\"west\"] td.stale').textContent")
        .unwrap();
    assert_eq!(row, "stale");
    b.screenshot(&dir.join("dashboard-2-west-stale.png"))
        .unwrap();

    // west returns: fresh again, on the same page.
    f.start_agent(&mut west).unwrap();
    b.wait(
        "const n = document.querySelector('.cluster[data-cluster=\"west\"]'); return n && n.dataset.lease === 'fresh'",
        20.0,
    )
    .unwrap();
    b.screenshot(&dir.join("dashboard-3-west-back.png"))
        .unwrap();
    let errors = b.console_errors().unwrap();
    assert!(errors.is_empty(), "console errors: {errors:?}");

    // The failover table of east's proxies for echo, as things are and with west failed or
    // east's zone down: each as `meshfed policy check` computes it from the same inputs.
    east.write_policy("echo.yaml", ECHO_POLICY).unwrap();
    let echo_port = wait_for(
        Duration::from_secs(20),
        "echo with its policy at east",
        || {
            let (_, l) = http_json(&east.admin, "/ui/services")?;
            Ok(l.as_array().and_then(|a| {
                a.iter()
                    .find(|x| x["host"] == "echo.shop.svc.cluster.local" && x["policy"] == true)
                    .map(|x| x["service"].as_str().unwrap_or_default().to_string())
            }))
        },
    )
    .unwrap();
    let q = |extra: &str| {
        format!(
            "service={}&locality=us-east1/us-east1-b{extra}",
            echo_port.replace('|', "%7C")
        )
    };
    let now = what_if_matches_policy_check(&east, &dir, &q(""));
    assert_eq!(now["rows"].as_array().unwrap().len(), 2, "{now}");
    let west_failed = what_if_matches_policy_check(&east, &dir, &q("&failed=west"));
    let zone_down = what_if_matches_policy_check(&east, &dir, &q("&down=us-east1/us-east1-b"));
    assert!(
        zone_down["rows"][0]["endpoints"][0]["healthy"] == false,
        "{zone_down}"
    );
    println!(
        "what-if tables match `meshfed policy check`: now {}, west failed {}, us-east1-b down {}",
        now["rows"], west_failed["rows"], zone_down["rows"]
    );
    // Bad what-if input: a clear answer naming it.
    for (query, want) in [
        ("service=nope".to_string(), "no service port"),
        (q("").replace("us-east1/us-east1-b", "a/b/c/d"), "a/b/c/d"),
        ("".to_string(), "name a service port"),
    ] {
        let (code, body) = http_get(&east.admin, &format!("/ui/failover?{query}")).unwrap();
        assert!(code == 400 || code == 404, "{query}: {code} {body}");
        assert!(body.contains(want), "{query}: {body}");
    }

    // The cluster's own page on east's agent: its peers, services (filtered), proxies.
    let gw = east
        .start_gateway(
            "east-gw",
            &format!("127.0.0.1:{}", free_port()),
            &format!("127.0.0.1:{}", free_port()),
            &dir,
        )
        .unwrap();
    let said = meshfed_ok(&["dashboard", "--admin", &east.admin, "--no-open"]).unwrap();
    assert!(said.contains("(cluster east;"), "{said}");
    b.open(&format!("http://{}/ui/", east.admin)).unwrap();
    b.wait(
        "return document.getElementById('name').textContent === 'east' && \
         document.querySelector('#peers tr[data-key=\"west\"]') && \
         document.querySelector('#peers tr[data-key=\"eu\"]') && \
         [...document.querySelectorAll('#proxies tr[data-key]')].some(r => r.textContent.includes('router~') && r.textContent.includes('SYNCED'))",
        20.0,
    )
    .unwrap();
    let west_row = b
        .eval("return document.querySelector('#peers tr[data-key=\"west\"]').textContent")
        .unwrap();
    assert!(west_row.as_str().unwrap().contains("fresh"), "{west_row}");
    let all = b
        .eval("return document.querySelectorAll('#services tr[data-key]').length")
        .unwrap();
    b.eval(
        "const f = document.getElementById('filter'); f.value = 'ledger'; f.dispatchEvent(new Event('input')); return true",
    )
    .unwrap();
    let shown = b
        .eval("return [...document.querySelectorAll('#services tr[data-key]')].map(r => r.dataset.key)")
        .unwrap();
    let shown: Vec<String> = serde_json::from_value(shown).unwrap();
    assert!(
        !shown.is_empty()
            && shown.iter().all(|k| k.contains("ledger"))
            && (shown.len() as u64) < all.as_u64().unwrap(),
        "{shown:?} of {all}"
    );
    // The what-if on the page: echo with west failed.
    b.eval(&format!(
        "document.getElementById('wi-service').value = {}; \
         document.querySelector('#wi-failed input[value=\"west\"]').checked = true; \
         document.querySelector('#whatif-form button').click(); return true",
        serde_json::Value::String(echo_port.clone())
    ))
    .unwrap();
    let (shown, _) = b
        .wait(
            "const r = [...document.querySelectorAll('#wi-table tr[data-key]')].map(r => r.dataset.key); return r.length ? r : null",
            10.0,
        )
        .unwrap();
    let want: Vec<String> = west_failed["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("P{} {}", r["priority"], r["locality"].as_str().unwrap()))
        .collect();
    assert_eq!(shown, serde_json::json!(want));
    let shot4 = dir.join("dashboard-4-cluster-east.png");
    b.screenshot(&shot4).unwrap();
    publish(&shot4, "dashboard-cluster.png");
    let errors = b.console_errors().unwrap();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    drop(gw);
    // The page says when the server it reads is gone.
    let mut east = east;
    east.agent().unwrap().kill9();
    b.wait(
        "return document.getElementById('feed').textContent.includes('unreachable')",
        10.0,
    )
    .unwrap();

    // Bad URLs: a clear page, never a 500.
    for path in ["/ui/cluster/nope", "/ui/service/%3Cscript%3E", "/ui/%ff%fe"] {
        let (code, body) = http_get(&f.admin, path).unwrap();
        assert!(code == 404 || code == 400, "{path}: {code} {body}");
        assert!(!body.contains("<script>"), "{path}: escaped: {body}");
        if code == 404 {
            assert!(body.contains("There is no page"), "{path}: {body}");
        }
    }
    let (code, _) = http_get(&f.admin, "/ui").unwrap();
    assert!(code == 308 || code == 200, "{code}");
    println!("screenshots in {}", dir.display());
}
