//! The crate graph in docs/architecture.md is the one Cargo builds, and it keeps the rules the
//! document states: the model is a leaf, the demo's harness and the agent are linked only from
//! the top.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

type Graph = BTreeMap<String, BTreeSet<String>>;

/// meshfed crate -> the meshfed crates it depends on (normal dependencies), short names.
fn cargo_graph() -> Graph {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(&root)
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata is JSON");
    let pkgs = m["packages"].as_array().expect("packages");
    let names: BTreeSet<String> = pkgs
        .iter()
        .map(|p| p["name"].as_str().unwrap_or_default().to_string())
        .collect();
    let short = |n: &str| n.strip_prefix("meshfed-").unwrap_or(n).to_string();
    let mut g = Graph::new();
    for p in pkgs {
        let name = p["name"].as_str().unwrap_or_default();
        let deps = p["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            .filter(|d| d["kind"].is_null())
            .filter_map(|d| d["name"].as_str())
            .filter(|d| names.contains(*d))
            .map(short)
            .collect();
        g.insert(short(name), deps);
    }
    g
}

/// The table under "## Crates" in docs/architecture.md.
fn documented_graph() -> Graph {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/architecture.md");
    let doc = std::fs::read_to_string(&path).expect("docs/architecture.md");
    let start = doc.find("## Crates").expect("a Crates section");
    let mut g = Graph::new();
    for line in doc[start..].lines().skip(1) {
        if line.starts_with("## ") {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `meshfed-x` (`folder`) | concern | deps |
        if cells.len() < 5 || !cells[1].starts_with("`meshfed") {
            continue;
        }
        let name = cells[1].split('`').nth(1).expect("a crate name");
        let name = name.strip_prefix("meshfed-").unwrap_or(name).to_string();
        let deps = cells[3]
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty() && *d != "-")
            .map(str::to_string)
            .collect();
        g.insert(name, deps);
    }
    g
}

#[test]
fn the_documented_crate_graph_is_the_built_one() {
    let built = cargo_graph();
    let doc = documented_graph();
    for (c, deps) in &built {
        let name = if c == "meshfed" {
            "meshfed"
        } else {
            c.as_str()
        };
        assert_eq!(
            doc.get(name),
            Some(deps),
            "docs/architecture.md row for {name} (built: {deps:?})"
        );
    }
    assert_eq!(
        doc.keys().collect::<Vec<_>>(),
        built.keys().collect::<Vec<_>>(),
        "crates in the document and in the workspace"
    );
}

#[test]
fn the_model_is_a_leaf_and_the_top_is_the_only_user_of_agent_and_harness() {
    let g = cargo_graph();
    let allowed: BTreeSet<String> = ["proto", "trust"].map(String::from).into();
    assert!(
        g["model"].is_subset(&allowed),
        "model depends on {:?}",
        g["model"]
    );
    let top: BTreeSet<&str> = ["meshfed", "demo", "chaos"].into();
    for (c, deps) in &g {
        if top.contains(c.as_str()) {
            continue;
        }
        assert!(!deps.contains("harness"), "{c} links the demo's harness");
        assert!(!deps.contains("agent"), "{c} links the agent");
        assert!(!deps.contains("demo"), "{c} links the demo");
    }
}
