//! Generates the gRPC code of ../proto/csi.proto (CSI) and ../proto/secrets_store_provider.proto
//! (the Secrets Store CSI driver's provider API), ../proto/keybroker/v1/broker.proto and
//! ../proto/pluginregistration.proto (kubelet's plugin registration) with protox (pure Rust), so a fresh machine
//! needs no `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = [
        proto_dir.join("csi.proto"),
        proto_dir.join("secrets_store_provider.proto"),
        proto_dir.join("keybroker/v1/broker.proto"),
        proto_dir.join("pluginregistration.proto"),
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&proto_dir])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
