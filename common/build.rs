//! Generates the gRPC code of `proto/jepa/v1` with a vendored `protoc`, so
//! no system protobuf compiler is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the
    // environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "../proto/jepa/v1/jepa.proto",
        "../proto/jepa/v1/spec.proto",
        "../proto/jepa/v1/types.proto",
        "../proto/jepa/v1/user.proto",
        "../proto/jepa/v1/worker.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("jepa_v1_descriptor.bin"))
        .compile_protos(&protos, &["../proto"])?;
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
