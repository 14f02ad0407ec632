//! Config before bind: every flag of `meshfed agent` is parsed and checked before anything
//! starts. A bad value exits 2 naming the flag, even where the state directory does not exist
//! (which would be the first thing the agent reads) and nothing is bound or written.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;

#[test]
fn a_bad_agent_flag_exits_2_naming_it_before_anything_starts() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("never-created");
    for (flag, value, says) in [
        ("--xds-debounce", "5s", "more than 1s"),
        ("--xds-debounce", "soon", "is not a duration"),
        ("--admin", "localhost:15014", "is not IP:PORT"),
        ("--xds-plaintext", "0.0.0.0", "is not IP:PORT"),
        ("--xds-mtls", "nowhere:1", "is not IP:PORT"),
        ("--vm-api", "1.2.3.4:99999", "is not IP:PORT"),
        ("--dns", "::1", "is not IP:PORT"),
        ("--dns-upstream", "resolver.example", "is not IP or IP:PORT"),
        ("--vip-range-v6", "2001:2::/200", ""),
        ("--vm-grace", "0s", "must be positive"),
        ("--token-audience", "istio ca", "is not an audience"),
        ("--serving-dns-name", "agent-.example", "is not a DNS name"),
        ("--serving-dns-name", "agent..example", "is not a DNS name"),
    ] {
        let r = run(meshfed().args([
            "agent",
            "--state-dir",
            state.to_str().unwrap(),
            "--registry",
            "/nonexistent/registry.yaml",
            flag,
            value,
        ]));
        assert_eq!(r.code, 2, "{flag} {value}: {}", r.stderr);
        assert!(r.stderr.contains(flag), "{flag} {value}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{flag} {value}: {}", r.stderr);
        assert!(!state.exists(), "{flag} {value}: nothing was written");
    }
}

/// The source: `--source file` needs `--registry`; a kubeconfig that cannot be read stops the
/// agent before anything is bound or written, naming the file.
#[test]
fn the_agent_source_flags_are_checked_before_anything_starts() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("never-created");
    let r = run(meshfed().args(["agent", "--state-dir", state.to_str().unwrap()]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--registry"), "{}", r.stderr);
    let r = run(meshfed().args([
        "agent",
        "--state-dir",
        state.to_str().unwrap(),
        "--source",
        "kubernetes",
        "--kubeconfig",
        "/nonexistent/kubeconfig",
    ]));
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("/nonexistent/kubeconfig"), "{}", r.stderr);
    let r = run(meshfed().args([
        "agent",
        "--state-dir",
        state.to_str().unwrap(),
        "--source",
        "etcd",
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--source"), "{}", r.stderr);
    // A selector that does not parse names the flag and the requirement.
    let r = run(meshfed().args([
        "agent",
        "--state-dir",
        state.to_str().unwrap(),
        "--source",
        "kubernetes",
        "--namespace-selector",
        "env in prod",
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("--namespace-selector")
            && r.stderr
                .contains("\"env in prod\": the values must be in parentheses"),
        "{}",
        r.stderr
    );
    // And it is for the Kubernetes source only.
    let r = run(meshfed().args([
        "agent",
        "--state-dir",
        state.to_str().unwrap(),
        "--registry",
        "/nonexistent/registry.yaml",
        "--namespace-selector",
        "team=pay",
    ]));
    assert_ne!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("--namespace-selector is for --source kubernetes"),
        "{}",
        r.stderr
    );
    assert!(!state.exists(), "nothing was written");
}

#[test]
fn bad_federator_and_gateway_flags_exit_2_naming_them_before_anything_starts() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("never-created");
    for (flag, value, says) in [
        ("--listen", "localhost:15100", "is not IP:PORT"),
        ("--admin", "15101", "is not IP:PORT"),
        ("--advertise", "fed.example", "host:port"),
        ("--lease-ttl", "0s", "must be positive"),
        ("--rate-limit", "0", "0 is not in 1.."),
        ("--max-services-per-cluster", "0", "0 is not in 1.."),
        ("--max-services-per-cluster", "many", "invalid digit"),
        ("--drain-timeout", "later", "is not a duration"),
    ] {
        let r = run(meshfed().args([
            "federator",
            "--state-dir",
            state.to_str().unwrap(),
            flag,
            value,
        ]));
        assert_eq!(r.code, 2, "{flag} {value}: {}", r.stderr);
        assert!(r.stderr.contains(flag), "{flag} {value}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{flag} {value}: {}", r.stderr);
        assert!(!state.exists(), "{flag} {value}: nothing was written");
    }
    for (flag, value, says) in [
        ("--listen", "*:15443", "is not IP:PORT"),
        ("--admin", "localhost", "is not IP:PORT"),
        ("--xds", "agent", "host:port"),
        ("--max-connections", "0", "0 is not in 1.."),
        ("--drain-timeout", "0s", "must be positive"),
    ] {
        let r = run(meshfed().args(["gateway", flag, value]));
        assert_eq!(r.code, 2, "{flag} {value}: {}", r.stderr);
        assert!(r.stderr.contains(flag), "{flag} {value}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{flag} {value}: {}", r.stderr);
    }
}

/// SIGTERM drains: /healthz and /readyz answer from the tasks while serving, the process
/// says what the drain did and exits 0 well inside its deadline.
/// The store flags: each mistake named, before anything is written or dialed.
#[test]
fn the_federators_etcd_flags_are_checked_before_anything_starts() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("never-created");
    let pem = d.path().join("x.pem");
    let pem = pem.to_str().unwrap();
    for (args, says) in [
        (
            vec!["--store", "etcd"],
            "--store etcd needs --etcd-endpoints",
        ),
        (vec!["--max-tls-handshakes", "0"], "--max-tls-handshakes"),
        (
            vec!["--tombstone-compaction", "soon"],
            "--tombstone-compaction",
        ),
        (
            vec!["--etcd-endpoints", "127.0.0.1:2379"],
            "--etcd-endpoints is for --store etcd",
        ),
        (
            vec![
                "--store",
                "etcd",
                "--etcd-endpoints",
                "127.0.0.1:2379",
                "--etcd-ca",
                pem,
            ],
            "--etcd-ca, --etcd-cert and --etcd-key go together",
        ),
        (
            vec![
                "--store",
                "etcd",
                "--etcd-endpoints",
                "127.0.0.1:2379,etcd2",
            ],
            "--etcd-endpoints #2 (\"etcd2\")",
        ),
        (
            vec![
                "--store",
                "etcd",
                "--etcd-endpoints",
                "ftp://127.0.0.1:2379",
            ],
            "scheme \"ftp\"",
        ),
        (
            vec![
                "--store",
                "etcd",
                "--etcd-endpoints",
                "https://127.0.0.1:2379",
            ],
            "https:// needs --etcd-ca",
        ),
        (
            vec![
                "--store",
                "etcd",
                "--etcd-endpoints",
                "127.0.0.1:2379",
                "--etcd-prefix",
                "meshfed",
            ],
            "--etcd-prefix \"meshfed\"",
        ),
        (
            vec!["--store", "zookeeper"],
            "invalid value 'zookeeper' for '--store",
        ),
    ] {
        let r = run(meshfed()
            .args(["federator", "--state-dir", state.to_str().unwrap()])
            .args(&args));
        assert_ne!(r.code, 0, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
        assert!(!state.exists(), "{args:?}: nothing was written");
    }
    // The token commands take a state directory or etcd, exactly one.
    for (args, says) in [
        (
            vec![],
            "--state-dir (a sled federator) or --etcd-endpoints (replicas) is required",
        ),
        (
            vec![
                "--state-dir",
                state.to_str().unwrap(),
                "--etcd-endpoints",
                "127.0.0.1:2379",
            ],
            "give one",
        ),
    ] {
        let r = run(meshfed().args(["federator", "token", "list"]).args(&args));
        assert_ne!(r.code, 0, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
    // The admin API's flags, each mistake named before anything is dialled or written.
    let ops = d.path().join("ops");
    let st = state.to_str().unwrap();
    for (args, says) in [
        (
            vec!["token", "list", "--admin-identity", "/x", "--state-dir", st],
            "without --state-dir or --etcd-endpoints",
        ),
        (
            vec!["token", "list", "--state-dir", st, "--api", "h:1"],
            "--api needs --admin-identity",
        ),
        (vec!["evict", "east"], "pass --admin-identity DIR"),
        (vec!["evict", "East_1"], "east_1"),
        (
            vec!["evict", "east", "--admin-identity", "/nonexistent"],
            "admin.json not found",
        ),
        (
            vec![
                "admin-identity",
                "--state-dir",
                st,
                "--name",
                "ops",
                "--ttl",
                "30d",
                "--out",
                ops.to_str().unwrap(),
            ],
            "an admin certificate lives 1m to 7d",
        ),
        (
            vec![
                "admin-identity",
                "--state-dir",
                st,
                "--name",
                "Ops!",
                "--out",
                ops.to_str().unwrap(),
            ],
            "--name",
        ),
        (
            vec![
                "admin-identity",
                "--state-dir",
                st,
                "--name",
                "ops",
                "--api",
                "nohost",
                "--out",
                ops.to_str().unwrap(),
            ],
            "--api #1",
        ),
        (
            vec![
                "admin-identity",
                "--state-dir",
                st,
                "--name",
                "ops",
                "--out",
                ops.to_str().unwrap(),
            ],
            "holds no federation CA",
        ),
    ] {
        let r = run(meshfed().arg("federator").args(&args));
        assert_ne!(r.code, 0, "{args:?}: {}", r.stderr);
        assert!(
            r.stderr.to_lowercase().contains(&says.to_lowercase()),
            "{args:?}: {}",
            r.stderr
        );
        assert!(!ops.exists(), "{args:?}: nothing was written");
    }
}

#[test]
fn sigterm_drains_the_federator_and_it_exits_0() {
    use std::io::{BufRead, BufReader, Read, Write};
    let d = tempfile::tempdir().unwrap();
    let mut child = meshfed()
        .args([
            "federator",
            "--state-dir",
            d.path().join("fed").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--trust-domain",
            "fed.mesh",
            "--drain-timeout",
            "20s",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    // "federator serving on 127.0.0.1:P (admin 127.0.0.1:Q)"
    let admin = line
        .split("(admin ")
        .nth(1)
        .and_then(|s| s.strip_suffix(")\n"))
        .unwrap_or_else(|| panic!("{line}"))
        .to_string();
    let get = |path: &str| -> String {
        let mut s = std::net::TcpStream::connect(&admin).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body
    };
    let h = get("/healthz");
    assert!(h.starts_with("HTTP/1.1 200") && h.ends_with("ok\n"), "{h}");
    let r = get("/readyz");
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("ready\n"),
        "{r}"
    );
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = child.wait().unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert_eq!(status.code(), Some(0), "{rest}");
    assert!(rest.contains("draining (deadline 20s)"), "{rest}");
    // Nothing had to be cut: no stream was open, every server stopped by itself.
    let drained = rest
        .lines()
        .find_map(|l| l.strip_prefix("drained in "))
        .unwrap_or_else(|| panic!("{rest}"));
    assert!(drained.ends_with(" ms"), "{rest}");
}

/// The default binds docs/architecture.md lists per port: only what must be reached from other
/// hosts listens on every address; plaintext and unauthenticated ports are local.
#[test]
fn default_binds_are_what_the_ports_table_says() {
    let help = |cmd: &[&str]| run(meshfed().args(cmd).arg("--help")).stdout;
    let agent = help(&["agent"]);
    let federator = help(&["federator"]);
    let gateway = help(&["gateway"]);
    let flag_default = |text: &str, flag: &str| -> String {
        // clap prints `--flag <FLAG>` then the help, with `[default: X]` before the next flag.
        let at = text
            .find(&format!("{flag} <"))
            .unwrap_or_else(|| panic!("{flag} in {text}"));
        let rest = &text[at..];
        let end = rest[2..].find("\n  -").map(|e| e + 2).unwrap_or(rest.len());
        let part = &rest[..end];
        part.split("[default: ")
            .nth(1)
            .and_then(|d| d.split(']').next())
            .unwrap_or_else(|| panic!("no default for {flag}: {part}"))
            .to_string()
    };
    for (text, flag, want) in [
        (&agent, "--xds-plaintext", "127.0.0.1:15010"),
        (&agent, "--xds-mtls", "0.0.0.0:15012"),
        (&agent, "--vm-api", "0.0.0.0:15018"),
        (&agent, "--admin", "127.0.0.1:15014"),
        (&agent, "--dns", "127.0.0.1:15053"),
        (&federator, "--listen", "0.0.0.0:15100"),
        (&federator, "--admin", "127.0.0.1:15101"),
        (&gateway, "--listen", "0.0.0.0:15443"),
        (&gateway, "--admin", "127.0.0.1:15021"),
    ] {
        assert_eq!(flag_default(text, flag), want, "{flag}");
    }
}

/// Issue 19: what a newcomer mistypes is refused at once, naming the flag and the value,
/// without a stray prefix; nothing starts.
#[test]
fn mistyped_paths_hosts_and_labels_are_refused_naming_them() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("state");
    let registry = d.path().join("registry.yaml");
    std::fs::write(&registry, "services: []\n").unwrap();
    // A registry file that does not exist.
    let r = run(meshfed().args([
        "agent",
        "--state-dir",
        state.to_str().unwrap(),
        "--registry",
        "/nonexistent/registry.yaml",
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("--registry /nonexistent/registry.yaml: no such file"),
        "{}",
        r.stderr
    );
    // A policy directory that does not exist.
    let r = run(meshfed().args([
        "agent",
        "--state-dir",
        state.to_str().unwrap(),
        "--registry",
        registry.to_str().unwrap(),
        "--policy",
        "/nonexistent/policies",
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("--policy /nonexistent/policies: no such file or directory"),
        "{}",
        r.stderr
    );
    // A state directory that is a file, for the agent and for join.
    let afile = d.path().join("afile");
    std::fs::write(&afile, "x").unwrap();
    let r = run(meshfed().args([
        "agent",
        "--state-dir",
        afile.to_str().unwrap(),
        "--registry",
        registry.to_str().unwrap(),
    ]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("is a file, not a directory"),
        "{}",
        r.stderr
    );
    let join = |state: &str, cluster: &str, gateway: &str| {
        run(meshfed().args([
            "join",
            "--token",
            "mft1.x",
            "--state-dir",
            state,
            "--cluster",
            cluster,
            "--network",
            "net",
            "--trust-domain",
            "east.mesh",
            "--locality",
            "us-east1",
            "--gateway",
            gateway,
        ]))
    };
    let r = join(afile.to_str().unwrap(), "east", "gw:15443");
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("is a file, not a directory"),
        "{}",
        r.stderr
    );
    // A URL where a host:port goes, and a label with no "value:" prefix in its reason.
    let r = join(state.to_str().unwrap(), "east", "http://127.0.60.1:15443");
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("--gateway") && r.stderr.contains("is a URL or a path, not a host"),
        "{}",
        r.stderr
    );
    let r = join(state.to_str().unwrap(), "C_4", "gw:15443");
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("\"C_4\" is not a DNS label"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("value:"), "{}", r.stderr);
    assert!(!state.exists(), "nothing was created");
}

/// Issue 19: `policy check --endpoints` errors are located (file:line:column), as the parser's.
#[test]
fn policy_check_endpoint_errors_are_located() {
    let d = tempfile::tempdir().unwrap();
    let eps = d.path().join("eps.yaml");
    std::fs::write(
        &eps,
        "endpoints:\n  - {address: \"10.1.0.5:8080\", locality: us-east1/us-east1-b}\n  - {address: \"10.1.0.6\", locality: us-east1/us-east1-c}\n",
    )
    .unwrap();
    let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/examples/payment-failover.yaml");
    let r = run(meshfed()
        .args(["policy", "check", "-f"])
        .arg(&policy)
        .arg("--endpoints")
        .arg(&eps)
        .args(["--proxy-locality", "us-east1/us-east1-b"]));
    assert_eq!(r.code, 2, "{}", r.stderr);
    let want = format!(
        "{}:3:15: endpoints[1].address: \"10.1.0.6\" is not ip:port",
        eps.display()
    );
    assert!(r.stderr.contains(&want), "{}\nwanted {want}", r.stderr);
}

/// A command whose reader goes away (`meshfed crds | head -1`) ends quietly, without a panic.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let mut child = meshfed()
        .args(["crds", "--mcs"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away at once (before the command has written: a pipe with no reader
    // fails every write with EPIPE).
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
}

/// The injection webhook's and `meshfed workload`'s flags are checked before anything starts,
/// each refusal naming the flag.
#[test]
fn injection_and_workload_flags_are_checked_naming_them() {
    let d = tempfile::tempdir().unwrap();
    let state = d.path().join("never-created");
    let registry = d.path().join("registry.yaml");
    std::fs::write(&registry, "services: []\n").unwrap();
    let agent = |extra: &[&str]| {
        let mut args = vec![
            "agent",
            "--state-dir",
            state.to_str().unwrap(),
            "--registry",
            registry.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        run(meshfed().args(args))
    };
    let r = agent(&[
        "--injection-webhook",
        "127.0.0.1:0",
        "--injection-image",
        "m:1",
    ]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains("--injection-webhook is for --source kubernetes"),
        "{}",
        r.stderr
    );
    let r = agent(&["--injection-webhook", "not-an-address"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--injection-webhook"), "{}", r.stderr);
    let r = agent(&["--injection-image", "m:1"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--injection-webhook"), "{}", r.stderr);
    assert!(!state.exists(), "nothing was written");

    let workload = |extra: &[&str]| {
        let mut args = vec![
            "workload",
            "init",
            "--trust-domain",
            "east.mesh",
            "--namespace",
            "shop",
            "--service-account",
            "client",
        ];
        args.extend_from_slice(extra);
        run(meshfed().args(args).env_remove("MESHFED_ROOT_CERTS"))
    };
    for (flag, value) in [
        ("--pod-ip", "10.0.0.300"),
        ("--agent", "http://agent"),
        ("--xds-listen", "loopback"),
        ("--cert-ttl", "soon"),
    ] {
        let r = workload(&[flag, value]);
        assert_eq!(r.code, 2, "{flag}: {}", r.stderr);
        assert!(r.stderr.contains(flag), "{flag}: {}", r.stderr);
    }
    let r = workload(&["--trust-domain", "Not A Domain"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("--trust-domain"), "{}", r.stderr);
    // Without roots there is nothing to check the agent with: said before anything is asked.
    let r = workload(&["--out", d.path().join("out").to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("--root-cert FILE or MESHFED_ROOT_CERTS"),
        "{}",
        r.stderr
    );
    let r = workload(&[
        "--out",
        d.path().join("out").to_str().unwrap(),
        "--xds-listen",
        "127.0.0.1:0",
        "--root-cert",
        "/nonexistent/roots.pem",
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("0 is for `agent` only"), "{}", r.stderr);
}
