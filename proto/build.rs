//! Compiles `proto/*.proto` with a vendored `protoc`, so no system install is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().build_server(true).build_client(true).compile_with_config(
        config,
        &["proto/mxcas/meta/v1/meta.proto", "proto/mxcas/meta/v1/raft.proto"],
        &["proto"],
    )?;
    Ok(())
}
