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
