//! Compiles the federation API with protox (pure Rust), so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/meshfed/federation/v1/federation.proto",
        "proto/meshfed/vm/v1/vm.proto",
        "proto/istio/v1/auth/ca.proto",
        "proto/meshfed/workload/v1/workload.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Eq lets the model share services behind Arc and compare unchanged ones by pointer.
        .type_attribute(".meshfed.federation.v1.ServiceExport", "#[derive(Eq)]")
        .type_attribute(".meshfed.federation.v1.Endpoint", "#[derive(Eq)]")
        .compile_fds(fds)?;
    Ok(())
}
