//! Generates the gRPC code with the vendored protoc (no system protoc).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded here.
    unsafe { std::env::set_var("PROTOC", protoc) };
    tonic_prost_build::configure().compile_protos(&["proto/ctw.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto/ctw.proto");
    Ok(())
}
