//! Compiles the peering protocol with protox (a protobuf compiler in Rust), so
//! building needs no `protoc` binary.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/isthmus/federation/v1/federation.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors = protox::compile([PROTO], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
