//! Helpers for tests that run the `meshfed` binary and third-party peers.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

pub fn meshfed() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meshfed"))
}

pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(cmd: &mut Command) -> Run {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("spawn");
    let r = Run {
        code: status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    };
    assert!(
        !r.stderr.contains("panicked"),
        "the command panicked: {}",
        r.stderr
    );
    r
}

pub fn ok(cmd: &mut Command) -> Run {
    let r = run(cmd);
    assert_eq!(
        r.code, 0,
        "command failed: {:?}\nstdout: {}\nstderr: {}",
        cmd, r.stdout, r.stderr
    );
    r
}

pub fn ca_init(dir: &Path, td: &str) {
    ok(meshfed()
        .args(["ca", "init", "--trust-domain", td, "--out"])
        .arg(dir));
}

pub fn ca_issue(ca: &Path, id: &str, out: &Path) {
    ok(meshfed()
        .args(["ca", "issue", "--ca"])
        .arg(ca)
        .args(["--spiffe-id", id, "--out"])
        .arg(out));
}

/// The openssl binary; the test suite's set-up (scripts/test) installs it.
pub fn openssl() -> Command {
    let probe = Command::new("openssl").arg("version").output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "openssl is required for interop tests; scripts/test installs it (apt-get install openssl)"
    );
    Command::new("openssl")
}
