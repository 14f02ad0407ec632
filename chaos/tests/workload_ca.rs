//! Pods obtain their certificates from the agent's CA API (Istio's
//! `IstioCertificateService/CreateCertificate` on the mTLS xDS port), authenticated by their
//! service-account token through a TokenReview (the API-server double judges the tokens as a
//! kube-apiserver does). The client is grpcio (Python) with a key and CSR made by openssl;
//! the certificate it gets is checked by `openssl verify` against the cluster's root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use chaos::apiserver::{ApiServer, Token};
use chaos::*;

fn token(ns: &str, sa: &str, aud: &str, expired: bool) -> Token {
    Token {
        namespace: ns.into(),
        service_account: sa.into(),
        audiences: vec![aud.into()],
        pod: Some(format!("{sa}-0")),
        expired,
    }
}

/// A P-256 key and a CSR whose one URI SAN is `id`, made by openssl.
fn csr(dir: &Path, name: &str, id: &str) -> std::path::PathBuf {
    let key = dir.join(format!("{name}.key"));
    let out = dir.join(format!("{name}.csr"));
    let st = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-subj", "/O=meshfed-test", "-addext"])
        .arg(format!("subjectAltName=URI:{id}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    out
}

/// One CreateCertificate call by grpcio: the first output line, then the PEM chain.
fn call(c: &Cluster, roots: &Path, csr: &Path, token: Option<&Path>) -> (String, String) {
    let mut cmd = Command::new(python().unwrap());
    cmd.arg(py_script("ca_client.py"))
        .args(["--addr", &c.xds_mtls])
        .args(["--server-name", "meshfed-agent.meshfed-system.svc"])
        .arg("--roots")
        .arg(roots)
        .arg("--csr")
        .arg(csr)
        .args(["--seconds", "3600"]);
    if let Some(t) = token {
        cmd.arg("--token-file").arg(t);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
    (first.to_string(), rest.to_string())
}

#[test]
fn a_pod_obtains_exactly_its_service_accounts_certificate_with_its_token() {
    let api = ApiServer::start().unwrap();
    let f = Federation::start("5s").unwrap();
    let kubeconfig = api.kubeconfig(&f.root.path().join("kubeconfig")).unwrap();
    let dir = f.root.path().join("pod");
    std::fs::create_dir_all(&dir).unwrap();
    let tokens = [
        ("payment", token("shop", "payment", "istio-ca", false)),
        ("other-ns", token("billing", "payment", "istio-ca", false)),
        ("expired", token("shop", "payment", "istio-ca", true)),
        (
            "api-audience",
            token("shop", "payment", "https://kubernetes.default.svc", false),
        ),
    ];
    for (name, t) in &tokens {
        let text = format!("token-{name}-{}", free_port());
        api.add_token(&text, t.clone());
        std::fs::write(dir.join(format!("{name}.token")), text).unwrap();
    }
    let east = f
        .add_kube_cluster(
            "east",
            "net-e",
            "us-east1/us-east1-b",
            "services: []\n",
            &kubeconfig,
        )
        .unwrap();
    let roots = east.dir.join("ca").join("root-cert.pem");
    let want = "spiffe://east.mesh/ns/shop/sa/payment";
    let payment_csr = csr(&dir, "payment", want);
    let tok = |name: &str| dir.join(format!("{name}.token"));

    // The pod's own token: a certificate for exactly its service account, leaf first, the
    // root last, that openssl verifies against the cluster's root.
    let (line, chain) = call(&east, &roots, &payment_csr, Some(&tok("payment")));
    assert_eq!(line, "ok 3", "{line}");
    let pems: Vec<String> = chain
        .split_inclusive("-----END CERTIFICATE-----\n")
        .map(str::to_string)
        .collect();
    assert_eq!(pems.len(), 3, "{chain}");
    std::fs::write(dir.join("leaf.pem"), &pems[0]).unwrap();
    std::fs::write(dir.join("signer.pem"), &pems[1]).unwrap();
    std::fs::write(dir.join("root.pem"), &pems[2]).unwrap();
    let v = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&roots)
        .arg("-untrusted")
        .arg(dir.join("signer.pem"))
        .arg(dir.join("leaf.pem"))
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    let x = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(dir.join("leaf.pem"))
        .output()
        .unwrap();
    let san = String::from_utf8_lossy(&x.stdout);
    assert!(san.contains(&format!("URI:{want}")), "{san}");
    let root_file = std::fs::read_to_string(&roots).unwrap();
    assert!(
        root_file.contains(pems[2].trim()),
        "the last PEM is a root of the bundle"
    );

    // Refusals, each with its reason.
    let cases = [
        (
            csr(&dir, "order", "spiffe://east.mesh/ns/shop/sa/order"),
            Some(tok("payment")),
            "err PERMISSION_DENIED token of shop/payment may obtain only spiffe://east.mesh/ns/shop/sa/payment",
        ),
        (
            payment_csr.clone(),
            Some(tok("other-ns")),
            "err PERMISSION_DENIED token of billing/payment may obtain only spiffe://east.mesh/ns/billing/sa/payment",
        ),
        (
            payment_csr.clone(),
            Some(tok("expired")),
            "err UNAUTHENTICATED the token was not accepted: [invalid bearer token, service account token has expired]",
        ),
        (
            payment_csr.clone(),
            Some(tok("api-audience")),
            "err UNAUTHENTICATED the token was not accepted: [invalid bearer token, token audiences",
        ),
        (
            payment_csr.clone(),
            None,
            "err UNAUTHENTICATED no credential",
        ),
    ];
    for (csr, token, want) in &cases {
        let (line, _) = call(&east, &roots, csr, token.as_deref());
        assert!(line.starts_with(want), "{line}\nwanted: {want}");
    }
    let count = |r: &str| {
        metric(
            &east.admin,
            &format!("meshfed_ca_requests_total{{result=\"{r}\"}}"),
        )
        .unwrap()
        .unwrap_or(0.0)
    };
    assert_eq!(count("issued"), 1.0);
    assert_eq!(count("denied"), 2.0);
    assert_eq!(count("unauthenticated"), 3.0);
    let reviews = api.requests("POST /apis/authentication.k8s.io/v1/tokenreviews");
    assert_eq!(reviews, 5, "one TokenReview per call with a token");

    // An unreachable API server: a token cannot be checked now (UNAVAILABLE), not "refused".
    api.set_down(true);
    let (line, _) = call(&east, &roots, &payment_csr, Some(&tok("payment")));
    assert!(
        line.starts_with("err UNAVAILABLE the token cannot be checked now"),
        "{line}"
    );
    api.set_down(false);
    wait_for(Duration::from_secs(20), "a token is accepted again", || {
        let (line, _) = call(&east, &roots, &payment_csr, Some(&tok("payment")));
        Ok((line == "ok 3").then_some(()))
    })
    .unwrap();
}
