//! A command that fails leaves nothing behind (issue 19): what it refuses, it refuses before it
//! writes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{meshfed, run};

#[test]
fn a_token_for_a_directory_that_is_not_a_federators_creates_nothing() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("not-a-federator");
    for exists in [false, true] {
        if exists {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let r = run(meshfed()
            .args(["federator", "token", "create", "--state-dir"])
            .arg(&dir)
            .args(["--cluster", "east", "--federator", "127.0.0.1:15100"]));
        assert_ne!(r.code, 0, "{}", r.stdout);
        assert!(
            r.stderr.contains("is not a federator's state directory"),
            "{}",
            r.stderr
        );
        assert!(r.stdout.is_empty(), "no token is printed: {}", r.stdout);
        if exists {
            assert_eq!(
                std::fs::read_dir(&dir).unwrap().count(),
                0,
                "nothing is created"
            );
        } else {
            assert!(!dir.exists(), "the directory is not created");
        }
    }
}
