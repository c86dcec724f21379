//! Generates the Device Plugin API's messages and gRPC stubs from
//! proto/deviceplugin.proto. Needs `protoc` (Debian: protobuf-compiler;
//! or point PROTOC at one).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/deviceplugin.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(&["proto/deviceplugin.proto"], &["proto"])?;
    Ok(())
}
