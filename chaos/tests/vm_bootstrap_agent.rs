//! `meshfed vm bootstrap --agent`: a VM package made at the running agent, with no access to
//! its state directory. The operator's Kubernetes bearer token is judged by the API server
//! (the double's TokenReview and SubjectAccessReview); a VM joins with the package.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use chaos::apiserver::{ApiServer, Token};
use chaos::*;

const ADMIN: &str = "system:serviceaccount:ops:vm-admin";

fn group(name: &str, sa: &str) -> serde_json::Value {
    serde_json::json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadGroup",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"metadata": {"labels": {"app": name}}, "template": {"serviceAccount": sa}}})
}

fn bearer(api: &ApiServer, dir: &Path, name: &str, ns: &str, sa: &str, aud: &str) -> String {
    let text = format!("bearer-{name}-{}", free_port());
    api.add_token(
        &text,
        Token {
            namespace: ns.into(),
            service_account: sa.into(),
            audiences: vec![aud.into()],
            pod: None,
            expired: false,
        },
    );
    let p = dir.join(format!("{name}.bearer"));
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn a_vm_package_is_made_at_the_running_agent_for_an_authorized_user_only() {
    let api = ApiServer::start().unwrap();
    let f = Federation::start("5s").unwrap();
    let dir = f.root.path().to_path_buf();
    let kubeconfig = api.kubeconfig(&dir.join("kubeconfig")).unwrap();
    api.apply(group("payment-vm", "payment")).unwrap();
    api.apply(group("ledger-vm", "ledger")).unwrap();
    // The operator may update payment-vm's group, not ledger-vm's.
    api.allow(
        ADMIN,
        "update",
        "networking.istio.io",
        "workloadgroups",
        "shop",
        "payment-vm",
    );
    let east = f
        .add_kube_cluster(
            "east",
            "net1",
            "us-east1/us-east1-b",
            "services: []\n",
            &kubeconfig,
        )
        .unwrap();
    let root = east.dir.join("ca/root-cert.pem").display().to_string();
    let admin = bearer(
        &api,
        &dir,
        "admin",
        "ops",
        "vm-admin",
        "https://kubernetes.default.svc",
    );
    let remote = |group: &str, token: &str, out: &Path| {
        meshfed(&[
            "vm",
            "bootstrap",
            "--agent",
            &east.xds_mtls,
            "--root-cert",
            &root,
            "--trust-domain",
            "east.mesh",
            "--bearer-token-file",
            token,
            "--group",
            group,
            "--namespace",
            "shop",
            "--out",
            out.to_str().unwrap(),
            "--control-plane",
            &east.vm_api,
            "--xds",
            &east.xds_mtls,
        ])
        .unwrap()
    };
    let pkg = dir.join("payment-vm");
    wait_for(Duration::from_secs(20), "a package from the agent", || {
        let (code, out, err) = remote("payment-vm", &admin, &pkg);
        // The agent may not have read the group from the API yet.
        if code != 0 && err.contains("does not exist") {
            let _ = std::fs::remove_dir_all(&pkg);
            return Ok(None);
        }
        assert_eq!(code, 0, "{err}");
        Ok(Some(out))
    })
    .map(|out| assert!(out.contains("one-time token"), "{out}"))
    .unwrap();
    let yaml = std::fs::read_to_string(pkg.join("vm.yaml")).unwrap();
    assert!(
        yaml.contains("cluster: east")
            && yaml.contains("serviceAccount: payment")
            && yaml.contains("group: payment-vm"),
        "{yaml}"
    );
    assert_eq!(
        std::fs::read_to_string(pkg.join("root-cert.pem")).unwrap(),
        std::fs::read_to_string(&root).unwrap()
    );
    // The token lives in the agent's own store.
    let listed = meshfed_ok(&["vm", "list", "--state-dir", east.dir.to_str().unwrap()]).unwrap();
    assert!(
        listed.contains("workloadgroup shop/payment-vm as payment"),
        "{listed}"
    );

    // Refusals, named: a group the user may not update; a token for another audience (a pod's
    // CA token); no such token; and an agent checked against another cluster's root.
    let (code, _, err) = remote("ledger-vm", &admin, &dir.join("ledger-vm"));
    assert_ne!(code, 0);
    assert!(
        err.contains("PERMISSION_DENIED")
            || err.contains(&format!(
                "{ADMIN} may not update workloadgroups.networking.istio.io shop/ledger-vm"
            )),
        "{err}"
    );
    assert!(err.contains("may not update"), "{err}");
    let pod = bearer(&api, &dir, "pod", "ops", "vm-admin", "istio-ca");
    let (code, _, err) = remote("payment-vm", &pod, &dir.join("p2"));
    assert_ne!(code, 0);
    assert!(err.contains("the token was not accepted"), "{err}");
    let nobody = dir.join("nobody.bearer");
    std::fs::write(&nobody, "not-a-token").unwrap();
    let (code, _, err) = remote("payment-vm", nobody.to_str().unwrap(), &dir.join("p3"));
    assert_ne!(code, 0);
    assert!(err.contains("the token was not accepted"), "{err}");
    assert!(!dir.join("p2").exists() && !dir.join("p3").exists());
    let listed = meshfed_ok(&["vm", "list", "--state-dir", east.dir.to_str().unwrap()]).unwrap();
    assert_eq!(
        listed.matches("valid for").count(),
        1,
        "only the authorized call made a token:\n{listed}"
    );

    // A package that cannot be written: its token is revoked at the agent.
    let afile = dir.join("afile");
    std::fs::write(&afile, "a file").unwrap();
    let (code, _, err) = remote("payment-vm", &admin, &afile.join("pkg"));
    assert_ne!(code, 0);
    assert!(err.contains("was revoked at the agent"), "{err}");
    let listed = meshfed_ok(&["vm", "list", "--state-dir", east.dir.to_str().unwrap()]).unwrap();
    assert_eq!(listed.matches("revoked").count(), 1, "{listed}");

    // The VM joins with the package made at the agent (on this host: its files and listeners
    // move under the test's directory, as docs/quickstart.md does).
    let mut yaml = yaml;
    yaml.push_str(&format!(
        "rootCert: {}\ntokenFile: {}\nstateDir: {}\ncertDir: {}\naddress: 127.0.0.1\n\
         xdsListen: off\ndnsListen: off\nadmin: 127.0.0.1:{}\n",
        pkg.join("root-cert.pem").display(),
        pkg.join("join-token").display(),
        dir.join("vm-state").display(),
        dir.join("vm-certs").display(),
        free_port()
    ));
    let cfg = dir.join("vm.yaml");
    std::fs::write(&cfg, yaml).unwrap();
    let mut vm = Proc::spawn(
        "vm-agent",
        &[
            "vm".into(),
            "agent".into(),
            "--config".into(),
            cfg.display().to_string(),
        ],
        &dir,
    )
    .unwrap();
    wait_for(Duration::from_secs(30), "the VM's WorkloadEntry", || {
        assert!(!vm.exited(), "{}", vm.log());
        let s = east.status()?;
        let entries = s["workload_entries"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(entries
            .iter()
            .any(|e| e["group"] == "payment-vm" && e["connected"] == true)
            .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", vm.log()));
    let svid = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(dir.join("vm-certs/cert-chain.pem"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&svid.stdout).contains("URI:spiffe://east.mesh/ns/shop/sa/payment"),
        "{svid:?}"
    );
    vm.term().unwrap();
}
