//! Every fuzz target has seeds checked in, and scripts/test fuzzes every target: a target
//! without a seeds directory makes libFuzzer exit at start ("No such file or directory"),
//! which only the slow fuzz phase at the end of scripts/test would otherwise show.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

fn targets(root: &Path) -> Vec<String> {
    let mut t: Vec<String> = std::fs::read_dir(root.join("fuzz/fuzz_targets"))
        .expect("fuzz/fuzz_targets")
        .filter_map(|e| {
            let p = e.ok()?.path();
            if p.extension()? != "rs" {
                return None;
            }
            Some(p.file_stem()?.to_string_lossy().into_owned())
        })
        .collect();
    t.sort();
    t
}

/// Files git tracks under `dir` (None when this is not a git checkout).
fn tracked(root: &Path, dir: &str) -> Option<Vec<String>> {
    let out = Command::new("git")
        .args(["ls-files", "--", dir])
        .current_dir(root)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

#[test]
fn every_fuzz_target_has_tracked_seeds_and_is_run_by_scripts_test() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let targets = targets(&root);
    assert!(targets.len() >= 5, "fuzz targets: {targets:?}");
    let script = std::fs::read_to_string(root.join("scripts/test")).unwrap();
    for t in &targets {
        let dir = format!("fuzz/seeds/{t}");
        let on_disk = std::fs::read_dir(root.join(&dir))
            .map(|d| d.count())
            .unwrap_or(0);
        assert!(on_disk > 0, "{dir}: no seed files");
        if let Some(files) = tracked(&root, &dir) {
            assert!(
                !files.is_empty(),
                "{dir}: seeds exist but git does not track them"
            );
        }
        assert!(
            script.contains(&format!(" {t} ")) || script.contains(&format!(" {t};")),
            "scripts/test does not fuzz {t}"
        );
    }
}
