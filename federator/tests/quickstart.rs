//! docs/quickstart.md, run as written: every ```sh block in order, in one bash (`set -eu -o
//! pipefail`), in an empty directory, with this build's `meshfed` on the PATH. Its own `until`
//! loops wait for each step; a step that fails fails the test with the output so far.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn blocks(doc: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in doc.lines() {
        if line.trim_start().starts_with("```") {
            inside = !inside && line.trim() == "```sh";
            continue;
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn the_quickstart_runs_as_written() {
    if Command::new("dig").arg("-v").output().is_err() {
        println!("SKIP the_quickstart_runs_as_written: needs dig (scripts/test installs it)");
        return;
    }
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/quickstart.md"),
    )
    .unwrap();
    let script = blocks(&doc);
    assert!(script.contains("meshfed federator") && script.contains("meshfed vm agent"));
    let d = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_BIN_EXE_meshfed")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = d.path().join("quickstart.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new("bash")
        .args(["-c", &format!("set -eu -o pipefail\n{script}")])
        .current_dir(d.path())
        .env("PATH", path)
        .env("MESHFED_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .process_group(0)
        .spawn()
        .unwrap();
    // The script's end, waited for on its own thread; a step that never completes fails the
    // test after 180 s (a guard, not a measurement).
    let pgid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let status = rx
        .recv_timeout(Duration::from_secs(180))
        .ok()
        .map(Result::unwrap);
    // Whatever the script started is stopped with it (its last block does so itself).
    let _ = Command::new("kill")
        .args(["-9", "--", &format!("-{pgid}")])
        .status();
    let mut text = String::new();
    std::fs::File::open(&log)
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    match status {
        Some(s) if s.success() => {}
        Some(s) => panic!("the quickstart failed ({s}):\n{text}"),
        None => panic!("the quickstart did not finish within 180 s:\n{text}"),
    }
    // What a reader is told to look at is there.
    assert!(text.contains("shop/payment-vm"), "{text}");
    assert!(text.contains("east"), "{text}");
}
