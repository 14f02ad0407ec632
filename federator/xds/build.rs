//! Compiles a descriptor set of the Envoy resources meshfed serves over xDS, so that
//! `meshfed proxy-config` and the golden tests can print them as canonical proto3 JSON (the
//! form Envoy's own config_dump uses). The .proto files are the ones shipped inside the
//! `envoy-types` crate whose generated Rust types the xDS server encodes with; protox compiles
//! them in-process, so no system `protoc` is needed.

use std::path::{Path, PathBuf};

const ROOTS: &[&str] = &[
    "envoy/config/cluster/v3/cluster.proto",
    "envoy/config/endpoint/v3/endpoint.proto",
    "envoy/config/listener/v3/listener.proto",
    "envoy/config/route/v3/route.proto",
    "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.proto",
    "envoy/extensions/filters/http/router/v3/router.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls_spiffe_validator_config.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../../Cargo.lock");
    let proto = envoy_types_proto_dir()?;
    let includes: Vec<PathBuf> = std::fs::read_dir(&proto)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    let fds = protox::compile(ROOTS, &includes)
        .map_err(|e| format!("compiling Envoy protos from {}: {e}", proto.display()))?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("envoy_descriptor.bin");
    std::fs::write(out, prost::Message::encode_to_vec(&fds))?;
    Ok(())
}

/// The `proto/` directory of the envoy-types version in Cargo.lock, in the cargo registry (or a
/// `vendor/` directory next to the workspace).
fn envoy_types_proto_dir() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let lock = std::fs::read_to_string("../../Cargo.lock")?;
    let mut version = None;
    let mut lines = lock.lines();
    while let Some(l) = lines.next() {
        if l.trim() == "name = \"envoy-types\"" {
            if let Some(v) = lines.next() {
                version = v
                    .trim()
                    .strip_prefix("version = \"")
                    .and_then(|v| v.strip_suffix('"'))
                    .map(str::to_string);
            }
            break;
        }
    }
    let version = version.ok_or("envoy-types is not in Cargo.lock")?;
    let dir = format!("envoy-types-{version}");
    let mut candidates = vec![
        Path::new("../../vendor").join("envoy-types"),
        Path::new("../../vendor").join(&dir),
    ];
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .ok_or("neither CARGO_HOME nor HOME is set")?;
    if let Ok(rd) = std::fs::read_dir(cargo_home.join("registry/src")) {
        for index in rd.filter_map(|e| e.ok()) {
            candidates.push(index.path().join(&dir));
        }
    }
    candidates
        .into_iter()
        .map(|c| c.join("proto"))
        .find(|p| p.join("data-plane-api").is_dir())
        .ok_or_else(|| {
            format!("cannot find the .proto files of {dir} in the cargo registry or vendor/").into()
        })
}
