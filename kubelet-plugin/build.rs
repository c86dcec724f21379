//! Generates the messages and gRPC stubs of the Device Plugin API
//! (proto/deviceplugin.proto) and of the part of kubelet's PodResources API
//! the plugin reads (proto/podresources.proto). Needs `protoc` (Debian:
//! protobuf-compiler; or point PROTOC at one).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/deviceplugin.proto");
    println!("cargo:rerun-if-changed=proto/podresources.proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &["proto/deviceplugin.proto", "proto/podresources.proto"],
            &["proto"],
        )?;
    Ok(())
}
