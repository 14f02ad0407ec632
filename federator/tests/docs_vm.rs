//! docs/vm.md's `vm.yaml` table and `meshfed vm agent --help` name exactly the fields the VM
//! agent's configuration type has (read from its source), and a file with every field parses.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// `pub snake_case:` fields of `VmConfig`, in camelCase.
fn struct_fields() -> BTreeSet<String> {
    let src = std::fs::read_to_string(root().join("federator/vm-agent/src/config.rs")).unwrap();
    let body = src.split("pub struct VmConfig {").nth(1).unwrap();
    let body = &body[..body.find("\n}").unwrap()];
    body.lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter_map(|l| l.split_once(':').map(|(n, _)| n.to_string()))
        .map(|n| {
            let mut out = String::new();
            let mut up = false;
            for c in n.chars() {
                if c == '_' {
                    up = true;
                } else if up {
                    out.push(c.to_ascii_uppercase());
                    up = false;
                } else {
                    out.push(c);
                }
            }
            out
        })
        .collect()
}

fn doc_rows() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(root().join("docs/vm.md")).unwrap();
    let table = doc.split("| field | default | what |").nth(1).unwrap();
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_string(), cells[2].to_string())
        })
        .collect()
}

#[test]
fn the_vm_yaml_table_names_every_field_and_only_those() {
    let fields = struct_fields();
    assert!(fields.len() >= 20, "{fields:?}");
    let documented: BTreeSet<String> = doc_rows().into_iter().map(|(f, _)| f).collect();
    assert_eq!(documented, fields);
    // The help names them too.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_meshfed"))
        .args(["vm", "agent", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).replace('\n', " ");
    for f in &fields {
        assert!(
            help.contains(f.as_str()),
            "--help does not name {f}: {help}"
        );
    }
}

#[test]
fn a_vm_yaml_with_every_field_parses() {
    let yaml = "cluster: east\ntrustDomain: east.mesh\nnetwork: net-e\nnamespace: shop\ngroup: payment-vm\nserviceAccount: payment\ncontrolPlane: [\"gw.example.com:15443\"]\nxds: \"gw.example.com:15443\"\ncontrolPlaneSni: meshfed-agent.meshfed-system.svc\nxdsSni: meshfed-xds.meshfed-system.svc\nrootCert: /etc/meshfed/root-cert.pem\ntokenFile: /etc/meshfed/join-token\nstateDir: /var/lib/meshfed\ncertDir: /etc/meshfed/certs\naddress: 10.0.0.9\nvmNetwork: vmnet\nlocality: us-east1/us-east1-b\nlabels: {version: v1}\nxdsListen: off\ndnsListen: 127.0.0.1:15053\ndnsUpstream: [\"10.0.0.2\"]\nadmin: off\ndrainTimeout: 5s\n";
    let cfg = meshfed_vm_agent::config::VmConfig::parse(yaml, "vm.yaml").unwrap();
    assert_eq!(cfg.group.0, "payment-vm");
    // Every documented field is in it.
    for (f, _) in doc_rows() {
        assert!(
            yaml.contains(&format!("{f}:")),
            "{f} missing from the sample"
        );
    }
}
