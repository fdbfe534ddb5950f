//! Compiles the protobuf schemas under `proto/` with the protoc binary vendored by
//! `protoc-bin-vendored`, so no system protoc is needed: message-only schemas with
//! prost-build, gRPC services with tonic-prost-build (plus a file descriptor set that the
//! server hands to gRPC reflection).

use std::error::Error;
use std::path::PathBuf;

/// Message-only schemas (no gRPC services). Each lands in `$OUT_DIR/<package>.rs`.
const MESSAGE_PROTOS: &[&str] = &["proto/onnx.proto"];

/// Schemas with gRPC services: server and client code is generated for each.
const SERVICE_PROTOS: &[&str] = &[
    "proto/slimserve/v1/slimserve.proto",
    "proto/kserve/grpc_service.proto",
];

/// Where the encoded descriptors of `SERVICE_PROTOS` go (read by `src/grpc/mod.rs`).
const DESCRIPTOR_SET: &str = "slimserve_descriptor.bin";

fn main() -> Result<(), Box<dyn Error>> {
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed=build.rs");

    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    prost_build::Config::new()
        .protoc_executable(&protoc)
        .compile_protos(MESSAGE_PROTOS, &["proto"])?;

    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = prost_build::Config::new();
    config.protoc_executable(&protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join(DESCRIPTOR_SET))
        // Image and tensor payloads are decoded without an extra copy.
        .bytes(".")
        .compile_with_config(config, SERVICE_PROTOS, &["proto"])?;
    Ok(())
}
