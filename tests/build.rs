//! Compiles the etcd baseline's API subset (`proto/etcd/kv.proto`) for the cluster benchmark,
//! with a vendored `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().build_server(false).build_client(true).compile_with_config(
        config,
        &["proto/etcd/kv.proto"],
        &["proto"],
    )?;
    Ok(())
}
