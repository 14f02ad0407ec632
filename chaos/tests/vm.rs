//! A VM in its own network namespace joins cluster east through east's east-west gateway, from
//! a Debian package built by `meshfed vm bootstrap`: its WorkloadEntry appears (and reaches
//! west through the federation), the group's probe gates it, a cluster client reaches the VM's
//! service over mTLS by name (grpcio, xDS), the VM resolves (mesh DNS, dig) and reaches a local
//! and an imported service by name (grpcio through the VM agent's xDS relay). kill -9 of the VM
//! agent: the entry is gone everywhere after the grace period. Restarted with an expired token,
//! the VM comes back with its credential.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use chaos::*;

/// The probe period of payment-vm's group (seconds).
const GROUP_PROBE_PERIOD: u32 = 1;

/// payment-vm's WorkloadGroup, an object in east's Kubernetes API (ledger-vm's is in the
/// registry file: the agent reads both).
fn payment_group(payment: u16) -> serde_json::Value {
    serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
        "metadata": {"name": "payment-vm", "namespace": "shop"},
        "spec": {
            "metadata": {"labels": {"app": "payment"}},
            "template": {"serviceAccount": "payment",
                         "labels": {"security.istio.io/tlsMode": "istio", "version": "vm"}},
            "probe": {"periodSeconds": GROUP_PROBE_PERIOD, "tcpSocket": {"port": payment}}}})
}

fn east_registry(host_ip: &str, payment: u16, inventory: u16) -> String {
    format!(
        r#"services:
  - namespace: shop
    name: payment
    ports: [{{name: grpc, port: {payment}}}]
    export: true
    selector: {{app: payment}}
    labels: {{security.istio.io/tlsMode: istio}}
  - namespace: shop
    name: inventory
    ports: [{{name: grpc, port: {inventory}}}]
    endpoints: [{{address: {host_ip}}}]
workloadGroups:
  - apiVersion: networking.istio.io/v1
    kind: WorkloadGroup
    metadata: {{name: ledger-vm, namespace: shop}}
    spec:
      template: {{serviceAccount: ledger}}
"#
    )
}

fn py_server(name: &str, addr: &str, tls: Option<&Path>, ns: Option<&Netns>, dir: &Path) -> Proc {
    let mut args = vec![
        py_script("xds_echo.py").display().to_string(),
        "server".into(),
        "--name".into(),
        name.into(),
        "--addr".into(),
        addr.into(),
    ];
    if let Some(c) = tls {
        for (flag, f) in [
            ("--cert", "cert-chain.pem"),
            ("--key", "key.pem"),
            ("--roots", "root-cert.pem"),
        ] {
            args.push(flag.into());
            args.push(c.join(f).display().to_string());
        }
    }
    let py = python().unwrap();
    let (prog, args) = match ns {
        Some(n) => n.wrap(&py, &args),
        None => (py, args),
    };
    let p = Proc::spawn_program(name, &prog, &args, &[], dir).unwrap();
    wait_for(Duration::from_secs(30), &format!("server {name}"), || {
        Ok(p.log().contains("serving").then_some(()))
    })
    .unwrap();
    p
}

/// Runs an xds_echo client to completion and returns its result lines.
fn py_calls(
    target: &str,
    secure: bool,
    bootstrap: &Path,
    ns: Option<&Netns>,
    calls: u32,
) -> Vec<String> {
    let mut args = vec![
        py_script("xds_echo.py").display().to_string(),
        "client".into(),
        "--target".into(),
        target.into(),
        "--calls".into(),
        calls.to_string(),
        "--interval".into(),
        "0.1".into(),
    ];
    if secure {
        args.push("--secure".into());
    }
    let py = python().unwrap();
    let (prog, args) = match ns {
        Some(n) => n.wrap(&py, &args),
        None => (py, args),
    };
    let o = Command::new(prog)
        .args(args)
        .env("GRPC_XDS_BOOTSTRAP", bootstrap)
        .env(GRPC_SPIFFE_ENV.0, GRPC_SPIFFE_ENV.1)
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with("ok ") || l.starts_with("err "))
        .map(str::to_string)
        .collect()
}

fn dig(ns: Option<&Netns>, server: &str, args: &[&str]) -> String {
    let (host, port) = server.rsplit_once(':').unwrap();
    let mut a = vec![
        format!("@{host}"),
        "-p".into(),
        port.into(),
        "+time=2".into(),
        "+tries=1".into(),
    ];
    a.extend(args.iter().map(|s| s.to_string()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    match ns {
        Some(n) => n.run("dig", &a).unwrap().1,
        None => {
            let o = Command::new("dig").args(&a).output().unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        }
    }
}

fn entries(c: &Cluster) -> Vec<serde_json::Value> {
    c.status()
        .ok()
        .and_then(|s| s["workload_entries"].as_array().cloned())
        .unwrap_or_default()
}

fn endpoints(c: &Cluster, svc: &str, cluster: &str) -> u64 {
    c.status()
        .ok()
        .and_then(|s| s["endpoints"][svc][cluster].as_u64())
        .unwrap_or(0)
}

/// `meshfed vm bootstrap`; the group from the Kubernetes API with `kubeconfig`, else from the
/// registry file.
fn bootstrap_pkg(
    east: &Cluster,
    kubeconfig: Option<&Path>,
    group: &str,
    out: &Path,
    format: &str,
    extra: &[&str],
) -> String {
    let (code, stdout, stderr) = bootstrap(east, kubeconfig, group, out, format, extra);
    assert_eq!(code, 0, "{stdout}{stderr}");
    stdout
}

/// `meshfed vm bootstrap`: (exit code, stdout, stderr).
fn bootstrap(
    east: &Cluster,
    kubeconfig: Option<&Path>,
    group: &str,
    out: &Path,
    format: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let source = match kubeconfig {
        Some(k) => vec!["--kubernetes", "--kubeconfig", k.to_str().unwrap()],
        None => vec!["--registry", east.registry.to_str().unwrap()],
    };
    let mut args = vec!["vm", "bootstrap", "--state-dir", east.dir.to_str().unwrap()];
    args.extend(source);
    args.extend([
        "--group",
        group,
        "--namespace",
        "shop",
        "--out",
        out.to_str().unwrap(),
        "--format",
        format,
    ]);
    args.extend_from_slice(extra);
    meshfed(&args).unwrap()
}

#[test]
fn vm_joins_through_the_gateway_registers_is_probed_resolves_and_leaves() {
    let Some(ns) = Netns::create("vm", 7).unwrap() else {
        println!(
            "SKIP vm_joins_through_the_gateway...: needs root and `ip netns` (network namespaces)"
        );
        return;
    };
    let f = Federation::start("5s").unwrap();
    let dir = f.root.path().to_path_buf();
    let host = ns.host_ip.clone();
    let (p_pay, p_inv, p_led) = (free_port(), free_port(), free_port());
    // East also runs the Kubernetes source against the API-server double (its services come
    // from the registry file, payment-vm's WorkloadGroup from the API): it writes its VMs'
    // WorkloadEntries.
    let api = chaos::apiserver::ApiServer::start().unwrap();
    let kubeconfig = api.kubeconfig(&dir.join("kubeconfig")).unwrap();
    api.apply(payment_group(p_pay)).unwrap();
    let mut east = f
        .add_kube_cluster(
            "east",
            "net1",
            "us-east1/us-east1-b",
            &east_registry(&host, p_pay, p_inv),
            &kubeconfig,
        )
        .unwrap();
    let entry_health = |name: &str| -> Option<String> {
        let o = api.get("WorkloadEntry", "shop", name)?;
        Some(
            o["status"]["conditions"][0]["status"]
                .as_str()
                .unwrap_or("none")
                .to_string(),
        )
    };
    // west shares east's network here, so the VM reaches west's ledger directly.
    let west = f
        .add_cluster(
            "west",
            "net1",
            "us-west1/us-west1-a",
            &format!(
                "services:\n  - {{namespace: shop, name: ledger, ports: [{{name: grpc, port: {p_led}}}], export: true, endpoints: [{{address: {host}}}]}}\n"
            ),
        )
        .unwrap();

    // East's east-west gateway on the host side of the VM's link: the only thing the VM reaches.
    let gw = format!("{host}:{}", free_port());
    let gw_admin = format!("127.0.0.1:{}", free_port());
    let _g = Proc::spawn(
        "gateway",
        &[
            "gateway".to_string(),
            "--listen".into(),
            gw.clone(),
            "--xds".into(),
            east.xds.clone(),
            "--admin".into(),
            gw_admin.clone(),
            "--expose".into(),
            format!("meshfed-agent.meshfed-system.svc={}", east.vm_api),
            "--expose".into(),
            format!("meshfed-xds.meshfed-system.svc={}", east.xds_mtls),
        ],
        &dir,
    )
    .unwrap();
    wait_for(Duration::from_secs(20), "the gateway", || {
        Ok(status(&gw_admin).ok().map(|_| ()))
    })
    .unwrap();
    // The VM cannot reach the agent directly.
    let (code, out) = ns
        .run(
            "python3",
            &[
                "-c",
                &format!(
                    "import socket; socket.create_connection(('{}', {}), 2)",
                    "127.0.0.1",
                    east.vm_api.rsplit_once(':').unwrap().1
                ),
            ],
        )
        .unwrap();
    assert_ne!(
        code, 0,
        "the VM namespace must not reach the agent directly: {out}"
    );

    // The package: a real .deb, clean for dpkg-deb, installed with dpkg.
    let pkg = dir.join("payment-vm");
    let out = bootstrap_pkg(
        &east,
        Some(&kubeconfig),
        "payment-vm",
        &pkg,
        "deb",
        &["--control-plane", &gw],
    );
    assert!(out.contains("one-time token"), "{out}");
    let deb = dir.join("payment-vm.deb");
    let info = Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .output()
        .unwrap();
    assert!(info.status.success() && info.stderr.is_empty(), "{info:?}");
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("Package: meshfed-vm") && info.contains("postinst"),
        "{info}"
    );
    let list = Command::new("dpkg-deb")
        .arg("-c")
        .arg(&deb)
        .output()
        .unwrap();
    assert!(list.status.success() && list.stderr.is_empty(), "{list:?}");
    let list = String::from_utf8_lossy(&list.stdout);
    for want in [
        "./usr/bin/meshfed",
        "./etc/meshfed/vm.yaml",
        "./etc/meshfed/join-token",
        "./etc/meshfed/root-cert.pem",
        "./lib/systemd/system/meshfed-vm.service",
    ] {
        assert!(
            list.contains(want),
            "{want} missing from the package:\n{list}"
        );
    }
    assert!(
        list.contains("-rw-r----- root/root"),
        "the token is 0640:\n{list}"
    );
    // The tar.gz form, installed by its own install.sh into an image directory.
    bootstrap_pkg(
        &east,
        None,
        "ledger-vm",
        &dir.join("ledger-vm"),
        "tar",
        &["--control-plane", &gw],
    );
    // A package that cannot be written leaves no valid token behind: an output that exists is
    // refused before a token is made; one that fails while being written revokes its token.
    let tokens = |state: &str| -> usize {
        let out = meshfed_ok(&["vm", "list", "--state-dir", east.dir.to_str().unwrap()]).unwrap();
        out.lines().filter(|l| l.contains(state)).count()
    };
    let (valid, revoked) = (tokens("valid for"), tokens("revoked"));
    let failed_bootstrap = |out: &Path, format: &str| -> String {
        let (code, _, err) = bootstrap(
            &east,
            None,
            "ledger-vm",
            out,
            format,
            &["--control-plane", &gw],
        );
        assert_ne!(code, 0, "{err}");
        err
    };
    let err = failed_bootstrap(&dir.join("ledger-vm"), "tar");
    assert!(
        err.contains("ledger-vm.tar.gz exists (it must not)"),
        "{err}"
    );
    let afile = dir.join("afile");
    std::fs::write(&afile, "a file, not a directory").unwrap();
    let err = failed_bootstrap(&afile.join("pkg"), "dir");
    assert!(err.contains("no package was written; token "), "{err}");
    assert!(err.contains("was revoked"), "{err}");
    assert!(
        err.contains(&format!("cannot create {}", afile.join("pkg").display())),
        "{err}"
    );
    assert_eq!(tokens("valid for"), valid, "no orphan token");
    assert_eq!(tokens("revoked"), revoked + 1);
    let tgz = dir.join("ledger-vm.tar.gz");
    let x = Command::new("tar")
        .arg("-xzf")
        .arg(&tgz)
        .arg("-C")
        .arg(&dir)
        .output()
        .unwrap();
    assert!(x.status.success(), "{x:?}");
    let img = dir.join("ledger-image");
    let i = Command::new(dir.join("meshfed-vm/install.sh"))
        .arg("--root")
        .arg(&img)
        .output()
        .unwrap();
    assert!(i.status.success(), "install.sh: {i:?}");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &str| std::fs::metadata(img.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("etc/meshfed/join-token"), 0o640);
    assert_eq!(mode("var/lib/meshfed"), 0o700);
    assert_eq!(mode("usr/bin/meshfed"), 0o755);
    let y = std::fs::read_to_string(img.join("etc/meshfed/vm.yaml")).unwrap();
    assert!(
        y.contains("group: ledger-vm") && y.contains("serviceAccount: ledger"),
        "{y}"
    );

    let vmroot = dir.join("vmroot");
    std::fs::create_dir_all(vmroot.join("var/lib/dpkg/info")).unwrap();
    std::fs::create_dir_all(vmroot.join("var/lib/dpkg/updates")).unwrap();
    std::fs::write(vmroot.join("var/lib/dpkg/status"), "").unwrap();
    let inst = Command::new("dpkg")
        .arg(format!("--root={}", vmroot.display()))
        .args([
            "--force-script-chrootless",
            "--force-not-root",
            "--force-depends",
            "-i",
        ])
        .arg(&deb)
        .output()
        .unwrap();
    assert!(inst.status.success(), "dpkg -i: {inst:?}");
    let hosts = std::fs::read_to_string(vmroot.join("etc/hosts")).unwrap();
    assert!(
        hosts.contains("meshfed-agent.meshfed-system.svc"),
        "{hosts}"
    );
    // The test VM shares this machine's filesystem: point the installed config at the image.
    let cfg = vmroot.join("etc/meshfed/vm.yaml");
    let mut yaml = std::fs::read_to_string(&cfg).unwrap();
    for (k, v) in [
        ("stateDir", vmroot.join("var/lib/meshfed")),
        ("certDir", vmroot.join("etc/meshfed/certs")),
        ("rootCert", vmroot.join("etc/meshfed/root-cert.pem")),
        ("tokenFile", vmroot.join("etc/meshfed/join-token")),
    ] {
        yaml.push_str(&format!("{k}: {}\n", v.display()));
    }
    yaml.push_str("labels: {zone: vm-rack-1}\n");
    std::fs::write(&cfg, yaml).unwrap();
    let bin = vmroot.join("usr/bin/meshfed");
    let (prog, args) = ns.wrap(
        &bin,
        &[
            "vm".to_string(),
            "agent".into(),
            "--config".into(),
            cfg.display().to_string(),
        ],
    );
    let started = Instant::now();
    let mut vm = Proc::spawn_program("vm-agent", &prog, &args, &[], &dir).unwrap();

    // Registered through the gateway; no endpoint until the probe passes.
    let name = format!("payment-vm-{}", ns.ns_ip);
    wait_for(Duration::from_secs(30), "the VM's WorkloadEntry", || {
        Ok(entries(&east)
            .iter()
            .any(|e| e["name"] == name.as_str() && e["connected"] == true)
            .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.log()));
    println!("VM joined and registered in {:?}", started.elapsed());
    let e = entries(&east)
        .into_iter()
        .find(|e| e["name"] == name.as_str())
        .unwrap();
    assert_eq!(
        e["annotations"]["istio.io/autoRegistrationGroup"],
        "payment-vm"
    );
    assert_eq!(
        e["annotations"]["proxy.istio.io/health-checks-enabled"],
        "true"
    );
    assert!(e["annotations"]["istio.io/connectedAt"].is_string());
    // The VM reports its probe failing (nothing listens yet): still no endpoint.
    wait_for(
        Duration::from_secs(20),
        "the VM's first failing probe",
        || {
            Ok(entries(&east)
                .iter()
                .any(|e| e["name"] == name.as_str() && e["healthy"] == false)
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.log()));
    assert_eq!(
        endpoints(&east, "shop/payment", "east"),
        0,
        "unhealthy: no endpoint"
    );
    // In the cluster's API: an Istio WorkloadEntry with the failing probe as Healthy=False.
    wait_for(
        Duration::from_secs(20),
        "the VM's WorkloadEntry object, Healthy=False",
        || Ok((entry_health(&name).as_deref() == Some("False")).then_some(())),
    )
    .unwrap();
    let o = api.get("WorkloadEntry", "shop", &name).unwrap();
    assert_eq!(o["spec"]["address"], ns.ns_ip.as_str());
    assert_eq!(
        o["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "meshfed"
    );
    let certs = vmroot.join("etc/meshfed/certs");
    for f in [
        "cert-chain.pem",
        "key.pem",
        "root-cert.pem",
        "grpc-bootstrap.json",
    ] {
        assert!(certs.join(f).exists(), "{f} written");
    }
    // One bundle per trust domain for the VM's clients; root-cert.pem holds east's roots only.
    wait_for(
        Duration::from_secs(20),
        "the VM's bundle map with east and west",
        || {
            let text = std::fs::read_to_string(certs.join("spiffe-bundle-map.json"))?;
            let m: serde_json::Value = serde_json::from_str(&text)?;
            Ok((m["trust_domains"]["east.mesh"]["keys"].is_array()
                && m["trust_domains"]["west.mesh"]["keys"].is_array())
            .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.log()));
    let vm_roots = std::fs::read_to_string(certs.join("root-cert.pem")).unwrap();
    let east_own = std::fs::read_to_string(east.dir.join("xds/trust-roots.pem")).unwrap();
    assert_eq!(
        vm_roots.trim(),
        east_own.trim(),
        "the VM's root-cert.pem is east's roots only"
    );
    let server = py_server(
        "vm-payment",
        &format!("0.0.0.0:{p_pay}"),
        Some(&certs),
        Some(&ns),
        &dir,
    );
    wait_for(
        Duration::from_secs(20),
        "the probe to pass and the endpoint to appear",
        || Ok((endpoints(&east, "shop/payment", "east") == 1).then_some(())),
    )
    .unwrap();
    wait_for(
        Duration::from_secs(20),
        "west to import the VM's endpoint",
        || Ok((endpoints(&west, "shop/payment", "east") == 1).then_some(())),
    )
    .unwrap();

    // A client of the cluster reaches the VM over mTLS (SAN spiffe://east.mesh/ns/shop/sa/payment).
    let order = dir.join("order-certs");
    east.issue_svid("spiffe://east.mesh/ns/shop/sa/order", &order)
        .unwrap();
    let boot = grpc_bootstrap(
        &dir.join("order-bootstrap.json"),
        &east.xds,
        "sidecar~127.0.0.1~order.shop~shop.svc.cluster.local",
        &order,
        &east.dir.join("xds"),
    )
    .unwrap();
    let calls = py_calls(
        &format!("xds:///payment.shop.svc.cluster.local:{p_pay}"),
        true,
        &boot,
        None,
        5,
    );
    assert_eq!(calls, vec!["ok vm-payment"; 5], "cluster -> VM over mTLS");

    // The VM resolves names: its own DNS and the agent's give the same VIPs.
    let vm_dns = "127.0.0.1:15053";
    let inv = dig(
        Some(&ns),
        vm_dns,
        &["+short", "inventory.shop.svc.cluster.local", "A"],
    );
    let inv_agent = dig(
        None,
        &east.dns,
        &["+short", "inventory.shop.svc.cluster.local", "A"],
    );
    assert!(inv.trim().starts_with("240.240.0."), "{inv}");
    assert_eq!(inv.trim(), inv_agent.trim());
    let led = dig(
        Some(&ns),
        vm_dns,
        &["+short", "ledger.shop.svc.clusterset.local", "A"],
    );
    assert!(
        led.trim().starts_with("240.240.0."),
        "imported service, no placeholder: {led}"
    );
    let aaaa = dig(
        Some(&ns),
        vm_dns,
        &["+short", "ledger.shop.svc.cluster.local", "AAAA"],
    );
    assert!(aaaa.trim().starts_with("2001:2::"), "{aaaa}");
    let srv = dig(
        Some(&ns),
        vm_dns,
        &[
            "+short",
            "_grpc._tcp.ledger.shop.svc.clusterset.local",
            "SRV",
        ],
    );
    assert_eq!(
        srv.trim(),
        format!("0 100 {p_led} ledger.shop.svc.clusterset.local.")
    );
    let nx = dig(Some(&ns), vm_dns, &["nope.shop.svc.cluster.local", "A"]);
    assert!(
        nx.contains("status: NXDOMAIN") && nx.contains(" aa"),
        "{nx}"
    );
    // The VM agent serves the metrics of the DNS it runs (NXDOMAIN answers counted).
    let (code, metrics) = ns
        .run(
            "python3",
            &["-c", "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:15020/metrics').read().decode())"],
        )
        .unwrap();
    assert!(
        code == 0
            && metrics
                .lines()
                .any(|l| l.starts_with("meshfed_dns_queries_total{result=\"nxdomain\"}")),
        "{metrics}"
    );
    let v = dig(
        None,
        &east.dns,
        &["+short", "dns-version.clusterset.local", "TXT"],
    );
    assert_eq!(v.trim(), "\"1.0.0\"");

    // The VM reaches a local and an imported service by name (xDS through its relay and the gateway).
    let _inv = py_server("inventory", &format!("{host}:{p_inv}"), None, None, &dir);
    let _led = py_server("ledger", &format!("{host}:{p_led}"), None, None, &dir);
    let vm_boot = certs.join("grpc-bootstrap.json");
    for (svc, port, what) in [
        ("inventory", p_inv, "VM -> cluster service"),
        ("ledger", p_led, "VM -> imported service"),
    ] {
        let target = format!("xds:///{svc}.shop.svc.cluster.local:{port}");
        let calls = py_calls(&target, false, &vm_boot, Some(&ns), 3);
        assert_eq!(calls, vec![format!("ok {svc}"); 3], "{what}");
    }

    // The probe gates health both ways.
    drop(server);
    wait_for(
        Duration::from_secs(20),
        "the failing probe to remove the endpoint",
        || Ok((endpoints(&east, "shop/payment", "east") == 0).then_some(())),
    )
    .unwrap();
    let server = py_server(
        "vm-payment",
        &format!("0.0.0.0:{p_pay}"),
        Some(&certs),
        Some(&ns),
        &dir,
    );
    wait_for(Duration::from_secs(20), "the endpoint back", || {
        Ok((endpoints(&west, "shop/payment", "east") == 1).then_some(()))
    })
    .unwrap();

    // The VM loses its network: keepalives notice the dead stream, the entry goes after the
    // grace period, everywhere; the network returns: the VM re-registers by itself.
    ns.set_link(false).unwrap();
    let t = Instant::now();
    wait_for(
        Duration::from_secs(60),
        "the cut-off VM's entry to be deleted",
        || {
            Ok(
                (entries(&east).is_empty() && endpoints(&west, "shop/payment", "east") == 0)
                    .then_some(()),
            )
        },
    )
    .unwrap();
    println!(
        "VM cut off: entry gone at east and west {:?} later (keepalive ~10 s + grace 2 s)",
        t.elapsed()
    );
    ns.set_link(true).unwrap();
    let t = Instant::now();
    wait_for(Duration::from_secs(60), "the VM to re-register", || {
        Ok((endpoints(&west, "shop/payment", "east") == 1).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.log()));
    println!(
        "VM reconnected: registered and healthy again {:?} after the link came back",
        t.elapsed()
    );

    wait_for(
        Duration::from_secs(20),
        "the WorkloadEntry object written again, Healthy=True",
        || Ok((entry_health(&name).as_deref() == Some("True")).then_some(())),
    )
    .unwrap();
    // kill -9 of the VM agent: the entry goes after the grace period (2 s here), everywhere.
    vm.kill9();
    let t = Instant::now();
    wait_for(Duration::from_secs(30), "the entry to be deleted", || {
        Ok(entries(&east).is_empty().then_some(()))
    })
    .unwrap();
    let gone_east = t.elapsed();
    wait_for(
        Duration::from_secs(30),
        "west to drop the VM's endpoint",
        || Ok((endpoints(&west, "shop/payment", "east") == 0).then_some(())),
    )
    .unwrap();
    println!(
        "entry deleted {gone_east:?} after kill -9 (grace 2 s); gone at west {:?}",
        t.elapsed()
    );
    assert!(
        gone_east >= Duration::from_secs(2),
        "not before the grace period"
    );
    wait_for(
        Duration::from_secs(20),
        "the WorkloadEntry object to be deleted",
        || {
            Ok(api
                .get("WorkloadEntry", "shop", &name)
                .is_none()
                .then_some(()))
        },
    )
    .unwrap();

    // Restart with an expired token in place: the credential brings it back.
    let expired = dir.join("expired-pkg");
    bootstrap_pkg(
        &east,
        Some(&kubeconfig),
        "payment-vm",
        &expired,
        "dir",
        &["--control-plane", &gw, "--token-ttl", "1s"],
    );
    // A token with a 1 s lifetime (whole Unix seconds): wait until the clock is past it.
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
    };
    let expires = unix() + 1;
    wait_for(Duration::from_secs(10), "the 1 s token to expire", || {
        Ok((unix() > expires).then_some(()))
    })
    .unwrap();
    std::fs::copy(
        expired.join("join-token"),
        vmroot.join("etc/meshfed/join-token"),
    )
    .unwrap();
    vm.start().unwrap();
    wait_for(
        Duration::from_secs(30),
        "the VM back with its credential",
        || Ok((endpoints(&west, "shop/payment", "east") == 1).then_some(())),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.log()));
    assert!(
        vm.log().contains("reconnected with the VM credential"),
        "{}",
        vm.log()
    );

    // Rebooted while its network is down: it starts on the workload certificate it has (its
    // DNS and files keep serving) and registers when the network returns.
    vm.kill9();
    ns.set_link(false).unwrap();
    vm.start().unwrap();
    wait_for(
        Duration::from_secs(30),
        "the VM agent to start without its control plane",
        || {
            Ok(vm
                .log()
                .contains("starting with the current workload certificate")
                .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.log()));
    let (code, out) = ns.run("python3", &["-c", "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:15020/status').read().decode())"]).unwrap();
    assert!(code == 0 && out.contains("\"connected\":false"), "{out}");
    ns.set_link(true).unwrap();
    wait_for(
        Duration::from_secs(60),
        "the VM to register once its network is back",
        || {
            Ok((endpoints(&west, "shop/payment", "east") == 1
                && entries(&east).iter().any(|e| e["connected"] == true))
            .then_some(()))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.log()));
    drop(server);
    east.agent().unwrap().kill9();
}
