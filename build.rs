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

    // `x86_simd`: the x86-64 kernels (AVX2, AVX-512) and their run-time detection are compiled.
    // Every use of x86 intrinsics sits behind it, so the `portable` feature builds on x86-64
    // exactly what an aarch64 (or any non-x86) target gets, and CI tests that configuration.
    println!("cargo::rustc-check-cfg=cfg(x86_simd)");
    let x86 = std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "x86_64");
    if x86 && std::env::var_os("CARGO_FEATURE_PORTABLE").is_none() {
        println!("cargo::rustc-cfg=x86_simd");
    }

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
