//! Compiles the protobuf schemas under `proto/` with prost-build, using the protoc binary
//! vendored by `protoc-bin-vendored`, so no system protoc is needed.

use std::error::Error;

/// Message-only schemas (no gRPC services), compiled with plain prost-build.
/// Each lands in `$OUT_DIR/<package>.rs`.
const MESSAGE_PROTOS: &[&str] = &["proto/onnx.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");

    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    prost_build::Config::new()
        .protoc_executable(&protoc)
        .compile_protos(MESSAGE_PROTOS, &["proto"])?;
    Ok(())
}
