//! `meshfed demo` cleans up after itself: SIGTERM in the middle of the scripted run (traffic
//! flowing, every process up) leaves no meshfed process, no network namespace and no veth
//! link behind. In namespace mode when root with `ip netns`, loopback otherwise (then only
//! processes are checked).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use chaos::*;

fn leftovers(pid: u32, state: &str) -> Vec<String> {
    let mut out = Vec::new();
    let ns = Command::new("ip").args(["netns", "list"]).output();
    if let Ok(o) = ns {
        let prefix = format!("mfd{pid}-");
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with(&prefix))
                .map(|l| format!("namespace {l}")),
        );
    }
    if let Ok(o) = Command::new("ip").args(["-o", "link"]).output() {
        let name = format!("mfd{pid}h");
        out.extend(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.contains(&name))
                .map(|l| format!("link {l}")),
        );
    }
    // Every process the demo starts has the state directory on its command line.
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(state) && !cmd.contains("demo --state-dir") {
                out.push(format!(
                    "process {}: {cmd}",
                    e.file_name().to_string_lossy()
                ));
            }
        }
    }
    out
}

#[test]
fn sigterm_mid_run_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("demo-state");
    let state_s = state.display().to_string();
    let mut demo = Proc::spawn(
        "demo",
        &["demo".into(), "--state-dir".into(), state_s.clone()],
        dir.path(),
    )
    .unwrap();
    wait_for(Duration::from_secs(120), "the demo's traffic phase", || {
        Ok(demo.log().contains("phase 1").then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", demo.log()));
    let pid = demo.pid().unwrap();
    let mode = demo
        .log()
        .lines()
        .find(|l| l.starts_with("mode:"))
        .unwrap_or_default()
        .to_string();
    println!("{mode}");
    let running = leftovers(pid, &state_s);
    assert!(
        running.iter().filter(|l| l.starts_with("process")).count() >= 5,
        "the federator, three agents, gateways and the VM agent run: {running:#?}"
    );
    demo.term().unwrap();
    wait_for(Duration::from_secs(15), "the demo to exit", || {
        Ok(demo.exited().then_some(()))
    })
    .unwrap();
    assert!(
        demo.log().contains("interrupted; cleaning up"),
        "{}",
        demo.log()
    );
    let left = leftovers(pid, &state_s);
    assert!(left.is_empty(), "left behind: {left:#?}");
    // What it wrote is under its state directory only (logs included).
    assert!(state.join("logs").join("federator.log").exists());
}
